"""lowrank_ext — fast QLoRA kernels for PyTorch.

NF4 4-bit quantization byte-for-byte compatible with bitsandbytes, fused dequantize+matmul+LoRA ops
(forward and backward, CPU and CUDA), paged 8-bit optimizers, LoRA/QLoRA/DoRA/VeRA layers and
PEFT-format adapter files. All kernels are `torch.ops.lowrank_ext.*` custom ops.
"""

from lowrank_ext._extension import build_info, has_cuda_kernels  # first: loads _C or fails loudly

from lowrank_ext import ops  # noqa: E402
from lowrank_ext.nf4 import NF4Weight, quantize_nf4  # noqa: E402
from lowrank_ext import nn  # noqa: E402  (layers, injector, adapters)
from lowrank_ext import optim  # noqa: E402
from lowrank_ext.config import LoRAConfig  # noqa: E402
from lowrank_ext.inject import count_parameters, inject, inject_summary  # noqa: E402
from lowrank_ext.adapters import *  # noqa: E402,F401,F403
from lowrank_ext.adapters import __all__ as _adapters_all  # noqa: E402
from lowrank_ext.adapter_files import load_adapter, save_adapter  # noqa: E402
from lowrank_ext.interop import from_bnb  # noqa: E402
from lowrank_ext.rank_alloc import allocate_ranks  # noqa: E402

__version__ = "0.1.0"

__all__ = ["NF4Weight", "build_info", "has_cuda_kernels", "ops", "optim", "quantize_nf4"]
__all__ += ["allocate_ranks"]
__all__ += ["LoRAConfig", "count_parameters", "from_bnb", "inject", "inject_summary", "load_adapter", "nn",
            "save_adapter", *_adapters_all]

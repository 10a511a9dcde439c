"""lowrank_ext — fast QLoRA kernels for PyTorch.

NF4 4-bit quantization in bitsandbytes' format, fused dequantize+matmul+LoRA ops (forward and backward,
CPU and CUDA), paged 8-bit optimizers, LoRA/QLoRA/DoRA/VeRA layers, (IA)³ / prompt tuning / BitFit through the
same injector (IA3Config, PromptTuningConfig, BitFitConfig) and PEFT-format adapter files. All kernels are
`torch.ops.lowrank_ext.*` custom ops.

Layers, each importing only from the ones below it (docs/architecture.md):
    core          _extension, nf4, ops/, nn/, optim        kernels' Python side and layers; torch only
    adapters/     the PEFT-compatible layer                 configs, injector, management, files, bnb import
    distributed   several processes                         FSDP2 sharding of the NF4 base, DDP, sharded checkpoints
    finetune/     the application                           command line, trainer, data, models, benches
This module only re-exports; `import lowrank_ext` loads none of transformers, peft, bitsandbytes,
matplotlib or safetensors (they are imported where they are used).
"""

import sys as _sys

from lowrank_ext.finetune.cli_args import wants_help as _wants_help  # torch-free

# `python -m lowrank_ext [...] --help`: Python imports this package before running __main__.py, with sys.argv[0]
# still "-m" (the documented value while -m locates its module). Then nothing below is imported — torch least of
# all — and __main__.py prints the help from the torch-free parser (finetune/cli_args.py) in a fraction of a second.
_HELP_ONLY = _sys.argv[:1] == ["-m"] and _wants_help(_sys.argv[1:])

_adapters_all: list[str] = []  # (filled below; stays empty for a --help)
if not _HELP_ONLY:
    from lowrank_ext import distributed, nn, ops, optim  # distributed: torch.distributed is imported lazily
    from lowrank_ext._extension import (  # first: loads _C or fails loudly
        build_info,
        cpu_isa,
        has_cuda_kernels,
        last_kernel_path,
        native_bf16_matmul,
    )
    from lowrank_ext.adapters import *
    from lowrank_ext.adapters import __all__ as _adapters_all
    from lowrank_ext.finetune.rank_allocation import allocate_ranks
    from lowrank_ext.nf4 import NF4Weight, quantize_nf4
    from lowrank_ext.nn.fused_model import patch_model, unpatch_model

__version__ = "0.1.0"

# Modules that moved in the layout of docs/architecture.md: `from lowrank_ext import <old name>` still works.
_MOVED_MODULES = {
    "adapter_files": "lowrank_ext.adapters.files",
    "bench_cmd": "lowrank_ext.finetune.bench_command",
    "cli": "lowrank_ext.finetune.cli",
    "config": "lowrank_ext.adapters.config",
    "data": "lowrank_ext.finetune.data",
    "interop": "lowrank_ext.adapters.bnb_import",
    "models": "lowrank_ext.finetune.models",
    "rank_alloc": "lowrank_ext.finetune.rank_allocation",
    "train": "lowrank_ext.finetune.trainer",
}


# Names of lowrank_ext.hf (which imports transformers and registers NF4Config with it), loaded on first use.
_HF_NAMES = ("NF4Config",)


def __getattr__(name: str):
    if name == "hf" or name in _HF_NAMES:  # `lowrank_ext.hf.enable_peft()` works after a bare `import lowrank_ext`
        import importlib

        hf = importlib.import_module("lowrank_ext.hf")
        return hf if name == "hf" else getattr(hf, name)
    if name in _MOVED_MODULES:
        import importlib
        import warnings

        warnings.warn(f"lowrank_ext.{name} moved to {_MOVED_MODULES[name]}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(_MOVED_MODULES[name])
    raise AttributeError(f"module 'lowrank_ext' has no attribute {name!r}")


__all__ = ["NF4Weight", "allocate_ranks", "build_info", "cpu_isa", "distributed", "has_cuda_kernels",
           "last_kernel_path", "native_bf16_matmul", "nn", "ops", "optim", "patch_model", "quantize_nf4",
           "unpatch_model"]
__all__.extend(_adapters_all)

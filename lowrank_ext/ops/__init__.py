"""Python entry points of the custom ops: thin wrappers, fake kernels and autograd, one file per family.

  nf4.py     quantize / double-quant / dequantize (NF4 format)
  linear.py  fused NF4 matmul + LoRA, forward and backward
  optim.py   fused AdamW updates (fp32 and 8-bit state), paged memory
  fused.py   fused model ops: RMSNorm (+ residual add), rotary embedding, SwiGLU
"""

from lowrank_ext.ops.fused import *  # noqa: F401,F403
from lowrank_ext.ops.fused import __all__ as _fused_all
from lowrank_ext.ops.linear import *  # noqa: F401,F403
from lowrank_ext.ops.linear import __all__ as _linear_all
from lowrank_ext.ops.nf4 import *  # noqa: F401,F403
from lowrank_ext.ops.nf4 import __all__ as _nf4_all
from lowrank_ext.ops.optim import *  # noqa: F401,F403
from lowrank_ext.ops.optim import __all__ as _optim_all

__all__ = [*_nf4_all, *_linear_all, *_optim_all, *_fused_all]

"""Loads the compiled library `lowrank_ext._C` (which registers torch.ops.lowrank_ext.*) loudly.

A missing or mismatched build is the most common install problem, so the error says what was found,
what was expected and the command that fixes it.
"""

from __future__ import annotations

import importlib

import torch

__all__ = ["build_info", "cpu_isa", "has_cuda_kernels", "last_kernel_path", "native_bf16_matmul"]

_REBUILD = "rebuild it with: pip install --no-build-isolation --force-reinstall --no-deps ."


def _load() -> None:
    try:
        config = importlib.import_module("lowrank_ext._build_config")
    except ImportError:
        config = None
    if config is not None and config.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"lowrank_ext: the compiled extension was built for torch {config.TORCH_VERSION}, "
            f"but torch {torch.__version__} is installed; {_REBUILD}"
        )
    try:
        importlib.import_module("lowrank_ext._C")
    except ImportError as e:
        raise ImportError(
            f"lowrank_ext: the compiled extension lowrank_ext._C could not be loaded ({e}). "
            f"It is missing or was built for another torch/Python; {_REBUILD}"
        ) from e


_load()
from lowrank_ext import _build_config as _config  # noqa: E402  (written by setup.py next to _C)


def _compiled_flags() -> dict[str, str]:
    flags = torch.ops.lowrank_ext.build_flags()
    return dict(item.split("=", 1) for item in flags.split(";"))


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled into this build."""
    return bool(_config.WITH_CUDA)


CPU_ISAS = ("avx2", "avx512", "avx512bf16", "amx")


def cpu_isa(detected: bool = False) -> str:
    """The CPU kernel family the NF4 matmuls take (csrc/cpu/cpu_isa.h): "amx" or "avx512bf16" (bf16
    activations run bf16 panels on oneDNN's AMX / AVX512-BF16 GEMM), "avx512" or "avx2" (bf16 computed in
    fp32). The best this CPU supports, unless LOWRANK_EXT_CPU_ISA forces a lower one (a bad value raises
    ValueError). detected=True: the best this CPU supports, ignoring the override."""
    return torch.ops.lowrank_ext.cpu_isa(detected)


def native_bf16_matmul(device: torch.device | str = "cpu") -> bool:
    """True where bf16 matmuls run on bf16 hardware: a CPU whose kernel family is avx512bf16 or amx, or a
    CUDA device with bf16 support (sm80+). What `finetune --dtype auto` decides on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_isa() in ("avx512bf16", "amx")


def build_info() -> dict[str, object]:
    """What this build of lowrank_ext was compiled with: torch version, CUDA archs, CPU features, and the
    CPU kernel family it takes here (cpu_isa; cpu_isa_detected ignores LOWRANK_EXT_CPU_ISA)."""
    compiled = _compiled_flags()
    try:
        isa = cpu_isa()
    except ValueError as e:  # a bad LOWRANK_EXT_CPU_ISA: shown, not hidden (the ops raise the same error)
        isa = f"invalid ({e})"
    return {
        "torch_built_with": compiled["torch"],
        "torch_installed": torch.__version__,
        "cuda": compiled["cuda"] != "none",
        "cuda_runtime": compiled["cuda"],
        "cuda_archs": _config.CUDA_ARCHS.split(";") if _config.CUDA_ARCHS else [],
        "cpu_flags": _config.CPU_FLAGS,
        "avx2": compiled["avx2"] == "1",
        "fma": compiled["fma"] == "1",
        "openmp": compiled["openmp"] == "1",
        "cpu_isa": isa,
        "cpu_isa_detected": cpu_isa(detected=True),
        "cuda_available_now": torch.cuda.is_available(),
    }


KERNEL_PRODUCTS = ("nt", "nn", "dequantize", "quantize", "adamw")


def last_kernel_path(product: str) -> str:
    """The kernel the last call of `product` ran on this thread, as recorded by the C++ dispatchers
    (csrc/include/lowrank_ext/kernel_path.h); "" before any call. Products and names:

    - "nt" (x · deq(W)ᵀ: nf4_linear, nf4_lora_linear): CPU gemv-avx512-blocked | gemv-avx512 | gemv-avx2 |
      gemv-scalar | panel | panel-bf16; CUDA gemv | mma | simt
    - "nn" (gy · deq(W): the grad-input products): CPU panel | panel-bf16; CUDA mma | simt
    - "dequantize": CPU avx2 | avx2-stream | scalar; CUDA vec16 | scalar-store
    - "quantize": CPU avx2 | scalar; CUDA warp-per-block
    - "adamw" (both AdamW steps): CPU avx2 | scalar; CUDA adamw32 | adamw8bit
    """
    if product not in KERNEL_PRODUCTS:
        raise ValueError(f"lowrank_ext::last_kernel_path: product must be one of {', '.join(KERNEL_PRODUCTS)}, "
                         f"got {product!r}")
    return torch.ops.lowrank_ext.last_kernel_path(product)

"""The CUDA kernels on the host simulator (tests/sim/): build the library, call its entry points on torch CPU
tensors. Used by tests/test_simulated_kernels.py.

    sim = Sim.load()                    # this checkout's csrc/ (or $LRX_SIM_CSRC), every unit
    y, stats = sim.mma(x, w, ...)       # the tensor-core GEMM, launched with the launcher's geometry

Every call returns the kernel's output tensors; a simulator error (deadlock, divergent barrier, a bad
shared-memory address, __trap ...) raises SimError with the simulator's message.
"""

from __future__ import annotations

import ctypes
import importlib.util
import time
from pathlib import Path
from typing import ClassVar

import torch

_BUILD = Path(__file__).resolve().parent / "sim" / "build.py"
_spec = importlib.util.spec_from_file_location("lrx_sim_build", _BUILD)
build_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_mod)

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
P, I64, I32, U64, F32, F64 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_float,
                              ctypes.c_double)
MATMUL_ARGS = [I32, I64, I64, I64, I32, P, P, P, P, P, P, P, I64, P, I64, P, I64, I32, F32, P, P, I64, U64, P]


class SimError(RuntimeError):
    pass


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(err: bytes, what: str) -> None:
    if err:
        raise SimError(f"{what}: {err.decode()}")


class Sim:
    _cache: ClassVar[dict[Path, Sim]] = {}  # one loaded library per built path

    def __init__(self, lib: Path):
        self.path = lib
        self.lib = ctypes.CDLL(str(lib))
        sig = {
            "lrx_sim_nf4_mma": [I32, *MATMUL_ARGS],
            "lrx_sim_nf4_gemv": [I32, P, *MATMUL_ARGS],
            "lrx_sim_nf4_simt": [I32, *MATMUL_ARGS],
            "lrx_sim_quantize": [I32, P, I64, I32, P, P, P, U64],
            "lrx_sim_double_quant": [P, I64, P, P, P, P, U64],
            "lrx_sim_dequantize": [I32, P, I32, I64, P, P, P, P, P, P, U64, P],
            "lrx_sim_row_sqnorm": [I64, I64, I32, P, P, P, P, P, P, P, U64],
            "lrx_sim_adamw32": [I32, P, P, P, P, I64, F64, F64, F64, F64, F64, I64, I32, U64],
            "lrx_sim_adamw8bit": [I32, P, P, P, P, P, P, P, P, I64, F64, F64, F64, F64, F64, I64, U64],
            "lrx_sim_rms_norm": [I32, I32, I64, I64, F64, F64, P, P, P, P, P, P, P, P, P, I32, U64],
            "lrx_sim_rope": [I32, I32, I64, I64, I64, I64, P, I64, I64, I64, P, I64, I64, I64, P, P, I64, I64, I64,
                             I64, I64, I32, U64],
            "lrx_sim_swiglu": [I32, I32, I64, P, P, P, P, P, P, I32, U64],
            "lrx_sim_probe_mma": [I32, P, P, P, P],
            "lrx_sim_probe_ldmatrix": [I32, P, I32, P, P],
            "lrx_sim_probe_defect": [I32, P],
            "lrx_sim_probe_warp": [P],
        }
        for name, args in sig.items():
            if hasattr(self.lib, name):
                fn = getattr(self.lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_char_p
        if hasattr(self.lib, "lrx_sim_probe_pairs"):
            self.lib.lrx_sim_probe_pairs.argtypes = [F32, F32, P, P]
            self.lib.lrx_sim_probe_pairs.restype = None
        if hasattr(self.lib, "lrx_sim_probe_convert"):
            self.lib.lrx_sim_probe_convert.argtypes = [P, I64, P, P, P, P]
            self.lib.lrx_sim_probe_convert.restype = None

    @classmethod
    def load(cls, csrc: str | Path | None = None, units: list[str] | None = None) -> Sim:
        lib = build_mod.build(csrc, units)
        if lib not in cls._cache:
            cls._cache[lib] = cls(lib)
        return cls._cache[lib]

    # ---- NF4 matmuls ---------------------------------------------------------------------------------
    @staticmethod
    def _matmul_args(a, w, out, lora, bias, seed, stats):
        """The flat argument list (sim_common.h: LRX_SIM_MATMUL_ARGS). lora = (lowrank, lowrank_w, scaling)."""
        packed, absmax, nested, nmap, offset = w.tensors()
        dq = nested is not None
        N, K = w.shape
        lowrank, lowrank_w, scaling = lora if lora is not None else (None, None, 1.0)
        r = lowrank.shape[1] if lowrank is not None else 0
        return [
            DTYPE_CODE[a.dtype], a.shape[0], N, K, w.blocksize, _ptr(packed), None if dq else _ptr(absmax),
            _ptr(absmax) if dq else None, _ptr(nested), _ptr(nmap), _ptr(offset),
            _ptr(a), a.stride(0), _ptr(lowrank), lowrank.stride(0) if lowrank is not None else 0,
            _ptr(lowrank_w), lowrank_w.stride(0) if lowrank_w is not None else 0, r, scaling,
            _ptr(bias), _ptr(out), out.stride(0), seed, ctypes.cast(stats, P),
        ]

    def _matmul(self, fn, lead, nn, a, w, lora, bias, seed):
        N, K = w.shape
        out = torch.full((a.shape[0], K if nn else N), float("nan"), dtype=a.dtype)  # unwritten shows as NaN
        stats = (ctypes.c_uint64 * 3)()
        t0 = time.perf_counter()
        _check(fn(*lead, *self._matmul_args(a, w, out, lora, bias, seed, stats)), fn.__name__)
        return out, {"seconds": time.perf_counter() - t0, "switches": stats[0], "collectives": stats[1]}

    def mma(self, a, w, *, nn=False, lora=None, bias=None, seed=0):
        """NT: y = a · deq(W)ᵀ (+ s·u·Bᵀ) (+ bias);  NN: gx = a · deq(W) (+ gu·A). lora = (u|gu, B|A, s)."""
        return self._matmul(self.lib.lrx_sim_nf4_mma, [int(nn)], nn, a, w, lora, bias, seed)

    def simt(self, a, w, *, nn=False, lora=None, bias=None, seed=0):
        return self._matmul(self.lib.lrx_sim_nf4_simt, [int(nn)], nn, a, w, lora, bias, seed)

    def gemv(self, x, w, *, sm_count, lora=None, bias=None, seed=0):
        """y = x · deq(W)ᵀ (+ s·u·Bᵀ) (+ bias) for M <= 16; also returns the plan (row_groups, kslice, splits)."""
        plan = (ctypes.c_int64 * 3)()
        out, st = self._matmul(self.lib.lrx_sim_nf4_gemv, [sm_count, ctypes.cast(plan, P)], False, x, w, lora,
                               bias, seed)
        st["plan"] = tuple(plan)
        return out, st

    # ---- NF4 format ----------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, blocksize: int, seed=0):
        x = x.contiguous().view(-1)
        n = x.numel()
        packed = torch.full(((n + 1) // 2, 1), 0xEE, dtype=torch.uint8)
        absmax = torch.full(((n + blocksize - 1) // blocksize,), float("nan"))
        bad = torch.tensor([2**63 - 1], dtype=torch.int64)
        _check(self.lib.lrx_sim_quantize(DTYPE_CODE[x.dtype], _ptr(x), n, blocksize, _ptr(packed), _ptr(absmax),
                                         _ptr(bad), seed), "quantize")
        return packed, absmax, int(bad.item())

    def double_quant(self, absmax, nested_map, offset, seed=0):
        nb = absmax.numel()
        q = torch.full((nb,), 0xEE, dtype=torch.uint8)
        a2 = torch.full(((nb + 255) // 256,), float("nan"))
        _check(self.lib.lrx_sim_double_quant(_ptr(absmax), nb, _ptr(nested_map), _ptr(offset), _ptr(q), _ptr(a2),
                                             seed), "double_quant")
        return q, a2

    def dequantize(self, w, out: torch.Tensor, seed=0) -> bool:
        """Writes deq(W) into `out` (contiguous, numel elements, any address); returns out_aligned16."""
        packed, absmax, nested, nmap, offset = w.tensors()
        dq = nested is not None
        aligned = ctypes.c_int(-1)
        _check(self.lib.lrx_sim_dequantize(
            DTYPE_CODE[out.dtype], _ptr(packed), w.blocksize, out.numel(), None if dq else _ptr(absmax),
            _ptr(absmax) if dq else None, _ptr(nested), _ptr(nmap), _ptr(offset), _ptr(out), seed,
            ctypes.byref(aligned)), "dequantize")
        return bool(aligned.value)

    def row_sqnorm(self, w, seed=0):
        packed, absmax, nested, nmap, offset = w.tensors()
        dq = nested is not None
        N, K = w.shape
        sq = torch.full((N,), float("nan"))
        _check(self.lib.lrx_sim_row_sqnorm(N, K, w.blocksize, _ptr(packed), None if dq else _ptr(absmax),
                                           _ptr(absmax) if dq else None, _ptr(nested), _ptr(nmap), _ptr(offset),
                                           _ptr(sq), seed), "row_sqnorm")
        return sq

    # ---- AdamW ---------------------------------------------------------------------------------------
    def adamw32(self, p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, sm_count=1, seed=0):
        _check(self.lib.lrx_sim_adamw32(DTYPE_CODE[p.dtype], _ptr(p), _ptr(g), _ptr(m), _ptr(v), p.numel(), lr,
                                        beta1, beta2, eps, weight_decay, step, sm_count, seed), "adamw32")

    def adamw8bit(self, p, g, c1, c2, a1, a2, q1, q2, *, lr, beta1, beta2, eps, weight_decay, step, seed=0):
        _check(self.lib.lrx_sim_adamw8bit(DTYPE_CODE[p.dtype], _ptr(p), _ptr(g), _ptr(c1), _ptr(c2), _ptr(a1),
                                          _ptr(a2), _ptr(q1), _ptr(q2), p.numel(), lr, beta1, beta2, eps,
                                          weight_decay, step, seed), "adamw8bit")

    # ---- the simulator's own instructions ------------------------------------------------------------
    # fused model ops (csrc/cuda/fused_*.cuh): contiguous activations, fp32 norm weight
    def rms_norm(self, x, weight, eps, offset, residual=None, *, grid=1, seed=0):
        y, h = torch.empty_like(x), (torch.empty_like(x) if residual is not None else None)
        _check(self.lib.lrx_sim_rms_norm(DTYPE_CODE[x.dtype], 0, x.numel() // x.shape[-1], x.shape[-1], eps, offset,
                                         _ptr(weight), _ptr(x), _ptr(residual), _ptr(h), _ptr(y), None, None, None,
                                         None, grid, seed), "rms_norm")
        return y, h

    def rms_norm_backward(self, grad_y, grad_h, h, weight, eps, offset, *, grid=1, seed=0):
        gx, acc = torch.empty_like(h), torch.zeros(grid, h.shape[-1])
        _check(self.lib.lrx_sim_rms_norm(DTYPE_CODE[h.dtype], 1, h.numel() // h.shape[-1], h.shape[-1], eps, offset,
                                         _ptr(weight), None, None, _ptr(h), None, _ptr(grad_y), _ptr(grad_h), _ptr(gx),
                                         _ptr(acc), grid, seed), "rms_norm_backward")
        return gx, acc.sum(0)

    def rope(self, t, cos, sin, *, backward=False, grid=1, seed=0):
        out = torch.empty_like(t)
        span = lambda u: (sum((n - 1) * s for n, s in zip(u.shape, u.stride())) + 1) * u.element_size()  # from data_ptr
        cs_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
        _check(self.lib.lrx_sim_rope(DTYPE_CODE[t.dtype], int(backward), *t.shape, _ptr(t), *t.stride()[:3], _ptr(out),
                                     *out.stride()[:3], _ptr(cos), _ptr(sin), cs_sb, cos.stride(1), span(t), span(out),
                                     span(cos), grid, seed), "rope")
        return out

    def swiglu(self, gate, up, *, grid=1, seed=0):
        out = torch.empty_like(gate)
        _check(self.lib.lrx_sim_swiglu(DTYPE_CODE[gate.dtype], 0, gate.numel(), _ptr(gate), _ptr(up), _ptr(out), None,
                                       None, None, grid, seed), "swiglu")
        return out

    def swiglu_backward(self, grad, gate, up, *, grid=1, seed=0):
        gg, gu = torch.empty_like(gate), torch.empty_like(gate)
        _check(self.lib.lrx_sim_swiglu(DTYPE_CODE[gate.dtype], 1, gate.numel(), _ptr(gate), _ptr(up), None, _ptr(grad),
                                       _ptr(gg), _ptr(gu), grid, seed), "swiglu_backward")
        return gg, gu

    def probe_mma(self, a_regs, b_regs, c, bf16: bool):
        """a_regs int64 [32, 4], b_regs [32, 2] (32-bit register values), c fp32 [32, 4] -> d fp32 [32, 4]."""
        a = a_regs.to(torch.int64).to(torch.int32) if a_regs.dtype != torch.int32 else a_regs
        b = b_regs.to(torch.int64).to(torch.int32) if b_regs.dtype != torch.int32 else b_regs
        a, b, c = a.contiguous(), b.contiguous(), c.contiguous()
        d = torch.full((32, 4), float("nan"))
        _check(self.lib.lrx_sim_probe_mma(int(bf16), _ptr(a), _ptr(b), _ptr(c), _ptr(d)), "mma probe")
        return d

    def probe_ldmatrix(self, smem: torch.Tensor, offsets: torch.Tensor, trans: bool):
        """smem int16 [n] (b16 words), offsets int32 [32] (element offset of lane t's row) -> int64 [32, 4]."""
        smem, offsets = smem.contiguous(), offsets.to(torch.int32).contiguous()
        r = torch.zeros((32, 4), dtype=torch.int32)
        _check(self.lib.lrx_sim_probe_ldmatrix(int(trans), _ptr(smem), smem.numel(), _ptr(offsets), _ptr(r)),
               "ldmatrix probe")
        return r.to(torch.int64) & 0xFFFFFFFF

    def probe_convert(self, x: torch.Tensor):
        x = x.contiguous()
        n = x.numel()
        f16, bf16 = torch.zeros(n, dtype=torch.int16), torch.zeros(n, dtype=torch.int16)
        f16b, bf16b = torch.zeros(n), torch.zeros(n)
        self.lib.lrx_sim_probe_convert(_ptr(x), n, _ptr(f16), _ptr(bf16), _ptr(f16b), _ptr(bf16b))
        return f16, bf16, f16b, bf16b

    def probe_warp(self) -> torch.Tensor:
        out = torch.zeros((32, 8), dtype=torch.int32)
        _check(self.lib.lrx_sim_probe_warp(_ptr(out)), "warp probe")
        return out

    def probe_pairs(self, a: float, b: float):
        bits, back = torch.zeros(4, dtype=torch.int64), torch.zeros(8)
        raw = (ctypes.c_uint32 * 4)()
        self.lib.lrx_sim_probe_pairs(a, b, ctypes.cast(raw, P), _ptr(back))
        bits[:] = torch.tensor(list(raw))
        return bits, back

    def probe_defect(self, which: int) -> str:
        out = torch.zeros(64)
        return self.lib.lrx_sim_probe_defect(which, _ptr(out)).decode()

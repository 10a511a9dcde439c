"""Fused AdamW optimizers with paged and/or 8-bit state: `PagedAdamW`, `PagedAdamW8bit`, `AdamW8bit`.

Standard torch.optim.Optimizer subclasses (param groups, lr/betas/eps/weight_decay, closures, state_dict,
LR schedulers, clip_grad_norm_, non-contiguous params as torch.optim.AdamW accepts them). Each step calls
one fused op per parameter tensor (lowrank_ext.ops.adamw_step / adamw8bit_step) that reads p, g and the
state once and writes them once.

State per parameter:
  32-bit:  step (fp32 scalar tensor, as torch.optim.AdamW), exp_avg, exp_avg_sq (fp32, param's shape) —
           the same keys as torch.optim.AdamW, so state_dicts move between the two.
  8-bit:   step, state1 / state2 (uint8 codes, param's shape) into the signed / unsigned dynamic maps,
           absmax1 / absmax2 (fp32, one per 256 flat elements). Tensors with fewer than `min_8bit_size`
           (4096) elements keep 32-bit state (their 8-bit state would save little and cost accuracy).
Paged (CUDA only): state tensors of >= `min_8bit_size` elements live in CUDA managed memory
(cudaMallocManaged) that the driver can evict to host RAM under memory pressure; they are prefetched to
the GPU before each update and `page_out()` sends them to the host on request. On CPU the same classes
run with ordinary memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from lowrank_ext import ops

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with fused update kernels; subclasses choose state bits and paging."""

    _optim_bits = 32
    _paged = False

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        min_8bit_size: int = 4096,
    ) -> None:
        name = self._name()
        if amsgrad:
            raise ValueError(f"{name}: amsgrad must be False (AMSGrad is not supported), got True")
        if not lr >= 0.0:
            raise ValueError(f"{name}: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"{name}: betas must be in [0, 1), got {tuple(betas)}")
        if not eps >= 0.0:
            raise ValueError(f"{name}: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
        self.min_8bit_size = int(min_8bit_size)
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": False,
        }
        super().__init__(params, defaults)

    @classmethod
    def _name(cls) -> str:
        return f"lowrank_ext::{cls.__name__}"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)  # may be a generator
        param_group["params"] = params
        for p in params:
            # A frozen non-float nn.Parameter (NF4 storage bytes of a QLoRA model) is accepted and never stepped,
            # as torch.optim.AdamW does, so `Optimizer(model.parameters())` keeps working.
            frozen_storage = isinstance(p, torch.nn.Parameter) and not p.requires_grad
            if isinstance(p, torch.Tensor) and p.dtype not in _FLOAT_DTYPES and not frozen_storage:
                raise TypeError(f"{self._name()}: params must be float32, float16 or bfloat16, got {p.dtype}")
        if param_group.get("amsgrad", False):
            raise ValueError(f"{self._name()}: amsgrad must be False (AMSGrad is not supported), got True")
        super().add_param_group(param_group)

    # ---- state -----------------------------------------------------------------------------------

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self._optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _pages(self, p: torch.Tensor) -> bool:
        return self._paged and p.is_cuda and p.numel() >= self.min_8bit_size

    def _zeros(
        self, p: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """A state tensor: managed (paged) memory for large states of a paged optimizer on CUDA."""
        if self._pages(p) and tuple(shape) == tuple(p.shape):
            return ops.paged_zeros_like(p, dtype)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._qmaps:
            self._qmaps[device] = (ops.optim_qmap(True, device), ops.optim_qmap(False, device))
        return self._qmaps[device]

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if self._uses_8bit(p):
            nb = -(-p.numel() // ops.OPTIM_BLOCKSIZE)
            state["state1"] = self._zeros(p, p.shape, torch.uint8)
            state["state2"] = self._zeros(p, p.shape, torch.uint8)
            state["absmax1"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = self._zeros(p, p.shape, torch.float32)
            state["exp_avg_sq"] = self._zeros(p, p.shape, torch.float32)

    def _paged_tensors(self) -> Iterable[torch.Tensor]:
        for state in self.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.is_cuda and ops.paged_is_managed(v):
                    yield v

    def page_out(self) -> None:
        """Send every paged state tensor to host memory (asynchronous, on the current stream); the next
        step() prefetches them back. No-op on CPU."""
        for t in self._paged_tensors():
            ops.paged_prefetch(t, -1)

    # ---- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW update of every parameter with a gradient; returns closure() when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = {
                "lr": float(group["lr"]),
                "beta1": float(beta1),
                "beta2": float(beta2),
                "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]),
            }
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:
                    raise TypeError(f"{self._name()}: grad must be a dense (strided) tensor, got {g.layout}")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                step = int(state["step"].item())
                # The kernels read and write flat contiguous buffers. A strided param (a transposed or
                # sliced view, as torch.optim.AdamW accepts) is stepped as a contiguous copy and written
                # back; the state is kept contiguous in the param's logical (row-major) element order.
                pc = p if p.is_contiguous() else p.contiguous()
                gc = g.contiguous()
                for key in ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2"):
                    if key in state and not state[key].is_contiguous():
                        state[key] = state[key].contiguous()
                if "state1" in state:
                    tensors = (state["state1"], state["state2"])
                    self._prefetch(p, tensors)
                    q1, q2 = self._maps(p.device)
                    ops.adamw8bit_step(
                        pc, gc, *tensors, state["absmax1"], state["absmax2"], q1, q2, step=step, **hyper
                    )
                else:
                    tensors = (state["exp_avg"], state["exp_avg_sq"])
                    self._prefetch(p, tensors)
                    ops.adamw_step(pc, gc, *tensors, step=step, **hyper)
                if pc is not p:
                    p.copy_(pc)
        return loss

    def _prefetch(self, p: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> None:
        if not (self._paged and p.is_cuda):
            return
        for t in tensors:
            if ops.paged_is_managed(t):
                ops.paged_prefetch(
                    t, p.device.index if p.device.index is not None else torch.cuda.current_device()
                )

    # ---- checkpoints -----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading (groups, hooks), then the state re-made with its saved dtypes (torch would cast
        fp32 moments and absmax to a half-precision param's dtype) on each param's device, paged where
        this optimizer pages."""
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict(state_dict)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            new: dict[str, Any] = {}
            for key, value in saved_state[pid].items():
                if key == "step":
                    new[key] = torch.as_tensor(value, dtype=torch.float32).detach().clone().cpu()
                elif isinstance(value, torch.Tensor):
                    t = self._zeros(p, value.shape, value.dtype)
                    t.copy_(value)
                    new[key] = t
                else:
                    new[key] = value
            for key in ("exp_avg", "exp_avg_sq", "state1", "state2"):
                if key in new and new[key].numel() != p.numel():
                    raise ValueError(
                        f"{self._name()}: state_dict {key} must have {p.numel()} elements (the param's), "
                        f"got {new[key].numel()}"
                    )
            self.state[p] = new


class PagedAdamW(_FusedAdamW):
    """AdamW with fp32 state in paged (CUDA managed) memory; ordinary memory on CPU."""

    _optim_bits = 32
    _paged = True


class PagedAdamW8bit(_FusedAdamW):
    """AdamW with 8-bit blockwise state (tensors >= min_8bit_size elements) in paged memory."""

    _optim_bits = 8
    _paged = True


class AdamW8bit(_FusedAdamW):
    """AdamW with 8-bit blockwise state (tensors >= min_8bit_size elements) in ordinary device memory."""

    _optim_bits = 8
    _paged = False

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

Sharded parameters (DTensors, e.g. under FSDP2's `fully_shard`): each rank steps its local shard
(`p.to_local()`, `g.to_local()`) with state sized per shard; the state tensors are DTensors with the
param's placements, so `torch.distributed.checkpoint` saves and reshards the 32-bit state like torch's own
AdamW. The 8-bit state is blockwise over each rank's *local* flat shard, so its absmax is a DTensor
[n_shards, max blocks per shard] (one row per shard) and it loads only into the same sharding: another
world size is refused with a clear error (lowrank_ext.distributed.load_checkpoint checks before reading).
Whether a tensor gets 8-bit state is decided on its global size, the same answer on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from lowrank_ext import ops

__all__ = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_dtensor(t: object) -> bool:
    # Plain tensors and parameters first, with no import: step() asks about ~6 tensors per parameter.
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not isinstance(t, torch.Tensor):
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage: in-place updates reach the parameter); other tensors as is."""
    return t.to_local() if _is_dtensor(t) else t


def _like_param(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`local` (the state of p's local shard, p's local shape) as a DTensor placed like p; as is for plain p."""
    if not _is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _shard_rows(p: torch.Tensor) -> tuple[int, int]:
    """(n_shards, the largest local numel) of a DTensor sharded on at most one mesh dimension (torch.chunk
    sizes: the first shards are the largest)."""
    from torch.distributed.tensor import Shard

    shards = [(i, pl.dim) for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(shards) > 1:
        raise ValueError(f"lowrank_ext::optim: params with 8-bit state must be sharded on at most one mesh "
                         f"dimension, got placements {tuple(p.placements)}")
    size = list(p.shape)
    n = 1
    for i, d in shards:
        n = p.device_mesh.size(i)
        size[d] = -(-size[d] // n)
    return n, torch.Size(size).numel()


# One update of a step: (local param, local grad, state, hyper-parameters, step, the moment tensors it reads).
_Update = tuple[torch.Tensor, torch.Tensor, dict[str, Any], dict[str, float], int, tuple[torch.Tensor, ...]]


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _plan_prefetch(keys: list[tuple[torch.device | None, int]],
                   budget: Callable[[torch.device], int]) -> list[tuple[int, int]]:
    """Split a step's updates, in order, into chunks [start, end) that each get one prefetch call.

    keys[i] = (device, bytes of paged state) of update i, or (None, 0) when it pages nothing (it joins any
    chunk). A chunk holds one device and at most budget(device) bytes, except a single update larger than
    the budget, which is a chunk of its own. With everything on one GPU under the budget: one chunk, one call.
    """
    chunks: list[tuple[int, int]] = []
    start, device, used, limit = 0, None, 0, 0
    for i, (dev, nbytes) in enumerate(keys):
        if dev is not None:
            if device is not None and (dev != device or (used > 0 and used + nbytes > limit)):
                chunks.append((start, i))
                start, used = i, 0
            if dev != device:
                limit = budget(dev)  # once per device run, not per update
            device = dev
            used += nbytes
    if keys:
        chunks.append((start, len(keys)))
    return chunks


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
        pl = _local(p)  # a DTensor's state is sized by its local shard
        if self._uses_8bit(p):
            state["state1"] = _like_param(self._zeros(pl, pl.shape, torch.uint8), p)
            state["state2"] = _like_param(self._zeros(pl, pl.shape, torch.uint8), p)
            state["absmax1"] = self._absmax_zeros(p)
            state["absmax2"] = self._absmax_zeros(p)
        else:
            state["exp_avg"] = _like_param(self._zeros(pl, pl.shape, torch.float32), p)
            state["exp_avg_sq"] = _like_param(self._zeros(pl, pl.shape, torch.float32), p)

    @staticmethod
    def _absmax_zeros(p: torch.Tensor) -> torch.Tensor:
        """fp32 absmax, one per OPTIM_BLOCKSIZE flat elements: [nblocks] for a plain param; for a DTensor a
        DTensor [n_shards, max nblocks per shard], one row per shard (blocks never cross a shard boundary)."""
        if not _is_dtensor(p):
            return torch.zeros(-(-p.numel() // ops.OPTIM_BLOCKSIZE), dtype=torch.float32, device=p.device)
        from torch.distributed.tensor import DTensor, Replicate, Shard

        n, max_local = _shard_rows(p)
        nb = -(-max_local // ops.OPTIM_BLOCKSIZE)
        local = torch.zeros(1, nb, dtype=torch.float32, device=_local(p).device)
        placements = tuple(Shard(0) if isinstance(pl, Shard) else Replicate() for pl in p.placements)
        return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=torch.Size([n, nb]),
                                  stride=(nb, 1))

    def _paged_tensors(self) -> Iterable[torch.Tensor]:
        for state in self.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and _local(v).is_cuda:
                    yield _local(v)

    def page_out(self) -> None:
        """Send every paged state tensor to host memory (asynchronous, on the current stream); the next
        step() prefetches them back. One paged_prefetch_batch call per GPU (tensors that are not managed
        are skipped there). No-op on CPU."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in self._paged_tensors():
            by_device.setdefault(t.device, []).append(t)
        for tensors in by_device.values():
            ops.paged_prefetch_batch(tensors, -1)

    # ---- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW update of every parameter with a gradient; returns closure() when given.

        Paged state is prefetched to the GPU in as few calls as possible: the updates are collected first,
        then each chunk of them (one device, at most `_prefetch_budget` bytes of paged state: normally the
        whole step) gets ONE paged_prefetch_batch call, followed by its updates in parameter order."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[_Update] = []
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
                # A DTensor (sharded) param is stepped through its local shard: the kernels have no
                # DTensor rule, and each rank owns the update of its own elements.
                pl, gl = _local(p), _local(g)
                if pl.numel() == 0:  # a rank whose shard is empty (fewer rows than ranks)
                    continue
                for key in ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2"):
                    if key in state and not _is_dtensor(state[key]) and not state[key].is_contiguous():
                        state[key] = state[key].contiguous()
                keys = ("state1", "state2") if "state1" in state else ("exp_avg", "exp_avg_sq")
                work.append((pl, gl, state, hyper, step, tuple(_local(state[k]) for k in keys)))
        if not self._paged:  # nothing to prefetch
            for item in work:
                self._update(*item)
            return loss
        keys = [self._prefetch_key(item[0], item[5]) for item in work]
        for start, end in _plan_prefetch(keys, self._prefetch_budget):
            paged_items = [i for i in range(start, end) if keys[i][0] is not None]  # all on one GPU (the plan)
            if paged_items:
                paged = [t for i in paged_items for t in work[i][5]]
                ops.paged_prefetch_batch(paged, _device_index(work[paged_items[0]][0]))
            for item in work[start:end]:
                self._update(*item)
        return loss

    def _prefetch_key(self, pl: torch.Tensor, moments: tuple[torch.Tensor, ...]) -> tuple[torch.device | None, int]:
        """(device, bytes of paged state) of one update for _plan_prefetch; (None, 0) when nothing is paged."""
        if not self._pages(pl):
            return None, 0
        return pl.device, sum(t.numel() * t.element_size() for t in moments)

    def _prefetch_budget(self, device: torch.device) -> int:
        """Bytes of paged state prefetched by one call: an eighth of the GPU's memory, so under oversubscription
        a chunk's own prefetch does not evict the pages its updates are about to read (torch caches the
        device properties)."""
        return max(1, torch.cuda.get_device_properties(device).total_memory // 8)

    def _update(self, pl: torch.Tensor, gl: torch.Tensor, state: dict[str, Any], hyper: dict[str, float],
                step: int, moments: tuple[torch.Tensor, ...]) -> None:
        """The fused update of one (local) parameter. The kernels read and write flat contiguous buffers: a
        strided param (a transposed or sliced view, as torch.optim.AdamW accepts) is stepped as a contiguous
        copy and written back; the state is kept contiguous in the param's logical (row-major) element order."""
        pc = pl if pl.is_contiguous() else pl.contiguous()
        gc = gl.contiguous()
        if "state1" in state:
            q1, q2 = self._maps(pl.device)
            nb = -(-pl.numel() // ops.OPTIM_BLOCKSIZE)  # this shard's blocks (its absmax row, unpadded)
            a1, a2 = (_local(state[k]).view(-1)[:nb] for k in ("absmax1", "absmax2"))
            ops.adamw8bit_step(pc, gc, *moments, a1, a2, q1, q2, step=step, **hyper)
        else:
            ops.adamw_step(pc, gc, *moments, step=step, **hyper)
        if pc is not pl:
            pl.copy_(pc)

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
                    new[key] = torch.as_tensor(_local(value), dtype=torch.float32).detach().clone().cpu()
                elif isinstance(value, torch.Tensor):
                    new[key] = self._copy_state(p, key, value)
                else:
                    new[key] = value
            for key in ("exp_avg", "exp_avg_sq", "state1", "state2"):  # local sizes for a sharded param
                if key in new and _local(new[key]).numel() != _local(p).numel():
                    raise ValueError(
                        f"{self._name()}: state_dict {key} must have {_local(p).numel()} elements (the param's"
                        f"{' local shard' if _is_dtensor(p) else ''}), got {_local(new[key]).numel()}"
                    )
            self.state[p] = new

    def _copy_state(self, p: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
        """A copy of saved state tensor `value` for param p: on p's device, paged where this optimizer pages,
        placed like `value` when it is a DTensor. 8-bit state of a sharded param must come from the same
        sharding (its blocks are per shard)."""
        if key in ("absmax1", "absmax2") and _is_dtensor(p):
            want = tuple(self._absmax_zeros(p).shape)
            if not _is_dtensor(value) or tuple(value.shape) != want:
                raise ValueError(
                    f"{self._name()}: state_dict {key} must come from the same sharding ({want[0]} shards of "
                    f"{want[1]} blocks: 8-bit state is blockwise per shard and cannot move to another world size), "
                    f"got {'a DTensor' if _is_dtensor(value) else 'an unsharded tensor'} of shape {tuple(value.shape)}")
        local = _local(value)
        t = self._zeros(_local(p), local.shape, local.dtype)
        t.copy_(local)
        if not _is_dtensor(value):
            return t
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(t, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                                  stride=value.stride())


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

"""Training on several processes: FSDP2 with the NF4 base sharded across ranks, DDP, sharded checkpoints.

    shard_model(model)            fully_shard each transformer block, then the root (FSDP2): every rank keeps
                                  ~1/world of the NF4 bytes, the LoRA parameters and their optimizer state
    materialize(model, source)    a model built on the meta device and sharded gets its tensors: each rank
                                  quantizes a whole tensor and keeps its slice, or reads only its byte ranges
                                  from a bitsandbytes / Hugging Face 4-bit safetensors file
    wrap_ddp(model)               DistributedDataParallel that never re-sends NF4 bytes after construction
    save_checkpoint / load_checkpoint   trainable parameters + optimizer (+ the caller's extras) through
                                  torch.distributed.checkpoint, each rank writing and reading its own shards
    nf4_bytes(model)              (local, total) NF4 bytes: what sharding saves

How the NF4 op meets FSDP2 (docs/distributed.md): the packed codes and absmax bytes are frozen uint8
parameters (lowrank_ext/nn/linear4bit.py), so fully_shard shards them on dim 0 like any parameter (uneven
sizes padded). Before a block's forward and backward FSDP2 all-gathers the block's parameters into whole
tensors, the fused op runs on the whole NF4 weight, and FSDP2 frees them afterwards; a shard never reaches the
op, so shard boundaries need not be NF4-block aligned. Called outside those hooks, a layer whose bytes are
sharded raises. A MixedPrecisionPolicy casts floating parameters only: the uint8 bytes (and the fp32
absmax, stored as bytes) are gathered bit-identical; the fp32 double-quant constants are replicated buffers.

FSDP1 (FullyShardedDataParallel) is not supported: it flattens a unit's parameters into one tensor of one
dtype and refuses integer parameters at construction.

This module sits above adapters/ and below finetune/ (docs/architecture.md); torch.distributed is imported
where it is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lowrank_ext.adapters.state import adapter_layers, get_state
from lowrank_ext.nf4 import NF4Weight, quantize_nf4
from lowrank_ext.nn import ADAPTER_LAYERS
from lowrank_ext.nn import functional as LF
from lowrank_ext.nn.layout import base_transposed
from lowrank_ext.nn.linear4bit import NF4_PARAMS, NF4WeightHolder, is_sharded
from lowrank_ext.ops import nf4_row_sqnorm

__all__ = ["embedding_units", "is_sharded", "load_checkpoint", "materialize", "nf4_bytes", "save_checkpoint",
           "shard_model", "transformer_blocks", "wrap_ddp"]

_CONSTS = ("weight_nested_absmax", "weight_nested_map", "weight_offset")


def _require_dist(op: str) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"lowrank_ext::{op}: torch.distributed must be initialized (init_process_group, or run "
                         f"under torchrun), got it not initialized")


def _refuse_fsdp1(model: nn.Module, op: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for name, m in model.named_modules():
        if isinstance(m, FullyShardedDataParallel):
            raise TypeError(f"lowrank_ext::{op}: model must not be wrapped by FSDP1 (FullyShardedDataParallel "
                             f"flattens parameters into one float dtype and cannot hold the uint8 NF4 bytes; use "
                             f"shard_model, i.e. FSDP2's fully_shard), got FullyShardedDataParallel at "
                             f"{name or '<root>'!r}")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules shard_model wraps one by one: the elements of each outermost nn.ModuleList that holds NF4 or
    adapter layers (a transformers model's `layers` / `h`)."""
    blocks: list[nn.Module] = []
    seen: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in seen) or isinstance(m, ADAPTER_LAYERS):
            continue
        if isinstance(m, nn.ModuleList):
            kids = [c for c in m if any(isinstance(x, (NF4WeightHolder, *ADAPTER_LAYERS)) for x in c.modules())]
            if kids:
                blocks.extend(kids)
                seen.append(name)
    return blocks


def embedding_units(model: nn.Module) -> list[nn.Module]:
    """The input and output embeddings (get_input_embeddings / get_output_embeddings of a transformers model)
    when they share no parameter: shard_model wraps each on its own, so the large vocabulary matrices are
    gathered only around their own use instead of for the whole forward with the root. Tied ones stay with
    the root (a shared parameter belongs to one unit)."""
    units = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        m = fn() if callable(fn) else None
        if isinstance(m, nn.Module) and m is not model:
            units.append(m)
    if len(units) == 2:
        a, b = ({id(p) for p in u.parameters()} for u in units)
        if a & b:
            return []
    return units


def default_mesh(model: nn.Module | None = None):
    """A 1-D DeviceMesh over every rank, on CUDA when the process group is NCCL, else on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (torch.distributed.get_world_size(),))


def shard_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True, mp_policy=None, *,
                blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block and each untied embedding (transformer_blocks(model) +
    embedding_units(model), or `blocks`), then the root, with the same mesh / reshard_after_forward / mp_policy
    (a torch MixedPrecisionPolicy; None: none). The NF4 bytes, LoRA parameters, norms and embeddings are then
    sharded on dim 0 across the mesh; each unit's are gathered for its forward and backward and freed after.
    mesh: a 1-D DeviceMesh (FSDP), a 2-D one (HSDP: replicate across its first dimension, shard across the
    second), or None for every rank. Returns the model (its class becomes FSDP<cls>)."""
    _refuse_other_methods(model)
    _require_dist("shard_model")
    _refuse_fsdp1(model, "shard_model")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh if mesh is not None else default_mesh(model), "reshard_after_forward": reshard_after_forward,
          "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy()}
    for block in (transformer_blocks(model) + embedding_units(model) if blocks is None else list(blocks)):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def _refuse_other_methods(model: nn.Module) -> None:
    """shard_model finds its units by the LoRA-family layers (and NF4 layers) inside each block; an IA3, BitFit or
    prompt-tuning model has none of those, so only the root would be wrapped: every parameter gathered for the
    whole forward, nothing saved. Those methods are refused rather than "sharded" that way."""
    state = get_state(model)
    methods = sorted({type(c).__name__ for c in state.configs.values()} - {"LoRAConfig"}) if state else []
    if methods:
        raise ValueError(f"lowrank_ext::shard_model: model must hold LoRA-family adapters (LoRA, DoRA, VeRA) or none "
                         f"(IA3, BitFit and prompt tuning train in one process), got {', '.join(methods)} adapters")


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of NF4 storage this rank holds, bytes of the whole NF4 storage): packed codes and absmax bytes
    (the sharded parameters; padding not counted) plus the replicated fp32 constants."""
    local = total = 0
    for m in model.modules():
        if isinstance(m, NF4WeightHolder):
            for p in m.nf4_parameters():
                local += _local(p).numel()
                total += p.numel()
            for n in _CONSTS:
                t = getattr(m, n, None)
                if t is not None:
                    local += t.numel() * t.element_size()
                    total += t.numel() * t.element_size()
    return local, total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


# ---------------------------------------------------------------------------------------------- DDP
def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """torch DistributedDataParallel around `model`, without NF4 traffic after construction.

    DDP broadcasts every parameter and buffer from rank 0 once, at construction, and then (broadcast_buffers,
    the default) every buffer before each forward. The NF4 bytes are frozen parameters: not in DDP's gradient
    reducer, so never sent again. The small fp32 double-quant constants are buffers: they are broadcast here,
    once, and then left out of DDP's per-forward buffer broadcast (they never change); other buffers keep
    DDP's default treatment."""
    _require_dist("wrap_ddp")
    from torch.nn.parallel import DistributedDataParallel

    skip = []
    for name, m in model.named_modules():
        if isinstance(m, NF4WeightHolder):
            for n in _CONSTS:
                t = getattr(m, n, None)
                if t is not None:
                    torch.distributed.broadcast(t, 0)
                    skip.append(f"{name}.{n}" if name else n)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, skip)
    return DistributedDataParallel(model, **ddp_kwargs)


# ---------------------------------------------------------------------------------------------- loading
class _Source:
    """Tensors by name from a Mapping (a state dict) or from safetensors files (a file, a list, or a directory
    of *.safetensors), read lazily; `rows` reads only rows [start, stop) of dim 0 from a file."""

    def __init__(self, source: Mapping[str, torch.Tensor] | str | os.PathLike | Iterable[str | os.PathLike]):
        self.mapping: Mapping[str, torch.Tensor] | None = None
        self.files: dict[str, Any] = {}
        if isinstance(source, Mapping):
            self.mapping = source
            return
        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        files: list[str] = []
        for p in map(os.fspath, paths):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".safetensors")) \
                if os.path.isdir(p) else [p]
        if not files:
            raise ValueError(f"lowrank_ext::materialize: source must be a state dict or safetensors files, got "
                             f"no .safetensors file in {paths}")
        from safetensors import safe_open

        for f in files:
            handle = safe_open(f, framework="pt")
            for k in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                self.files[k] = handle

    def __contains__(self, key: str) -> bool:
        return key in (self.mapping if self.mapping is not None else self.files)

    def get(self, key: str) -> torch.Tensor:
        return self.mapping[key] if self.mapping is not None else self.files[key].get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        if self.mapping is not None:
            return self.mapping[key][start:stop]
        return self.files[key].get_slice(key)[start:stop]


def _shard_range(p: torch.Tensor) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 this rank holds of DTensor p (Shard(0) on one mesh dimension, torch.chunk
    sizes as FSDP2 uses), or all rows for a plain tensor."""
    if not is_sharded(p):
        return 0, p.shape[0]
    from torch.distributed.tensor import Shard

    shards = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(shards) != 1 or p.placements[shards[0]].dim != 0:
        raise ValueError(f"lowrank_ext::materialize: parameters must be sharded as Shard(0) on one mesh dimension "
                         f"(fully_shard), got placements {tuple(p.placements)}")
    mesh_dim = shards[0]
    n, k = p.shape[0], p.device_mesh.size(mesh_dim)
    chunk = -(-n // k)
    start = min(p.device_mesh.get_local_rank(mesh_dim) * chunk, n)
    return start, min(start + chunk, n)


@torch.no_grad()
def _fill(p: torch.Tensor, full_or_rows: torch.Tensor, rows_given: bool = False) -> None:
    """Copy into p (a Parameter or buffer, maybe a DTensor) its part of a whole tensor, or the rows already cut."""
    local = _local(p)
    if rows_given or not is_sharded(p):
        src = full_or_rows
    else:
        start, stop = _shard_range(p)
        src = full_or_rows[start:stop]
    local.copy_(src.reshape(local.shape).to(local.device, local.dtype))


@torch.no_grad()
def materialize(model: nn.Module, source: Mapping[str, torch.Tensor] | str | os.PathLike | Iterable,
                device: torch.device | str | None = None, *, extra: Mapping[str, torch.Tensor] | None = None,
                seed: int = 0) -> nn.Module:
    """Allocate and fill a model built on the meta device (inject()-ed, usually shard_model()-ed), each rank
    only its shard, without ever holding the whole model.

    source: the base model's tensors by the model's names — a state dict, or safetensors file(s) / a directory
    (read lazily, tensor by tensor). For an NF4 layer `<m>`: a dense `<m>.weight` is quantized whole on
    `device` and the rank keeps its slice of the bytes (bitsandbytes' double-quant offset is the mean over the
    whole tensor, so quantizing a shard alone would give other bytes); a 4-bit `<m>.weight` (bitsandbytes /
    Hugging Face layout, with its `.weight.quant_state.bitsandbytes__nf4`) is read as it is, and from a
    safetensors file only this rank's rows of `weight` and `weight.absmax` are read. Adapter parameters found
    in source are loaded; others are initialized as inject() does (LoRA A: kaiming-uniform from a generator
    seeded with `seed`, the same on every rank; B: zeros; DoRA magnitude: row norms of the weight).
    extra: tensors by the model's names for what source does not hold: a transformers model's non-persistent
    buffers (rotary `inv_freq`), or adapter tensors to start from. Every meta tensor must end up filled, or a
    ValueError names the missing ones."""
    src = _Source(source)
    extra = dict(extra or {})
    if device is None:
        device = "cuda" if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl" else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    todo = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta}
    # allocate: meta tensors become uninitialized ones on `device` (sharded ones: the local shard only)
    tied = _tied_parameters(model)
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t.to(device))
    _retie(model, tied)
    gen = torch.Generator().manual_seed(seed)
    whole: dict[str, NF4Weight | None] = {}  # the whole NF4 weight of each layer quantized here (DoRA's norm)
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, NF4WeightHolder) and prefix + "weight_packed" in todo:
            whole[name] = _materialize_nf4(m, prefix, src, device)
            todo -= {prefix + n for n in (*NF4_PARAMS, *_CONSTS)}
    # the base checkpoint stores a Conv1D's weight [in, out]; the layer holds [out, in] (nn/layout.py)
    transposed = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if base_transposed(m)}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name not in todo:
            continue
        if name in src:
            value = src.get(name)
            if name in transposed:
                value = value.t()
            if tuple(value.shape) != tuple(t.shape):
                want = tuple(t.shape)[::-1] if name in transposed else tuple(t.shape)
                raise ValueError(f"lowrank_ext::materialize: {name} must have shape {want}"
                                 f"{' (a Conv1D weight, [in, out])' if name in transposed else ''}, "
                                 f"got {tuple(src.get(name).shape)}")
            _fill(t, value)
        elif name in extra:
            _fill(t, extra[name])
        else:
            continue
        todo.discard(name)
    for lname, layer in adapter_layers(model):
        _init_adapters(layer, f"{lname}." if lname else "", todo, gen, whole.get(lname))
    whole.clear()
    if todo:
        raise ValueError(f"lowrank_ext::materialize: source must hold every tensor of the model, got "
                         f"{len(todo)} missing, e.g. {sorted(todo)[:6]} (extra= takes the non-persistent buffers)")
    return model


def _tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(alias, first name) of every parameter registered under a second name (a tied output head: GPT-2's
    lm_head.weight is transformer.wte.weight)."""
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return out


def _retie(model: nn.Module, tied: list[tuple[str, str]]) -> None:
    """Module._apply replaces a meta parameter by a new one per module that registers it, which unties shared
    parameters (the head would stay uninitialized memory): register the first one under every alias again."""
    for alias, name in tied:
        owner, _, attr = alias.rpartition(".")
        target = model.get_parameter(name)
        if model.get_parameter(alias) is not target:
            setattr(model.get_submodule(owner) if owner else model, attr, target)


def _materialize_nf4(m: NF4WeightHolder, prefix: str, src: _Source, device: torch.device) -> NF4Weight | None:
    """Fill layer m's NF4 bytes (this rank's rows) and constants; returns the whole NF4 weight when it was
    quantized here from a dense tensor (None when read in byte ranges from a 4-bit file)."""
    shape, dtype, blocksize, dq = m._nf4_meta
    key = prefix + "weight"
    if key not in src:
        raise ValueError(f"lowrank_ext::materialize: source must hold {key!r} (dense or 4-bit) for "
                         f"{type(m).__name__} {prefix[:-1]!r}, got no such key")
    packed_p, absmax_p = m.nf4_parameters()
    if prefix + "weight.quant_state.bitsandbytes__nf4" in src:  # 4-bit file: this rank's byte ranges only
        small = {k: src.get(prefix + k) for k in ("weight.quant_state.bitsandbytes__nf4", "weight.quant_map",
                                                    "weight.nested_absmax", "weight.nested_quant_map")
                 if prefix + k in src}
        # validate the format on the small tensors + the whole-size metadata, without reading the bytes
        nbytes, nblocks = (shape.numel() + 1) // 2, -(-shape.numel() // blocksize)
        probe = {**small, "weight": torch.empty(nbytes, 1, dtype=torch.uint8, device="meta"),
                 "weight.absmax": torch.empty(nblocks, dtype=torch.uint8 if dq else torch.float32, device="meta")}
        w = _parse_meta(probe, prefix, shape, dtype, blocksize, dq)
        ps, pe = _shard_range(packed_p)
        _fill(packed_p, src.rows(key, ps, pe).view(torch.uint8), rows_given=True)
        a0, a1 = _shard_range(absmax_p)
        rows = src.rows(key + ".absmax", a0, a1)
        _fill(absmax_p, rows if dq else rows.contiguous().view(torch.uint8).view(-1, 4), rows_given=True)
        consts, full = w.tensors()[2:], None
    else:  # dense: quantize the whole tensor on `device`, keep this rank's rows
        dense = src.get(key)
        if base_transposed(m):  # a Conv1D base: [in, out] in the checkpoint, as inject() transposes it
            dense = dense.t()
        if tuple(dense.shape) != tuple(shape):
            raise ValueError(f"lowrank_ext::materialize: {key} must have shape "
                             f"{tuple(shape)[::-1] if base_transposed(m) else tuple(shape)}, got "
                             f"{tuple(src.get(key).shape)}")
        w = quantize_nf4(dense.to(device, dtype), blocksize, dq)
        del dense
        _fill(packed_p, w.packed)
        _fill(absmax_p, w.absmax if dq else w.absmax.view(torch.uint8).view(-1, 4))
        consts, full = w.tensors()[2:], w
    for n, t in zip(_CONSTS, consts):
        if t is not None:
            _fill(getattr(m, n), t)
    return full


def _parse_meta(probe: dict, prefix: str, shape, dtype, blocksize, dq) -> _Consts:
    """The quant state of a 4-bit file checked against the layer (sizes from metadata, bytes not read)."""
    import json

    raw = probe["weight.quant_state.bitsandbytes__nf4"]
    meta = json.loads(bytes(raw.to(torch.uint8).view(-1).tolist()).decode("utf-8"))
    got = (tuple(meta.get("shape", ())), meta.get("blocksize"), "nested_offset" in meta)
    if got != (tuple(shape), blocksize, dq):
        raise ValueError(f"lowrank_ext::materialize: {prefix}weight must be NF4 of shape {tuple(shape)}, blocksize "
                         f"{blocksize}, double_quant={dq} (the model's layer), got shape {got[0]}, blocksize "
                         f"{got[1]}, double_quant={got[2]}")
    if not dq:
        return _Consts(None, None, None)
    off = torch.tensor([float(meta["nested_offset"])], dtype=torch.float32)
    return _Consts(probe["weight.nested_absmax"].float(), probe["weight.nested_quant_map"].float(), off)


class _Consts:
    """The double-quant constants of a 4-bit file (what the layer keeps as buffers)."""

    def __init__(self, nested_absmax, nested_map, offset):
        self._t = (None, None, nested_absmax, nested_map, offset)

    def tensors(self):
        return self._t


def _init_adapters(layer: nn.Module, prefix: str, todo: set[str], gen: torch.Generator,
                   w: NF4Weight | None) -> None:
    """inject()'s initialization of adapter tensors still unfilled, computed whole and sliced per rank."""
    import math

    for name, spec in layer.specs.items():
        if spec.variant == "vera" and any(k.startswith(prefix + "vera_") for k in todo):
            raise ValueError(f"lowrank_ext::materialize: source must hold the VeRA tensors of {prefix[:-1]!r} "
                             f"(VeRA adapters are not initialized on materialization), got none")
        key_a, key_b = f"{prefix}lora_A.{name}", f"{prefix}lora_B.{name}"
        if key_a in todo:
            a = torch.empty(spec.r, layer.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            _fill(layer.lora_A[name], a)
            todo.discard(key_a)
        if key_b in todo:
            _fill(layer.lora_B[name], torch.zeros(layer.out_features, spec.r))
            todo.discard(key_b)
        key_m = f"{prefix}lora_magnitude_vector.{name}"
        if key_m in todo:
            if w is None:
                raise ValueError(f"lowrank_ext::materialize: source must hold {key_m!r} (a DoRA magnitude needs the "
                                 f"whole weight, read here in byte ranges), got no such key")
            a, b = (t.full_tensor() if is_sharded(t) else t for t in layer.factors(name))
            norm = LF.dora_norm_nf4(w, nf4_row_sqnorm(w), a.detach().to(w.device), b.detach().to(w.device),
                                    spec.scaling)
            _fill(layer.lora_magnitude_vector[name], norm)
            todo.discard(key_m)


# ---------------------------------------------------------------------------------------------- checkpoints
def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Save the trainable parameters (sharded: each rank its shards), the optimizer state (torch's
    get_optimizer_state_dict: keyed by parameter name) and `extra` (any picklable or tensor values, the same on
    every rank unless their keys differ per rank) with torch.distributed.checkpoint. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": _trainable(model), "optim": get_optimizer_state_dict(model, optimizer),
             "extra": dict(extra or {})}
    dcp.save(state, checkpoint_id=os.fspath(directory))


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load what save_checkpoint wrote into `model` and `optimizer` (in place; resharded as DCP does when the
    sharding differs, except 8-bit optimizer state, which is refused first with a clear error). `extra`
    gives the keys (and template values) to read back; returns them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = os.fspath(directory)
    osd = get_optimizer_state_dict(model, optimizer)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for fqn, st in osd["state"].items():
        for key in ("absmax1", "absmax2"):
            if key in st:
                meta = saved.get(f"optim.state.{fqn}.{key}")
                have = tuple(getattr(meta, "size", ()))
                if have != tuple(st[key].shape):
                    raise ValueError(
                        f"lowrank_ext::load_checkpoint: optimizer state {fqn}.{key} must have the shape of this "
                        f"run's sharding {tuple(st[key].shape)} ([shards, blocks]: 8-bit state is blockwise per shard "
                        f"and cannot move to another world size), got {have} in {path!r}")
    state = {"model": _trainable(model), "optim": osd, "extra": dict(extra or {})}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return state["extra"]

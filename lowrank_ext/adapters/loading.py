"""load_pretrained(model_dir, config): a transformers causal LM with adapters, quantized while the shards stream in.

    inject(load_causal_lm(dir).model, config)      builds every weight in fp32 first: 4 bytes / parameter
    load_pretrained(dir, config)                    the same model (same NF4 bytes, same outputs), never whole

How (peak memory: the result + about two copies of the largest single tensor):
1. checks, reading only JSON and safetensors headers: the architecture, a bitsandbytes `quantization_config`
   (4-bit nf4 only), every shard the index names exists, is a complete safetensors file and holds the tensors
   the index puts there, every tensor of the model is in the checkpoint with its shape. Nothing is allocated
   before all of this passes.
2. builds the model from its config with parameters on the meta device (accelerate's `init_empty_weights`;
   buffers such as rotary `inv_freq` are computed as the model's own `__init__` computes them).
3. reads the checkpoint's keys as `from_pretrained` does, with transformers' own functions (_map_keys): its
   conversion mapping (key renames such as GPT-NeoX's `embed_out` -> `lm_head`, weight converters such as
   Mixtral's per-expert w1/w3 -> fused `gate_up_proj`), `base_model_prefix` added or stripped, the model's
   unexpected-key patterns, and `tie_weights(missing_keys=...)`: a tied pair of which the file holds one side
   is tied to that side; one it holds both sides of is tied after loading if they are equal, else kept apart.
4. plans the adapters with the plan function `inject` uses for the config's method (methods.PLAN_APPLY) on the
   meta model, so any config that `inject` accepts selects the same modules.
5. streams the shards tensor by tensor through `safetensors.safe_open` (memory-mapped; each shard is unmapped
   when it is done): when the method quantizes (`quantize="nf4"`: LoRA family, IA3), a target's weight is
   quantized to NF4 on `device` exactly as `inject` would (`quantize_nf4(weight, blocksize, double_quant)`) and
   kept as a `Linear4bit`; a module stored in bitsandbytes' 4-bit layout becomes a `Linear4bit` over the file's
   bytes (never requantized); the tensors of a weight converter are converted by it once all have arrived;
   every other tensor is materialized in its model dtype on `device`.
6. applies the plan: the adapter layers wrap those NF4 weights (no requantization) and draw their initial values
   from torch's global generator exactly as `inject` does; loading itself draws nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lowrank_ext.adapters.bnb_import import linear4bit_from_state_dict
from lowrank_ext.adapters.methods import PLAN_APPLY, method_of
from lowrank_ext.adapters.state import check_adapter_name, get_state
from lowrank_ext.nf4 import BNB_QUANT_STATE_SUFFIX, BNB_WEIGHT_SUFFIXES, quantize_nf4
from lowrank_ext.nn import Linear4bit
from lowrank_ext.nn.layout import weight_is_transposed

__all__ = ["checkpoint_tensors", "load_pretrained"]

_OP = "lowrank_ext::load_pretrained"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_QS = "." + BNB_QUANT_STATE_SUFFIX


def _err(arg: str, expected: str, got) -> ValueError:
    return ValueError(f"{_OP}: {arg} must {expected}, got {got}")


def checkpoint_tensors(model_dir: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """{tensor name: (shard file, shape, safetensors dtype)} of a safetensors checkpoint, read from the headers
    only. A sharded checkpoint's index must name shards that exist and that hold the tensors it puts there."""
    path = Path(model_dir)
    if (path / _INDEX).is_file():
        try:
            weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise _err(f"{_INDEX} in model_dir", "be JSON with a 'weight_map' object",
                       f"{type(e).__name__}: {e}") from e
        files = sorted(set(weight_map.values()))
    elif (path / _SINGLE).is_file():
        weight_map, files = None, [_SINGLE]
    else:
        bins = sorted(p.name for p in path.glob("*.bin"))
        raise FileNotFoundError(f"{_OP}: model_dir must hold {_SINGLE} or {_INDEX} (safetensors; pickled .bin "
                                f"checkpoints are never loaded), got {sorted(p.name for p in path.iterdir())[:8]}"
                                + (f" (pickled: {bins[:3]})" if bins else ""))
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{_OP}: every shard {_INDEX} names must exist in {str(path)!r}, got "
                                f"{len(missing)} missing: {missing[:4]}")
    out: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for f in files:
        with _open(path / f) as h:
            for k in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                s = h.get_slice(k)
                out[k] = (f, tuple(s.get_shape()), s.get_dtype())
    if weight_map is not None:
        absent = sorted(k for k, f in weight_map.items() if k not in out or out[k][0] != f)
        if absent:
            raise _err(f"every tensor {_INDEX} names", "be in the shard it names",
                       f"{len(absent)} missing, e.g. " + ", ".join(f"{k!r} (in {weight_map[k]!r})" for k in absent[:4]))
    return out


def _hf_config(path: Path):
    """The model's transformers config without a quantization_config; (config, bnb_4bit)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError) as e:
        raise _err("model_dir", "hold a config.json of an architecture transformers knows",
                   f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    q = getattr(cfg, "quantization_config", None)
    bnb4 = False
    if q is not None:
        q = q if isinstance(q, dict) else q.to_dict()
        method = q.get("quant_method")
        if method != "bitsandbytes" or not q.get("load_in_4bit"):
            raise _err("config.json's quantization_config", "be bitsandbytes 4-bit (load_in_4bit, nf4) or absent",
                       f"quant_method={method!r}, load_in_4bit={q.get('load_in_4bit')}, "
                       f"load_in_8bit={q.get('load_in_8bit')}")
        if q.get("bnb_4bit_quant_type", "fp4") != "nf4":
            raise _err("config.json's quantization_config.bnb_4bit_quant_type", "be 'nf4'",
                       repr(q.get("bnb_4bit_quant_type", "fp4")))
        bnb4 = True
        del cfg.quantization_config
    return cfg, bnb4


def _meta_model(cfg, dtype: torch.dtype) -> nn.Module:
    """The model from its config, parameters on the meta device, buffers computed on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except (ValueError, KeyError) as e:
        raise _err("model_dir", "hold a causal LM architecture (one AutoModelForCausalLM builds)",
                   f"model_type={getattr(cfg, 'model_type', None)!r}, architectures="
                   f"{getattr(cfg, 'architectures', None)} ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return model  # tied weights still apart (from_config on meta): load_pretrained ties them as from_pretrained does


def _aliases(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Every name of every parameter / persistent buffer -> all (module, attribute, is_param) holding that tensor
    (tied weights: lm_head.weight and embed_tokens.weight both name the same holders)."""
    by_id: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    out: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        items = [(n, t, True) for n, t in m._parameters.items()]
        items += [(n, t, False) for n, t in m._buffers.items() if n not in m._non_persistent_buffers_set]
        for n, t, is_param in items:
            if t is None:
                continue
            holders = by_id.setdefault(id(t), [])
            holders.append((m, n, is_param))
            out[prefix + n] = holders
    return out


def _set(holders: list[tuple[nn.Module, str, bool]], t: torch.Tensor) -> None:
    m0, n0, is_param = holders[0]
    new = nn.Parameter(t, requires_grad=getattr(m0, n0).requires_grad) if is_param else t
    for m, n, p in holders:
        (m._parameters if p else m._buffers)[n] = new


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


_CHUNK = 16 << 20  # bytes of a tensor copied per memory map (bounds the file pages resident at once)


@contextlib.contextmanager
def _open(file: Path):
    """safetensors.safe_open(file), its errors (a truncated or corrupt shard) as a ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as h:
            yield h
    except SafetensorError as e:
        raise _err(f"shard {file.name!r}", "be a complete safetensors file",
                   f"SafetensorError: {e} (in {str(file.parent)!r})") from e


def _stream(path: Path, tensors: dict, keep_mapped: set[str], dtypes: dict[str, torch.dtype],
            device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) for every key of `dtypes` (None: as stored), shard by shard. Every read goes
    through a memory map of the file opened for it alone and closed after: a tensor that shares a map keeps it, and every page of it that
    was touched stays resident (counted in RSS), as long as the tensor lives. So the names in `keep_mapped`
    (weights that are quantized, then dropped) are read straight from the map; the others are copied out, a
    floating one already cast to its `dtypes` entry (the model tensor's dtype), on `device`, in row chunks of
    ~16 MiB each from its own map, so that loading the largest tensor (an embedding) costs its size once, not twice."""
    by_file: dict[str, list[str]] = {}
    for k in dtypes:
        by_file.setdefault(tensors[k][0], []).append(k)
    for f in sorted(by_file):
        file = path / f
        for k in by_file[f]:
            dtype = dtypes[k]
            with _open(file) as h:
                sl = h.get_slice(k)
                if k in keep_mapped:
                    t = h.get_tensor(k)
                    yield k, t
                    del t
                    continue
                shape = tuple(sl.get_shape())
                t = h.get_tensor(k) if len(shape) < 2 else None
            if t is not None:  # small (0-D / 1-D): copied whole
                cast = t.is_floating_point() and dtype is not None
                yield k, (t.to(device, dtype, copy=True) if cast else t.to(device, copy=True))
                del t
                continue
            out, start = None, 0
            while start < shape[0]:
                with _open(file) as h:
                    sl = h.get_slice(k)
                    if out is None:
                        first = sl[0:1]
                        kind = dtype if first.is_floating_point() and dtype is not None else first.dtype
                        out = torch.empty(shape, dtype=kind, device=device)
                        row_bytes = max(1, first.numel() * first.element_size())
                        rows = max(1, _CHUNK // row_bytes)
                    stop = min(shape[0], start + rows)
                    out[start:stop].copy_(sl[start:stop])
                start = stop
            yield k, out
            del out


# ------------------------------------------------------------------ checkpoint keys -> model keys (transformers' rules)
@dataclasses.dataclass
class _KeyMap:
    """How from_pretrained reads this checkpoint into this model: the key renames and base_model_prefix add/strip of
    `rename_source_key`, the model's WeightConverters (e.g. Mixtral's per-expert w1/w2/w3 -> fused experts), and
    the unexpected keys left after the model's `_keys_to_ignore_on_load_unexpected` (and transformers' own extra
    patterns: old rotary inv_freq, position_ids)."""

    renamed: dict[str, str]                      # checkpoint key -> model key (one tensor to one tensor)
    groups: dict[str, list[tuple[str, str]]]     # a converter's first target -> [(checkpoint key, source pattern)]
    converters: dict[str, object]                # first target -> its own WeightConverter (deep copy, as transformers)
    outputs: dict[str, list[str]]                # first target -> every model key the converter writes
    unexpected: list[str]

    def loaded(self) -> set[str]:
        """Every model key the checkpoint fills."""
        return set(self.renamed.values()) | {k for keys in self.outputs.values() for k in keys}


def _map_keys(model: nn.Module, keys: list[str]) -> _KeyMap:
    """The checkpoint keys `keys` read as `PreTrainedModel.from_pretrained` reads them (convert_and_load_state_dict_
    in_model, no user key_mapping, no quantizer): transformers' own functions, not a copy of its rules."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    from transformers.utils.loading_report import LoadStateDictInfo

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
    out = _KeyMap({}, {}, {}, {}, [])
    unexpected: set[str] = set()
    for key in sorted(keys, key=dot_natural_key):  # transformers' order (a converter stacks experts in this order)
        new, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if new not in meta and key in meta:  # the key was right as it was (from_pretrained's own fallback)
            new, pattern = rename_source_key(key, [], [], prefix, meta)
        if new not in meta:
            targets = by_pattern[pattern].target_patterns if pattern is not None else None
            unexpected |= {new.replace(targets[0], t) for t in targets} if targets else {new}
        elif pattern is None:
            out.renamed[key] = new
        else:
            conv = out.converters.setdefault(new, copy.deepcopy(by_pattern[pattern]))
            out.groups.setdefault(new, []).append((key, pattern))
            out.outputs[new] = [new.replace(conv.target_patterns[0], t) for t in conv.target_patterns]
    info = LoadStateDictInfo(missing_keys=set(), unexpected_keys=unexpected, mismatched_keys=set(), error_msgs=[],
                             conversion_errors={}, skipped_pp_keys=set())
    model._adjust_missing_and_unexpected_keys(info)
    out.unexpected = sorted(info.unexpected_keys)
    return out


def _convert(km: _KeyMap, first: str, got: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Run transformers' WeightConverter of `first` over its checkpoint tensors `got` -> {model key: tensor}."""
    from transformers.core_model_loading import dot_natural_key

    conv = km.converters.pop(first)
    for key, pattern in sorted(km.groups.pop(first), key=lambda kp: dot_natural_key(kp[0])):
        conv.add_tensor(first, key, pattern, got.pop(key))
    return conv.convert(first, model=model, config=model.config)


def _plan(model: nn.Module, config, adapter_name: str):
    """(plan, apply, quantizes) for `config`'s method: the plan/apply pair `inject` uses (adapters/methods.py),
    planned here on the meta model (every check before any tensor is read), applied to the loaded one."""
    plan_fn, apply_fn = PLAN_APPLY[method_of(config)]
    plan = plan_fn(model, config, adapter_name)
    return plan, apply_fn, getattr(config, "quantize", None) == "nf4"


@torch.no_grad()
def load_pretrained(model_dir: str | os.PathLike, config, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, *, adapter_name: str = "default") -> nn.Module:
    """A transformers causal LM from `model_dir` (safetensors) with `config`'s adapters, equal to
    `inject(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device), config, adapter_name)` —
    same NF4 bytes, same outputs, same adapter initialization from torch's global generator — without ever
    holding the dense model: target weights are quantized as the shards stream in (module docstring).

    config: a LoRAConfig, IA3Config, BitFitConfig or PromptTuningConfig, as `inject` takes. A method that quantizes
        (`quantize="nf4"`: QLoRA, QDoRA, IA3 over NF4) quantizes its targets as they stream in; the others load the
        dense model tensor by tensor and add their adapter after.
    dtype: the dtype of every floating tensor that is not NF4, and the compute dtype of the NF4 weights quantized
        here (None: the checkpoint's `dtype` / `torch_dtype` in config.json, else float32).
    device: where the model is built (None: the CPU); quantization runs there.
    Checkpoint keys are read as from_pretrained reads them (transformers' key renames, base_model_prefix, weight
    converters, tied weights). A Hugging Face bitsandbytes 4-bit checkpoint (`quantization_config` with
    `load_in_4bit` and nf4) loads its NF4 bytes as they are. Errors (ValueError / FileNotFoundError, nothing
    half-built is returned): no such directory, no safetensors checkpoint, a missing or truncated shard, an index
    naming tensors its shards lack, a tensor of the model missing from the checkpoint or of another shape, an
    unsupported architecture or quantization."""
    path = Path(model_dir)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{_OP}: model_dir must be a directory with config.json and safetensors weights, "
                                f"got {str(model_dir)!r} ({'no config.json' if path.is_dir() else 'no such directory'})")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{_OP}: dtype must be a floating torch.dtype or None, got {dtype!r}")
    check_adapter_name(adapter_name, _OP)
    method_of(config, op=_OP)
    device = torch.device("cpu" if device is None else device)
    cfg, bnb4 = _hf_config(path)
    if dtype is None:
        d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        dtype = getattr(torch, d) if isinstance(d, str) and d != "auto" else d if isinstance(d, torch.dtype) else torch.float32
    with torch.random.fork_rng(devices=[]):  # building the model draws nothing from the caller's generator
        model = _meta_model(cfg, dtype)
    tensors = checkpoint_tensors(path)
    plan, apply, quantize = _plan(model, config, adapter_name)
    targets = set(getattr(plan, "targets", ()))
    kinds = {n: type(model.get_submodule(n)).__name__ for n in targets}  # for the summary, as inject's
    transposed = {n: weight_is_transposed(model.get_submodule(n), getattr(config, "fan_in_fan_out", None))
                  for n in targets}  # Conv1D: [in, out] on disk (nn/layout.py, the injector's rule)
    blocksize, double_quant = getattr(config, "blocksize", 64), getattr(config, "double_quant", True)

    # ---- check every name and shape against the headers before allocating anything
    bnb_ckpt = {k[: -len(_QS)] for k in tensors if k.endswith(_QS)} if bnb4 else set()
    if bnb4 and not bnb_ckpt:
        raise _err("a bitsandbytes 4-bit checkpoint", f"hold '<module>{_QS}' tensors", "none")
    bnb_extra = {f"{m}.{s}" for m in bnb_ckpt for s in BNB_WEIGHT_SUFFIXES[1:]}  # all but `weight`
    km = _map_keys(model, [k for k in tensors if k not in bnb_extra])
    # a 4-bit module's extra tensors (absmax, quant_map, ...) follow its weight's name in the model
    bnb_modules: set[str] = set()
    for m in bnb_ckpt:
        model_weight = km.renamed.get(f"{m}.weight")
        if model_weight is None:
            raise _err(f"{m!r} (4-bit in the checkpoint)", "be a module of the model", "no such module")
        mod_name = model_weight.rpartition(".")[0]
        bnb_modules.add(mod_name)
        for s in BNB_WEIGHT_SUFFIXES[1:]:
            if f"{m}.{s}" in tensors:
                km.renamed[f"{m}.{s}"] = f"{mod_name}.{s}"
    bnb_keys = {f"{m}.{s}" for m in bnb_modules for s in BNB_WEIGHT_SUFFIXES}
    meta = dict(model.state_dict())
    missing = set(meta) - km.loaded()
    model.tie_weights(missing_keys=missing, recompute_mapping=False)  # transformers' rule: one side of a tied pair
    # is enough (ties it now, on meta, to the side the file holds); both sides present are compared once loaded
    wrong = [f"{k} {tensors[k][1]} (model: {tuple(meta[v].shape)})" for k, v in km.renamed.items()
             if v not in bnb_keys and tensors[k][1] != tuple(meta[v].shape)]
    if missing or wrong:
        missing = sorted(missing)
        raise _err("the checkpoint", "hold every tensor of the model with the model's shape",
                   (f"{len(missing)} missing, e.g. {missing[:4]}" if missing else "")
                   + ("; " if missing and wrong else "") + (f"wrong shapes: {wrong[:4]}" if wrong else ""))
    # a floating model tensor stored as an integer one (a file quantized by another tool, a corrupt file): refused
    # here, before anything is allocated, not cast (from_pretrained's silent cast) or a torch error half-way
    not_float = [f"{k} ({tensors[k][2]}, in {tensors[k][0]})" for k, v in km.renamed.items()
                 if v not in bnb_keys and meta[v].is_floating_point() and not tensors[k][2].startswith(("F", "BF"))]
    if not_float:
        raise _err("the checkpoint", "store every floating tensor of the model as a floating-point tensor",
                   f"{len(not_float)} stored as integers, e.g. {not_float[:4]}")
    if km.unexpected:
        raise _err("the checkpoint", "hold only tensors of the model", f"{len(km.unexpected)} unexpected, e.g. "
                   f"{km.unexpected[:4]}")
    for m in bnb_modules:
        mod = model.get_submodule(m) if m else model
        if not isinstance(mod, nn.Linear):
            raise _err(f"{m!r} (4-bit in the checkpoint)", "be an nn.Linear of the model", type(mod).__name__)
    holders = _aliases(model)  # after tying on meta: a tied pair shares its holders

    # ---- stream: quantize targets, keep 4-bit modules as they are, materialize the rest
    dense_targets = {t for t in targets if quantize and t not in bnb_modules}
    tied = {n for pair in getattr(model, "all_tied_weights_keys", {}).items() for n in pair}
    shared = sorted(f"{t}.weight" for t in dense_targets if f"{t}.weight" in tied)
    if shared:  # inject would quantize one copy of a weight the model shares with another module
        raise _err("the modules config quantizes", "own their weight (not tied to another module's)",
                   f"tied: {shared[:4]}")
    pending: dict[str, dict[str, torch.Tensor]] = {}  # module -> its tensors read so far (targets, 4-bit modules)
    converting: dict[str, torch.Tensor] = {}  # checkpoint tensors a converter waits for
    group_of = {k: first for first, ks in km.groups.items() for k, _ in ks}

    filled = set(km.renamed.values())

    def need(mod_name: str) -> set[str]:
        if mod_name in bnb_modules:
            return {s for s in BNB_WEIGHT_SUFFIXES if f"{mod_name}.{s}" in filled} | (
                {"bias"} if f"{mod_name}.bias" in meta else set())
        mod = model.get_submodule(mod_name)
        return {n for n, p in mod._parameters.items() if p is not None}

    def owner(key: str) -> str | None:
        for m in (key.rpartition(".weight")[0], key.rpartition(".")[0]):
            if m in bnb_modules or (m in dense_targets and key in (f"{m}.weight", f"{m}.bias")):
                return m
        return None

    def place(key: str, t: torch.Tensor) -> None:
        """Put model tensor `key` where it belongs: into a module being assembled (a target to quantize, a 4-bit
        module), else into the model."""
        mod_name = owner(key)
        if mod_name is None:
            _set(holders[key], t)
            return
        got = pending.setdefault(mod_name, {})
        got[key[len(mod_name) + 1:]] = t
        if set(got) != need(mod_name):
            return
        sd = pending.pop(mod_name)
        for n in ("weight", "bias"):
            holders.pop(f"{mod_name}.{n}", None)  # the meta module is replaced, never filled
        if mod_name in bnb_modules:
            layer = linear4bit_from_state_dict(sd)  # validates the 4-bit tensors (NF4Weight.from_bnb_state_dict)
            bias = None if layer.bias is None else layer.bias.to(device, dtype)
            new = Linear4bit(layer.weight.to(device), bias)
            del layer
        else:  # as the injector quantizes a dense target (injector._new_layer, lora.linear_weight)
            wdtype = meta[f"{mod_name}.weight"].dtype
            weight = sd.pop("weight").to(device, wdtype)
            bias = sd.pop("bias", None)
            new = Linear4bit(quantize_nf4(weight.t().contiguous() if transposed[mod_name] else weight, blocksize,
                                          double_quant), None if bias is None else bias.to(device, wdtype))
            del weight, bias
        sd.clear()
        _swap(model, mod_name, new)

    def dtype_of(key: str) -> torch.dtype | None:  # transformers casts a tensor to its model tensor's dtype
        target = km.renamed.get(key) or group_of[key]
        if target in bnb_keys:  # a 4-bit layer's tensors: read as they are (its bias is cast, as any bias)
            return None
        return meta[target].dtype if meta[target].is_floating_point() else dtype

    keep_mapped = {k for k, v in km.renamed.items() if owner(v) in dense_targets}
    order = {k: dtype_of(k) for k in [*km.renamed, *group_of]}
    for key, t in _stream(path, tensors, keep_mapped, order, device):
        if key in group_of:
            first = group_of[key]
            converting[key] = t
            del t
            if all(k in converting for k, _ in km.groups[first]):
                for name, value in _convert(km, first, converting, model).items():
                    value = value[0] if isinstance(value, list) else value
                    if name not in meta or tuple(value.shape) != tuple(meta[name].shape):
                        raise _err(f"the checkpoint tensors transformers converts into {name!r}",
                                   "give the model's shape", f"{tuple(value.shape)} (model: "
                                   f"{tuple(meta[name].shape) if name in meta else 'no such tensor'})")
                    place(name, value.to(device))
            continue
        place(km.renamed[key], t)
        del t
    # tied pairs the file holds both sides of: tied if equal, else kept apart (transformers' tie_weights, warning)
    model.tie_weights(missing_keys=set(), recompute_mapping=False)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if pending or still_meta or converting:  # cannot happen after the checks above; never return a half-built model
        raise RuntimeError(f"{_OP}: every tensor must be loaded, got unfinished modules {sorted(pending)[:4]}, "
                           f"meta tensors {still_meta[:4]}, unconverted {sorted(converting)[:4]}")
    model.to(device)  # the buffers computed on the CPU (rotary inv_freq)
    gen = getattr(model, "generation_config", None)
    if gen is not None and (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    model.eval()
    model = apply(model, plan)
    # the summary names the modules the checkpoint describes (Linear, or Linear4bit for a 4-bit file)
    summary = get_state(model).summaries[adapter_name]
    summary.replaced[:] = [(n, "Linear4bit" if n in bnb_modules else kinds[n], new) if n in kinds else (n, old, new)
                           for n, old, new in summary.replaced]
    return model

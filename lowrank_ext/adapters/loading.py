"""load_pretrained(model_dir, config): a transformers causal LM with adapters, quantized while the shards stream in.

    inject(load_causal_lm(dir).model, config)      builds every weight in fp32 first: 4 bytes / parameter
    load_pretrained(dir, config)                    the same model (same NF4 bytes, same outputs), never whole

How (peak memory: the result + about two copies of the largest single tensor):
1. checks, reading only JSON and safetensors headers: the architecture, a bitsandbytes `quantization_config`
   (4-bit nf4 only), every shard the index names exists and holds the tensors the index puts there, every
   tensor of the model is in the checkpoint with its shape. Nothing is allocated before all of this passes.
2. builds the model from its config with parameters on the meta device (accelerate's `init_empty_weights`;
   buffers such as rotary `inv_freq` are computed as the model's own `__init__` computes them).
3. picks the targets with the injector's own planning (`plan_inject` on the meta model), so any config that
   `inject` accepts selects the same modules.
4. streams the shards tensor by tensor through `safetensors.safe_open` (memory-mapped; each shard is unmapped
   when it is done): a target's weight is cast to `dtype`, quantized to NF4 on `device` exactly as `inject`
   would (`quantize_nf4(weight, blocksize, double_quant)`) and kept as a `Linear4bit`; a module stored in
   bitsandbytes' 4-bit layout becomes a `Linear4bit` over the file's bytes (never requantized); every other
   tensor is materialized in `dtype` on `device`. Tied parameters (lm_head / embed_tokens) stay one tensor.
5. `apply_inject(model, plan)`: the adapter layers wrap those NF4 weights (no requantization) and draw their
   initial values from torch's global generator exactly as `inject` does; loading itself draws nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lowrank_ext.adapters.bnb_import import linear4bit_from_state_dict
from lowrank_ext.adapters.injector import apply_inject, plan_inject
from lowrank_ext.adapters.state import get_state
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
    from safetensors import safe_open

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
        with safe_open(str(path / f), framework="pt") as h:
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
    model.tie_weights()  # lm_head.weight is embed_tokens.weight again (from_config on meta leaves them apart)
    return model


def _aliases(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Every parameter / persistent buffer by its first name -> all (module, attribute, is_param) holding it
    (tied weights: lm_head.weight is embed_tokens.weight)."""
    first: dict[int, str] = {}
    out: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        items = [(n, t, True) for n, t in m._parameters.items()]
        items += [(n, t, False) for n, t in m._buffers.items() if n not in m._non_persistent_buffers_set]
        for n, t, is_param in items:
            if t is None:
                continue
            key = first.setdefault(id(t), prefix + n)
            out.setdefault(key, []).append((m, n, is_param))
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


def _stream(path: Path, tensors: dict, keep_mapped: set[str], dtype: torch.dtype,
            device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, shard by shard. Every read goes through a memory map of the file opened
    for it alone and closed after: a tensor that shares a map keeps it, and every page of it that was touched
    stays resident (counted in RSS), as long as the tensor lives. So the names in `keep_mapped` (weights that
    are quantized, then dropped) are read straight from the map; the others are copied out, already cast to
    `dtype` (floating ones) on `device`, in row chunks of ~16 MiB each from its own map, so that loading the
    largest tensor (an embedding) costs its size once, not twice."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for k, (f, _, _) in tensors.items():
        by_file.setdefault(f, []).append(k)
    for f in sorted(by_file):
        file = str(path / f)
        for k in by_file[f]:
            with safe_open(file, framework="pt") as h:
                sl = h.get_slice(k)
                if k in keep_mapped:
                    t = h.get_tensor(k)
                    yield k, t
                    del t
                    continue
                shape = tuple(sl.get_shape())
                t = h.get_tensor(k) if len(shape) < 2 else None
            if t is not None:  # small (0-D / 1-D): copied whole
                yield k, (t.to(device, dtype, copy=True) if t.is_floating_point() else t.to(device, copy=True))
                del t
                continue
            out, start = None, 0
            while start < shape[0]:
                with safe_open(file, framework="pt") as h:
                    sl = h.get_slice(k)
                    if out is None:
                        first = sl[0:1]
                        kind = dtype if first.is_floating_point() else first.dtype
                        out = torch.empty(shape, dtype=kind, device=device)
                        row_bytes = max(1, first.numel() * first.element_size())
                        rows = max(1, _CHUNK // row_bytes)
                    stop = min(shape[0], start + rows)
                    out[start:stop].copy_(sl[start:stop])
                start = stop
            yield k, out
            del out


@torch.no_grad()
def load_pretrained(model_dir: str | os.PathLike, config, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, *, adapter_name: str = "default") -> nn.Module:
    """A transformers causal LM from `model_dir` (safetensors) with `config`'s adapters, equal to
    `inject(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device), config, adapter_name)` —
    same NF4 bytes, same outputs, same adapter initialization from torch's global generator — without ever
    holding the dense model: target weights are quantized as the shards stream in (module docstring).

    dtype: the dtype of every floating tensor that is not NF4, and the compute dtype of the NF4 weights quantized
        here (None: the checkpoint's `dtype` / `torch_dtype` in config.json, else float32).
    device: where the model is built (None: the CPU); quantization runs there.
    A Hugging Face bitsandbytes 4-bit checkpoint (`quantization_config` with `load_in_4bit` and nf4) loads its
    NF4 bytes as they are. Errors (ValueError / FileNotFoundError, nothing half-built is returned): no such
    directory, no safetensors checkpoint, a missing shard, an index naming tensors its shards lack, a tensor of
    the model missing from the checkpoint or of another shape, an unsupported architecture or quantization."""
    path = Path(model_dir)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{_OP}: model_dir must be a directory with config.json and safetensors weights, "
                                f"got {str(model_dir)!r} ({'no config.json' if path.is_dir() else 'no such directory'})")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{_OP}: dtype must be a floating torch.dtype or None, got {dtype!r}")
    device = torch.device("cpu" if device is None else device)
    cfg, bnb4 = _hf_config(path)
    if dtype is None:
        d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        dtype = getattr(torch, d) if isinstance(d, str) and d != "auto" else d if isinstance(d, torch.dtype) else torch.float32
    with torch.random.fork_rng(devices=[]):  # building the model draws nothing from the caller's generator
        model = _meta_model(cfg, dtype)
    tensors = checkpoint_tensors(path)
    plan = plan_inject(model, config, adapter_name)
    targets = set(plan.targets)
    kinds = {n: type(model.get_submodule(n)).__name__ for n in plan.targets}  # for the summary, as inject's
    transposed = {n: weight_is_transposed(model.get_submodule(n), getattr(config, "fan_in_fan_out", None))
                  for n in plan.targets}  # Conv1D: [in, out] on disk (nn/layout.py, the injector's rule)
    quantize = getattr(config, "quantize", None) == "nf4"
    blocksize, double_quant = getattr(config, "blocksize", 64), getattr(config, "double_quant", True)

    # ---- check every name and shape against the headers before allocating anything
    holders = _aliases(model)
    bnb_modules = {k[: -len(_QS)] for k in tensors if k.endswith(_QS)} if bnb4 else set()
    if bnb4 and not bnb_modules:
        raise _err("a bitsandbytes 4-bit checkpoint", f"hold '<module>{_QS}' tensors", "none")
    bnb_keys = {f"{m}.{s}" for m in bnb_modules for s in BNB_WEIGHT_SUFFIXES}
    expected = {k: tuple(getattr(h[0][0], h[0][1]).shape) for k, h in holders.items()}
    wrong = [f"{k} {tensors[k][1]} (model: {s})" for k, s in expected.items()
             if k in tensors and k not in bnb_keys and tensors[k][1] != s]
    missing = sorted(k for k in expected if k not in tensors)
    if missing or wrong:
        raise _err("the checkpoint", "hold every tensor of the model with the model's shape",
                   (f"{len(missing)} missing, e.g. {missing[:4]}" if missing else "")
                   + ("; " if missing and wrong else "") + (f"wrong shapes: {wrong[:4]}" if wrong else ""))
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = sorted(k for k in tensors if k not in expected and k not in bnb_keys
                        and not any(p.search(k) for p in ignore))
    if unexpected:
        raise _err("the checkpoint", "hold only tensors of the model", f"{len(unexpected)} unexpected, e.g. "
                   f"{unexpected[:4]}")
    for m in bnb_modules:
        mod = model.get_submodule(m) if m else model
        if not isinstance(mod, nn.Linear):
            raise _err(f"{m!r} (4-bit in the checkpoint)", "be an nn.Linear of the model", type(mod).__name__)

    # ---- stream: quantize targets, keep 4-bit modules as they are, materialize the rest
    dense_targets = {t for t in targets if quantize and t not in bnb_modules}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # module -> its tensors read so far (targets, 4-bit modules)

    def need(mod_name: str) -> set[str]:
        if mod_name in bnb_modules:
            return {s for s in BNB_WEIGHT_SUFFIXES if f"{mod_name}.{s}" in tensors} | (
                {"bias"} if f"{mod_name}.bias" in tensors else set())
        mod = model.get_submodule(mod_name)
        return {n for n, p in mod._parameters.items() if p is not None}

    def owner(key: str) -> str | None:
        for m in (key.rpartition(".weight")[0], key.rpartition(".")[0]):
            if m in bnb_modules or (m in dense_targets and key in (f"{m}.weight", f"{m}.bias")):
                return m
        return None

    keep_mapped = {f"{m}.{n}" for m in dense_targets for n in ("weight", "bias")}
    for key, t in _stream(path, tensors, keep_mapped, dtype, device):
        mod_name = owner(key)
        if mod_name is None:
            if key in holders:  # else an ignored unexpected key (e.g. an old checkpoint's rotary inv_freq)
                _set(holders[key], t)
            del t
            continue
        got = pending.setdefault(mod_name, {})
        got[key[len(mod_name) + 1:]] = t
        del t
        if set(got) != need(mod_name):
            continue
        sd = pending.pop(mod_name)
        for n in ("weight", "bias"):
            holders.pop(f"{mod_name}.{n}", None)  # the meta module is replaced, never filled
        if mod_name in bnb_modules:
            layer = linear4bit_from_state_dict(sd)  # validates the 4-bit tensors (NF4Weight.from_bnb_state_dict)
            bias = None if layer.bias is None else layer.bias.to(device, dtype)
            new = Linear4bit(layer.weight.to(device), bias)
            del layer
        else:  # as the injector quantizes a dense target (injector._new_layer, lora.linear_weight)
            fifo = transposed[mod_name]
            weight = sd.pop("weight").to(device, dtype)
            bias = sd.pop("bias", None)
            new = Linear4bit(quantize_nf4(weight.t().contiguous() if fifo else weight, blocksize, double_quant),
                             None if bias is None else bias.to(device, dtype))
            del weight, bias
        sd.clear()
        _swap(model, mod_name, new)
        del new
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if pending or still_meta:  # cannot happen after the checks above; never return a half-built model
        raise RuntimeError(f"{_OP}: every tensor must be loaded, got unfinished modules {sorted(pending)[:4]}, "
                           f"meta tensors {still_meta[:4]}")
    model.to(device)  # the buffers computed on the CPU (rotary inv_freq)
    gen = getattr(model, "generation_config", None)
    if gen is not None and (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    model.eval()
    apply_inject(model, plan)
    # the summary names the modules the checkpoint describes (Linear, or Linear4bit for a 4-bit file)
    summary = get_state(model).summaries[adapter_name]
    summary.replaced[:] = [(n, "Linear4bit" if n in bnb_modules else kinds[n], new) for n, _, new in summary.replaced]
    return model

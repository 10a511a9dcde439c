"""save_adapter / load_adapter: PEFT's adapter directory format, both ways.

    directory/adapter_model.safetensors   metadata {"format": "pt"}, keys (adapter name stripped):
        base_model.model.<module>.lora_A.weight [r, in]    base_model.model.<module>.lora_B.weight [out, r]
        base_model.model.<module>.lora_magnitude_vector [out]                      (DoRA)
        base_model.model.<module>.vera_lambda_d [r], ...vera_lambda_b [out], base_model.vera_A, base_model.vera_B
        base_model.model.<module>.<param>                                         (modules_to_save copies)
        base_model.model.<module>.base_layer.bias / base_model.model.<module>.bias  (bias="all" / "lora_only")
    directory/adapter_config.json         LoRAConfig.to_peft_dict(), base_model_name_or_path (given, or the model's
                                          config._name_or_path), and for LoRA / VeRA / IA3 our field
                                          "lowrank_ext": {"base_quantization": ...} (peft_fields.py): load_adapter
                                          into a dense base rebuilds the NF4 layers the adapter was trained on
    directory/README.md                   a short model card (library_name: peft), as PEFT writes one

Saving from a sharded (FSDP2) model writes the global tensors (each gathered with full_tensor()), once,
from rank 0: call save_adapter on every rank. Saving: each file is written atomically (lowrank_ext/_atomic.py:
temporary file, fsync, os.replace), so a crash never leaves a half-written file under its final name; nothing
already there is replaced without overwrite=True, and without it the files are created exclusively (os.link):
of two saves racing into one directory exactly one succeeds, the other raises FileExistsError. With
overwrite=True the files are replaced one after the other, not as one unit: a crash between two of them can
leave a new weights file next to the old config.

Loading is all or nothing and strict where PEFT only warns. Before the model is changed: the config is
read and checked field by field, the safetensors header is checked against the file's size, every key the
adapter needs must be present with its shape, no other key may be present, every tensor must be a finite
float. Any failure is one ValueError naming the file, the key or field, what was expected and what was
found, and leaves the model exactly as it was. The file's config defines the adapter (PEFT's contract):
loading into an adapter name the model already has refuses, listing every differing field, unless the
configs agree (PEFT would keep the model's config silently). safetensors only: nothing is ever unpickled.

Other method families, chosen by the file's `peft_type` (save_adapter by the model's adapter config):
    "IA3"            base_model.model.<module>.ia3_l  [out, 1] / [1, in] (feed-forward)      (PEFT's format)
    "PROMPT_TUNING"  prompt_embeddings [num_virtual_tokens, hidden]                           (PEFT's format)
    "BITFIT"         base_model.model.<module>.bias [out]  (ours: adapters/bitfit.py documents the file)
They load with the same checks into a new adapter name, or in place into the model's adapter of that name when
it is the file's adapter (same method, same modules / tokens / biases: _other_differences; else refused); prompt
tuning returns a PromptTuningModel wrapping the given model: always use what load_adapter returns.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from lowrank_ext._atomic import atomic_write
from lowrank_ext.adapters import bitfit, ia3, prompt_tuning
from lowrank_ext.adapters.config import LoRAConfig
from lowrank_ext.adapters.injector import InjectPlan, apply_inject, in_out, plan_inject, target_names
from lowrank_ext.adapters.methods import check_family
from lowrank_ext.adapters.peft_fields import LOWRANK_EXT_FIELD, field_error
from lowrank_ext.adapters.state import ModulesToSave, adapter_layers, get_state
from lowrank_ext.nn import ADAPTER_LAYERS, IA3_LAYERS
from lowrank_ext.nn.linear4bit import NF4WeightHolder, is_sharded

__all__ = ["adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"]

# adapter_config.json's peft_type -> the config class that reads it (each through adapters/peft_fields.py)
_CONFIG_CLASSES = {"LORA": LoRAConfig, "VERA": LoRAConfig, "IA3": ia3.IA3Config,
                   "PROMPT_TUNING": prompt_tuning.PromptTuningConfig, "BITFIT": bitfit.BitFitConfig}

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
README = "README.md"
PREFIX = "base_model.model."
VERA_SHARED = ("base_model.vera_A", "base_model.vera_B")
_CARD_MARK = "<!-- written by lowrank_ext.save_adapter -->"


# ---- the file's keys ---------------------------------------------------------------------------------------
def _layer_keys(module: str, variant: str, r: int, in_f: int, out_f: int, bias: bool) -> dict[str, tuple]:
    """{file key: shape} of one adapted module (the single place that names these keys)."""
    p = PREFIX + module + "."
    if variant == "vera":
        keys = {p + "vera_lambda_d": (r,), p + "vera_lambda_b": (out_f,)}
    else:
        keys = {p + "lora_A.weight": (r, in_f), p + "lora_B.weight": (out_f, r)}
        if variant == "dora":
            keys[p + "lora_magnitude_vector"] = (out_f,)
    if bias:
        keys[p + "base_layer.bias"] = (out_f,)
    return keys


def _loose_biases(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """bias="all": the biases outside adapter layers and ModulesToSave wrappers (modules named in skip)."""
    return {PREFIX + n: t for n, t in model.named_parameters()
            if n.endswith("bias") and not any(n.startswith(s + ".") for s in skip)}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The live tensors of adapter `adapter_name`, under PEFT's file keys."""
    state = get_state(model)
    if state is None or adapter_name not in state.configs:
        have = [] if state is None else sorted(state.configs)
        raise ValueError(f"lowrank_ext::save_adapter: adapter_name must be one of the model's adapters {have}, "
                         f"got {adapter_name!r}")
    cfg = state.configs[adapter_name]
    if isinstance(cfg, ia3.IA3Config):
        return ia3.ia3_state_dict(model, adapter_name)
    if isinstance(cfg, bitfit.BitFitConfig):
        return bitfit.bitfit_state_dict(model, adapter_name)
    if isinstance(cfg, prompt_tuning.PromptTuningConfig):
        return {prompt_tuning.KEY: model.prompt_embeddings[adapter_name]}
    out: dict[str, torch.Tensor] = {}
    for mod, m in model.named_modules():
        if isinstance(m, ADAPTER_LAYERS) and adapter_name in m.specs:
            bias = cfg.bias != "none" and m.bias is not None
            keys = iter(_layer_keys(mod, cfg.variant, m.specs[adapter_name].r, m.in_features, m.out_features, bias))
            if cfg.variant == "vera":
                tensors = [m.vera_lambda_d[adapter_name], m.vera_lambda_b[adapter_name]]
            else:
                tensors = [m.lora_A[adapter_name], m.lora_B[adapter_name]]
                if cfg.variant == "dora":
                    tensors.append(m.lora_magnitude_vector[adapter_name])
            out.update(zip(keys, [*tensors, *([m.bias] if bias else [])]))
        elif isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save:
            for pname, t in m.modules_to_save[adapter_name].named_parameters():
                out[PREFIX + mod + "." + pname] = t
    if cfg.bias == "all":
        out.update(_loose_biases(model, {n for n, m in model.named_modules()
                                         if isinstance(m, (*ADAPTER_LAYERS, ModulesToSave))}))
    if cfg.variant == "vera":
        out[VERA_SHARED[0]], out[VERA_SHARED[1]] = state.vera_shared[adapter_name]
    return out


def _planned_shapes(model: nn.Module, plan: InjectPlan) -> dict[str, tuple]:
    """{file key: shape} that adapter_state_dict will give once `plan` is applied (the model is not touched)."""
    cfg, out = plan.config, {}
    max_in = max_out = 0
    for name in plan.targets:
        m = model.get_submodule(name)
        i, o = in_out(m)
        max_in, max_out = max(max_in, i), max(max_out, o)
        bias = cfg.bias != "none" and getattr(m, "bias", None) is not None
        out.update(_layer_keys(name, cfg.variant, cfg.rank_for(name), i, o, bias))
    for name in plan.modules_to_save:
        m = model.get_submodule(name)
        src = m.original_module if isinstance(m, ModulesToSave) else m
        out.update({PREFIX + name + "." + pname: tuple(t.shape) for pname, t in src.named_parameters()})
    if cfg.bias == "all":
        skip = {n for n, m in model.named_modules() if isinstance(m, (*ADAPTER_LAYERS, ModulesToSave))}
        skip |= set(plan.targets) | set(plan.modules_to_save)
        out.update({k: tuple(t.shape) for k, t in _loose_biases(model, skip).items()})
    if cfg.variant == "vera":
        out[VERA_SHARED[0]], out[VERA_SHARED[1]] = (cfg.r, max_in), (max_out, cfg.r)
    return out


# ---- saving ------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 overwrite: bool = False, base_model_name_or_path: str | None = None) -> None:
    """Write adapter `adapter_name` as a PEFT adapter directory (loadable by peft.PeftModel.from_pretrained):
    adapter_model.safetensors, adapter_config.json and a README.md model card, each written atomically.

    Refuses (FileExistsError) when the directory already holds an adapter file, unless overwrite=True. A
    README.md is written when there is none, and replaced (with overwrite=True) only when save_adapter
    wrote it: a model card the user wrote or edited away from our marker line is kept as it is."""
    from safetensors.torch import save as safetensors_bytes

    live = adapter_state_dict(model, adapter_name)
    sharded = any(is_sharded(v) for v in live.values())
    # A sharded (FSDP2) model: every rank calls save_adapter, each tensor is gathered whole (full_tensor, a
    # collective, the same order everywhere), rank 0 alone writes, and all ranks leave together.
    tensors = {k: (v.full_tensor() if is_sharded(v) else v).detach().to("cpu").contiguous() for k, v in live.items()}
    if sharded and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return
    try:
        _write_adapter(model, tensors, directory, adapter_name, overwrite, base_model_name_or_path, safetensors_bytes)
    finally:
        if sharded:
            torch.distributed.barrier()


def _write_adapter(model, tensors, directory, adapter_name, overwrite, base_model_name_or_path,
                   safetensors_bytes) -> None:
    cfg = get_state(model).configs[adapter_name]
    directory = os.fspath(directory)
    paths = {name: os.path.join(directory, name) for name in (WEIGHTS, CONFIG, README)}

    def exists_error(path: str) -> FileExistsError:
        return FileExistsError(f"lowrank_ext::save_adapter: directory must not already hold an adapter (pass "
                               f"overwrite=True to replace it), got {path!r}")

    if not overwrite:
        for name in (WEIGHTS, CONFIG):
            if os.path.exists(paths[name]):
                raise exists_error(paths[name])
    os.makedirs(directory, exist_ok=True)
    data = safetensors_bytes(tensors, metadata={"format": "pt"})
    if base_model_name_or_path is None:
        base_model_name_or_path = base_name_or_path(model)
    peft_dict = cfg.to_peft_dict(base_model_name_or_path, model=model)
    if isinstance(cfg, (LoRAConfig, ia3.IA3Config)):  # the methods whose base layers load_adapter can quantize
        peft_dict[LOWRANK_EXT_FIELD] = {"base_quantization": base_quantization(model, adapter_name)}
    # overwrite=False creates each file exclusively (atomic_write(exclusive=True): os.link fails if the name
    # exists), so of two saves racing into one new directory exactly one writes; the weights file is the claim:
    # whoever created it also writes the config, the other gets FileExistsError and writes nothing.
    try:
        with atomic_write(paths[WEIGHTS], exclusive=not overwrite) as f:
            f.write(data)
    except FileExistsError:
        raise exists_error(paths[WEIGHTS]) from None
    try:
        with atomic_write(paths[CONFIG], "w", exclusive=not overwrite) as f:
            json.dump(peft_dict, f, indent=2, sort_keys=True)
    except BaseException as e:
        if overwrite:
            raise
        os.unlink(paths[WEIGHTS])  # a new adapter is all or nothing: give back the claim, leave no lone weights
        if isinstance(e, FileExistsError):  # a config without weights appeared meanwhile
            raise exists_error(paths[CONFIG]) from None
        raise
    if _card_is_ours(paths[README]) is not False and (overwrite or not os.path.exists(paths[README])):
        with atomic_write(paths[README], "w") as f:
            f.write(_model_card(cfg, adapter_name, base_model_name_or_path))


def base_name_or_path(model: nn.Module) -> str | None:
    """Where the base came from, as transformers records it (config._name_or_path / name_or_path); None if unknown."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def base_quantization(model: nn.Module, adapter_name: str) -> dict[str, Any] | None:
    """The quantization of the base layers adapter `adapter_name` adapts, as adapter_config.json records it
    (peft_fields.py, field "lowrank_ext"): None when they are dense, else {"quant_type": "nf4", "blocksize",
    "double_quant", "compute_dtype"}. Layers that differ (some NF4, some dense, or two blocksizes) cannot be
    written as one setting: a ValueError rather than a file that rebuilds another model."""
    settings = set()
    for _, m in model.named_modules():
        holds = (isinstance(m, ADAPTER_LAYERS) and adapter_name in m.specs) or (
            isinstance(m, IA3_LAYERS) and adapter_name in m.ia3_l)
        if not holds:
            continue
        if isinstance(m, NF4WeightHolder):
            _, _, blocksize, double_quant = m._nf4_meta  # not m.weight: a sharded (FSDP2) layer is saved too
            settings.add((blocksize, double_quant, _DTYPE_NAMES.get(m.compute_dtype)))
        else:
            settings.add(None)
    if len(settings) > 1:
        raise ValueError(f"lowrank_ext::save_adapter: the base layers of adapter {adapter_name!r} must share one "
                         f"quantization (adapter_config.json records one), got {sorted(settings, key=repr)} "
                         f"(None: dense; else (blocksize, double_quant, compute_dtype))")
    setting = next(iter(settings), None)
    if setting is None:
        return None
    blocksize, double_quant, compute_dtype = setting
    return {"quant_type": "nf4", "blocksize": blocksize, "double_quant": double_quant, "compute_dtype": compute_dtype}


def _card_is_ours(path: str) -> bool | None:
    """None: no README; True: one save_adapter wrote (marker line present); False: the user's."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _CARD_MARK in f.read()
    except FileNotFoundError:
        return None


def _model_card(cfg: LoRAConfig, adapter_name: str, base: str | None) -> str:
    """A short model card: the metadata the Hugging Face hub reads (library_name: peft, base_model, tags)
    and how to load the adapter; the numbers are the ones in adapter_config.json."""
    meta = ["---", "library_name: peft"]
    if base:
        meta.append(f"base_model: {json.dumps(base)}")
    if not isinstance(cfg, LoRAConfig):
        return _other_model_card(cfg, adapter_name, base, meta)
    meta += ["tags:", "- lowrank_ext", f"- {cfg.variant}"]
    if base:
        meta.append(f"- {json.dumps('base_model:adapter:' + base)}")
    meta.append("---")
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules)
    scaling = "1 (VeRA)" if cfg.variant == "vera" else (
        f"alpha / sqrt(r) (rsLoRA), alpha = {cfg.alpha}" if cfg.use_rslora else f"alpha / r, alpha = {cfg.alpha}")
    body = [
        _CARD_MARK,
        "",
        f"# {adapter_name}: a {cfg.variant.upper() if cfg.variant != 'lora' else 'LoRA'} adapter",
        "",
        (f"Adapter weights for {('`' + base + '`') if base else 'a base model'} in PEFT's format, saved by "
         "lowrank_ext. The base model's own weights are not in this directory."),
        "",
        f"- rank r = {cfg.r}" + (f" (rank_pattern: {len(cfg.rank_pattern)} entries)" if cfg.rank_pattern else ""),
        f"- scaling: {scaling}",
        f"- target modules: {targets}",
        f"- dropout: {cfg.dropout}",
        "",
        "Load it with PEFT (`PeftModel.from_pretrained(base_model, path)`) or with lowrank_ext",
        "(`lowrank_ext.load_adapter(base_model, path)`). adapter_config.json holds the full configuration.",
        "",
    ]
    return "\n".join(meta + body)


def _other_model_card(cfg, adapter_name: str, base: str | None, meta: list[str]) -> str:
    method = {"IA3": "(IA)³", "PROMPT_TUNING": "prompt tuning", "BITFIT": "BitFit"}[cfg.peft_type]
    meta += ["tags:", "- lowrank_ext", f"- {cfg.peft_type.lower()}"]
    if base:
        meta.append(f"- {json.dumps('base_model:adapter:' + base)}")
    meta.append("---")
    how = ("Load it with lowrank_ext (`lowrank_ext.load_adapter(base_model, path)`); PEFT does not know BitFit "
           "files (lowrank_ext/adapters/bitfit.py documents the format)." if cfg.peft_type == "BITFIT" else
           "Load it with PEFT (`PeftModel.from_pretrained(base_model, path)`) or with lowrank_ext "
           "(`model = lowrank_ext.load_adapter(base_model, path)`).")
    body = [_CARD_MARK, "", f"# {adapter_name}: a {method} adapter", "",
            (f"Adapter weights for {('`' + base + '`') if base else 'a base model'}, saved by lowrank_ext. The base "
             "model's own weights are not in this directory."), "", how,
            "adapter_config.json holds the full configuration.", ""]
    return "\n".join(meta + body)


# ---- reading -----------------------------------------------------------------------------------------------
def read_adapter_config(directory: str | os.PathLike, **overrides: Any):
    """The config in `directory`/adapter_config.json — a LoRAConfig, IA3Config, PromptTuningConfig or BitFitConfig,
    as its peft_type says; every problem is a ValueError naming the file and field."""
    path = os.path.join(os.fspath(directory), CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lowrank_ext::load_adapter: directory must contain {CONFIG}, got {str(directory)!r}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"lowrank_ext::load_adapter: {path} must be UTF-8 JSON, got {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"lowrank_ext::load_adapter: {path} must hold valid JSON, got {e.msg} at line {e.lineno} "
                         f"column {e.colno} ({len(raw)} bytes)") from e
    if not isinstance(d, dict):  # a file of the wrong shape is a bad value (ValueError), not a wrong argument type
        got = type(d).__name__
        raise ValueError(f"lowrank_ext::load_adapter: {path} must hold a JSON object, got {got}")  # noqa: TRY004
    where = f"lowrank_ext::load_adapter: {path} field"
    peft_type = d.get("peft_type")
    if peft_type not in _CONFIG_CLASSES:
        raise field_error(d, where, "peft_type", f"be one of {', '.join(map(repr, _CONFIG_CLASSES))}")
    cls = _CONFIG_CLASSES[peft_type]
    if cls in (prompt_tuning.PromptTuningConfig, bitfit.BitFitConfig):
        if overrides.get("quantize") is not None:
            raise ValueError(f"lowrank_ext::load_adapter: quantize must be None for a {peft_type} adapter (it has no "
                             f"base layers to quantize), got {overrides['quantize']!r}")
        return cls.from_peft_dict(d, _where=where)
    return cls.from_peft_dict(d, _where=where, **overrides)


# safetensors dtype names and their widths in bytes (the format's spec)
_ST_WIDTH = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
             "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _check_safetensors(data: bytes, path: str) -> None:
    """The structure of a safetensors file: an 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}}, then the data; every tensor inside the data."""
    where = f"lowrank_ext::load_adapter: {path}"
    if len(data) < 8:
        raise ValueError(f"{where} must start with an 8-byte header length (a safetensors file), got a "
                         f"{len(data)}-byte file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{where} header length must be at most the {len(data) - 8} bytes after it, got {n} "
                         f"(a truncated or non-safetensors file)")
    try:
        header = json.loads(data[8: 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} header must be UTF-8 JSON, got {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{where} header must be a JSON object, got {type(header).__name__}")  # noqa: TRY004
    size = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in _ST_WIDTH and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) for o in info["data_offsets"]))
        if not ok:
            raise ValueError(f"{where} header entry {key!r} must be {{dtype, shape, data_offsets: [begin, end]}}, "
                             f"got {info!r}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= size:
            raise ValueError(f"{where} tensor {key!r} data_offsets must lie within the {size}-byte data section, got "
                             f"[{begin}, {end}] (a truncated file?)")
        want = _ST_WIDTH[info["dtype"]] * torch.Size(info["shape"]).numel()
        if end - begin != want:
            raise ValueError(f"{where} tensor {key!r} must span {want} bytes ({info['dtype']} {info['shape']}), got "
                             f"{end - begin}")


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    with open(path, "rb") as f:
        data = f.read()
    _check_safetensors(data, path)
    try:
        return load(data)
    except SafetensorError as e:  # anything the structural check above does not see
        raise ValueError(f"lowrank_ext::load_adapter: {path} must be a valid safetensors file, got {e}") from e


def _check_tensors(file: dict[str, torch.Tensor], expected: dict[str, tuple], path: str) -> None:
    missing = sorted(set(expected) - set(file))
    unexpected = sorted(set(file) - set(expected))
    if missing:
        raise ValueError(f"lowrank_ext::load_adapter: {path} must hold every adapter key, got missing key "
                         f"{missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise ValueError(f"lowrank_ext::load_adapter: {path} must hold only keys the model has, got unexpected key "
                         f"{unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, shape in expected.items():
        t = file[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"lowrank_ext::load_adapter: {key} must have shape {tuple(shape)}, got "
                             f"{tuple(t.shape)} (in {path})")
        if not t.is_floating_point():
            raise ValueError(f"lowrank_ext::load_adapter: {key} must have a floating-point dtype, got {t.dtype} "
                             f"(in {path})")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"lowrank_ext::load_adapter: {key} must be finite, got {bad} NaN/Inf values (in {path})")


def _config_differences(model: nn.Module, name: str, have: LoRAConfig, want: LoRAConfig) -> list[str]:
    """The fields in which the model's adapter `name` (config `have`) differs from the file's config `want`.
    Targets are compared as the modules they resolve to on this model (a list in another order, a regex or
    "all-linear" naming the same modules is no difference)."""
    diffs = []

    def compare(field: str, model_value: Any, file_value: Any) -> None:
        if model_value != file_value:
            diffs.append(f"{field} (file {file_value!r}, model {model_value!r})")

    compare("variant", have.variant, want.variant)
    compare("r", have.r, want.r)
    if "vera" not in (have.variant, want.variant):
        compare("alpha", float(have.alpha), float(want.alpha))
        compare("use_rslora", have.use_rslora, want.use_rslora)
        compare("rank_pattern", {k: int(v) for k, v in have.rank_pattern.items()},
                {k: int(v) for k, v in want.rank_pattern.items()})
        compare("alpha_pattern", {k: float(v) for k, v in have.alpha_pattern.items()},
                {k: float(v) for k, v in want.alpha_pattern.items()})
    compare("dropout", float(have.dropout), float(want.dropout))
    compare("bias", have.bias, want.bias)
    compare("modules_to_save", sorted(have.modules_to_save or []), sorted(want.modules_to_save or []))
    held = sorted(n for n, layer in adapter_layers(model) if name in layer.specs)
    wanted = sorted(target_names(model, want))  # the same resolution inject uses
    if held != wanted:
        only_file, only_model = sorted(set(wanted) - set(held)), sorted(set(held) - set(wanted))
        diffs.append(f"target_modules (file adapts {len(wanted)} modules, model {len(held)}; only in the file: "
                     f"{only_file[:3]}{'...' if len(only_file) > 3 else ''}, only in the model: "
                     f"{only_model[:3]}{'...' if len(only_model) > 3 else ''})")
    return diffs


# ---- loading -----------------------------------------------------------------------------------------------
@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 quantize: str | None = None) -> nn.Module:
    """Load a PEFT (or save_adapter) adapter directory into `model` as `adapter_name`; returns the model to use.

    The file's peft_type decides: LORA / VERA (below), IA3, PROMPT_TUNING (returns a PromptTuningModel wrapping
    `model`) or BITFIT (ours); see the module docstring for the last three.

    A new adapter name is injected from the file's config (with `quantize`: None quantizes dense bases as the
    file's recorded base quantization says — NF4 with its blocksize / double_quant / compute_dtype, or nothing
    for a file without one — and "nf4" quantizes them in any case). An adapter name the model already has is
    loaded into only when its config equals the file's (else a ValueError lists every differing field: load
    under another name, or delete_adapter first). Everything is checked before the model changes; see the module docstring.
    """
    directory = os.fspath(directory)
    weights_path, config_path = os.path.join(directory, WEIGHTS), os.path.join(directory, CONFIG)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"lowrank_ext::load_adapter: directory must contain {WEIGHTS} (safetensors only), "
                                f"got {directory!r}")
    # quantize=None: the base quantization the file records (a dense base then gets the same NF4 layers it was
    # trained on), none recorded: dense bases stay dense
    config = read_adapter_config(directory, **({} if quantize is None else {"quantize": quantize}))
    file = _read_safetensors(weights_path)
    if not isinstance(config, LoRAConfig):
        return _load_other(model, config, file, weights_path, config_path, adapter_name)
    state = get_state(model)
    plan = None
    if state is not None and adapter_name in state.configs:
        merged_in = [n for n, layer in adapter_layers(model) if adapter_name in layer.merged_adapters]
        if merged_in:  # new tensors under a merged adapter would leave the merged weight stale
            raise ValueError(f"lowrank_ext::load_adapter: the model's adapter {adapter_name!r} must not be merged "
                             f"(call unmerge_adapter first), got it merged in {len(merged_in)} layers")
        diffs = _config_differences(model, adapter_name, state.configs[adapter_name], config)
        if diffs:
            raise ValueError(f"lowrank_ext::load_adapter: the model's adapter {adapter_name!r} must have the config "
                             f"in {config_path} (an adapter runs with its file's config), got differing fields: "
                             f"{'; '.join(diffs)}. Load it under another adapter_name, or call "
                             f"delete_adapter(model, {adapter_name!r}) first")
        expected = {k: tuple(t.shape) for k, t in adapter_state_dict(model, adapter_name).items()}
    else:
        try:
            plan = plan_inject(model, config, adapter_name)
        except ValueError as e:
            raise ValueError(f"lowrank_ext::load_adapter: {config_path} must describe an adapter this model can "
                             f"hold, got: {e}") from e
        expected = _planned_shapes(model, plan)
    _check_tensors(file, expected, weights_path)
    # ---- everything checked: change the model ----
    if plan is not None:
        apply_inject(model, plan)
    live = adapter_state_dict(model, adapter_name)
    if {k: tuple(t.shape) for k, t in live.items()} != expected:  # plan and injection disagree: a bug here
        raise RuntimeError(f"lowrank_ext::load_adapter: internal error: the injected adapter's keys differ from "
                           f"the planned ones ({sorted(set(live) ^ set(expected))[:3]})")
    for key, t in live.items():
        if key not in VERA_SHARED:
            t.copy_(file[key])
    if VERA_SHARED[0] in live:
        a, b = file[VERA_SHARED[0]], file[VERA_SHARED[1]]
        get_state(model).vera_shared[adapter_name] = (a, b)
        for _, m in model.named_modules():
            if isinstance(m, ADAPTER_LAYERS) and adapter_name in m.specs:
                getattr(m, f"vera_A_{adapter_name}").copy_(a[: m.specs[adapter_name].r, : m.in_features])
                getattr(m, f"vera_B_{adapter_name}").copy_(b[: m.out_features, : m.specs[adapter_name].r])
    return model


def _load_other(model: nn.Module, config, file: dict[str, torch.Tensor], weights_path: str, config_path: str,
                adapter_name: str) -> nn.Module:
    """IA3 / prompt tuning / BitFit: check everything against the plan, then inject and copy (all or nothing).
    An adapter name the model already has is loaded into in place when it is the file's adapter (_other_differences)."""
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        return _load_other_in_place(model, config, file, weights_path, config_path, adapter_name)
    try:
        if isinstance(config, ia3.IA3Config):
            check_family(model, ia3.IA3Config)
            plan = ia3.plan_ia3(model, config, adapter_name)
            expected = ia3.ia3_planned_shapes(model, plan)
            run = lambda: ia3.apply_ia3(model, plan)
        elif isinstance(config, bitfit.BitFitConfig):
            plan = bitfit.plan_bitfit(model, config, adapter_name, add=config.added_biases)
            expected = bitfit.bitfit_planned_shapes(model, plan)
            run = lambda: bitfit.apply_bitfit(model, plan)
        else:
            prompt_tuning.check_prompt_tuning(model, config, adapter_name)
            expected = {prompt_tuning.KEY: (config.num_virtual_tokens, config.token_dim)}
            run = lambda: prompt_tuning.inject_prompt_tuning(model, config, adapter_name, from_file=True)
    except ValueError as e:
        raise ValueError(f"lowrank_ext::load_adapter: {config_path} must describe an adapter this model can hold, "
                         f"got: {e}") from e
    _check_tensors(file, expected, weights_path)
    # ---- everything checked: change the model ----
    out = run()
    live = adapter_state_dict(out, adapter_name)
    if {k: tuple(t.shape) for k, t in live.items()} != expected:  # plan and injection disagree: a bug here
        raise RuntimeError(f"lowrank_ext::load_adapter: internal error: the injected adapter's keys differ from "
                           f"the planned ones ({sorted(set(live) ^ set(expected))[:3]})")
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(file[key])
    return out


def _other_differences(model: nn.Module, name: str, have, want) -> list[str]:
    """How the model's IA3 / prompt tuning / BitFit adapter `name` (config `have`) differs from the file's (`want`)
    in what decides its forward pass: the method; IA3: the adapted modules and which scale their input (resolved on
    this model, as inject would); prompt tuning: the number of virtual tokens and their width; BitFit: which
    biases train and which were added."""
    if type(have) is not type(want):
        return [f"method (file {want.peft_type}, model {getattr(have, 'peft_type', type(have).__name__)})"]
    if isinstance(want, ia3.IA3Config):
        held = {n: m.is_feedforward for n, m in ia3.ia3_layers(model) if name in m.ia3_l}
        plan = ia3.plan_ia3(model, want, name + "_file")  # a name the model lacks: plans without changing it
        wanted = {t: plan.feedforward[t] for t in plan.targets}
        return [] if held == wanted else [f"target_modules / feedforward_modules (file {wanted}, model {held})"]
    if isinstance(want, prompt_tuning.PromptTuningConfig):
        return [f"{f} (file {getattr(want, f)!r}, model {getattr(have, f)!r})"
                for f in ("num_virtual_tokens", "token_dim") if getattr(want, f) != getattr(have, f)]
    return [f"{f} (file {getattr(want, f)!r}, model {getattr(have, f)!r})"
            for f in ("bias_patterns", "add_bias_to", "added_biases") if getattr(want, f) != getattr(have, f)]


def _load_other_in_place(model: nn.Module, config, file: dict[str, torch.Tensor], weights_path: str,
                         config_path: str, adapter_name: str) -> nn.Module:
    """Load the file into the model's adapter `adapter_name` of the same method (e.g. Trainer resuming from a
    checkpoint): its tensors are copied in place (an optimizer holding them keeps them), after every check."""
    try:
        diffs = _other_differences(model, adapter_name, get_state(model).configs[adapter_name], config)
    except ValueError as e:
        diffs = [str(e)]
    if diffs:
        raise ValueError(f"lowrank_ext::load_adapter: the model's adapter {adapter_name!r} must be the adapter in "
                         f"{config_path}, got differing: {'; '.join(diffs)}. Load it under another adapter_name, or "
                         f"call delete_adapter(model, {adapter_name!r}) first")
    live = adapter_state_dict(model, adapter_name)
    _check_tensors(file, {k: tuple(t.shape) for k, t in live.items()}, weights_path)
    with torch.no_grad():
        for key, t in live.items():
            t.copy_(file[key])
    return model

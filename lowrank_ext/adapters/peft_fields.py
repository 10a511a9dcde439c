"""Reading PEFT's adapter_config.json: one reader (`read_peft_dict`) and one table of fields per method.

Every field PEFT 0.21.2's `to_dict()` writes (LoraConfig, VeraConfig, IA3Config, PromptTuningConfig; and our
BitFit file) is in a table with what it does to a loaded adapter's forward pass:

    READ         we implement it: type/range-checked, then passed to our config (`kwarg`, after `convert`)
    IGNORED      known not to change the math of a loaded adapter (bookkeeping: task_type, revision,
                 base_model_name_or_path, inference_mode, peft_version, ...; or an init-only setting: the
                 weights come from the file)
    UNSUPPORTED  changes the forward pass and we do not implement it (aLoRA's alora_invocation_tokens,
                 use_qalora, lora_bias, layers_to_transform, ...): only its default value loads; anything else
                 is a ValueError naming the field and the file, never a silent load as plain LoRA

A field in no table (a newer PEFT's, another tool's) may change the math too: it loads only while unset
(null, false, [] or {}), else it is refused the same way. Error form: `<where> '<field>' must <expected>, got
<value>` (`where` names the file when load_adapter reads one).

Our own field, in the LORA / VERA / IA3 tables (PEFT ignores a field its config class lacks, with a warning):

    "lowrank_ext": {"base_quantization": null | {"quant_type": "nf4", "blocksize": 64, "double_quant": true,
                                                 "compute_dtype": null | "float32" | "bfloat16" | "float16"}}
        the quantization of the base layers the adapter was trained on (save_adapter writes it). READ: it becomes
        the config's quantize / blocksize / double_quant / compute_dtype, so load_adapter into a dense base
        rebuilds the same NF4 layers (`base_quant_kwargs`). Anything else inside it is refused.

Also here: `peft_task_type(model)`, the one decision of which `task_type` our files write.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BIAS_CHOICES", "LOWRANK_EXT_FIELD", "Field", "PeftTable", "as_names", "base_quant_kwargs", "field_error",
           "is_names", "peft_task_type", "read_peft_dict"]

READ, IGNORED, UNSUPPORTED = "read", "ignored", "unsupported"
BIAS_CHOICES = ("none", "all", "lora_only")
_NAME_COLLECTIONS = (list, tuple, set, frozenset)


# ---- value checks ------------------------------------------------------------------------------------------
def is_names(v: Any) -> bool:
    """A regex string, or a collection of module names (PEFT's to_dict() holds sets; JSON gives lists)."""
    return isinstance(v, str) or (isinstance(v, _NAME_COLLECTIONS) and all(isinstance(x, str) for x in v))


def as_names(v: Any) -> list[str] | str | None:
    """The one normal form of a names value (is_names(v) or None): a str or None as it is, a set sorted (it has
    no order of its own), a list / tuple as a list in its order."""
    if v is None or isinstance(v, str):
        return v
    return sorted(v) if isinstance(v, (set, frozenset)) else list(v)


def _is_name_list(v: Any) -> bool:
    return is_names(v) and not isinstance(v, str)


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_prob(v: Any) -> bool:
    return _is_num(v) and 0 <= v < 1


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_unset(v: Any) -> bool:
    """null, false, [] or {}: the value PEFT's optional features are off with."""
    return v is None or v is False or (isinstance(v, (list, dict, str)) and not v)


LOWRANK_EXT_FIELD = "lowrank_ext"
_QUANT_KEYS = {"quant_type", "blocksize", "double_quant", "compute_dtype"}
_COMPUTE_DTYPE_NAMES = (None, "float32", "bfloat16", "float16")


def _is_base_quantization(v: Any) -> bool:
    """null (a dense base) or {"quant_type": "nf4", "blocksize": int, "double_quant": bool, "compute_dtype": name}."""
    return v is None or (isinstance(v, dict) and set(v) == _QUANT_KEYS and v["quant_type"] == "nf4"
                         and _is_int(v["blocksize"], 1) and _is_bool(v["double_quant"])
                         and v["compute_dtype"] in _COMPUTE_DTYPE_NAMES)


def _is_lowrank_ext_block(v: Any) -> bool:
    return isinstance(v, dict) and set(v) <= {"base_quantization"} and _is_base_quantization(v.get("base_quantization"))


def base_quant_kwargs(d: Mapping[str, Any]) -> dict[str, Any]:
    """The config kwargs (quantize, blocksize, double_quant, compute_dtype) of the file's recorded base
    quantization; {} when the file records none (a dense base, or a file not written by lowrank_ext)."""
    q = (d.get(LOWRANK_EXT_FIELD) or {}).get("base_quantization")
    if q is None:
        return {}
    return {"quantize": q["quant_type"], "blocksize": q["blocksize"], "double_quant": q["double_quant"],
            "compute_dtype": q["compute_dtype"]}


# ---- the table ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Field:
    """One adapter_config.json field. `kind`: READ / IGNORED / UNSUPPORTED (module docstring).

    check / expected: the test a present, non-null value must pass and the words of the error;
    required: absent or null is an error (else the config class's default applies);
    default: the value PEFT writes when the feature is off (UNSUPPORTED: the only value that loads);
    kwarg / convert: the config class's argument it becomes (None: checked only) and how."""

    name: str
    kind: str = READ
    check: Callable[[Any], bool] | None = None
    expected: str = ""
    required: bool = False
    default: Any = None
    kwarg: str | None = None
    convert: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class PeftTable:
    """The fields of one peft_type; `build(d)`: kwargs that depend on several fields (or constants)."""

    peft_type: str
    fields: tuple[Field, ...]
    build: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None


def _read(name: str, check: Callable[[Any], bool], expected: str, kwarg: str | None = "", *,
          required: bool = False, convert: Callable[[Any], Any] | None = None) -> Field:
    return Field(name, READ, check, expected, required, None, name if kwarg == "" else kwarg, convert)


def _ignored(*names: str) -> tuple[Field, ...]:
    return tuple(Field(n, IGNORED) for n in names)


def _unsupported(name: str, default: Any = None, expected: str = "") -> Field:
    """expected: the error's words (default: "be <default> (not supported)")."""
    return Field(name, UNSUPPORTED, expected=expected, default=default)


# every PEFT config's bookkeeping (PeftConfigMixin / PeftConfig): none of it touches the forward pass
_BOOKKEEPING = _ignored("task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                        "inference_mode")
_NAMES = "be a list of module names or a regex string"
_OPT_NAMES = "be null, a list of module names or a regex string"
_TARGETS = (
    _read("target_modules", is_names, _NAMES, required=True, convert=as_names),
    _read("exclude_modules", is_names, _OPT_NAMES, convert=as_names),
)
_LOWRANK_EXT = _read(LOWRANK_EXT_FIELD, _is_lowrank_ext_block,
                     'be {"base_quantization": null or {"quant_type": "nf4", "blocksize": int, "double_quant": bool, '
                     '"compute_dtype": null, "float32", "bfloat16" or "float16"}}', None)
_LORA_VERA_COMMON = (
    *_TARGETS,
    _LOWRANK_EXT,
    _read("r", lambda v: _is_int(v, 1), "be a positive int", required=True),
    _read("modules_to_save", _is_name_list, "be null or a list of module names", convert=as_names),
    _read("bias", lambda v: v in BIAS_CHOICES, f"be one of {list(BIAS_CHOICES)}"),
    _read("fan_in_fan_out", _is_bool, "be true or false"),
    _unsupported("layers_to_transform"),
    _unsupported("layers_pattern"),
)
# init_lora_weights values that leave the base weight alone (pissa, olora, corda, loftq, lora_ga, mica rewrite
# or read the base weight at PEFT's load: their files hold adapters for a modified base, which we do not build)
_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")

LORA = PeftTable("LORA", (
    *_BOOKKEEPING,
    *_LORA_VERA_COMMON,
    _read("lora_alpha", _is_num, "be a finite number", "alpha"),
    _read("lora_dropout", _is_prob, "be a number in [0, 1)", "dropout", convert=float),
    _read("use_rslora", _is_bool, "be true or false"),
    _read("use_dora", _is_bool, "be true or false"),
    _read("rank_pattern", lambda v: isinstance(v, dict) and all(_is_int(x, 1) for x in v.values()),
          "be an object {pattern: positive int}", convert=dict),
    _read("alpha_pattern", lambda v: isinstance(v, dict) and all(_is_num(x) for x in v.values()),
          "be an object {pattern: number}", convert=dict),
    _read("init_lora_weights", lambda v: any(v is x if isinstance(x, bool) else v == x for x in _LORA_INITS),
          "be true, false, 'gaussian', 'eva' or 'orthogonal' (other inits load onto a rewritten base weight, "
          "not supported)", "init", convert=lambda v: "gaussian" if v == "gaussian" else "kaiming"),
    # init-only settings (they act through init_lora_weights, checked above) and settings read only together
    # with an unsupported feature (megatron_core with megatron_config, qalora_group_size with use_qalora)
    *_ignored("loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size"),
    _unsupported("layer_replication"),
    _unsupported("lora_bias", False),
    _unsupported("use_qalora", False),
    _unsupported("alora_invocation_tokens"),
    _unsupported("megatron_config"),
    _unsupported("trainable_token_indices"),
    _unsupported("velora_config"),
    _unsupported("monteclora_config"),
    _unsupported("target_parameters"),
    _unsupported("use_bdlora"),
    _unsupported("arrow_config"),
    _unsupported("kasa_config"),
    _unsupported("ensure_weight_tying", False),
), build=base_quant_kwargs)

VERA = PeftTable("VERA", (
    *_BOOKKEEPING,
    *_LORA_VERA_COMMON,
    _read("vera_dropout", _is_prob, "be a number in [0, 1)", "dropout", convert=float),
    _read("projection_prng_key", lambda v: _is_int(v, 0), "be an int >= 0", "vera_seed"),
    _read("d_initial", _is_num, "be a finite number", "vera_d_initial", convert=float),
    *_ignored("init_weights"),                 # init-only: λ_d, λ_b come from the file
    _unsupported("save_projection", True),    # false: A, B are not in the file (regenerated by PEFT's PRNG)
), build=lambda d: {"variant": "vera", **base_quant_kwargs(d)})

IA3 = PeftTable("IA3", (
    *_BOOKKEEPING,
    *_TARGETS,
    _read("feedforward_modules", is_names, _OPT_NAMES, convert=as_names),
    _read("init_ia3_weights", _is_bool, "be true or false"),
    _read("fan_in_fan_out", _is_bool, "be true or false"),
    _LOWRANK_EXT,
    _unsupported("modules_to_save", expected="be null for IA3 (not supported)"),
), build=base_quant_kwargs)

PROMPT_TUNING = PeftTable("PROMPT_TUNING", (
    *(f for f in _BOOKKEEPING if f.name != "task_type"),
    _read("task_type", lambda v: v == "CAUSAL_LM", "be 'CAUSAL_LM' (a causal LM's prompt tuning)", None),
    _read("num_virtual_tokens", lambda v: _is_int(v, 1), "be a positive int", required=True),
    _read("token_dim", lambda v: _is_int(v, 1), "be a positive int", required=True),
    _read("num_transformer_submodules", lambda v: v == 1 and _is_int(v, 1), "be 1 (a decoder-only model)", None),
    _read("tokenizer_name_or_path", lambda v: isinstance(v, str), "be null or a string"),
    _read("prompt_tuning_init", lambda v: v in ("RANDOM", "TEXT", "SAMPLE_VOCAB"),
          "be 'RANDOM', 'TEXT' or 'SAMPLE_VOCAB'", None),
    _read("prompt_tuning_init_text", lambda v: isinstance(v, str), "be null or a string", None),
    # the model's shape, written for PEFT's bookkeeping; init-only tokenizer settings
    *_ignored("num_attention_heads", "num_layers", "tokenizer_kwargs"),
    _unsupported("modules_to_save", expected="be null for prompt tuning (not supported)"),
), build=lambda d: {"init_text": d.get("prompt_tuning_init_text") if d.get("prompt_tuning_init") == "TEXT"
                   else None})

BITFIT = PeftTable("BITFIT", (
    *_ignored("base_model_name_or_path"),
    _read("format_version", lambda v: v == 1 and _is_int(v, 1), "be 1", None, required=True),
    _read("bias_patterns", is_names, _OPT_NAMES, convert=as_names),
    _read("add_bias_to", is_names, _OPT_NAMES, convert=as_names),
    _read("added_biases", _is_name_list, "be a list of module names", required=True, convert=as_names),
))


# ---- the reader ----------------------------------------------------------------------------------------------
def _default_text(default: Any) -> str:
    if default is None:
        return "unset"
    return ("true" if default else "false") if isinstance(default, bool) else repr(default)


def field_error(d: Mapping[str, Any], where: str, key: str, expected: str) -> ValueError:
    """`<where> '<key>' must <expected>, got <d[key]>` (or "got no such field (fields: [...])")."""
    got = repr(d[key]) if key in d else f"no such field (fields: {sorted(d)})"
    return ValueError(f"{where} {key!r} must {expected}, got {got}")


def read_peft_dict(cls: type, d: Mapping[str, Any], where: str, table: PeftTable | Mapping[str, PeftTable],
                   overrides: Mapping[str, Any] | None = None) -> Any:
    """`cls(**kwargs)` from PEFT's adapter_config.json content `d`, every field checked against `table` (or the
    table of d's peft_type, given {peft_type: table}). `where` starts every error ("lowrank_ext::load_adapter:
    <path> field"); `overrides` (quantize, compute_dtype, ...) are not file fields and win."""

    def bad(key: str, expected: str) -> ValueError:
        return field_error(d, where, key, expected)

    tables = {table.peft_type: table} if isinstance(table, PeftTable) else dict(table)
    peft_type = d.get("peft_type")
    if peft_type not in tables:
        raise bad("peft_type", "be " + " or ".join(repr(t) for t in tables))
    table = tables[peft_type]
    kwargs: dict[str, Any] = {}
    for f in table.fields:
        value = d.get(f.name)
        if f.kind == UNSUPPORTED:
            is_default = (value is None or (type(value) is type(f.default) and value == f.default)
                          or (_is_unset(value) and _is_unset(f.default)))
            if not is_default:
                raise bad(f.name, f.expected or f"be {_default_text(f.default)} (not supported)")
        elif f.kind == READ:
            if value is None:
                if f.required:
                    raise bad(f.name, f.expected)
                continue
            if not f.check(value):
                raise bad(f.name, f.expected)
            if f.kwarg is not None:
                kwargs[f.kwarg] = f.convert(value) if f.convert is not None else value
    known = {f.name for f in table.fields} | {"peft_type"}
    for key in sorted(set(d) - known):
        if not _is_unset(d[key]):
            raise bad(key, "be unset (a field this package does not know: it may change the forward pass, which "
                      "would then not be reproduced)")
    if table.build is not None:
        kwargs.update(table.build(d))
    kwargs.update(overrides or {})
    try:
        return cls(**kwargs)
    except ValueError as e:  # a rule across fields (IA3's feedforward ⊆ targets, ...): name the file too
        raise ValueError(f"{where.removesuffix(' field')} must describe a valid {cls.__name__}, got: {e}") from e


# ---- task_type ------------------------------------------------------------------------------------------------
def peft_task_type(model: nn.Module | None) -> str | None:
    """PEFT's task_type for an adapter of `model`: "CAUSAL_LM" for a transformers causal LM (its class is in
    transformers' causal-LM auto mapping, or named like one), else None. PEFT's AutoPeftModelForCausalLM
    needs "CAUSAL_LM". Pass the transformers model itself (prompt tuning passes the model its wrapper holds)."""
    if model is None:
        return None
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return None
    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (tuple, list)) else (v,))
    return "CAUSAL_LM" if name in names else None

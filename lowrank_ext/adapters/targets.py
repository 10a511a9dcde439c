"""The one rule for "which modules are targets": PEFT's, used by the injector (LoRA / DoRA / VeRA), IA3, BitFit's
`add_bias_to` / `bias_patterns`, rank allocation and the memory estimate.

PEFT 0.21 (tuners/tuners_utils.py `check_target_module_exists`, `_maybe_include_all_linear_layers`), per module
name `key` of `model.named_modules()`, in this order:

    1. exclude_modules: a str excludes a key it matches in full (re.fullmatch); a list excludes a key equal to an
       entry or ending in "." + entry.
    2. modules_to_save: a key is excluded when re.match(r"(^|.*\\.)<entry>($|\\..*)") holds, i.e. the module
       trained in full and everything inside it.
    3. target_modules: a str is a regex the whole key must match (re.fullmatch); a list (or set) selects a key
       equal to an entry or ending in "." + entry. "all-linear" (any case) first becomes the set of the full names
       of every linear-like module (nn.Linear, transformers' Conv1D, an adapter layer) minus the output head of a
       transformers model (get_output_embeddings) and minus anything inside an adapter layer; that set is then
       matched as a list.
    4. Modules inside an existing adapter layer (or a modules-to-save wrapper) are never candidates.

A module the rule selects must be one the caller can adapt (`linear-like`: nn.Linear, Conv1D, our or
bitsandbytes' Linear4bit, our adapter layers). PEFT raises for a selected module it cannot adapt; so do we for
a selected module that holds its own weight (an Embedding, a Conv2d, a LayerNorm: PEFT would adapt or refuse
it, and silently skipping it would give a different adapter). A selected container (a block, an MLP: no weight
of its own) is skipped — PEFT refuses it — because list entries such as "0" select containers and linears alike
in nn.Sequential models; its linear children are matched by their own names.

Modules to save (trained in full) are chosen by yet another PEFT rule (utils/other.py `_set_trainable`): a
module whose name ends with an entry as a plain string, without a "." boundary (["norm"] selects every
input_layernorm / post_attention_layernorm and model.norm): modules_to_save_names.

PEFT's `layers_to_transform` / `layers_pattern` are not configuration fields here (the adapter-file readers
refuse them), so they are not part of the rule. PEFT's `task_type="SEQ_CLS"` exclusion of a classifier head
(`score` / `classifier`) under "all-linear" does not apply either: our configs carry no task type, which is
PEFT's behaviour for `task_type=None` (the head is a target).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from lowrank_ext.adapters.state import ModulesToSave
from lowrank_ext.nn import ADAPTER_LAYERS, IA3_LAYERS, Linear4bit
from lowrank_ext.nn.layout import is_conv1d

__all__ = ["ALL_LINEAR", "is_all_linear", "is_linear_like", "matches_spec", "modules_to_save_names", "output_head_name",
           "pattern_value", "select_targets"]

ALL_LINEAR = "all-linear"
TargetSpec = str | Iterable[str]

_WRAPPERS = (*ADAPTER_LAYERS, *IA3_LAYERS)


def is_all_linear(spec: object) -> bool:
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


def is_linear_like(m: nn.Module) -> bool:
    """A module an adapter can wrap: nn.Linear (bitsandbytes' Linear4bit is one), transformers' Conv1D, our
    Linear4bit, or an adapter layer (LoRA / IA3) already wrapping one."""
    return isinstance(m, (nn.Linear, Linear4bit, *_WRAPPERS)) or is_conv1d(m)


def matches_spec(spec: TargetSpec, name: str) -> bool:
    """PEFT's name rule: a str must match the whole name as a regex; a list (set, tuple) entry matches a name
    equal to it or ending in "." + entry."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == p or name.endswith("." + p) for p in spec)


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    r"""The value of the first key of `patterns` (rank_pattern / alpha_pattern) that matches module `name` by PEFT's
    rule (utils/other.py `get_pattern_key`): the key is a regex that must match a whole dotted suffix of the name,
    `(.*\.)?(key)$` — so "v_proj", "q_proj|v_proj" and r".*\.1\.mlp\.down_proj" all work; `default` if none does."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _in_modules_to_save(modules_to_save: Iterable[str] | None, name: str) -> bool:
    """PEFT's rule: the module trained in full, or anything inside it (the entry is used as a regex, as PEFT does)."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _is_transformers_model(model: nn.Module) -> bool:
    tf = sys.modules.get("transformers")  # not imported: the model cannot be a transformers model
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def output_head_name(model: nn.Module) -> str | None:
    """The name of a transformers model's output embedding (what "all-linear" leaves out), or None (PEFT only
    asks a transformers PreTrainedModel)."""
    if not _is_transformers_model(model):
        return None
    head = model.get_output_embeddings()
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _named_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every named module, except the model itself and modules inside an adapter layer or a
    modules-to-save wrapper (another adapter's internals; PEFT skips them the same way)."""
    out, inside = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, ModulesToSave):
            inside.append(name + ".")
            continue
        if isinstance(m, _WRAPPERS):
            inside.append(name + ".")
        out.append((name, m))
    return out


def select_targets(model: nn.Module, target_modules: TargetSpec, exclude_modules: TargetSpec | None = None, *,
                   modules_to_save: Iterable[str] | None = None,
                   accept: Callable[[nn.Module], bool] = is_linear_like, op: str = "inject") -> list[str]:
    """The names (in model order) of the modules PEFT's rule selects for `target_modules` (see the module
    docstring), restricted to the modules `accept` takes (default: linear-like).

    A selected module that `accept` refuses and that holds a weight of its own raises a ValueError naming it;
    a selected container without its own weight is skipped. An empty result is returned as is (the caller
    says what it needed)."""
    if target_modules is None:
        raise ValueError(f"lowrank_ext::{op}: target_modules must be a list of names, a regex or 'all-linear', "
                         f"got None")
    cands = _named_candidates(model)
    if is_all_linear(target_modules):
        head = output_head_name(model)
        target_modules = {n for n, m in cands if is_linear_like(m) and n != head}
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    excl = exclude_modules if exclude_modules else None  # PEFT: an empty list / "" excludes nothing
    if excl is not None and not isinstance(excl, str):
        excl = list(excl)
    names = []
    for name, m in cands:
        if excl is not None and matches_spec(excl, name):
            continue
        if _in_modules_to_save(modules_to_save, name) or not matches_spec(target_modules, name):
            continue
        if accept(m):
            names.append(name)
        elif is_linear_like(m) or m._parameters.get("weight") is not None:  # PEFT would adapt or refuse it
            raise ValueError(f"lowrank_ext::{op}: target_modules must select only linear modules (nn.Linear, "
                             f"Conv1D, Linear4bit) this method adapts, got {name!r} ({type(m).__name__}); "
                             f"narrow target_modules or add it to exclude_modules")
    return names


def modules_to_save_names(model: nn.Module, modules_to_save: Iterable[str]) -> list[str]:
    """The modules PEFT wraps for `modules_to_save` (utils/other.py `_set_trainable`): every module whose name
    ends with an entry (a plain string suffix), an existing modules-to-save wrapper included (it gets one more
    copy), nothing inside an adapter layer or a wrapper."""
    entries = list(modules_to_save)
    out, inside = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, (ModulesToSave, *_WRAPPERS)):
            inside.append(name + ".")
        if not isinstance(m, _WRAPPERS) and any(name.endswith(e) for e in entries):
            out.append(name)
    return out

"""A lowrank_ext model as a `peft.PeftModel`: the one line that makes Trainer / TRL / accelerate treat it as an
adapter model.

    model = lowrank_ext.inject(model, lowrank_ext.LoRAConfig(r=16, target_modules="all-linear", quantize="nf4"))
    model = lowrank_ext.hf.to_peft_model(model)          # <- the line
    trainer = transformers.Trainer(model=model, ...)      # or trl.SFTTrainer(model=model, ...)

transformers.Trainer, TRL and accelerate decide "adapter model" by `isinstance(model, peft.PeftModel)`
(transformers.trainer_utils._is_peft_model, accelerate.utils.is_peft_model); then checkpoints and save_model()
hold the adapter alone (`model.save_pretrained`), and resume / load_best_model_at_end call
`model.load_adapter(...)` with `model.active_adapters`. `LowrankPeftModel` is a PeftModel subclass that wraps
the injected model as it is — PEFT builds and re-injects nothing — and answers every call the tools make with
lowrank_ext's adapters API:

    save_pretrained      lowrank_ext.save_adapter per adapter ("default" in the directory, others in a subdirectory
                         of their name: PEFT's layout), so `peft.PeftModel.from_pretrained(plain_base, dir)` and
                         `lowrank_ext.load_adapter(base, dir)` both load it
    load_adapter         lowrank_ext.load_adapter (into the existing adapter of that name: in place, so an optimizer
                         holding the parameters keeps them; a new name: injected from the file)
    set_adapter, disable_adapter(), add_adapter, delete_adapter, merge_and_unload, active_adapter(s),
    peft_config (PEFT config objects made from ours), get_base_model, get_nb_trainable_parameters (PEFT's count),
    print_trainable_parameters, forward / generate (adapter_names=[...] per row: lowrank_ext.mixed_batch)

Everything else (config, gradient_checkpointing_enable, get_input_embeddings, ...) is read from the wrapped
model, as PeftModel does. State-dict keys are PEFT's: `base_model.model.<module>...`.

accelerate: `Accelerator.save_state` writes `model.state_dict()` whole for any model (PEFT's too); call
`register_accelerate_hooks(accelerator)` once and it writes and reads the adapter files instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import peft
import torch
from torch import nn

from lowrank_ext.adapters import files, management
from lowrank_ext.adapters.bitfit import BitFitConfig
from lowrank_ext.adapters.injector import count_parameters
from lowrank_ext.adapters.methods import CONFIG_TYPES, inject
from lowrank_ext.adapters.prompt_tuning import PromptTuningModel
from lowrank_ext.adapters.state import get_state, require_state, set_adapter
from lowrank_ext.nn.linear4bit import is_sharded

__all__ = ["LowrankPeftModel", "LowrankTuner", "register_accelerate_hooks", "to_peft_model"]

# PeftModel.load_adapter / save_pretrained arguments that change nothing here at these values
_LOAD_DEFAULTS = {"torch_device": None, "autocast_adapter_dtype": True, "ephemeral_gpu_offload": False,
                  "low_cpu_mem_usage": False}
_SAVE_DEFAULTS = {"save_embedding_layers": "auto", "path_initial_model_for_weight_conversion": None,
                  "convert_pissa_to_lora": None}


def _check_defaults(op: str, kwargs: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a PEFT argument we do not implement unless it has the value that means "off"."""
    for key, value in kwargs.items():
        if key not in defaults:
            raise TypeError(f"lowrank_ext::{op}: keyword arguments must be among {sorted(defaults)}, got {key!r}")
        if value != defaults[key]:
            raise ValueError(f"lowrank_ext::{op}: {key} must be {defaults[key]!r} (not supported), got {value!r}")


class LowrankTuner(nn.Module):
    """PeftModel.base_model: holds the injected model as `.model` (PEFT's key prefix base_model.model.) and reads
    missing attributes from it, as PEFT's tuners do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _peft_config_of(cfg: Any, model: nn.Module) -> peft.PeftConfig:
    """PEFT's config object for one of our configs (what adapter_config.json would hold). BitFit has no PEFT
    type: a bare PeftConfig (peft_type None, not prompt learning) stands for it."""
    d = cfg.to_peft_dict(files.base_name_or_path(model), model=model)
    if isinstance(cfg, BitFitConfig):
        return peft.PeftConfig(peft_type=None, task_type=None, base_model_name_or_path=d["base_model_name_or_path"])
    cls = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[d["peft_type"]]
    fields = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in d.items() if k in fields and k != "peft_type"})


class LowrankPeftModel(peft.PeftModel):
    """A model adapted by lowrank_ext.inject, as a peft.PeftModel (see the module docstring). Make it with
    `to_peft_model(model)`; PeftModel.__init__ is not run (it would inject PEFT's own layers)."""

    def __init__(self, model: nn.Module) -> None:
        nn.Module.__init__(self)
        state = require_state(model, "to_peft_model")
        if not state.configs:
            raise ValueError("lowrank_ext::to_peft_model: model must hold at least one adapter, got none")
        self.base_model = LowrankTuner(model)
        self.special_peft_forward_args = {"adapter_names"}
        self._is_prompt_learning = isinstance(model, PromptTuningModel)
        self._adapters_disabled = False

    # ---- what the tools read -------------------------------------------------------------------------------
    @property
    def _model(self) -> nn.Module:
        """The injected model (a PromptTuningModel for prompt tuning): what lowrank_ext's functions take."""
        return self.base_model.model

    @property
    def _state(self):
        return get_state(self._model)

    @property
    def peft_config(self) -> dict[str, peft.PeftConfig]:
        """{adapter name: PEFT config object}, made from our configs at each access (a view: changing it changes
        nothing; add_adapter / delete_adapter do)."""
        return {name: _peft_config_of(cfg, self._model) for name, cfg in self._state.configs.items()}

    @peft_config.setter
    def peft_config(self, value: Any) -> None:
        raise AttributeError("lowrank_ext::LowrankPeftModel: peft_config is read-only (use add_adapter / "
                             "delete_adapter)")

    @property
    def active_adapters(self) -> list[str]:
        return list(self._state.active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active, as PEFT's tuners answer)."""
        active = self._state.active
        return active[0] if len(active) == 1 else list(active)

    @active_adapter.setter
    def active_adapter(self, value: str | list[str]) -> None:
        self.set_adapter(value)

    @property
    def peft_type(self) -> Any:
        return self.peft_config[self._state.active[0]].peft_type

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {n for cfg in self._state.configs.values() for n in (getattr(cfg, "modules_to_save", None) or [])}
        return names or None

    def get_base_model(self) -> nn.Module:
        """The transformers model (PEFT's answer; for prompt tuning the model the virtual tokens are fed to)."""
        m = self._model
        return m.unwrap() if isinstance(m, PromptTuningModel) else m

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters, PEFT's count (an NF4 weight counts as its elements)."""
        return count_parameters(self._model)

    # ---- running -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _rows(self, kwargs: dict[str, Any]) -> Iterator[None]:
        """PEFT's forward argument adapter_names=[name per row] (its mixed-batch inference)."""
        names = kwargs.pop("adapter_names", None)
        if names is None:
            yield
        else:
            with management.mixed_batch(self._model, names):
                yield

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._rows(kwargs):
            return self._model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._rows(kwargs):
            return self._model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes with its base alone (lowrank_ext.disable_adapters)."""
        was = self._adapters_disabled
        with management.disable_adapters(self._model):
            self._adapters_disabled = True
            try:
                yield
            finally:
                self._adapters_disabled = was

    # ---- adapters ------------------------------------------------------------------------------------------
    def _freeze(self, adapter_name: str) -> None:
        """PEFT's inference mode for one adapter: its parameters stop training (every parameter whose name has
        the adapter name as one component: lora_A.<name>, ia3_l.<name>, modules_to_save.<name>.*, ...)."""
        for pname, p in self._model.named_parameters():
            if adapter_name in pname.split("."):
                p.requires_grad_(False)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        set_adapter(self._model, adapter_name)
        if inference_mode:
            for name in [adapter_name] if isinstance(adapter_name, str) else adapter_name:
                self._freeze(name)

    def _to_our_config(self, config: Any) -> Any:
        if isinstance(config, CONFIG_TYPES):
            return config
        if isinstance(config, peft.PeftConfig):
            d = config.to_dict()
            return files._CONFIG_CLASSES[str(getattr(d["peft_type"], "value", d["peft_type"]))].from_peft_dict(d)
        raise TypeError(f"lowrank_ext::add_adapter: peft_config must be a lowrank_ext config or a peft.PeftConfig, "
                        f"got {type(config).__name__}")

    def add_adapter(self, adapter_name: str, peft_config: Any, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """A new adapter from a lowrank_ext config or a PEFT config (read field by field, adapters/peft_fields.py)."""
        _check_defaults("add_adapter", {"low_cpu_mem_usage": low_cpu_mem_usage,
                                        "autocast_adapter_dtype": autocast_adapter_dtype}, _LOAD_DEFAULTS)
        self.base_model.model = inject(self._model, self._to_our_config(peft_config), adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        management.delete_adapter(self._model, adapter_name)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """lowrank_ext.merge_and_unload (NF4 bases merge into dense nn.Linear); returns the plain model."""
        if adapter_names is not None:
            set_adapter(self._model, adapter_names)
        return management.merge_and_unload(self._model, safe_merge=safe_merge)

    # ---- files ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        state_dict: dict | None = None, **kwargs: Any) -> None:
        """Write the adapters in PEFT's layout with lowrank_ext.save_adapter (replacing what is there, as PEFT
        does): "default" into save_directory, any other adapter into save_directory/<name>.

        state_dict must be None: the files are written from the live adapter tensors (a sharded model's are
        gathered by save_adapter), never from another state dict."""
        _check_defaults("save_pretrained", kwargs, _SAVE_DEFAULTS)
        if not safe_serialization:
            raise ValueError("lowrank_ext::save_pretrained: safe_serialization must be True (adapters are written "
                             "as safetensors only), got False")
        if state_dict is not None:
            raise ValueError("lowrank_ext::save_pretrained: state_dict must be None (the adapter files are written "
                             f"from the model's live tensors), got a {type(state_dict).__name__}")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"lowrank_ext::save_pretrained: save_directory must be a directory, got the file "
                             f"{save_directory!r}")
        names = list(self._state.configs) if selected_adapters is None else list(selected_adapters)
        # a sharded (FSDP2) model: every rank joins save_adapter's gathers and rank 0 alone writes
        if not is_main_process and not any(is_sharded(p) for p in self._model.parameters()):
            return
        for name in names:
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            files.save_adapter(self._model, target, name, overwrite=True)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     **kwargs: Any) -> torch.nn.modules.module._IncompatibleKeys:
        """lowrank_ext.load_adapter from a local adapter directory (strict: every key, nothing else, so the
        result reports no missing or unexpected keys). An adapter the model has is loaded into in place (its
        config must equal the file's); is_trainable=False freezes the adapter (PEFT's inference mode)."""
        _check_defaults("load_adapter", kwargs, _LOAD_DEFAULTS)
        if not os.path.isdir(model_id):
            raise ValueError(f"lowrank_ext::load_adapter: model_id must be a local adapter directory, got "
                             f"{os.fspath(model_id)!r}")
        self.base_model.model = files.load_adapter(self._model, model_id, adapter_name)
        set_adapter(self._model, self._state.active)  # the active adapters train again (their requires_grad)
        if not is_trainable:
            self._freeze(adapter_name)
        return torch.nn.modules.module._IncompatibleKeys([], [])

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, **kwargs: Any) -> LowrankPeftModel:
        """lowrank_ext.load_adapter(model, model_id) wrapped as a LowrankPeftModel (PEFT's signature)."""
        _check_defaults("from_pretrained", kwargs, _LOAD_DEFAULTS)
        out = cls(files.load_adapter(model, model_id, adapter_name))
        if not is_trainable:
            out._freeze(adapter_name)
        return out


def to_peft_model(model: nn.Module) -> LowrankPeftModel:
    """The one line that makes a lowrank_ext model (what `lowrank_ext.inject` or `load_adapter` returned: any
    method, NF4 or dense base) an adapter model to transformers.Trainer, TRL's trainers and accelerate: a
    `peft.PeftModel` whose save / load / adapter calls are lowrank_ext's. Nothing is copied or re-injected; the
    returned object wraps `model` itself. A LowrankPeftModel is returned as it is."""
    if isinstance(model, LowrankPeftModel):
        return model
    if isinstance(model, peft.PeftModel):
        raise TypeError(f"lowrank_ext::to_peft_model: model must be a model adapted by lowrank_ext.inject, got PEFT's "
                        f"own {type(model).__name__} (it is already an adapter model)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowrank_ext::to_peft_model: model must be a torch.nn.Module, got {type(model).__name__}")
    return LowrankPeftModel(model)


# ---- accelerate ------------------------------------------------------------------------------------------------
def _adapter_dir(output_dir: str, index: int) -> str:
    """Where save_state puts model `index`'s adapters: the checkpoint directory itself for the first model."""
    return output_dir if index == 0 else os.path.join(output_dir, f"adapter_model_{index}")


def register_accelerate_hooks(accelerator: Any) -> tuple[Any, Any]:
    """Make `accelerator.save_state` / `load_state` write and read the adapters of every prepared
    LowrankPeftModel (save_pretrained / load_adapter into the same adapters, in place) instead of its whole
    state dict; optimizer, scheduler, RNG and dataloader states stay accelerate's. Returns the two hook handles
    (`.remove()` undoes them)."""
    from accelerate.utils import extract_model_from_parallel

    def ours(models: list) -> list[int]:
        return [i for i, m in enumerate(models) if isinstance(extract_model_from_parallel(m), LowrankPeftModel)]

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for i in reversed(ours(models)):  # reversed: popping keeps the lower indices valid
            extract_model_from_parallel(models[i]).save_pretrained(_adapter_dir(output_dir, i))
            weights.pop(i)

    def load_hook(models: list, input_dir: str) -> None:
        for i in reversed(ours(models)):
            m = extract_model_from_parallel(models[i])
            trainable = {n for n, p in m.named_parameters() if p.requires_grad}
            for name in list(m._state.configs):
                base = _adapter_dir(input_dir, i)
                m.load_adapter(base if name == "default" else os.path.join(base, name), name, is_trainable=True)
            for n, p in m.named_parameters():  # exactly the parameters that trained before train again
                p.requires_grad_(n in trainable)
            models.pop(i)

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)

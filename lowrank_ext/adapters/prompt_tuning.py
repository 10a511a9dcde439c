"""Prompt tuning: trainable virtual-token embeddings prepended to a causal LM's input embeddings (PEFT's math).

    PromptTuningConfig(num_virtual_tokens, init_text=None, tokenizer=None, tokenizer_name_or_path=None)
    inject_prompt_tuning(model, config) -> PromptTuningModel   a wrapper: use what inject / load_adapter return

    forward(input_ids, attention_mask, labels):  E = [P; embed(input_ids)]   P: [n, hidden] trainable
        attention_mask ← [1…1 (n); attention_mask],  labels ← [-100…-100 (n); labels]   (PEFT's forward)
    generate(input_ids, ...): the base model's generate on inputs_embeds = [P; embed(input_ids)] with the
        extended mask; returns input_ids followed by the new tokens (what PEFT's generate returns). It equals
        greedy decoding by full forwards; PEFT 0.21.2's own generate (transformers 5.25) drifts after the first
        new token (its cache positions skip the virtual tokens) — tests/test_prompt_tuning.py shows both.

Initialisation (PEFT's prompt_tuning_init): "RANDOM" (nn.Embedding's N(0, 1)) without init_text; "TEXT" with
it: the text's token ids (tokenizer(init_text)["input_ids"], special tokens included, as PEFT), cut or repeated
to n, looked up in the model's input embeddings. The tokenizer is an object (never saved) or a name/path for
transformers' AutoTokenizer. Loading a file never initialises: its weights are the prompt, so a "TEXT" file
loads without its tokenizer (as in PEFT).
File (PEFT's): adapter_model.safetensors {"prompt_embeddings": [n, hidden]}, adapter_config.json peft_type
"PROMPT_TUNING", task_type "CAUSAL_LM", num_virtual_tokens, token_dim, num_transformer_submodules (1), ...
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowrank_ext.adapters import peft_fields
from lowrank_ext.adapters.peft_fields import peft_task_type, read_peft_dict
from lowrank_ext.adapters.state import AdapterState, InjectSummary, check_adapter_name, get_state

__all__ = ["PromptTuningConfig", "PromptTuningModel", "check_prompt_tuning", "inject_prompt_tuning"]

KEY = "prompt_embeddings"


def _err(arg: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"lowrank_ext::PromptTuningConfig: {arg} must {expected}, got {got!r}")


@dataclasses.dataclass
class PromptTuningConfig:
    """num_virtual_tokens: virtual tokens prepended; init_text: initialise them from this text's embeddings
    (needs `tokenizer`, an object with __call__ like a transformers tokenizer, or tokenizer_name_or_path)."""

    num_virtual_tokens: int
    init_text: str | None = None
    tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)
    tokenizer_name_or_path: str | None = None
    token_dim: int | None = None  # filled in from the model at inject

    peft_type = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _err("num_virtual_tokens", "be a positive int", n)
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text):
            raise _err("init_text", "be None or a non-empty str", self.init_text)

    def to_peft_dict(self, base_model_name_or_path: str | None = None, model: nn.Module | None = None
                     ) -> dict[str, Any]:
        """PEFT's fields. "TEXT" init needs a tokenizer name in PEFT's config (it re-checks it on load): with a
        tokenizer object that has no name_or_path the file says "RANDOM" — the init is history, the trained
        virtual tokens are in the weights file either way."""
        tok_name = self.tokenizer_name_or_path or getattr(self.tokenizer, "name_or_path", None) or None
        # prompt tuning is a causal-LM method here (PromptTuningModel; the reader requires "CAUSAL_LM")
        base = model.base_model if isinstance(model, PromptTuningModel) else model
        return {"peft_type": "PROMPT_TUNING", "task_type": peft_task_type(base) or "CAUSAL_LM",
                "num_virtual_tokens": self.num_virtual_tokens,
                "token_dim": self.token_dim, "num_transformer_submodules": 1,
                "num_attention_heads": _cfg(model, "num_attention_heads"), "num_layers": _cfg(model, "num_hidden_layers"),
                "prompt_tuning_init": "TEXT" if self.init_text and tok_name else "RANDOM",
                "prompt_tuning_init_text": self.init_text, "tokenizer_name_or_path": tok_name, "tokenizer_kwargs": None,
                "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "modules_to_save": None}

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any],
                       _where: str = "lowrank_ext::PromptTuningConfig.from_peft_dict: field") -> PromptTuningConfig:
        """Read PEFT's PROMPT_TUNING adapter_config.json content; every field is checked (adapters/peft_fields.py).
        The init ("TEXT" with its tokenizer) is kept as history only: loading takes the weights from the file."""
        return read_peft_dict(cls, d, _where, peft_fields.PROMPT_TUNING)


def _cfg(model: nn.Module | None, name: str) -> Any:
    return getattr(getattr(model, "config", None), name, None)


# Per-token inputs that describe the real tokens only: PEFT's PeftModelForCausalLM.forward drops them for prompt
# tuning (with a warning) rather than extending them over the virtual tokens; so do we.
_IGNORED_WITH_VIRTUAL_TOKENS = ("position_ids", "token_type_ids")


class PromptTuningModel(nn.Module):
    """A causal LM with trainable virtual tokens in front of every input (the base model frozen).

    `prompt_embeddings[name]` [n, hidden] fp32; attributes the wrapper lacks are read from the base model
    (config, device, get_input_embeddings, ...)."""

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model
        self.prompt_embeddings = nn.ParameterDict()
        self.lowrank_ext_state = AdapterState()
        self.disabled = False  # lowrank_ext.disable_adapters: the base model alone

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self._modules["base_model"], name)

    @property
    def active_prompt(self) -> nn.Parameter:
        return self.prompt_embeddings[self.lowrank_ext_state.active[0]]

    @property
    def num_virtual_tokens(self) -> int:
        return self.active_prompt.shape[0]

    def unwrap(self) -> nn.Module:
        """The base model (its weights untouched)."""
        return self.base_model

    def _extend(self, input_ids, attention_mask, inputs_embeds, labels):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("lowrank_ext::PromptTuningModel.forward: exactly one of input_ids and inputs_embeds must "
                             f"be given, got input_ids={'set' if input_ids is not None else None}, "
                             f"inputs_embeds={'set' if inputs_embeds is not None else None}")
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        b, n = inputs_embeds.shape[0], self.num_virtual_tokens
        prompts = self.active_prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(b, -1, -1)
        inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)               # [B, n + T, hidden]
        if attention_mask is not None:
            ones = attention_mask.new_ones(b, n)
            attention_mask = torch.cat([ones, attention_mask], dim=1)            # [B, n + T]
        if labels is not None:
            labels = torch.cat([labels.new_full((b, n), -100), labels], dim=1)   # virtual tokens: no loss
        return inputs_embeds, attention_mask, labels

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        if kwargs.get("past_key_values") is not None:
            raise ValueError("lowrank_ext::PromptTuningModel.forward: past_key_values must be None (the virtual tokens "
                             "go in front of the whole input; use generate), got a cache")
        if self.disabled or not self.lowrank_ext_state.active:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, **kwargs)
        for arg in _IGNORED_WITH_VIRTUAL_TOKENS:  # as PEFT: dropped with a warning, the model numbers positions
            if kwargs.pop(arg, None) is not None:
                warnings.warn(f"lowrank_ext::PromptTuningModel.forward: {arg} is ignored with prompt tuning, as PEFT "
                              f"ignores it (the virtual tokens shift every position of the input)", UserWarning)
        inputs_embeds, attention_mask, labels = self._extend(input_ids, attention_mask, inputs_embeds, labels)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        """The base model's generate with the virtual tokens in front; returns [input_ids, new tokens]."""
        if input_ids is None:
            raise ValueError("lowrank_ext::PromptTuningModel.generate: input_ids must be given, got None")
        if self.disabled or not self.lowrank_ext_state.active:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs_embeds, attention_mask, _ = self._extend(input_ids, attention_mask, None, None)
        new = self.base_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def _init_from_text(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    tok = config.tokenizer
    if tok is None:
        if config.tokenizer_name_or_path is None:
            raise ValueError("lowrank_ext::inject: PromptTuningConfig.tokenizer or tokenizer_name_or_path must be given "
                             f"with init_text (to turn it into token ids), got neither (init_text={config.init_text!r})")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    ids = list(tok(config.init_text)["input_ids"])
    if not ids:
        raise ValueError(f"lowrank_ext::inject: PromptTuningConfig.init_text must give at least one token, got "
                         f"{config.init_text!r} -> []")
    n = config.num_virtual_tokens
    ids = (ids * math.ceil(n / len(ids)))[:n]                                      # PEFT: cut or repeat to n
    emb = model.get_input_embeddings()
    return emb(torch.tensor(ids, device=emb.weight.device)).detach().float().clone()


def check_prompt_tuning(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> nn.Embedding:
    """Every check inject_prompt_tuning makes (the model is not touched); returns the input embeddings."""
    if isinstance(model, PromptTuningModel):
        raise ValueError("lowrank_ext::inject: model must not already be a PromptTuningModel (one prompt-tuning "  # noqa: TRY004
                         f"adapter per model), got one with adapters {sorted(model.prompt_embeddings)}")
    if get_state(model) is not None:
        raise ValueError("lowrank_ext::inject: model must have no adapters of another method to add prompt tuning, "
                         f"got adapters {sorted(get_state(model).configs)}")
    check_adapter_name(adapter_name)
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError("lowrank_ext::inject: model must have input embeddings (get_input_embeddings() returning an "  # noqa: TRY004
                         f"nn.Embedding) for prompt tuning, got {type(emb).__name__}")
    dim = emb.embedding_dim
    if config.token_dim is not None and config.token_dim != dim:
        raise ValueError(f"lowrank_ext::inject: PromptTuningConfig.token_dim must equal the model's embedding size "
                         f"{dim}, got {config.token_dim}")
    return emb


def inject_prompt_tuning(model: nn.Module, config: PromptTuningConfig, adapter_name: str = "default",
                         from_file: bool = False) -> PromptTuningModel:
    """Wrap `model` (frozen) in a PromptTuningModel holding adapter `adapter_name`; returns the wrapper.
    from_file=True (load_adapter): the virtual tokens are about to be copied from a file, so they start as
    zeros and are never initialised from init_text (no tokenizer is needed or looked up; PEFT loads so too)."""
    emb = check_prompt_tuning(model, config, adapter_name)
    dim = emb.embedding_dim
    if from_file:
        init = torch.zeros(config.num_virtual_tokens, dim, device=emb.weight.device)
    elif config.init_text is not None:
        init = _init_from_text(model, config)
    else:
        init = torch.empty(config.num_virtual_tokens, dim, device=emb.weight.device).normal_()  # nn.Embedding's init
    config = dataclasses.replace(config, token_dim=dim)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapper = PromptTuningModel(model)
    wrapper.prompt_embeddings[adapter_name] = nn.Parameter(init)
    state = wrapper.lowrank_ext_state
    state.configs[adapter_name] = config
    state.active = [adapter_name]
    total = sum(p.numel() for p in wrapper.parameters())
    state.summaries[adapter_name] = InjectSummary(adapter_name, [("", type(model).__name__, "PromptTuningModel")],
                                                  init.numel(), total)
    return wrapper

"""patch_model: swap the fused model ops (lowrank_ext/ops/fused.py) into a transformers Llama, Qwen2, Mistral
or Gemma model, in place; unpatch_model undoes it.

What changes, per module instance (never per class, so other models in the process are untouched):
  decoder layer   forward: input norm = rms_norm; the attention's residual add and the post-attention norm
                  = one add_rms_norm; then h + mlp(...), as the model's own forward computes it
  attention       forward: the model's own forward function, run with `apply_rotary_pos_emb` bound to the fused
                  rope op (a copy of the function with that one global replaced: sliding windows, caches,
                  attention backends stay exactly the model's)
  MLP (silu)      forward: down_proj(swiglu(gate_proj(x), up_proj(x)))   (Gemma's GELU MLP stays as it is)
  other RMSNorms  forward: rms_norm (the final norm)
A patched module carries `_lowrank_ext_fused` (what was patched); its replacement forward is an instance
attribute, so unpatching is `del module.forward`. Patching twice changes nothing. The patch composes with
inject() and the NF4 loaders (the forwards call whatever q_proj, gate_proj, ... the module holds when it
runs), gradient checkpointing (transformers' GradientCheckpointingLayer calls the instance forward) and
torch.compile (plain functions over custom ops with fake kernels). A decoder layer's replacement forward
runs inside transformers' own checkpointing wrapper (_through_class_wrapper).
"""

from __future__ import annotations

import inspect
import types

import torch

from lowrank_ext.ops.fused import add_rms_norm, apply_rotary_pos_emb, rms_norm, swiglu

__all__ = ["FUSED_MODEL_TYPES", "fused_ops_supported", "patch_model", "unpatch_model"]

# config.model_type -> the class-name prefix of its modules
FUSED_MODEL_TYPES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma"}

_MARK = "_lowrank_ext_fused"


def _norm_params(norm: torch.nn.Module) -> tuple[float, float]:
    """(eps, weight_offset) of a transformers RMSNorm: Gemma scales by (1 + weight) and names eps `eps`."""
    if hasattr(norm, "variance_epsilon"):  # LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm: weight · n̂
        return float(norm.variance_epsilon), 0.0
    return float(norm.eps), 1.0  # GemmaRMSNorm: (1 + weight) · n̂


def _rms_norm_forward(self, hidden_states):
    eps, offset = _norm_params(self)
    return rms_norm(hidden_states, self.weight, eps, offset)


def _decoder_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                     position_embeddings=None, **kwargs):
    eps, offset = _norm_params(self.input_layernorm)
    normed = rms_norm(hidden_states, self.input_layernorm.weight, eps, offset)
    attn_out, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    eps, offset = _norm_params(self.post_attention_layernorm)
    # h = hidden_states + attn_out (the residual stream), normed = RMSNorm(h): one pass
    normed, h = add_rms_norm(attn_out, hidden_states, self.post_attention_layernorm.weight, eps, offset)
    return h + self.mlp(normed)


def _swiglu_mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


_ATTENTION_FORWARDS: dict[type, types.FunctionType] = {}


def _fused_attention_forward(cls: type) -> types.FunctionType:
    """cls.forward's own code with its module-global apply_rotary_pos_emb replaced by the fused one."""
    if cls not in _ATTENTION_FORWARDS:
        raw = inspect.unwrap(cls.forward)  # below transformers' deprecate_kwarg wrapper
        if "apply_rotary_pos_emb" not in raw.__code__.co_names:
            raise ValueError(f"lowrank_ext::patch_model: {cls.__name__}.forward must call apply_rotary_pos_emb, "
                             "got a forward that does not (an unknown transformers version?)")
        scope = dict(raw.__globals__, apply_rotary_pos_emb=apply_rotary_pos_emb)
        fn = types.FunctionType(raw.__code__, scope, raw.__name__, raw.__defaults__, raw.__closure__)
        fn.__kwdefaults__ = raw.__kwdefaults__
        _ATTENTION_FORWARDS[cls] = fn
    return _ATTENTION_FORWARDS[cls]


def _through_class_wrapper(cls: type, fn: types.FunctionType) -> types.FunctionType:
    """`fn` run through the wrapper transformers puts around cls.forward, when there is one: since 5.x,
    GradientCheckpointingLayer.__init_subclass__ replaces each layer class's forward by
    `forward_with_checkpointing`, a closure over the original `forward` that runs it under
    self._gradient_checkpointing_func when checkpointing is on. An instance forward would bypass it (and so
    silently turn checkpointing off): this returns a copy of that wrapper whose `forward` cell is `fn`, so
    checkpointing, its cache handling and its outermost-wrapper rule stay transformers' own."""
    wrapper = cls.forward
    code = getattr(wrapper, "__code__", None)
    if code is None or wrapper.__closure__ is None or "forward" not in code.co_freevars:
        return fn  # no wrapper (older transformers checkpoint in __call__, which calls the instance forward)
    cells = tuple(types.CellType(fn) if name == "forward" else cell
                  for name, cell in zip(code.co_freevars, wrapper.__closure__))
    return types.FunctionType(code, wrapper.__globals__, wrapper.__name__, wrapper.__defaults__, cells)


def _class_names(module: torch.nn.Module) -> set[str]:
    # the MRO, so FSDP2's dynamic subclasses (FSDPLlamaDecoderLayer) still match
    return {c.__name__ for c in type(module).__mro__}


def _is_silu(act) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def _set_forward(module: torch.nn.Module, fn, what: str) -> None:
    module.forward = types.MethodType(fn, module)
    setattr(module, _MARK, what)


def _config_of(model: torch.nn.Module):
    for m in model.modules():  # the model itself, or a wrapper's inner transformers model
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            return cfg
    return None


def fused_ops_supported(model: torch.nn.Module) -> bool:
    """Whether patch_model knows this model's family (config.model_type in FUSED_MODEL_TYPES)."""
    return getattr(_config_of(model), "model_type", None) in FUSED_MODEL_TYPES


def patch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the fused RMSNorm(+residual) / rotary / SwiGLU ops into a Llama, Qwen2, Mistral or Gemma model in
    place and return it. Raises ValueError for any other model. Idempotent; undo with unpatch_model."""
    cfg = _config_of(model)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        raise ValueError(
            "lowrank_ext::patch_model: model must be one of "
            + ", ".join(f"{p}ForCausalLM/{p}Model" for p in FUSED_MODEL_TYPES.values())
            + f" (config.model_type {', '.join(FUSED_MODEL_TYPES)}), got {type(model).__name__}"
            + (f" (model_type {model_type!r})" if model_type is not None else "")
        )
    prefix = FUSED_MODEL_TYPES[model_type]
    names = {"decoder": f"{prefix}DecoderLayer", "attention": f"{prefix}Attention", "mlp": f"{prefix}MLP",
             "norm": f"{prefix}RMSNorm"}
    in_layers: set[int] = set()  # norms the decoder forward calls itself
    for module in model.modules():
        if names["decoder"] in _class_names(module):
            in_layers.update(id(n) for n in (module.input_layernorm, module.post_attention_layernorm))
    for module in model.modules():
        if getattr(module, _MARK, None) is not None:
            continue  # patched already
        cls_names = _class_names(module)
        if names["decoder"] in cls_names:
            _set_forward(module, _through_class_wrapper(type(module), _decoder_forward), "decoder")
        elif names["attention"] in cls_names:
            _set_forward(module, _fused_attention_forward(type(module)), "attention")
        elif names["mlp"] in cls_names and _is_silu(module.act_fn):
            _set_forward(module, _swiglu_mlp_forward, "mlp")
        elif names["norm"] in cls_names and id(module) not in in_layers:
            _set_forward(module, _rms_norm_forward, "norm")
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_model: every patched module gets its class's forward back. Returns the model."""
    for module in model.modules():
        if getattr(module, _MARK, None) is not None:
            del module.forward
            delattr(module, _MARK)
    return model

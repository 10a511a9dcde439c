"""The chunked output-head loss is the model's own training objective, or is refused (issue 19, item 2).

Reference: the model's own `model(input_ids, labels=input_ids).loss` and its gradients. MoE causal LMs with
`output_router_logits=True` add `router_aux_loss_coef · load_balancing_loss` to the cross-entropy; the chunked
loss used to drop it (a different objective, different gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import require

from lowrank_ext import LoRAConfig, inject
from lowrank_ext.finetune import memory as M

transformers = require("transformers")

_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
MOE = {  # every family of ROUTER_AUX_LOSS_MODEL_TYPES, tiny
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(**_COMMON, num_local_experts=4)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **_COMMON, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=24)),
    "olmoe": lambda: transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**_COMMON, num_experts=4)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **_COMMON, num_experts=4, moe_intermediate_size=16, head_dim=8)),
}


def _adapted(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = inject(MOE[kind](), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize="nf4"))
    with torch.no_grad():  # B != 0: every adapter parameter gets a gradient
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.train()


def _loss_and_grads(model, ids, loss_fn):
    loss = loss_fn(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _own_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("kind", sorted(MOE))
def test_router_aux_loss_is_part_of_the_chunked_loss(kind, monkeypatch):
    ref = _adapted(kind)
    assert M.ROUTER_AUX_LOSS_MODEL_TYPES == tuple(sorted(MOE)) and ref.config.model_type == kind
    got = copy.deepcopy(ref)
    M.enable_gradient_checkpointing(got)  # as the finetune command runs it
    monkeypatch.setattr(M, "_LOSS_CHUNK", 96 * 5)  # several chunks of 5 rows
    assert M.supports_chunked_loss(got)
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(2))
    l0, g0 = _loss_and_grads(ref, ids, _own_loss)
    l1, g1 = _loss_and_grads(got, ids, M.chunked_lm_loss)
    with torch.no_grad():  # the aux term is really there: the cross-entropy alone is far from the model's loss
        ce = ref(input_ids=ids, labels=ids, output_router_logits=False).loss
    assert abs(float(l0 - ce)) > 0.1
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert sorted(g1) == sorted(g0) and len(g0) == 2 * 2 * 2
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_chunked_loss_without_router_logits_is_the_plain_cross_entropy():
    model = _adapted("mixtral")
    model.config.output_router_logits = False  # the model's own loss is then the cross-entropy alone
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(M.chunked_lm_loss(model, ids), _own_loss(model, ids), rtol=1e-6, atol=1e-6)


def _meta(config_cls, model_cls, **kw):
    with torch.device("meta"):
        return model_cls(config_cls(**kw))


OTHER_OBJECTIVES = {  # forwards that add terms chunked_lm_loss does not reproduce: the model's own loss trains
    "granitemoe router aux": (lambda: _meta(transformers.GraniteMoeConfig, transformers.GraniteMoeForCausalLM,
                                            **{**_COMMON, "num_local_experts": 4}), "router auxiliary loss"),
    "jetmoe router aux": (lambda: _meta(transformers.JetMoeConfig, transformers.JetMoeForCausalLM, vocab_size=96,
                                        hidden_size=32, num_hidden_layers=1, output_router_logits=True),
                          "router auxiliary loss"),
    "custom loss function": (lambda: _custom_loss_llama(), "its own loss function"),
}


def _custom_loss_llama():
    model = _meta(transformers.LlamaConfig, transformers.LlamaForCausalLM, vocab_size=96, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()
    return model


@pytest.mark.parametrize("case", sorted(OTHER_OBJECTIVES))
def test_other_objectives_are_refused(case):
    build, why = OTHER_OBJECTIVES[case]
    model = build()
    assert not M.supports_chunked_loss(model)
    with pytest.raises(ValueError, match=rf"lowrank_ext::chunked_lm_loss: model must be a causal LM whose loss is "
                                         rf"the cross-entropy of its output head .*{why}"):
        M.chunked_lm_loss(model, torch.zeros(1, 4, dtype=torch.long))


def test_z_loss_is_refused():
    cfg = transformers.BambaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                                   z_loss_coefficient=1e-3)
    with torch.device("meta"):
        model = transformers.BambaForCausalLM(cfg)
    assert M.chunked_loss_blocker(model) == "its forward adds a z-loss (config.z_loss_coefficient = 0.001)"
    cfg.z_loss_coefficient = 0.0
    assert M.chunked_loss_blocker(model) is None

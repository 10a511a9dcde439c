"""The one target rule (lowrank_ext/adapters/targets.py) against PEFT's own selection, through every entry point
that selects targets: the injector (LoRA), IA3, BitFit (add_bias_to / bias_patterns) and rank allocation.

The reference is what PEFT itself adapts: peft.inject_adapter_in_model on a fresh copy of the same tiny model,
then the names of the modules that became PEFT tuner layers.
"""

from __future__ import annotations

import pytest
import torch

import lowrank_ext as L
from lowrank_ext.adapters.bitfit import plan_bitfit
from lowrank_ext.adapters.ia3 import plan_ia3
from lowrank_ext.adapters.injector import target_names
from lowrank_ext.adapters.targets import select_targets
from lowrank_ext.finetune.rank_allocation import allocate_ranks, match_targets

peft = pytest.importorskip("peft")
from _tiny_models import tiny_gpt2, tiny_llama  # noqa: E402

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}

# (model, target_modules, exclude_modules, modules_to_save)
CASES = [
    ("llama", ["q_proj", "v_proj"], None, None),
    ("llama", r".*\.(q|k)_proj", None, None),
    ("llama", "all-linear", None, None),
    ("llama", "ALL-LINEAR", ["down_proj"], None),
    ("llama", ["mlp.down_proj", "o_proj", "self_attn.k_proj"], r".*layers\.1\..*", None),
    ("llama", ["q_proj", "lm_head"], None, ["lm_head"]),
    ("llama", "all-linear", None, ["gate_proj"]),
    ("llama", ["model.layers.0.mlp.up_proj", "layers.1.self_attn.o_proj"], ["model.layers.0.mlp.up_proj"], None),
    ("gpt2", ["c_attn", "c_proj"], None, None),
    ("gpt2", ["attn.c_proj"], None, None),
    ("gpt2", "all-linear", None, None),
    ("gpt2", "all-linear", ["c_fc"], None),
    ("gpt2", r"transformer\.h\.0\.(attn|mlp)\.c_.*", None, None),
    ("gpt2", ["c_fc", "c_proj"], r".*\.attn\..*", None),
]
IDS = [f"{m}-{t}-{e}-{s}" for m, t, e, s in CASES]


def peft_selection(kind: str, peft_config) -> list[str]:
    """The module names PEFT itself adapts for `peft_config` on a fresh tiny model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = peft.inject_adapter_in_model(peft_config, MODELS[kind](0))
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def lora_reference(kind, targets, exclude, mts) -> list[str]:
    return peft_selection(kind, peft.LoraConfig(r=2, target_modules=targets, exclude_modules=exclude,
                                                modules_to_save=mts))


@pytest.mark.parametrize(("kind", "targets", "exclude", "mts"), CASES, ids=IDS)
def test_injector_selects_what_peft_selects(kind, targets, exclude, mts):
    want = lora_reference(kind, targets, exclude, mts)
    assert want  # every case selects something in PEFT
    config = L.LoRAConfig(r=2, target_modules=targets, exclude_modules=exclude, modules_to_save=mts)
    assert target_names(MODELS[kind](0), config) == want
    model = L.inject(MODELS[kind](0), config)
    assert [n for n, _, _ in L.inject_summary(model).replaced] == want


@pytest.mark.parametrize(("kind", "targets", "exclude", "mts"), [c for c in CASES if c[3] is None],
                         ids=[i for i, c in zip(IDS, CASES) if c[3] is None])
def test_ia3_selects_what_peft_selects(kind, targets, exclude, mts):
    want = peft_selection(kind, peft.IA3Config(target_modules=targets, exclude_modules=exclude,
                                               feedforward_modules=[]))
    plan = plan_ia3(MODELS[kind](0), L.IA3Config(target_modules=targets, exclude_modules=exclude))
    assert plan.targets == want


@pytest.mark.parametrize(("kind", "targets", "exclude", "mts"), [c for c in CASES if c[2] is None and c[3] is None],
                         ids=[i for i, c in zip(IDS, CASES) if c[2] is None and c[3] is None])
def test_bitfit_selects_what_peft_selects(kind, targets, exclude, mts):
    """Llama's linears have no bias: add_bias_to picks them (the rule); GPT-2's Conv1Ds all have one:
    bias_patterns picks the biases that train by the same rule (a regex / list; "all-linear" is add_bias_to's)."""
    want = lora_reference(kind, targets, None, None)
    model = MODELS[kind](0)
    if kind == "llama":
        assert plan_bitfit(model, L.BitFitConfig(add_bias_to=targets)).add == want
    elif targets != "all-linear":
        assert plan_bitfit(model, L.BitFitConfig(bias_patterns=targets)).train == want


@pytest.mark.parametrize(("kind", "targets", "exclude", "mts"), [c for c in CASES if c[3] is None],
                         ids=[i for i, c in zip(IDS, CASES) if c[3] is None])
def test_rank_allocation_selects_what_peft_selects(kind, targets, exclude, mts):
    want = lora_reference(kind, targets, exclude, None)
    model = MODELS[kind](0)
    assert match_targets(model, targets, exclude) == want
    if exclude is None:  # finetune's "target weights" figure counts these (GPT-2: 0.0 MiB before)
        from lowrank_ext.finetune.backends import target_names as finetune_target_names

        assert finetune_target_names(model, targets) == want
    config = L.LoRAConfig(r=2, target_modules=targets, exclude_modules=exclude)
    batch = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    ranks = allocate_ranks(model, [batch], budget=10**6, config=config, min_rank=1, max_rank=4)
    assert list(ranks) == want  # GPT-2's Conv1D included (nn.Linear only before)


def test_rank_allocation_shapes_of_conv1d_are_out_in():
    """A Conv1D stores [in, out]; rank allocation's shapes are (out, in), as for nn.Linear (c_fc: 64 -> 256)."""
    model = tiny_gpt2(0)
    batch = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    budget = 4 * (64 + 256)  # exactly rank 4 on c_fc of layer 0 only
    ranks = allocate_ranks(model, [batch], budget, target_modules=["transformer.h.0.mlp.c_fc"], min_rank=4,
                           max_rank=4)
    assert ranks == {"transformer.h.0.mlp.c_fc": 4}


def test_non_linear_module_selected_is_refused_not_skipped():
    """PEFT adapts an Embedding it is given (LoRA Embedding layer); we cannot: refused, never silently skipped."""
    assert "model.embed_tokens" in lora_reference("llama", ["q_proj", "embed_tokens"], None, None)
    for fn in (lambda m: L.inject(m, L.LoRAConfig(target_modules=["q_proj", "embed_tokens"])),
               lambda m: L.inject(m, L.IA3Config(target_modules=["q_proj", "embed_tokens"]))):
        with pytest.raises(ValueError, match=r"lowrank_ext::inject: target_modules must select only linear modules "
                                             r".*got 'model.embed_tokens' \(Embedding\)"):
            fn(tiny_llama(0))
    with pytest.raises(ValueError, match=r"lowrank_ext::allocate_ranks: target_modules must select only linear "
                                         r"modules .*got 'model.norm' \(LlamaRMSNorm\)"):
        match_targets(tiny_llama(0), ["q_proj", "norm"])
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: target_modules must be a list of names, a regex or "
                                         r"'all-linear', got None"):
        select_targets(tiny_llama(0), None)


def test_containers_selected_by_a_list_entry_are_skipped():
    """nn.Sequential children are named "0", "1", ...: ["0"] names the block and its first linear alike; the
    block (no weight of its own) is skipped, its linear adapted (PEFT would refuse the block)."""
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), torch.nn.Linear(4, 2))
    assert select_targets(model, ["0"]) == ["0.0"]


def test_all_linear_keeps_the_head_of_a_plain_module():
    """PEFT leaves out the output head only for a transformers PreTrainedModel (get_output_embeddings)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.lm_head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

        def get_output_embeddings(self):
            return self.lm_head

    net = Net()
    want = [n for n, m in peft.inject_adapter_in_model(peft.LoraConfig(target_modules="all-linear"), Net()
                                                       ).named_modules() if hasattr(m, "lora_A")]
    assert select_targets(net, "all-linear") == want == ["body", "lm_head"]


def test_lora_config_matches_is_the_same_rule():
    c = L.LoRAConfig(target_modules=["q_proj"], exclude_modules=r".*layers\.1\..*")
    assert c.matches("model.layers.0.self_attn.q_proj") and not c.matches("model.layers.1.self_attn.q_proj")
    assert not c.matches("model.layers.0.self_attn.xq_proj")  # "." + entry, not a plain suffix
    assert not L.LoRAConfig(target_modules="all-linear").matches("all-linear")  # needs the model


# ------------------------------------------------------------------------------ IA3 feedforward_modules (defect 10)
FF_CASES = [
    ("llama", r".*\.(k_proj|v_proj|down_proj|up_proj)", ["n_proj"]),  # PEFT: a plain suffix -> down_proj
    ("llama", r".*\.(k_proj|v_proj|down_proj|up_proj)", ["proj"]),    # every target
    ("llama", ["k_proj", "down_proj"], ["down_proj"]),
    ("llama", "all-linear", r".*\.mlp\..*"),
    ("gpt2", r".*\.c_(attn|proj|fc)", ["proj"]),
    ("gpt2", ["c_attn", "c_proj"], ["c_proj"]),
    ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
]


@pytest.mark.parametrize(("kind", "targets", "ff"), FF_CASES, ids=[f"{k}-{t}-{f}" for k, t, f in FF_CASES])
def test_ia3_feedforward_modules_follow_peft(kind, targets, ff):
    """Which targets scale their input: PEFT's IA3 layers' is_feedforward, module by module, and the same
    logits once both hold the same (random) scaling vectors."""
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    theirs = peft.inject_adapter_in_model(peft.IA3Config(target_modules=targets, feedforward_modules=ff),
                                          MODELS[kind](0))
    want = {n: m.is_feedforward for n, m in theirs.named_modules() if hasattr(m, "ia3_l")}
    ours = L.inject(MODELS[kind](0), L.IA3Config(target_modules=targets, feedforward_modules=ff))
    got = {n: m.is_feedforward for n, m in ours.named_modules() if hasattr(m, "ia3_l")}
    assert got == want and any(want.values())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, m in theirs.named_modules():
            if hasattr(m, "ia3_l"):
                v = 1 + 0.5 * torch.randn(m.ia3_l["default"].shape, generator=g)
                m.ia3_l["default"].copy_(v)
                ours.get_submodule(n).ia3_l["default"].copy_(v)  # a shape error if the layouts differ
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mts", [["norm"], ["head"], ["lm_head"], ["model.norm"]])
def test_modules_to_save_follow_peft(mts):
    """PEFT wraps every module whose name ends with an entry as a plain string (["norm"]: all the layer norms,
    not only model.norm); the trainable counts then agree too."""
    from peft.utils.other import ModulesToSaveWrapper

    theirs = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=mts))
    want = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
            if isinstance(m, ModulesToSaveWrapper)]
    ours = L.inject(tiny_llama(0), L.LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=mts))
    assert [n for n, m in ours.named_modules() if isinstance(m, L.adapters.state.ModulesToSave)] == want
    assert L.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


def test_rank_allocation_needs_dense_weights():
    """An NF4 linear is still a target by the rule; ranks need the dense weight's gradient: a clear error."""
    qmodel = tiny_llama(0)
    qmodel.model.layers[0].self_attn.q_proj = L.nn.Linear4bit(
        L.quantize_nf4(qmodel.model.layers[0].self_attn.q_proj.weight.detach()))
    assert "model.layers.0.self_attn.q_proj" in match_targets(qmodel, ["q_proj"])  # still a target (a linear)
    batch = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"lowrank_ext::allocate_ranks: target weights must be dense floating-point "
                                         r"parameters .*got 'model.layers.0.self_attn.q_proj' \(Linear4bit\)"):
        allocate_ranks(qmodel, [batch], 10**6, target_modules=["q_proj"])

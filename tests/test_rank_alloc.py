"""Rank allocation by gradient sensitivity (lowrank_ext.allocate_ranks).

References: gradients recomputed independently in float64 with torch.autograd.grad; the greedy
allocation checked against exhaustive search on small cases; the budget against Σ r·(in+out)."""

import itertools

import pytest
import torch
from conftest import require

import lowrank_ext
from lowrank_ext.finetune.rank_allocation import (
    allocate_from_spectra,
    gradient_spectra,
    lora_param_count,
    match_targets,
)

transformers = require("transformers")


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_budget_met_and_ranks_differ():
    model = tiny_llama()
    names = match_targets(model, TARGETS)
    assert len(names) == 14
    shapes = {n: tuple(dict(model.named_modules())[n].weight.shape) for n in names}
    uniform = lora_param_count(shapes, {n: 8 for n in names})
    pattern = lowrank_ext.allocate_ranks(model, batches(), uniform, target_modules=TARGETS, max_rank=32)
    assert set(pattern) == set(names)
    cost = lora_param_count(shapes, pattern)
    assert cost <= uniform
    # no further step of rank_step=2 fits: the budget is used up to less than the cheapest step
    assert uniform - cost < 2 * min(sum(s) for s in shapes.values())
    assert len(set(pattern.values())) > 1
    assert all(r % 2 == 0 and 2 <= r <= 32 for r in pattern.values())


def test_config_object_and_all_linear():
    model = tiny_llama()

    class Cfg:
        target_modules = "all-linear"

    pattern = lowrank_ext.allocate_ranks(model, batches(1), 3000, Cfg())
    assert "lm_head" not in pattern and len(pattern) == 14


def test_spectra_match_independent_float64_gradients():
    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    bs = batches(2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = gradient_spectra(model, bs, names)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}  # flags restored
    ref = tiny_llama().double()
    ws = [dict(ref.named_modules())[n].weight for n in names]
    grads = [torch.zeros_like(w) for w in ws]
    for b in bs:
        loss = ref(input_ids=b, labels=b).loss
        for acc, g in zip(grads, torch.autograd.grad(loss, ws)):
            acc += g / len(bs)
    for n, g in zip(names, grads):
        torch.testing.assert_close(got[n].double(), torch.linalg.svdvals(g), rtol=1e-3, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_insensitive_module_gets_the_minimum():
    class TwoBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(16, 16)
            self.unused = torch.nn.Linear(16, 16)

        def forward(self, input_ids, labels=None):
            x = torch.nn.functional.one_hot(input_ids % 16, 16).float()
            y = self.used(x) + 0.0 * self.unused(x)
            return type("Out", (), {"loss": (y ** 2).mean()})()

    pattern = lowrank_ext.allocate_ranks(TwoBranch(), batches(), budget=16 * 32, target_modules=["used", "unused"],
                                         min_rank=2, max_rank=16)
    assert pattern == {"used": 14, "unused": 2}  # all spare budget to the module the loss depends on


@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_is_optimal_against_exhaustive_search(power, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (8, 6), "b": (10, 4), "c": (6, 6)}
    spectra = {n: torch.rand(min(s), generator=g).sort(descending=True).values * (i + 1)
               for i, (n, s) in enumerate(shapes.items())}
    budget = 190
    got = allocate_from_spectra(spectra, shapes, budget, min_rank=1, max_rank=6, rank_step=1, power=power)

    def gain(ranks):
        return sum(float(spectra[n][:r].pow(power).sum()) for n, r in ranks.items())

    best = max((dict(zip(shapes, rs)) for rs in itertools.product(*[range(1, min(s) + 1) for s in shapes.values()])
                if lora_param_count(shapes, dict(zip(shapes, rs))) <= budget), key=gain)
    assert lora_param_count(shapes, got) <= budget
    # greedy on a concave separable objective with unequal step costs is optimal up to one step's gain
    # (the knapsack remainder): a step gains at most max_n σ_n,1^p
    one_step = max(float(spectra[n][0]) ** power for n in shapes)
    assert gain(best) - one_step <= gain(got) <= gain(best) + 1e-9


def _check_guarantee(spectra, shapes, budget, min_rank, max_rank, rank_step):
    """The module docstring's guarantee, term by term."""
    got = allocate_from_spectra(spectra, shapes, budget, min_rank=min_rank, max_rank=max_rank, rank_step=rank_step)
    caps = {n: min(max_rank, *s) for n, s in shapes.items()}
    cost = lora_param_count(shapes, got)
    assert cost <= budget
    assert all(min(min_rank, *shapes[n]) <= r <= caps[n] for n, r in got.items())
    below = [sum(shapes[n]) for n in shapes if got[n] < caps[n]]
    if below:  # not even one more rank fits on any module below its cap
        assert budget - cost < min(below), (budget - cost, min(below))
    # the final pass adds fewer than rank_step single ranks to any module; without it, every rank is on
    # the step grid and the leftover is only below one (possibly truncated) step of each open module
    coarse = allocate_from_spectra(spectra, shapes, budget, min_rank=min_rank, max_rank=max_rank,
                                   rank_step=rank_step, final_pass=False)
    assert all(0 <= got[n] - coarse[n] < rank_step for n in shapes)
    coarse_cost = lora_param_count(shapes, coarse)
    for n, s in shapes.items():
        start = min(min_rank, *s)
        assert coarse[n] == caps[n] or (coarse[n] - start) % rank_step == 0
        if coarse[n] < caps[n]:
            assert budget - coarse_cost < min(rank_step, caps[n] - coarse[n]) * sum(s)
    return got, cost


@pytest.mark.parametrize("seed", range(40))
def test_leftover_guarantee_on_random_cases(seed):
    """Random shapes, spectra, steps, caps and budgets (seeded): the exact guarantee of the docstring,
    in particular when cheap modules hit max_rank and the coarse steps of the rest no longer fit."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    shapes = {f"m{i}": (randint(4, 300), randint(4, 300)) for i in range(randint(1, 12))}
    spectra = {n: torch.rand(min(s), generator=g).pow(randint(1, 4)).sort(descending=True).values
               for n, s in shapes.items()}
    rank_step, min_rank = randint(1, 8), randint(1, 4)
    max_rank = randint(min_rank, 64)
    floor = lora_param_count(shapes, {n: min(min_rank, *s) for n, s in shapes.items()})
    full = lora_param_count(shapes, {n: min(max_rank, *s) for n, s in shapes.items()})
    budget = floor + randint(0, int(1.2 * (full - floor)) + 1)  # sometimes more than every cap can use
    _, cost = _check_guarantee(spectra, shapes, budget, min_rank, max_rank, rank_step)
    if budget >= full:
        assert cost == full  # everything at its cap


def test_leftover_is_spent_when_cheap_modules_are_capped():
    # the old greedy stopped here with 2303 parameters unspent (three more ranks of "wide"): the cheap
    # module was at max_rank and one step (rank_step=4) of the wide one, 2400, did not fit
    shapes = {"cheap": (8, 8), "wide": (300, 300)}
    spectra = {"cheap": torch.ones(8), "wide": torch.linspace(1, 0.1, 300)}
    budget = 2 * 16 + 2 * 600 + 3 * 600 + 599
    got, cost = _check_guarantee(spectra, shapes, budget, min_rank=2, max_rank=8, rank_step=4)
    assert got == {"cheap": 8, "wide": 5} and budget - cost < 600


def test_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"lowrank_ext::allocate_ranks: budget must be >= 2048 \(min_rank=2 on 14 "
                                         r"modules\), got 100"):
        lowrank_ext.allocate_ranks(model, batches(), 100, target_modules=TARGETS)
    with pytest.raises(ValueError, match=r"target_modules must match linear modules of the model, got \['nope'\]"):
        lowrank_ext.allocate_ranks(model, batches(), 10**6, target_modules=["nope"])
    with pytest.raises(ValueError, match="config must have target_modules"):
        lowrank_ext.allocate_ranks(model, batches(), 10**6, None)
    with pytest.raises(ValueError, match="batches must hold at least one batch, got none"):
        lowrank_ext.allocate_ranks(model, [], 10**6, target_modules=TARGETS)
    with pytest.raises(ValueError, match="ranks must satisfy 1 <= min_rank <= max_rank"):
        lowrank_ext.allocate_ranks(model, batches(), 10**6, target_modules=TARGETS, min_rank=8, max_rank=4)

"""Rank allocation by gradient sensitivity: which modules deserve a higher LoRA rank.

`allocate_ranks(model, batches, budget, config)` runs a few batches through the dense model,
accumulates each target weight's gradient G_m = Σ_batches ∂L/∂W_m  [out, in], and takes its singular
values σ_1 ≥ σ_2 ≥ ... A rank-r LoRA update ΔW = B·A can follow at best the top-r singular
directions of G, so the first-order loss decrease it can buy is

    gain_m(r) = Σ_{i ≤ r} σ_i^p            (p = `power`; p = 2: the gradient energy captured)

while it costs r·(in_m + out_m) trainable parameters. Both are separable across modules and each
gain is concave in r (σ sorted), so handing out ranks greedily — always to the module whose next
`rank_step` ranks buy the most gain per parameter — gives the best total gain within the budget:

    start every module at min(min_rank, out, in); repeat: pick m maximizing
    Σ_{next step} σ_i^p / (step·(in+out)) among the steps that still fit, until none fits;
    then a final pass with steps of one rank (same rule, step = 1) over the modules still below
    their cap min(max_rank, out, in), which spends what the coarse steps leave over.

The default p = 1 (nuclear-norm gain) spreads ranks more evenly than p = 2, whose gradient energy is
dominated by a handful of modules on small batches. Returns a PEFT-style `rank_pattern`
{module name: rank}. The guarantee, exactly (cost = Σ r_m·(in_m+out_m), cap_m = min(max_rank, out_m, in_m)):

    cost <= budget, every r_m in [min(min_rank, out_m, in_m), cap_m], and either every module is at
    its cap (the rest of the budget cannot be spent within max_rank), or
    budget - cost < min{in_m + out_m : r_m < cap_m}  (not even one more rank fits anywhere).

Ranks move in steps of `rank_step` (e.g. multiples of 8 for tensor cores) until no such step fits;
the final pass gives any module fewer than `rank_step` single ranks (a whole step of them would have
fitted before it). `final_pass=False` skips it: every rank then stays on the grid (start + k·rank_step,
or the cap) and the leftover is only bounded by budget - cost < min{step_m·(in_m + out_m) : r_m < cap_m},
step_m = min(rank_step, cap_m - r_m).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from lowrank_ext.adapters.targets import is_linear_like, select_targets
from lowrank_ext.nn import ADAPTER_LAYERS, IA3_LAYERS
from lowrank_ext.nn.layout import linear_in_out

__all__ = ["allocate_from_spectra", "allocate_ranks", "gradient_spectra", "lora_param_count", "match_targets"]


def match_targets(model: torch.nn.Module, target_modules: str | Sequence[str],
                  exclude_modules: str | Sequence[str] | None = None) -> list[str]:
    """Names of the base linear modules (nn.Linear, transformers' Conv1D, a 4-bit linear) a LoRA `target_modules`
    selects, by the one target rule (adapters/targets.py, PEFT's): a list of names / dotted suffixes, a regex
    string (full match), or "all-linear" (every linear module except the output head)."""
    return select_targets(model, target_modules, exclude_modules, accept=_base_linear, op="allocate_ranks")


def _base_linear(m: torch.nn.Module) -> bool:
    """A linear module of the base model (not an adapter layer wrapping one)."""
    return is_linear_like(m) and not isinstance(m, (*ADAPTER_LAYERS, *IA3_LAYERS))


def lora_param_count(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    """Trainable LoRA parameters: Σ r_m · (in_m + out_m) for weights of shape (out, in)."""
    return sum(ranks[n] * (shapes[n][0] + shapes[n][1]) for n in ranks)


def _default_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def gradient_spectra(model: torch.nn.Module, batches: Iterable[torch.Tensor], names: Sequence[str],
                     loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = _default_loss
                     ) -> dict[str, torch.Tensor]:
    """Singular values (descending, fp32, on the CPU) of each named module's accumulated weight gradient.
    Only those weights get gradients; the model's requires_grad flags and mode are restored."""
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    weights = {n: modules[n].weight for n in names}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        model.eval()  # no dropout: sensitivity of the model as it is
        device = next(iter(weights.values())).device
        count = 0
        for batch in batches:
            loss_fn(model, batch.to(device)).backward()
            count += 1
        if count == 0:
            raise ValueError("lowrank_ext::allocate_ranks: batches must hold at least one batch, got none")
        spectra = {}
        for n, w in weights.items():
            g = w.grad.detach().float().cpu() / count
            spectra[n] = torch.linalg.svdvals(g)
            w.grad = None
        return spectra
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def allocate_ranks(model: torch.nn.Module, batches: Iterable[torch.Tensor], budget: int, config: object = None, *,
                   target_modules: str | Sequence[str] | None = None, min_rank: int = 2, max_rank: int = 64,
                   rank_step: int = 2, power: float = 1.0,
                   loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = _default_loss) -> dict[str, int]:
    """A `rank_pattern` {module name: rank} for the target modules of a dense model, by gradient
    sensitivity, with Σ r·(in+out) <= budget.

    config: any object with `target_modules` (e.g. lowrank_ext.LoRAConfig or peft.LoraConfig); or pass
    `target_modules` directly. Ranks lie in [min_rank, max_rank] (clipped to each weight's smaller side)
    and move in steps of `rank_step`, plus a final pass of single ranks that spends the leftover (the
    module docstring states the guarantee exactly)."""
    targets = target_modules if target_modules is not None else getattr(config, "target_modules", None)
    if targets is None:
        raise ValueError("lowrank_ext::allocate_ranks: config must have target_modules (or pass target_modules=), "
                         "got None")
    if isinstance(targets, set):
        targets = sorted(targets)
    if not (1 <= min_rank <= max_rank) or rank_step < 1:
        raise ValueError(f"lowrank_ext::allocate_ranks: ranks must satisfy 1 <= min_rank <= max_rank and rank_step >= 1, "
                         f"got min_rank={min_rank}, max_rank={max_rank}, rank_step={rank_step}")
    exclude = getattr(config, "exclude_modules", None) if target_modules is None else None
    names = match_targets(model, targets, exclude)
    if not names:
        raise ValueError(f"lowrank_ext::allocate_ranks: target_modules must match linear modules of the model, "
                         f"got {targets!r} matching none")
    modules = dict(model.named_modules())
    for n in names:  # the gradient of a dense weight is what ranks are allocated by
        w = getattr(modules[n], "weight", None)
        if not isinstance(w, torch.nn.Parameter) or not w.is_floating_point():
            raise ValueError(f"lowrank_ext::allocate_ranks: target weights must be dense floating-point parameters "
                             f"(allocate on the dense model), got {n!r} ({type(modules[n]).__name__})")
    shapes = {n: linear_in_out(modules[n])[::-1] for n in names}  # (out, in); a Conv1D stores [in, out]
    ranks = {n: min(min_rank, *shapes[n]) for n in names}
    floor = lora_param_count(shapes, ranks)
    if budget < floor:
        raise ValueError(f"lowrank_ext::allocate_ranks: budget must be >= {floor} (min_rank={min_rank} on "
                         f"{len(names)} modules), got {budget}")
    spectra = gradient_spectra(model, batches, names, loss_fn)
    return allocate_from_spectra(spectra, shapes, budget, min_rank=min_rank, max_rank=max_rank,
                                 rank_step=rank_step, power=power)


def allocate_from_spectra(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int, *,
                          min_rank: int = 2, max_rank: int = 64, rank_step: int = 2,
                          power: float = 1.0, final_pass: bool = True) -> dict[str, int]:
    """The greedy allocation of the module docstring, given each module's gradient singular values
    (descending) and weight shape (out, in)."""
    names = list(shapes)
    ranks = {n: min(min_rank, *shapes[n]) for n in names}
    left = budget - lora_param_count(shapes, ranks)
    if left < 0:
        raise ValueError(f"lowrank_ext::allocate_ranks: budget must be >= {budget - left} (min_rank={min_rank} on "
                         f"{len(names)} modules), got {budget}")
    gains = {n: spectra[n].double().clamp_min(0).pow(power) for n in names}  # σ_i^p; ranks past len(σ) gain 0

    def spend(step_size: int, left: int) -> int:
        # greedy: the step with the best gain per parameter among those that fit, until none fits
        while True:
            best, best_score, best_step = None, -1.0, 0
            for n in names:
                step, cost = min(step_size, caps[n] - ranks[n]), sum(shapes[n])
                if step <= 0 or step * cost > left:
                    continue
                score = float(gains[n][ranks[n]:ranks[n] + step].sum()) / (step * cost)
                if score > best_score:
                    best, best_score, best_step = n, score, step
            if best is None:
                return left
            ranks[best] += best_step
            left -= best_step * sum(shapes[best])

    caps = {n: min(max_rank, *shapes[n]) for n in names}
    left = spend(rank_step, left)
    if final_pass and rank_step > 1:
        spend(1, left)  # the final pass: single ranks on the modules below their cap
    return ranks

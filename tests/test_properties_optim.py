"""Property tests of the fused AdamW ops (hypothesis; see tests/_properties.py): adamw_step (fp32 state) and
adamw8bit_step (8-bit blockwise state, dynamic and random sorted maps) on params of 1..300 x 1..300
elements in fp32/fp16/bf16 with random hyperparameters, against lowrank_ext._reference.optim.

Tolerance: a few fp32 ulps at the magnitudes each quantity rounds at (fp32 params); one ulp of the param
dtype (fp16/bf16: one rounding of nearly the same fp32 value, tighter than 2x PyTorch's own bf16 error);
8-bit codes equal or, where the value sits within rounding of a midpoint, the neighbour."""

from __future__ import annotations

import pytest
import torch
from _properties import EPS, LOW, SEEDS, gen, props
from hypothesis import given
from hypothesis import strategies as st

from lowrank_ext._reference.optim import adamw8bit_step_ref, adamw_step_ref, optim_maps
from lowrank_ext.ops import adamw8bit_step, adamw_step


# ---------------------------------------------------------------------------------------------------
# AdamW: fp32 state and 8-bit blockwise state vs the plain-PyTorch reference
# ---------------------------------------------------------------------------------------------------
@st.composite
def adam_hyper(draw):
    return {"lr": draw(st.sampled_from([1e-5, 1e-3, 2e-2, 0.3])),
            "beta1": draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])),
            "beta2": draw(st.sampled_from([0.0, 0.9, 0.999, 0.9999])),
            "eps": draw(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3])),
            "weight_decay": draw(st.sampled_from([0.0, 1e-2, 0.5])),
            "step": draw(st.integers(1, 5000))}


def _ulps_apart(ours: torch.Tensor, ref: torch.Tensor, ulps: float, scale: torch.Tensor | None = None) -> None:
    """|ours - ref| <= ulps · eps(dtype) · max(|ref|, scale) elementwise (NaN where ref is NaN)."""
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    mag = ref.double().abs() if scale is None else torch.maximum(ref.double().abs(), scale.double())
    err = (ours.double() - ref.double()).abs()
    bound = ulps * EPS[ours.dtype] * mag + 1e-37
    bad = ok & (err > bound)
    assert not bool(bad.any()), f"{int(bad.sum())} elements; worst {float((err / bound)[ok].max()):.3g}x the bound"


def _step_scale(p_before: torch.Tensor, p_after: torch.Tensor) -> torch.Tensor:
    """Per element: |p| + |the step taken|, the magnitudes an fp32 update rounds at."""
    return p_before.double().abs() + (p_after.double() - p_before.double()).abs()


@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(LOW), adam_hyper(), st.integers(*SEEDS))
@props(100)
def test_adamw_step_matches_reference(rows, cols, dtype, hyper, seed):
    g = gen(seed)
    p = (torch.randn(rows, cols, generator=g) * 0.1).to(dtype)
    grad = (torch.randn(rows, cols, generator=g) * 10.0 ** float(torch.randint(-6, 1, (1,), generator=g))).to(dtype)
    m = torch.randn(rows, cols, generator=g) * 1e-3
    v = torch.rand(rows, cols, generator=g) * 1e-6
    p_before, m_before, v_before = p.clone(), m.clone(), v.clone()
    ref = [t.clone() for t in (p, grad, m, v)]
    step = hyper.pop("step")
    adamw_step(p, grad, m, v, step=step, **hyper)
    adamw_step_ref(*ref, step=step, **hyper)
    # m = m + (1-β1)(g - m) rounds at |m| and |g|; v at |v| and g² (torch's lerp picks another formula for
    # weights >= 0.5: the two agree to those ulps, not bit for bit)
    _ulps_apart(m, ref[2], 4, scale=torch.maximum(m_before.abs(), grad.float().abs()))
    _ulps_apart(v, ref[3], 4, scale=torch.maximum(v_before, grad.float().pow(2)))
    # the param: a few fp32 ulps of |p| and of the step; fp16/bf16: one rounding of (nearly) the same fp32
    # value, so at most one ulp of the param dtype apart
    _ulps_apart(p, ref[0], 8 if dtype == torch.float32 else 1, scale=_step_scale(p_before, ref[0]))


def _check_8bit_codes(ours: torch.Tensor, theirs: torch.Tensor, scaled: torch.Tensor, qmap: torch.Tensor) -> None:
    """Codes equal, or neighbours where the reference's fp32 value m/absmax sits within float rounding of
    the midpoint between them (the kernel's m differs from the reference's in the last ulp)."""
    ours, theirs, scaled = ours.reshape(-1).long(), theirs.reshape(-1).long(), scaled.reshape(-1)
    diff = ours != theirs
    if not bool(diff.any()):
        return
    assert int((ours - theirs).abs().max()) == 1
    lo = torch.minimum(ours, theirs)[diff]
    mid = (qmap[lo] + qmap[lo + 1]) * 0.5
    near = (scaled[diff].double() - mid.double()).abs() <= 8 * EPS[torch.float32] * scaled[diff].double().abs() + 1e-30
    assert bool(near.all()), (scaled[diff][~near], mid[~near])


@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(LOW), adam_hyper(),
       st.sampled_from(["dynamic", "random"]), st.integers(*SEEDS))
@props(100)
def test_adamw8bit_step_matches_reference(rows, cols, dtype, hyper, maps, seed):
    g = gen(seed)
    n = rows * cols
    nb = -(-n // 256)
    q1, q2 = optim_maps()
    if maps == "random":  # arbitrary sorted maps: the kernel's fast code lookup must stay exact off the dynamic map
        q1 = torch.cat([torch.rand(254, generator=g) * 2 - 1, torch.tensor([0.0, 1.0])]).sort().values
        q2 = torch.cat([torch.rand(254, generator=g) ** 4, torch.tensor([0.0, 1.0])]).sort().values
    p = (torch.randn(rows, cols, generator=g) * 0.1).to(dtype)
    grad = (torch.randn(rows, cols, generator=g) * 1e-2).to(dtype)
    s1 = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    s2 = torch.randint(128, 256, (rows, cols), generator=g, dtype=torch.uint8)
    a1, a2 = torch.rand(nb, generator=g) * 1e-2, torch.rand(nb, generator=g) * 1e-4
    a1[torch.rand(nb, generator=g) < 0.1] = 0.0  # some all-zero first-moment blocks
    p_before = p.clone()
    ref = [t.clone() for t in (p, grad, s1, s2, a1, a2)]
    step = hyper.pop("step")
    # the reference's fp32 moments after the update (what it requantizes), for the code check below
    m = q1[s1.reshape(-1).long()] * a1.repeat_interleave(256)[:n]
    v = q2[s2.reshape(-1).long()] * a2.repeat_interleave(256)[:n]
    adamw_step_ref(p.reshape(-1).clone(), grad.reshape(-1), m, v, step=step, **hyper)
    adamw8bit_step(p, grad, s1, s2, a1, a2, q1, q2, step=step, **hyper)
    adamw8bit_step_ref(*ref, q1, q2, step=step, **hyper)
    _ulps_apart(a1, ref[4], 4)
    _ulps_apart(a2, ref[5], 4)
    _ulps_apart(p, ref[0], 8 if dtype == torch.float32 else 1, scale=_step_scale(p_before, ref[0]))
    for ours, theirs, mom, amax, qmap in ((s1, ref[2], m, ref[4], q1), (s2, ref[3], v, ref[5], q2)):
        inv = torch.where(amax > 0, 1.0 / amax, torch.zeros_like(amax))
        _check_8bit_codes(ours, theirs, mom * inv.repeat_interleave(256)[:n], qmap)



# ---------------------------------------------------------------------------------------------------
# regressions the fuzzing found
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.49, 0.5, 0.9])
@pytest.mark.parametrize("n", [1, 27, 1000])  # the scalar tail and the vector loop
def test_first_moment_is_torchs_lerp(beta1, n):
    """Found by test_adamw_step_matches_reference: the kernels computed m + (1-β1)(g - m) for every β1,
    which rounds at |m|; torch's lerp anchors at g for weights >= 0.5 (β1 <= 0.5). With β1 = 0 and
    |g| << |m| the moment was off by ulp(|m|) — 100% of g here — and so was the whole step."""
    g = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=g) * 0.1
    grad = torch.randn(n, generator=g) * 1e-10
    m = torch.randn(n, generator=g) * 1e-3  # |m| >> |g|
    v = torch.rand(n, generator=g) * 1e-20
    p_before = p.clone()
    ref = [t.clone() for t in (p, grad, m, v)]
    hyper = {"lr": 1e-3, "beta1": beta1, "beta2": 0.9, "eps": 1e-30, "weight_decay": 0.0}
    adamw_step(p, grad, m, v, step=7, **hyper)
    adamw_step_ref(*ref, step=7, **hyper)
    expected = ref[2]  # torch's lerp (what torch.optim.AdamW computes)
    if beta1 == 0.0:
        assert torch.equal(m, grad)  # the moment of an optimizer without momentum is the gradient, exactly
    _ulps_apart(m, expected, 1, scale=grad.abs())  # at the scale of g, not of the old m
    _ulps_apart(p, ref[0], 8, scale=_step_scale(p_before, ref[0]))


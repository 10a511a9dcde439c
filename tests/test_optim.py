"""Fused AdamW ops and the PagedAdamW / PagedAdamW8bit / AdamW8bit optimizers on CPU, against
torch.optim.AdamW (the independent reference) and bitsandbytes' accuracy bounds (docs/kernels.md, "The math")."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import require
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_ext
from lowrank_ext import ops
from lowrank_ext._reference.optim import adamw8bit_step_ref, adamw_step_ref, optim_maps
from lowrank_ext.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
OP_HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}


def _grads(shape, steps, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * 0.01).to(dtype) for _ in range(steps)]


def _param(shape, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.1).to(dtype))


def _run(opt_cls, p, grads, **kw):
    opt = opt_cls([p], **{**HYPER, **kw})
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return opt


# ---- 32-bit state vs torch.optim.AdamW ------------------------------------------------------------


@pytest.mark.parametrize(
    "opt_cls,shape",
    [(PagedAdamW, s) for s in [(1024, 32), (1024, 1024), (1024, 4097), (7,)]]
    + [(AdamW8bit, (7,)), (PagedAdamW8bit, (4095,))],  # below 4096 elements the 8-bit classes keep fp32 state
)
def test_fp32_state_matches_torch_adamw(opt_cls, shape):
    grads = _grads(shape, 20)
    p, p_ref = _param(shape), _param(shape)
    opt = _run(opt_cls, p, grads)
    ref = _run(torch.optim.AdamW, p_ref, grads, foreach=False)
    torch.testing.assert_close(p.data, p_ref.data, atol=1e-6, rtol=1e-5)
    st, st_ref = opt.state[p], ref.state[p_ref]
    torch.testing.assert_close(st["exp_avg"], st_ref["exp_avg"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st["exp_avg_sq"], st_ref["exp_avg_sq"], atol=1e-6, rtol=1e-5)
    assert float(st["step"]) == 20.0


def _strided_param(layout, seed=1):
    """A (64, 96) leaf param that is a transposed or a strided (every other column) view."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        base = torch.randn(96, 64, generator=gen) * 0.1
        p = torch.nn.Parameter(base.t())
    else:
        base = torch.randn(64, 192, generator=gen) * 0.1
        p = torch.nn.Parameter(base[:, ::2])
    assert not p.is_contiguous() and p.shape == (64, 96)
    return p


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("opt_cls", [PagedAdamW, AdamW8bit, PagedAdamW8bit])
def test_non_contiguous_params_like_torch_adamw(opt_cls, layout):
    # torch.optim.AdamW accepts strided params; ours step a contiguous copy and write it back in place.
    grads = _grads((64, 96), 10)
    grads[3] = grads[3].t().contiguous().t()  # a non-contiguous grad too
    p, p_ref, p_dense = _strided_param(layout), _strided_param(layout), _strided_param(layout).detach().clone()
    p_dense = torch.nn.Parameter(p_dense)
    strides = p.stride()
    opt = _run(opt_cls, p, grads)
    assert p.stride() == strides  # the same tensor, updated in place
    if opt_cls is PagedAdamW:  # fp32 state: torch.optim.AdamW is the reference
        ref = _run(torch.optim.AdamW, p_ref, grads, foreach=False)
        torch.testing.assert_close(p.data, p_ref.data, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[p_ref]["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    else:  # 8-bit state (6144 elements): bit-identical to the same optimizer on a contiguous param
        assert "state1" in opt.state[p]
        opt_dense = _run(opt_cls, p_dense, grads)
        assert torch.equal(p.data, p_dense.data)
        assert torch.equal(opt.state[p]["state1"], opt_dense.state[p_dense]["state1"])
        ref = _run(torch.optim.AdamW, p_ref, grads, foreach=False)  # and near torch: 10 steps move ~1e-2
        torch.testing.assert_close(p.data, p_ref.data, atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_params_fp32_state(dtype):
    # fp16/bf16 params: the update runs in fp32 and the param is rounded once (the reference's math).
    shape = (300, 50)
    grads = _grads(shape, 5, dtype=dtype)
    p = _param(shape, dtype=dtype)
    p_ref = p.detach().clone()
    m, v = torch.zeros(shape), torch.zeros(shape)
    opt = _run(PagedAdamW, p, grads)
    for t, g in enumerate(grads, 1):
        adamw_step_ref(p_ref, g, m, v, step=t, **OP_HYPER)
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    # one rounding to the param dtype: at most 1 ulp apart (torch's lerp in the reference uses an FMA)
    torch.testing.assert_close(p.data.float(), p_ref.float(), atol=1e-6, rtol=1e-2)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, atol=1e-9, rtol=1e-5)


def test_nan_inf_grads_propagate_like_torch():
    shape = (64, 70)
    g = _grads(shape, 1)[0]
    g[3, 5] = float("nan")
    g[10, 1] = float("inf")
    for opt_cls in (PagedAdamW, AdamW8bit):
        p, p_ref = _param(shape), _param(shape)
        _run(opt_cls, p, [g])
        _run(torch.optim.AdamW, p_ref, [g], foreach=False)
        assert torch.equal(torch.isnan(p.data), torch.isnan(p_ref.data)), opt_cls
        assert torch.isnan(p.data[3, 5]) and torch.isnan(p.data[10, 1])


# ---- 8-bit state ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opt_cls,shape",
    [
        (AdamW8bit, (1024, 32)),
        (PagedAdamW8bit, (1024, 32)),  # on CPU the same kernel as AdamW8bit: one shape is enough
        pytest.param(AdamW8bit, (1024, 1024), marks=pytest.mark.slow),
        pytest.param(AdamW8bit, (1024, 4097), marks=pytest.mark.slow),
    ],
)
def test_8bit_within_bnb_bounds(shape, opt_cls):
    # bitsandbytes' own protocol and bounds for its blockwise 8-bit Adam: 50 steps against a 32-bit
    # reference, params re-synced every 10 steps (they drift apart otherwise), checked before each re-sync.
    grads = _grads(shape, 50)
    p, p_ref = _param(shape), _param(shape)
    opt = opt_cls([p], **HYPER)
    ref = torch.optim.AdamW([p_ref], **HYPER, foreach=False)
    q1, q2 = optim_maps()
    n = p.numel()
    for i, g in enumerate(grads, 1):
        p.grad, p_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        if i % 10:
            continue
        err = (p.data - p_ref.data).abs()
        assert err.mean() < 6e-5, i
        # relative bound on the mean error relative to the mean |p|: the element-wise mean of err/|p| is
        # dominated by params near 0 (1/|p| of a Gaussian has no finite mean) and fails for bitsandbytes'
        # own AdamW8bit too; test_8bit_error_no_worse_than_bitsandbytes compares that one with bnb's.
        assert err.mean() / p_ref.data.abs().mean() < 6e-4, i
        st, st_ref = opt.state[p], ref.state[p_ref]
        m = q1[st["state1"].reshape(-1).long()] * st["absmax1"].repeat_interleave(256)[:n]
        v = q2[st["state2"].reshape(-1).long()] * st["absmax2"].repeat_interleave(256)[:n]
        for deq, ref_state in ((m, st_ref["exp_avg"]), (v, st_ref["exp_avg_sq"])):
            not_close = ~torch.isclose(deq, ref_state.reshape(-1), atol=3e-3, rtol=1e-3)
            assert not_close.sum().item() < 20, i
        p_ref.data.copy_(p.data)


def test_8bit_error_no_worse_than_bitsandbytes():
    # 50 steps without re-syncing: our drift from fp32 AdamW vs bitsandbytes' CPU AdamW8bit drift.
    bnb = require("bitsandbytes", "0.50.2")
    shape = (1024, 256)
    grads = _grads(shape, 50)
    ps = [_param(shape) for _ in range(3)]
    opts = [
        AdamW8bit([ps[0]], **HYPER),
        bnb.optim.AdamW8bit([ps[1]], **HYPER),
        torch.optim.AdamW([ps[2]], **HYPER, foreach=False),
    ]
    for g in grads:
        for p, o in zip(ps, opts):
            p.grad = g.clone()
            o.step()
    errs = [(p.data - ps[2].data).abs() for p in ps[:2]]
    ours, theirs = (e.mean().item() for e in errs)
    assert ours <= 1.05 * theirs, (ours, theirs)
    ours_rel, theirs_rel = ((e / (ps[2].data.abs() + 1e-9)).mean().item() for e in errs)
    assert ours_rel <= 1.05 * theirs_rel, (ours_rel, theirs_rel)


@pytest.mark.parametrize("maps", ["dynamic", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [4096, 5000, 256 * 7 + 3])
def test_8bit_op_matches_reference(dtype, n, maps):
    # One fused step from a random 8-bit state == the plain-torch reference (decode, update, requantize).
    # "random": arbitrary sorted maps, so the kernel's fast code lookup must stay exact off the dynamic map.
    gen = torch.Generator().manual_seed(n)
    nb = -(-n // 256)
    q1, q2 = optim_maps()
    if maps == "random":
        q1 = torch.cat([torch.rand(254, generator=gen) * 2 - 1, torch.tensor([0.0, 1.0])]).sort().values
        q2 = torch.cat([torch.rand(254, generator=gen) ** 4, torch.tensor([0.0, 1.0])]).sort().values
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    g = (torch.randn(n, generator=gen) * 0.01).to(dtype)
    s1 = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    s2 = torch.randint(128, 256, (n,), generator=gen, dtype=torch.uint8)
    a1, a2 = torch.rand(nb, generator=gen) * 1e-2, torch.rand(nb, generator=gen) * 1e-4
    a1[0] = 0.0  # an all-zero first-moment block
    ref = [t.clone() for t in (p, g, s1, s2, a1, a2)]
    ops.adamw8bit_step(p, g, s1, s2, a1, a2, q1, q2, step=3, **OP_HYPER)
    adamw8bit_step_ref(*ref, q1, q2, step=3, **OP_HYPER)
    # last-ulp differences only (torch's lerp uses an FMA); a code may then move to its neighbour
    torch.testing.assert_close(p, ref[0], atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(a1, ref[4], atol=0, rtol=1e-6)
    torch.testing.assert_close(a2, ref[5], atol=0, rtol=1e-6)
    for ours, theirs in ((s1, ref[2]), (s2, ref[3])):
        assert (ours.int() - theirs.int()).abs().max() <= 1
        assert (ours != theirs).float().mean() < 2e-3


def test_8bit_state_bytes():
    p = _param((1024, 1024))
    sizes = {}
    for cls in (PagedAdamW, AdamW8bit):
        q = torch.nn.Parameter(p.detach().clone())
        opt = _run(cls, q, _grads((1024, 1024), 1))
        sizes[cls] = sum(t.numel() * t.element_size() for t in opt.state[q].values() if t.dim() > 0)
    assert sizes[AdamW8bit] <= 0.30 * sizes[PagedAdamW]
    small = torch.nn.Parameter(torch.zeros(4095))
    opt = _run(AdamW8bit, small, [torch.ones(4095)])
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}


# ---- optimizer API --------------------------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))


def _batches(steps):
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(16, 96, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(steps)
    ]


def _train(model, opt, batches, sched=None):
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            return loss

        opt.step(closure)
        if sched is not None:
            sched.step()


def _groups(model):  # LoRA+-style groups: different lr and weight decay per group
    return [
        {"params": model[0].parameters(), "lr": 2e-3},
        {"params": model[2].parameters(), "lr": 5e-3, "weight_decay": 0.0},
    ]


def test_groups_closure_clip_scheduler_match_torch():
    batches = _batches(12)
    m1, m2 = _model(), _model()
    o1 = PagedAdamW(_groups(m1), **{**HYPER, "lr": 1e-3})
    o2 = torch.optim.AdamW(_groups(m2), **{**HYPER, "lr": 1e-3}, foreach=False)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=4, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=4, gamma=0.5)
    _train(m1, o1, batches, s1)
    _train(m2, o2, batches, s2)
    assert o1.param_groups[1]["lr"] == o2.param_groups[1]["lr"] == 5e-3 * 0.5**3
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("opt_cls", [PagedAdamW, PagedAdamW8bit, AdamW8bit])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_resume_bit_identical(opt_cls, dtype):
    batches = _batches(10)
    ref_model = _model().to(dtype)
    ref_opt = opt_cls(_groups(ref_model), **HYPER)
    run_model = copy.deepcopy(ref_model)
    run_opt = opt_cls(_groups(run_model), **HYPER)
    batches = [(x.to(dtype), y) for x, y in batches]
    _train(ref_model, ref_opt, batches)
    _train(run_model, run_opt, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": run_model.state_dict(), "opt": run_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    new_model = _model(seed=123).to(dtype)
    new_model.load_state_dict(ckpt["model"])
    new_opt = opt_cls(_groups(new_model), **HYPER)
    new_opt.load_state_dict(ckpt["opt"])
    big = new_model[0].weight
    if opt_cls is not PagedAdamW:
        assert new_opt.state[big]["state1"].dtype == torch.uint8
        assert new_opt.state[big]["absmax1"].dtype == torch.float32  # not cast to the param's dtype
    else:
        assert new_opt.state[big]["exp_avg"].dtype == torch.float32
    _train(new_model, new_opt, batches[5:])
    for a, b in zip(new_model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_loads_torch_adamw_state_dict():
    batches = _batches(8)
    m1, m2 = _model(), _model()
    o1 = torch.optim.AdamW(m1.parameters(), **HYPER, foreach=False)
    o2 = torch.optim.AdamW(m2.parameters(), **HYPER, foreach=False)
    _train(m1, o1, batches[:4])
    _train(m2, o2, batches[:4])
    ours = PagedAdamW(m1.parameters(), **HYPER)
    ours.load_state_dict(o1.state_dict())
    _train(m1, ours, batches[4:])
    _train(m2, o2, batches[4:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cpu_runs_without_warnings_and_page_out_is_noop():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cls in (PagedAdamW, PagedAdamW8bit):
            opt = cls(model.parameters(), **HYPER)
            _train(model, opt, _batches(2))
            opt.page_out()
            assert not any(ops.paged_is_managed(t) for s in opt.state.values() for t in s.values())


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("opt_cls,op", [(PagedAdamW, "adamw_step"), (AdamW8bit, "adamw8bit_step")])
def test_step_runs_the_fused_ops(opt_cls, op):
    p = _param((64, 128))
    opt = opt_cls([p], **HYPER)
    p.grad = torch.randn_like(p)
    with _Recorder() as rec:
        opt.step()
    assert f"lowrank_ext.{op}" in rec.names
    assert not any(n.startswith(("aten.lerp", "aten.addcdiv")) for n in rec.names)


# ---- errors ---------------------------------------------------------------------------------------


def test_optimizer_errors():
    with pytest.raises(ValueError, match=r"lowrank_ext::PagedAdamW: amsgrad must be False"):
        PagedAdamW([_param((4,))], amsgrad=True)
    with pytest.raises(
        TypeError,
        match=r"lowrank_ext::AdamW8bit: params must be float32, float16 or bfloat16, got torch.int64",
    ):
        AdamW8bit([torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"lowrank_ext::PagedAdamW8bit: betas must be in \[0, 1\)"):
        PagedAdamW8bit([_param((4,))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"lowrank_ext::PagedAdamW: lr must be >= 0"):
        PagedAdamW([_param((4,))], lr=-1.0)
    with pytest.raises(ValueError, match=r"lowrank_ext::PagedAdamW: eps must be >= 0"):
        PagedAdamW([_param((4,))], eps=-1.0)
    with pytest.raises(ValueError, match=r"lowrank_ext::PagedAdamW: weight_decay must be >= 0"):
        PagedAdamW([_param((4,))], weight_decay=-1.0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = PagedAdamW(emb.parameters())
    with pytest.raises(
        TypeError,
        match=r"lowrank_ext::PagedAdamW: grad must be a dense \(strided\) tensor, got torch.sparse_coo",
    ):
        opt.step()
    p = _param((5000,))
    opt = AdamW8bit([p])
    sd = {
        "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
        "param_groups": opt.state_dict()["param_groups"],
    }
    with pytest.raises(
        ValueError, match=r"lowrank_ext::AdamW8bit: state_dict exp_avg must have 5000 elements"
    ):
        opt.load_state_dict(sd)


def _op_args(n=300, dtype=torch.float32):
    p, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    return p, g, torch.zeros(n), torch.zeros(n)


def test_adamw_step_errors():
    p, g, m, v = _op_args()
    f = ops.adamw_step
    cases = [
        (
            TypeError,
            r"lowrank_ext::adamw_step: param must be float32, float16 or bfloat16, got Long",
            (p.long(), g.long(), m, v),
            {},
        ),
        (
            TypeError,
            r"lowrank_ext::adamw_step: grad must have the dtype of param \(Float\), got BFloat16",
            (p, g.bfloat16(), m, v),
            {},
        ),
        (
            ValueError,
            r"lowrank_ext::adamw_step: grad must have the shape of param \[300\], got \[299\]",
            (p, g[:299], m, v),
            {},
        ),
        (
            TypeError,
            r"lowrank_ext::adamw_step: exp_avg must have dtype Float, got BFloat16",
            (p, g, m.bfloat16(), v),
            {},
        ),
        (
            ValueError,
            r"lowrank_ext::adamw_step: exp_avg_sq must have 300 elements, got 10",
            (p, g, m, v[:10]),
            {},
        ),
        (
            ValueError,
            r"lowrank_ext::adamw_step: param must be contiguous",
            (torch.randn(300, 2)[:, 0], g, m, v),
            {},
        ),
        (
            ValueError,
            r"lowrank_ext::adamw_step: exp_avg must be contiguous",
            (p, g, torch.zeros(300, 2)[:, 0], v),
            {},
        ),
        (ValueError, r"lowrank_ext::adamw_step: step must be >= 1", (p, g, m, v), {"step": 0}),
        (
            ValueError,
            r"lowrank_ext::adamw_step: beta1 must be in \[0, 1\), got 1",
            (p, g, m, v),
            {"beta1": 1.0},
        ),
        (
            ValueError,
            r"lowrank_ext::adamw_step: beta2 must be in \[0, 1\), got -0.5",
            (p, g, m, v),
            {"beta2": -0.5},
        ),
        (ValueError, r"lowrank_ext::adamw_step: lr must be >= 0, got -1", (p, g, m, v), {"lr": -1.0}),
        (ValueError, r"lowrank_ext::adamw_step: eps must be >= 0", (p, g, m, v), {"eps": -1.0}),
        (
            ValueError,
            r"lowrank_ext::adamw_step: weight_decay must be >= 0",
            (p, g, m, v),
            {"weight_decay": -1.0},
        ),
    ]
    for exc, msg, args, kw in cases:
        with pytest.raises(exc, match=msg):
            f(*args, **{**OP_HYPER, "step": 1, **kw})


def test_adamw8bit_step_errors():
    n = 600
    p, g = torch.randn(n), torch.randn(n)
    s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(3), torch.zeros(3)
    q1, q2 = optim_maps()
    good = [p, g, s1, s2, a1, a2, q1, q2]
    bad = {
        2: (s1.float(), TypeError, r"lowrank_ext::adamw8bit_step: state1 must have dtype Byte, got Float"),
        3: (s2[:5], ValueError, r"lowrank_ext::adamw8bit_step: state2 must have 600 elements, got 5"),
        4: (torch.zeros(2), ValueError, r"lowrank_ext::adamw8bit_step: absmax1 must have 3 elements, got 2"),
        5: (
            a2.double(),
            TypeError,
            r"lowrank_ext::adamw8bit_step: absmax2 must have dtype Float, got Double",
        ),
        6: (q1[:255], ValueError, r"lowrank_ext::adamw8bit_step: qmap1 must have 256 elements, got 255"),
        7: (q2.half(), TypeError, r"lowrank_ext::adamw8bit_step: qmap2 must have dtype Float, got Half"),
    }
    for i, (t, exc, msg) in bad.items():
        args = list(good)
        args[i] = t
        with pytest.raises(exc, match=msg):
            ops.adamw8bit_step(*args, step=1, **OP_HYPER)
    with pytest.raises(ValueError, match=r"lowrank_ext::adamw8bit_step: step must be >= 1"):
        ops.adamw8bit_step(*good, step=0, **OP_HYPER)
    with pytest.raises(ValueError, match=r"lowrank_ext::paged_prefetch: device must be a device ordinal"):
        ops.paged_prefetch(p, -5)


# ---- custom-op machinery --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    n = 5000
    p, g = torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)
    torch.library.opcheck(
        torch.ops.lowrank_ext.adamw_step,
        (p, g, torch.zeros(n, device=device), torch.rand(n, device=device), 1e-3, 0.9, 0.999, 1e-8, 0.01, 2),
    )
    q1, q2 = (q.to(device) for q in optim_maps())
    s1 = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    s2 = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    a = torch.rand(20, device=device)
    torch.library.opcheck(
        torch.ops.lowrank_ext.adamw8bit_step,
        (p, g, s1, s2, a, a.clone(), q1, q2, 1e-3, 0.9, 0.999, 1e-8, 0.01, 2),
    )
    torch.library.opcheck(torch.ops.lowrank_ext.paged_zeros_like, (p, torch.float32))
    torch.library.opcheck(torch.ops.lowrank_ext.paged_prefetch, (p.float(), -1))
    paged = ops.paged_zeros_like(p, torch.float32)  # managed memory on CUDA: the batch really prefetches
    torch.library.opcheck(torch.ops.lowrank_ext.paged_prefetch_batch, ([paged, g.float()], -1))


def test_torch_compile_fullgraph():
    def step(p, g, m, v, t: int):
        ops.adamw_step(p, g, m, v, step=t, **OP_HYPER)
        return p * 2

    p, g, m, v = _op_args(5000)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(p, g, m, v, 1)
    ref = step(p2, g, m2, v2, 1)
    assert torch.equal(out, ref) and torch.equal(p, p2) and torch.equal(v, v2)


def test_lowrank_ext_exports():
    assert lowrank_ext.optim.PagedAdamW is PagedAdamW
    assert issubclass(PagedAdamW8bit, torch.optim.Optimizer) and issubclass(AdamW8bit, torch.optim.Optimizer)


def test_qmaps_match_bitsandbytes():
    bnb_f = require("bitsandbytes.functional", "0.50.2")
    from lowrank_ext._reference.nf4 import dynamic_map

    for signed in (True, False):
        ours = ops.optim_qmap(signed)
        assert ours.shape == (256,) and torch.all(ours[1:] >= ours[:-1])
        assert torch.equal(ours, bnb_f.create_dynamic_map(signed=signed))
    assert torch.equal(ops.optim_qmap(True), dynamic_map(signed=True))
    assert ops.optim_qmap(False).min() == 0.0 and ops.optim_qmap(False).max() == 1.0

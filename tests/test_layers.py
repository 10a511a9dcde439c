"""Layer-level tests: LoRALinear (dense), QLoRALinear (NF4), Linear4bit — math vs float64, state dicts in
bitsandbytes' layout, merges, DoRA norms without a dense W, dispatch to one fused op, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import require

import lowrank_ext as L
from lowrank_ext.nn import Linear4bit, LoRALinear, QLoRALinear


def _randomize(layer: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _ref(x, w, a, b, s, bias=None):
    """float64: y = x Wᵀ + s (x Aᵀ) Bᵀ + bias."""
    x, w, a, b = (t.detach().double() for t in (x, w, a, b))
    y = x @ w.T + s * (x @ a.T) @ b.T
    return y if bias is None else y + bias.detach().double()


@pytest.mark.parametrize("variant", ["lora", "dora", "vera"])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_float64(variant, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24, bias=bias)
    kw = {}
    if variant == "vera":
        kw["vera_shared"] = (torch.randn(8, 64), torch.randn(32, 8))
    layer = LoRALinear.from_linear(lin, r=6, alpha=12, variant=variant, **kw)
    _randomize(layer)
    x = torch.randn(2, 5, 40)
    a, b = layer.factors("default")
    s = layer.specs["default"].scaling
    want = _ref(x, lin.weight, a, b, s)
    if variant == "dora":  # y = m/||W + sBA|| ⊙ (x Wᵀ + s x Aᵀ Bᵀ)
        n = torch.linalg.norm(lin.weight.double() + s * b.double() @ a.double(), dim=1)
        want = want * (layer.lora_magnitude_vector["default"].double() / n)
    if bias:
        want = want + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora", "vera"])
def test_lora_linear_gradcheck_float64(variant):
    torch.manual_seed(0)
    kw = {"vera_shared": (torch.randn(3, 12).double(), torch.randn(7, 3).double())} if variant == "vera" else {}
    layer = LoRALinear.from_linear(torch.nn.Linear(12, 7).double(), r=3, alpha=6, variant=variant,
                                   dtype=torch.float64, **kw)
    _randomize(layer)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    # DoRA's norm ||W + sBA|| is detached (paper, PEFT), so the true Jacobian in A, B differs by design:
    # check x and the magnitude there, and A/B against PEFT (test_inject.py)
    named = [(n, p) for n, p in layer.named_parameters() if p.requires_grad
             and not (variant == "dora" and n.startswith(("lora_A", "lora_B")))]
    assert named

    def f(x, *ps):
        return torch.func.functional_call(layer, {n: p for (n, _), p in zip(named, ps)}, (x,))

    assert torch.autograd.gradcheck(f, (x, *[p for _, p in named]))


def test_conv1d_fan_in_fan_out():
    transformers = require("transformers")
    conv = transformers.pytorch_utils.Conv1D(24, 40)  # weight [in=40, out=24]
    layer = LoRALinear.from_linear(conv, r=4)
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), conv(x))
    assert layer.weight.shape == (24, 40)


def test_layer_errors():
    layer = LoRALinear.from_linear(torch.nn.Linear(8, 4), r=2)
    with pytest.raises(ValueError, match="lowrank_ext::LoRALinear: name must be not be an existing adapter|"
                                         "lowrank_ext::LoRALinear: name must not be an existing adapter"):
        layer.add_adapter("default")
    with pytest.raises(ValueError, match="lowrank_ext::LoRALinear: r must be a positive int, got 0"):
        layer.add_adapter("x", r=0)
    with pytest.raises(ValueError, match="lowrank_ext::LoRALinear: variant must be 'lora', 'dora' or 'vera'"):
        layer.add_adapter("x", variant="ia3")
    with pytest.raises(ValueError, match="lowrank_ext::LoRALinear: adapter name must be one of"):
        layer.set_adapter("nope")
    with pytest.raises(TypeError, match="lowrank_ext::from_linear: linear must be an nn.Linear or Conv1D"):
        LoRALinear.from_linear(torch.nn.ReLU())


# ---- NF4 base ----------------------------------------------------------------------------------------
def test_linear4bit_state_dict_is_bitsandbytes_layout():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    layer = Linear4bit.from_linear(lin)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    bnb = require("bitsandbytes", "0.50.2")
    q = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    q.bias = torch.nn.Parameter(lin.bias.data.clone())
    ref = q.to("cpu").state_dict()
    assert set(ref) == set(sd)
    for k in ("weight", "weight.quant_map", "bias"):
        assert torch.equal(sd[k], ref[k]), k
    assert sd["weight.absmax"].dtype == ref["weight.absmax"].dtype == torch.uint8
    # and back: a fresh layer loads bnb's state dict without requantizing
    other = Linear4bit.from_linear(torch.nn.Linear(64, 48))
    other.load_state_dict(ref)
    assert torch.equal(other.weight.packed, ref["weight"])


def test_qlora_state_dict_round_trip_and_dtype_moves():
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 48), r=4, double_quant=False)
    _randomize(layer)
    sd = layer.state_dict()
    assert "weight.absmax" in sd and "lora_A.default" in sd and sd["weight.absmax"].dtype == torch.float32
    other = QLoRALinear.from_linear(torch.nn.Linear(64, 48), r=4, double_quant=False)
    other.load_state_dict(sd)
    assert torch.equal(other.weight.packed, layer.weight.packed) and torch.equal(other.lora_B["default"],
                                                                                  layer.lora_B["default"])
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.weight.absmax.dtype == torch.float32 and half.lora_A["default"].dtype == torch.bfloat16
    assert torch.equal(half.weight.absmax, layer.weight.absmax)
    with pytest.raises(RuntimeError, match="weight.absmax"):
        bad = dict(sd)
        del bad["weight.absmax"]
        other.load_state_dict(bad)


def test_qlora_only_lora_trainable_and_weight_is_nf4():
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=8, alpha=16, blocksize=64, double_quant=True)
    assert isinstance(layer.weight, L.NF4Weight) and layer.weight.double_quant and layer.weight.blocksize == 64
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.default", "lora_B.default"}
    assert layer.specs["default"].scaling == 2.0
    assert QLoRALinear.from_linear(torch.nn.Linear(64, 32), r=16, alpha=16, use_rslora=True).specs[
        "default"].scaling == pytest.approx(4.0)


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_storage_is_frozen_uint8_parameters(double_quant):
    """The packed codes and absmax bytes are frozen uint8 Parameters (what FSDP2 shards), the fp32 constants
    buffers; no cast reaches them, `weight` views the live tensors, counts and optimizers skip them."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(64, 48), r=4, double_quant=double_quant)
    ref = layer.weight
    params = dict(layer.named_parameters())
    assert {n: (p.dtype, p.requires_grad) for n, p in params.items() if n.startswith("weight_")} == {
        "weight_packed": (torch.uint8, False), "weight_absmax": (torch.uint8, False)}
    assert params["weight_packed"].shape == (64 * 48 // 2, 1)
    assert params["weight_absmax"].shape == ((48,) if double_quant else (48, 4))  # fp32 absmax kept as its bytes
    assert {n for n, b in layer.named_buffers() if n.startswith("weight_")} == (
        {"weight_nested_absmax", "weight_nested_map", "weight_offset"} if double_quant else set())
    assert not any(k.startswith("weight_") for k in layer.state_dict())  # bitsandbytes' keys only
    assert layer.weight is layer.weight  # cached; rebuilt when the tensors change (tests/test_weight_cache.py)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.type(torch.float16),
                 lambda m: m.double()):
        moved = cast(copy.deepcopy(layer))
        w = moved.weight
        assert moved.weight_packed.dtype == moved.weight_absmax.dtype == torch.uint8
        assert torch.equal(w.packed, ref.packed) and torch.equal(w.absmax, ref.absmax)
        assert w.absmax.dtype == ref.absmax.dtype and (not double_quant or w.offset.dtype == torch.float32)
    with torch.no_grad():  # the weight reads the current bytes
        layer.weight_packed.zero_()
    assert torch.equal(layer.weight.packed, torch.zeros_like(ref.packed))
    # a meta-device layer is allocated (not copied) by to_empty, dtypes kept
    meta = copy.deepcopy(layer).to("meta").to_empty(device="cpu")
    assert meta.weight_packed.device.type == "cpu" and meta.weight_packed.dtype == torch.uint8
    # an optimizer given model.parameters() accepts and never steps the frozen bytes
    before = layer.weight_packed.detach().clone()
    opt = L.optim.PagedAdamW(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 64)).sum().backward()
    opt.step()
    assert torch.equal(layer.weight_packed, before) and layer.weight_packed not in opt.state
    net = torch.nn.Sequential(layer)
    assert L.count_parameters(net) == (4 * (64 + 48), 64 * 48 + 4 * (64 + 48) + 48)  # PEFT's rule, not bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["lora", "vera"])
def test_qlora_forward_backward_vs_float64(dtype, variant, device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 72)
    kw = {"vera_shared": (torch.randn(8, 192), torch.randn(72, 8))} if variant == "vera" else {}
    layer = QLoRALinear.from_linear(lin, r=8, alpha=16, variant=variant, **kw)
    _randomize(layer)
    layer.to(device)  # the NF4 buffers move with the module (and keep their dtypes)
    x = torch.randn(3, 5, 192, dtype=dtype, device=device, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.device.type == device
    w = layer.weight.dequantize(torch.float32).cpu()
    a, b = (t.cpu() for t in layer.factors("default"))
    xr = x.detach().cpu().double().requires_grad_()
    ar, br = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    s = layer.specs["default"].scaling
    want = xr @ w.double().T + s * (xr @ ar.T) @ br.T + lin.bias.double()
    gy = torch.randn_like(want)
    y.backward(gy.to(device, dtype))
    want.backward(gy)
    ours = {"y": y, "x": x.grad} | ({"A": layer.lora_A["default"].grad, "B": layer.lora_B["default"].grad}
                                    if variant == "lora" else {})
    ours = {k: t.cpu() for k, t in ours.items()}
    ref = {"y": want, "x": xr.grad, "A": ar.grad, "B": br.grad}
    if dtype == torch.float32:
        for k, t in ours.items():
            torch.testing.assert_close(t.double(), ref[k], atol=2e-4, rtol=1e-4, msg=k)
        return
    # bf16: our error vs float64 may be at most 2x PyTorch's own error doing the same math in bf16
    xt = x.detach().cpu().requires_grad_()
    at = a.detach().to(dtype).requires_grad_()
    bt = b.detach().to(dtype).requires_grad_()
    yt = xt @ w.to(dtype).T + s * (xt @ at.T) @ bt.T + lin.bias.to(dtype)
    yt.backward(gy.to(dtype))
    torch_ = {"y": yt, "x": xt.grad, "A": at.grad, "B": bt.grad}
    for k, t in ours.items():
        err = (t.double() - ref[k]).abs().max()
        err_torch = (torch_[k].double() - ref[k]).abs().max()
        assert err <= 2 * err_torch + 1e-6, (k, err.item(), err_torch.item())


def test_qlora_forward_is_one_fused_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.name())
            return func(*args, **(kwargs or {}))

    layer = QLoRALinear.from_linear(torch.nn.Linear(128, 64), r=4)
    x = torch.randn(4, 128, requires_grad=True)
    with Ops() as mode:
        layer(x).sum().backward()
    lrx = [n for n in mode.seen if n.startswith("lowrank_ext::")]
    assert "lowrank_ext::nf4_lora_linear" in lrx and "aten::mm" not in mode.seen[: mode.seen.index(
        "lowrank_ext::nf4_lora_linear")], mode.seen
    assert any("backward" in n or "grad" in n for n in lrx), lrx


@pytest.mark.parametrize("cls,variant", [(QLoRALinear, "lora"), (QLoRALinear, "dora"), (LoRALinear, "dora")])
def test_compile_fullgraph(cls, variant):
    layer = cls.from_linear(torch.nn.Linear(128, 64), r=4, variant=variant)
    _randomize(layer)
    x = torch.randn(2, 3, 128, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, eager)
    y.sum().backward()
    torch.testing.assert_close(x.grad, gx)


def test_qlora_mixed_batch_equals_per_row():
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, adapter_name="a")
    layer.add_adapter("b", r=8, alpha=4)
    _randomize(layer)
    x = torch.randn(4, 3, 128)
    names = ["b", "a", "__base__", "b"]
    layer._mixed = (["b", "a", "__base__"], torch.tensor([0, 1, 2, 0]))
    with torch.no_grad():
        out = layer(x)
        layer._mixed = None
        rows = []
        for i, n in enumerate(names):
            layer.set_adapter([] if n == "__base__" else n)
            rows.append(layer(x[i: i + 1]))
    torch.testing.assert_close(out, torch.cat(rows), atol=1e-5, rtol=1e-5)


def test_qlora_dora_norm_without_dense_weight():
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(256, 96), r=8, alpha=16, variant="dora")
    _randomize(layer)
    a, b = layer.factors("default")
    s = layer.specs["default"].scaling
    w = layer.weight.dequantize(torch.float32).double()
    want = torch.linalg.norm(w + s * b.double() @ a.double(), dim=1)
    torch.testing.assert_close(layer._dora_norm("default", torch.float32).double(), want, atol=1e-5, rtol=1e-5)
    # magnitude initialised to the row norms of deq(W)
    fresh = QLoRALinear.from_linear(torch.nn.Linear(256, 96), r=8, variant="dora")
    torch.testing.assert_close(fresh.lora_magnitude_vector["default"].double(),
                               torch.linalg.norm(fresh.weight.dequantize(torch.float32).double(), dim=1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_qlora_merge_dense_by_default_requantize_opt_in(variant):
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(torch.nn.Linear(128, 64), r=4, variant=variant)
    _randomize(layer)
    packed = layer.weight.packed.clone()
    x = torch.randn(5, 128)
    ref = layer(x)
    layer.merge()
    assert layer.merged_weight is not None and torch.equal(layer.weight.packed, packed)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer(x), ref)
    layer.merge()
    merged_dense = layer.merged_weight.clone()
    layer.unmerge()
    layer.merge(requantize=True)  # opt-in: NF4(merged), the adapters are folded in and gone
    assert not layer.specs and layer.merged_weight is None
    want = L.quantize_nf4(merged_dense, 64, True)
    assert torch.equal(layer.weight.packed, want.packed) and torch.equal(layer.weight.absmax, want.absmax)


def test_linear4bit_matches_bitsandbytes_outputs():
    bnb = require("bitsandbytes", "0.50.2")
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    q = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    q.bias = torch.nn.Parameter(lin.bias.data.clone())
    q = q.to("cpu")
    model = torch.nn.Sequential(q)
    L.from_bnb(model)
    assert isinstance(model[0], Linear4bit)
    x = torch.randn(7, 128)
    torch.testing.assert_close(model[0](x), q(x), atol=1e-4, rtol=1e-4)
    # and straight into QLoRA layers over the same bytes
    m2 = torch.nn.Sequential(q)
    L.inject(m2, L.LoRAConfig(r=4, target_modules=["0"]))
    assert torch.equal(m2[0].weight.packed, q.state_dict()["weight"])
    torch.testing.assert_close(m2[0](x), q(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_qlora_never_holds_a_dense_weight(variant):
    """Nothing of N·K elements is saved for backward, in forward or in DoRA's norm."""
    n, k = 96, 256
    layer = QLoRALinear.from_linear(torch.nn.Linear(k, n), r=4, variant=variant)
    _randomize(layer)
    sizes = []

    def pack(t):
        sizes.append(t.numel() if t.is_floating_point() else 0)
        return t

    x = torch.randn(8, k, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert sizes and max(sizes) < n * k, sizes


def test_linear4bit_from_bitsandbytes_state_dict():
    bnb = require("bitsandbytes", "0.50.2")
    torch.manual_seed(0)
    # in_features a multiple of the blocksize: bitsandbytes 0.50.2's CPU dequantize_4bit is wrong otherwise
    # (same bytes, but it scales elements with the wrong block's absmax; found while writing this test)
    lin = torch.nn.Linear(128, 40)
    q = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    q.bias = torch.nn.Parameter(lin.bias.data.clone())
    sd = {"model.layer." + k: v for k, v in q.to("cpu").state_dict().items()}
    layer = L.linear4bit_from_state_dict(sd, "model.layer.")
    assert torch.equal(layer.weight.packed, sd["model.layer.weight"]) and torch.equal(layer.bias, lin.bias)
    deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    torch.testing.assert_close(layer.weight.dequantize(), deq, atol=1e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="lowrank_ext::nf4_from_bnb_linear: m must be a bitsandbytes Linear4bit"):
        L.nf4_from_bnb_linear(lin)
    with pytest.raises(ValueError, match="lowrank_ext::from_bnb: model must contain bitsandbytes Linear4bit"):
        L.from_bnb(torch.nn.Sequential(lin))

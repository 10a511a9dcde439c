"""NF4Weight: the container, dequantize(out=), .to(), nbytes, and state dicts exchanged both ways with a
real bitsandbytes Linear4bit (0.50.2, on CPU); corrupt state dicts give errors naming the key."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as tF
from conftest import require

import lowrank_ext
from lowrank_ext import NF4Weight
from lowrank_ext._reference.nf4 import NF4_CODEBOOK

BNB_VERSION = "0.50.2"
QS = "weight.quant_state.bitsandbytes__nf4"


@pytest.fixture(scope="module")
def bnb():
    return require("bitsandbytes", BNB_VERSION)


def make_bnb_linear(bnb, out_f: int, in_f: int, dtype: torch.dtype, double_quant: bool, blocksize: int = 64):
    """A bitsandbytes Linear4bit (nf4) quantized on CPU from a seeded nn.Linear; returns (layer, dense weight)."""
    torch.manual_seed(out_f * 1000 + in_f)
    dense = torch.nn.Linear(in_f, out_f, bias=True).to(dtype)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4", module=layer)
    layer.bias = torch.nn.Parameter(dense.bias.data.float().clone(), requires_grad=False)
    return layer.to("cpu"), dense.weight.data


# ---------------------------------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------------------------------
def test_immutable_and_properties(device):
    w = torch.randn(96, 130, device=device)
    q = lowrank_ext.quantize_nf4(w, 64)
    with pytest.raises(AttributeError, match="NF4Weight is immutable"):
        q.blocksize = 128
    with pytest.raises(AttributeError, match="NF4Weight is immutable"):
        q.packed = q.packed.clone()
    assert q.shape == w.shape and q.dtype == torch.float32 and q.blocksize == 64 and q.double_quant
    nb = -(-w.numel() // 64)
    assert q.nbytes == w.numel() // 2 + nb + 4 * (-(-nb // 256)) + 256 * 4 + 4
    plain = lowrank_ext.quantize_nf4(w, 64, double_quant=False)
    assert plain.nbytes == w.numel() // 2 + 4 * nb and not plain.double_quant
    assert "NF4Weight(shape=(96, 130)" in repr(q)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 4096])
@pytest.mark.parametrize("shape", [(1,), (7, 9), (33, 65), (3, 6401), (2, 3, 5)])
def test_nf4_nbytes_equals_the_bytes_of_a_real_quantization(shape, blocksize, double_quant):
    """nf4.nf4_nbytes (what the memory estimate and load_pretrained's budget use) is exactly the bytes of the
    tensors quantize_nf4 produces: odd numel (a half-filled last byte), a partial last block, more than 256
    blocks (a second nested absmax), with and without double quant."""
    from lowrank_ext.nf4 import nf4_nbytes

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = lowrank_ext.quantize_nf4(w, blocksize, double_quant)
    real = sum(t.numel() * t.element_size() for t in q.tensors() if t is not None)
    assert nf4_nbytes(w.numel(), blocksize, double_quant) == real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dequantize_dtype_and_default(device, dtype):
    w = torch.randn(40, 72, device=device).to(dtype)
    q = lowrank_ext.quantize_nf4(w, 32)
    assert q.dtype == dtype and q.dequantize().dtype == dtype and q.dequantize().shape == w.shape
    f32 = q.dequantize(torch.float32)
    assert torch.equal(q.dequantize(torch.bfloat16), f32.to(torch.bfloat16))  # rounded once from fp32
    assert torch.equal(q.dequantize(torch.float16), f32.to(torch.float16))


def test_dequantize_out(device):
    w = torch.randn(33, 77, device=device)
    q = lowrank_ext.quantize_nf4(w, 64)
    buf = torch.empty(33 * 77, dtype=torch.bfloat16, device=device)
    got = q.dequantize(out=buf)
    assert got.shape == w.shape and got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, q.dequantize(torch.bfloat16))
    buf2 = torch.empty(33, 77, device=device)
    assert torch.equal(q.dequantize(torch.float32, out=buf2), q.dequantize())
    with pytest.raises(TypeError, match=r"NF4Weight.dequantize: out must have dtype torch.float16 \(the dtype "
                                        r"argument\), got torch.float32"):
        q.dequantize(torch.float16, out=buf2)
    with pytest.raises(TypeError, match=r"NF4Weight.dequantize: out must be a torch.Tensor, got ndarray"):
        q.dequantize(out=buf2.cpu().numpy())
    with pytest.raises(ValueError, match=r"dequantize_nf4_out: out must have 2541 elements, got 2540"):
        q.dequantize(out=torch.empty(2540, device=device))


def test_to_device():
    q = lowrank_ext.quantize_nf4(torch.randn(64, 64), 64)
    assert q.to("cpu") is q
    m = q.to("meta")
    assert m.device.type == "meta" and all(t.device.type == "meta" for t in m.tensors())
    assert m.shape == q.shape and m.nbytes == q.nbytes and m.dequantize().shape == q.shape  # fake kernel


@pytest.mark.skipif(not torch.cuda.is_available() or not lowrank_ext.has_cuda_kernels(), reason="needs CUDA")
def test_to_cuda_round_trip():
    q = lowrank_ext.quantize_nf4(torch.randn(64, 96), 64)
    g = q.to("cuda")
    assert torch.equal(g.dequantize().cpu(), q.dequantize())
    assert torch.equal(g.to("cpu").packed, q.packed)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"blocksize": 48}, ValueError, r"NF4Weight: blocksize must be one of \(32, 64, .*\), got 48"),
    ({"dtype": torch.float64}, ValueError, r"NF4Weight: dtype must be float32, float16 or bfloat16, got torch.float64"),
    ({"shape": (0, 4)}, ValueError, r"NF4Weight: shape must describe a non-empty weight, got \(0, 4\)"),
    ({"packed": "int8"}, ValueError, r"NF4Weight: packed must have dtype uint8, got torch.int8"),
    ({"packed": "short"}, ValueError, (r"NF4Weight: packed must hold \(numel\+1\)//2 = 2048 bytes for shape "
                                        r"\(64, 64\), got 2047")),
    ({"absmax": "short"}, ValueError, r"NF4Weight: absmax must have ceil\(numel/blocksize\) = 64 elements, got 63"),
    ({"absmax": "int32"}, ValueError, r"NF4Weight: absmax must be float32 or uint8 \(double quant\), got torch.int32"),
    ({"nested_absmax": None}, ValueError, r"NF4Weight: nested_absmax must be given when absmax is uint8"),
    ({"nested_map": "short"}, ValueError, r"NF4Weight: nested_map must have 256 elements, got 255"),
    ({"offset": "f64"}, ValueError, r"NF4Weight: offset must have dtype float32, got torch.float64"),
    ({"offset": "long"}, ValueError, r"NF4Weight: offset must have 1 element, got 2"),
    ({"nested_absmax": "long"}, ValueError, r"NF4Weight: nested_absmax must have 1 elements, got 2"),
    ({"absmax": "meta"}, ValueError, r"NF4Weight: absmax must be on packed's device cpu, got meta"),
])
def test_constructor_errors(kwargs, exc, pattern):
    q = lowrank_ext.quantize_nf4(torch.randn(64, 64), 64)
    args = {"packed": q.packed, "absmax": q.absmax, "shape": q.shape, "dtype": q.dtype, "blocksize": 64,
            "nested_absmax": q.nested_absmax, "nested_map": q.nested_map, "offset": q.offset}
    edits = {"int8": lambda t: t.view(torch.int8), "short": lambda t: t[:-1], "int32": lambda t: t.int(),
             "f64": lambda t: t.double(), "long": lambda t: torch.cat([t, t]), "meta": lambda t: t.to("meta")}
    for k, v in kwargs.items():
        args[k] = edits[v](args[k]) if isinstance(v, str) else v
    with pytest.raises(exc, match=pattern):
        NF4Weight(**args)


# ---------------------------------------------------------------------------------------------------
# state dicts vs a real bitsandbytes Linear4bit
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("shape,blocksize", [((48, 64), 64), ((300, 130), 128), ((520, 256), 64)], ids=str)
def test_state_dict_matches_bnb_linear4bit(bnb, dtype, double_quant, shape, blocksize):
    layer, dense = make_bnb_linear(bnb, *shape, dtype, double_quant, blocksize)
    theirs = {k: v for k, v in layer.state_dict().items() if k != "bias"}
    ours = lowrank_ext.quantize_nf4(dense, blocksize, double_quant=double_quant).to_bnb_state_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape, k
    assert json.loads(bytes(ours[QS].tolist())) == json.loads(bytes(theirs[QS].tolist()))
    for k, t in theirs.items():
        if k == "weight.absmax" and double_quant:  # bnb's CPU LUT: a few codes off on a small fraction
            diff = (ours[k].int() - t.int()).abs()
            assert int(diff.max()) <= 3 and float((diff > 0).float().mean()) < 0.01
        elif k == QS and double_quant:
            continue  # compared as JSON above (the text is equal too unless nested_offset prints differently)
        else:
            assert torch.equal(ours[k], t), k


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_load_bnb_state_dict(bnb, double_quant, dtype):
    layer, _ = make_bnb_linear(bnb, 300, 130, dtype, double_quant)
    sd = {"model.q_proj." + k: v for k, v in layer.state_dict().items()}
    q = NF4Weight.from_bnb_state_dict(sd, prefix="model.q_proj.")
    assert q.shape == (300, 130) and q.dtype == dtype and q.double_quant == double_quant
    ref = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert ref.dtype == dtype
    assert torch.equal(q.dequantize(), ref)
    # and back: our state dict of what we loaded is the one we read (no requantizing)
    again = q.to_bnb_state_dict(prefix="model.q_proj.")
    for k, v in again.items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_our_state_dict_drives_bnb_linear4bit(bnb, double_quant):
    # rows a multiple of the blocksize: bitsandbytes 0.50.2's CPU dequantize kernel mis-indexes some
    # blocks straddling rows (see test_nf4.py::test_dequantize_matches_bitsandbytes)
    torch.manual_seed(1)
    w, bias, x = torch.randn(96, 192), torch.randn(96), torch.randn(7, 192)
    q = lowrank_ext.quantize_nf4(w, 64, double_quant=double_quant)
    sd = q.to_bnb_state_dict()
    layer = bnb.nn.Linear4bit(192, 96, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, device="cpu",
                                                       module=layer)
    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    deq_bnb = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(deq_bnb, q.dequantize())
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, tF.linear(x, q.dequantize(), bias), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# corrupt / incomplete state dicts
# ---------------------------------------------------------------------------------------------------
def _good_sd(double_quant=True):
    return lowrank_ext.quantize_nf4(torch.randn(40, 64), 64, double_quant=double_quant).to_bnb_state_dict("p.")


def _qs(sd, **changes):
    meta = json.loads(bytes(sd["p." + QS].tolist()))
    meta.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del meta[k]
    sd["p." + QS] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"])
def test_missing_key(key):
    sd = _good_sd()
    del sd["p." + key]
    with pytest.raises(ValueError, match=rf"from_bnb_state_dict: p\.{key} must be present in the state dict, "
                                         r"got keys \["):
        NF4Weight.from_bnb_state_dict(sd, prefix="p.")


@pytest.mark.parametrize("corrupt,pattern", [
    (lambda sd: sd.update({"p." + QS: torch.tensor(list(b"{not json"), dtype=torch.uint8)}),
     rf"p\.{QS} must hold UTF-8 JSON, got Expecting property name"),
    (lambda sd: sd.update({"p." + QS: torch.tensor([0xFF, 0xFE], dtype=torch.uint8)}),
     rf"p\.{QS} must hold UTF-8 JSON, got 'utf-8' codec can't decode"),
    (lambda sd: sd.update({"p." + QS: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)}),
     rf"p\.{QS} must hold a JSON object, got list"),
    (lambda sd: _qs(sd, quant_type="fp4"), rf"p\.{QS}\['quant_type'\] must be 'nf4', got 'fp4'"),
    (lambda sd: _qs(sd, dtype="float64"), rf"p\.{QS}\['dtype'\] must be one of .*, got 'float64'"),
    (lambda sd: _qs(sd, blocksize=100), rf"p\.{QS}\['blocksize'\] must be one of .*, got 100"),
    (lambda sd: _qs(sd, shape=None), rf"p\.{QS}\['shape'\] must be present, got fields"),
    (lambda sd: _qs(sd, shape=[40, -64]), rf"p\.{QS}\['shape'\] must be a non-empty list of positive ints"),
    (lambda sd: _qs(sd, shape=[40, 66]), (r"p\.weight must hold \(numel\+1\)//2 = 1320 bytes for shape \[40, 66\] "
                                          rf"\(from p\.{QS}\), got 1280 bytes")),
    (lambda sd: _qs(sd, nested_offset=None), rf"p\.{QS}\['nested_offset'\] must be present with double quant"),
    (lambda sd: _qs(sd, nested_blocksize=128), rf"p\.{QS}\['nested_blocksize'\] must be 256, got 128"),
    (lambda sd: sd.update({"p.weight.quant_map": NF4_CODEBOOK.flip(0)}),
     r"p\.weight\.quant_map must equal the 16-entry NF4 codebook, got \[1\.0, 0\.7"),
    (lambda sd: sd.update({"p.weight.quant_map": torch.linspace(-1, 1, 16)}),
     r"p\.weight\.quant_map must equal the 16-entry NF4 codebook"),
    (lambda sd: sd.update({"p.weight.absmax": sd["p.weight.absmax"][:-1]}),
     r"p\.weight\.absmax must have ceil\(numel/blocksize\) = 40 elements, got 39"),
    (lambda sd: sd.update({"p.weight.absmax": sd["p.weight.absmax"].int()}),
     r"p\.weight\.absmax must be uint8 \(double quant\) or float32, got torch.int32"),
    (lambda sd: sd.update({"p.weight.nested_absmax": torch.ones(2)}),
     r"p\.weight\.nested_absmax must have 1 elements, got 2"),
    (lambda sd: sd.update({"p.weight.nested_quant_map": torch.ones(16)}),
     r"p\.weight\.nested_quant_map must have 256 elements, got 16"),
    (lambda sd: sd.update({"p.weight": [1, 2, 3]}), r"p\.weight must be a tensor, got list"),
    (lambda sd: sd.update({"p.weight": torch.zeros(1280, 1, dtype=torch.bool)}),
     r"p\.weight must have dtype uint8 \(or a bitsandbytes quant_storage int / float dtype\), got torch.bool"),
    (lambda sd: _qs(sd, shape=[True, 64]), rf"p\.{QS}\['shape'\] must be a non-empty list of positive ints"),
    # values that would dequantize to NaN / garbage
    (lambda sd: _qs(sd, nested_offset=float("nan")), rf"p\.{QS}\['nested_offset'\] must be a finite number, got nan"),
    (lambda sd: _qs(sd, nested_offset=float("inf")), rf"p\.{QS}\['nested_offset'\] must be a finite number, got inf"),
    (lambda sd: _qs(sd, nested_offset="0.5"), rf"p\.{QS}\['nested_offset'\] must be a finite number, got '0.5'"),
    (lambda sd: sd["p.weight.nested_absmax"].fill_(float("nan")),
     r"p\.weight\.nested_absmax must be finite and >= 0, got nan at index 0 \(1 bad elements\)"),
    (lambda sd: sd["p.weight.nested_absmax"].fill_(-1.0),
     r"p\.weight\.nested_absmax must be finite and >= 0, got -1.0 at index 0"),
    (lambda sd: sd.update({"p.weight.nested_absmax": sd["p.weight.nested_absmax"].half()}),
     r"p\.weight\.nested_absmax must have dtype float32, got torch.float16"),
    (lambda sd: sd.update({"p.weight.nested_absmax": sd["p.weight.nested_absmax"].long()}),
     r"p\.weight\.nested_absmax must have dtype float32, got torch.int64"),
    (lambda sd: sd.update({"p.weight.nested_quant_map": sd["p.weight.nested_quant_map"].flip(0)}),
     r"p\.weight\.nested_quant_map must be sorted ascending, got entry 0 = 1.0 > entry 1 = "),
    (lambda sd: sd["p.weight.nested_quant_map"].__setitem__(7, float("inf")),
     r"p\.weight\.nested_quant_map must be finite, got 1 NaN/Inf entries"),
    (lambda sd: sd.update({"p.weight.nested_quant_map": sd["p.weight.nested_quant_map"].double()}),
     r"p\.weight\.nested_quant_map must have dtype float32, got torch.float64"),
])
def test_corrupt_state_dict(corrupt, pattern):
    sd = _good_sd()
    corrupt(sd)
    with pytest.raises(ValueError, match=pattern):
        NF4Weight.from_bnb_state_dict(sd, prefix="p.")


@pytest.mark.parametrize("value,index", [(float("nan"), 3), (float("inf"), 0), (float("-inf"), 39), (-0.5, 12)])
def test_non_finite_or_negative_absmax_is_refused(value, index):
    # without double quant absmax is fp32 as stored: NaN / Inf / negative would dequantize to NaN or flip signs
    sd = _good_sd(double_quant=False)
    sd["p.weight.absmax"][index] = value
    with pytest.raises(ValueError, match=rf"from_bnb_state_dict: p\.weight\.absmax must be finite and >= 0, got "
                                         rf"{value} at index {index} \(1 bad elements\)"):
        NF4Weight.from_bnb_state_dict(sd, prefix="p.")


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_refuses_a_corrupt_linear4bit(bnb, double_quant):
    """from_bnb reads each bitsandbytes layer through its state dict, so the same checks apply."""
    layer, _ = make_bnb_linear(bnb, 40, 64, torch.float32, double_quant)
    qs = layer.weight.quant_state
    if double_quant:
        qs.state2.absmax[0] = float("inf")  # the nested absmax
        pattern = r"weight\.nested_absmax must be finite and >= 0, got inf at index 0"
    else:
        qs.absmax[5] = float("nan")
        pattern = r"weight\.absmax must be finite and >= 0, got nan at index 5"
    good, _ = make_bnb_linear(bnb, 64, 40, torch.float32, double_quant)
    model = torch.nn.Sequential(good, layer)  # the corrupt layer second: the first must not be replaced either
    with pytest.raises(ValueError, match=pattern):
        lowrank_ext.from_bnb(model)
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in model)  # nothing replaced


def test_quant_storage_other_dtype_loads():
    """bitsandbytes may store the packed bytes as another dtype (quant_storage); the bytes are what count."""
    q = lowrank_ext.quantize_nf4(torch.randn(32, 64), 64)
    sd = q.to_bnb_state_dict()
    sd["weight"] = sd["weight"].view(-1).view(torch.bfloat16).view(-1, 1)
    assert torch.equal(NF4Weight.from_bnb_state_dict(sd).dequantize(), q.dequantize())


def test_deepcopy_and_pickle_round_trip():
    import copy
    import io
    import pickle

    w = lowrank_ext.quantize_nf4(torch.randn(48, 80), blocksize=64)
    for clone in (copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert isinstance(clone, lowrank_ext.NF4Weight)
        assert clone.packed.data_ptr() != w.packed.data_ptr()
        assert torch.equal(clone.dequantize(), w.dequantize())
    buf = io.BytesIO()
    torch.save(w.to_bnb_state_dict(), buf)  # the recommended (weights_only-safe) path
    buf.seek(0)
    back = lowrank_ext.NF4Weight.from_bnb_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(back.dequantize(), w.dequantize())

"""The NF4Weight of an NF4 layer (Linear4bit, QLoRALinear) is built once and cached (nn/linear4bit.py,
NF4WeightHolder.weight): forward never rebuilds it, and every way the layer's tensors can change rebuilds it —
a device move (`_apply`), load_state_dict, requantizing, `p.data = ...`, buffers replaced, FSDP2's
unshard / reshard (the sharded layer keeps refusing with the DTensor error). In-place writes need no rebuild
(the cached weight views the parameters).

Oracle: a second layer quantized independently from other values; after the change the first layer must
compute exactly what the second one computes (same bytes, same kernel).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_ext.nn import Linear4bit, QLoRALinear
from lowrank_ext.nn.linear4bit import NF4WeightHolder

LAYERS = {
    "linear4bit": lambda lin, dq: Linear4bit.from_linear(lin, double_quant=dq),
    "qlora": lambda lin, dq: QLoRALinear.from_linear(lin, r=4, double_quant=dq),
}


def pair(kind: str, dq: bool = True):
    """(layer, other): the same architecture, weights drawn from different seeds; LoRA B non-zero, equal."""
    layers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        layers.append(LAYERS[kind](nn.Linear(96, 40), dq))
    if kind == "qlora":
        for layer in layers:
            with torch.no_grad():
                layer.lora_B["default"].fill_(0.01)
                layer.lora_A["default"].copy_(layers[0].lora_A["default"])
    return layers


X = torch.randn(3, 96, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", LAYERS)
def test_forward_never_rebuilds_the_weight(monkeypatch, kind):
    layer, _ = pair(kind)
    first = layer.weight
    assert layer.weight is first  # cached

    def rebuilt(self):
        raise AssertionError("the NF4Weight was rebuilt")

    monkeypatch.setattr(NF4WeightHolder, "_build_weight", rebuilt)
    with torch.no_grad():
        layer(X)
    with torch.inference_mode():
        layer(X)
    layer.train()
    x = X.clone().requires_grad_(True)
    layer(x).sum().backward()  # forward and backward with gradients
    assert x.grad is not None and layer.weight is first


def _copy_tensors(dst: NF4WeightHolder, src: NF4WeightHolder, how: str) -> None:
    for name in ("weight_packed", "weight_absmax"):
        if how == "data":  # new storage, same Parameter objects
            getattr(dst, name).data = getattr(src, name).data.clone()
        else:  # in place: same storage
            getattr(dst, name).data.copy_(getattr(src, name).data)
    dst.bias.data.copy_(src.bias.data)  # not part of the NF4 weight
    for name in ("weight_nested_absmax", "weight_nested_map", "weight_offset"):
        if getattr(src, name) is None:  # fp32 absmax: no double-quant constants
            continue
        if how == "data":
            setattr(dst, name, getattr(src, name).clone())  # a buffer replaced
        else:
            getattr(dst, name).copy_(getattr(src, name))


CHANGES = {
    "load_state_dict": lambda layer, other: layer.load_state_dict(other.state_dict()),
    "data_swap": lambda layer, other: _copy_tensors(layer, other, "data"),
    "in_place": lambda layer, other: _copy_tensors(layer, other, "in_place"),
}


@pytest.mark.parametrize("dq", [True, False], ids=["double_quant", "fp32_absmax"])
@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("kind", LAYERS)
def test_weight_follows_every_change_of_the_tensors(kind, change, dq):
    layer, other = pair(kind, dq)
    with torch.no_grad():
        before, expected = layer(X), other(X)
        assert not torch.equal(before, expected)
        CHANGES[change](layer, other)
        assert torch.equal(layer(X), expected)
        assert torch.equal(layer.weight.dequantize(), other.weight.dequantize())


def test_requantizing_merge_rebuilds_the_weight():
    layer, _ = pair("qlora")
    with torch.no_grad():
        old = layer.weight
        expected = layer(X)
        layer.merge(requantize=True)  # NF4(deq(W) + s·B·A): new parameters
        assert layer.weight is not old
        assert torch.equal(layer.weight.packed, layer.weight_packed.view(-1, 1))
        assert (layer(X) - expected).abs().max() < 0.1 * expected.abs().max()  # the adapter folded in (lossy)


@pytest.mark.parametrize("kind", LAYERS)
def test_device_move_rebuilds_the_weight(kind):
    layer, _ = pair(kind)
    cpu_weight = layer.weight
    layer.half()  # dtype casts leave the NF4 tensors alone: the cached weight stays valid
    assert layer.weight is cpu_weight and layer.weight_packed.dtype == torch.uint8
    layer.to("meta")  # _apply moves the NF4 tensors (`.data` swapped in place)
    w = layer.weight
    assert w.device.type == "meta" and w.packed.device.type == "meta" and w.nested_absmax.device.type == "meta"


@pytest.mark.parametrize("kind", LAYERS)
def test_fsdp2_unshard_reshard(kind):
    """FSDP2 (one process, world size 1) swaps the layer's Parameter objects between DTensor shards and the
    gathered tensors, and frees / re-allocates the gathered storage: the cached weight must follow."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.fsdp import fully_shard

    layer, _ = pair(kind)
    with torch.no_grad():
        expected = layer(X)
    _ = layer.weight  # cached before sharding: must not survive it
    root = nn.Sequential(layer)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(layer)
        fully_shard(root)
        assert layer.nf4_sharded
        with pytest.raises(ValueError, match=r"weight_packed must be the whole \(unsharded\) NF4 weight to compute "
                                             r"with it, got a DTensor shard"):
            _ = layer.weight
        for _ in range(2):  # the hooks gather the bytes for each forward and reshard after it
            with torch.no_grad():
                assert torch.equal(root(X), expected)
            assert layer.nf4_sharded
        layer.unshard()
        assert layer.weight.packed.data_ptr() == layer.weight_packed.data_ptr()
        layer.reshard()
        with pytest.raises(ValueError, match="got a DTensor shard"):
            _ = layer.weight
    finally:
        dist.destroy_process_group()

"""The multi-process scenarios of tests/test_distributed.py: run on every rank of a 2-process gloo group.

Each scenario trains / shards tiny models and returns plain numbers and flags; `run_all` runs them one
after the other in one process group (process start-up is the expensive part on 2 cores) and writes each
rank's results to <out>/rank<r>.json, a failing scenario recording its traceback instead of stopping the
others. The references are computed on every rank: an unsharded copy of the model whose gradients are
averaged across the ranks (all_reduce AVG), which is what FSDP2 / DDP must reproduce bit for bit.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import traceback
import weakref

import torch
import torch.distributed as dist
from torch import nn

import lowrank_ext as L
from lowrank_ext import distributed as LD
from lowrank_ext.nn.linear4bit import NF4WeightHolder

STEPS = 3


# ------------------------------------------------------------------------------------------ models and data
def tiny(seed: int = 0, dropout: float = 0.0, double_quant: bool = True) -> nn.Module:
    from _tiny_models import tiny_llama

    m = tiny_llama(seed)
    L.inject(m, L.LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear", quantize="nf4",
                             double_quant=double_quant))
    _randomize(m)
    return m


class Toy(nn.Module):
    """Two blocks of odd-sized QLoRA layers: 66x35 weights have 1155 packed rows and 37 absmax blocks, so no
    tensor divides evenly across 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(66, 35), nn.GELU(), nn.Linear(35, 66)) for _ in range(2))
        self.head = nn.Linear(66, 5)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Toy()
    L.inject(m, L.LoRAConfig(r=3, alpha=6, target_modules=["0", "2"], quantize="nf4"))
    _randomize(m)
    return m


@torch.no_grad()
def _randomize(m: nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def llama_batch(step: int, rank: int, world: int) -> torch.Tensor:
    from _tiny_models import tokens

    return tokens(seed=100 + step * world + rank, batch=2, seq=8)


def llama_loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return m(input_ids=ids, labels=ids).loss


def toy_batch(step: int, rank: int, world: int) -> torch.Tensor:
    return torch.randn(3, 66, generator=torch.Generator().manual_seed(500 + step * world + rank))


def toy_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(x).pow(2).mean()


def trainable(m: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def ref_step(ref: nn.Module, opt, loss: torch.Tensor) -> float:
    """The unsharded reference: local backward, gradients averaged over the ranks, one step."""
    loss.backward()
    for p in trainable(ref):
        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def parity_run(model: nn.Module, ref: nn.Module, opt, ropt, batch, loss_fn, rank: int, world: int):
    """STEPS steps of the distributed model and of the unsharded reference on the same per-rank batches:
    (the model's losses, the reference's losses)."""
    losses, refs = [], []
    for s in range(STEPS):
        x = batch(s, rank, world)
        loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        refs.append(ref_step(ref, ropt, loss_fn(ref, x)))
    return losses, refs


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole (gathered from their shards)."""
    return {n.removeprefix("module."): full(p.detach()).clone() for n, p in m.named_parameters() if p.requires_grad}


def lora_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = lora_state(a), lora_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


# ------------------------------------------------------------------------------------------ scenarios
def fsdp_parity(rank: int, world: int, tmp: str) -> dict:
    """Loss at every step and the LoRA parameters equal to the averaged-gradient reference, for the tiny Llama
    and the odd-sized toy, with torch's AdamW and our three optimizers (8-bit: against the same optimizer run on
    each rank's rows as separate tensors: its blocks are per shard)."""
    out = {}
    cases = [("llama", tiny, llama_batch, llama_loss), ("toy", toy, toy_batch, toy_loss)]
    opts = {"torch.AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2), "PagedAdamW": lambda ps: L.optim.PagedAdamW(ps, lr=1e-2)}
    for kind, build, batch, loss_fn in cases:
        for oname, make in opts.items():
            m, ref = build(), build()
            concat = build()  # one process on the concatenated batch of all ranks
            LD.shard_model(m)
            opt, ropt, copt = make(trainable(m)), make(trainable(ref)), make(trainable(concat))
            losses, refs = parity_run(m, ref, opt, ropt, batch, loss_fn, rank, world)
            concats = []
            for s in range(STEPS):
                xs = torch.cat([batch(s, r, world) for r in range(world)])
                closs = loss_fn(concat, xs)
                closs.backward()
                copt.step()
                copt.zero_grad()
                concats.append(closs.item())
            mean = torch.tensor(losses)
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            out[f"{kind}/{oname}"] = {"losses": losses, "ref": refs, "equal": losses == refs,
                                      "lora_equal": lora_equal(m, ref),
                                      "concat_close": bool(torch.allclose(mean, torch.tensor(concats), atol=2e-5,
                                                                          rtol=1e-5)),
                                      "mean": mean.tolist(), "concat": concats}
    # 8-bit state: each rank steps its rows; the reference steps the same rows of the averaged gradient
    for cls in (L.optim.AdamW8bit, L.optim.PagedAdamW8bit):
        m, ref = toy(), toy()
        LD.shard_model(m)
        opt = cls(trainable(m), lr=1e-2, min_8bit_size=1)
        names = [n for n, p in ref.named_parameters() if p.requires_grad]
        sharded = dict(m.named_parameters())
        rows = {n: LD._shard_range(sharded[n]) for n in names}
        pieces = {n: nn.Parameter(dict(ref.named_parameters())[n].detach()[slice(*rows[n])].clone()) for n in names}
        ropt = cls(list(pieces.values()), lr=1e-2, min_8bit_size=1)
        ok = True
        for s in range(STEPS):
            x = toy_batch(s, rank, world)
            loss = toy_loss(m, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rl = toy_loss(ref, x)
            rl.backward()
            ok &= loss.item() == rl.item()
            for n, p in ref.named_parameters():
                if p.requires_grad:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
                    pieces[n].grad = p.grad[slice(*rows[n])].clone()
                    p.grad = None
            ropt.step()
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    if p.requires_grad:  # the reference's params become the stepped rows, gathered
                        got = [torch.empty_like(p) for _ in range(world)]
                        padded = torch.zeros_like(p)
                        padded[: rows[n][1] - rows[n][0]] = pieces[n]
                        dist.all_gather(got, padded)
                        starts = [0] + [min(-(-p.shape[0] // world) * (r + 1), p.shape[0]) for r in range(world)]
                        p.copy_(torch.cat([g[: starts[r + 1] - starts[r]] for r, g in enumerate(got)]))
        st = next(iter(opt.state.values()))
        out[f"toy/{cls.__name__}"] = {"equal": ok, "lora_equal": lora_equal(m, ref),
                                      "state_keys": sorted(st), "absmax_shape": list(st["absmax1"].shape)}
    return out


def memory(rank: int, world: int, tmp: str) -> dict:
    """Each rank's local NF4 bytes <= ceil(total / world) rows (plus FSDP2's padding of the last shard), and the
    full-size tensors the model held before sharding are freed."""
    out = {}
    for kind, build in (("llama", tiny), ("toy", toy)):
        m = build()
        refs = [weakref.ref(p) for mod in m.modules() if isinstance(mod, NF4WeightHolder) for p in mod.nf4_parameters()]
        storages = [weakref.ref(r()) for r in refs]
        total_before = LD.nf4_bytes(m)[1]
        LD.shard_model(m)
        gc.collect()
        rows_ok, pad_ok, uneven, p_local, p_total, n_tensors = True, True, 0, 0, 0, 0
        for mod in m.modules():
            if isinstance(mod, NF4WeightHolder):
                for p in mod.nf4_parameters():
                    local = p.to_local()
                    p_local, p_total, n_tensors = p_local + local.numel(), p_total + p.numel(), n_tensors + 1
                    n = p.shape[0]
                    row = p[0].numel() if p.dim() > 1 else 1
                    rows_ok &= local.shape[0] <= math.ceil(n / world)
                    # the padded storage FSDP2 keeps: exactly ceil(n / world) rows
                    pad_ok &= local.untyped_storage().nbytes() <= math.ceil(n / world) * row
                    uneven += n % world != 0
        local, total = LD.nf4_bytes(m)
        out[kind] = {"local": local, "total": total, "total_before": total_before, "rows_ok": bool(rows_ok),
                     "param_local": p_local, "param_total": p_total, "n_tensors": n_tensors,
                     "padding_ok": bool(pad_ok), "uneven_tensors": uneven,
                     "freed": all(r() is None for r in refs) and all(s() is None for s in storages)}
    return out


def mixed_precision(rank: int, world: int, tmp: str) -> dict:
    """bf16 MixedPrecisionPolicy: inside the forward the gathered NF4 bytes are uint8 and equal the originals
    (and the fp32 absmax of a plain-NF4 model, kept as bytes, too); LoRA runs in bf16; training leaves the
    bytes unchanged."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    out = {}
    for dq in (True, False):
        m = tiny(double_quant=dq)
        layer = m.model.layers[0].self_attn.q_proj
        want = {n: getattr(layer, n).detach().clone() for n in ("weight_packed", "weight_absmax")}
        want_w = layer.weight
        seen = {}

        def hook(mod, args, want=want, want_w=want_w, seen=seen):
            w = mod.weight
            seen["dtypes"] = [str(getattr(mod, n).dtype) for n in want]
            seen["bytes_equal"] = all(torch.equal(getattr(mod, n), t) for n, t in want.items())
            seen["absmax_equal"] = torch.equal(w.absmax, want_w.absmax) and w.absmax.dtype == want_w.absmax.dtype
            seen["lora_dtype"] = str(mod.lora_A["default"].dtype)
            seen["x_dtype"] = str(args[0].dtype)

        layer.register_forward_pre_hook(hook)
        LD.shard_model(m, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        opt = L.optim.PagedAdamW(trainable(m), lr=1e-2)
        calls = _OpCounter()
        for s in range(2):
            ids = llama_batch(s, rank, world)
            with calls if s == 0 else _nothing():
                llama_loss(m, ids).backward()
            opt.step()
            opt.zero_grad()
        seen["op_calls"] = dict(calls.counts)  # the fused ops ran, once per layer, on the gathered weight
        seen["resharded_after"] = LD.is_sharded(layer.weight_packed)
        after = all(torch.equal(full(getattr(layer, n).detach()), t) for n, t in want.items())
        # a sharded model's state_dict(): bitsandbytes' keys, the bytes as DTensor shards of the global tensors
        sd = m.state_dict()
        pre = "model.layers.0.self_attn.q_proj."
        w, a = sd[pre + "weight"], sd[pre + "weight.absmax"]
        sd_ok = (type(w).__name__ == "DTensor" and tuple(w.shape) == tuple(want_w.packed.shape)
                 and torch.equal(w.full_tensor(), want_w.packed) and a.dtype == want_w.absmax.dtype
                 and torch.equal(a.full_tensor(), want_w.absmax) and pre + "weight_packed" not in sd)
        out["dq" if dq else "plain"] = {**seen, "unchanged_after_training": after, "state_dict_ok": sd_ok}
    return out


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the lowrank_ext ops dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("lowrank_ext."):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def negatives(rank: int, world: int, tmp: str) -> dict:
    """The clear errors: a sharded layer called outside FSDP's hooks, loading a state dict into a sharded layer,
    FSDP1 on our layers (torch's own refusal at construction) and shard_model on a model FSDP1 wraps."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    out = {}

    def err(fn) -> str:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (the message is the result)
            return f"{type(e).__name__}: {e}"
        return "no error"

    m = tiny()
    sd = copy.deepcopy(m).state_dict()
    LD.shard_model(m)
    out["outside_hooks"] = err(lambda: m.model.layers[0].self_attn.q_proj(torch.randn(2, 64)))
    out["print_ok"] = "QLoRALinear" in repr(m)  # printing a sharded model needs no weight
    out["load_sharded"] = err(lambda: m.model.layers[0].self_attn.q_proj.load_state_dict(
        {k.removeprefix("model.layers.0.self_attn.q_proj."): v for k, v in sd.items()
         if k.startswith("model.layers.0.self_attn.q_proj.")}))
    cpu = torch.device("cpu")
    out["fsdp1_model"] = err(lambda: FSDP1(tiny(), device_id=cpu))
    out["fsdp1_layer"] = err(lambda: FSDP1(L.nn.QLoRALinear.from_linear(nn.Linear(64, 32), r=2), device_id=cpu))
    m2 = tiny()
    m2.model.embed_tokens = FSDP1(m2.model.embed_tokens, device_id=cpu)
    out["shard_fsdp1"] = err(lambda: LD.shard_model(m2))
    # 8-bit optimizer state saved by one process (absmax per whole tensor) into a sharded optimizer
    single, sharded = toy(), LD.shard_model(toy())
    o1 = L.optim.AdamW8bit(trainable(single), min_8bit_size=1)
    toy_loss(single, toy_batch(0, 0, 1)).backward()
    o1.step()
    o2 = L.optim.AdamW8bit(trainable(sharded), min_8bit_size=1)
    out["load_8bit_unsharded"] = err(lambda: o2.load_state_dict(o1.state_dict()))
    # parameters sharded on two mesh dimensions (8-bit blocks need one), or placed other than Shard(0)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh2 = init_device_mesh("cpu", (world, 1))
    p = nn.Parameter(DTensor.from_local(torch.zeros(4, 4), mesh2, [Shard(0), Shard(1)]))
    p.grad = DTensor.from_local(torch.ones(4, 4), mesh2, [Shard(0), Shard(1)])
    out["two_shard_dims"] = err(lambda: L.optim.AdamW8bit([p], min_8bit_size=1).step())
    mesh1 = init_device_mesh("cpu", (world,))
    out["replicated_range"] = err(lambda: LD._shard_range(DTensor.from_local(torch.zeros(4), mesh1, [Replicate()])))
    return out


def ddp(rank: int, world: int, tmp: str) -> dict:
    """wrap_ddp: bit-identical to the averaged-gradient reference, and after construction no NF4 byte is
    broadcast again (DDP's per-forward buffer broadcast carries only the model's other buffers)."""
    sent: list[int] = []
    orig = dist._broadcast_coalesced

    def counting(pg, tensors, *a, **k):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return orig(pg, tensors, *a, **k)

    m, ref = tiny(), tiny()
    dist._broadcast_coalesced = counting
    try:
        dm = LD.wrap_ddp(m)
        at_init = sum(sent)
        sent.clear()
        opt, ropt = L.optim.PagedAdamW(trainable(dm), lr=1e-2), L.optim.PagedAdamW(trainable(ref), lr=1e-2)
        losses, refs = parity_run(dm, ref, opt, ropt, llama_batch, llama_loss, rank, world)
    finally:
        dist._broadcast_coalesced = orig
    nf4_total = LD.nf4_bytes(m)[1]
    other_buffers = sum(b.numel() * b.element_size() for n, b in m.named_buffers() if not n.split(".")[-1].startswith("weight_"))
    return {"equal": losses == refs, "losses": losses, "lora_equal": lora_equal(m, ref), "bytes_at_init": at_init,
            "bytes_per_step": sum(sent) / STEPS, "nf4_total": nf4_total, "other_buffer_bytes": other_buffers}


def _sched(opt):
    from lowrank_ext.finetune.trainer import warmup_cosine

    return warmup_cosine(opt, 2, 4)


def checkpoint_resume(rank: int, world: int, tmp: str) -> dict:
    """4 steps uninterrupted vs 2 steps, save_checkpoint (adapter + optimizer + schedule + RNG), a fresh model,
    load_checkpoint, 2 more: every loss and the final LoRA bit-identical (dropout on: the RNG matters). Then the
    8-bit state refuses a model sharded over a different number of ranks, and 32-bit state reshards."""
    out = {}
    for cls in (L.optim.PagedAdamW, L.optim.AdamW8bit):
        def run(m, opt, sched, steps):
            losses = []
            for s in steps:
                ids = llama_batch(s, rank, world)
                loss = llama_loss(m, ids)
                loss.backward()
                opt.step()
                opt.zero_grad()
                sched.step()
                losses.append(loss.item())
            return losses

        def fresh(mesh=None, cls=cls):
            m = tiny(dropout=0.1)
            m.train()
            LD.shard_model(m, mesh=mesh)
            opt = cls(trainable(m), lr=1e-2, min_8bit_size=64)
            return m, opt, _sched(opt)

        torch.manual_seed(1234 + rank)
        a = fresh()
        straight = run(*a, range(4))
        torch.manual_seed(1234 + rank)
        b = fresh()
        first = run(*b, range(2))
        d = os.path.join(tmp, f"ckpt_{cls.__name__}")
        LD.save_checkpoint(d, b[0], b[1], {"scheduler": b[2].state_dict(), "step": 2,
                                           f"rng.rank{rank}": torch.get_rng_state()})
        torch.manual_seed(999)  # the resumed run must take its RNG from the checkpoint
        c = fresh()
        extra = LD.load_checkpoint(d, c[0], c[1], {"scheduler": c[2].state_dict(), "step": 0,
                                                   f"rng.rank{rank}": torch.get_rng_state()})
        c[2].load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra[f"rng.rank{rank}"])
        second = run(*c, range(2, 4))
        res = {"straight": straight, "resumed": first + second, "equal": straight == first + second,
               "lora_equal": lora_equal(c[0], a[0]), "step": extra["step"],
               "lr": c[1].param_groups[0]["lr"] == a[1].param_groups[0]["lr"]}
        # a model sharded over 1 rank (a size-1 sub-mesh of each process) reads the 2-rank checkpoint
        from torch.distributed.device_mesh import init_device_mesh

        mesh1 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("rep", "shard"))["shard"]
        e = fresh(mesh1)
        try:
            LD.load_checkpoint(d, e[0], e[1], {})
            res["other_world"] = "loaded"
            key = next(p for p in trainable(e[0]))
            res["other_world_state_equal"] = torch.equal(
                e[1].state[key]["exp_avg"].to_local(),
                b[1].state[trainable(b[0])[0]]["exp_avg"].full_tensor()) if cls is L.optim.PagedAdamW else None
        except ValueError as err:
            res["other_world"] = str(err)
        out[cls.__name__] = res
    return out


def export(rank: int, world: int, tmp: str) -> dict:
    """save_adapter from the sharded run writes the global tensors once (rank 0), equal to what one process
    writes after the same (averaged-gradient) training."""
    m, ref = tiny(), tiny()
    LD.shard_model(m)
    opt, ropt = L.optim.PagedAdamW(trainable(m), lr=1e-2), L.optim.PagedAdamW(trainable(ref), lr=1e-2)
    parity_run(m, ref, opt, ropt, llama_batch, llama_loss, rank, world)
    L.save_adapter(m, os.path.join(tmp, "adapter_sharded"))
    if rank == 0:
        L.save_adapter(ref, os.path.join(tmp, "adapter_single"))
    dist.barrier()
    return {"files": sorted(os.listdir(os.path.join(tmp, "adapter_sharded")))}


def materialize(rank: int, world: int, tmp: str) -> dict:
    """A model built on the meta device, sharded, then materialized: from the dense checkpoint each rank
    quantizes whole tensors and keeps its rows (bytes equal to sharding the fully built model); from a 4-bit
    safetensors file (bitsandbytes' layout) each rank reads its rows only; losses equal."""
    from _tiny_models import tiny_llama
    from safetensors.torch import save_file
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    dense = tiny_llama(0)
    dense_path, q_path = os.path.join(tmp, "dense.safetensors"), os.path.join(tmp, "qlora.safetensors")
    ref_full = tiny()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, dense_path)
        save_file({k: v.contiguous().clone() for k, v in ref_full.state_dict().items()}, q_path)
    dist.barrier()
    rotary = {f"model.rotary_emb.{n}": b for n, b in LlamaRotaryEmbedding(dense.config).named_buffers()}
    ref = LD.shard_model(copy.deepcopy(ref_full))
    out = {}
    for src in ("dense", "4bit"):
        with torch.device("meta"):
            m = type(dense)(dense.config)
        L.inject(m, L.LoRAConfig(r=4, alpha=8, target_modules="all-linear", quantize="nf4"))
        LD.shard_model(m)
        whole, part = [], []  # what materialize reads: whole tensors, and row ranges
        get, rows = LD._Source.get, LD._Source.rows
        LD._Source.get = lambda self, k, whole=whole, get=get: whole.append(k) or get(self, k)
        LD._Source.rows = lambda self, k, a, b, part=part, rows=rows: part.append((k, b - a)) or rows(self, k, a, b)
        try:
            LD.materialize(m, dense_path if src == "dense" else q_path, "cpu", extra=rotary, seed=0)
        finally:
            LD._Source.get, LD._Source.rows = get, rows
        mine, theirs = dict(m.named_parameters()), dict(ref.named_parameters())
        nf4 = [n for n in mine if n.split(".")[-1] in ("weight_packed", "weight_absmax")]
        res = {"nf4_bytes_equal": all(torch.equal(mine[n].to_local(), theirs[n].to_local()) for n in nf4),
               "consts_equal": all(torch.equal(b, dict(ref.named_buffers())[n]) for n, b in m.named_buffers()),
               "local_bytes": LD.nf4_bytes(m)[0]}
        if src == "dense":
            res["lora_B_zero"] = all(float(full(p.detach()).abs().max()) == 0 for n, p in mine.items() if "lora_B" in n)
            res["frozen_equal"] = all(torch.equal(mine[n].to_local(), theirs[n].to_local()) for n in mine
                                      if not mine[n].requires_grad and n not in nf4)
        else:
            res["all_equal"] = all(torch.equal(mine[n].to_local(), theirs[n].to_local()) for n in mine)
            # the NF4 bytes were read as this rank's row ranges only, never whole
            res["bytes_read_whole"] = [k for k in whole if k.endswith((".weight", ".weight.absmax"))
                                       and ("_proj." in k)]
            res["row_reads"] = len(part)
            res["rows_read_at_most_half"] = all(
                n <= math.ceil(dict(ref_full.named_parameters())[k.removesuffix(".absmax").removesuffix(".weight")
                                                               + (".weight_absmax" if k.endswith("absmax")
                                                                  else ".weight_packed")].shape[0] / world)
                for k, n in part)
            ids = llama_batch(0, rank, world)
            res["loss_equal"] = llama_loss(m, ids).item() == llama_loss(ref, ids).item()
        out[src] = res
    return out


def materialize_archs(rank: int, world: int, tmp: str) -> dict:
    """FSDP2 materialize parity beyond the Llama layout: GPT-2 (Conv1D weights stored [in, out], a tied head) and
    Qwen2 (a Llama-family model with q/k/v biases), dense LoRA and QLoRA. A meta model, injected and sharded,
    materialized from the saved directory with the adapter tensors of a reference, must give the logits of
    inject(from_pretrained) with those adapter tensors, unsharded."""
    from _tiny_models import tiny_gpt2, transformers

    def qwen2(seed: int = 0) -> nn.Module:
        cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(seed)
        return transformers.Qwen2ForCausalLM(cfg).eval()

    out = {}
    for arch, build, targets in (("gpt2", tiny_gpt2, ["c_attn", "c_proj", "c_fc"]), ("qwen2", qwen2, "all-linear")):
        path = os.path.join(tmp, f"{arch}_dir")
        if rank == 0:
            build(0).save_pretrained(path)
        dist.barrier()
        cls = type(build(0))
        for quantize in (None, "nf4"):
            config = L.LoRAConfig(r=4, alpha=8, target_modules=targets, quantize=quantize)
            ref = L.inject(cls.from_pretrained(path).eval(), config)
            _randomize(ref)  # the same values on every rank (a fixed generator)
            adapters = {n: p.detach().clone() for n, p in ref.named_parameters() if "lora_" in n}
            buffers = {n: b for n, b in cls.from_pretrained(path).named_buffers()}  # rotary inv_freq (Qwen2)
            with torch.device("meta"):
                m = cls(ref.config)
            L.inject(m, config)
            LD.shard_model(m)
            LD.materialize(m, path, "cpu", extra={**buffers, **adapters})
            ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(11 + rank))
            with torch.no_grad():
                got, want = m.eval()(input_ids=ids).logits, ref(input_ids=ids).logits
            out[f"{arch}/{quantize or 'dense'}"] = {"equal": bool(torch.equal(got, want)),
                                                     "max_diff": float((got - want).abs().max()),
                                                     "sharded": any(LD.is_sharded(p) for p in m.parameters())}
    return out


def trainer_resume(rank: int, world: int, tmp: str) -> dict:
    """finetune's DistTrainer (FSDP and DDP): 4 steps straight vs 2 steps + a sharded checkpoint + a new trainer
    resuming for 2 more: the same history and LoRA, bit for bit (dropout on, so each rank's RNG matters)."""
    from lowrank_ext.finetune.parallel import DistContext, DistTrainer
    from lowrank_ext.finetune.trainer import TrainConfig

    out = {}
    for parallel in ("fsdp", "ddp"):
        ctx = DistContext(rank, world, rank, torch.device("cpu"), parallel)
        cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=2, progress=False)
        evals = [llama_batch(99, 0, 1)]

        def trainer(d, ctx=ctx, cfg=cfg, evals=evals):
            m = tiny(dropout=0.1)
            m.train()
            torch.manual_seed(77 + rank)
            return DistTrainer(ctx.wrap(m), lambda i: llama_batch(i, rank, world), evals, cfg, dist=ctx,
                               optimizer=lambda ps, lr: L.optim.PagedAdamW8bit(ps, lr=lr, min_8bit_size=64),
                               checkpoint_dir=d)

        d1, d2 = os.path.join(tmp, f"t1_{parallel}"), os.path.join(tmp, f"t2_{parallel}")
        a = trainer(d1)
        ra = a.train()
        b = trainer(d2)
        b.config = TrainConfig(**{**cfg.__dict__, "steps": 2})  # stops after the checkpoint at step 2
        b.train()
        c = trainer(d2)
        torch.manual_seed(5)  # the resumed RNG comes from the checkpoint
        rc = c.train(resume=True)
        errors = {}
        if parallel == "fsdp":  # a checkpoint from one process, none at all, a different run: clear refusals
            from lowrank_ext.finetune.trainer import Trainer

            single_dir = os.path.join(tmp, f"single_rank{rank}")
            plain = tiny()
            Trainer(plain, lambda i: llama_batch(i, 0, 1), evals, cfg, checkpoint_dir=single_dir).save_checkpoint()
            for key, d in (("single", single_dir), ("missing", os.path.join(tmp, "nothing_here"))):
                try:
                    trainer(d).load_checkpoint()
                except (ValueError, FileNotFoundError) as e:
                    errors[key] = f"{type(e).__name__}: {e}"
            other = trainer(d2)
            other.fingerprint["seq_len"] = 99
            try:
                other.load_checkpoint()
            except ValueError as e:
                errors["other_run"] = str(e)
        out[parallel] = {"errors": errors,
                         "straight": [h["loss"] for h in ra.history], "resumed": [h["loss"] for h in rc.history],
                         "equal": [h["loss"] for h in ra.history] == [h["loss"] for h in rc.history],
                         "lora_equal": lora_equal(a.model, c.model), "eval_equal": ra.eval_after == rc.eval_after,
                         "files": sorted(os.listdir(d2))}
    return out


def hsdp(rank: int, world: int, tmp: str) -> dict:
    """shard_model on a 2-D mesh (HSDP: replicate x shard). On (2, 1) every rank holds whole tensors and FSDP2
    all-reduces gradients across the replicate dimension: equal to the averaged-gradient reference, 8-bit state
    included (one shard: the blocks of an unsharded tensor)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    m, ref = toy(), toy()
    LD.shard_model(m, mesh=mesh)
    opt = L.optim.AdamW8bit(trainable(m), lr=1e-2, min_8bit_size=1)
    ropt = L.optim.AdamW8bit(trainable(ref), lr=1e-2, min_8bit_size=1)
    losses, refs = parity_run(m, ref, opt, ropt, toy_batch, toy_loss, rank, world)
    p = trainable(m)[0]
    return {"equal": losses == refs, "lora_equal": lora_equal(m, ref), "placements": str(tuple(p.placements)),
            "absmax_shape": list(opt.state[p]["absmax1"].shape), "blocks": len(LD.transformer_blocks(m)),
            "embedding_units": len(LD.embedding_units(tiny())), "tied_units": len(LD.embedding_units(_tied()))}


def _tied() -> nn.Module:
    from _tiny_models import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


SCENARIOS = {"fsdp_parity": fsdp_parity, "memory": memory, "mixed_precision": mixed_precision,
             "negatives": negatives, "ddp": ddp, "checkpoint_resume": checkpoint_resume, "export": export,
             "materialize": materialize, "materialize_archs": materialize_archs, "trainer_resume": trainer_resume, "hsdp": hsdp}


def run_all(rank: int, world: int, port: int, tmp: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for name in names:
            try:
                results[name] = SCENARIOS[name](rank, world, tmp)
            except Exception:  # noqa: BLE001 (recorded; the test names the scenario)
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump(results, f, indent=1)
        dist.destroy_process_group()

"""The trainer (lowrank_ext.finetune.trainer) and the data pipeline (lowrank_ext.finetune.data) on a tiny random Llama.

References: the lr schedule against its closed form and torch's LambdaLR; gradient accumulation
against one big batch; clipping against the clipped-norm definition; resume against the
uninterrupted run (bit-identical)."""

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import require

from lowrank_ext.finetune.data import PackedBlocks, load_documents, pack, prepare_data, split_documents
from lowrank_ext.finetune.trainer import (
    TrainConfig,
    Trainer,
    evaluate,
    lm_loss,
    lr_factor,
    rng_state,
    set_rng_state,
    warmup_cosine,
)

transformers = require("transformers")


def tiny_llama(seed: int = 0, hidden: int = 32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def token_blocks(n: int = 32, seq: int = 16, seed: int = 0) -> PackedBlocks:
    # a learnable pattern: t_{k+1} = (t_k * 5 + 3) mod 64 from random starts
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 64, (n, 1), generator=g)
    rows = [start]
    for _ in range(seq - 1):
        rows.append((rows[-1] * 5 + 3) % 64)
    return PackedBlocks(torch.cat(rows, 1), seed=seed)


# ------------------------------------------------------------------ schedule
@pytest.mark.parametrize("warmup,total", [(4, 40), (1, 10), (0, 5), (10, 10)])
def test_lr_factor_closed_form(warmup, total):
    m = 0.1
    f = [lr_factor(s, warmup, total, m) for s in range(total)]
    assert f[0] > 0  # warm-up starts above zero
    for s in range(min(warmup, total)):
        assert f[s] == pytest.approx((s + 1) / warmup)
    if warmup:
        assert f[warmup - 1] == pytest.approx(1.0)  # reaches the peak at the end of warm-up
    for s in range(warmup, total):
        p = (s - warmup) / max(1, total - warmup)
        assert f[s] == pytest.approx(m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))
    assert max(f) == pytest.approx(1.0)
    if total > warmup:
        assert lr_factor(total, warmup, total, m) == pytest.approx(m)  # ends at min_ratio


def test_scheduler_on_a_real_optimizer_reaches_peak_and_never_collapses():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = warmup_cosine(opt, warmup_steps=5, total_steps=30, min_ratio=0.1)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 5)
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs.index(max(lrs)) in (4, 5)
    # the classic bug (warm-up factor multiplied in every step) would leave lr ~1e-3 * 0.2*0.4*... ~ 0
    assert min(lrs[5:]) > 1e-4 * 0.99
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(lrs[5:]))  # cosine decays monotonically


# ------------------------------------------------------------------ trainer
def test_training_lowers_heldout_loss():
    model = tiny_llama()
    data, held = token_blocks(64, seed=0), token_blocks(8, seed=1)
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=3, progress=False)
    res = Trainer(model, lambda i: data.batch(i, 8), held.sequential(4), cfg).train()
    assert res.eval_after < res.eval_before - 1.0
    assert res.eval_before == pytest.approx(evaluate(tiny_llama(), held.sequential(4)), rel=1e-6)
    assert len(res.history) == 30 and res.peak_memory_mb > 0 and res.tokens_per_second > 0


def _one_sgd_step(accum: int, micro: int, max_norm=None):
    model = tiny_llama()
    data = token_blocks(16)
    cfg = TrainConfig(steps=1, batch_size=micro, grad_accum=accum, lr=0.1, warmup_steps=0, max_grad_norm=max_norm,
                      progress=False)
    tr = Trainer(model, lambda i: data.batch(i, micro), [], cfg, optimizer=lambda ps, lr: torch.optim.SGD(ps, lr=lr))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.train()
    return model, before, tr.history[0]


def test_grad_accumulation_equals_one_big_batch():
    m_acc, before, _ = _one_sgd_step(accum=2, micro=4)
    m_big, _, _ = _one_sgd_step(accum=1, micro=8)  # batch(0, 8) = batch(0, 4) ++ batch(1, 4)
    for (n, a), (_, b) in zip(m_acc.named_parameters(), m_big.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    assert any(not torch.equal(before[n], p) for n, p in m_acc.named_parameters())


def test_clipping_bounds_the_update():
    max_norm = 1e-3
    model, before, rec = _one_sgd_step(accum=1, micro=4, max_norm=max_norm)
    step_norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.detach() - before[n]) for n, p in model.named_parameters()]))
    assert rec["grad_norm"] > max_norm  # the reported norm is before clipping
    assert float(step_norm) == pytest.approx(0.1 * max_norm, rel=1e-3)  # SGD: |Δθ| = lr · max_norm


def test_resume_is_bit_identical(tmp_path):
    data, held = token_blocks(32), token_blocks(4, seed=1)
    cfg = TrainConfig(steps=6, batch_size=4, lr=5e-3, warmup_steps=2, checkpoint_every=3, progress=False)

    full = tiny_llama()
    torch.manual_seed(1)
    Trainer(full, lambda i: data.batch(i, 4), held.sequential(4), cfg).train()

    class Crash(Exception):
        pass

    def crash_at_3(rec):
        if rec["step"] == 3:
            raise Crash

    part = tiny_llama()
    torch.manual_seed(1)
    with pytest.raises(Crash):
        Trainer(part, lambda i: data.batch(i, 4), held.sequential(4), cfg, checkpoint_dir=tmp_path).train(
            on_step=crash_at_3)
    torch.manual_seed(123)  # the checkpoint restores the RNG
    resumed = tiny_llama(seed=7)  # different init: the checkpoint restores the weights
    tr = Trainer(resumed, lambda i: data.batch(i, 4), held.sequential(4), cfg, checkpoint_dir=tmp_path)
    res = tr.train(resume=True)
    assert res.steps == 6 and [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6]
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def _draw(device="cpu") -> list[float]:
    """One number from every stream a step may use."""
    out = [float(torch.rand(())), random.random(), float(np.random.rand())]
    if device != "cpu":
        out.append(float(torch.rand((), device=device)))
    return out


def _scramble() -> None:
    # what a fresh process looks like: other seeds everywhere (the checkpoint must restore every stream)
    torch.manual_seed(123)
    random.seed(456)
    np.random.seed(789)


def test_rng_state_round_trip_every_stream(tmp_path):
    _scramble()
    saved = rng_state()
    want = _draw()
    torch.save(saved, tmp_path / "rng.pt")
    _scramble()
    _draw()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # plain tensors / lists: weights_only loads it
    assert _draw() == want
    set_rng_state(saved["torch"])  # a lowrank_ext.train/1 checkpoint held the CPU generator alone
    assert float(torch.rand(())) == want[0]


def _rng_loss(model, batch):
    # a loss whose value (hence every update) depends on every stream: a stream not restored on resume
    # changes the resumed parameters
    draws = _draw(batch.device.type)
    return lm_loss(model, batch) * (1 + 0.01 * sum(draws))


def _crash_and_resume(tmp_path, device: str):
    data, held = token_blocks(32), token_blocks(4, seed=1)
    cfg = TrainConfig(steps=6, batch_size=4, lr=5e-3, warmup_steps=2, checkpoint_every=3, progress=False)

    def make(seed=0):
        return tiny_llama(seed).to(device)

    _scramble()
    full = make()
    res_full = Trainer(full, lambda i: data.batch(i, 4), held.sequential(4), cfg, device=device,
                       loss_fn=_rng_loss).train()

    class Crash(Exception):
        pass

    def crash_at_4(rec):
        if rec["step"] == 4:
            raise Crash

    _scramble()
    with pytest.raises(Crash):
        Trainer(make(), lambda i: data.batch(i, 4), held.sequential(4), cfg, checkpoint_dir=tmp_path, device=device,
                loss_fn=_rng_loss).train(on_step=crash_at_4)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    if device != "cpu":
        torch.cuda.manual_seed_all(4)
    resumed = make(seed=7)
    res = Trainer(resumed, lambda i: data.batch(i, 4), held.sequential(4), cfg, checkpoint_dir=tmp_path,
                  device=device, loss_fn=_rng_loss).train(resume=True)
    assert res.eval_before == res_full.eval_before  # the saved one, not the loss at the checkpoint
    if device == "cpu":  # bit-identical
        assert [h["loss"] for h in res.history] == [h["loss"] for h in res_full.history]
        assert res.eval_after == res_full.eval_after
        for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
            assert torch.equal(a, b), n
    else:  # CUDA backward kernels may use atomics: equal to float noise (a stream not restored moves the
        # loss factor by up to 1%, far beyond it)
        assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in res_full.history], rel=1e-5)
        for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def test_resume_restores_every_rng_stream(tmp_path):
    _crash_and_resume(tmp_path, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_restores_the_cuda_rng(tmp_path):
    torch.cuda.init()  # the CUDA generator is saved only once CUDA is initialised (as in any GPU run)
    _crash_and_resume(tmp_path, "cuda")


def test_checkpoint_write_is_atomic_and_sweeps_stray_temp_files(tmp_path, monkeypatch):
    data = token_blocks(16)
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=1, progress=False)
    tr = Trainer(tiny_llama(), lambda i: data.batch(i, 4), [], cfg, checkpoint_dir=tmp_path)
    tr.train()
    good = (tmp_path / "trainer_state.pt").read_bytes()
    (tmp_path / ".trainer_state.pt.abc123.tmp").write_bytes(b"left by a run killed mid-write")

    def fail(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint()
    assert (tmp_path / "trainer_state.pt").read_bytes() == good  # untouched by the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.pt"]  # stray and failed temps gone
    monkeypatch.undo()
    tr.save_checkpoint()
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 2


def test_resume_from_mismatched_checkpoint_is_refused(tmp_path):
    data = token_blocks(16)
    cfg = TrainConfig(steps=2, batch_size=4, progress=False)
    Trainer(tiny_llama(), lambda i: data.batch(i, 4), [], cfg, checkpoint_dir=tmp_path,
            fingerprint={"rank": 8}).train()
    with pytest.raises(ValueError, match=r"lowrank_ext.train: checkpoint must match this run, got differences: "
                                         r".*params.model.embed_tokens.weight: checkpoint \[64, 32\] vs this run \[64, 48\]"):
        Trainer(tiny_llama(hidden=48), lambda i: data.batch(i, 4), [], cfg, checkpoint_dir=tmp_path,
                fingerprint={"rank": 8}).train(resume=True)
    with pytest.raises(ValueError, match=r"rank: checkpoint 8 vs this run 16"):
        Trainer(tiny_llama(), lambda i: data.batch(i, 4), [], cfg, checkpoint_dir=tmp_path,
                fingerprint={"rank": 16}).train(resume=True)
    cfg2 = TrainConfig(steps=2, batch_size=4, lr=1e-4, progress=False)
    with pytest.raises(ValueError, match=r"schedule.lr: checkpoint 0.002 vs this run 0.0001"):
        Trainer(tiny_llama(), lambda i: data.batch(i, 4), [], cfg2, checkpoint_dir=tmp_path,
                fingerprint={"rank": 8}).train(resume=True)
    with pytest.raises(FileNotFoundError, match="resume must point at a directory holding trainer_state.pt"):
        Trainer(tiny_llama(), lambda i: data.batch(i, 4), [], cfg, checkpoint_dir=tmp_path / "none").train(resume=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint must be a lowrank_ext trainer checkpoint"):
        Trainer(tiny_llama(), lambda i: data.batch(i, 4), [], cfg).train(resume=tmp_path / "bad")


def test_checkpoint_formats(tmp_path):
    """A lowrank_ext.train/1 checkpoint (before every RNG stream and the first loss were saved) still
    resumes; any other format is refused, naming it."""
    data, held = token_blocks(16), token_blocks(4, seed=1)
    cfg = TrainConfig(steps=2, batch_size=4, progress=False)
    tr = Trainer(tiny_llama(), lambda i: data.batch(i, 4), held.sequential(4), cfg, checkpoint_dir=tmp_path)
    tr.train()
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert state["format"] == "lowrank_ext.train/2" and set(state["rng"]) == {"torch", "cuda", "python", "numpy"}
    old = {**state, "format": "lowrank_ext.train/1", "rng": state["rng"]["torch"]}
    del old["eval_before"]
    torch.save(old, tmp_path / "trainer_state.pt")
    resumed = Trainer(tiny_llama(seed=3), lambda i: data.batch(i, 4), held.sequential(4), cfg, checkpoint_dir=tmp_path)
    assert resumed.load_checkpoint() == 2 and resumed.eval_before is None
    for (n, a), (_, b) in zip(tr.named_params, resumed.named_params):
        assert torch.equal(a, b), n
    torch.save({**state, "format": "someone.else/3"}, tmp_path / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"lowrank_ext.train: checkpoint must have format 'lowrank_ext.train/2', "
                                         r"got 'someone.else/3'"):
        resumed.load_checkpoint()


def test_config_errors():
    with pytest.raises(ValueError, match="lowrank_ext.train: steps must be >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lowrank_ext.train: lr must be > 0, got -1"):
        TrainConfig(lr=-1)
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="model must have trainable parameters"):
        Trainer(model, lambda i: None, [], TrainConfig())


# ------------------------------------------------------------------ data
class CharTok:
    """A tokenizer stand-in: one id per byte, EOS = 0."""
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[b % 255 + 1 for b in t.encode()] for t in texts]}


def test_pack_and_split():
    docs = [f"doc{i} " * 3 for i in range(40)]
    s = split_documents(docs, holdout_every=20)
    assert s.heldout == [docs[19], docs[39]] and len(s.train) == 38
    assert not set(s.heldout) & set(s.train)
    blocks = pack(["ab", "cde"], CharTok(), seq_len=3)
    assert blocks.tolist() == [[ord("a") + 1, ord("b") + 1, 0], [ord("c") + 1, ord("d") + 1, ord("e") + 1]]
    pb = PackedBlocks(torch.arange(20).view(10, 2), seed=3)
    first_epoch = torch.cat([pb.batch(i, 2) for i in range(5)])
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 20, 2))  # a permutation per epoch
    assert torch.equal(pb.batch(7, 2), PackedBlocks(pb.blocks, seed=3).batch(7, 2))  # pure function of the index


def test_builtin_datasets_and_user_files(tmp_path):
    kjv = load_documents("kjv")
    assert len(kjv) == 1189 and kjv[0].startswith("In the beginning God created")  # chapters of the KJV
    lee = load_documents("lee")
    assert len(lee) == 300
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(30)))
    train, held = prepare_data(str(p), CharTok(), seq_len=16, eval_blocks=2)
    assert train.blocks.shape[1] == 16 and held.blocks.shape == (2, 16)
    txt = tmp_path / "b.txt"
    txt.write_text("para one\nstill one\n\npara two")
    assert load_documents(str(txt)) == ["para one\nstill one", "para two"]


@pytest.mark.parametrize("content,name,match", [
    (None, "missing.txt", r"--dataset must be kjv, lee, or a readable .txt/.jsonl file, got .*missing.txt.*no such file"),
    ("x", "data.csv", r"unsupported extension '.csv'"),
    ("{not json", "d.jsonl", r"line 1 is not JSON"),
    ('{"body": "x"}', "d.jsonl", r"line 1 has no \"text\" string"),
    ("", "empty.txt", r"it holds no text"),
    (b"\xff\xfe\x00bad", "bin.txt", r"UnicodeDecodeError"),
])
def test_unreadable_datasets(tmp_path, content, name, match):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_documents(str(p))


# ------------------------------------------------------------------ non-finite steps (issue 19, defect 5)
class _InfGrad(torch.autograd.Function):
    """Identity forward (the loss stays finite), an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _poisoned_loss(bad_steps: set[int], kind: str):
    """lm_loss, made non-finite on the training calls of the 1-based steps in `bad_steps` (grad_accum 1:
    one training call per step; evaluation runs in eval mode and is left alone)."""
    calls = [0]

    def loss_fn(model, batch):
        loss = lm_loss(model, batch)
        if not model.training:
            return loss
        calls[0] += 1
        if calls[0] not in bad_steps:
            return loss
        return loss * float("nan") if kind == "nan_loss" else _InfGrad.apply(loss)
    return loss_fn


def _finite_checkpoint(path) -> dict:
    state = torch.load(path, weights_only=True)
    tensors = list(state["params"].values()) + [v for st in state["optimizer"]["state"].values() for v in st.values()
                                                 if isinstance(v, torch.Tensor)]
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    return state


@pytest.mark.parametrize("kind", ["nan_loss", "inf_grad"])
def test_nonfinite_step_is_skipped(tmp_path, kind):
    """A step whose loss (or gradient) is NaN/Inf changes nothing: the parameters and the optimizer state are
    bit-identical to the step before, the lr schedule does not advance; it is counted, and the checkpoints
    and the trained parameters stay finite. Before the fix the NaN was applied and checkpointed."""
    model = tiny_llama()
    data, held = token_blocks(32), token_blocks(4, seed=1)
    cfg = TrainConfig(steps=5, batch_size=4, lr=5e-3, warmup_steps=2, checkpoint_every=3, progress=False)
    tr = Trainer(model, lambda i: data.batch(i, 4), held.sequential(4), cfg, checkpoint_dir=tmp_path,
                 loss_fn=_poisoned_loss({3}, kind))
    snaps = {}

    def snapshot(rec):
        snaps[rec["step"]] = ({n: p.detach().clone() for n, p in tr.named_params},
                              [int(st["step"]) for st in tr.optimizer.state.values()],
                              tr.scheduler.last_epoch)

    res = tr.train(on_step=snapshot)
    params2, opt2, sched2 = snaps[2]
    params3, opt3, sched3 = snaps[3]
    assert all(torch.equal(params2[n], params3[n]) for n in params2)  # step 3 did not move anything
    assert opt3 == opt2 == [2] * len(opt2) and sched3 == sched2 == 2
    assert any(not torch.equal(params3[n], snaps[4][0][n]) for n in params3)  # step 4 trains again
    assert res.skipped_steps == [3] and res.steps == 5 and [h.get("skipped", False) for h in res.history] == [
        False, False, True, False, False]
    assert res.history[3]["lr"] == res.history[2]["lr"]  # the schedule resumes where the skipped step left it
    assert all(bool(torch.isfinite(p).all()) for _, p in tr.named_params)
    assert _finite_checkpoint(tmp_path / "trainer_state.pt")["step"] == 5
    # a resumed run keeps the count (it is in the checkpoint's history)
    tr2 = Trainer(tiny_llama(seed=3), lambda i: data.batch(i, 4), held.sequential(4),
                  TrainConfig(steps=6, batch_size=4, lr=5e-3, warmup_steps=2, progress=False),
                  checkpoint_dir=tmp_path)
    tr2.fingerprint["schedule"] = tr.fingerprint["schedule"]  # (steps=6 continues the 5-step run)
    assert tr2.train(resume=True).skipped_steps == [3]


def test_persistent_nonfinite_steps_stop_naming_them(tmp_path):
    model = tiny_llama()
    data = token_blocks(32)
    cfg = TrainConfig(steps=8, batch_size=4, lr=5e-3, checkpoint_every=1, max_nonfinite_steps=3, progress=False)
    tr = Trainer(model, lambda i: data.batch(i, 4), [], cfg, checkpoint_dir=tmp_path,
                 loss_fn=_poisoned_loss(set(range(2, 100)), "nan_loss"))
    with pytest.raises(ValueError, match=r"lowrank_ext.train: the loss and gradients must be finite, got NaN/Inf at "
                                         r"steps 2, 3, 4 \(3 consecutive, max_nonfinite_steps=3\)"):
        tr.train()
    assert tr.step == 4 and tr.skipped_steps == [2, 3, 4]
    assert _finite_checkpoint(tmp_path / "trainer_state.pt")["step"] == 3  # the last one before the error
    with pytest.raises(ValueError, match="lowrank_ext.train: max_nonfinite_steps must be >= 1, got 0"):
        TrainConfig(max_nonfinite_steps=0)


def test_nonfinite_parameters_are_never_checkpointed(tmp_path):
    """An update that leaves a parameter infinite (here an optimizer that overflows it; the loss and gradient were
    finite) stops the run with an error naming the step and the parameter instead of writing the checkpoint."""
    class Overflowing(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))

    data = token_blocks(32)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, checkpoint_every=1, progress=False)
    model = tiny_llama()
    first = next(n for n, p in model.named_parameters())
    tr = Trainer(model, lambda i: data.batch(i, 4), [], cfg, checkpoint_dir=tmp_path,
                 optimizer=lambda ps, lr: Overflowing(ps, lr=lr))
    with pytest.raises(ValueError, match=r"lowrank_ext.train: parameters and optimizer state must be finite after "
                                         rf"step 1, got NaN/Inf in {first}; no checkpoint written"):
        tr.train()
    assert not (tmp_path / "trainer_state.pt").exists()

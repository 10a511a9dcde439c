"""A small reusable trainer for (Q)LoRA fine-tuning of causal LMs; `python -m lowrank_ext finetune` uses it.

    trainer = Trainer(model, train_batches, eval_batches, TrainConfig(steps=40, lr=2e-3),
                      optimizer=..., checkpoint_dir="out/checkpoint")
    result = trainer.train()            # or trainer.train(resume=True)

What one optimizer step does (grad_accum micro-batches of `batch` rows):

    loss_k = model(x_k, labels=x_k).loss                     mean token cross-entropy (nats)
    g      = Σ_k ∇ (loss_k / grad_accum)                     gradient of the mean over micro-batches
    g     *= min(1, max_grad_norm / ||g||₂)                  clipping (global norm over trainable params)
    lr_t   = lr · f(t)                                        warm-up then cosine (lr_factor below)
    θ      = optimizer.step(θ, g, lr_t)

A step whose loss or gradient norm is not finite (NaN / Inf: an overflow, a bad batch) is skipped: no
optimizer update (parameters and optimizer state untouched) and no scheduler advance, the convention of
transformers' Trainer when a step is skipped (the next update gets the lr the skipped one would have had);
the step still counts towards `steps` and its batch is not retried. Skipped steps are recorded
(`TrainResult.skipped_steps`, history records with "skipped": True); `max_nonfinite_steps` consecutive
ones stop training with a ValueError naming them. A checkpoint is never written with non-finite
parameters or optimizer state (ValueError naming the step instead).

Checkpoints (every `checkpoint_every` steps, and at the end) hold the trainable parameters, the
optimizer and scheduler state, every RNG stream a step may draw from (torch's CPU generator, each
CUDA device's generator when CUDA is initialised, Python's `random`, numpy's global generator), the
held-out loss before training, the history and a fingerprint of the run (parameter names/shapes and
the caller's `fingerprint` dict); resuming from a checkpoint whose fingerprint differs is an error
that names the differences. A resumed run therefore continues exactly where the checkpoint was taken:
on CPU it ends bit-identical to the uninterrupted run (tests/test_crash_resume.py kills a real run).
Files are written atomically (lowrank_ext/_atomic.py: temporary file, fsync, rename), so a crash at any
moment leaves the previous complete checkpoint, and load with `torch.load(weights_only=True)`:
nothing is unpickled.
"""

from __future__ import annotations

import functools
import math
import os
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lowrank_ext._atomic import atomic_write

# CHECKPOINT_FILE / CHECKPOINT_SUBDIR are defined with the run directories, torch-free (`--help` names them)
from lowrank_ext.finetune.run_dirs import CHECKPOINT_FILE, CHECKPOINT_SUBDIR  # noqa: F401 (re-exported)

__all__ = ["TrainConfig", "TrainResult", "Trainer", "evaluate", "lr_factor", "memory_mb", "rng_state",
           "seed_everything", "set_rng_state", "warmup_cosine"]

_FORMAT = "lowrank_ext.train/2"  # /2: "rng" holds every stream and "eval_before" is saved; /1 still loads
_FORMATS = (_FORMAT, "lowrank_ext.train/1")


def seed_everything(seed: int) -> None:
    """Seed every stream rng_state() saves: torch (CPU and every CUDA device), Python's `random`, numpy."""
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict:
    """Every RNG stream a training step may draw from, as plain tensors / lists (weights_only-loadable):
    torch's CPU generator, each CUDA device's generator (only when CUDA is initialised: asking would
    initialise it), Python's `random`, numpy's global generator."""
    import numpy as np

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "python": [version, list(internal), gauss],
            "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                      float(np_gauss)]}


def set_rng_state(state: dict | torch.Tensor) -> None:
    """Restore what rng_state() returned (or a /1 checkpoint's torch CPU state alone). CUDA states are
    restored on the devices present (a checkpoint from a GPU run resumed on the CPU draws no CUDA numbers)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for device, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    warm-up   (step < W):  f = (step + 1) / W          starts at 1/W > 0, reaches 1 at step W-1
    cosine    (step >= W): p = (step - W) / max(1, T - W)
                           f = m + (1 - m) · ½ (1 + cos(π · min(p, 1)))   1 at step W, m at the end

    The factor is absolute (LambdaLR semantics: lr = base_lr · f), never multiplied into the previous
    lr — the classic bug (MultiplicativeLR with a warm-up factor) drives the lr to ~0 and keeps it there."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR scheduler applying `lr_factor` (call `.step()` once after each optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_ratio))


def memory_mb(device: torch.device | str = "cpu") -> tuple[float, float]:
    """(current, peak) memory in MiB: CUDA allocator bytes on a GPU, process RSS on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/statm") as f:
            cur = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        cur = float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return cur, peak


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on a [B, T] token batch (labels = inputs, shifted
    inside the model)."""
    return model(input_ids=batch, labels=batch).loss


LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _loss_autocast(model: torch.nn.Module, batch: torch.Tensor, dtype: torch.dtype, loss: LossFn) -> torch.Tensor:
    with torch.autocast(batch.device.type, dtype=dtype):
        return loss(model, batch)


def lm_loss_in(dtype: torch.dtype | None, loss: LossFn = lm_loss) -> LossFn:
    """The loss function for training in `dtype`: `loss` itself (fp32: None or torch.float32), or `loss` under
    torch.autocast(dtype=bf16/fp16) — the matmuls (our NF4 ops included: they have autocast kernels) run in
    it, while the parameters (LoRA: the master weights) and the optimizer state stay fp32."""
    if dtype is None or dtype == torch.float32:
        return loss
    return functools.partial(_loss_autocast, dtype=dtype, loss=loss)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[torch.Tensor], device: torch.device | str = "cpu",
             loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lm_loss) -> float:
    """Mean loss per predicted token over `batches` (each [B, T] contributes B·(T-1) tokens)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = b.shape[0] * (b.shape[1] - 1)
        total += float(loss_fn(model, b.to(device))) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


# TrainConfig fields that do not change what a run computes: left out of a checkpoint's fingerprint
_NOT_FINGERPRINTED = ("progress", "checkpoint_every", "eval_every", "max_nonfinite_steps")


@dataclass
class TrainConfig:
    steps: int = 40
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-3
    warmup_steps: int = 4
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 0  # 0: only at the end (when a checkpoint_dir is given)
    eval_every: int = 0  # 0: only before and after
    progress: bool = True
    max_nonfinite_steps: int = 3  # consecutive skipped (non-finite) steps that stop training with an error

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"lowrank_ext.train: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lowrank_ext.train: lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"lowrank_ext.train: warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"lowrank_ext.train: max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")


@dataclass
class TrainResult:
    eval_before: float
    eval_after: float
    steps: int
    seconds: float
    seconds_per_step: float
    tokens_per_second: float
    peak_memory_mb: float
    history: list[dict] = field(default_factory=list)  # per step: step, loss, lr, grad_norm (skipped: True)
    skipped_steps: list[int] = field(default_factory=list)  # 1-based steps skipped for a non-finite loss/gradient

    @property
    def ppl_before(self) -> float:
        return math.exp(self.eval_before)

    @property
    def ppl_after(self) -> float:
        return math.exp(self.eval_after)


class Trainer:
    """Trains the parameters of `model` that require grad.

    train_batches: a callable `index -> [B, T] token batch` (e.g. `PackedBlocks.batch` bound to the
        micro-batch size) — a pure function of the index, so a resumed run sees the same data.
    eval_batches: the held-out batches evaluate() averages over.
    optimizer: a factory `params -> Optimizer` (default torch.optim.AdamW, weight_decay 0).
    fingerprint: extra facts a checkpoint must agree with to be resumed (model, dataset, rank ...)."""

    def __init__(self, model: torch.nn.Module, train_batches: Callable[[int], torch.Tensor],
                 eval_batches: Sequence[torch.Tensor], config: TrainConfig, *,
                 optimizer: Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer] | None = None,
                 checkpoint_dir: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 fingerprint: dict | None = None,
                 loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = lm_loss) -> None:
        self.model, self.config, self.device, self.loss_fn = model, config, torch.device(device), loss_fn
        self.train_batches, self.eval_batches = train_batches, list(eval_batches)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ValueError("lowrank_ext.train: model must have trainable parameters, got none requiring grad")
        params = [p for _, p in self.named_params]
        make = optimizer or (lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0))
        self.optimizer = make(params, config.lr)
        self.scheduler = warmup_cosine(self.optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.fingerprint = {
            "params": {n: list(p.shape) for n, p in self.named_params},
            "schedule": {k: v for k, v in asdict(config).items() if k not in _NOT_FINGERPRINTED},
            **(fingerprint or {}),
        }
        self.step = 0
        self.history: list[dict] = []
        self.eval_before: float | None = None  # held-out loss before the first step (kept across resumes)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str | os.PathLike | None = None) -> Path:
        d = Path(directory) if directory is not None else self.checkpoint_dir
        if d is None:
            raise ValueError("lowrank_ext.train: checkpoint_dir must be set to save a checkpoint, got None")
        d.mkdir(parents=True, exist_ok=True)
        state = {
            "format": _FORMAT,
            "step": self.step,
            "fingerprint": self.fingerprint,
            "params": {n: p.detach().cpu().clone() for n, p in self.named_params},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "eval_before": self.eval_before,
            "history": self.history,
        }
        for stale in d.glob(f".{CHECKPOINT_FILE}.*.tmp"):  # left by a run killed mid-write (one trainer per dir)
            stale.unlink(missing_ok=True)
        with atomic_write(d / CHECKPOINT_FILE) as f:
            torch.save(state, f)
        return d / CHECKPOINT_FILE

    def load_checkpoint(self, directory: str | os.PathLike | None = None) -> int:
        """Restore a checkpoint (refusing one from a different run); returns the step it was at."""
        d = Path(directory) if directory is not None else self.checkpoint_dir
        path = None if d is None else d / CHECKPOINT_FILE
        if path is None or not path.is_file():
            raise FileNotFoundError(f"lowrank_ext.train: resume must point at a directory holding {CHECKPOINT_FILE}, "
                                    f"got {str(d)!r}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or foreign file
            raise ValueError(f"lowrank_ext.train: checkpoint must be a lowrank_ext trainer checkpoint, got "
                             f"{str(path)!r} ({type(e).__name__}: {e})") from e
        if not isinstance(state, dict) or state.get("format") not in _FORMATS:
            raise ValueError(f"lowrank_ext.train: checkpoint must have format {_FORMAT!r}, got "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}")
        diffs = _diff(state["fingerprint"], self.fingerprint)
        if diffs:
            raise ValueError("lowrank_ext.train: checkpoint must match this run, got differences: "
                             + "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else ""))
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(state["params"][n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.eval_before = state.get("eval_before")
        return self.step

    # ---------------------------------------------------------------- training
    def reduce_loss(self, value: float) -> float:
        """The step's loss as logged: this process's (finetune/parallel.py's DistTrainer: the mean over ranks)."""
        return value

    def all_ranks_true(self, flag: bool) -> bool:
        """`flag` held on every process (one process: itself). Goes through reduce_loss, the mean over the
        ranks under DistTrainer, so every rank takes the same decision (a rank alone raising would hang the
        others in their next collective)."""
        return self.reduce_loss(0.0 if flag else 1.0) == 0.0

    def evaluate(self) -> float:
        return evaluate(self.model, self.eval_batches, self.device, self.loss_fn)

    @property
    def skipped_steps(self) -> list[int]:
        """Steps skipped for a non-finite loss or gradient (kept in the history, hence across resumes)."""
        return [rec["step"] for rec in self.history if rec.get("skipped")]

    def _accumulate_gradients(self) -> tuple[float, int]:
        """Forward + backward of this step's grad_accum micro-batches: (mean loss as logged, tokens read)."""
        cfg = self.config
        loss_sum, step_tokens = 0.0, 0
        for k in range(cfg.grad_accum):
            batch = self.train_batches(self.step * cfg.grad_accum + k).to(self.device)
            loss = self.loss_fn(self.model, batch) / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            step_tokens += batch.numel()
        return self.reduce_loss(loss_sum), step_tokens

    def _clip_gradients(self) -> float:
        """Clip to max_grad_norm (when set); the global gradient norm before clipping (NaN/Inf when a gradient
        is not finite: clipping then leaves the gradients non-finite, and the step is skipped)."""
        params = [p for _, p in self.named_params]
        if self.config.max_grad_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))

    def _nonfinite_state(self) -> list[str]:
        """Names of the trainable parameters / optimizer state entries of this process holding NaN or Inf."""
        def bad(t: object) -> bool:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                return False
            local = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor: this rank's shard
            return not bool(torch.isfinite(local).all())

        names = {id(p): n for n, p in self.named_params}
        out = [n for n, p in self.named_params if bad(p)]
        out += [f"optimizer state {k!r} of {names.get(id(p), '?')}" for p, st in self.optimizer.state.items()
                for k, v in st.items() if bad(v)]
        return out

    def check_finite_state(self) -> None:
        """Raise (on every rank) when a trainable parameter or the optimizer state is not finite: nothing
        non-finite is ever checkpointed or returned as trained."""
        bad = self._nonfinite_state()
        if not self.all_ranks_true(not bad):
            raise ValueError(f"lowrank_ext.train: parameters and optimizer state must be finite after step "
                             f"{self.step}, got NaN/Inf in {', '.join(bad[:4]) or 'another rank'}"
                             f"{f' ... ({len(bad)} in all)' if len(bad) > 4 else ''}; no checkpoint written")

    def _consecutive_skips(self) -> list[int]:
        run: list[int] = []
        for rec in reversed(self.history):
            if not rec.get("skipped"):
                break
            run.insert(0, rec["step"])
        return run

    def _step(self) -> tuple[dict, int]:
        """One optimizer step (or a skipped one: see the module docstring): its history record, tokens read."""
        t0 = time.perf_counter()
        loss, step_tokens = self._accumulate_gradients()
        gnorm = self._clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]
        # loss (the mean over ranks) and gnorm (global: clip_grad_norm_ reduces over FSDP shards, DDP grads are
        # all-reduced) are the same on every rank, so every rank skips the same steps
        finite = math.isfinite(loss) and math.isfinite(gnorm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.scheduler.step()
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens_per_s": step_tokens / dt}
        if not finite:
            rec["skipped"] = True
        return rec, step_tokens

    def train(self, resume: bool | str | os.PathLike = False,
              on_step: Callable[[dict], None] | None = None,
              announce: Callable[[str], None] | None = None) -> TrainResult:
        """Run until `config.steps` optimizer steps are done (continuing from a checkpoint with
        `resume=True` (checkpoint_dir) or `resume=<directory>`). `announce` (e.g. print) gets one line as each
        evaluation pass over the held-out batches starts (the phases without a progress bar)."""
        cfg = self.config
        say_phase = announce or (lambda line: None)
        if resume:
            self.load_checkpoint(None if resume is True else resume)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if self.eval_before is None:  # a resumed run reports the loss before its first step, not the checkpoint's
            say_phase(f"evaluating the held-out loss before training ({len(self.eval_batches)} batches)")
            self.eval_before = self.evaluate()
        self.model.train()
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="finetune", unit="step", dynamic_ncols=True)
        say = print if bar is None else bar.write
        t_start, tokens, steps_run, saved_at = time.perf_counter(), 0, 0, None
        try:
            while self.step < cfg.steps:
                rec, step_tokens = self._step()
                steps_run += 1
                tokens += step_tokens
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    rec["eval_loss"] = self.evaluate()
                    self.model.train()
                self.history.append(rec)
                if rec.get("skipped"):
                    run = self._consecutive_skips()
                    say(f"warning: step {self.step}: non-finite loss {rec['loss']} / gradient norm "
                        f"{rec['grad_norm']}; step skipped (no update) [{len(self.skipped_steps)} skipped so far]")
                    if len(run) >= cfg.max_nonfinite_steps:
                        raise ValueError(
                            f"lowrank_ext.train: the loss and gradients must be finite, got NaN/Inf at steps "
                            f"{', '.join(map(str, run))} ({len(run)} consecutive, max_nonfinite_steps="
                            f"{cfg.max_nonfinite_steps}); the parameters were not updated by them and no "
                            f"checkpoint holds them")
                if bar is not None:
                    cur = memory_mb(self.device)[0]
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}", mem=f"{cur:.0f}MB")
                    bar.update(1)
                if self.checkpoint_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.check_finite_state()
                    self.save_checkpoint()
                    saved_at = self.step
                if on_step is not None:
                    on_step(rec)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t_start
        self.check_finite_state()
        if self.checkpoint_dir is not None and steps_run and saved_at != self.step:
            self.save_checkpoint()
        say_phase(f"evaluating the held-out loss after training ({len(self.eval_batches)} batches)")
        eval_after = self.evaluate()
        return TrainResult(eval_before=self.eval_before, eval_after=eval_after, steps=self.step, seconds=seconds,
                           seconds_per_step=seconds / max(steps_run, 1), tokens_per_second=tokens / max(seconds, 1e-9),
                           peak_memory_mb=memory_mb(self.device)[1], history=self.history,
                           skipped_steps=self.skipped_steps)


def _diff(saved: object, current: object, path: str = "") -> list[str]:
    """Human-readable differences between two fingerprints (nested dicts / lists / scalars)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in current:
                out.append(f"{p} in the checkpoint but not in this run")
            elif k not in saved:
                out.append(f"{p} in this run but not in the checkpoint")
            else:
                out += _diff(saved[k], current[k], p)
        return out
    if saved != current:
        return [f"{path}: checkpoint {saved!r} vs this run {current!r}"]
    return []

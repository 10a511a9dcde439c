"""`finetune --trainer hf`: phase 5 (train) of the finetune command through `transformers.Trainer`.

The other phases are the command's own (finetune/cli.py): the same NF4 model with our adapters (`_build`), the same
data, the same held-out evaluation, save + reload check and summary. Only the training loop is transformers':
the model goes in as `lowrank_ext.hf.to_peft_model(model)` (an adapter model to Trainer: adapter-only
checkpoints in OUTPUT/checkpoint/checkpoint-N), and everything that decides what a step computes is made equal
to `--trainer lowrank_ext` (finetune/trainer.py), so the two can be compared side by side:

    data        step t, micro-batch k reads `train_blocks.batch(t * grad_accum + k, batch_size)`: a dataset whose
                row j is row j % B of batch j // B, read by Trainer's "sequential" sampler (no shuffling).
    loss        Trainer passes `num_items_in_batch` (the predicted tokens of the step's grad_accum micro-batches,
                labels[..., 1:]) to the model, whose loss is then Σ token losses / N_step. Our trainer takes
                Σ_k mean_k / grad_accum. Every block has seq_len tokens and no padding, so N_step = grad_accum · n
                and the two are the same number (up to the order of the float sums).
    schedule    our LambdaLR (`warmup_cosine`: warm-up then cosine to 10%) and optimizer (`--optimizer`, our
                PagedAdamW family) via `optimizers=(opt, sched)`. Trainer steps the scheduler once after each
                optimizer step, as ours does, and logs the lr the step used (read before `scheduler.step()`).
    clipping    `max_grad_norm`: accelerate's clip_grad_norm_ over the parameters (frozen ones have no grad).
    RNG         Trainer calls `set_seed(seed)` in __init__ (and its dataloader draws a seed), which ours does not:
                the RNG state at the point our trainer would start is taken before Trainer is built and restored
                when its first step begins, so LoRA dropout draws the same masks.
    precision   `--dtype bf16`: TrainingArguments(bf16=True), accelerate's torch.autocast(bf16), as ours.

What differs: Trainer computes the model's own loss (ours, with gradient checkpointing, the head + loss in chunks:
the same value, another summation order), and a step with a NaN/Inf loss is not skipped (transformers applies
it): here the run stops with an error at such a step. `--resume`, several processes and `--backend peft` are
refused (`check_args`).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

__all__ = ["check_args", "train"]


def check_args(a: argparse.Namespace, world_size: int) -> str | None:
    """Why `--trainer hf` cannot run these arguments (None: it can): the combinations this path does not support."""
    if (a.nproc or 1) > 1 or world_size > 1:
        return (f"run in one process (--nproc / torchrun are our trainer's), got nproc={a.nproc}, "
                f"WORLD_SIZE={world_size}")
    if a.resume:
        return "start a new run (--resume continues our trainer's checkpoints), got --resume"
    if a.backend != "lowrank_ext":
        return f"train lowrank_ext's layers (--backend lowrank_ext), got --backend {a.backend}"
    if a.variant not in ("lora", "dora", "vera", "ia3"):
        return f"train a lora | dora | vera | ia3 adapter, got --variant {a.variant}"
    return None


class _Rows(torch.utils.data.Dataset):
    """Row j = row j % B of `blocks.batch(j // B, B)`: read in order, B rows at a time, the batches our trainer
    reads (micro-batch index = step * grad_accum + k)."""

    def __init__(self, blocks, batch_size: int, num_batches: int) -> None:
        self.blocks, self.batch_size, self.num_batches = blocks, batch_size, num_batches

    def __len__(self) -> int:
        return self.batch_size * self.num_batches

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        index, row = divmod(j, self.batch_size)
        ids = self.blocks.batch(index, self.batch_size)[row]
        return {"input_ids": ids, "labels": ids}


def _callback(rng: dict, history: list[dict], times: list[float]):
    """Restores `rng` when the first step begins; records per-step history (loss, lr, grad_norm) and time;
    hands freed memory back to the OS after each step (as our trainer's loop does); stops on a NaN/Inf loss."""
    from transformers import TrainerCallback

    from lowrank_ext.finetune.memory import trim_freed_memory
    from lowrank_ext.finetune.trainer import set_rng_state

    class Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0 and not times:
                set_rng_state(rng)
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times[-1] = time.perf_counter() - times[-1]
            trim_freed_memory()

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            rec = {"step": state.global_step, "loss": float(logs["loss"]), "lr": float(logs["learning_rate"]),
                   "grad_norm": float(logs.get("grad_norm", float("nan")))}
            history.append(rec)
            if not math.isfinite(rec["loss"]):
                raise ValueError(f"lowrank_ext finetune: --trainer hf: the training loss must be finite, got "
                                 f"{rec['loss']} at step {rec['step']} (transformers.Trainer does not skip such a "
                                 "step; --trainer lowrank_ext does)")

    return Callback()


def _training_args(a: argparse.Namespace, plan, output_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, max_grad_norm=a.max_grad_norm, learning_rate=a.lr,
        train_sampling_strategy="sequential", seed=a.seed, logging_strategy="steps", logging_steps=1,
        logging_nan_inf_filter=False, save_strategy="steps" if a.checkpoint_every else "no",
        save_steps=a.checkpoint_every or 1, report_to=[], disable_tqdm=a.no_progress,
        use_cpu=plan.device.type == "cpu", bf16=plan.dtype == torch.bfloat16, fp16=plan.dtype == torch.float16,
        dataloader_num_workers=0, remove_unused_columns=False)


def train(a: argparse.Namespace, plan, dctx, lm, data, job):
    """finetune/cli.py's `_train` through transformers.Trainer (same arguments, same TrainResult); the trainer
    kept on `job` is a `finetune.trainer.Trainer`-shaped view (model, optimizer, loss_fn) for the later phases."""
    import transformers

    from lowrank_ext.finetune.models import greedy_sample as _generate
    from lowrank_ext.finetune.trainer import CHECKPOINT_SUBDIR
    from lowrank_ext.finetune.memory import trim_freed_memory
    from lowrank_ext.finetune.trainer import (
        TrainResult,
        evaluate,
        lm_loss_in,
        memory_mb,
        rng_state,
        warmup_cosine,
    )
    from lowrank_ext.hf import to_peft_model

    assert dctx is None, "check_args refuses several processes"
    model = job.model
    job.sample_before = _generate(model, lm.tokenizer, data.prompt, a.gen_tokens, plan.device, plan.dtype)
    params = [p for _, p in model.named_parameters() if p.requires_grad]  # our trainer's order
    optimizer = plan.backend.optimizer(params, a.lr)
    scheduler = warmup_cosine(optimizer, a.warmup, a.steps)
    loss_fn = lm_loss_in(plan.dtype)
    eval_before = evaluate(model, data.eval_batches, plan.device, loss_fn)
    rng, history, times = rng_state(), [], []  # the RNG where our trainer's first step would start
    dataset = _Rows(data.train_blocks, a.batch_size, a.steps * a.grad_accum)
    args = _training_args(a, plan, str(plan.out / CHECKPOINT_SUBDIR))
    trainer = transformers.Trainer(model=to_peft_model(model), args=args, train_dataset=dataset,
                                   optimizers=(optimizer, scheduler),
                                   callbacks=[_callback(rng, history, times)])
    trim_freed_memory()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    model.train()
    eval_after = evaluate(model, data.eval_batches, plan.device, loss_fn)
    job.sample_after = _generate(model, lm.tokenizer, data.prompt, a.gen_tokens, plan.device, plan.dtype)
    job.trainer = _TrainerView(model=model, optimizer=optimizer, loss_fn=loss_fn, hf=trainer)
    steps = trainer.state.global_step
    step_seconds = sum(times)
    tokens = steps * a.grad_accum * a.batch_size * a.seq_len
    return TrainResult(eval_before=eval_before, eval_after=eval_after, steps=steps, seconds=seconds,
                       seconds_per_step=step_seconds / max(steps, 1),
                       tokens_per_second=tokens / max(step_seconds, 1e-9), peak_memory_mb=memory_mb(plan.device)[1], history=history, skipped_steps=[])


@dataclass
class _TrainerView:
    """What the later phases read from `job.trainer` (memory split, reload loss): model, optimizer, loss_fn; the
    transformers.Trainer itself as `.hf`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: object
    hf: object

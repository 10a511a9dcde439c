"""The command line's arguments: `python -m lowrank_ext finetune|memory|bench|doctor` (cli.py runs them).

Imports neither torch nor anything that does, so that `python -m lowrank_ext --help` (and each subcommand's
--help) answers at once (lowrank_ext/__main__.py; lowrank_ext/__init__.py skips its imports for a --help).
"""

from __future__ import annotations

import argparse

from lowrank_ext.finetune.run_dirs import CHECKPOINT_SUBDIR, DEFAULT_OUTPUT_ROOT

__all__ = ["DEFAULT_TARGETS", "GRADIENT_CHECKPOINTING", "LORA_FAMILY", "VARIANTS", "build_parser", "wants_help"]

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
VARIANTS = ("lora", "dora", "vera", "ia3", "prompt", "bitfit")
LORA_FAMILY = ("lora", "dora", "vera")
GRADIENT_CHECKPOINTING = True  # the default of --gradient-checkpointing (README "Memory": measured both ways)


def wants_help(argv: list[str]) -> bool:
    """Whether these command-line arguments ask for a help text (-h / --help anywhere): argparse prints it and
    exits before running anything, so nothing but this parser is needed."""
    return any(arg in ("-h", "--help") for arg in argv)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help ends with its default, except a None default (its help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowrank-ext", description="lowrank_ext: fast QLoRA fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="QLoRA fine-tune a causal LM on text and save a PEFT adapter",
                       formatter_class=_DefaultsHelp)
    f.add_argument("--model", default="smollm2",
                   help="'smollm2' (the packaged SmolLM2-135M-Instruct) or a local transformers causal LM directory")
    f.add_argument("--dataset", default="kjv", help="kjv | lee | PATH to a .txt or .jsonl file")
    f.add_argument("--steps", type=int, default=40, help="optimizer steps")
    f.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    f.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    f.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    f.add_argument("--warmup", type=int, default=4, help="linear warm-up steps (then cosine decay to 10%%)")
    f.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    f.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    f.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale alpha/r)")
    f.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    f.add_argument("--targets", default=None,
                   help=f"comma-separated module names, or all-linear (default: {DEFAULT_TARGETS}; ia3: PEFT's "
                        "k_proj,v_proj,down_proj with down_proj feed-forward; bitfit: the linear layers that get a bias)")
    f.add_argument("--variant", choices=VARIANTS, default="lora",
                   help="lora | dora | vera | ia3 | prompt (prompt tuning) | bitfit (see the module docstring)")
    f.add_argument("--num-virtual-tokens", type=int, default=20, help="--variant prompt: virtual tokens")
    f.add_argument("--no-quantize", action="store_true", help="keep the base weights dense (plain LoRA)")
    f.add_argument("--rank-budget", type=int, default=None,
                   help="allocate per-module ranks by gradient sensitivity within this many trainable parameters")
    f.add_argument("--max-rank", type=int, default=None,
                   help="with --rank-budget: the largest rank any module gets (default: 4 x --rank)")
    f.add_argument("--output", default=None,
                   help=f"directory for the adapter and checkpoints (default: a new directory "
                        f"{DEFAULT_OUTPUT_ROOT}/run-<date>-<time> for each run, so earlier results are kept)")
    f.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --output")
    f.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help=f"continue from the checkpoint in DIR (default: OUTPUT/{CHECKPOINT_SUBDIR}; without --output, "
                        f"the latest run in {DEFAULT_OUTPUT_ROOT}); without DIR, an OUTPUT that holds nothing yet (a run "
                        "killed before its first checkpoint) starts at step 0")
    f.add_argument("--checkpoint-every", type=int, default=10, help="write a checkpoint every N steps (0: end only)")
    f.add_argument("--eval-blocks", type=int, default=16, help="held-out sequences to evaluate on")
    f.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    f.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="matmul precision: bf16 runs the matmuls under torch.autocast (LoRA parameters and optimizer "
                        "state stay fp32, the master weights); auto: bf16 where the CPU (AVX512-BF16 / AMX) or GPU "
                        "multiplies bf16 natively, fp32 elsewhere")
    f.add_argument("--seed", type=int, default=0, help="seeds torch (CPU and CUDA), Python's random and numpy")
    f.add_argument("--backend", choices=("lowrank_ext", "peft"), default="lowrank_ext",
                   help="layers/optimizer to train with: ours, or PEFT + torch AdamW as a baseline (dense only)")
    f.add_argument("--trainer", choices=("lowrank_ext", "hf"), default="lowrank_ext",
                   help="the training loop: ours (finetune/trainer.py) or transformers.Trainer on the same model, data, "
                        "schedule and optimizer (finetune/hf_trainer.py; one process, no --resume)")
    f.add_argument("--optimizer", choices=("paged-adamw", "paged-adamw8bit", "adamw"), default="paged-adamw",
                   help="lowrank_ext.optim.PagedAdamW / PagedAdamW8bit, or torch.optim.AdamW")
    f.add_argument("--gen-tokens", type=int, default=24, help="tokens of the before/after sample (0: skip)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument("--nproc", type=int, default=None,
                   help="train on N local processes (launched through torch.distributed.run; gloo on CPU, NCCL on "
                        "CUDA); one optimizer step then sees nproc x batch-size x grad-accum sequences. Under "
                        "torchrun leave it out: the processes torchrun started are used")
    f.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp",
                   help="with several processes: FSDP2 (NF4 base, LoRA and optimizer state sharded) or DDP")
    f.add_argument("--max-nonfinite-steps", type=int, default=3,
                   help="a step whose loss or gradient is NaN/Inf is skipped (no update, counted in the summary); "
                        "this many in a row stop the run with an error naming them")
    f.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=GRADIENT_CHECKPOINTING,
                   help="recompute each transformer block's forward in backward (torch.utils.checkpoint, "
                        "non-reentrant) instead of keeping its activations")
    f.add_argument("--fused-model-ops", action=argparse.BooleanOptionalAction, default=True,
                   help="lowrank_ext backend on a Llama/Qwen2/Mistral/Gemma model: run RMSNorm+residual, rotary "
                        "embedding and SwiGLU as fused ops (lowrank_ext.patch_model); --no-fused-model-ops to compare")
    _memory_parser(sub)

    b = sub.add_parser("bench", help="run the package's benchmarks, print tables and write a chart")
    b.add_argument("--quick", action="store_true", help="a quick subset of shapes")
    b.add_argument("--only", default=None, help="comma-separated bench names (nf4,linear,optim,layers)")
    b.add_argument("--chart", default="lowrank-bench.png", help="PNG chart path ('' for none)")
    b.add_argument("--bench-dir", default=None,
                   help="directory holding bench_*.py (default: bench/ of the source checkout lowrank_ext runs from, "
                        "else ./bench)")

    d = sub.add_parser("doctor", help="check this install: build, devices, every op vs its reference (exit 1 on failure)")
    d.add_argument("--json", action="store_true", help="print the report as JSON (schema lowrank_ext.doctor/1)")
    d.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                   help="devices to check: the CPU and every usable GPU (all), or one kind")
    return p


def _memory_parser(sub) -> None:
    m = sub.add_parser("memory", help="estimate the memory of fine-tuning a model from its config.json (no weights "
                                      "read): full fine-tuning vs LoRA vs QLoRA",
                       formatter_class=_DefaultsHelp)
    m.add_argument("--model", default="smollm2", help="'smollm2' or a model directory (config.json is enough)")
    m.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    m.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    m.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    m.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated projection names")
    m.add_argument("--variant", choices=("lora", "dora", "vera"), default="lora")
    m.add_argument("--optimizer", choices=("paged-adamw", "paged-adamw8bit", "adamw"), default="paged-adamw")
    m.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (> 0 keeps a dropped input per layer)")



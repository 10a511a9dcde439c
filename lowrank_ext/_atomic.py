"""atomic_write: a file appears under its final name complete, or not at all.

    with atomic_write(path) as f:      # f: a binary file (mode "w": text, UTF-8) in path's directory
        f.write(data)
    with atomic_write(path, exclusive=True) as f:   # FileExistsError if path exists when the file is complete
        f.write(data)

The data go to a temporary file next to `path` (same directory, so same filesystem; a hidden name that
never equals `path`), which is flushed and fsync'ed, then renamed onto `path` with os.replace (atomic on
POSIX and Windows); the directory is fsync'ed so the rename itself survives a power cut. If anything
raises, the temporary file is removed and `path` keeps its old content (or stays absent). A process killed
mid-write leaves at most a stray `.<name>.<pid>.<random>.tmp` file, never a half-written `path` (the
trainer sweeps those from its checkpoint directory).

exclusive=True (create, never replace): the complete temporary file is hard-linked to `path` with os.link
instead of os.replace. os.link fails when `path` exists, atomically, so of writers racing for one new name
exactly one wins and the others get FileExistsError (their data discarded, `path` untouched); then the
temporary name is removed. Needs a filesystem with hard links (POSIX filesystems, NTFS); elsewhere os.link
raises its OSError.

Used for adapter files (lowrank_ext/adapters/files.py) and the trainer's checkpoints
(lowrank_ext/finetune/trainer.py). Standard library only.

Test hook (for tests only; never set it otherwise): LOWRANK_EXT_TEST_SLOW_WRITE=<seconds> sleeps that long
after the fsync and before the rename, so a test can SIGKILL a process in the middle of a write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from typing import IO

__all__ = ["SLOW_WRITE_ENV", "atomic_write"]

SLOW_WRITE_ENV = "LOWRANK_EXT_TEST_SLOW_WRITE"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", exclusive: bool = False) -> Iterator[IO]:
    """Write `path` atomically (see the module docstring). mode: "wb" (default) or "w" (UTF-8 text).
    exclusive=True: create `path` only if it does not exist (else FileExistsError, `path` untouched)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"lowrank_ext::atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never reuse someone else's file; 0o666 & ~umask: the permissions a plain open() would give
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        slow = os.environ.get(SLOW_WRITE_ENV)
        if slow:
            time.sleep(float(slow))
        if exclusive:
            os.link(tmp, path)  # raises FileExistsError if path exists: never replaces anything
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

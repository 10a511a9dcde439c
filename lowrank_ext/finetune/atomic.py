"""Crash-safe file writes (the trainer's checkpoints): whoever reads `path` — a resumed run, a user — sees
the previous complete file or the new complete file, never a half-written one.

    atomic_write(path, lambda f: torch.save(state, f))

1. write into a temporary file `.<name>.<random>.tmp` in the same directory (same filesystem: the rename
   in 3 is atomic), 2. flush and fsync it (its bytes are on disk before its name is), 3. os.replace it
   over `path`, 4. fsync the directory (the rename itself survives a power loss). On any error, or an
   interrupt, before 3 the temporary file is removed and `path` is untouched. A SIGKILL between 1 and 3
   leaves a stray `.<name>.*.tmp` beside an intact `path`; the trainer removes those when it next
   writes a checkpoint.

Test hook (for tests only; never set it otherwise): LOWRANK_EXT_TEST_SLOW_WRITE=<seconds> sleeps that long
between 2 and 3, so a test can SIGKILL a run in the middle of a checkpoint write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["SLOW_WRITE_ENV", "atomic_write"]

SLOW_WRITE_ENV = "LOWRANK_EXT_TEST_SLOW_WRITE"
_UMASK = os.umask(0o022)  # read the process umask (the only portable way is to set it) and put it back
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write `path` atomically: `write(f)` fills a temporary binary file in path's directory, which is
    fsynced and renamed over `path`. Returns `path` as a Path. The file gets the permissions of a plain
    open() (0o666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0o600
        slow = os.environ.get(SLOW_WRITE_ENV)
        if slow:
            time.sleep(float(slow))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # directories cannot be opened on Windows
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path

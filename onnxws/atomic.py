"""Atomic file writes: a temp file in the target folder, then a rename (never a half-written file).

Files are created with the mode a plain ``open`` would give them (0666 less the umask), not the
0600 of ``tempfile.mkstemp``: a report is meant to be read by whoever may read the folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def created_mode(*, folder: bool = False) -> int:
    """The mode ``open`` (0666) or ``mkdir`` (0777) would give a new file or folder under the umask."""
    return (0o777 if folder else 0o666) & ~umask()


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: it replaces ``path`` whole when the block ends,
    and is removed (``path`` untouched) when the block raises."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), created_mode())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, nothing between."""
    with atomic_file(path) as handle:
        handle.write(data)

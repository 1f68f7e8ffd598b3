"""Crash-safe writes of the tools' outputs: each is written to a temporary file beside its target and
renamed over it once complete, so that a reader never sees half a file and a write that fails or is
interrupted leaves nothing behind (an older file of that name stays as it was)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# mkstemp makes files 0600; an output is meant to be shared (e.g. with a container's user)
FILE_MODE = _file_mode()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write ``path`` by calling ``write`` with the name of a temporary file beside it (its directory is
    made if missing), then renaming that file to ``path`` with the ordinary permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""Crash-safe file writes: write to a temporary name in the same directory, fsync, os.replace."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from typing import Iterable

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; published files must be readable by the service's user like any
# other file this process writes, so they get the ordinary 0666 & ~umask.
FILE_MODE = 0o666 & ~_current_umask()


def fsync_dir(path: str) -> None:
    """Make a rename/creation inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npy_blocks(path: str, shape: tuple[int, ...], dtype, blocks: Iterable[np.ndarray]) -> str:
    """Write the .npy of an array of `shape` whose rows come in `blocks` (in order) without holding
    it in memory: a memory map of a temporary file, filled block by block, fsynced, renamed to
    `path`. Returns the sha256 of the array's data bytes (what hashing the whole array's
    tobytes() gives)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, FILE_MODE)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
        digest = hashlib.sha256()
        filled = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=out.dtype)
            if block.shape[1:] != out.shape[1:] or filled + block.shape[0] > out.shape[0]:
                raise ValueError(f"{path}: a block of shape {block.shape} does not fit rows "
                                 f"{filled}.. of an array of shape {out.shape}")
            out[filled:filled + block.shape[0]] = block
            digest.update(block.tobytes())
            filled += block.shape[0]
        if filled != out.shape[0]:
            raise ValueError(f"{path}: the blocks held {filled} rows, expected {out.shape[0]}")
        out.flush()
        del out
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return digest.hexdigest()


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)

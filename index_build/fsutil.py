"""Crash-safe file writes of the artifact (model.atomic's, for bytes, JSON and .npy arrays written block by block)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from model.atomic import FILE_MODE, atomic_write, fsync_dir, fsync_file


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


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
        fsync_file(tmp)
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

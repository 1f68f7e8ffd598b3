"""The build's work directory: the plain files passed between the stages.

    WORK/plan.json                what is being built (catalogue checksum, model fingerprint, shard size, ...)
    WORK/catalog.csv              validated tiles, normalised (reader stage output, mapper input)
    WORK/vectors/shard-NNNNN.npy  float32 [rows, D] embeddings of the good tiles of plan rows [start, stop)
    WORK/vectors/shard-NNNNN.columns.npy  float16 [rows, Wg, C] the same tiles' orientation column
                                  features; only for a checkpoint with an orientation head
    WORK/vectors/shard-NNNNN.json sidecar, written after the .npy files: rows, skipped tiles, checksums, timing

A shard is finished exactly when its sidecar exists and agrees with its .npy files; each file is
written atomically and the sidecar last, so a killed build leaves only finished shards (plus stray
*.tmp files that are ignored), never one with vectors but no columns. Row i of the final index is
the i-th vector over the shards in order, with skipped tiles left out; the columns follow the same
rows. Publishing folds the column files into the artifact's orientation.npy and drops them.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from index_build.fsutil import atomic_save_npy, atomic_write_json, read_json

PLAN_FILE = "plan.json"
CATALOG_FILE = "catalog.csv"
VECTORS_DIR = "vectors"
COLUMNS_SUFFIX = ".columns.npy"
COLUMNS_DTYPE = np.float16   # column features of unit length: float16 keeps ~3 decimal digits, half the bytes
ANY_COLUMNS = "any"          # read_finished_shard: accept a shard with or without columns


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class ShardSpan:
    index: int
    start: int   # first catalogue row (inclusive)
    stop: int    # last catalogue row (exclusive)

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(count: int, shard_size: int, first_index: int = 0) -> list[ShardSpan]:
    if shard_size <= 0:
        raise ValueError("shard size must be positive")
    return [ShardSpan(first_index + i, s, min(s + shard_size, count))
            for i, s in enumerate(range(0, count, shard_size))]


def vectors_dir(work: str) -> str:
    return os.path.join(work, VECTORS_DIR)


def shard_npy_path(vdir: str, span: ShardSpan) -> str:
    return os.path.join(vdir, span.name + ".npy")


def shard_meta_path(vdir: str, span: ShardSpan) -> str:
    return os.path.join(vdir, span.name + ".json")


def shard_columns_path(vdir: str, span: ShardSpan) -> str:
    return os.path.join(vdir, span.name + COLUMNS_SUFFIX)


def write_shard(vdir: str, span: ShardSpan, vectors: np.ndarray, skipped: Sequence[dict],
                model_fingerprint: str, seconds: float, engine: str, columns: np.ndarray | None = None) -> dict:
    """Write one finished shard: the .npy files first (`columns`: the orientation column features
    [rows, Wg, C] of the same tiles, stored as float16, or None for a model without an orientation
    head), then the sidecar that marks it finished."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError("shard vectors must be 2-D")
    if vectors.shape[0] + len(skipped) != len(span):
        raise ValueError(f"{span.name}: {vectors.shape[0]} vectors + {len(skipped)} skipped != {len(span)} rows")
    if columns is not None:
        columns = np.ascontiguousarray(columns, dtype=COLUMNS_DTYPE)
        if columns.ndim != 3 or columns.shape[0] != vectors.shape[0]:
            raise ValueError(f"{span.name}: orientation columns of shape {columns.shape}, expected "
                             f"[{vectors.shape[0]}, columns, dim]")
    os.makedirs(vdir, exist_ok=True)
    if columns is not None:
        atomic_save_npy(shard_columns_path(vdir, span), columns)
    npy = shard_npy_path(vdir, span)
    atomic_save_npy(npy, vectors)
    meta = {
        "shard": span.index,
        "start": span.start,
        "stop": span.stop,
        "rows": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        "skipped": list(skipped),
        "sha256": hashlib.sha256(vectors.tobytes()).hexdigest(),
        "model_fingerprint": model_fingerprint,
        "engine": engine,
        "seconds": round(float(seconds), 4),
        "written_at": utc_now_iso(),
    }
    if columns is not None:  # no key at all without a head: those sidecars stay as they were
        meta["orientation"] = {"file": os.path.basename(shard_columns_path(vdir, span)),
                               "columns": int(columns.shape[1]), "dim": int(columns.shape[2]),
                               "dtype": np.dtype(COLUMNS_DTYPE).name,
                               "sha256": hashlib.sha256(columns.tobytes()).hexdigest()}
    atomic_write_json(shard_meta_path(vdir, span), meta)
    return meta


def read_finished_shard(vdir: str, span: ShardSpan, model_fingerprint: str | None = None,
                        column_shape: tuple[int, int] | None | str = ANY_COLUMNS) -> dict | None:
    """The sidecar of a finished, consistent shard, or None when the shard has to be (re-)encoded.

    `column_shape`: (columns, dim) when the shard must hold orientation columns of that shape,
    None when it must hold none, ANY_COLUMNS to accept either (a shard's columns, where it lists
    them, are checked against their file all the same)."""
    meta_path = shard_meta_path(vdir, span)
    npy = shard_npy_path(vdir, span)
    if not (os.path.isfile(meta_path) and os.path.isfile(npy)):
        return None
    try:
        meta = read_json(meta_path)
        arr = np.load(npy, mmap_mode="r")
    except (ValueError, OSError):
        return None
    if (meta.get("start"), meta.get("stop")) != (span.start, span.stop):
        return None
    if model_fingerprint is not None and meta.get("model_fingerprint") != model_fingerprint:
        return None
    if arr.ndim != 2 or arr.shape[0] != meta.get("rows") or arr.shape[1] != meta.get("dim"):
        return None
    if meta["rows"] + len(meta.get("skipped", [])) != len(span):
        return None
    columns = meta.get("orientation")
    if column_shape != ANY_COLUMNS and (columns is None) != (column_shape is None):
        return None
    if columns is not None:
        expected = (meta["rows"], columns.get("columns"), columns.get("dim"))
        if column_shape not in (ANY_COLUMNS, None) and expected[1:] != tuple(column_shape):
            return None
        try:
            stored = np.load(shard_columns_path(vdir, span), mmap_mode="r")
        except (ValueError, OSError):
            return None
        if stored.shape != expected or stored.dtype != COLUMNS_DTYPE:
            return None
    return meta


def load_shard_vectors(vdir: str, span: ShardSpan, mmap: bool = True) -> np.ndarray:
    return np.load(shard_npy_path(vdir, span), mmap_mode="r" if mmap else None)


def load_shard_columns(vdir: str, span: ShardSpan) -> np.ndarray:
    """The shard's orientation columns [rows, Wg, C] float16, memory-mapped."""
    return np.load(shard_columns_path(vdir, span), mmap_mode="r")


def iter_vector_blocks(vdir: str, spans: Sequence[ShardSpan], block_rows: int = 65536) -> Iterator[np.ndarray]:
    """Float32 blocks of at most block_rows vectors over the shards, in row order (bounded memory)."""
    for span in spans:
        arr = load_shard_vectors(vdir, span)
        for s in range(0, arr.shape[0], block_rows):
            yield np.ascontiguousarray(arr[s:s + block_rows], dtype=np.float32)


def write_plan(work: str, plan: dict) -> None:
    atomic_write_json(os.path.join(work, PLAN_FILE), plan)


def read_plan(work: str) -> dict | None:
    path = os.path.join(work, PLAN_FILE)
    return read_json(path) if os.path.isfile(path) else None


def spans_from_plan(plan: dict) -> list[ShardSpan]:
    return plan_shards(plan["count"], plan["shard_size"], plan.get("first_shard_index", 0))

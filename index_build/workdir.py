"""The build's work directory: the plain files passed between the stages.

    WORK/plan.json                what is being built (catalogue checksum, model fingerprint, shard size, ...)
    WORK/catalog.csv              validated tiles, normalised (reader stage output, mapper input)
    WORK/vectors/shard-NNNNN.npy  float32 [rows, D] embeddings of the good tiles of plan rows [start, stop)
    WORK/vectors/shard-NNNNN.json sidecar, written after the .npy: rows, skipped tiles, checksum, timing

A shard is finished exactly when its sidecar exists and agrees with its .npy; both are written
atomically, so a killed build leaves only finished shards (plus stray *.tmp files that are ignored).
Row i of the final index is the i-th vector over the shards in order, with skipped tiles left out.
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


def write_shard(vdir: str, span: ShardSpan, vectors: np.ndarray, skipped: Sequence[dict],
                model_fingerprint: str, seconds: float, engine: str) -> dict:
    """Write one finished shard: the .npy first, then the sidecar that marks it finished."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError("shard vectors must be 2-D")
    if vectors.shape[0] + len(skipped) != len(span):
        raise ValueError(f"{span.name}: {vectors.shape[0]} vectors + {len(skipped)} skipped != {len(span)} rows")
    os.makedirs(vdir, exist_ok=True)
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
    atomic_write_json(shard_meta_path(vdir, span), meta)
    return meta


def read_finished_shard(vdir: str, span: ShardSpan, model_fingerprint: str | None = None) -> dict | None:
    """The sidecar of a finished, consistent shard, or None when the shard has to be (re-)encoded."""
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
    return meta


def load_shard_vectors(vdir: str, span: ShardSpan, mmap: bool = True) -> np.ndarray:
    return np.load(shard_npy_path(vdir, span), mmap_mode="r" if mmap else None)


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

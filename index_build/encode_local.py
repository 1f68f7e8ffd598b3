"""Mapper stage, local engine: decoding + polar-transforming tiles feeding batched `encode_aerial`
on one device, writing one shard (vectors, and the orientation columns where the model has an
orientation head) per finished shard.

Two ways to run it:
- `workers > 0` (what a GPU wants): a torch DataLoader whose worker processes decode ahead of the
  model; the CPU only decodes.
- `workers == 0` (the CPU default): *encoder lanes*. Each lane is a thread that decodes a whole
  batch and then encodes it with its own small share of the cores (one torch thread each by
  default); the lanes share the read-only model and take the batches in turn, and their results
  are consumed in batch order. While one lane decodes, the other's forward runs, so no core waits:
  on two cores, two one-thread lanes encode more tiles per second than one two-thread forward
  alternating with a decoding phase (bench/RESULTS.md). A single forward spread over every core
  beside a decoding thread would instead stall its OpenMP threads at every barrier.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from index_build.encode_common import (BadImagesError, BadTile, EncodeStats, PathTable, ShardAlignedBatches,
                                       TileImageDataset, collate_tiles, no_columns)
from index_build.progress import TileProgress
from index_build.workdir import ShardSpan, write_shard
from model.encode import available_cpus

MAX_CPU_LANES = 8
WARM_UP_BATCHES = 2

log = logging.getLogger("index_build")


def _worker_init(_worker_id: int) -> None:
    # Each worker decodes one image at a time; intra-op threads would only fight the model for cores.
    torch.set_num_threads(1)


def lane_plan(lanes: int | None = None) -> tuple[int, int]:
    """(encoder lanes, torch threads per lane) when `workers == 0`: by default one lane per core
    (up to MAX_CPU_LANES), the cores shared out among the lanes."""
    cpus = available_cpus()
    lanes = lanes or max(1, min(cpus, MAX_CPU_LANES))
    return lanes, max(1, cpus // lanes)


@dataclass
class EncodedBatch:
    rows: list[int]
    vectors: np.ndarray      # [rows without errors, D]
    errors: list[str]        # one per row, "" where the tile decoded
    columns: np.ndarray | None = None  # [rows without errors, Wg, C] orientation columns; None without a head


def _encode_good(model, rows, batch: torch.Tensor, errors: list[str], device, skip_bad: bool) -> EncodedBatch:
    """Encode the tiles of a batch that decoded; bad ones only keep their error text. Without
    `skip_bad` a bad tile stops the build, so nothing of its batch is encoded."""
    keep = [i for i, e in enumerate(errors) if not e]
    if len(keep) < len(rows):
        batch = batch.index_select(0, torch.tensor(keep, dtype=torch.long))
    if keep and (skip_bad or len(keep) == len(rows)):
        vectors, columns = model.encode_uint8_with_columns(batch, "aerial")
    else:
        vectors, columns = np.zeros((0, model.embedding_dim), np.float32), no_columns(model)
    return EncodedBatch(list(rows), vectors, list(errors), columns)


def _warm_up(model, batch_size: int, device) -> None:
    """Setup before the clock starts: the first forwards at the build's batch size (the encoder
    warmed up on single images) allocate what the later ones reuse."""
    blank = torch.zeros(batch_size, 3, *model.config.aerial_size, dtype=torch.uint8)
    for _ in range(WARM_UP_BATCHES):
        model.encode_uint8_with_columns(blank, "aerial")


# A batch the workers have not delivered in this long is never coming (a worker that died on a full
# /dev/shm can leave the loader waiting for ever): an error instead of a hang.
LOADER_TIMEOUT_S = 600.0


def _loader_batches(model, dataset, batches: ShardAlignedBatches, *, workers: int, device, skip_bad: bool,
                    prefetch_batches: int) -> Iterator[EncodedBatch]:
    """DataLoader workers decode ahead; this thread runs the model."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_tiles,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init,
        prefetch_factor=max(2, prefetch_batches),
        timeout=LOADER_TIMEOUT_S,
    )
    # On a CPU device the workers' decoding and the model's threads share the same cores: give the
    # model the cores the workers leave free instead of oversubscribing them.
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(threads_before, available_cpus() - workers)))
    try:
        for rows, batch, errors in loader:
            yield _encode_good(model, rows, batch, errors, device, skip_bad)
    finally:
        torch.set_num_threads(threads_before)


def _lane_batches(model, dataset, batches: ShardAlignedBatches, *, lanes: int, threads_per_lane: int,
                  device, skip_bad: bool) -> Iterator[EncodedBatch]:
    """Encoder lanes (see the module docstring); batches come out in order."""

    def lane_init() -> None:
        torch.set_num_threads(threads_per_lane)  # per thread: each lane sets its own share

    def decode_and_encode(rows: list[int]) -> EncodedBatch:
        decoded = collate_tiles([dataset[r] for r in rows])
        return _encode_good(model, *decoded, device, skip_bad)

    pending: deque = deque()
    with ThreadPoolExecutor(lanes, thread_name_prefix="encode-lane", initializer=lane_init) as pool:
        try:
            for rows in batches:
                pending.append(pool.submit(decode_and_encode, rows))
                if len(pending) > lanes:  # every lane busy and one batch queued behind them
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:  # stopped early (an error, a bad tile): drop what did not start
                fut.cancel()


def encode_shards_local(model, paths: Sequence[str], tile_ids: Sequence[str], spans: Sequence[ShardSpan],
                        vdir: str, *, batch_size: int, workers: int, device: torch.device, skip_bad: bool,
                        fingerprint: str, progress: bool = True, prefetch_batches: int = 4,
                        lanes: int | None = None,
                        on_shard_written: Callable[[dict], None] | None = None) -> EncodeStats:
    """Encode the rows of `spans` (all of them are encoded; the caller leaves out finished shards).
    `lanes`: encoder lanes when `workers == 0` (default: `lane_plan`)."""
    stats = EncodeStats(shards_encoded=0)
    spans = list(spans)
    if not spans:
        return stats
    dataset = TileImageDataset(PathTable(paths), model.config)
    total = sum(len(s) for s in spans)
    warm_up_size = min(batch_size, total)
    log.info("warming up the encoder on %s: %d blank batch(es) of %d tile(s)", device, WARM_UP_BATCHES,
             warm_up_size)
    _warm_up(model, warm_up_size, device)
    batches = ShardAlignedBatches(spans, batch_size)
    if workers > 0:
        encoded = _loader_batches(model, dataset, batches, workers=workers, device=device, skip_bad=skip_bad,
                                  prefetch_batches=prefetch_batches)
    else:
        n_lanes, per_lane = lane_plan(lanes)
        encoded = _lane_batches(model, dataset, batches, lanes=n_lanes, threads_per_lane=per_lane,
                                device=device, skip_bad=skip_bad)
    bar = TileProgress(total, "encode", enabled=progress)
    span_iter = iter(spans)
    span = next(span_iter)
    parts: list[np.ndarray] = []
    column_parts: list[np.ndarray] = []
    skipped: list[dict] = []
    filled = 0
    t_run = time.perf_counter()
    t_shard = t_run
    try:
        for batch in encoded:
            bad = [BadTile(r, tile_ids[r], paths[r], e) for r, e in zip(batch.rows, batch.errors) if e]
            if bad:
                if not skip_bad:
                    raise BadImagesError(bad)
                skipped.extend(b.to_json() for b in bad)
                stats.tiles_skipped += len(bad)
            parts.append(batch.vectors)
            if batch.columns is not None:
                column_parts.append(batch.columns)
            stats.tiles_encoded += len(batch.vectors)
            filled += len(batch.rows)
            bar.update(len(batch.rows))
            if filled == len(span):
                vectors = np.concatenate(parts)
                columns = np.concatenate(column_parts) if column_parts else None
                meta = write_shard(vdir, span, vectors, skipped, fingerprint,
                                   time.perf_counter() - t_shard, "local", columns=columns)
                stats.shards_encoded += 1
                if on_shard_written:
                    on_shard_written(meta)
                parts, column_parts, skipped, filled = [], [], [], 0
                t_shard = time.perf_counter()
                span = next(span_iter, None)
    finally:
        encoded.close()
        bar.close()
        stats.encode_s = time.perf_counter() - t_run
    return stats

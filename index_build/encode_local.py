"""Mapper stage, local engine: decoding + polar-transforming tiles feeding batched `encode_aerial`
on one device, writing one shard file per finished shard.

Two ways to decode: with `workers > 0` a torch DataLoader whose worker processes decode ahead of
the model (what a GPU wants: the CPU only decodes). With `workers == 0` (the CPU default) decoding
and encoding take turns per batch, each with every core: a thread pool decodes the batch's
tiles, then the model encodes it with all its threads. Running them side by side on the same
cores instead would stall the model's OpenMP threads at every barrier."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from index_build.encode_common import (BadImagesError, BadTile, EncodeStats, PathTable, ShardAlignedBatches,
                                       TileImageDataset, collate_tiles, tile_batch_input)
from index_build.workdir import ShardSpan, write_shard
from model.encode import available_cpus


def _worker_init(_worker_id: int) -> None:
    # Each worker decodes one image at a time; intra-op threads would only fight the model for cores.
    torch.set_num_threads(1)


class InlineDecoder:
    """Yields collated batches like the DataLoader, decoding each batch's tiles on a thread pool
    in this process (Pillow and numpy release the GIL) while the model is not running."""

    def __init__(self, dataset: TileImageDataset, batches: ShardAlignedBatches, threads: int):
        self.dataset = dataset
        self.batches = batches
        self.threads = max(1, threads)

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            for rows in self.batches:
                yield collate_tiles(list(pool.map(self.dataset.__getitem__, rows)))


def encode_shards_local(model, paths: Sequence[str], tile_ids: Sequence[str], spans: Sequence[ShardSpan],
                        vdir: str, *, batch_size: int, workers: int, device: torch.device, skip_bad: bool,
                        fingerprint: str, progress: bool = True, prefetch_batches: int = 4,
                        on_shard_written: Callable[[dict], None] | None = None) -> EncodeStats:
    """Encode the rows of `spans` (all of them are encoded; the caller leaves out finished shards)."""
    from model.encode import encode_batch

    stats = EncodeStats(shards_encoded=0)
    spans = list(spans)
    if not spans:
        return stats
    table = PathTable(paths)
    dataset = TileImageDataset(table, model.config)
    if workers == 0:
        loader = InlineDecoder(dataset, ShardAlignedBatches(spans, batch_size), threads=torch.get_num_threads())
    else:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=ShardAlignedBatches(spans, batch_size),
            num_workers=workers,
            collate_fn=collate_tiles,
            pin_memory=device.type == "cuda",
            worker_init_fn=_worker_init,
            prefetch_factor=max(2, prefetch_batches),
        )
    # On a CPU device the workers' decoding and the model's threads share the same cores: give the
    # model the cores the workers leave free instead of oversubscribing them.
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, min(threads_before, available_cpus() - workers)))
    total = sum(len(s) for s in spans)
    bar = tqdm(total=total, unit="tile", unit_scale=True, dynamic_ncols=True, disable=not progress,
               desc="encode", smoothing=0.05)
    span_iter = iter(spans)
    span = next(span_iter)
    parts: list[np.ndarray] = []
    skipped: list[dict] = []
    filled = 0
    t_run = time.perf_counter()
    t_shard = t_run
    try:
        for rows, batch, errors in loader:
            bad_idx = [i for i, e in enumerate(errors) if e]
            if bad_idx:
                bad = [BadTile(rows[i], tile_ids[rows[i]], paths[rows[i]], errors[i]) for i in bad_idx]
                if not skip_bad:
                    raise BadImagesError(bad)
                skipped.extend(b.to_json() for b in bad)
                stats.tiles_skipped += len(bad)
                keep = torch.tensor([i for i in range(len(rows)) if not errors[i]], dtype=torch.long)
                batch = batch.index_select(0, keep)
            if batch.shape[0]:
                parts.append(encode_batch(model, tile_batch_input(batch), "aerial", device).numpy())
                stats.tiles_encoded += batch.shape[0]
            filled += len(rows)
            bar.update(len(rows))
            if filled == len(span):
                vectors = (np.concatenate(parts) if parts
                           else np.zeros((0, model.embedding_dim), np.float32))
                meta = write_shard(vdir, span, vectors, skipped, fingerprint,
                                   time.perf_counter() - t_shard, "local")
                stats.shards_encoded += 1
                if on_shard_written:
                    on_shard_written(meta)
                parts, skipped, filled = [], [], 0
                t_shard = time.perf_counter()
                span = next(span_iter, None)
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - t_run
        torch.set_num_threads(threads_before)
    return stats

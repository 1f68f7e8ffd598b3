"""Mapper stage, Ray engine: the same encoding as encode_local, spread over a Ray actor pool.

Ray Data `map_batches` runs a fixed-size pool of ShardEncoder actors (one model per actor, one GPU
per actor when the cluster has GPUs). The unit of work is one shard: an actor reads the shard's
rows straight from the work dir's catalog.csv (byte ranges computed by the driver, so no actor
parses the whole catalogue), decodes images on a small thread pool while the model encodes the
previous batch, and writes the shard's .npy files (vectors, and orientation columns where the model
has a head) + sidecar itself, exactly as the local engine does.
The work dir and the checkpoint must therefore be on storage every node sees (NFS, a mounted
bucket, ...); only shard numbers and byte offsets travel through Ray's object store.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from index_build.encode_common import (BadImagesError, BadTile, EncodeStats, EncoderFailed, decode_tile, no_columns,
                                       shard_batches)
from index_build.workdir import ShardSpan, write_shard


def record_byte_offsets(csv_path: str, rows: Sequence[int]) -> dict[int, int]:
    """Byte offset in csv_path where each requested record starts (record 0 = first after the header).

    Records may span lines when a quoted field holds a newline; csv.writer doubles quotes inside
    fields, so a record ends at a newline exactly when it has seen an even number of quotes.
    Also accepts rows == number of records (the offset of the end of the file).
    """
    wanted = sorted(set(rows))
    out: dict[int, int] = {}
    j = 0
    with open(csv_path, "rb") as f:
        header = f.readline()
        offset = len(header)
        record, quotes = 0, 0
        while j < len(wanted):
            if quotes % 2 == 0:
                while j < len(wanted) and wanted[j] == record:
                    out[record] = offset
                    j += 1
                quotes = 0
            line = f.readline()
            if not line:
                break
            quotes += line.count(b'"')
            offset += len(line)
            if quotes % 2 == 0:
                record += 1
    if j < len(wanted):
        raise ValueError(f"{csv_path}: has only {record} records; asked for record {wanted[j]}")
    return out


def read_record_range(csv_path: str, byte_start: int, byte_stop: int) -> list[list[str]]:
    with open(csv_path, "rb") as f:
        f.seek(byte_start)
        data = f.read(byte_stop - byte_start)
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


class ShardEncoder:
    """Ray Data callable class: one model per actor; each call encodes and writes whole shards."""

    def __init__(self, checkpoint: str, model_config: str | None, fingerprint: str, work: str,
                 batch_size: int, skip_bad: bool, device: str, decode_threads: int, torch_threads: int,
                 tile_phases: int = 1):
        import torch

        from model import load_checkpoint
        from model.encode import pick_device
        from model.inference import InferenceEncoder

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        model = load_checkpoint(checkpoint, config=model_config)
        got = model.fingerprint()
        if got != fingerprint:
            raise RuntimeError(f"{checkpoint} on this node has fingerprint {got}, the build expects {fingerprint}")
        self.device = pick_device(device)
        self.model = InferenceEncoder(model, self.device, branches=("aerial",), tile_phases=tile_phases)
        self.fingerprint = fingerprint
        self.work = work
        self.catalog = os.path.join(work, "catalog.csv")
        self.vdir = os.path.join(work, "vectors")
        self.batch_size = batch_size
        self.skip_bad = skip_bad
        self.pool = ThreadPoolExecutor(max(1, decode_threads))

    def _decode(self, sources: Sequence[str]):
        return self.pool.map(lambda p: decode_tile(p, self.model.config), sources)

    def encode_shard(self, span: ShardSpan, byte_start: int, byte_stop: int) -> dict:
        import torch

        t0 = time.perf_counter()
        records = read_record_range(self.catalog, byte_start, byte_stop)
        if len(records) != len(span):
            raise RuntimeError(f"{span.name}: read {len(records)} catalogue rows, expected {len(span)}")
        batches = list(shard_batches(span, self.batch_size))
        pending = self.pool.submit(lambda b=batches[0]: list(self._decode([records[r - span.start][3] for r in b])))
        parts, column_parts, skipped, bad_tiles = [], [], [], []
        for k, rows in enumerate(batches):
            decoded = pending.result()
            if k + 1 < len(batches):  # decode the next batch while this one runs through the model
                nxt = batches[k + 1]
                pending = self.pool.submit(lambda b=nxt: list(self._decode([records[r - span.start][3] for r in b])))
            good = []
            for r, (tensor, error) in zip(rows, decoded):
                rec = records[r - span.start]
                if tensor is None:
                    bad_tiles.append(BadTile(r, rec[0], rec[3], error))
                else:
                    good.append(tensor)
            if good and not (bad_tiles and not self.skip_bad):
                vectors, columns = self.model.encode_uint8_with_columns(torch.stack(good), "aerial")
                parts.append(vectors)
                if columns is not None:
                    column_parts.append(columns)
        if bad_tiles and not self.skip_bad:  # the shard is not written; the driver reports every bad tile
            return {"shard": span.index, "rows": 0, "skipped": 0, "seconds": time.perf_counter() - t0,
                    "error": json.dumps([b.to_json() for b in bad_tiles]), "bad": len(bad_tiles)}
        skipped = [b.to_json() for b in bad_tiles]
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.model.embedding_dim), np.float32)
        columns = np.concatenate(column_parts) if column_parts else no_columns(self.model)
        write_shard(self.vdir, span, vectors, skipped, self.fingerprint, time.perf_counter() - t0, "ray",
                    columns=columns)
        return {"shard": span.index, "rows": int(vectors.shape[0]), "skipped": len(skipped),
                "seconds": time.perf_counter() - t0, "error": "", "bad": len(skipped)}

    def __call__(self, batch: dict) -> dict:
        results = [self.encode_shard(ShardSpan(int(i), int(s), int(e)), int(bs), int(be))
                   for i, s, e, bs, be in zip(batch["shard"], batch["start"], batch["stop"],
                                              batch["byte_start"], batch["byte_stop"])]
        return {key: np.array([r[key] for r in results]) for key in results[0]}


def encode_shards_ray(*, checkpoint: str, model_config: str | None, fingerprint: str, work: str,
                      spans: Sequence[ShardSpan], total_rows: int, batch_size: int, skip_bad: bool,
                      device: str, actors: int, cpus_per_actor: float, gpus_per_actor: float | None,
                      decode_threads: int, address: str | None, progress: bool = True,
                      tile_phases: int = 1) -> EncodeStats:
    import ray

    from index_build.progress import TileProgress

    stats = EncodeStats()
    spans = list(spans)
    if not spans:
        return stats
    catalog = os.path.join(work, "catalog.csv")
    offsets = record_byte_offsets(catalog, [s.start for s in spans] + [s.stop for s in spans])
    started_here = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True,
                 logging_level="WARNING", log_to_driver=False)
        started_here = True
    try:
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        if device == "auto" and gpus_per_actor == 0:
            device = "cpu"
        items = [{"shard": s.index, "start": s.start, "stop": s.stop,
                  "byte_start": offsets[s.start], "byte_stop": offsets[s.stop]} for s in spans]
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            ShardEncoder,
            fn_constructor_kwargs=dict(checkpoint=os.path.abspath(checkpoint), model_config=model_config,
                                       fingerprint=fingerprint, work=os.path.abspath(work),
                                       batch_size=batch_size, skip_bad=skip_bad, device=device,
                                       decode_threads=decode_threads,
                                       torch_threads=max(1, int(cpus_per_actor)), tile_phases=tile_phases),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
            max_restarts=ACTOR_RETRIES,  # Ray Data's default, for ever: a shard that kills its actor each time
            max_task_retries=ACTOR_RETRIES,  # (out of memory, a crashing decoder) hung the build silently
        )
        bar = TileProgress(total_rows, f"encode (ray x{actors})", enabled=progress)
        bad: list[BadTile] = []
        t0 = time.perf_counter()
        try:
            for row in ds.iter_rows():
                if row["error"]:
                    bad.extend(BadTile(**b) for b in json.loads(str(row["error"])))
                else:
                    stats.shards_encoded += 1
                    stats.tiles_encoded += int(row["rows"])
                    stats.tiles_skipped += int(row["skipped"])
                bar.update(int(row["rows"]) + int(row["skipped"]) + int(row["bad"] if row["error"] else 0))
        except Exception as exc:  # Ray's wrappers of an encoder's error: 80-150 lines of traceback, the cause inside
            raise EncoderFailed(f"a Ray encoder failed: {_cause(exc)}; the shards finished are kept for "
                                "--resume") from None
        bar.close()
        stats.encode_s = time.perf_counter() - t0
        if bad:
            raise BadImagesError(sorted(bad, key=lambda b: b.row))
    finally:
        if started_here:
            ray.shutdown()
    return stats


ACTOR_RETRIES = 3
_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)):")


def _cause(exc: BaseException) -> str:
    """The actor's own exception under Ray's wrappers, as one line: Ray sends it across processes as the
    text of its traceback, whose last exception line names it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if _EXCEPTION_LINE.match(line)]
    theirs = [line for line in lines if not line.startswith("ray.")]
    return (theirs or lines or [f"{type(exc).__name__}: {text.strip()}"])[-1]

"""The request side of localisation: read uploads, have them decoded and encoded, shape the
answer (JSON / GeoJSON).

Where an upload is decoded depends on ``Runtime.plan.decode_threads``: 0 (the CPU default) hands
the encoder worker a ``decode`` function that it runs on its own core just before the forward;
otherwise a thread pool decodes the upload first and the job is queued decoded (GPU).
"""
from __future__ import annotations

import time
import weakref
from functools import partial
from typing import Callable

import anyio
import torch
from fastapi import Request
from pydantic import BaseModel

from model.preprocess import ImageDecodeError, image_uint8, load_ground_image

from .artifact import LoadedIndex
from .engine import JobResult, LoadedModel
from .logs import request_id_var
from .runtime import Runtime
from .schemas import (
    BatchItem, BatchTiming, Feature, FeatureCollection, IndexInfo, LocalizeBatchResponse,
    LocalizeResponse, ModelInfo, PointGeometry, TileMatch, Timing,
)
from .uploads import ImageLimits, UploadedFile, UploadError, check_image, read_files

GEOJSON = "application/geo+json"


def decode_uploads(files: list[UploadedFile], limits: ImageLimits, config) -> torch.Tensor:
    """Decode uploads that passed `check_image` -> [n, 3, H, W] uint8 at the model's ground size;
    UploadError names the first one whose pixel data is damaged."""
    tensors = []
    for upload in files:
        try:
            img = load_ground_image(upload.data, config, name=f"image {upload.index}",
                                    max_pixels=limits.max_pixels)
        except ImageDecodeError as exc:
            raise UploadError(400, "undecodable_image", str(exc)) from None
        tensors.append(image_uint8(img))  # normalised per micro-batch by the engine
        img.close()
        upload.data = b""  # the bytes are no longer needed; let them go early
    return torch.stack(tensors)


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - started) * 1000.0


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone away (the body was read in full before this runs)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run(request: Request, runtime: Runtime, *, k: int,
              batch: bool) -> tuple[JobResult, list[UploadedFile], float]:
    """Read the upload(s), check their headers, queue one job that decodes them off the event loop,
    await its result."""
    started = time.perf_counter()
    s = runtime.settings
    files = await read_files(
        request,
        field_names=("images", "image") if batch else ("image",),
        max_files=s.max_batch_images if batch else 1,
        max_file_bytes=s.max_upload_bytes,
        max_body_bytes=s.max_batch_body_bytes if batch else s.max_body_bytes,
    )
    limits = ImageLimits(s.max_pixels, s.min_image_side, s.max_aspect_ratio)
    for upload in files:  # a header parse each: bad uploads are refused before they queue
        check_image(upload, limits)
    engine = runtime.engine
    assert engine.model is not None
    decode = partial(decode_uploads, files, limits, engine.model.config)
    rid, gone = request_id_var.get(), partial(_wait_for_disconnect, request)
    if runtime.plan.decode_threads == 0:  # the worker decodes it just before its forward
        result = await engine.localize(k, decode=decode, n=len(files), request_id=rid,
                                       disconnected=gone)
        return result, files, started
    engine.queue.expect()  # lets a worker hold a batch open for this request while it decodes
    try:
        images, decode_ms = await anyio.to_thread.run_sync(
            _timed, decode, limiter=request.app.state.decode_limiter)
    except BaseException:
        engine.queue.unexpect()
        raise
    result = await engine.localize(k, images=images, decode_ms=decode_ms, expected=True,
                                   request_id=rid, disconnected=gone)
    return result, files, started


def _matches(rows: list[tuple[str, float, float, float]]) -> list[TileMatch]:
    # the engine's own rows (str, float...): validating them again costs every answer
    return [TileMatch.model_construct(rank=i, tile_id=t, lat=la, lon=lo, score=sc)
            for i, (t, la, lo, sc) in enumerate(rows, start=1)]


_described: dict[type, tuple[weakref.ref, int, BaseModel]] = {}


def _described_once(source: LoadedModel | LoadedIndex, model: type[BaseModel]) -> BaseModel:
    """``model(**source.info())``, made again only for another model or index generation: both
    stay unchanged while served (a swap serves a new LoadedIndex)."""
    generation = getattr(source, "generation", 0)
    made = _described.get(model)
    if made is None or made[0]() is not source or made[1] != generation:
        made = (weakref.ref(source), generation, model(**source.info()))
        _described[model] = made
    return made[2]


def _observe(runtime: Runtime, result: JobResult, total_ms: float) -> None:
    stage = runtime.metrics.stage
    n = len(result.matches)
    for _ in range(n):
        stage["decode"].observe(result.decode_ms / n / 1000.0)
        stage["queue"].observe(result.queue_ms / 1000.0)
        stage["total"].observe(total_ms / 1000.0)


def single_response(runtime: Runtime, result: JobResult, started: float) -> LocalizeResponse:
    total_ms = (time.perf_counter() - started) * 1000.0
    _observe(runtime, result, total_ms)
    return LocalizeResponse(
        results=_matches(result.matches[0]),
        model=_described_once(runtime.engine.model, ModelInfo),  # type: ignore[arg-type]
        index=_described_once(result.index, IndexInfo),
        timing_ms=Timing(decode=round(result.decode_ms, 3), queue=round(result.queue_ms, 3),
                         encode=round(result.encode_ms, 3), search=round(result.search_ms, 3),
                         total=round(total_ms, 3)),
        batch_size=result.batch_size,
    )


def batch_response(runtime: Runtime, result: JobResult, files: list[UploadedFile],
                   started: float) -> LocalizeBatchResponse:
    total_ms = (time.perf_counter() - started) * 1000.0
    _observe(runtime, result, total_ms)
    return LocalizeBatchResponse(
        items=[BatchItem(image=f.index, filename=f.filename, results=_matches(rows),
                         batch_size=result.batch_size)
               for f, rows in zip(files, result.matches)],
        model=_described_once(runtime.engine.model, ModelInfo),  # type: ignore[arg-type]
        index=_described_once(result.index, IndexInfo),
        timing_ms=BatchTiming(decode=round(result.decode_ms, 3), queue=round(result.queue_ms, 3),
                              encode=round(result.encode_ms, 3),
                              search=round(result.search_ms, 3), total=round(total_ms, 3)),
    )


def to_geojson(items: list[tuple[int | None, list[TileMatch]]], model: ModelInfo, index: IndexInfo,
               timing: dict[str, float]) -> FeatureCollection:
    """RFC 7946: positions are [longitude, latitude]; one Point feature per match."""
    features = []
    for image, matches in items:
        for m in matches:
            props = {"rank": m.rank, "tile_id": m.tile_id, "score": m.score}
            if image is not None:
                props["image"] = image
            features.append(Feature(geometry=PointGeometry(coordinates=(m.lon, m.lat)),
                                    properties=props))
    return FeatureCollection(features=features, model=model, index=index, timing_ms=timing)


def wants_geojson(accept: str | None) -> bool:
    """True when the Accept header prefers application/geo+json over application/json."""
    if not accept:
        return False
    q_geo = q_json = q_wild = None
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == GEOJSON:
            q_geo = max(q_geo or 0.0, q)
        elif media == "application/json":
            q_json = max(q_json or 0.0, q)
        elif media in ("*/*", "application/*"):
            q_wild = max(q_wild or 0.0, q)
    if not q_geo:
        return False
    json_q = q_json if q_json is not None else (q_wild or 0.0)
    # On a tie with an explicit application/json, plain JSON wins; against a wildcard, GeoJSON.
    return q_geo > json_q or (q_geo == json_q and q_json is None)

"""The request side of localisation: read and check the uploads, queue them as one job (an
encoder thread decodes them right before its forward), shape the answer (JSON / GeoJSON)."""
from __future__ import annotations

import time
from functools import partial

from fastapi import Request

from .engine import JobResult
from .runtime import Runtime
from .schemas import (
    BatchItem, Feature, FeatureCollection, IndexInfo, LocalizeBatchResponse, LocalizeResponse, ModelInfo,
    PointGeometry, TileMatch, Timing,
)
from .uploads import ImageLimits, UploadedFile, check_image, decode_uploads, read_files

GEOJSON = "application/geo+json"


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone away (the body was read in full before this runs)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run(request: Request, runtime: Runtime, *, k: int,
              batch: bool) -> tuple[JobResult, list[UploadedFile], float]:
    """Read the upload(s) within the byte budget, check their headers, queue one job, await it."""
    started = time.perf_counter()
    s = runtime.settings
    model, engine = runtime.model, runtime.engine
    assert model is not None and engine is not None
    with request.app.state.upload_budget.reservation() as take:
        files = await read_files(
            request,
            field_names=("images", "image") if batch else ("image",),
            max_files=s.max_batch_images if batch else 1,
            max_file_bytes=s.max_upload_bytes,
            max_body_bytes=s.max_batch_body_bytes if batch else s.max_body_bytes,
            read_timeout_s=s.read_timeout_s,
            take=take,
        )
        limits = ImageLimits(s.max_pixels, s.min_image_side, s.max_aspect_ratio)
        for upload in files:  # a header parse each: bad uploads are refused before they queue
            check_image(upload, limits)
        result = await engine.localize(partial(decode_uploads, files, limits, model.config), n=len(files),
                                       k=k, disconnected=partial(_wait_for_disconnect, request))
    return result, files, started


def _timing(runtime: Runtime, result: JobResult, started: float) -> Timing:
    total_ms = (time.perf_counter() - started) * 1000.0
    runtime.metrics.observe_request(len(result.matches), result.decode_ms / 1000.0, result.queue_ms / 1000.0,
                                    total_ms / 1000.0)
    return Timing(decode=round(result.decode_ms, 3), queue=round(result.queue_ms, 3),
                  encode=round(result.encode_ms, 3), search=round(result.search_ms, 3), total=round(total_ms, 3))


def single_response(runtime: Runtime, result: JobResult, started: float) -> LocalizeResponse:
    return LocalizeResponse(results=result.matches[0], model=runtime.model.info,  # type: ignore[union-attr]
                            index=result.index.info, timing_ms=_timing(runtime, result, started),
                            batch_size=result.batch_size)


def batch_response(runtime: Runtime, result: JobResult, files: list[UploadedFile],
                   started: float) -> LocalizeBatchResponse:
    return LocalizeBatchResponse(
        items=[BatchItem(image=f.index, filename=f.filename, results=matches, batch_size=result.batch_size)
               for f, matches in zip(files, result.matches)],
        model=runtime.model.info, index=result.index.info,  # type: ignore[union-attr]
        timing_ms=_timing(runtime, result, started))


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

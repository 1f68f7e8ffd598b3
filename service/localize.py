"""The request side of localisation: read and check the uploads, work out each one's field of view
and heading, queue them as one job (an encoder thread decodes them right before its forward), shape
the answer (JSON / GeoJSON)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

from fastapi import Request

from .artifact import DISTINCT_M, Answer
from .engine import JobResult
from .runtime import Runtime
from .schemas import (
    BatchItem, Confidence, Feature, FeatureCollection, IndexInfo, LocalizeBatchResponse, LocalizeResponse, ModelInfo,
    PointGeometry, TileMatch, Timing, ViewInfo,
)
from .uploads import ImageLimits, UploadedFile, ViewSpec, check_image, decode_uploads, read_files, view_spec

GEOJSON = "application/geo+json"


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone away (the body was read in full before this runs)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class ViewParams:
    """What the request says about its images (query parameters); EXIF and shape fill the rest."""

    fov_deg: float | None = None
    heading_deg: float | None = None
    projection: str | None = None


@dataclass
class Localized:
    result: JobResult
    files: list[UploadedFile]
    specs: list[ViewSpec]
    started: float


async def run(request: Request, runtime: Runtime, *, k: int, batch: bool, params: ViewParams) -> Localized:
    """Read the upload(s) within the byte budget, check their headers and work out how to read each
    (field of view, heading), queue one job, await it."""
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
        specs = []
        for upload in files:  # a header parse each: bad uploads are refused before they queue
            _, width, height = check_image(upload, limits)
            specs.append(view_spec(upload, width, height, params.fov_deg, params.heading_deg, params.projection))
        result = await engine.localize(partial(decode_uploads, files, specs, limits, model.config), n=len(files),
                                       k=k, disconnected=partial(_wait_for_disconnect, request))
    return Localized(result, files, specs, started)


def _timing(runtime: Runtime, done: Localized) -> Timing:
    result = done.result
    total_ms = (time.perf_counter() - done.started) * 1000.0
    runtime.metrics.observe_request(len(result.answers), result.decode_ms / 1000.0, result.queue_ms / 1000.0,
                                    total_ms / 1000.0)
    return Timing(decode=round(result.decode_ms, 3), queue=round(result.queue_ms, 3),
                  encode=round(result.encode_ms, 3), search=round(result.search_ms, 3), total=round(total_ms, 3))


def _described(answer: Answer, spec: ViewSpec, ambiguity_margin: float) -> tuple[list[TileMatch], ViewInfo,
                                                                                  Confidence]:
    """An image's matches with absolute headings, how it was read, and how sure the answer is. A
    view placed at a known heading is aligned with north: the orientation head's estimate is then a
    correction of that heading."""
    placed = spec.heading_deg or 0.0
    matches = [m if m.heading_deg is None else m.model_copy(update={"heading_deg": round((placed + m.heading_deg)
                                                                                          % 360.0, 1)})
               for m in answer.matches]
    estimated = matches[0].heading_deg if matches else None
    view = ViewInfo(fov_deg=round(spec.fov_deg, 2), projection=spec.projection, fov_source=spec.fov_source,
                    heading_deg=spec.heading_deg if spec.heading_deg is not None else estimated,
                    heading_source=spec.heading_source or ("estimated" if estimated is not None else None))
    confidence = Confidence(margin=None if answer.margin is None else round(answer.margin, 4),
                            ambiguous=answer.margin is not None and answer.margin < ambiguity_margin,
                            competitor_tile_id=answer.competitor, distinct_m=DISTINCT_M)
    return matches, view, confidence


def single_response(runtime: Runtime, done: Localized) -> LocalizeResponse:
    matches, view, confidence = _described(done.result.answers[0], done.specs[0], runtime.settings.ambiguity_margin)
    return LocalizeResponse(results=matches, view=view, confidence=confidence,
                            model=runtime.model.info,  # type: ignore[union-attr]
                            index=done.result.index.info, timing_ms=_timing(runtime, done),
                            batch_size=done.result.batch_size)


def batch_response(runtime: Runtime, done: Localized) -> LocalizeBatchResponse:
    items = []
    for f, answer, spec in zip(done.files, done.result.answers, done.specs):
        matches, view, confidence = _described(answer, spec, runtime.settings.ambiguity_margin)
        items.append(BatchItem(image=f.index, filename=f.filename, results=matches, view=view,
                               confidence=confidence, batch_size=done.result.batch_size))
    return LocalizeBatchResponse(items=items, model=runtime.model.info,  # type: ignore[union-attr]
                                 index=done.result.index.info, timing_ms=_timing(runtime, done))


def to_geojson(items: list[tuple[int | None, list[TileMatch]]], model: ModelInfo, index: IndexInfo,
               timing: dict[str, float]) -> FeatureCollection:
    """RFC 7946: positions are [longitude, latitude]; one Point feature per match."""
    features = []
    for image, matches in items:
        for m in matches:
            props = {"rank": m.rank, "tile_id": m.tile_id, "score": m.score, "heading_deg": m.heading_deg}
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

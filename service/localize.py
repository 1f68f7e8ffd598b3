"""The request side of localisation: read and check the uploads, work out each one's field of view
and heading, queue them as one job (an encoder thread decodes them right before its forward), shape
the answer (JSON / GeoJSON)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

from fastapi import Request

from model.preprocess import exif_gps

from .artifact import DISTINCT_M, Answer, Near
from .engine import JobResult
from .runtime import Runtime
from .schemas import (
    BatchItem, Confidence, Feature, FeatureCollection, IndexInfo, LocalizeBatchResponse, LocalizeResponse, ModelInfo,
    NearInfo, PointGeometry, Position, TileMatch, Timing, ViewInfo,
)
from .uploads import ImageLimits, UploadedFile, ViewSpec, check_image, decode_uploads, read_files, view_spec

GEOJSON = "application/geo+json"
EXIF_RADIUS_M = 500.0  # the prior's radius when near_from_exif is given without radius_m


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
    near: tuple[float, float] | None = None  # lat, lon: search only within radius_m of it
    radius_m: float | None = None
    near_from_exif: bool = False  # where `near` is not given: the photo's EXIF GPS position, if any


@dataclass
class Localized:
    result: JobResult
    files: list[UploadedFile]
    specs: list[ViewSpec]
    started: float
    near: list[Near | None]


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
        near = [_prior(upload, params) for upload in files]
        result = await engine.localize(partial(decode_uploads, files, specs, limits, model.config), n=len(files),
                                       k=k, disconnected=partial(_wait_for_disconnect, request), near=near)
    return Localized(result, files, specs, started, near)


def _prior(upload: UploadedFile, params: ViewParams) -> Near | None:
    if params.near is not None:
        return Near(*params.near, params.radius_m, "parameter")  # type: ignore[arg-type]
    at = exif_gps(upload.data) if params.near_from_exif else None
    return None if at is None else Near(*at, params.radius_m or EXIF_RADIUS_M, "exif")


def _timing(runtime: Runtime, done: Localized) -> Timing:
    result = done.result
    total_ms = (time.perf_counter() - done.started) * 1000.0
    runtime.metrics.observe_request(len(result.answers), result.decode_ms / 1000.0, result.queue_ms / 1000.0,
                                    total_ms / 1000.0)
    return Timing(decode=round(result.decode_ms, 3), queue=round(result.queue_ms, 3),
                  encode=round(result.encode_ms, 3), search=round(result.search_ms, 3), total=round(total_ms, 3))


def _described(answer: Answer, spec: ViewSpec, ambiguity_margin: float, prior: Near | None = None) -> dict:
    """An image's matches with absolute headings, how it was read, and how sure the answer is. A
    view placed at a known heading is aligned with north: the orientation head's estimate is then a
    correction of that heading."""
    placed = spec.heading_deg or 0.0
    matches = [m if m.heading_deg is None else m.model_copy(update={"heading_deg": round(placed + m.heading_deg, 1)
                                                                                          % 360.0})
               for m in answer.matches]
    estimated = matches[0].heading_deg if matches else None
    view = ViewInfo(fov_deg=round(spec.fov_deg, 2), projection=spec.projection, fov_source=spec.fov_source,
                    heading_deg=spec.heading_deg if spec.heading_deg is not None else estimated,
                    heading_source=spec.heading_source or ("estimated" if estimated is not None else None))
    confidence = Confidence(margin=None if answer.margin is None else round(answer.margin, 4),
                            ambiguous=answer.margin is not None and answer.margin < ambiguity_margin,
                            competitor_tile_id=answer.competitor, distinct_m=DISTINCT_M)
    position = None if answer.position is None else Position(
        lat=answer.position[0], lon=answer.position[1], uncertainty_m=round(answer.position[2], 1))
    near = None if prior is None else NearInfo(lat=prior.lat, lon=prior.lon, radius_m=prior.radius_m,
                                               source=prior.source, tiles=answer.within or 0)
    return dict(results=matches, position=position, near=near, view=view, confidence=confidence)


def single_response(runtime: Runtime, done: Localized) -> LocalizeResponse:
    described = _described(done.result.answers[0], done.specs[0], runtime.settings.ambiguity_margin, done.near[0])
    return LocalizeResponse(**described, model=runtime.model.info,  # type: ignore[union-attr]
                            index=done.result.index.info, timing_ms=_timing(runtime, done),
                            batch_size=done.result.batch_size)


def batch_response(runtime: Runtime, done: Localized) -> LocalizeBatchResponse:
    items = []
    for f, answer, spec, prior in zip(done.files, done.result.answers, done.specs, done.near):
        items.append(BatchItem(image=f.index, filename=f.filename, batch_size=done.result.batch_size,
                               **_described(answer, spec, runtime.settings.ambiguity_margin, prior)))
    return LocalizeBatchResponse(items=items, model=runtime.model.info,  # type: ignore[union-attr]
                                 index=done.result.index.info, timing_ms=_timing(runtime, done))


def to_geojson(items: list[tuple[int | None, Position | None, list[TileMatch]]], model: ModelInfo, index: IndexInfo,
               timing: dict[str, float]) -> FeatureCollection:
    """RFC 7946: positions are [longitude, latitude]; per image, its refined position first, then one
    Point feature per match."""
    features = []
    for image, position, matches in items:
        points = [] if position is None else [
            ((position.lon, position.lat), {"kind": "position", "uncertainty_m": position.uncertainty_m})]
        points += [((m.lon, m.lat), {"kind": "match", "rank": m.rank, "tile_id": m.tile_id, "score": m.score,
                                     "heading_deg": m.heading_deg}) for m in matches]
        for coordinates, props in points:
            if image is not None:
                props["image"] = image
            features.append(Feature(geometry=PointGeometry(coordinates=coordinates), properties=props))
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

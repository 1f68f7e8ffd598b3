"""The request side of localisation: read and check the uploads, work out each one's field of view
and heading, queue them as one job (an encoder thread decodes them right before its forward), shape
the answer (JSON / GeoJSON)."""
from __future__ import annotations

import time
from functools import partial

from fastapi import Request, Response
from pydantic import BaseModel

from .artifact import DISTINCT_M, Answer, Near
from .engine import JobResult
from .runtime import Runtime
from .schemas import (
    BatchItem, Confidence, Feature, FeatureCollection, IndexInfo, LocalizeBatchResponse, LocalizeResponse, ModelInfo,
    NearInfo, PointGeometry, Position, Timing, ViewInfo,
)
from .uploads import CheckedImage, ViewParams, check_image, decode_uploads, read_files, view_spec

GEOJSON = "application/geo+json"
EXIF_RADIUS_M = 500.0  # the prior's radius when near_from_exif is given without radius_m


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone away (the body was read in full before this runs)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def localize(request: Request, runtime: Runtime, params: ViewParams, *, k: int, batch: bool,
                   accept: str | None) -> Response:
    """The steps above for one request (``batch``: several images); GeoJSON where ``accept`` prefers it."""
    started = time.perf_counter()
    s, model, engine = runtime.settings, runtime.model, runtime.engine
    assert model is not None and engine is not None
    with request.app.state.upload_budget.reservation() as take:
        files = await read_files(
            request, field_names=("images", "image") if batch else ("image",),
            max_files=s.max_batch_images if batch else 1, max_file_bytes=s.max_upload_bytes,
            max_body_bytes=s.max_batch_body_bytes if batch else s.max_body_bytes,
            read_timeout_s=s.read_timeout_s, take=take)
        images = [check_image(upload, s) for upload in files]  # bad uploads are refused before they queue
        specs = [view_spec(image, params) for image in images]
        near = [_prior(image, params) for image in images]
        result = await engine.localize(partial(decode_uploads, images, specs, s.max_pixels, model.encoder.config),
                                       n=len(images), k=k, disconnected=partial(_wait_for_disconnect, request),
                                       near=near, heading_within=[spec.heading_within_deg for spec in specs],
                                       photos=[spec.projection == "perspective" for spec in specs])
    described = [_described(answer, spec, s.ambiguity_margin, prior)
                 for answer, spec, prior in zip(result.answers, specs, near)]
    shared = dict(model=model.info, index=result.index.info, timing_ms=_timing(runtime, result, started))
    if wants_geojson(accept):
        return _json(to_geojson(described, [image.upload.index if batch else None for image in images], **shared),
                     GEOJSON)
    if not batch:
        return _json(LocalizeResponse(**described[0], batch_size=result.batch_size, **shared))
    items = [BatchItem(image=image.upload.index, filename=image.upload.filename, batch_size=result.batch_size, **d)
             for image, d in zip(images, described)]
    return _json(LocalizeBatchResponse(items=items, **shared))


def _prior(image: CheckedImage, params: ViewParams) -> Near | None:
    if params.near is not None:
        return Near(*params.near, params.radius_m, "parameter")  # type: ignore[arg-type]
    at = image.exif_gps if params.near_from_exif else None
    return None if at is None else Near(*at, params.radius_m or EXIF_RADIUS_M, "exif")


def _timing(runtime: Runtime, result: JobResult, started: float) -> Timing:
    total_ms = (time.perf_counter() - started) * 1000.0
    runtime.metrics.observe_request(len(result.answers), result.decode_ms / 1000.0, result.queue_ms / 1000.0,
                                    total_ms / 1000.0)
    return Timing(decode=round(result.decode_ms, 3), queue=round(result.queue_ms, 3),
                  encode=round(result.encode_ms, 3), search=round(result.search_ms, 3), total=round(total_ms, 3))


def _described(answer: Answer, spec: ViewInfo, ambiguity_margin: float, prior: Near | None) -> dict:
    """An image's matches with absolute headings, how it was read, and how sure the answer is. A
    view placed at a known heading is aligned with north: the orientation head's estimate is then a
    correction of that heading."""
    placed = spec.heading_deg or 0.0
    matches = [m if m.heading_deg is None else m.model_copy(update={"heading_deg": round(placed + m.heading_deg, 1)
                                                                                          % 360.0})
               for m in answer.matches]
    view = spec.model_copy(update={"fov_deg": round(spec.fov_deg, 2)})  # (the view was placed with the exact one)
    if spec.heading_deg is None and matches and matches[0].heading_deg is not None:
        view.heading_deg, view.heading_source = matches[0].heading_deg, "estimated"
    confidence = Confidence(margin=None if answer.margin is None else round(answer.margin, 4),
                            ambiguous=answer.margin is not None and answer.margin < ambiguity_margin,
                            competitor_tile_id=answer.competitor, distinct_m=DISTINCT_M)
    position = None if answer.position is None else Position(
        lat=answer.position[0], lon=answer.position[1], uncertainty_m=round(answer.position[2], 1))
    near = None if prior is None else NearInfo(lat=prior.lat, lon=prior.lon, radius_m=prior.radius_m,
                                               source=prior.source, tiles=answer.within or 0)
    return dict(results=matches, position=position, near=near, view=view, confidence=confidence)


def _json(body: BaseModel, media_type: str = "application/json") -> Response:
    """A response model built here (so already valid), serialised once; returned as a model,
    FastAPI would validate it against ``response_model`` again before serialising it."""
    return Response(body.model_dump_json(), media_type=media_type)


def to_geojson(described: list[dict], images: list[int | None], model: ModelInfo, index: IndexInfo,
               timing_ms: Timing) -> FeatureCollection:
    """RFC 7946: positions are [longitude, latitude]; per image, its refined position first, then one
    Point feature per match."""
    features = []
    for image, answer in zip(images, described):
        position = answer["position"]
        points = [] if position is None else [
            ((position.lon, position.lat), {"kind": "position", "uncertainty_m": position.uncertainty_m})]
        points += [((m.lon, m.lat), {"kind": "match", "rank": m.rank, "tile_id": m.tile_id, "score": m.score,
                                     "heading_deg": m.heading_deg}) for m in answer["results"]]
        for coordinates, props in points:
            if image is not None:
                props["image"] = image
            features.append(Feature(geometry=PointGeometry(coordinates=coordinates), properties=props))
    return FeatureCollection(features=features, model=model, index=index, timing_ms=timing_ms.model_dump())


def _quality(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def wants_geojson(accept: str | None) -> bool:
    """True when the Accept header prefers application/geo+json over application/json. On a tie with
    an explicit application/json, plain JSON wins; against a wildcard, GeoJSON."""
    q: dict[str, float] = {}
    for item in (accept or "").split(","):
        media, *params = (p.strip() for p in item.split(";"))
        weight = next((_quality(value) for name, _, value in (p.partition("=") for p in params)
                       if name.strip().lower() == "q"), 1.0)  # RFC 9110: parameter names are case-insensitive
        q[media.lower()] = max(q.get(media.lower(), 0.0), weight)
    geo = q.get(GEOJSON, 0.0)
    json_q = q.get("application/json", max(q.get("*/*", 0.0), q.get("application/*", 0.0)))
    return geo > json_q or (geo > 0 and geo == json_q and "application/json" not in q)

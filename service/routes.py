"""HTTP routes and their dependencies. Each route is thin: dependencies check auth and readiness,
helpers do the work. The dependencies are ``async def``: they only read app state, and FastAPI would
run plain ``def`` ones in the thread pool, a thread hop per dependency per request."""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Security, status
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BeforeValidator, SecretStr

from model.orientation import HEADING_WITHIN_DEG

from . import localize
from .engine import NotReady
from .runtime import Runtime
from .schemas import (
    ErrorResponse, Health, LocalizeBatchResponse, LocalizeResponse, Readiness, ReloadResult,
)
from .thumbs import ThumbnailError
from .uploads import UploadError, ViewParams, invalid

STATIC = Path(__file__).resolve().parent / "static"


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route can give (all are ErrorResponse)."""
    return {code: {"model": ErrorResponse} for code in codes}


_IMAGE_FIELD = {"type": "string", "format": "binary",
                "description": "A 360° panorama, a crop of one or a photo; JPEG, PNG or WebP."}


def _localize_docs(field: str, many: bool, description: str) -> dict[str, Any]:
    """A localize route's tag, multipart body (the route reads it itself) and answers (GeoJSON too)."""
    schema = {"type": "array", "items": _IMAGE_FIELD} if many else _IMAGE_FIELD
    body = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: schema}}}}}
    ok = {"description": description, "content": {localize.GEOJSON: {
        "schema": {"$ref": "#/components/schemas/FeatureCollection"}}}}
    return {"tags": ["localize"], "openapi_extra": {"requestBody": body},
            "responses": {200: ok, **errors(400, 408, 413, 415, 422, 503, 504)}}


def _lat_lon(near: str) -> tuple[float, float]:
    """near=lat,lon in decimal degrees -> (lat, lon); 422 otherwise."""
    try:
        lat, lon = (float(part) for part in near.split(","))
    except ValueError:
        raise invalid("query", "near", "value_error",
                      "near must be 'lat,lon' in decimal degrees, e.g. near=46.51,7.52", near) from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):  # NaN fails these too
        raise invalid("query", "near", "value_error",
                      f"near: latitude must be in [-90, 90] and longitude in [-180, 180], got {near}", near)
    return lat, lon


def _whole_number(value: object) -> object:
    """``k=5.0`` would pass as 5 (pydantic's lax int); the API takes whole numbers written as such."""
    if isinstance(value, str) and not value.isdigit():
        raise ValueError("k must be a whole number written with digits, e.g. k=5")
    return value


KQuery = Annotated[int, BeforeValidator(_whole_number),
                   Query(ge=1, le=100, description="Number of matches to return (1-100).")]
AcceptHeader = Annotated[str | None, Header(description="application/geo+json for GeoJSON")]


def view_params(
    fov_deg: Annotated[float | None, Query(gt=0, le=360, description=(
        "Horizontal field of view of the image(s), degrees. Default: from the photo's EXIF focal length "
        "(FocalLengthIn35mmFilm), else 360 for an image at least 3.5 times as wide as high; otherwise 422."))] = None,
    heading_deg: Annotated[float | None, Query(ge=0, lt=360, description=(
        "Where the image's centre looks, degrees clockwise from true north. Default: XMP "
        "GPano:PoseHeadingDegrees (a Street View style panorama), else EXIF GPSImgDirection; else unknown, "
        "and each match says the heading it implies."))] = None,
    heading_within_deg: Annotated[float, Query(ge=0, le=180, description=(
        "How far off a given heading (heading_deg, XMP or EXIF) may be, degrees: the view is aligned with each "
        "tile only within this much of it, and each match's heading is the given one corrected within it "
        "(0: the given heading's own column, 22.5 degrees wide, at phase 0 of an index built at tile phases; "
        "180: all round, as for an unknown heading, for a heading that may be far off)."))] = HEADING_WITHIN_DEG,
    projection: Annotated[Literal["equirectangular", "perspective"] | None, Query(description=(
        "perspective: a photo (pinhole camera); equirectangular: a panorama or a crop of one. Default: "
        "perspective for a narrow image with a field of view under 360, else equirectangular."))] = None,
    pitch_deg: Annotated[float | None, Query(ge=-45, le=45, description=(
        "A photo's camera pitch: the elevation of its optical axis above the horizon, degrees (from the phone's "
        "orientation sensors; projection=perspective). Default: estimated from the photo's vertical edges "
        "(up to about 12 degrees; 0 where none are found); with roll_deg alone: 0."))] = None,
    roll_deg: Annotated[float | None, Query(ge=-45, le=45, description=(
        "A photo's camera roll: its turn about the optical axis, degrees, clockwise as seen from behind the "
        "camera, relative to the upright image (projection=perspective). Default: estimated with the pitch; "
        "with pitch_deg alone: 0."))] = None,
    near: Annotated[str | None, Query(description=(
        "'lat,lon' (decimal degrees): search only the tiles within radius_m of this rough position "
        "(e.g. a phone's GPS fix)."))] = None,
    radius_m: Annotated[float | None, Query(gt=0, le=50_000, description=(
        "Radius of the near restriction, metres; required with near. With near_from_exif alone: default 500."))] = None,
    near_from_exif: Annotated[bool, Query(description=(
        "Where near is not given: restrict to radius_m around each photo's EXIF GPS position, when it has one."))] = False,
) -> ViewParams:
    at = None if near is None else _lat_lon(near)
    if at is not None and radius_m is None:
        raise invalid("query", "radius_m", "missing", "radius_m (metres) is required with near")
    tilt = None if pitch_deg is None and roll_deg is None else ((pitch_deg or 0.0) + 0.0, (roll_deg or 0.0) + 0.0)
    heading = None if heading_deg is None else heading_deg + 0.0  # + 0.0: -0.0 answered as 0.0 (the tilt too)
    return ViewParams(fov_deg, heading, projection, tilt, at, radius_m, near_from_exif, heading_within_deg)


ViewQuery = Annotated[ViewParams, Depends(view_params)]

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False,
    description="Required on every route except /healthz, /readyz and /metrics when GEOLOC_API_KEYS is set.",
)
admin_bearer = HTTPBearer(auto_error=False, description="GEOLOC_ADMIN_TOKEN")


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _matches(given: str, secret: SecretStr) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), secret.get_secret_value().encode("utf-8"))


def _unauthorized(detail: str, scheme: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": scheme})


async def require_api_key(request: Request, key: Annotated[str | None, Security(api_key_header)] = None) -> None:
    if key is None:
        raise _unauthorized("missing X-API-Key header", "ApiKey")
    # Compare against every key (no early exit) so timing does not reveal which one matched.
    if not any([_matches(key, secret) for secret in request.app.state.settings.api_keys]):
        raise _unauthorized("invalid API key", "ApiKey")


async def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(admin_bearer)] = None,
) -> None:
    token = request.app.state.settings.admin_token
    if token is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin endpoints are disabled (GEOLOC_ADMIN_TOKEN is not set)")
    if credentials is None:  # no Authorization header, or one of another scheme than Bearer
        raise _unauthorized("missing admin bearer token", "Bearer")
    if not _matches(credentials.credentials, token):
        raise _unauthorized("invalid admin token", "Bearer")


async def require_ready(runtime: RuntimeDep) -> Runtime:
    if not runtime.ready:
        raise NotReady(runtime.not_ready_reason())
    return runtime


ReadyRuntime = Annotated[Runtime, Depends(require_ready)]

# create_app adds the API-key check (and its 401) to `api` and `admin` where keys are configured
api = APIRouter()
public = APIRouter()
admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@api.post("/localize", response_model=LocalizeResponse,
          summary="Top-k aerial tiles for one street-level view (panorama, crop or photo)",
          **_localize_docs("image", False, "Matches as JSON, or as a GeoJSON FeatureCollection on request."))
async def localize_one(request: Request, runtime: ReadyRuntime, view: ViewQuery, k: KQuery = 5,
                       accept: AcceptHeader = None) -> Any:
    return await localize.localize(request, runtime, view, k=k, batch=False, accept=accept)


@api.post("/localize/batch", response_model=LocalizeBatchResponse,
          summary="Top-k aerial tiles for each of several views (multipart field `images`)",
          **_localize_docs("images", True, "One list per image, or one FeatureCollection with an `image` property."))
async def localize_batch(request: Request, runtime: ReadyRuntime, view: ViewQuery, k: KQuery = 5,
                         accept: AcceptHeader = None) -> Any:
    return await localize.localize(request, runtime, view, k=k, batch=True, accept=accept)


@api.get("/tiles/{tile_id:path}", tags=["index"], summary="JPEG thumbnail of one aerial tile (an id may hold '/')",
         response_class=Response,
         responses={200: {"content": {"image/jpeg": {}}}, **errors(404, 503)})
async def tile_thumbnail(tile_id: str, request: Request, runtime: ReadyRuntime) -> Response:
    index = runtime.engine.index  # type: ignore[union-attr]
    row = index.row_of.get(tile_id)
    if row is None:
        raise UploadError(404, "unknown_tile", f"no tile {tile_id!r} in the index being served")
    source = index.path / index.sources[row]  # a relative source lies in the artifact; an absolute one stays as is
    try:
        data = await anyio.to_thread.run_sync(request.app.state.thumbnails.get, source)
    except ThumbnailError as exc:
        raise UploadError(404, "tile_image_unavailable", f"tile {tile_id!r}: {exc}") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})


@api.get("/v1/index", response_model=dict[str, Any], tags=["index"], responses=errors(503),
         summary="Manifest of the index artifact being served (docs/INTERFACES.md; no host names or directories)")
async def index_manifest(runtime: ReadyRuntime) -> Any:
    return runtime.engine.index.public_manifest  # type: ignore[union-attr]


@public.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD
@public.get("/healthz", response_model=Health, tags=["ops"], summary="The process is alive")
async def healthz() -> Health:
    return Health()


@public.head("/readyz", include_in_schema=False)
@public.get("/readyz", response_model=Readiness, tags=["ops"], summary="Model and index loaded (503 otherwise)",
            responses={503: {"model": Readiness}})
async def readyz(runtime: RuntimeDep) -> Any:
    if not runtime.ready:
        state = runtime.state if runtime.state != "ready" else "failed"
        body = Readiness(status=state, detail=runtime.public_text(runtime.not_ready_reason()))
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    failed = runtime.last_reload_error
    return Readiness(
        status="ready", model=runtime.model.info, index=runtime.engine.index.info,  # type: ignore[union-attr]
        detail=failed and f"last index reload failed (old index still served): {runtime.public_text(failed)}",
        queue_depth=runtime.engine.depth)  # type: ignore[union-attr]


@public.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@public.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@public.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@admin.post("/reload", response_model=ReloadResult,
            summary="Load the artifact now at GEOLOC_INDEX beside the current one and swap atomically",
            responses=errors(401, 403, 409, 422, 503))
async def reload_index(runtime: ReadyRuntime,
                       force: Annotated[bool, Query(description="Reload even if unchanged")] = False,
                       ) -> ReloadResult:
    return await anyio.to_thread.run_sync(runtime.reload, "admin", force)

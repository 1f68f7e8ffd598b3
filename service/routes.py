"""HTTP routes. Each function is thin: dependencies check auth/readiness, helpers do the work."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import Match, Route
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from . import localize
from .deps import (
    API_KEY_HEADER, ReadyRuntime, RuntimeDep, require_admin, require_api_key, require_ready,
)
from .schemas import (
    ErrorResponse, FeatureCollection, Health, IndexInfo, LocalizeBatchResponse, LocalizeResponse,
    Manifest, ModelInfo, Readiness, ReloadResult,
)
from .thumbs import ThumbnailError
from .uploads import UploadError

STATIC = Path(__file__).resolve().parent / "static"

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 503, 504)
}
_IMAGE_FIELD = {"type": "string", "format": "binary",
                "description": "Equirectangular panorama, JPEG, PNG or WebP."}


def _multipart(field: str, many: bool) -> dict[str, Any]:
    schema = {"type": "array", "items": _IMAGE_FIELD} if many else _IMAGE_FIELD
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field], "properties": {field: schema}}}}}}


def _geojson_doc(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "content": {localize.GEOJSON: {
        "schema": {"$ref": "#/components/schemas/FeatureCollection"}}}}}


def _json(body: BaseModel, media_type: str = "application/json") -> Response:
    """A response model built here (so already valid), serialised once; returned as a model,
    FastAPI would validate it against ``response_model`` again before serialising it."""
    return Response(body.model_dump_json(), media_type=media_type)


K_MIN, K_MAX = 1, 100
KQuery = Annotated[int, Query(ge=K_MIN, le=K_MAX, description="Number of matches to return.")]
AcceptHeader = Annotated[str | None, Header(description="application/geo+json for GeoJSON")]

# create_app adds the API-key check to `api` and `admin` where keys are configured
api = APIRouter(responses=_ERRORS)
public = APIRouter()
admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@api.post(
    "/localize", response_model=LocalizeResponse, tags=["localize"],
    summary="Top-k aerial tiles for one street-level panorama",
    openapi_extra=_multipart("image", many=False),
    responses=_geojson_doc("Matches as JSON, or as a GeoJSON FeatureCollection on request."),
)
async def localize_one(request: Request, runtime: ReadyRuntime, k: KQuery = 5,
                       accept: AcceptHeader = None) -> Any:
    result, _, started = await localize.run(request, runtime, k=k, batch=False)
    body = localize.single_response(runtime, result, started)
    if localize.wants_geojson(accept):
        fc = localize.to_geojson([(None, body.results)], body.model, body.index,
                                 body.timing_ms.model_dump())
        return _json(fc, localize.GEOJSON)
    return _json(body)


@api.post(
    "/localize/batch", response_model=LocalizeBatchResponse, tags=["localize"],
    summary="Top-k aerial tiles for each of several panoramas (multipart field `images`)",
    openapi_extra=_multipart("images", many=True),
    responses=_geojson_doc("One list per image, or one FeatureCollection with an `image` property."),
)
async def localize_batch(request: Request, runtime: ReadyRuntime, k: KQuery = 5,
                         accept: AcceptHeader = None) -> Any:
    result, files, started = await localize.run(request, runtime, k=k, batch=True)
    body = localize.batch_response(runtime, result, files, started)
    if localize.wants_geojson(accept):
        fc = localize.to_geojson([(it.image, it.results) for it in body.items], body.model,
                                 body.index, body.timing_ms.model_dump())
        return _json(fc, localize.GEOJSON)
    return _json(body)


@api.get("/tiles/{tile_id}", tags=["index"], summary="JPEG thumbnail of one aerial tile",
         response_class=Response,
         responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorResponse}})
async def tile_thumbnail(tile_id: str, request: Request, runtime: ReadyRuntime) -> Response:
    index = runtime.engine.current
    row = index.row_of.get(tile_id) if index is not None else None
    if row is None:
        raise UploadError(404, "unknown_tile", f"no tile {tile_id!r} in the index being served")
    source = Path(index.sources[row])
    if not source.is_absolute():
        source = index.path / source
    try:
        data = await anyio.to_thread.run_sync(request.app.state.thumbnails.get, source)
    except ThumbnailError as exc:
        raise UploadError(404, "tile_image_unavailable", f"tile {tile_id!r}: {exc}") from None
    return Response(data, media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=300"})


@api.get("/v1/index", response_model=Manifest, response_model_by_alias=True, tags=["index"],
         summary="Manifest of the index artifact being served")
async def index_manifest(runtime: ReadyRuntime) -> Any:
    return runtime.engine.current.manifest  # type: ignore[union-attr]


@public.get("/healthz", response_model=Health, tags=["ops"], summary="The process is alive")
async def healthz() -> Health:
    return Health()


@public.get("/readyz", response_model=Readiness, tags=["ops"],
            summary="Model and index loaded (503 otherwise)",
            responses={503: {"model": Readiness}})
async def readyz(runtime: RuntimeDep) -> Any:
    engine = runtime.engine
    if not runtime.ready:
        state = runtime.state if runtime.state != "ready" else "failed"
        body = Readiness(status=state, detail=runtime.error or "worker is not running")
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    return Readiness(
        status="ready", detail=runtime.last_reload_error and
        f"last index reload failed (old index still served): {runtime.last_reload_error}",
        model=ModelInfo(**engine.model.info()),  # type: ignore[union-attr]
        index=IndexInfo(**engine.current.info()),  # type: ignore[union-attr]
        queue_depth=engine.queue.depth,
    )


@public.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(runtime: RuntimeDep) -> Response:
    runtime.metrics.queue_depth.set(runtime.engine.queue.depth)
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@public.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@admin.post("/reload", response_model=ReloadResult, summary="Load the artifact now at "
            "GEOLOC_INDEX beside the current one and swap atomically",
            responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                       409: {"model": ErrorResponse}})
async def reload_index(runtime: ReadyRuntime,
                       force: Annotated[bool, Query(description="Reload even if unchanged")] = False,
                       ) -> ReloadResult:
    outcome = await anyio.to_thread.run_sync(runtime.reload, "admin", force)
    return ReloadResult(
        status=outcome.status, index=IndexInfo(**outcome.index.info()),
        previous=IndexInfo(**outcome.previous.info()) if outcome.previous else None,
    )


# Keep the GeoJSON schema in components even though no route returns it as response_model.
_GEOJSON_MODELS = (FeatureCollection,)


# --- direct dispatch of the localize routes ------------------------------------------------------
# FastAPI's own work per request (solving the dependencies, two exit stacks, its exception
# wrapper) costs the event loop ~0.2 ms of CPU per /localize at saturation on a 2-core CPU: ~4% of
# the service's throughput (bench/RESULTS.md). So a plain localize request (POST, `k` absent or a
# small decimal in range) is taken by a Starlette route placed before FastAPI's, which calls the
# same dependency functions in FastAPI's order and then the same endpoint. FastAPI documents the
# routes and answers every other request (a bad `k` with its own 422, GET with its 405); errors
# raised on either path reach the same exception handlers.

_DIRECT_ENDPOINTS = (localize_one, localize_batch)  # their parameters: _DIRECT_PARAMETERS
_REPLICATED = {require_api_key, require_ready}  # the dependencies the direct route calls itself
_DIRECT_PARAMETERS = {"request", "runtime", "k", "accept"}  # what `_call` passes
_K_SCOPE_KEY = "geoloc.k"


class _DirectRoute(Route):
    """Takes POST requests to one localize endpoint whose query is plain; see above."""

    def __init__(self, api_route: APIRoute) -> None:
        self.endpoint_fn: Callable[..., Awaitable[Response]] = api_route.endpoint
        self.k_default = inspect.signature(api_route.endpoint).parameters["k"].default
        super().__init__(api_route.path, self._call, methods=["POST"], include_in_schema=False,
                         name=f"{api_route.name}_direct")

    def matches(self, scope):
        match, child_scope = super().matches(scope)
        if match != Match.FULL or scope["app"].dependency_overrides:
            return Match.NONE, {}  # FastAPI's route answers (405 for another method; overrides)
        k = _plain_k(scope.get("query_string", b""), self.k_default)
        if k is None:
            return Match.NONE, {}
        child_scope.update({"route": self, _K_SCOPE_KEY: k})  # "route": the metrics' label
        return match, child_scope

    async def _call(self, request: Request) -> Response:
        settings = request.app.state.settings
        if settings.api_keys:  # a router dependency where keys are configured (create_app)
            await require_api_key(settings, request.headers.get(API_KEY_HEADER) or None)
        runtime = await require_ready(request)
        return await self.endpoint_fn(request, runtime, k=request.scope[_K_SCOPE_KEY],
                                      accept=request.headers.get("accept"))


def _plain_k(query_string: bytes, default: int) -> int | None:
    """`k` when the query names it at most once as 1-3 ASCII digits in range (or not at all:
    ``default``); None for anything else, which FastAPI then reads and judges itself."""
    found = None
    for pair in query_string.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name != b"k":
            if b"k" in name or b"%" in name:  # an encoded name might be k: let FastAPI decide
                return None
            continue
        if found is not None or not (value.isdigit() and len(value) <= 3):
            return None
        found = int(value)
    if found is None:
        return default
    return found if K_MIN <= found <= K_MAX else None


def direct_routes(api_routes: list) -> list[_DirectRoute]:
    """The direct routes for the localize endpoints among ``api_routes`` (an APIRouter's routes),
    to be placed before them. Refuses a route that has gained a dependency or parameter the direct
    route would skip, so that the two paths can not drift apart. (Dependencies given when the
    router is included, or to the whole app, are create_app's: only the API-key check, which
    `_call` makes.)"""
    direct = []
    for route in api_routes:
        if not isinstance(route, APIRoute) or route.endpoint not in _DIRECT_ENDPOINTS:
            continue
        d = route.dependant
        unknown = ({dep.call for dep in d.dependencies} - _REPLICATED,
                   set(inspect.signature(route.endpoint).parameters) - _DIRECT_PARAMETERS,
                   {f.alias for f in d.query_params} - {"k"},
                   {f.alias for f in d.header_params} - {"accept"},
                   d.path_params + d.cookie_params + d.body_params)
        if any(unknown):
            raise RuntimeError(f"{route.path}: the direct route does not replicate {unknown}; "
                               "extend service.routes._DirectRoute")
        direct.append(_DirectRoute(route))
    return direct

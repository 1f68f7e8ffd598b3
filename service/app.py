"""The FastAPI application: ``create_app(settings)`` for tests, ``service.app:app`` for uvicorn.

``uvicorn service.app:app`` builds the app from ``GEOLOC_*`` environment variables on first
access (the module attribute is created lazily, so importing this module has no side effects).
``python -m service`` runs it with the read timeouts and allocator settings the service wants.
"""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import routes
from .engine import ClientGone, NotReady, Overloaded, ResultTimeout
from .logs import configure_logging, new_request_id, request_id_var, stop_logging
from .metrics import Metrics
from .runtime import ReloadFailed, Runtime
from .schemas import ErrorResponse, FeatureCollection
from .settings import Settings, settings_or_exit
from .thumbs import Thumbnails
from .uploads import UploadBudget

log = logging.getLogger("service.http")

_QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}


class RequestContext:
    """Pure ASGI middleware: request id, access log line, request counters and latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = new_request_id(incoming)
        # Each request runs in its own task (own context copy), so this never leaks across requests;
        # it is deliberately not reset, so the 500 handler outside this middleware still sees it.
        request_id_var.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            label = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(elapsed)
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS and status < 400 else logging.INFO
            log.log(level, "%s %s %d", scope["method"], scope["path"], status, extra={
                "method": scope["method"], "path": scope["path"], "status": status,
                "ms": round(elapsed * 1000.0, 3), "client": (scope.get("client") or ("", 0))[0]})


def _error(status: int, code: str, detail: Any, headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(detail=detail, code=code, request_id=request_id_var.get())
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "upload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 503: "unavailable"}


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    retry = {"Retry-After": str(settings.retry_after_s)}
    simple = {  # exception -> (status, code, how its text is shown, headers)
        Overloaded: (503, "overloaded", "server busy: {}; retry later", retry),
        NotReady: (503, "not_ready", "not ready: {}", retry),
        ResultTimeout: (504, "timeout", "{}", None),
        # nobody reads this; 499 is the customary "client closed request" code in access logs
        ClientGone: (499, "client_disconnected", "{}", None),
        ReloadFailed: (409, "reload_failed", "new index artifact rejected, the previous one is still served: {}",
                       None),
    }
    for exc_type, (status, code, text, headers) in simple.items():
        async def handle(request: Request, exc: Exception, status=status, code=code, text=text,
                         headers=headers) -> JSONResponse:
            return _error(status, code, request.app.state.runtime.public_text(text.format(exc)), headers)

        app.add_exception_handler(exc_type, handle)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{k: v for k, v in err.items() if k in ("type", "loc", "msg", "input")} for err in exc.errors()]
        return _error(422, "validation_error", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's and FastAPI's HTTP errors, and UploadError with its own code."""
        code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, exc.detail, exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        rid = request_id_var.get()  # sent from outside RequestContext, which adds it to every other answer
        return _error(500, "internal_error", "internal server error", rid and {"X-Request-ID": rid})


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, corrected where it says what this API does not do: its default 422
    (HTTPValidationError) on routes whose parameters can not be invalid, and several security
    schemes of one route listed as alternatives when each is required."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                default_422 = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(default_422):
                    del operation["responses"]["422"]
                if len(operation.get("security", [])) > 1:
                    operation["security"] = [{k: v for req in operation["security"] for k, v in req.items()}]
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        extra = FeatureCollection.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in extra.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components["FeatureCollection"] = extra
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings) -> FastAPI:
    """Build the app. Model and index load in the background when the lifespan starts."""
    configure_logging(settings.log_level, settings.json_logs)
    metrics = Metrics()
    runtime = Runtime(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            try:
                await anyio.to_thread.run_sync(runtime.stop)
                metrics.process_exit()
            finally:
                stop_logging()

    app = FastAPIOffline(
        title="L2LTR geo-localization",
        version="0.1.0",
        description="Upload a street-level view (a 360° panorama, a crop of one or a phone photo), get the most "
        "likely locations: the view is matched against geo-tagged aerial tiles with L2LTR.",
        lifespan=lifespan,
        redoc_url=None,  # its bundle fetches a logo from Redocly's CDN; /docs needs nothing from outside
        static_url="/docs-assets",
        favicon_url="/favicon.ico",
    )
    app.state.settings = settings
    app.state.runtime = runtime
    app.state.thumbnails = Thumbnails(settings.thumbnail_px, settings.thumbnail_cache)
    app.state.upload_budget = UploadBudget(settings.max_inflight_upload_bytes, metrics.rejected.labels("upload_budget").inc)
    _install_error_handlers(app, settings)
    # Without keys no route checks one: no dependency to solve per request, none in the docs.
    auth = [Depends(routes.require_api_key)] if settings.api_keys else []
    unauthorized = routes.errors(401) if settings.api_keys else None
    app.include_router(routes.api, dependencies=auth, responses=unauthorized)
    app.include_router(routes.admin, dependencies=auth)
    app.include_router(routes.public)
    app.mount("/static", StaticFiles(directory=routes.STATIC), name="static")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContext, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    """``service.app.app``: the app built from the environment, made on first access."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app(settings_or_exit("service.app"))
        return _app
    raise AttributeError(name)

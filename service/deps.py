"""FastAPI dependencies: runtime, readiness, API-key and admin-token auth.

All are ``async def``: they only read app state, and FastAPI would run plain ``def``
dependencies in the thread pool, a thread hop per dependency per request.
"""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from .engine import NotReady
from .runtime import Runtime

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

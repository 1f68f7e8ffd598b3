"""FastAPI dependencies: settings, runtime, readiness, API-key and admin-token auth.

All are ``async def``: they only read app state, and FastAPI would run plain ``def``
dependencies in the thread pool, a thread hop per dependency per request.
"""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .engine import NotReady
from .runtime import Runtime
from .settings import Settings

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False,
    description="Required on every route except /healthz, /readyz and /metrics when "
    "GEOLOC_API_KEYS is set.",
)
admin_bearer = HTTPBearer(auto_error=False, description="GEOLOC_ADMIN_TOKEN")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _matches(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8"))


async def require_api_key(
    settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)] = None
) -> None:
    if not settings.api_keys:
        return
    if key is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing X-API-Key header",
                            headers={"WWW-Authenticate": "ApiKey"})
    # Compare against every key (no early exit) so timing does not reveal which one matched.
    ok = False
    for secret in settings.api_keys:
        ok |= _matches(key, secret.get_secret_value())
    if not ok:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key",
                            headers={"WWW-Authenticate": "ApiKey"})


async def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(admin_bearer)] = None,
) -> None:
    if settings.admin_token is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "admin endpoints are disabled (GEOLOC_ADMIN_TOKEN is not set)")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing admin bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if not _matches(credentials.credentials, settings.admin_token.get_secret_value()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid admin token",
                            headers={"WWW-Authenticate": "Bearer"})


async def require_ready(runtime: RuntimeDep) -> Runtime:
    if not runtime.ready:
        raise NotReady(runtime.not_ready_reason())
    return runtime


ReadyRuntime = Annotated[Runtime, Depends(require_ready)]

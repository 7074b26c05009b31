"""API keys and tenants. Every request but the web page and /health carries a key; the key names
the tenant whose avatars, jobs and sessions it sees.

A key is read from `Authorization: Bearer <key>`, the `X-API-Key` header, or the `key` query
parameter (browsers cannot set headers on a WebSocket). With no keys configured, one key for the
default tenant ("") is made at start and printed, as notebook servers do."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from starlette.requests import HTTPConnection


@dataclass(frozen=True)
class Caller:
    """Who makes a request: their key and its tenant ("" is the default tenant)."""

    key: str
    tenant: str


class ApiKeys:
    """keys: API key -> tenant. Empty: a random key for the default tenant (`generated`)."""

    def __init__(self, keys: Mapping[str, str]):
        self.generated: str | None = None
        if not keys:
            self.generated = secrets.token_urlsafe(24)
            keys = {self.generated: ""}
        self._keys = dict(keys)

    @property
    def tenants(self) -> set[str]:
        return set(self._keys.values())

    def caller(self, key: str | None) -> Caller:
        """The caller of `key`; HTTPException 401 when there is no key, 403 when it is not accepted."""
        if not key:
            raise HTTPException(401, "this server needs an API key: send `Authorization: Bearer <key>`, "
                                     "an `X-API-Key` header, or `?key=<key>`",
                                headers={"WWW-Authenticate": "Bearer"})
        found = None
        for known, tenant in self._keys.items():  # compare with every key: no timing hint of a near miss
            if secrets.compare_digest(known.encode(), key.encode()):
                found = Caller(known, tenant)
        if found is None:
            raise HTTPException(403, "this API key is not accepted here; check the key (setting api_keys)")
        return found


def request_key(conn: HTTPConnection) -> str | None:
    """The key a request or WebSocket carries, if any."""
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return conn.headers.get("x-api-key") or conn.query_params.get("key")


def require_metrics_key(request: Request) -> None:
    """The request carries the metrics key (setting metrics_key): HTTPException 401 without a key, 403
    with another (a tenant's API key shows no server-wide figures)."""
    key = request_key(request)
    if not key:
        raise HTTPException(401, "/metrics needs the metrics key: send `Authorization: Bearer <metrics_key>`",
                            headers={"WWW-Authenticate": "Bearer"})
    expected = request.app.state.settings.metrics_key
    if not expected:
        raise HTTPException(403, "/metrics is off: set the setting metrics_key and send that key")
    if not secrets.compare_digest(expected.encode(), key.encode()):
        raise HTTPException(403, "/metrics needs the metrics key (setting metrics_key), not an API key; "
                                 "a tenant's own figures are at GET /api/stats")


def require_caller(request: Request) -> Caller:
    """FastAPI dependency: the caller of an HTTP request (401/403 otherwise)."""
    return request.app.state.keys.caller(request_key(request))


CallerDep = Annotated[Caller, Depends(require_caller)]

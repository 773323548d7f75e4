"""Route guards: API-key auth (bearer token or `x-api-key`) and refusing new work while draining.

Routes marked `opt={"public": True}` (/health, /ready, /metrics) skip both: probes and scrapers need
no key, and they must keep answering while the server drains.

Both are coroutine functions: Litestar runs a plain-function guard in a worker thread (the event
loop's default executor), a thread hop per guard per request, and the executor's threads (six on a
2-core machine) then idled for the server's life.
"""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from helix_server.api.errors import AUTHENTICATION, APIError, service_unavailable
from helix_server.api.state import STATE_KEY

PUBLIC = {"public": True}


def _is_public(handler: BaseRouteHandler) -> bool:
    return bool(handler.opt.get("public"))


async def require_api_key(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """401 unless `Authorization: Bearer <api_key>` or (Anthropic's header) `x-api-key: <api_key>`
    matches (constant-time), when a key is set."""
    state = connection.app.state[STATE_KEY]
    api_key = state.config.server.api_key
    if not api_key or _is_public(handler):
        return
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    x_api_key = connection.headers.get("x-api-key")
    if scheme.lower() == "bearer" and _matches(token.strip(), api_key):
        return
    if x_api_key is not None and _matches(x_api_key.strip(), api_key):
        return
    raise APIError(
        401,
        "Incorrect API key provided."
        if header or x_api_key is not None
        else "Missing API key: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY').",
        AUTHENTICATION,
        None,
        "invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _matches(token: str, api_key: str) -> bool:
    return hmac.compare_digest(token.encode("utf-8"), api_key.encode("utf-8"))


async def refuse_while_draining(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """503 with Retry-After for every non-public route once shutdown has begun."""
    if connection.app.state[STATE_KEY].draining and not _is_public(handler):
        raise service_unavailable("The server is shutting down; retry on another replica.", "server_draining")

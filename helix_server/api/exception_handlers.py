"""Map every exception to OpenAI's error envelope: never a 422, never Litestar's own error body.

`to_api_error` says which `APIError` an exception stands for; the Anthropic routes write the same
errors in Anthropic's envelope (`serving.messages_errors`)."""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import HTTPException

from helix_server.api.errors import (
    AUTHENTICATION,
    INVALID_REQUEST,
    SERVER_ERROR,
    APIError,
    ClientDisconnected,
    engine_error,
)
from helix_server.errors import EngineDeadError, EngineOverloadedError, ParameterError

logger = logging.getLogger("helix_server.api")

# HTTP statuses Litestar raises itself -> (OpenAI error type, code).
_HTTP_KINDS: dict[int, tuple[str, str | None]] = {
    400: (INVALID_REQUEST, None),
    401: (AUTHENTICATION, "invalid_api_key"),
    404: (INVALID_REQUEST, "not_found"),
    405: (INVALID_REQUEST, "method_not_allowed"),
    413: (INVALID_REQUEST, "request_too_large"),
    429: (INVALID_REQUEST, "rate_limit_exceeded"),
}


def error_response(error: APIError) -> Response:
    """The envelope response of an `APIError`."""
    return Response(
        content=error.envelope(),
        status_code=error.status_code,
        headers=error.headers,
        media_type="application/json",
    )


def to_api_error(request: Request, exc: Exception) -> APIError:
    """The `APIError` any exception a handler raised stands for (a bug is logged and becomes a 500
    without internals). Each API's handlers write it in their own envelope."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ParameterError):  # bad input found by `SamplingParams` or the engine
        return APIError(400, exc.message, INVALID_REQUEST, exc.param, exc.code)
    if isinstance(exc, (EngineDeadError, EngineOverloadedError)):  # 503 with Retry-After
        return engine_error(exc)
    if isinstance(exc, HTTPException) and exc.status_code < 500:  # Litestar's own (404, 405, 413, ...)
        return _http_error(request, exc)
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", SERVER_ERROR)


def _http_error(request: Request, exc: HTTPException) -> APIError:
    status = exc.status_code
    kind, code = _HTTP_KINDS.get(status, (INVALID_REQUEST, None))
    message = exc.detail
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})."
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    elif status == 413:
        message = "The request body is too large."
    return APIError(status, message, kind, None, code, dict(exc.headers or {}))


def openai_error_handler(request: Request, exc: Exception) -> Response:
    """Every error in OpenAI's envelope."""
    return error_response(to_api_error(request, exc))


def disconnected_handler(request: Request, exc: ClientDisconnected) -> Response:
    """The client left before its answer was ready."""
    # Nobody reads this: the client is gone. 499 is the customary "client closed request".
    return Response(content=b"", status_code=499)


def exception_handlers() -> dict:
    """The app's handler table (most specific class wins)."""
    return {
        ClientDisconnected: disconnected_handler,
        Exception: openai_error_handler,
    }

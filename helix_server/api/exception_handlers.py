"""Map every exception to OpenAI's error envelope: never a 422, never Litestar's own error body."""

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


def api_error_handler(request: Request, exc: APIError) -> Response:
    """Our own errors, as they are."""
    return error_response(exc)


def parameter_error_handler(request: Request, exc: ParameterError) -> Response:
    """Bad input found by `SamplingParams` or the engine: 400 naming the param."""
    return error_response(APIError(400, exc.message, INVALID_REQUEST, exc.param, exc.code))


def engine_error_handler(request: Request, exc: EngineDeadError | EngineOverloadedError) -> Response:
    """The engine loop is gone, or its queue is full / the request waited too long: 503."""
    return error_response(engine_error(exc))


def http_exception_handler(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors (404, 405, 413, ...) in OpenAI's envelope."""
    status = exc.status_code
    if status >= 500:
        return unexpected_error_handler(request, exc)
    kind, code = _HTTP_KINDS.get(status, (INVALID_REQUEST, None))
    message = exc.detail
    if status == 404:
        message = f"Invalid URL ({request.method} {request.url.path})."
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    elif status == 413:
        message = "The request body is too large."
    headers = dict(exc.headers or {})
    return error_response(APIError(status, message, kind, None, code, headers))


def disconnected_handler(request: Request, exc: ClientDisconnected) -> Response:
    """The client left before its answer was ready."""
    # Nobody reads this: the client is gone. 499 is the customary "client closed request".
    return Response(content=b"", status_code=499)


def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    """A bug: log it, answer 500 without internals."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        APIError(500, "The server had an error while processing your request.", SERVER_ERROR)
    )


def exception_handlers() -> dict:
    """The app's handler table (most specific class wins)."""
    return {
        APIError: api_error_handler,
        ParameterError: parameter_error_handler,
        EngineDeadError: engine_error_handler,
        EngineOverloadedError: engine_error_handler,
        ClientDisconnected: disconnected_handler,
        HTTPException: http_exception_handler,
        Exception: unexpected_error_handler,
    }

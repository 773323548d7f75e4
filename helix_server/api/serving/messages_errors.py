"""Errors of the Anthropic routes, in Anthropic's envelope and with its status codes.

The same `APIError`s as everywhere (see `exception_handlers.to_api_error`), written as
`{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}`. Anthropic answers an
overloaded server with 529 `overloaded_error` where the OpenAI routes send 503; the parameter at
fault leads the message (`max_tokens: ...`), as Anthropic's own messages do.
"""

from __future__ import annotations

from litestar import Request, Response

from helix_server.api.errors import APIError, ClientDisconnected
from helix_server.api.exception_handlers import disconnected_handler, to_api_error
from helix_server.api.protocol.anthropic_events import AnthropicError, AnthropicErrorDetail

OVERLOADED_STATUS = 529

# HTTP status -> Anthropic's error type.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    OVERLOADED_STATUS: "overloaded_error",
}

# The chat path's names of the parameters a Messages request sends under another name.
_PARAMS = {"stop": "stop_sequences", "response_format": "output_config.format"}


def anthropic_status(error: APIError) -> int:
    """Anthropic's status for `error`: 529 for a full queue or a draining server, 500 for a dead engine."""
    if error.status_code == 503:
        return 500 if error.code == "engine_dead" else OVERLOADED_STATUS
    return error.status_code


def anthropic_error(error: APIError) -> AnthropicError:
    """`error` in Anthropic's envelope."""
    status = anthropic_status(error)
    kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    param = _PARAMS.get(error.param, error.param) if error.param else None
    message = error.message.replace(error.param, param) if error.param and param else error.message
    if param and param not in message:
        message = f"{param}: {message}"
    return AnthropicError(AnthropicErrorDetail(kind, message))


def anthropic_error_handler(request: Request, exc: Exception) -> Response:
    """Every error of an Anthropic route, as Anthropic sends it."""
    error = to_api_error(request, exc)
    return Response(
        content=anthropic_error(error),
        status_code=anthropic_status(error),
        headers=error.headers,
        media_type="application/json",
    )


def anthropic_exception_handlers() -> dict:
    """The handler table of the Anthropic routes (the client's hang-up stays a quiet 499)."""
    return {ClientDisconnected: disconnected_handler, Exception: anthropic_error_handler}

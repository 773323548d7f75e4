"""`APIError`: an error with an HTTP status that leaves as OpenAI's envelope, and its common kinds.

Handlers raise these (or let `ParameterError` / `EngineDeadError` through); `exception_handlers` turns
every exception into `{"error": {"message", "type", "param", "code"}}` with the right status.
"""

from __future__ import annotations

import logging

from helix_server.api.protocol.common import ErrorDetail, ErrorResponse
from helix_server.errors import EngineDeadError, EngineOverloadedError

logger = logging.getLogger("helix_server.api")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"

# Seconds a client should wait before retrying a 503.
RETRY_AFTER_SECONDS = 5


class APIError(Exception):
    """An error response: status, OpenAI-style type/param/code, and extra headers."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def envelope(self) -> ErrorResponse:
        """The `{"error": {...}}` body."""
        return ErrorResponse(ErrorDetail(self.message, self.type, self.param, self.code))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 invalid_request_error naming `param`."""
    return APIError(400, message, INVALID_REQUEST, param, code)


def model_not_found(model: str) -> APIError:
    """404 for a model this server does not serve."""
    return APIError(404, f"The model `{model}` does not exist.", INVALID_REQUEST, "model", "model_not_found")


def service_unavailable(message: str, code: str | None = None) -> APIError:
    """503 with Retry-After (draining, or the engine is not running)."""
    return APIError(
        503, message, SERVICE_UNAVAILABLE, None, code, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


def overloaded(message: str, code: str, retry_after: int) -> APIError:
    """503 with Retry-After: the waiting queue is full, or a request waited in it too long."""
    return APIError(503, message, SERVICE_UNAVAILABLE, None, code, headers={"Retry-After": str(retry_after)})


def server_error(message: str) -> APIError:
    """500: something went wrong on our side."""
    return APIError(500, message, SERVER_ERROR)


def engine_error(exc: EngineDeadError | EngineOverloadedError) -> APIError:
    """503 with Retry-After for the engine's refusals: its loop is not running, or it is overloaded."""
    if isinstance(exc, EngineOverloadedError):
        return overloaded(exc.message, exc.code, exc.retry_after)
    return service_unavailable(f"The engine is not running: {exc}", "engine_dead")


def stream_error(exc: Exception, what: str) -> APIError:
    """The error to send inside a stream that `exc` ended: the engine's refusals as they are;
    anything else is a bug, logged (with `what`, e.g. "chat stream <id>") and answered as a 500."""
    if isinstance(exc, (EngineDeadError, EngineOverloadedError)):
        return engine_error(exc)
    logger.error("%s failed", what, exc_info=exc)
    return server_error("The server had an error while processing your request.")


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready."""

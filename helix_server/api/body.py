"""Decode a JSON request body into a request Struct, strictly, with errors that name the parameter.

msgspec rejects what JSON can't carry (`NaN`, `Infinity` literals) as malformed, never coerces types
("0.5" is not a number), and reports the path of a bad value (`$.messages[0].role`), which becomes
the error's `param`. A value nested deeper than the decoder's recursion limit (about 1,000 levels of
arrays or objects) is a 400 too, not a `RecursionError`.
"""

from __future__ import annotations

import logging
import re
from typing import TypeVar

import msgspec
from litestar import Request
from litestar.exceptions import InternalServerException

from helix_server.api.errors import APIError, ClientDisconnected, bad_request

logger = logging.getLogger("helix_server.api")

T = TypeVar("T")

# Litestar's detail when `http.disconnect` arrives before the body is complete.
_DISCONNECTED = "client disconnected prematurely"
_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<field>[^`]*)`")
_MISSING_FIELD = re.compile(r"Object missing required field `(?P<field>[^`]*)`")


async def read_json(request: Request, type_: type[T]) -> T:
    """The request body decoded as `type_`; a 400 `APIError` when it is empty, not JSON or invalid.

    A body over the server's limit raises Litestar's 413 while it is read. A client that hangs up (or
    is timed out, see `connection_timeouts`) before its body is complete raises `ClientDisconnected`:
    a quiet end, not a server error.
    """
    try:
        raw = await request.body()
    except InternalServerException as exc:
        if exc.detail != _DISCONNECTED:
            raise
        logger.debug("client left before sending all of its body: %s %s", request.method, request.url.path)
        raise ClientDisconnected() from None
    return decode_json(raw, type_)


def decode_json(raw: bytes, type_: type[T]) -> T:
    """Decode `raw` as `type_` (see `read_json`)."""
    if not raw.strip():
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(raw, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"The request body is not valid JSON ({exc}).") from None
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8.") from None
    except RecursionError:
        raise bad_request(
            "The request body is nested too deeply (arrays or objects about 1,000 levels deep).",
            code="nested_too_deeply",
        ) from None


def _validation_error(message: str) -> APIError:
    match = _AT_PATH.search(message)
    path = match.group("path") if match else ""
    text = message[: match.start()] if match else message
    unknown = _UNKNOWN_FIELD.match(text)
    if unknown:
        param = _join(path, unknown.group("field"))
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    missing = _MISSING_FIELD.match(text)
    if missing:
        param = _join(path, missing.group("field"))
        return bad_request(f"Missing required parameter: '{param}'.", param)
    if not path:
        if text.startswith("Expected `object`"):
            return bad_request("The request body must be a JSON object.")
        return bad_request(f"Invalid request body: {text}.")
    param = path.lstrip(".")
    return bad_request(f"Invalid value for '{param}': {text}.", param)


def _join(path: str, field: str) -> str:
    path = path.lstrip(".")
    return f"{path}.{field}" if path else field

"""Decode a JSON request body into a request Struct, strictly, with errors that name the parameter.

msgspec rejects what JSON can't carry (`NaN`, `Infinity` literals) as malformed, never coerces types
("0.5" is not a number), and reports the path of a bad value (`$.messages[0].role`), which becomes
the error's `param`.

Nesting is bounded before decoding: a body whose arrays and objects nest more than `MAX_JSON_DEPTH`
levels deep is a 400 (`nested_too_deeply`). Recursive code further on (the decoder itself, chat
templates rendering tool schemas, JSON encoders) fails with a `RecursionError` somewhere between a
few hundred and a thousand levels; no request needs that many (OpenAI bounds a schema at 10 levels).
The check costs nothing for bodies with fewer brackets than the bound, and a few milliseconds per MB
otherwise (up to ~0.2 s for 4 MB of short strings, the worst case measured).
"""

from __future__ import annotations

import logging
import re
from typing import TypeVar

import msgspec
import numpy as np
from litestar import Request
from litestar.exceptions import InternalServerException

from helix_server.api.errors import APIError, ClientDisconnected, bad_request

logger = logging.getLogger("helix_server.api")

T = TypeVar("T")

# Litestar's detail when `http.disconnect` arrives before the body is complete.
_DISCONNECTED = "client disconnected prematurely"
# The deepest nesting of arrays and objects a request body may have.
MAX_JSON_DEPTH = 100
# A JSON string (its escapes included): brackets inside strings do not nest.
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
# Keep only brackets, then map openers to +1 and closers to -1 (as int8).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
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
    if nests_deeper_than(raw, MAX_JSON_DEPTH):
        raise _too_deep()
    try:
        return msgspec.json.decode(raw, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"The request body is not valid JSON ({exc}).") from None
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8.") from None
    except RecursionError:
        raise _too_deep() from None


def nests_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in the JSON text `raw` nest more than `limit` levels deep (brackets
    inside strings do not count; fewer opening brackets than `limit` are not even looked at)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    steps = _JSON_STRING.sub(b"", raw).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    # steps: one int8 per bracket, +1 opening, -1 closing; the running sum is the depth.
    depth = np.frombuffer(steps, dtype=np.int8).cumsum(dtype=np.int32)
    return bool(depth.size) and int(depth.max()) > limit


def _too_deep() -> APIError:
    return bad_request(
        f"The request body is nested too deeply (arrays and objects may nest at most {MAX_JSON_DEPTH} levels).",
        code="nested_too_deeply",
    )


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

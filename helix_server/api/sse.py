"""Server-sent events: OpenAI's framing, and a streaming response that always cleans up.

Each event is `data: <json>\\n\\n`; OpenAI streams end with `data: [DONE]\\n\\n`. `EventStream` is a
Litestar response whose ASGI side closes the event generator and runs `on_close` however the
response ends: finished, client disconnected (Litestar cancels the sender), or failed. Closing the
generator closes the request's `RequestStream`s, which aborts them in the engine.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response.streaming import ASGIStreamingResponse

from helix_server.api.errors import APIError

logger = logging.getLogger("helix_server.api")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: Any) -> bytes:
    """One `data:` event holding `payload` (a Struct or plain data) as JSON."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def named_sse_event(name: str, payload: Any) -> bytes:
    """`event: <name>` then `data: <json>`: the framing of the Responses and Messages APIs."""
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"


def error_event(error: APIError) -> bytes:
    """`data: {"error": {...}}`: how an error after the first byte reaches the client."""
    return sse_event(error.envelope())


class _ClosingStreamingResponse(ASGIStreamingResponse):
    def __init__(self, *, on_close: Callable[[], Any] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            iterator = self.iterator
            if hasattr(iterator, "aclose"):
                await iterator.aclose()
            if self._on_close is not None:
                result = self._on_close()
                if inspect.isawaitable(result):
                    await result


class EventStream(Response):
    """A `text/event-stream` response over an async generator of encoded events."""

    def __init__(
        self, events: AsyncGenerator[bytes, None], on_close: Callable[[], Any] | None = None
    ) -> None:
        super().__init__(content=b"", status_code=200, media_type="text/event-stream", headers=SSE_HEADERS)
        self.events = events
        self.on_close = on_close

    def to_asgi_response(self, app, request: Request, *, headers=None, encoded_headers=None, **kwargs):
        """The ASGI response that streams `events` and closes them however it ends."""
        return _ClosingStreamingResponse(
            iterator=self.events,
            on_close=self.on_close,
            headers={**(headers or {}), **self.headers},
            encoded_headers=encoded_headers,
            media_type=self.media_type,
            status_code=self.status_code,
            content_length=0,
        )

"""uvicorn's HTTP/1.1 protocol with read timeouts: silent or slow clients cannot hold connections open.

uvicorn (h11) times out only an idle keep-alive connection after a response (`timeout_keep_alive`): a
client that connects and sends nothing, or stops half-way through its request head or body, holds its
socket (and a file descriptor) for ever. `TimedH11Protocol` adds two timers:

- the head timer: a request's head must be complete within `header_timeout` seconds of the
  connection opening, or of the first byte of a later request on a kept-alive connection. A silent
  connection is then closed; one that sent part of a head gets a 408 first.
- the body timer: while a request body is incomplete, each read must come within `body_timeout`
  seconds of the last. Otherwise the client gets a 408 (when no response has started) and the
  connection is closed; the handler waiting for the body sees a disconnect.

Nothing is timed while the app works on a request or streams its answer.

`TimedH11Protocol` also turns Nagle's algorithm off on every TCP connection (`TCP_NODELAY`).
asyncio does that itself only for sockets created with `IPPROTO_TCP`, and the listening socket that
`serve` binds before loading has protocol 0, as do the connections it accepts. With Nagle on, a
response's body (written after its head) waited for the client's delayed ACK: every request after
the first on a kept-alive connection, as the OpenAI SDK sends them, took 40 ms more (measured:
`GET /v1/models` 44 ms instead of 1 ms). Streams were not slowed (measured: the same gaps
between chunks), but a small chunk now never waits for an ACK either.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from dataclasses import dataclass

import h11
import msgspec
from uvicorn.protocols.http.h11_impl import H11Protocol

from helix_server.api.errors import INVALID_REQUEST, APIError

logger = logging.getLogger("helix_server.api")


@dataclass(frozen=True)
class ConnectionTimeouts:
    """Seconds a client may take: to send a request head, between body reads, idle between requests."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0


def timeout_response() -> bytes:
    """The raw HTTP/1.1 408 the server writes before closing a timed-out connection."""
    error = APIError(408, "The client took too long to send its request.", INVALID_REQUEST, None, "request_timeout")
    body = msgspec.json.encode(error.envelope())
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def send_without_delay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on `transport`'s TCP socket (nothing for other sockets)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # a connection the client already reset
        logger.debug("could not set TCP_NODELAY: %s", exc)


class TimedH11Protocol(H11Protocol):
    """`H11Protocol` with a deadline on the request head and an idle limit between body reads."""

    def __init__(self, *args, timeouts: ConnectionTimeouts, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timeouts = timeouts
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    @classmethod
    def factory(cls, timeouts: ConnectionTimeouts):
        """A protocol class for `uvicorn.Config(http=...)` bound to `timeouts`."""
        return functools.partial(cls, timeouts=timeouts)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        send_without_delay(transport)
        self._head_timer = self.loop.call_later(self.timeouts.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update_timers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests uvicorn's keep-alive timer runs; the next request's head is timed from its
        # first byte (unless a pipelined request was already parsed: then nothing is timed).
        self._cancel(head=True)
        self._update_timers(between_requests=True)

    def _update_timers(self, between_requests: bool = False) -> None:
        if self.transport.is_closing():
            self._cancel_timers()
            return
        state = self.conn.their_state
        if state is h11.IDLE and not between_requests:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.timeouts.header_timeout, self._head_timed_out)
            return
        self._cancel(head=True)
        if state is h11.SEND_BODY:
            self._cancel(body=True)
            self._body_timer = self.loop.call_later(self.timeouts.body_timeout, self._body_timed_out)
        else:
            self._cancel(body=True)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial = bool(self.conn.trailing_data[0])
        logger.debug("closing a connection from %s: no request head within %.1fs", self._peer(), self.timeouts.header_timeout)
        if partial:
            self.transport.write(timeout_response())
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:  # we stopped reading (the app is busy), not the client
            self._body_timer = self.loop.call_later(self.timeouts.body_timeout, self._body_timed_out)
            return
        logger.debug("closing a connection from %s: request body stalled for %.1fs", self._peer(), self.timeouts.body_timeout)
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(timeout_response())
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"

    def _cancel(self, head: bool = False, body: bool = False) -> None:
        if head and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if body and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel(head=True, body=True)

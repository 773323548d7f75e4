"""What the HTTP server logs: uvicorn's lines under readable names, and accept errors rate-limited.

uvicorn logs its normal start-up and shutdown lines under the logger `uvicorn.error`; `UvicornNames`
renames them `uvicorn` (access lines stay `uvicorn.access`). When the process runs out of file
descriptors, asyncio logs "socket.accept() out of system resource" with a full traceback every time it
retries accepting (each second, per listening socket): `AcceptErrorLog` logs one line instead, at most
once per `interval_s`, with the count of the failures it held back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger("helix_server.api")

_ACCEPT_ERROR = "socket.accept() out of system resource"


class UvicornNames(logging.Filter):
    """Renames records of the `uvicorn.error` logger (which carries uvicorn's normal lines) `uvicorn`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return True


def rename_uvicorn_logger() -> None:
    """Install `UvicornNames` on uvicorn's logger (once)."""
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, UvicornNames) for f in uvicorn_logger.filters):
        uvicorn_logger.addFilter(UvicornNames())


class AcceptErrorLog:
    """An asyncio exception handler: accept failures (out of file descriptors) as one rate-limited line;
    anything else goes to asyncio's default handler."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._held_back = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            self._held_back += 1
            return
        more = f" ({self._held_back} more since the last report)" if self._held_back else ""
        logger.error(
            "cannot accept connections: %s%s; retrying each second. Raise the open-file limit "
            "(LimitNOFILE= in a systemd unit, ulimit -n) or lower --header-timeout.",
            context.get("exception"),
            more,
        )
        self._last = now
        self._held_back = 0

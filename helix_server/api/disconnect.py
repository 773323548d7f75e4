"""Abort a non-streaming request when its client hangs up.

Litestar does not cancel a handler whose client disconnected, so while a non-streaming handler waits
for the engine it also watches the ASGI `receive` channel for `http.disconnect`; if that comes first
the work is cancelled (which closes its `RequestStream`s and aborts them in the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from litestar import Request

from helix_server.api.errors import ClientDisconnected

T = TypeVar("T")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or `ClientDisconnected` (after cancelling `work`) if the client left."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        work_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work_task
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        work_task.cancel()

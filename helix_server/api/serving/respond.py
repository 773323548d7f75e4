"""The life of one generation request: admit, start, then stream or collect, and always clean up.

Everything that can fail on bad input happens in `start` (tokenize, validate, admission, queue),
before the first byte of the response, so a bad or refused streaming request still gets a plain
400 or 503. With `max_queue_wait` set, a stream also waits for the engine's first output (its first
token) before sending anything, so a request dropped after waiting too long is a plain 503 too.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

from litestar import Request, Response

from helix_server.api.disconnect import run_until_disconnect
from helix_server.api.serving.generation import Generation
from helix_server.api.sse import EventStream
from helix_server.api.state import ServerState


async def respond(
    state: ServerState,
    request: Request,
    start: Callable[[], Awaitable[Generation]],
    *,
    stream: bool,
    events: Callable[[Generation], AsyncGenerator[bytes, None]],
    collect: Callable[[Generation], Awaitable[Response]],
) -> Response:
    """Run a generation request; the server counts it active until its response is fully sent."""
    state.admit()
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            state.active.release()

    try:
        generation = await start()
    except BaseException:
        release()
        raise

    if stream:
        if state.config.engine.scheduler.max_queue_wait is not None:
            try:
                await run_until_disconnect(request, generation.wait_first_output())
            except BaseException:
                await generation.aclose()
                release()
                raise

        async def event_source() -> AsyncGenerator[bytes, None]:
            try:
                async for event in events(generation):
                    yield event
            finally:
                await generation.aclose()

        async def on_close() -> None:
            await generation.aclose()
            release()

        return EventStream(event_source(), on_close=on_close)

    try:
        return await run_until_disconnect(request, collect(generation))
    finally:
        await generation.aclose()
        release()

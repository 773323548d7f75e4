"""`Generation`: the engine requests of one API request (one per prompt) and their merged outputs.

Every prompt is validated, and the whole request checked against the queue bounds, before any is
queued, so a bad or refused second prompt never leaves the first one running. `outputs()` yields
`(prompt_index, RequestOutput)` deltas as they arrive from any prompt; closing it (or `aclose()`)
aborts whatever is still running, which frees its KV blocks. `wait_first_output()` lets a streaming
response wait for the engine's first output before sending any byte (so a request dropped from the
queue can still be answered with a plain 503).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from helix_server.api.metrics import RequestObserver
from helix_server.api.state import ServerState
from helix_server.engine.async_engine import RequestStream
from helix_server.engine.outputs import RequestOutput
from helix_server.sampling_params import SamplingParams

_END = object()


class Generation:
    """The running engine requests of one API request."""

    def __init__(self, state: ServerState, streams: list[RequestStream]) -> None:
        self.state = state
        self.streams = streams
        self._observers: list[RequestObserver] = [state.metrics.observer() for _ in streams]
        self._tasks: list[asyncio.Task] = []
        self._iterators: list = []
        self._closed = False
        # The merged deltas, created on first use; `_buffer` holds what `wait_first_output` read.
        self._source: AsyncIterator[tuple[int, RequestOutput]] | None = None
        self._buffer: list[tuple[int, RequestOutput]] = []

    @classmethod
    async def start(
        cls,
        state: ServerState,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        prompt_param: str = "prompt",
        cache_salt: str | None = None,
    ) -> Generation:
        """Validate every prompt, check the queue bounds for all of them, then queue them all
        (raises `ParameterError`, `EngineOverloadedError` or `EngineDeadError`)."""
        request_ids = [f"{request_id}-{index}" for index in range(len(prompts))]
        if params.structured_output is not None:  # compiled off the event loop, time-limited
            await state.engine.compile_structured_output(params.structured_output)
        streams = await state.engine.add_requests(prompts, params, request_ids, prompt_param, cache_salt)
        return cls(state, streams)

    async def wait_first_output(self) -> None:
        """Wait for the first delta of any prompt (kept for `outputs()`); raises what the engine
        raised instead (e.g. `EngineOverloadedError` for a request dropped from the queue)."""
        try:
            self._buffer.append(await self._merged().__anext__())
        except StopAsyncIteration:
            pass

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas of all prompts, each prompt's in order; ends when every prompt has finished."""
        source = self._merged()
        while self._buffer:
            yield self._buffer.pop(0)
        async for item in source:
            yield item

    def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if self._source is None:
            self._source = self._iterate()
        return self._source

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self.streams) == 1:
            iterator = self.streams[0].__aiter__()
            self._iterators.append(iterator)
            async for output in iterator:
                self._observers[0].observe(output)
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [
            asyncio.get_running_loop().create_task(self._pump(index, stream, queue))
            for index, stream in enumerate(self.streams)
        ]
        remaining = len(self._tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                self._observers[index].observe(item)
                yield index, item

    async def _pump(self, index: int, stream: RequestStream, queue: asyncio.Queue) -> None:
        iterator = stream.__aiter__()
        try:
            async for output in iterator:
                queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 - e.g. EngineDeadError, re-raised by outputs()
            queue.put_nowait((index, exc))
        finally:
            await iterator.aclose()
            queue.put_nowait((index, _END))

    async def aclose(self) -> None:
        """Abort every prompt that has not finished (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._source is not None:
            with contextlib.suppress(RuntimeError):  # still running in another task: it ends below
                await self._source.aclose()
        for task in self._tasks:
            task.cancel()
        for iterator in self._iterators:
            await iterator.aclose()
        for stream in self.streams:
            if not stream.finished and not self._iterators and not self._tasks:
                _discard(self.state, stream)


def _discard(state: ServerState, stream: RequestStream) -> None:
    """Abort a stream nobody iterates, and drain it in the background so the engine forgets it."""
    state.engine.abort(stream.request_id)

    async def drain() -> None:
        async for _ in stream:
            pass

    state.spawn(asyncio.wait_for(drain(), timeout=30.0))

"""`AsyncEngine`: an asyncio front for `EngineCore`, whose `step()` runs in one background thread.

The event loop never runs the model. `add_request` tokenizes (large prompts in the tokenizer's
worker thread), checks the request id against this front's streams and validates the request with
the engine's `InputProcessor`, all in the caller (so bad input fails before any response byte);
then it hands the `EngineCoreRequest` to the engine thread through a command queue (the core does
not check it again) and returns a `RequestStream`, an async iterator of delta `RequestOutput`s.
Leaving the iteration early (a client that hangs up) aborts the request, which frees its KV blocks
at the engine thread's next turn, before its next step.

Admission control happens in `add_request` too: a request larger than the queue could ever hold
is a `ParameterError`; past `max_queued_requests` / `max_queued_tokens` (counting what the engine
thread has not picked up yet) it raises `EngineOverloadedError`, and a request the engine drops
after `max_queue_wait` ends its stream with the same error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, replace

from helix_server.config import EngineConfig
from helix_server.engine.admission import RETRY_AFTER_SECONDS, check_admission, check_request_size
from helix_server.engine.core import EngineCore
from helix_server.engine.input_processor import EngineCoreRequest, check_request_id
from helix_server.engine.outputs import RequestOutput
from helix_server.engine.stats import EngineStats
from helix_server.engine.tokenizer import Tokenizer
from helix_server.engine.torch_thread import TorchThread
from helix_server.errors import EngineDeadError, EngineOverloadedError, ParameterError
from helix_server.platform.allocator import release_freed_memory
from helix_server.sampling_params import SamplingParams, StructuredOutputSpec

logger = logging.getLogger("helix_server")


@dataclass
class _AbortCommand:
    request_id: str


_STOP = object()


class RequestStream:
    """Async iterator over one request's delta outputs; ends after the finished output.

    Raises `EngineDeadError` if the engine loop dies while the request is in flight, and
    `EngineOverloadedError` if the engine dropped it after it waited too long to be scheduled.
    Closing it (or abandoning it mid-iteration) before the request finished aborts the request.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, prompt_token_ids: list[int], n: int = 1) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.n = n  # sequences of the request (the ids of its sequences stay in use while it runs)
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
        finally:
            if not self.finished:
                self._engine.abort(self.request_id)
            self._engine._forget(self.request_id)


class AsyncEngine:
    """Serve many concurrent requests from asyncio code with one engine thread doing the work."""

    def __init__(
        self, core: EngineCore, tokenizer: Tokenizer | None = None, torch_thread: TorchThread | None = None
    ) -> None:
        """`torch_thread`: the thread that loaded `core`'s model, to run its steps too (see
        `TorchThread`); a new one when None."""
        self.core = core
        # The event loop tokenizes with the engine's own tokenizer, which its thread detokenizes
        # with: `Tokenizer` is safe to share between threads (see its docstring), and a second copy
        # of a 49k-token vocabulary costs ~10 MiB of resident memory.
        self.tokenizer = tokenizer or core.tokenizer
        self.tokenizer.sanitize_chat_content = not core.config.model.allow_special_tokens_in_content
        self.runtime = core.runtime
        # Validation needs only values the engine fixed at start-up: safe on the event loop.
        self.input_processor = core.input_processor
        # Read from the event loop: copies of values the engine fixes at construction.
        self._seq_num_tokens_limit = core.seq_num_tokens_limit
        self._num_speculative_tokens = core.num_speculative_tokens
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._torch_thread = torch_thread
        self._running: Future | None = None  # the engine loop, on the torch thread
        self.dead_error: BaseException | None = None
        # time.monotonic() of the last finished step or idle check: liveness for /health.
        self.last_progress_time = time.monotonic()
        self.num_steps = 0
        # Admission control: sequences and prompt tokens handed to the engine thread but not yet
        # added by it (the engine's own queue counts the rest), and requests refused here.
        self._pending_lock = threading.Lock()
        self._pending_sequences = 0
        self._pending_prompt_tokens = 0
        self._rejected: Counter = Counter()
        # On the CPU glibc keeps freed activation buffers for the next step (`keep_freed_memory`): a
        # burst of long prompts leaves its peak resident (measured: +170 MiB after 16 concurrent
        # requests of up to 1,024 tokens). When the engine runs out of work they go back to the OS.
        self.release_memory_when_idle = core.runtime.device.type == "cpu"

    @classmethod
    def from_config(cls, config: EngineConfig, progress=None) -> AsyncEngine:
        """Load the model on the engine thread, which then runs the steps (see `TorchThread`)."""
        torch_thread = TorchThread("helix-engine")
        try:
            core = torch_thread.submit(lambda: EngineCore(config, progress=progress)).result()
        except BaseException:
            torch_thread.close(timeout=0)
            raise
        return cls(core, torch_thread=torch_thread)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the engine thread, delivering outputs to the running event loop."""
        if self._running is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._torch_thread is None:
            self._torch_thread = TorchThread("helix-engine")
        self._running = self._torch_thread.submit(self._run)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread (requests still in flight are aborted)."""
        if self._running is None:
            return
        self._commands.put(_STOP)
        self._torch_thread.close(timeout)
        self._torch_thread = None  # ended: a later start() gets a new one
        self._running = None
        self.tokenizer.close()

    @property
    def is_alive(self) -> bool:
        return self._running is not None and not self._running.done() and self.dead_error is None

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._streams)

    @property
    def num_in_flight(self) -> int:
        """Requests added through this front and not yet fully delivered."""
        return len(self._streams)

    @property
    def seq_num_tokens_limit(self) -> int:
        """The longest sequence (prompt + completion) a request may reach (fixed at start-up)."""
        return self._seq_num_tokens_limit

    @property
    def num_speculative_tokens(self) -> int:
        """The most drafts a request may verify per step; 0 without speculative decoding."""
        return self._num_speculative_tokens

    async def compile_structured_output(self, spec: StructuredOutputSpec) -> None:
        """Compile a request's grammar off the event loop, time-limited (`ParameterError` when it
        is bad or too slow); the engine thread then finds it compiled."""
        await self.core.structured.compile_async(spec)

    def stats(self) -> EngineStats:
        """The engine's counters and gauges (read without locking: plain values), plus the requests
        this front refused."""
        stats = self.core.stats()
        rejected = Counter(stats.num_requests_rejected_total)
        rejected.update(self._rejected)
        return replace(stats, num_requests_rejected_total=dict(rejected))

    def check_admission(self, num_sequences: int, num_prompt_tokens: int) -> None:
        """Raise `EngineOverloadedError` if queuing this much more work would pass the queue bounds
        (`num_sequences`: a request's `n`, summed over its prompts)."""
        queued = self.core.queued
        with self._pending_lock:
            sequences = queued.num_sequences + self._pending_sequences
            tokens = queued.num_prompt_tokens + self._pending_prompt_tokens
        try:
            check_admission(self.core.config.scheduler, sequences, tokens, num_sequences, num_prompt_tokens)
        except EngineOverloadedError as exc:
            self._rejected[exc.code] += 1
            raise

    def abort_all(self) -> None:
        """Abort every in-flight request; each stream ends with a finish_reason "abort" output."""
        for request_id in list(self._streams):
            self.abort(request_id)

    # ----------------------------------------------------------------- requests

    async def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        prompt_param: str = "prompt",
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Tokenize (if text), validate, and queue a request. Raises `ParameterError` on bad input
        and `EngineOverloadedError` when the waiting queue is full."""
        request_id = request_id or uuid.uuid4().hex
        (stream,) = await self.add_requests([prompt], params, [request_id], prompt_param, cache_salt)
        return stream

    async def add_requests(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams,
        request_ids: list[str],
        prompt_param: str = "prompt",
        cache_salt: str | None = None,
    ) -> list[RequestStream]:
        """`add_request` for the prompts of one API request: every prompt is tokenized and
        validated, and all of them (n sequences each) checked against the queue bounds together,
        before any is queued, so a bad or refused prompt never leaves another one running."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        check_request_size(self.core.config.scheduler, len(prompts), params.n, prompt_param)
        requests: list[EngineCoreRequest] = []
        for request_id, prompt in zip(request_ids, prompts, strict=True):
            check_request_id(request_id, params.n, self._num_sequences_of)
            if isinstance(prompt, str):
                if not prompt:
                    raise ParameterError("The prompt is empty.", prompt_param)
                token_ids = await self.tokenizer.encode_async(prompt)
            else:
                token_ids = list(prompt)
            requests.append(
                self.input_processor.process(
                    request_id, token_ids, params, cache_salt=cache_salt, prompt_param=prompt_param
                )
            )
        self.check_admission(params.n * len(requests), sum(len(r.prompt_token_ids) for r in requests))
        streams = []
        for request in requests:
            stream = RequestStream(self, request.request_id, request.prompt_token_ids, params.n)
            self._streams[request.request_id] = stream
            with self._pending_lock:
                self._pending_sequences += params.n
                self._pending_prompt_tokens += len(request.prompt_token_ids)
            self._commands.put(request)
            streams.append(stream)
        return streams

    def _num_sequences_of(self, request_id: str) -> int | None:
        stream = self._streams.get(request_id)
        return None if stream is None else stream.n

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to stop a request; safe to call for unknown or finished ids."""
        self._commands.put(_AbortCommand(request_id))

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    # ----------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            while True:
                if not self._apply_commands(block=not self.core.has_unfinished_requests()):
                    break
                if self.core.has_unfinished_requests():
                    outputs = self.core.step()
                    self.num_steps += 1
                    self._deliver(outputs)
                    if self.release_memory_when_idle and not self.core.has_unfinished_requests():
                        release_freed_memory()  # a few ms, once a burst
                self.last_progress_time = time.monotonic()
        except BaseException as exc:  # a bug in the engine itself: fail everyone, report dead
            logger.exception("engine loop died")
            self.dead_error = exc
            self._fail_all(EngineDeadError(f"the engine loop died: {exc}"))
            return
        self._abort_all()

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; False when asked to stop."""
        while True:
            try:
                command = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
            except queue.Empty:
                if block:
                    self.last_progress_time = time.monotonic()
                    continue
                return True
            block = False
            if command is _STOP:
                return False
            if isinstance(command, _AbortCommand):
                output = self.core.abort_request(command.request_id)
                if output is not None:
                    self._deliver([output])
                continue
            try:
                self.core.add_core_request(command)
            except Exception as exc:  # validated before, so a bug: it fails this request only
                self._deliver_error(command.request_id, exc)
            finally:  # now in the engine's own queue (or refused): no longer pending here
                with self._pending_lock:
                    self._pending_sequences -= command.params.n
                    self._pending_prompt_tokens -= len(command.prompt_token_ids)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            self._call_in_loop(self._put_outputs, outputs)

    def _call_in_loop(self, callback, *args) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _put_outputs(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished and output.error_code == "queue_timeout":
                message = output.error or "The request waited too long to be scheduled."
                stream._put(EngineOverloadedError(message, "queue_timeout", RETRY_AFTER_SECONDS))
            else:
                stream._put(output)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        def put() -> None:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream._put(exc)

        self._call_in_loop(put)

    def _fail_all(self, exc: BaseException) -> None:
        def put() -> None:
            for stream in list(self._streams.values()):
                stream._put(exc)

        self._call_in_loop(put)

    def _abort_all(self) -> None:
        for request_id in self.core.unfinished_request_ids():
            output = self.core.abort_request(request_id)
            if output is not None:
                self._deliver([output])

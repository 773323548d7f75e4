"""The one thread that does a server's torch work: loading the model, then every engine step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class TorchThread:
    """A daemon thread that runs submitted jobs one after another, in order.

    Why one thread for loading and stepping: torch's CPU kernels run on OpenMP, and libgomp keeps a
    pool of worker threads for every thread that starts parallel work. Once more OpenMP threads
    exist than CPUs (the main thread's pool from loading, plus the engine thread's), libgomp
    throttles its workers' spinning between parallel regions to a few microseconds, so every
    kernel of a decode step waits for a sleeping worker to wake. Measured on the 2-core machine,
    SmolLM2-135M Q4_1 at batch 1: 38 tok/s on an engine thread after loading on the main thread,
    68 tok/s when one thread did both (72 on the main thread alone). So the server loads on the
    thread that will run the steps, and no other thread should start parallel torch work."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Run `job` on the thread after the jobs before it; its result or exception in the future."""
        future: Future[T] = Future()
        self._jobs.put((job, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Let the thread end after its queued jobs; wait up to `timeout` seconds for that."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

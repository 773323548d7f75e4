"""`ServerState`: everything the app's handlers share, hung off `app.state` (no module globals)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from litestar import Request

from helix_server.api.errors import model_not_found, service_unavailable
from helix_server.api.metrics import ServerMetrics
from helix_server.api.serving.response_store import ResponseStore
from helix_server.config import HelixConfig
from helix_server.engine.async_engine import AsyncEngine

STATE_KEY = "helix"


class ActiveRequests:
    """Counts generation requests from admission until their response is fully sent.

    `wait_idle` lets a draining server wait for the count to reach zero without polling.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        """One more active request."""
        self.count += 1
        self._idle.clear()

    def release(self) -> None:
        """One request done (its response fully sent or abandoned)."""
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True if no request is active within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(timeout, 0.0))
        except asyncio.TimeoutError:
            return self.count == 0
        return True


@dataclass
class ServerState:
    """The engine, the config, and the server's own flags and counters.

    `stuck_after_s`: /health reports the engine stuck when it has work and has made no
    progress for this long.
    """

    engine: AsyncEngine
    config: HelixConfig
    metrics: ServerMetrics
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))
    stuck_after_s: float = 30.0
    ready: bool = False
    draining: bool = False
    active: ActiveRequests = field(default_factory=ActiveRequests)
    background_tasks: set[asyncio.Task] = field(default_factory=set)
    # The Responses API's stored responses (`--max-stored-responses`).
    responses: ResponseStore = field(init=False)

    def __post_init__(self) -> None:
        self.responses = ResponseStore(self.config.server.max_stored_responses)

    def check_model(self, model: str | None) -> None:
        """404 `model_not_found` unless `model` is omitted or the served name (any name with
        `--accept-any-model-name`)."""
        if model is not None and model != self.model_name and not self.config.server.accept_any_model_name:
            raise model_not_found(model)

    def admit(self) -> None:
        """Count a new generation request in, or 503 if the server is draining."""
        if self.draining:
            raise service_unavailable(
                "The server is shutting down; retry on another replica.", "server_draining"
            )
        self.active.acquire()

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background_tasks.add(task)
        task.add_done_callback(self.background_tasks.discard)
        return task


def get_state(request: Request) -> ServerState:
    """The `ServerState` of the app serving `request`."""
    return request.app.state[STATE_KEY]

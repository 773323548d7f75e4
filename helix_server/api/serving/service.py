"""`GenerationService`: what the services of the generation endpoints share.

A service turns one decoded request body into engine requests and a response in its protocol. The
shared part: a request id, the tokenizer, and the run from token-id prompts to a response (queued by
`Generation.start`, answered by `respond`: admission, streaming or collecting, disconnect-abort),
plus adding up a whole generation for a non-streaming answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, ClassVar

from litestar import Request, Response

from helix_server.api.serving.accumulate import ResultAccumulator
from helix_server.api.serving.generation import Generation
from helix_server.api.serving.respond import respond
from helix_server.api.state import ServerState
from helix_server.sampling_params import SamplingParams


class GenerationService:
    """The base of the chat, completions and Responses services. `body` is the decoded request
    (with `stream` and `cache_salt`); subclasses set `id_prefix`."""

    id_prefix: ClassVar[str] = "req-"

    def __init__(self, state: ServerState, body: Any) -> None:
        self.state = state
        self.body = body
        self.request_id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tokenizer = state.engine.tokenizer
        self.prompt_ids: list[list[int]] = []

    async def run(
        self,
        request: Request,
        prompts: list[list[int]],
        params: SamplingParams,
        prompt_param: str,
        *,
        events: Callable[[Generation], AsyncGenerator[bytes, None]],
        collect: Callable[[Generation], Awaitable[Response]],
    ) -> Response:
        """Queue `prompts` (errors name `prompt_param`) and answer: a stream of `events` when the
        body asks for one, else what `collect` makes of the whole generation."""
        self.prompt_ids = prompts

        def start() -> Awaitable[Generation]:
            return Generation.start(
                self.state, self.request_id, prompts, params, prompt_param, cache_salt=self.body.cache_salt
            )

        return await respond(
            self.state, request, start, stream=bool(self.body.stream), events=events, collect=collect
        )

    async def results(self, generation: Generation, n: int = 1) -> ResultAccumulator:
        """Every delta of `generation` added up (a 500 if the engine failed any sequence)."""
        results = ResultAccumulator(self.prompt_ids, n)
        async for index, output in generation.outputs():
            results.add(index, output)
        results.raise_if_failed()
        return results

"""The original Helix endpoints: `/generate`, `/generate/batch` and `/generate/stream`.

Same engine path as the OpenAI endpoints (validation, disconnect handling, metrics); only the wire
format differs. `tokens_per_second` is generated tokens over the request's whole latency;
`acceptance_rate` (accepted over drafted tokens) is null when nothing was drafted for the request.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator

import msgspec
from litestar import Request, Response

from helix_server.api.errors import bad_request, server_error, stream_error
from helix_server.api.protocol.helix import (
    BatchGenerateRequest,
    BatchGenerateResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationMetrics,
    StreamEvent,
)
from helix_server.api.serving.accumulate import ResultAccumulator
from helix_server.api.serving.generation import Generation
from helix_server.api.serving.prompts import completion_prompts
from helix_server.api.serving.respond import respond
from helix_server.api.serving.structured import structured_output_spec
from helix_server.api.sse import error_event, sse_event
from helix_server.api.state import ServerState
from helix_server.engine.outputs import RequestMetrics
from helix_server.sampling_params import SamplingParams


def generation_metrics(timing: RequestMetrics | None, num_tokens: int) -> GenerationMetrics:
    """TTFT and throughput from the engine's timestamps (seconds)."""
    if timing is None:
        return GenerationMetrics(None, None, None)
    ttft = None if timing.first_token_time is None else timing.first_token_time - timing.arrival_time
    end = timing.finished_time or timing.last_token_time
    elapsed = None if end is None else end - timing.arrival_time
    tps = num_tokens / elapsed if elapsed and elapsed > 0 else None
    return GenerationMetrics(ttft, tps, timing.acceptance_rate)


class HelixService:
    """Serves one `/generate*` request."""

    def __init__(self, state: ServerState, body: GenerateRequest | BatchGenerateRequest) -> None:
        self.state = state
        self.body = body
        self.request_id = f"gen-{uuid.uuid4().hex}"
        self.params = SamplingParams(
            temperature=body.temperature,
            max_tokens=body.max_tokens,
            speculation_depth=body.speculation_depth,
            structured_output=structured_output_spec(body.response_format, body.structured_outputs),
        )
        prompts = body.prompts if isinstance(body, BatchGenerateRequest) else [body.prompt]
        if not prompts:
            raise bad_request("prompts must contain at least one prompt.", "prompts")
        self._prompts = list(prompts)
        self.prompts: list[list[int]] = []
        self.timings: dict[int, RequestMetrics | None] = {}

    async def _start(self) -> Generation:
        prompts = await completion_prompts(self._prompts, self.state.engine.tokenizer)
        self.prompts = [p.token_ids for p in prompts]
        return await Generation.start(self.state, self.request_id, self.prompts, self.params, "prompt")

    async def create(self, request: Request, stream: bool = False) -> Response:
        """Answer with one result, a batch of results, or an SSE stream of tokens."""
        return await respond(
            self.state, request, self._start, stream=stream, events=self._events, collect=self._collect
        )

    async def _collect(self, generation: Generation) -> Response:
        results = ResultAccumulator(self.prompts, 1)
        async for index, output in generation.outputs():
            results.add(index, output)
            self.timings[index] = output.metrics
        results.raise_if_failed()
        responses = []
        for index, result in enumerate(results.results):
            seq = result.sequences[0]
            metrics = generation_metrics(self.timings.get(index), len(seq.token_ids))
            responses.append(GenerateResponse(seq.text, len(seq.token_ids), seq.finish_reason, metrics))
        if isinstance(self.body, BatchGenerateRequest):
            return Response(content=BatchGenerateResponse(responses), status_code=200)
        return Response(content=responses[0], status_code=200)

    async def _events(self, generation: Generation) -> AsyncGenerator[bytes, None]:
        num_tokens = 0
        try:
            async for _, output in generation.outputs():
                seq = output.outputs[0]
                num_tokens += len(seq.token_ids)
                if seq.finish_reason == "error":
                    yield error_event(server_error(f"The request failed in the engine: {output.error}"))
                    return
                if seq.text:
                    yield sse_event(StreamEvent(token=seq.text, is_final=False))
                if output.finished:
                    metrics = generation_metrics(output.metrics, num_tokens)
                    yield sse_event(StreamEvent("", True, num_tokens, seq.finish_reason, metrics))
        except Exception as exc:  # noqa: BLE001 - the engine's refusals, or a bug that stream_error logs
            yield error_event(stream_error(exc, f"generate stream {self.request_id}"))


def parse_stream_query(query: dict[str, str]) -> GenerateRequest:
    """`GET /generate/stream?prompt=...&max_tokens=...`: query strings to a `GenerateRequest`."""
    known = {"prompt": str, "max_tokens": int, "temperature": float, "speculation_depth": int}
    values: dict[str, object] = {}
    for name, raw in query.items():
        if name not in known:
            raise bad_request(f"Unrecognized request argument supplied: {name}", name)
        try:
            values[name] = known[name](raw)
        except ValueError:
            raise bad_request(f"Invalid value for '{name}': {raw!r}.", name) from None
    if "prompt" not in values:
        raise bad_request("Missing required parameter: 'prompt'.", "prompt")
    try:
        return msgspec.convert(values, GenerateRequest)
    except msgspec.ValidationError as exc:
        raise bad_request(f"Invalid query: {exc}.") from None

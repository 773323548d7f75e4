"""The Responses API's event stream: engine deltas -> numbered `event:` / `data:` pairs.

`response.created` and `response.in_progress` first; then the output builder's item, part, text and
argument events as the text arrives; then `response.completed` (or `response.incomplete` when the
output was cut off by the token limit). A failure after the first byte is an `error` event followed
by `response.failed`. Every event's `sequence_number` is one more than the last's, from 0.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from helix_server.api.errors import APIError, server_error, stream_error
from helix_server.api.protocol.responses_events import ErrorEvent, ResponseEvent, StreamEvent
from helix_server.api.serving.generation import Generation
from helix_server.api.serving.responses_output import OutputBuilder
from helix_server.api.serving.usage import UsageCounter
from helix_server.api.sse import named_sse_event

if TYPE_CHECKING:
    from helix_server.api.serving.responses import ResponsesService


class _Numbering:
    """Gives each event the next sequence number and frames it."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, event: StreamEvent) -> bytes:
        event.sequence_number = self.next
        self.next += 1
        return named_sse_event(event.type, event)


async def response_events(service: ResponsesService, generation: Generation) -> AsyncGenerator[bytes, None]:
    """The whole event stream of one response."""
    frame = _Numbering()
    builder = OutputBuilder(service.tools)
    counter = UsageCounter(service.prompt_ids)
    yield frame(ResponseEvent("response.created", -1, service.response("in_progress")))
    yield frame(ResponseEvent("response.in_progress", -1, service.response("in_progress")))
    finish_reason = None
    try:
        async for _, output in generation.outputs():
            counter.add(output)
            for seq in output.outputs:
                if seq.finish_reason == "error":
                    for event in _failure(
                        service, server_error(f"The request failed in the engine: {output.error}"), builder
                    ):
                        yield frame(event)
                    return
                finish_reason = seq.finish_reason
                final = finish_reason is not None
                for event in builder.feed(seq.text, final=final, incomplete=finish_reason == "length"):
                    yield frame(event)
        response = service.finish(builder, counter.usage(), finish_reason)
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        yield frame(ResponseEvent(kind, -1, response))
    except Exception as exc:  # noqa: BLE001 - the engine's refusals, or a bug that stream_error logs
        for event in _failure(service, stream_error(exc, f"response stream {service.request_id}"), builder):
            yield frame(event)


def _failure(service: ResponsesService, error: APIError, builder: OutputBuilder) -> list[StreamEvent]:
    """`error`, then `response.failed` with what was built so far."""
    return [
        ErrorEvent("error", -1, error.code or error.type, error.message, error.param),
        ResponseEvent("response.failed", -1, service.failed(error, builder)),
    ]

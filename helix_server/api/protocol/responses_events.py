"""The streamed events of the Responses API (`event: <type>` / `data: <json>` pairs).

Every event carries its `type` and a `sequence_number` (0, 1, 2, ... within one stream). The stream
opens with `response.created` and `response.in_progress`, adds output items (a message's text part, or
a function call) piece by piece, and ends with `response.completed`, `response.incomplete` or
`response.failed`; there is no `[DONE]`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from helix_server.api.protocol.responses import OutputItem, OutputText, ResponseObject


class ResponseEvent(msgspec.Struct):
    """`response.created` / `.in_progress` / `.completed` / `.incomplete` / `.failed`."""

    type: str
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(msgspec.Struct):
    """`response.output_item.added` / `.done`."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(msgspec.Struct):
    """`response.content_part.added` / `.done`."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(msgspec.Struct):
    """`response.output_text.delta`."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class TextDoneEvent(msgspec.Struct):
    """`response.output_text.done`: the part's whole text."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ArgumentsDeltaEvent(msgspec.Struct):
    """`response.function_call_arguments.delta`."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(msgspec.Struct):
    """`response.function_call_arguments.done`: the call's whole arguments."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(msgspec.Struct):
    """`error`: what went wrong after the stream began (followed by `response.failed`)."""

    type: str
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = (
    ResponseEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
    | ErrorEvent
)

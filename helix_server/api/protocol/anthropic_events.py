"""Anthropic's Messages API: the response `Message`, its content blocks, the stream events, errors.

A stream is `message_start`, `ping`, then per content block `content_block_start`,
`content_block_delta`s and `content_block_stop`, then `message_delta` (stop reason, usage) and
`message_stop`; each is an SSE event named after its `type`.
"""

from __future__ import annotations

from typing import Any

import msgspec


class TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    """A piece of the answer's text."""

    text: str


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    """A call of one of the request's tools: `input` is an object matching its `input_schema`."""

    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextBlock | ToolUseBlock


class MessageUsage(msgspec.Struct):
    """Token counts: the prompt's and the answer's."""

    input_tokens: int
    output_tokens: int


class Message(msgspec.Struct):
    """The answer (`content` is empty in `message_start`, whole in a non-streaming response)."""

    id: str
    model: str
    content: list[ContentBlock]
    usage: MessageUsage
    stop_reason: str | None = None
    stop_sequence: str | None = None
    type: str = "message"
    role: str = "assistant"


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type"):
    """The first event: the message with no content yet."""

    message: Message


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    """Keeps the connection alive; carries nothing."""


class ContentBlockStart(msgspec.Struct, tag="content_block_start", tag_field="type"):
    """A block opens at `index` (a text block with "", a tool_use block with `input: {}`)."""

    index: int
    content_block: ContentBlock


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type"):
    """More text of a text block."""

    text: str


class InputJsonDelta(msgspec.Struct, tag="input_json_delta", tag_field="type"):
    """More of a tool_use block's `input`, as a piece of JSON text."""

    partial_json: str


class ContentBlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type"):
    """A delta of the block at `index`."""

    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type"):
    """The block at `index` is complete."""

    index: int


class StopDelta(msgspec.Struct):
    """`message_delta.delta`: why the answer ended."""

    stop_reason: str | None
    stop_sequence: str | None = None


class OutputUsage(msgspec.Struct):
    """`message_delta.usage`: the answer's tokens (the prompt's came in `message_start`)."""

    output_tokens: int


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type"):
    """The end of the answer: stop reason and output tokens."""

    delta: StopDelta
    usage: OutputUsage


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type"):
    """The last event."""


class AnthropicErrorDetail(msgspec.Struct):
    """`{"type": "invalid_request_error", "message": ...}`."""

    type: str
    message: str


class AnthropicError(msgspec.Struct, tag="error", tag_field="type"):
    """Anthropic's error envelope (the body of an error response, or an `error` stream event)."""

    error: AnthropicErrorDetail


class TokenCount(msgspec.Struct):
    """The answer of `count_tokens`."""

    input_tokens: int


StreamEvent = (
    MessageStart
    | Ping
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
    | AnthropicError
)


def named_event(event: StreamEvent) -> bytes:
    """`event: <type>\\ndata: <json>\\n\\n`: Anthropic names every event after its `type`."""
    name = type(event).__struct_config__.tag
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"

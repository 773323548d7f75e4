"""One answer's text and tool calls as Anthropic content blocks, and the stream events that build them.

The text deltas run through the chat path's `ToolStream` (when the request has tools), which splits
them into content and tool-call deltas; content goes into `text` blocks, each call into a `tool_use`
block whose `input` streams as `input_json_delta` pieces. A non-streaming answer is the same run
over the whole text.
"""

from __future__ import annotations

import json
import logging
import uuid

from helix_server.api.protocol.anthropic_events import (
    ContentBlock,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    InputJsonDelta,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolUseBlock,
)
from helix_server.api.protocol.chat import DeltaToolCall
from helix_server.api.serving.tools import ToolCalling, ToolStream

logger = logging.getLogger("helix_server.api")


def new_tool_use_id() -> str:
    """A fresh tool_use id (Anthropic's `toolu_...` form)."""
    return f"toolu_{uuid.uuid4().hex[:24]}"


class ContentBlocks:
    """The content blocks of one answer, built from its text deltas."""

    def __init__(self, tools: ToolCalling | None) -> None:
        self.stream = ToolStream(tools) if tools is not None else None
        self.blocks: list[ContentBlock] = []
        self._open: int | None = None  # index of the block still receiving deltas
        self._json: dict[int, str] = {}  # tool_use block index -> its input's JSON text so far

    @property
    def called_tools(self) -> bool:
        """Whether the answer holds a tool call."""
        return bool(self._json)

    def feed(self, text: str, final: bool = False) -> list[StreamEvent]:
        """The events that the text delta `text` (and the end of the answer, when `final`) makes."""
        calls: list[DeltaToolCall] = []
        if self.stream is not None:
            text, calls = self.stream.feed(text, final=final)
        events = self._text(text) if text else []
        for call in calls:
            events += self._call(call)
        if final and self._open is not None:
            events.append(ContentBlockStop(self._open))
            self._open = None
        return events

    def content(self) -> list[ContentBlock]:
        """The finished blocks, each tool_use block with its parsed `input`."""
        for index, text in self._json.items():
            block = self.blocks[index]
            assert isinstance(block, ToolUseBlock)
            block.input = _arguments(text, block.name)
        return self.blocks

    def _open_block(self, block: ContentBlock, start: ContentBlock) -> list[StreamEvent]:
        events: list[StreamEvent] = [] if self._open is None else [ContentBlockStop(self._open)]
        self._open = len(self.blocks)
        self.blocks.append(block)
        return [*events, ContentBlockStart(self._open, start)]

    def _text(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if self._open is None or not isinstance(self.blocks[self._open], TextBlock):
            events = self._open_block(TextBlock(""), TextBlock(""))
        block = self.blocks[self._open]
        assert isinstance(block, TextBlock)
        block.text += text
        return [*events, ContentBlockDelta(self._open, TextDelta(text))]

    def _call(self, call: DeltaToolCall) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if isinstance(call.function.name, str):  # a new call opens its block
            call_id = new_tool_use_id()
            block = ToolUseBlock(call_id, call.function.name, {})
            events = self._open_block(block, ToolUseBlock(call_id, call.function.name, {}))
            self._json[self._open] = ""
        pieces = call.function.arguments
        if self._open is None or self._open not in self._json or not isinstance(pieces, str) or not pieces:
            return events
        self._json[self._open] += pieces
        return [*events, ContentBlockDelta(self._open, InputJsonDelta(pieces))]


def _arguments(text: str, name: str) -> dict:
    """A call's input object; a parser's unreadable arguments become {} (logged)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        logger.warning("tool call %s: arguments are not a JSON object: %.200r", name, text)
        return {}
    return value

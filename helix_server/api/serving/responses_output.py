"""Engine text -> Responses output items, and the stream events that build them.

`OutputBuilder` takes one sequence's text deltas (through the chat API's `ToolStream` when tools are
offered, so tool-call markup becomes function calls) and keeps the output items: a `message` with one
`output_text` part for text, a `function_call` per call. At most one item is open at a time: text
after a call opens a new message, a new call closes what was open. Each change is also returned as
the stream events that describe it (numbered later, by the stream); the non-streaming answer runs the
same builder over the whole text and keeps only the items.
"""

from __future__ import annotations

import uuid

from helix_server.api.protocol.chat import DeltaToolCall
from helix_server.api.protocol.responses import FunctionCallItem, OutputItem, OutputMessage, OutputText
from helix_server.api.protocol.responses_events import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    OutputItemEvent,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from helix_server.api.serving.tools import ToolCalling, ToolStream


def new_item_id(prefix: str) -> str:
    """A fresh item id (`msg_...`, `fc_...`)."""
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    """The output items of one response, built from text deltas. Events carry sequence number -1
    until the stream numbers them."""

    def __init__(self, tools: ToolCalling | None) -> None:
        self.items: list[OutputItem] = []
        self._tools = ToolStream(tools) if tools is not None else None
        self._open: OutputItem | None = None
        # chat tool-call index -> the function_call item it became
        self._calls: dict[int, FunctionCallItem] = {}

    def feed(self, text: str, final: bool = False, incomplete: bool = False) -> list[StreamEvent]:
        """Add `text` (and end the output when `final`; the last item is then `incomplete` when
        `incomplete`, i.e. cut off by `max_output_tokens`); the events for what changed."""
        calls: list[DeltaToolCall] = []
        if self._tools is not None:
            text, calls = self._tools.feed(text, final)
        events: list[StreamEvent] = []
        if text:
            events += self._text(text)
        for call in calls:
            events += self._call(call)
        if final:
            events += self._close("incomplete" if incomplete else "completed")
        return events

    @property
    def output_text(self) -> str:
        """All the text of the message items (the SDKs' `output_text`)."""
        return "".join(p.text for item in self.items if isinstance(item, OutputMessage) for p in item.content)

    def _text(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if not isinstance(self._open, OutputMessage):
            events += self._close()
            message = OutputMessage(id=new_item_id("msg"), status="in_progress", content=[])
            events += self._add(message)
            message.content.append(OutputText(""))
            index = len(self.items) - 1
            events.append(
                ContentPartEvent("response.content_part.added", -1, message.id, index, 0, OutputText(""))
            )
        message = self._open
        message.content[0].text += text
        events.append(
            TextDeltaEvent("response.output_text.delta", -1, message.id, len(self.items) - 1, 0, text)
        )
        return events

    def _call(self, delta: DeltaToolCall) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        arguments = delta.function.arguments or ""
        if delta.index not in self._calls:
            events += self._close()
            call = FunctionCallItem(
                id=new_item_id("fc"),
                call_id=str(delta.id),
                name=str(delta.function.name),
                arguments="",
                status="in_progress",
            )
            self._calls[delta.index] = call
            events += self._add(call)
        call = self._calls[delta.index]
        if arguments:
            call.arguments += arguments
            events.append(
                ArgumentsDeltaEvent(
                    "response.function_call_arguments.delta", -1, call.id, self.items.index(call), arguments
                )
            )
        return events

    def _add(self, item: OutputItem) -> list[StreamEvent]:
        self.items.append(item)
        self._open = item
        snapshot = _copy(item)
        return [OutputItemEvent("response.output_item.added", -1, len(self.items) - 1, snapshot)]

    def _close(self, status: str = "completed") -> list[StreamEvent]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = self.items.index(item)
        item.status = status
        events: list[StreamEvent] = []
        if isinstance(item, OutputMessage):
            part = item.content[0]
            events.append(TextDoneEvent("response.output_text.done", -1, item.id, index, 0, part.text))
            events.append(
                ContentPartEvent("response.content_part.done", -1, item.id, index, 0, OutputText(part.text))
            )
        else:
            events.append(
                ArgumentsDoneEvent(
                    "response.function_call_arguments.done", -1, item.id, index, item.name, item.arguments
                )
            )
        events.append(OutputItemEvent("response.output_item.done", -1, index, _copy(item)))
        return events


def _copy(item: OutputItem) -> OutputItem:
    """A snapshot of `item` as it is now (events must not change when the item grows)."""
    if isinstance(item, OutputMessage):
        return OutputMessage(item.id, item.status, [OutputText(p.text) for p in item.content], item.role)
    return FunctionCallItem(item.id, item.call_id, item.name, item.arguments, item.status)

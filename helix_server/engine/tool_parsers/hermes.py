"""Hermes tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them,
between or after plain text (Qwen2, Qwen2.5, Qwen3, Hermes and many fine-tunes)."""

from __future__ import annotations

from helix_server.engine.tool_parsers.base import CallBodyParser, ToolParser, partial_marker_start

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser(ToolParser):
    """Content outside `<tool_call>` tags; each tag holds one call object."""

    name = "hermes"
    markers = (START, END)

    def __init__(self) -> None:
        super().__init__()
        self.state = "text"
        self.body: CallBodyParser | None = None

    def _step(self, final: bool) -> bool:
        if self.state == "text":
            at = self.buf.find(START)
            if at >= 0:
                self._content(self.buf[:at])
                self.buf = self.buf[at + len(START) :]
                self.state = "call"
                self.body = CallBodyParser(self, stop=END)
                return True
            keep = len(self.buf) if final else partial_marker_start(self.buf, START)
            if keep == 0:
                return False
            self._content(self.buf[:keep])
            self.buf = self.buf[keep:]
            return True
        if self.state == "call":
            assert self.body is not None
            progress = self.body.step(final)
            if self.body.done:
                self.state = "close"
                return True
            return progress
        # "close": skip to the end tag (anything after the call object inside the tag is dropped).
        at = self.buf.find(END)
        if at >= 0:
            self.buf = self.buf[at + len(END) :]
            self.state = "text"
            return True
        if final:
            self.buf = ""
            return False
        cut = partial_marker_start(self.buf, END)
        changed = cut > 0
        self.buf = self.buf[cut:]
        return changed

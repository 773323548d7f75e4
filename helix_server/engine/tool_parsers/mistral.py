"""Mistral tool calls: `[TOOL_CALLS]` then a JSON list of call objects (v3 tokenizers, e.g.
Mistral-7B-Instruct-v0.3), or `[TOOL_CALLS]name[ARGS]{...}` per call (v11+ tokenizers)."""

from __future__ import annotations

import re

from helix_server.engine.tool_parsers.base import (
    CallBodyParser,
    JsonValueScanner,
    ToolParser,
    partial_marker_start,
)

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"\s*([A-Za-z0-9_.\-]+)")


class MistralToolParser(ToolParser):
    """Content before `[TOOL_CALLS]`; after it a list of calls or `name[ARGS]{...}` calls."""

    name = "mistral"
    markers = (TOOL_CALLS, ARGS)

    def __init__(self) -> None:
        super().__init__()
        self.state = "text"
        self.body: CallBodyParser | None = None
        self.args: JsonValueScanner | None = None

    def _step(self, final: bool) -> bool:
        state = self.state
        if state == "text":
            at = self.buf.find(TOOL_CALLS)
            if at >= 0:
                self._content(self.buf[:at])
                self.buf = self.buf[at + len(TOOL_CALLS) :]
                self.state = "calls"
                return True
            keep = len(self.buf) if final else partial_marker_start(self.buf, TOOL_CALLS)
            if keep == 0:
                return False
            self._content(self.buf[:keep])
            self.buf = self.buf[keep:]
            return True
        if state in ("calls", "list"):
            return self._between(final)
        if state == "name":
            at = self.buf.find(ARGS)
            if at < 0:
                if final:
                    self.buf = ""
                return False
            match = _NAME.fullmatch(self.buf[:at].rstrip())
            self.buf = self.buf[at + len(ARGS) :]
            if match is None:
                self.state = "text"
                return True
            self._start_call(match.group(1))
            self.args = JsonValueScanner()
            self.state = "args"
            return True
        if state == "args":
            return self._scan_args(final)
        assert self.body is not None
        progress = self.body.step(final)
        if self.body.done:
            self.state = "list"
            return True
        return progress

    def _between(self, final: bool) -> bool:
        text = self.buf.lstrip()
        if self.state == "list":
            text = text.lstrip(",").lstrip()
        if not text:
            if final:
                self.buf = ""
            return False
        self.buf = text
        head = text[0]
        if head == "[" and self.state == "calls":
            self.buf = text[1:]
            self.state = "list"
        elif head == "{":
            self.body = CallBodyParser(self)
            self.state = "call"
        elif head == "]" and self.state == "list":
            self.buf = text[1:]
            self.state = "text"
        elif self.state == "calls":
            self.state = "name"
        else:
            self.state = "text"
        return True

    def _scan_args(self, final: bool) -> bool:
        assert self.args is not None
        start = i = 0
        while i < len(self.buf) and not self.args.done:
            ch = self.buf[i]
            if self.args.kind is None and ch.isspace():
                start = i = i + 1
                continue
            if not self.args.push(ch):
                break
            i += 1
        self._arguments(self.buf[start:i])
        self.buf = self.buf[i:]
        if self.args.done or (final and not self.buf):
            self.state = "text"
            return True
        return i > 0

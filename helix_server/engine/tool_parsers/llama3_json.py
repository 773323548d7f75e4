"""Llama 3.x JSON tool calls: the whole reply is `{"name": ..., "parameters": {...}}` (optionally
after `<|python_tag|>`), several calls separated by `;`. A reply that does not start with `{` is plain
content; an object that is not a call is given back as content too."""

from __future__ import annotations

from helix_server.engine.tool_parsers.base import CallBodyParser, ToolParser

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """Calls when the reply opens with a JSON object; otherwise plain text."""

    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def __init__(self) -> None:
        super().__init__()
        self.state = "start"
        self.body: CallBodyParser | None = None

    def _step(self, final: bool) -> bool:
        if self.state == "start":
            text = self.buf.lstrip()
            if text.startswith(PYTHON_TAG):
                self.buf = text[len(PYTHON_TAG) :]
                self.state = "between"
                return True
            if not text or (PYTHON_TAG.startswith(text) and not final):
                if final and self.buf:
                    self.state = "text"
                    return True
                return False
            self.state = "between" if text[0] == "{" else "text"
            return True
        if self.state == "text":
            if not self.buf:
                return False
            self._content(self.buf)
            self.buf = ""
            return True
        if self.state == "between":
            text = self.buf.lstrip().lstrip(";,").lstrip()
            if not text:
                if final:
                    self.buf = ""
                return False
            self.buf = text
            if text[0] == "{":
                self.state = "call"
                self.body = CallBodyParser(self)
            else:
                self.state = "text"
            return True
        assert self.body is not None
        progress = self.body.step(final)
        if self.body.done:
            if not self.body.ok:
                self._content(self.body.unparsed)
            self.state = "between"
            return True
        return progress

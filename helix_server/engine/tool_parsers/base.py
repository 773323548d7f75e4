"""The incremental tool-call parser every model family's parser builds on.

A parser reads the model's output text in pieces (`feed`) and at the end (`finish`), and returns
what each piece adds: plain content, the start of a tool call (its name) and pieces of a call's
arguments. The streaming path feeds the detokenizer's deltas; the non-streaming path feeds the whole
text at once. Both go through the same state machine, and a piece is only released once no later
text can change it, so the two give the same content and calls however the text is cut.

Markup (the family's call markers and the JSON around the name) never reaches the content. Content
whitespace is held until more content follows; an answer with tool calls drops what is left of it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

# The head of a call object up to its arguments: `{"name": "fn", "arguments":` (or "parameters").
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')


@dataclass
class ToolCallDelta:
    """What one parse step adds to tool call `index`: its `name` (once, at the start) and/or a piece
    of its JSON `arguments` text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass
class ParseDelta:
    """What one `feed` or `finish` released: content text and tool-call pieces, in order."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ParsedToolCall:
    """One whole tool call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


class JsonValueScanner:
    """Finds where one JSON value ends, a character at a time (strings and nesting respected).

    `push(ch)` says whether `ch` belongs to the value; after it, `done` says whether the value is
    complete. A scalar (number, true, false, null) ends at the first character that can't continue
    it; that character is not part of it.
    """

    _SCALAR = frozenset("0123456789+-.eEtruefalsn")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.kind: str | None = None
        self.done = False

    def push(self, ch: str) -> bool:
        if self.kind is None:
            self.kind = "container" if ch in "{[" else "string" if ch == '"' else "scalar"
            if self.kind == "container":
                self.depth = 1
            elif self.kind == "string":
                self.in_string = True
            return True
        if self.kind == "scalar":
            if ch in self._SCALAR:
                return True
            self.done = True
            return False
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.kind == "string":
                    self.done = True
            return True
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                self.done = True
        return True


def json_value_end(text: str) -> int | None:
    """The index just past the JSON container starting `text` (after whitespace), or None while it
    is still open."""
    scanner = JsonValueScanner()
    for i, ch in enumerate(text):
        if scanner.kind is None and ch.isspace():
            continue
        if not scanner.push(ch):
            return i
        if scanner.done:
            return i + 1
    return None


def partial_marker_start(text: str, marker: str) -> int:
    """Where a suffix of `text` that could begin `marker` starts (len(text) when none does)."""
    for start in range(max(0, len(text) - len(marker) + 1), len(text)):
        if marker.startswith(text[start:]):
            return start
    return len(text)


def call_from_json(text: str) -> ParsedToolCall | None:
    """A call from a whole JSON object `{"name": ..., "arguments"|"parameters": ...}`, or None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = obj.get("arguments", obj.get("parameters", {}))
    return ParsedToolCall(
        obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    )


class ToolParser:
    """Base of the family parsers: the buffer, the released pieces and the content rules.

    A subclass implements `_step(final)`, which consumes a prefix of `self.buf` and reports whether
    it made progress (`final` is true once no more text will come). `markers` are the strings whose
    tokens must stay in the detokenized text for the parser to see them.
    """

    name: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.buf = ""
        self.num_calls = 0
        self.calls: list[ParsedToolCall] = []
        self._held_ws = ""
        self._out = ParseDelta()

    def feed(self, text: str) -> ParseDelta:
        """Take the next piece of output text; returns what it released."""
        self.buf += text
        while self._step(False):
            pass
        return self._take()

    def finish(self) -> ParseDelta:
        """The output has ended: release what is left (a call cut short keeps what it has)."""
        while self._step(True):
            pass
        if self.num_calls == 0 and self._held_ws:
            self._out.content += self._held_ws
        self._held_ws = ""
        return self._take()

    def _step(self, final: bool) -> bool:
        raise NotImplementedError

    def _take(self) -> ParseDelta:
        out, self._out = self._out, ParseDelta()
        return out

    def _content(self, text: str) -> None:
        text = self._held_ws + text
        kept = text.rstrip()
        self._out.content += kept
        self._held_ws = text[len(kept) :]

    def _start_call(self, name: str) -> None:
        self._held_ws = ""
        self.calls.append(ParsedToolCall(name, ""))
        self._out.calls.append(ToolCallDelta(self.num_calls, name=name))
        self.num_calls += 1

    def _arguments(self, text: str) -> None:
        if not text:
            return
        self.calls[-1].arguments += text
        last = self._out.calls[-1] if self._out.calls else None
        if last is not None and last.index == self.num_calls - 1:
            last.arguments += text
        else:
            self._out.calls.append(ToolCallDelta(self.num_calls - 1, arguments=text))

    def _whole_call(self, text: str) -> bool:
        """Release a call given as one JSON object; False (and logged) when it is not one."""
        call = call_from_json(text)
        if call is None:
            logger.debug("%s: dropped an unparsable tool call %r", self.name, text[:200])
            return False
        self._start_call(call.name)
        self._arguments(call.arguments)
        return True


class CallBodyParser:
    """The JSON of one call, `{"name": ..., "arguments": VALUE ...}`, read incrementally.

    Once the head up to the arguments is read, the name is released and the arguments value streams
    as it is scanned. A body whose head does not match (other key order) is parsed whole when it
    closes. `stop` is a marker that also ends the body (a family's end tag), so broken JSON can't
    run past it.
    """

    def __init__(self, parser: ToolParser, stop: str | None = None) -> None:
        self.parser = parser
        self.stop = stop
        self.state = "head"
        self.scanner = JsonValueScanner()  # the arguments value
        self.outer = JsonValueScanner()  # the rest of the call object
        self.done = False
        self.ok = True  # False when the body turned out not to be a call
        self.unparsed = ""  # the text of a body that was not a call

    def step(self, final: bool) -> bool:
        """Consume what it can of `parser.buf`; sets `done` when the body is over."""
        p = self.parser
        if self.state == "head":
            stop_at = p.buf.find(self.stop) if self.stop else -1
            head_text = p.buf if stop_at < 0 else p.buf[:stop_at]
            match = CALL_HEAD.match(head_text)
            if match:
                p.buf = p.buf[match.end() :]
                p._start_call(json.loads(f'"{match.group(1)}"'))
                self.state = "args"
                return True
            if head_text.lstrip()[:1] not in ("", "{"):
                end = None  # not a call object: it runs to the stop marker or the end
            else:
                end = json_value_end(head_text)
            if end is None and stop_at >= 0:
                end = stop_at
            if end is None and final:
                end = len(head_text)
            if end is None:
                return False
            self.ok = p._whole_call(head_text[:end])
            if not self.ok:
                self.unparsed = head_text[:end]
            p.buf = p.buf[end:]
            self.done = True
            return True
        if self.state == "args":
            return self._scan(final, self.scanner, emit=True)
        return self._scan(final, self.outer, emit=False)

    def _scan(self, final: bool, scanner: JsonValueScanner, emit: bool) -> bool:
        p = self.parser
        start = i = 0
        while i < len(p.buf):
            ch = p.buf[i]
            if scanner.kind is None and emit and ch.isspace():
                start = i = i + 1
                continue
            if self.stop and not scanner.in_string and ch == self.stop[0]:
                rest = p.buf[i:]
                if rest.startswith(self.stop):
                    self._emit(p.buf[start:i], emit)
                    p.buf = p.buf[i:]
                    self.done = True
                    return True
                if self.stop.startswith(rest) and not final:
                    break
            if not scanner.push(ch):
                break
            i += 1
            if scanner.done:
                break
        self._emit(p.buf[start:i], emit)
        p.buf = p.buf[i:]
        if scanner.done:
            if emit:
                self.state = "tail"
                self.outer.push("{")  # inside the call object, after its arguments
            else:
                self.done = True
            return True
        if final and not p.buf:
            self.done = True
            return True
        return i > 0

    def _emit(self, text: str, emit: bool) -> None:
        if emit:
            self.parser._arguments(text)

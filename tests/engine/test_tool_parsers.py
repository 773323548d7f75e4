"""Tool-call parsers: content, calls and arguments of each family, the same however the text is cut."""

from __future__ import annotations

import json

import pytest

from helix_server.engine.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    ToolParser,
    detect_tool_parser,
    get_tool_parser,
    resolve_tool_parser,
)


def parse(cls: type[ToolParser], pieces: list[str]) -> tuple[str, list[tuple[str, str]], list]:
    """Feed `pieces`, then finish: the content, the (name, arguments) calls, and every delta."""
    parser = cls()
    content = ""
    calls: dict[int, list[str]] = {}
    deltas = []
    for delta in [*(parser.feed(piece) for piece in pieces), parser.finish()]:
        deltas.append(delta)
        content += delta.content
        for call in delta.calls:
            entry = calls.setdefault(call.index, [None, ""])
            if call.name is not None:
                assert entry[0] is None, "a call's name comes once"
                entry[0] = call.name
            else:
                assert entry[0] is not None, "a call's name comes before its arguments"
            entry[1] += call.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content, [(name, args) for name, args in calls.values()], deltas


WEATHER = '{"city": "Paris", "units": ["c", {"x": "}]\\" <tool_call>"}]}'

CASES = [
    (
        HermesToolParser,
        (
            f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
            '<tool_call>\n{"arguments": {"a": 1}, "name": "second"}\n</tool_call>\n'
        ),
        "Let me check.",
        [("get_weather", WEATHER), ("second", '{"a": 1}')],
    ),
    (HermesToolParser, "Just text, <tool no call.  \n", "Just text, <tool no call.  \n", []),
    (HermesToolParser, "<tool_call>not json</tool_call>\nafter", "\nafter", []),
    (HermesToolParser, '<tool_call>{"name": "cut", "arguments": {"a": [1, 2', "", [("cut", '{"a": [1, 2')]),
    (
        Llama3JsonToolParser,
        '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}',
        "",
        [("f", '{"a": 1}'), ("g", "{}")],
    ),
    (
        Llama3JsonToolParser,
        '<|python_tag|>{"name": "f", "parameters": {"q": "x"}}',
        "",
        [("f", '{"q": "x"}')],
    ),
    (Llama3JsonToolParser, 'Hello {"name": "f"}', 'Hello {"name": "f"}', []),
    (Llama3JsonToolParser, '{"not": "a call"}', '{"not": "a call"}', []),
    (
        MistralToolParser,
        'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": [2]}}]',
        "Sure.",
        [("f", '{"a": 1}'), ("g", '{"b": [2]}')],
    ),
    (
        MistralToolParser,
        '[TOOL_CALLS]f[ARGS]{"a": "[ARGS]"}[TOOL_CALLS]g[ARGS]{"b": 2}',
        "",
        [("f", '{"a": "[ARGS]"}'), ("g", '{"b": 2}')],
    ),
]


@pytest.mark.parametrize("cls, text, content, calls", CASES)
def test_whole_text(cls, text, content, calls):
    assert parse(cls, [text])[:2] == (content, calls)
    for _, arguments in calls:
        if not arguments.endswith("2"):  # the cut-short case stays cut short
            json.loads(arguments)


@pytest.mark.parametrize("cls, text, content, calls", CASES)
def test_every_cut_gives_the_same_result(cls, text, content, calls):
    whole = parse(cls, [text])[:2]
    for cut in range(len(text) + 1):
        assert parse(cls, [text[:cut], text[cut:]])[:2] == whole, cut
    assert parse(cls, list(text))[:2] == whole


@pytest.mark.parametrize("cls, text, content, calls", CASES)
def test_no_markup_in_streamed_content(cls, text, content, calls):
    _, _, deltas = parse(cls, list(text))
    streamed = "".join(delta.content for delta in deltas)
    for marker in cls.markers:
        if marker not in content:
            assert marker not in streamed


def test_arguments_stream_in_pieces():
    text = '<tool_call>{"name": "f", "arguments": {"text": "a long argument value"}}</tool_call>'
    _, calls, deltas = parse(HermesToolParser, [text[i : i + 5] for i in range(0, len(text), 5)])
    pieces = [c.arguments for d in deltas for c in d.calls if c.arguments]
    assert len(pieces) > 3 and "".join(pieces) == calls[0][1] == '{"text": "a long argument value"}'


def test_names_and_detection():
    assert get_tool_parser("qwen") is HermesToolParser
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        get_tool_parser("nope")
    assert detect_tool_parser("{{ '<tool_call>' }}") is HermesToolParser
    assert detect_tool_parser("{{ '[TOOL_CALLS]' }}") is MistralToolParser
    assert detect_tool_parser("{{ '<|python_tag|>' }}") is Llama3JsonToolParser
    assert detect_tool_parser("{{ '<tool_call>[TOOL_CALLS]' }}") is None
    assert detect_tool_parser("plain chatml") is None
    assert resolve_tool_parser("none", "<tool_call>") is None
    assert resolve_tool_parser("auto", "<tool_call>") is HermesToolParser
    assert resolve_tool_parser("mistral", None) is MistralToolParser

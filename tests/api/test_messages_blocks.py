"""`ContentBlocks`: a tool-call parser's output as Anthropic content blocks and stream events, the
same whole and delta by delta (tool_choice auto, which the tiny model can't exercise over HTTP)."""

from __future__ import annotations

import msgspec

from helix_server.api.protocol.anthropic_events import TextBlock, ToolUseBlock
from helix_server.api.serving.messages_blocks import ContentBlocks
from helix_server.api.serving.tools import ToolCalling
from helix_server.engine.tool_parsers import HermesToolParser

TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
]
WRITTEN = (
    'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
)


def setup(parallel: bool = True) -> ToolCalling:
    return ToolCalling(TOOLS, "auto", HermesToolParser, parallel)


def plain(blocks) -> list[tuple]:
    return [(b.text,) if isinstance(b, TextBlock) else (b.name, b.input) for b in blocks]


def test_whole_text_becomes_a_text_block_and_two_tool_use_blocks():
    blocks = ContentBlocks(setup())
    events = blocks.feed(WRITTEN, final=True)
    assert plain(blocks.content()) == [
        ("Checking.",),
        ("get_time", {"zone": "CET"}),
        ("get_weather", {"city": "Oslo", "days": 2}),
    ]
    assert blocks.called_tools
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("ContentBlockStart") == 3 and kinds.count("ContentBlockStop") == 3
    assert kinds[-1] == "ContentBlockStop"


def test_deltas_give_the_same_blocks_and_well_formed_events():
    blocks = ContentBlocks(setup())
    events = []
    for i in range(0, len(WRITTEN), 3):  # 3-character deltas
        events += blocks.feed(WRITTEN[i : i + 3])
    events += blocks.feed("", final=True)
    whole = ContentBlocks(setup())
    whole.feed(WRITTEN, final=True)
    assert plain(blocks.content()) == plain(whole.content())
    open_index, json_text, text = None, {}, ""
    for event in (msgspec.to_builtins(e) for e in events):
        if event["type"] == "content_block_start":
            assert open_index is None, "a block starts only after the previous one stopped"
            open_index = event["index"]
            if event["content_block"]["type"] == "tool_use":
                assert event["content_block"]["input"] == {} and event["content_block"]["id"].startswith(
                    "toolu_"
                )
                json_text[open_index] = ""
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index
            if event["delta"]["type"] == "input_json_delta":
                json_text[open_index] += event["delta"]["partial_json"]
            else:
                text += event["delta"]["text"]
        else:
            assert event == {"type": "content_block_stop", "index": open_index}
            open_index = None
    assert text == "Checking." and open_index is None
    assert [msgspec.json.decode(t) for t in json_text.values()] == [
        {"zone": "CET"},
        {"city": "Oslo", "days": 2},
    ]


def test_parallel_off_keeps_the_first_call():
    blocks = ContentBlocks(setup(parallel=False))
    blocks.feed(WRITTEN, final=True)
    assert plain(blocks.content()) == [("Checking.",), ("get_time", {"zone": "CET"})]


def test_without_tools_the_markup_stays_text():
    blocks = ContentBlocks(None)
    blocks.feed(WRITTEN, final=True)
    (block,) = blocks.content()
    assert isinstance(block, TextBlock) and block.text == WRITTEN and not blocks.called_tools
    assert not any(isinstance(b, ToolUseBlock) for b in blocks.content())

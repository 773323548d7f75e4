"""Tool-call parsers, one per model family, chosen by name or detected from the chat template.

`get_tool_parser(name)` returns the parser class for `--tool-call-parser`; `detect_tool_parser`
picks one from a chat template when its call markup says unambiguously which family it is.
"""

from __future__ import annotations

from helix_server.engine.tool_parsers.base import (
    ParseDelta,
    ParsedToolCall,
    ToolCallDelta,
    ToolParser,
)
from helix_server.engine.tool_parsers.hermes import HermesToolParser
from helix_server.engine.tool_parsers.llama3_json import Llama3JsonToolParser
from helix_server.engine.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}
# vLLM's other names for the same formats.
ALIASES = {"qwen": "hermes", "llama3": "llama3_json", "llama4_json": "llama3_json"}
# Values of --tool-call-parser besides the parser names.
AUTO = "auto"
NONE = "none"


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class called `name` (or one of vLLM's aliases); ValueError for unknown names."""
    key = ALIASES.get(name, name)
    if key not in TOOL_PARSERS:
        known = ", ".join([*TOOL_PARSERS, *ALIASES])
        raise ValueError(f"unknown tool-call parser {name!r}; known: {known}")
    return TOOL_PARSERS[key]


def detect_tool_parser(chat_template: str | None) -> type[ToolParser] | None:
    """The family a chat template writes tool calls in, when exactly one family's markup is in it."""
    if not chat_template:
        return None
    found = []
    if "<tool_call>" in chat_template:
        found.append(HermesToolParser)
    if "[TOOL_CALLS]" in chat_template:
        found.append(MistralToolParser)
    if "<|python_tag|>" in chat_template or (
        '"parameters": ' in chat_template and "<|eom_id|>" in chat_template
    ):
        found.append(Llama3JsonToolParser)
    return found[0] if len(found) == 1 else None


def resolve_tool_parser(setting: str, chat_template: str | None) -> type[ToolParser] | None:
    """The parser a server uses: the one `setting` names, the detected one for "auto", none for
    "none" (or "auto" with a template that names no family)."""
    if setting == NONE:
        return None
    if setting == AUTO:
        return detect_tool_parser(chat_template)
    return get_tool_parser(setting)


__all__ = [
    "ALIASES",
    "AUTO",
    "NONE",
    "TOOL_PARSERS",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "ParseDelta",
    "ParsedToolCall",
    "ToolCallDelta",
    "ToolParser",
    "detect_tool_parser",
    "get_tool_parser",
    "resolve_tool_parser",
]

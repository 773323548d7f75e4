"""Responses API tools -> the chat API's tool calling (`serving.tools`), which does the real work.

Responses tools are flat (`{"type": "function", "name", "description", "parameters", "strict"}`) and a
named `tool_choice` is `{"type": "function", "name": ...}`; both are rewritten to the chat forms and
checked by `ToolCalling.from_request`, with errors naming the Responses parameter. Hosted tools
(`web_search`, `file_search`, `code_interpreter`, MCP, ...) are a 400 naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helix_server.api.errors import APIError, bad_request
from helix_server.api.serving.tools import ToolCalling

_FUNCTION_KEYS = {"type", "name", "description", "parameters", "strict"}


@dataclass
class ChatToolFields:
    """The tool fields of a chat request, as `ToolCalling.from_request` reads them."""

    tools: list[dict[str, Any]] | None
    tool_choice: Any
    parallel_tool_calls: bool | None


def chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Flat function tools -> chat `{"type": "function", "function": {...}}` tools."""
    if tools is None:
        return None
    converted = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise bad_request(
                f"Tools of type {kind!r} are not supported (hosted tools such as web_search and "
                "file_search are not available on this server); only 'function' tools are.",
                f"{where}.type",
            )
        extra = sorted(set(tool) - _FUNCTION_KEYS)
        if extra:
            raise bad_request(f"Unrecognized field of a function tool: {extra[0]}", f"{where}.{extra[0]}")
        function = {key: value for key, value in tool.items() if key in ("name", "description", "parameters")}
        if function.get("parameters") is None:
            function.pop("parameters", None)
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: Any) -> Any:
    """`{"type": "function", "name": N}` -> the chat form; strings as they are; others a 400."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) <= {"type", "name"}:
        return {"type": "function", "function": {"name": choice.get("name")}}
    kind = choice.get("type") if isinstance(choice, dict) else None
    raise bad_request(
        f"tool_choice must be 'none', 'auto', 'required' or {{\"type\": \"function\", \"name\": ...}}; "
        f"{kind!r} choices are not supported.",
        "tool_choice",
    )


def tool_calling(
    tools: list[Any] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    parser_setting: str,
    auto_enabled: bool,
    chat_template: str | None,
) -> ToolCalling | None:
    """The request's tool-calling setup (None when it asks for no calls), checked as chat's is."""
    fields = ChatToolFields(chat_tools(tools), chat_tool_choice(tool_choice), parallel_tool_calls)
    try:
        return ToolCalling.from_request(fields, parser_setting, auto_enabled, chat_template)
    except APIError as exc:
        if exc.param and ".function." in exc.param:  # chat's nesting -> the flat Responses names
            exc.param = exc.param.replace(".function.", ".")
            exc.message = exc.message.replace(".function.", ".")
        raise

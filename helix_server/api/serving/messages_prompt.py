"""An Anthropic Messages request as the chat completions request it stands for.

`system` becomes a system message; `tool_result` blocks become `tool` messages (before the user's
text of that turn); an assistant's `tool_use` blocks become its `tool_calls`; tools with an
`input_schema` become function tools; `tool_choice` auto / any / tool / none becomes auto /
required / a named function / none. From there the chat path renders the prompt, builds the
sampling parameters and parses tool calls. Everything that can't be translated faithfully is a 400
naming the field (`messages[2].content[0].type`).
"""

from __future__ import annotations

import json
from typing import Any

from helix_server.api.errors import bad_request
from helix_server.api.protocol.anthropic import AnthropicMessage, CountTokensRequest, MessagesRequest
from helix_server.api.protocol.chat import ChatCompletionRequest, ChatMessage

# Block fields that change nothing here (prompt caching is automatic; the others are echoed back).
_IGNORED = {"cache_control", "citations", "caller", "toolset_name"}
_BLOCK_FIELDS = {
    "text": {"type", "text"},
    "tool_use": {"type", "id", "name", "input"},
    "tool_result": {"type", "tool_use_id", "content", "is_error"},
}
# Tool fields accepted and ignored (`strict`: calls forced by tool_choice any/tool always match
# the schema; calls the model writes under auto are parsed, not constrained).
_IGNORED_TOOL_FIELDS = {"cache_control", "strict", "eager_input_streaming", "input_examples"}
_TOOL_CHOICE = (
    'tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} '
    'or {"type": "tool", "name": ...}.'
)


def chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat completions request of `body` (sampling fields too when it is a `MessagesRequest`)."""
    if not body.messages:
        raise bad_request("messages must contain at least one message.", "messages")
    messages = [*_system(body.system), *[m for i, msg in enumerate(body.messages) for m in _turn(msg, i)]]
    tool_choice, parallel = _tool_choice(body.tool_choice)
    if tool_choice not in (None, "auto", "none") and not body.tools:
        raise bad_request(f"tool_choice {body.tool_choice['type']!r} needs tools.", "tool_choice")
    request = ChatCompletionRequest(
        model=body.model,
        messages=messages,
        tools=_tools(body.tools),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
    )
    if isinstance(body, MessagesRequest):
        request.max_tokens = body.max_tokens
        request.stop = body.stop_sequences
        request.temperature = body.temperature
        request.top_p = body.top_p
        request.top_k = body.top_k
        request.stream = body.stream
        request.response_format = _response_format(body.output_config)
        if request.response_format is not None and tool_choice not in (None, "auto", "none"):
            raise bad_request(
                "output_config.format can't be combined with tool_choice any or tool (both constrain the "
                "output).",
                "output_config.format",
            )
    return request


def _response_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's `response_format` for `output_config.format` (a JSON schema), or None."""
    if config is None:
        return None
    extra = set(config) - {"format", "effort"}
    if extra:
        raise bad_request(f"Unrecognized output_config field: {min(extra)}.", f"output_config.{min(extra)}")
    output_format = config.get("format")
    if output_format is None:
        return None
    if (
        not isinstance(output_format, dict)
        or output_format.get("type") != "json_schema"
        or not isinstance(output_format.get("schema"), dict)
        or set(output_format) - {"type", "schema"}
    ):
        raise bad_request(
            'output_config.format must be {"type": "json_schema", "schema": {...}}.', "output_config.format"
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": output_format["schema"]}}


def _system(system: str | list[Any] | None) -> list[ChatMessage]:
    if system is None:
        return []
    text = system if isinstance(system, str) else _texts(system, "system")
    return [ChatMessage(role="system", content=text)]


def _texts(blocks: list[Any], where: str) -> str:
    """The text of a list of text blocks (joined by newlines)."""
    return "\n".join(_block(block, f"{where}[{j}]", ("text",))["text"] for j, block in enumerate(blocks))


def _block(block: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """`block` checked: an object of an allowed type with that type's fields."""
    if not isinstance(block, dict):
        raise bad_request("Each content block must be an object.", where)
    kind = block.get("type")
    if kind not in allowed:
        raise bad_request(
            f"Content blocks of type {kind!r} are not supported here; this server accepts "
            f"{', '.join(allowed)} blocks.",
            f"{where}.type",
        )
    extra = set(block) - _BLOCK_FIELDS[kind] - _IGNORED
    if extra:
        raise bad_request(f"Unrecognized field in a {kind} block: {min(extra)}.", f"{where}.{min(extra)}")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise bad_request("A text block needs a string 'text'.", f"{where}.text")
    return block


def _turn(message: AnthropicMessage, i: int) -> list[ChatMessage]:
    """The chat messages of one turn."""
    where = f"messages[{i}]"
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    where = f"{where}.content"
    if message.role == "assistant":
        return [_assistant(message.content, where)]
    results, texts = [], []
    for j, raw in enumerate(message.content):
        block = _block(raw, f"{where}[{j}]", ("text", "tool_result"))
        if block["type"] == "text":
            texts.append(block["text"])
        else:
            results.append(_tool_result(block, f"{where}[{j}]"))
    return results + ([ChatMessage(role="user", content="\n".join(texts))] if texts or not results else [])


def _assistant(blocks: list[Any], where: str) -> ChatMessage:
    texts, calls = [], []
    for j, raw in enumerate(blocks):
        block = _block(raw, f"{where}[{j}]", ("text", "tool_use"))
        if block["type"] == "text":
            texts.append(block["text"])
            continue
        call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
        if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
            raise bad_request(
                "A tool_use block needs a string id and name and an object input.", f"{where}[{j}]"
            )
        function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
        calls.append({"id": call_id, "type": "function", "function": function})
    content = "\n".join(texts) if texts or not calls else None
    return ChatMessage(role="assistant", content=content, tool_calls=calls or None)


def _tool_result(block: dict[str, Any], where: str) -> ChatMessage:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise bad_request("A tool_result block needs a string tool_use_id.", f"{where}.tool_use_id")
    content = block.get("content", "")
    if isinstance(content, list):
        content = _texts(content, f"{where}.content")
    elif not isinstance(content, str):
        raise bad_request(
            "tool_result content must be a string or a list of text blocks.", f"{where}.content"
        )
    if block.get("is_error") is not None and not isinstance(block["is_error"], bool):
        raise bad_request("is_error must be a boolean.", f"{where}.is_error")
    return ChatMessage(role="tool", content=content, tool_call_id=call_id)


def _tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Anthropic's client tools as OpenAI function tools (server tools are refused)."""
    if tools is None:
        return None
    functions = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request("Each tool must be an object.", where)
        if tool.get("type", "custom") != "custom":
            raise bad_request(
                f"Tools of type {tool['type']!r} (server tools) are not supported; only client tools "
                "with an input_schema are.",
                f"{where}.type",
            )
        extra = set(tool) - {"type", "name", "description", "input_schema"} - _IGNORED_TOOL_FIELDS
        if extra:
            raise bad_request(f"Unrecognized tool field: {min(extra)}.", f"{where}.{min(extra)}")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise bad_request("A tool needs a name of 1 to 64 characters.", f"{where}.name")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise bad_request("input_schema must be a JSON Schema of type 'object'.", f"{where}.input_schema")
        function = {"name": name}  # in OpenAI's key order: the template writes keys as given
        if "description" in tool:
            if not isinstance(tool["description"], str):
                raise bad_request("description must be a string.", f"{where}.description")
            function["description"] = tool["description"]
        function["parameters"] = schema
        functions.append({"type": "function", "function": function})
    return functions


def _tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """(OpenAI's tool_choice, parallel_tool_calls) of Anthropic's `tool_choice`."""
    if choice is None:
        return None, None
    if not isinstance(choice, dict):
        raise bad_request(_TOOL_CHOICE, "tool_choice")
    kind = choice.get("type")
    allowed = {"type", "disable_parallel_tool_use"} | ({"name"} if kind == "tool" else set())
    extra = set(choice) - allowed
    if kind not in ("auto", "any", "tool", "none") or extra:
        raise bad_request(_TOOL_CHOICE, "tool_choice")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None and not isinstance(disable, bool):
        raise bad_request(
            "disable_parallel_tool_use must be a boolean.", "tool_choice.disable_parallel_tool_use"
        )
    parallel = None if disable is None else not disable
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise bad_request("tool_choice of type 'tool' needs the tool's name.", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel

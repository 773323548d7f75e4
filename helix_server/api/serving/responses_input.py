"""Responses API input -> chat messages, rendered by the chat template as chat completions' are.

`input` is a string (one user message) or a list of items:
- `message` (the `type` may be left out): a role and a string or a list of `input_text` /
  `output_text` parts;
- `function_call` (an earlier call of the model): joins the assistant message before it, as a chat
  `tool_calls` entry;
- `function_call_output`: a `tool` message answering `call_id`.
Anything else (reasoning items, images, files, item references) is a 400 naming the item or part.
"""

from __future__ import annotations

from typing import Any

from helix_server.api.errors import bad_request
from helix_server.api.protocol.chat import ChatMessage
from helix_server.api.protocol.responses import FunctionCallItem, OutputItem, OutputMessage

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
# Fields an item may carry that change nothing here (echoed back from earlier responses).
_ITEM_KEYS = {
    "message": {"type", "role", "content", "id", "status", "phase"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status", "namespace"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
}


def input_messages(value: str | list[Any]) -> list[ChatMessage]:
    """The chat messages of a request's `input`."""
    if isinstance(value, str):
        if not value:
            raise bad_request("input is empty.", "input")
        return [ChatMessage(role="user", content=value)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request("Each input item must be an object.", where)
        kind = item.get("type", "message")
        if kind not in _ITEM_KEYS:
            raise bad_request(
                f"Input items of type {kind!r} are not supported; use 'message', 'function_call' or "
                "'function_call_output'.",
                f"{where}.type",
            )
        extra = sorted(set(item) - _ITEM_KEYS[kind])
        if extra:
            raise bad_request(f"Unrecognized field of a {kind} item: {extra[0]}", f"{where}.{extra[0]}")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            _add_call(messages, item, where)
        else:
            messages.append(
                ChatMessage(role="tool", content=_output(item, where), tool_call_id=_call_id(item, where))
            )
    if not messages:
        raise bad_request("input must contain at least one item.", "input")
    return messages


def output_messages(items: list[OutputItem]) -> list[ChatMessage]:
    """A response's output items as the assistant turn that follows its input (for
    `previous_response_id`)."""
    messages: list[ChatMessage] = []
    for item in items:
        if isinstance(item, OutputMessage):
            messages.append(ChatMessage(role="assistant", content="".join(p.text for p in item.content)))
        elif isinstance(item, FunctionCallItem):
            call = {"call_id": item.call_id, "name": item.name, "arguments": item.arguments}
            _add_call(messages, call, "output")
    return messages


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(f"role must be one of {', '.join(_ROLES)}.", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return ChatMessage(role=role, content=content)
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of content parts.", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise bad_request(
                f"Content parts of type {kind!r} are not supported; only input_text and output_text are.",
                f"{part_where}.type",
            )
        if not isinstance(part.get("text"), str):
            raise bad_request("A text part needs a string 'text'.", f"{part_where}.text")
        texts.append(part["text"])
    return ChatMessage(role=role, content="".join(texts))


def _call_id(item: dict[str, Any], where: str) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request("call_id must be a non-empty string.", f"{where}.call_id")
    return call_id


def _add_call(messages: list[ChatMessage], item: dict[str, Any], where: str) -> None:
    """Append a chat tool call to the assistant message before it (or to a new one)."""
    call_id = _call_id(item, where)
    name, arguments = item.get("name"), item.get("arguments")
    if not isinstance(name, str) or not name:
        raise bad_request("name must be a non-empty string.", f"{where}.name")
    if not isinstance(arguments, str):
        raise bad_request("arguments must be a string of JSON.", f"{where}.arguments")
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        last.tool_calls = [*(last.tool_calls or []), call]
    else:
        messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))


def _output(item: dict[str, Any], where: str) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    parts = output if isinstance(output, list) else [None]
    if all(
        isinstance(p, dict) and p.get("type") in _TEXT_PARTS and isinstance(p.get("text"), str) for p in parts
    ):
        return "".join(p["text"] for p in parts)
    raise bad_request("output must be a string or a list of input_text parts.", f"{where}.output")

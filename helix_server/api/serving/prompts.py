"""Prompts from the wire: completion prompts (text or token ids, one or many) and chat messages.

Text is tokenized here with the engine's loop-side tokenizer (large inputs in its worker thread).
Empty prompts and malformed token lists are 400s naming `prompt`; the engine re-checks ids and
lengths on entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helix_server.api.errors import bad_request
from helix_server.api.protocol.chat import ChatMessage
from helix_server.engine.tokenizer import Tokenizer


@dataclass
class Prompt:
    """A prompt's token ids, and its text when the client sent text."""

    token_ids: list[int]
    text: str | None = None


async def completion_prompts(prompt: str | list[Any], tokenizer: Tokenizer) -> list[Prompt]:
    """One `Prompt` per prompt of a completions request (string, strings, ids, or lists of ids)."""
    if isinstance(prompt, str):
        return [await _text_prompt(prompt, tokenizer, "prompt")]
    if not prompt:
        raise bad_request("The prompt is empty.", "prompt")
    if all(isinstance(item, str) for item in prompt):
        return [await _text_prompt(item, tokenizer, "prompt") for item in prompt]
    if all(_is_int(item) for item in prompt):
        return [Prompt(list(prompt))]
    if all(isinstance(item, list) for item in prompt):
        prompts = []
        for item in prompt:
            if not item:
                raise bad_request("The prompt is empty.", "prompt")
            if not all(_is_int(token) for token in item):
                raise bad_request("A token-id prompt must be a list of integers.", "prompt")
            prompts.append(Prompt(list(item)))
        return prompts
    raise bad_request(
        "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists.",
        "prompt",
    )


async def _text_prompt(text: str, tokenizer: Tokenizer, param: str) -> Prompt:
    if not text:
        raise bad_request("The prompt is empty.", param)
    token_ids = await tokenizer.encode_async(text)
    if not token_ids:
        raise bad_request("The prompt is empty after tokenization (it has no tokens).", param)
    return Prompt(token_ids, text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them; refuses what we can't render faithfully."""
    if not messages:
        raise bad_request("messages must contain at least one message.", "messages")
    rendered = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.audio is not None:
            raise bad_request("Audio messages are not supported by this server.", f"{where}.audio")
        if message.function_call is not None:
            raise bad_request("function_call is not supported by this server.", f"{where}.function_call")
        # OpenAI's "developer" is the newer name of "system"; chat templates know only the latter.
        role = "system" if message.role == "developer" else message.role
        item: dict[str, Any] = {"role": role, "content": _content_text(message, where)}
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise bad_request(f"{where}.content is required for role '{message.role}'.", f"{where}.content")
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            if message.role != "assistant":
                raise bad_request("Only assistant messages may have tool_calls.", f"{where}.tool_calls")
            item["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    return rendered


def _content_text(message: ChatMessage, where: str) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad_request("Each content part must be an object.", part_where)
        kind = part.get("type")
        if kind != "text":
            raise bad_request(
                f"Content parts of type {kind!r} are not supported; only 'text' parts are.",
                f"{part_where}.type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request("A text content part needs a string 'text'.", f"{part_where}.text")
        extra = set(part) - {"type", "text"}
        if extra:
            raise bad_request(f"Unrecognized content part field: {min(extra)}", part_where)
        texts.append(text)
    return "\n".join(texts)


def reply_role(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    """The role of the reply (vLLM's): a new assistant message, or else the last message's role."""
    return "assistant" if add_generation_prompt else messages[-1].role


def echo_text(messages: list[ChatMessage], role: str) -> str:
    """vLLM's chat `echo`: the last message's text when it has the reply's `role`, else ""."""
    last = messages[-1]
    if last.role != role:
        return ""
    return _content_text(last, f"messages[{len(messages) - 1}]") or ""


def check_generation_prompt(add_generation_prompt: bool, continue_final_message: bool) -> None:
    """vLLM's rule: a prompt either opens a new assistant message or continues the last one."""
    if add_generation_prompt and continue_final_message:
        raise bad_request(
            "Cannot set both continue_final_message and add_generation_prompt to true "
            "(set add_generation_prompt to false to continue the final message).",
            "continue_final_message",
        )


async def chat_prompt(
    messages: list[ChatMessage],
    tokenizer: Tokenizer,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> Prompt:
    """The token ids of `messages` rendered with the model's chat template; with
    `continue_final_message` the last message is left open (no end-of-turn) for the model to go on.
    `tools` (OpenAI function tools) reach the template as its `tools` variable."""
    check_generation_prompt(add_generation_prompt, continue_final_message)
    conversation = chat_template_messages(messages)
    switches: dict[str, Any] = {"continue_final_message": True} if continue_final_message else {}
    if tools:
        switches["tools"] = tools
    # Off the event loop when large; control tokens in the messages' text stay plain text.
    text, token_ids = await tokenizer.encode_chat_async(conversation, add_generation_prompt, **switches)
    if not token_ids:
        raise bad_request("The rendered chat prompt has no tokens.", "messages")
    return Prompt(token_ids, text)

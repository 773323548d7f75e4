"""`POST /v1/messages` and `/v1/messages/count_tokens` (Anthropic's Messages API): the requests.

Content blocks, tools and `tool_choice` arrive as plain JSON and are checked (with errors naming
the block, e.g. `messages[1].content[0].type`) in `serving.messages_prompt`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class AnthropicMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One turn: a string, or a list of `text`, `tool_use` (assistant) and `tool_result` (user) blocks."""

    role: Literal["user", "assistant"]
    content: str | list[Any]


class CountTokensRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What `count_tokens` reads: the prompt as `/v1/messages` would render it (system, messages, tools)."""

    model: str
    messages: list[AnthropicMessage]
    system: str | list[Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    # Accepted and ignored: this server produces no thinking blocks (see docs/messages-api.md).
    thinking: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest, kw_only=True, forbid_unknown_fields=True):
    """A Messages request. `max_tokens` is required, as in Anthropic's API."""

    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    # `format`: {"type": "json_schema", "schema": {...}} constrains the text to the schema;
    # `effort` is accepted and ignored (a reasoning knob this server doesn't have).
    output_config: dict[str, Any] | None = None
    # Fields that change nothing in the output: accepted and ignored (prompt caching is automatic).
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    speed: str | None = None
    inference_geo: str | None = None

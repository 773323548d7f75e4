"""`POST /v1/responses` (OpenAI's Responses API): the request, the response object and its items.

The request shares the sampling fields of chat completions (vLLM's extensions included); `input` is
a string or a list of items (checked in `serving.responses_input`), `text.format` asks for structured
output and `tools` are flat function tools (checked in `serving.responses_tools`).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from helix_server.api.protocol.sampling import SamplingFields


class ResponsesRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """A Responses API request. `store` (default true, as OpenAI's) keeps the response for
    `previous_response_id` and `GET /v1/responses/{id}` in the server's bounded store."""

    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    # {"format": {"type": "text" | "json_object" | "json_schema", ...}, "verbosity": ...}
    text: dict[str, Any] | None = None
    # Accepted when they ask for nothing this server lacks (checked in `serving.responses`).
    include: list[str] | None = None
    truncation: str | None = None
    top_logprobs: int | None = None
    reasoning: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    prompt_cache_retention: str | None = None
    # Codex CLI's request tags; they change nothing.
    client_metadata: dict[str, str] | None = None
    # Not supported: refused when set.
    background: bool | None = None
    conversation: Any | None = None
    prompt: Any | None = None
    context_management: Any | None = None


class OutputText(msgspec.Struct, tag="output_text", tag_field="type"):
    """A text part of an assistant message."""

    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(msgspec.Struct, tag="message", tag_field="type"):
    """An assistant message item."""

    id: str
    status: ItemStatus
    content: list[OutputText]
    role: str = "assistant"


class FunctionCallItem(msgspec.Struct, tag="function_call", tag_field="type"):
    """A function-call item: `arguments` is JSON text, `call_id` links its `function_call_output`."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    """Prompt tokens whose KV came from the prefix cache."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    """No reasoning tokens: this server has no reasoning items."""

    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    """Token counts of one response."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class IncompleteDetails(msgspec.Struct):
    """Why a response stopped early: `max_output_tokens`."""

    reason: str


class ResponseError(msgspec.Struct):
    """Why a response failed."""

    code: str
    message: str


class ResponseObject(msgspec.Struct, kw_only=True):
    """The `response` object: the request's settings echoed, the output items, usage and status."""

    id: str
    created_at: int
    model: str
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    output: list[OutputItem]
    object: str = "response"
    output_text: str = ""
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    completed_at: int | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = msgspec.field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[Any] = msgspec.field(default_factory=list)
    truncation: str = "disabled"
    reasoning: Any | None = None
    user: str | None = None
    background: bool = False


class DeletedResponse(msgspec.Struct):
    """The body of `DELETE /v1/responses/{id}`."""

    id: str
    object: str = "response"
    deleted: bool = True

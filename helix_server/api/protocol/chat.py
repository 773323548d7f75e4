"""`POST /v1/chat/completions`: messages, the request, the response, the stream chunks, logprobs."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from helix_server.api.protocol.common import PromptLogprobs, UsageInfo
from helix_server.api.protocol.sampling import SamplingFields

Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One message. `content` is a string or a list of parts; only `{"type": "text"}` parts are
    supported (checked in `serving.chat_prompt`). Assistant `tool_calls` and tool `tool_call_id`
    from earlier turns reach the chat template as they are."""

    role: Role
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # Echoed back by clients from earlier responses; they change nothing.
    refusal: str | None = None
    annotations: list[Any] | None = None
    # Not supported: refused when set.
    audio: Any | None = None
    function_call: Any | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """A chat completions request.

    `max_completion_tokens` is preferred over the older `max_tokens`; without either the completion
    may use the rest of the context. `logprobs: true` plus `top_logprobs` N (0-20) return chat logprobs.
    """

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # vLLM's chat extensions: `echo` starts the reply with the last message's content when that
    # message has the reply's role; `continue_final_message` (needs `add_generation_prompt: false`)
    # leaves the last message open so the model continues it.
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    # Function tools; tool_choice "none" | "auto" | "required" | {"type": "function", ...}
    # (checked in `serving.tools`).
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    # Accepted when it asks for text output; refused otherwise.
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    # Not supported yet: refused when set.
    functions: list[Any] | None = None
    function_call: Any | None = None
    audio: Any | None = None
    prediction: Any | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any | None = None


class ChatTopLogprob(msgspec.Struct):
    """One alternative token: its text, log-probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    """The chosen token and its `top_logprobs` alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(msgspec.Struct):
    """`choices[i].logprobs` of the chat API."""

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class FunctionCall(msgspec.Struct):
    """The function a tool call calls: its name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    """One tool call of an answer."""

    id: str
    function: FunctionCall
    type: str = "function"


class DeltaFunctionCall(msgspec.Struct):
    """A streamed piece of a call's function: the name once, then pieces of the arguments."""

    name: str | msgspec.UnsetType = msgspec.UNSET
    arguments: str | msgspec.UnsetType = msgspec.UNSET


class DeltaToolCall(msgspec.Struct):
    """A streamed piece of tool call `index`: `id`, `type` and the name come in its first piece."""

    index: int
    function: DeltaFunctionCall
    id: str | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET


class ChatResponseMessage(msgspec.Struct):
    """The assistant's answer (`content` null when it is only tool calls)."""

    content: str | None
    role: str = "assistant"
    refusal: str | None = None
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct):
    """One answer of a non-streaming response."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET


class ChatCompletionResponse(msgspec.Struct):
    """The non-streaming response (vLLM's `prompt_logprobs` and `prompt_token_ids` when asked for)."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    object: str = "chat.completion"
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | msgspec.UnsetType = msgspec.UNSET
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET


class ChatDelta(msgspec.Struct):
    """What a chunk adds to a choice (fields left unset are left out of the JSON)."""

    role: str | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[DeltaToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChatStreamChoice(msgspec.Struct):
    """One choice's part of a streamed chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET


class ChatCompletionChunk(msgspec.Struct):
    """One `data:` event of a streamed chat completion (`usage` only with `include_usage`;
    `prompt_token_ids` only in the first chunk, with `return_token_ids`)."""

    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: UsageInfo | None | msgspec.UnsetType = msgspec.UNSET
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET

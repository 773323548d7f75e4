"""`POST /v1/completions`: the request, the response, the stream chunks and legacy logprobs."""

from __future__ import annotations

from typing import Any

import msgspec

from helix_server.api.protocol.common import PromptLogprobs, UsageInfo
from helix_server.api.protocol.sampling import SamplingFields


class CompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """A completions request.

    `prompt` is a string, a list of strings, a list of token ids, or a list of token-id lists.
    `max_tokens` defaults to 16; null means "the rest of the context". `logprobs` N (0-20) returns the
    legacy logprobs object; `echo` prepends the prompt (and its logprobs).
    """

    prompt: str | list[Any]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    # Structured outputs, as on chat: {"type": "json_object"} or {"type": "json_schema", ...}.
    response_format: dict[str, Any] | None = None
    # Not supported yet: refused when set (suffix) or > 1 (best_of).
    suffix: str | None = None
    best_of: int | None = None


class CompletionLogprobs(msgspec.Struct):
    """OpenAI's legacy logprobs: parallel lists over the returned tokens."""

    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(msgspec.Struct):
    """One completion; `stop_reason` is the stop string or token id that ended it.

    vLLM's extras, left out unless asked for: `prompt_logprobs`, and with `return_token_ids` the
    `prompt_token_ids` (in a stream: in each choice's first chunk) and `token_ids` (a stream's delta).
    """

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | msgspec.UnsetType = msgspec.UNSET
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET


class CompletionResponse(msgspec.Struct):
    """The non-streaming response."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    object: str = "text_completion"
    system_fingerprint: str | None = None


class CompletionStreamResponse(msgspec.Struct):
    """One `data:` event of a streamed completion (`usage` only with `include_usage`)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    system_fingerprint: str | None = None
    usage: UsageInfo | None | msgspec.UnsetType = msgspec.UNSET

"""`POST /tokenize` and `POST /detokenize`."""

from __future__ import annotations

import msgspec

from helix_server.api.protocol.chat import ChatMessage


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Either `prompt` (text) or `messages` (rendered with the chat template), not both.

    For `messages`, `add_generation_prompt` and `continue_final_message` mean what they mean in a
    chat request; `return_token_strs` adds each token's vocabulary string (vLLM's `token_strs`).
    """

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class TokenizeResponse(msgspec.Struct):
    """The token ids, how many, the model's context length, and `token_strs` when asked for."""

    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | msgspec.UnsetType = msgspec.UNSET


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Token ids to turn back into text."""

    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(msgspec.Struct):
    """The text of the tokens."""

    prompt: str

"""`POST /tokenize` and `POST /detokenize` with the served model's tokenizer."""

from __future__ import annotations

import asyncio

from litestar import Controller, Request, post

from helix_server.api.body import read_json
from helix_server.api.errors import bad_request
from helix_server.api.openapi import documented_body
from helix_server.api.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from helix_server.api.serving.prompts import chat_prompt
from helix_server.api.state import get_state
from helix_server.engine.tokenizer import Tokenizer

# Above this many tokens, `token_strs` are looked up in a thread (about 1 us each), not on the loop.
INLINE_TOKEN_STRS = 16384


async def token_strs(tokenizer: Tokenizer, tokens: list[int]) -> list[str]:
    """Each token's vocabulary string (vLLM's `token_strs`), off the event loop for long inputs."""
    if len(tokens) <= INLINE_TOKEN_STRS:
        return [tokenizer.id_to_token(token_id) for token_id in tokens]
    return await asyncio.to_thread(lambda: [tokenizer.id_to_token(token_id) for token_id in tokens])


class TokenizeController(Controller):
    """Text (or a conversation) to token ids and back."""

    tags = ("Tokenizer",)

    @post("/tokenize", status_code=200, operation_class=documented_body(TokenizeRequest))
    async def tokenize(self, request: Request) -> TokenizeResponse:
        """`{prompt}` or `{messages}` -> `{tokens, count, max_model_len}` (and `token_strs` when asked)."""
        body = await read_json(request, TokenizeRequest)
        state = get_state(request)
        state.check_model(body.model)
        tokenizer = state.engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("Send exactly one of 'prompt' and 'messages'.", "prompt")
        if body.messages is not None:
            prompt = await chat_prompt(
                body.messages, tokenizer, body.add_generation_prompt, body.continue_final_message
            )
            tokens = prompt.token_ids
        else:
            if body.continue_final_message:
                message = "continue_final_message applies to messages only."
                raise bad_request(message, "continue_final_message")
            add_special_tokens = body.add_special_tokens
            tokens = await tokenizer.encode_async(body.prompt, add_special_tokens=add_special_tokens)
        response = TokenizeResponse(tokens, len(tokens), state.engine.seq_num_tokens_limit)
        if body.return_token_strs:
            response.token_strs = await token_strs(tokenizer, tokens)
        return response

    @post("/detokenize", status_code=200, operation_class=documented_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> DetokenizeResponse:
        """`{tokens}` -> `{prompt}`; ids outside the vocabulary are a 400."""
        body = await read_json(request, DetokenizeRequest)
        state = get_state(request)
        state.check_model(body.model)
        vocab_size = state.engine.runtime.vocab_size
        for token_id in body.tokens:
            if not 0 <= token_id < vocab_size:
                raise bad_request(
                    f"Token id {token_id} is outside the vocabulary [0, {vocab_size}).", "tokens"
                )
        return DetokenizeResponse(await state.engine.tokenizer.decode_async(body.tokens))

"""`POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API on the chat path.

The request is translated into the chat completions request it stands for (`messages_prompt`),
which renders the prompt with the chat template and tools, builds `SamplingParams` and sets up tool
parsing exactly as `/v1/chat/completions` does; the engine's outputs come back as Anthropic content
blocks (`messages_blocks`), whole or as Anthropic's stream events. Admission, disconnect-abort and
metrics are the shared `respond` / `Generation` path.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator

from litestar import Request, Response

from helix_server.api.errors import server_error, stream_error
from helix_server.api.protocol.anthropic import CountTokensRequest, MessagesRequest
from helix_server.api.protocol.anthropic_events import (
    Message,
    MessageDelta,
    MessageStart,
    MessageStop,
    MessageUsage,
    OutputUsage,
    Ping,
    StopDelta,
    TokenCount,
    named_event,
)
from helix_server.api.protocol.chat import ChatCompletionRequest
from helix_server.api.serving.accumulate import ResultAccumulator
from helix_server.api.serving.generation import Generation
from helix_server.api.serving.messages_blocks import ContentBlocks
from helix_server.api.serving.messages_errors import anthropic_error
from helix_server.api.serving.messages_prompt import chat_request
from helix_server.api.serving.params import build_sampling_params
from helix_server.api.serving.prompts import Prompt, chat_prompt
from helix_server.api.serving.respond import respond
from helix_server.api.serving.tools import ToolCalling
from helix_server.api.serving.usage import UsageCounter
from helix_server.api.state import ServerState


async def render(
    state: ServerState, body: CountTokensRequest
) -> tuple[ChatCompletionRequest, Prompt, ToolCalling | None]:
    """The chat request of `body`, its prompt (chat template with the offered tools), its tool setup."""
    state.check_model(body.model)
    chat = chat_request(body)
    server = state.config.server
    tokenizer = state.engine.tokenizer
    tools = ToolCalling.from_request(
        chat, server.tool_call_parser, server.enable_auto_tool_choice, tokenizer.chat_template
    )
    # Prefill: a last assistant message is continued, not answered (the reply holds only the new text).
    prefill = body.messages[-1].role == "assistant"
    prompt = await chat_prompt(
        chat.messages,
        tokenizer,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        tools=tools.tools if tools is not None else None,
    )
    return chat, prompt, tools


async def count_message_tokens(state: ServerState, body: CountTokensRequest) -> TokenCount:
    """The prompt tokens `/v1/messages` would send to the model for `body`."""
    _, prompt, _ = await render(state, body)
    return TokenCount(len(prompt.token_ids))


def stop_reason(
    finish_reason: str | None, stopped_by: int | str | None, has_calls: bool
) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for how the engine ended the answer."""
    if finish_reason == "length":
        return "max_tokens", None
    if has_calls:
        return "tool_use", None
    if isinstance(stopped_by, str):
        return "stop_sequence", stopped_by
    return "end_turn", None


class MessagesService:
    """Turns one `MessagesRequest` into an engine request and an Anthropic message or stream."""

    def __init__(self, state: ServerState, body: MessagesRequest) -> None:
        self.state = state
        self.body = body
        self.request_id = f"msg_{uuid.uuid4().hex[:24]}"

    async def create(self, request: Request) -> Response:
        """Validate, render the chat template, queue, and answer (streamed when `stream` is true)."""
        chat, prompt, self.tools = await render(self.state, self.body)
        params = build_sampling_params(chat, max_tokens=self.body.max_tokens)
        if self.tools is not None:
            self.tools.configure(params, self.state.engine.tokenizer)
        self.prompt_token_ids = prompt.token_ids

        def start():
            return Generation.start(self.state, self.request_id, [prompt.token_ids], params, "messages")

        return await respond(
            self.state, request, start, stream=self.body.stream, events=self._events, collect=self._collect
        )

    def _message(self, blocks, usage: MessageUsage, reason: tuple[str | None, str | None]) -> Message:
        return Message(self.request_id, self.state.model_name, blocks, usage, *reason)

    async def _collect(self, generation: Generation) -> Response:
        results = ResultAccumulator([self.prompt_token_ids], 1)
        async for index, output in generation.outputs():
            results.add(index, output)
        results.raise_if_failed()
        seq = results.results[0].sequences[0]
        blocks = ContentBlocks(self.tools)
        blocks.feed(seq.text, final=True)
        usage = MessageUsage(len(self.prompt_token_ids), len(seq.token_ids))
        reason = stop_reason(seq.finish_reason, seq.stop_reason, blocks.called_tools)
        return Response(content=self._message(blocks.content(), usage, reason), status_code=200)

    async def _events(self, generation: Generation) -> AsyncGenerator[bytes, None]:
        counter = UsageCounter([self.prompt_token_ids])
        blocks = ContentBlocks(self.tools)
        start = self._message([], MessageUsage(counter.prompt_tokens, 0), (None, None))
        yield named_event(MessageStart(start))
        yield named_event(Ping())
        try:
            async for _, output in generation.outputs():
                counter.add(output)
                for seq in output.outputs:
                    if seq.finish_reason == "error":
                        error = server_error(f"The request failed in the engine: {output.error}")
                        yield named_event(anthropic_error(error))
                        return
                    for event in blocks.feed(seq.text, final=seq.finish_reason is not None):
                        yield named_event(event)
                    if seq.finish_reason is not None:
                        reason = stop_reason(seq.finish_reason, seq.stop_reason, blocks.called_tools)
                        yield named_event(
                            MessageDelta(StopDelta(*reason), OutputUsage(counter.completion_tokens))
                        )
                        yield named_event(MessageStop())
        except Exception as exc:  # noqa: BLE001 - the engine's refusals, or a bug that stream_error logs
            yield named_event(anthropic_error(stream_error(exc, f"messages stream {self.request_id}")))

"""`POST /v1/chat/completions`: messages in, OpenAI chat completions (whole or streamed) out."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec
from litestar import Request, Response

from helix_server.api.errors import bad_request, server_error, stream_error
from helix_server.api.protocol.chat import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatStreamChoice,
)
from helix_server.api.serving.generation import Generation
from helix_server.api.serving.logprobs import chat_logprobs, prompt_logprobs
from helix_server.api.serving.params import (
    build_sampling_params,
    check_prompt_logprobs,
    check_stream_options,
    continuous_usage,
    reject,
)
from helix_server.api.serving.prompts import chat_prompt, echo_text, reply_role
from helix_server.api.serving.service import GenerationService
from helix_server.api.serving.tools import ToolCalling, ToolStream
from helix_server.api.serving.usage import UsageCounter
from helix_server.api.sse import DONE, error_event, sse_event
from helix_server.sampling_params import SamplingParams

# Fields that select features we do not have: refused whenever they are set.
_UNSUPPORTED = (
    "functions",
    "function_call",
    "audio",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
)


def check_chat_features(body: ChatCompletionRequest) -> None:
    """400 for any option that asks for something this server can't do (never silently ignored)."""
    for name in _UNSUPPORTED:
        if getattr(body, name) is not None:
            reject(name)
    if body.modalities is not None and any(m != "text" for m in body.modalities):
        reject("modalities", "Output modalities other than 'text'")


class ChatService(GenerationService):
    """Turns one validated `ChatCompletionRequest` into an engine request and an OpenAI response."""

    id_prefix = "chatcmpl-"
    body: ChatCompletionRequest

    def _check(self) -> tuple[SamplingParams, bool]:
        body = self.body
        self.state.check_model(body.model)
        check_chat_features(body)
        include_usage = check_stream_options(body)
        self.continuous_usage = continuous_usage(body)
        check_prompt_logprobs(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("logprobs must be true when top_logprobs is set.", "top_logprobs")
        self.top_n = (body.top_logprobs or 0) if body.logprobs else 0
        if body.max_completion_tokens is not None:
            max_tokens, max_param = body.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_param = body.max_tokens, "max_tokens"
        params = build_sampling_params(
            body,
            max_tokens=max_tokens,
            logprobs=self.top_n if body.logprobs else None,
            prompt_logprobs=body.prompt_logprobs,
            renames={"max_tokens": max_param, "logprobs": "top_logprobs"},
        )
        server = self.state.config.server
        self.tools = ToolCalling.from_request(
            body, server.tool_call_parser, server.enable_auto_tool_choice, self.tokenizer.chat_template
        )
        if self.tools is not None:
            self.tools.configure(params, self.tokenizer)
        return params, include_usage

    def _tool_streams(self) -> list[ToolStream] | None:
        return None if self.tools is None else [ToolStream(self.tools) for _ in range(self.n)]

    async def create(self, request: Request) -> Response:
        """Validate, render the chat template, queue, and answer (streamed when `stream` is true)."""
        params, include_usage = self._check()
        body = self.body
        prompt = await chat_prompt(
            body.messages,
            self.tokenizer,
            body.add_generation_prompt,
            body.continue_final_message,
            tools=self.tools.tools if self.tools is not None else None,
        )
        self.prompt_token_ids = prompt.token_ids
        self.role = reply_role(body.messages, body.add_generation_prompt)
        self.echo = echo_text(body.messages, self.role) if body.echo else ""
        self.n = params.n
        return await self.run(
            request,
            [prompt.token_ids],
            params,
            "messages",
            events=lambda g: self._events(g, include_usage),
            collect=self._collect,
        )

    async def _collect(self, generation: Generation) -> Response:
        results = await self.results(generation, self.n)
        choices = []
        streams = self._tool_streams()
        for choice_index, _, seq in results.choices():
            logprobs = chat_logprobs(self.tokenizer, seq.logprobs, self.top_n) if self.body.logprobs else None
            message = ChatResponseMessage(self.echo + seq.text, role=self.role)
            finish_reason = seq.finish_reason
            if streams is not None:  # the same parse as the stream's, over the whole text
                stream = streams[choice_index]
                content, _ = stream.feed(seq.text, final=True)
                message.content = self.echo + content if content or not stream.has_calls else None
                if stream.has_calls:
                    message.tool_calls = stream.tool_calls()
                finish_reason = stream.finish_reason(finish_reason)
            choice = ChatChoice(choice_index, message, logprobs, finish_reason, seq.stop_reason)
            if self.body.return_token_ids:
                choice.token_ids = list(seq.token_ids)
            choices.append(choice)
        response = ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=results.usage(),
        )
        if self.body.prompt_logprobs is not None:
            response.prompt_logprobs = prompt_logprobs(
                self.tokenizer, results.results[0].prompt_logprobs, self.body.prompt_logprobs
            )
        if self.body.return_token_ids:
            response.prompt_token_ids = list(self.prompt_token_ids)
        return Response(content=response, status_code=200)

    def _chunk(
        self, choices: list[ChatStreamChoice], include_usage: bool, usage=None, first: bool = False
    ) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=usage if usage is not None else (None if include_usage else msgspec.UNSET),
        )
        if first and self.body.return_token_ids:
            chunk.prompt_token_ids = list(self.prompt_token_ids)
        return sse_event(chunk)

    async def _events(self, generation: Generation, include_usage: bool) -> AsyncGenerator[bytes, None]:
        counter = UsageCounter([self.prompt_token_ids])
        streams = self._tool_streams()

        def usage():
            return counter.usage() if self.continuous_usage else None

        try:
            for index in range(self.n):
                role = ChatStreamChoice(index, ChatDelta(role=self.role, content=""))
                yield self._chunk([role], include_usage, usage(), first=index == 0)
            if self.echo:
                for index in range(self.n):
                    echoed = ChatStreamChoice(index, ChatDelta(content=self.echo))
                    yield self._chunk([echoed], include_usage, usage())
            async for _, output in generation.outputs():
                counter.add(output)
                for seq in output.outputs:
                    if seq.finish_reason == "error":
                        yield error_event(server_error(f"The request failed in the engine: {output.error}"))
                        yield DONE
                        return
                    logprobs = None
                    if self.body.logprobs and seq.logprobs:
                        logprobs = chat_logprobs(self.tokenizer, seq.logprobs, self.top_n)
                    # With return_token_ids the delta's ids ride on its content chunk, else on the finish chunk.
                    token_ids = list(seq.token_ids) if self.body.return_token_ids else msgspec.UNSET
                    text, calls, finish_reason = seq.text, [], seq.finish_reason
                    if streams is not None:  # content and tool-call deltas, no call markup
                        stream = streams[seq.index]
                        text, calls = stream.feed(seq.text, final=finish_reason is not None)
                        finish_reason = stream.finish_reason(finish_reason)
                    if text or calls or logprobs is not None or (token_ids and seq.finish_reason is None):
                        delta = ChatDelta(content=text) if text or not calls else ChatDelta(tool_calls=calls)
                        if text and calls:
                            delta.tool_calls = calls
                        content = ChatStreamChoice(seq.index, delta, logprobs, token_ids=token_ids)
                        token_ids = [] if self.body.return_token_ids else msgspec.UNSET
                        yield self._chunk([content], include_usage, usage())
                    if seq.finish_reason is not None:
                        finish = ChatStreamChoice(
                            seq.index,
                            ChatDelta(),
                            None,
                            finish_reason,
                            seq.stop_reason,
                            token_ids=token_ids,
                        )
                        yield self._chunk([finish], include_usage, usage())
            if include_usage:
                yield self._chunk([], include_usage, usage=counter.usage())
        except Exception as exc:  # noqa: BLE001 - the engine's refusals, or a bug that stream_error logs
            yield error_event(stream_error(exc, f"chat stream {self.request_id}"))
        yield DONE

"""`POST /v1/completions`: prompts in, OpenAI completions (whole or streamed) out."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec
from litestar import Request, Response

from helix_server.api.errors import server_error, stream_error
from helix_server.api.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from helix_server.api.serving.generation import Generation
from helix_server.api.serving.logprobs import LegacyLogprobsBuilder, merge_legacy, prompt_logprobs
from helix_server.api.serving.params import (
    build_sampling_params,
    check_prompt_logprobs,
    check_stream_options,
    continuous_usage,
    reject,
)
from helix_server.api.serving.prompts import Prompt, completion_prompts
from helix_server.api.serving.service import GenerationService
from helix_server.api.serving.usage import UsageCounter
from helix_server.api.sse import DONE, error_event, sse_event
from helix_server.sampling_params import SamplingParams


class CompletionService(GenerationService):
    """Turns one validated `CompletionRequest` into engine requests and an OpenAI response."""

    id_prefix = "cmpl-"
    body: CompletionRequest

    def _check(self) -> tuple[SamplingParams, bool]:
        body = self.body
        self.state.check_model(body.model)
        if body.suffix is not None:
            reject("suffix")
        if body.best_of is not None and body.best_of > 1:
            reject("best_of", "best_of greater than 1")
        include_usage = check_stream_options(body)
        self.continuous_usage = continuous_usage(body)
        check_prompt_logprobs(body)
        # The engine computes prompt logprobs once, for the echo's legacy logprobs and vLLM's field.
        wanted = [body.prompt_logprobs, body.logprobs if body.echo else None]
        engine_prompt_logprobs = max((n for n in wanted if n is not None), default=None)
        params = build_sampling_params(
            body, max_tokens=body.max_tokens, logprobs=body.logprobs, prompt_logprobs=engine_prompt_logprobs
        )
        return params, include_usage

    async def create(self, request: Request) -> Response:
        """Validate, queue, and answer (streamed when `stream` is true)."""
        params, include_usage = self._check()
        self.prompts = await completion_prompts(self.body.prompt, self.tokenizer)
        self.n = params.n
        return await self.run(
            request,
            [p.token_ids for p in self.prompts],
            params,
            "prompt",
            events=lambda g: self._events(g, include_usage),
            collect=self._collect,
        )

    # ----------------------------------------------------------------- helpers

    def _prompt_text(self, prompt: Prompt) -> str:
        """The echoed prompt: the client's text, or every token of a token-id prompt (special ones
        too, so the echoed tokens and their `text_offset`s match the text)."""
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    def _logprobs_builder(self) -> LegacyLogprobsBuilder | None:
        if self.body.logprobs is None:
            return None
        return LegacyLogprobsBuilder(self.tokenizer, self.body.logprobs, self.body.skip_special_tokens)

    # ----------------------------------------------------------------- non-streaming

    async def _collect(self, generation: Generation) -> Response:
        results = await self.results(generation, self.n)
        choices = []
        for choice_index, result, seq in results.choices():
            prompt = self.prompts[choice_index // self.n]
            echoed_text = self._prompt_text(prompt) if self.body.echo else ""
            text = echoed_text + seq.text
            builder = self._logprobs_builder()
            logprobs: CompletionLogprobs | None = None
            if builder is not None:
                logprobs = CompletionLogprobs()
                if self.body.echo:
                    prompt_lps = result.prompt_logprobs or [None] * len(prompt.token_ids)
                    merge_legacy(logprobs, builder.build(prompt_lps, prompt.token_ids, echoed_text))
                merge_legacy(logprobs, builder.build(seq.logprobs, seq.token_ids))
            choice = CompletionChoice(choice_index, text, logprobs, seq.finish_reason, seq.stop_reason)
            if self.body.prompt_logprobs is not None:
                choice.prompt_logprobs = prompt_logprobs(
                    self.tokenizer, result.prompt_logprobs, self.body.prompt_logprobs
                )
            if self.body.return_token_ids:
                choice.prompt_token_ids = list(prompt.token_ids)
                choice.token_ids = list(seq.token_ids)
            choices.append(choice)
        response = CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=results.usage(),
        )
        return Response(content=response, status_code=200)

    # ----------------------------------------------------------------- streaming

    def _chunk(self, choices: list[CompletionChoice], include_usage: bool, usage=None) -> bytes:
        chunk = CompletionStreamResponse(
            id=self.request_id,
            created=self.created,
            model=self.state.model_name,
            choices=choices,
            usage=usage if usage is not None else (None if include_usage else msgspec.UNSET),
        )
        return sse_event(chunk)

    async def _events(self, generation: Generation, include_usage: bool) -> AsyncGenerator[bytes, None]:
        counter = UsageCounter(self.prompt_ids)
        builders: dict[int, LegacyLogprobsBuilder | None] = {}
        echo_logprobs: dict[int, list] = {}
        sent_prompt_ids: set[int] = set()
        try:
            async for prompt_index, output in generation.outputs():
                counter.add(output)
                if output.prompt_logprobs is not None:
                    echo_logprobs[prompt_index] = output.prompt_logprobs
                for seq in output.outputs:
                    if seq.finish_reason == "error":
                        yield error_event(server_error(f"The request failed in the engine: {output.error}"))
                        yield DONE
                        return
                    choice_index = prompt_index * self.n + seq.index
                    text, logprobs = seq.text, None
                    first = choice_index not in builders
                    if first:
                        builders[choice_index] = self._logprobs_builder()
                    builder = builders[choice_index]
                    if builder is not None:
                        logprobs = CompletionLogprobs()
                    if first and self.body.echo:
                        prompt = self.prompts[prompt_index]
                        echoed_text = self._prompt_text(prompt)
                        text = echoed_text + text
                        if builder is not None:
                            lps = echo_logprobs.get(prompt_index) or [None] * len(prompt.token_ids)
                            merge_legacy(logprobs, builder.build(lps, prompt.token_ids, echoed_text))
                    if builder is not None:
                        merge_legacy(logprobs, builder.build(seq.logprobs or [], seq.token_ids))
                    if not text and not seq.token_ids and seq.finish_reason is None:
                        continue
                    choice = CompletionChoice(
                        choice_index, text, logprobs, seq.finish_reason, seq.stop_reason
                    )
                    if self.body.return_token_ids:
                        choice.token_ids = list(seq.token_ids)
                        if choice_index not in sent_prompt_ids:
                            sent_prompt_ids.add(choice_index)
                            choice.prompt_token_ids = list(self.prompts[prompt_index].token_ids)
                    usage = counter.usage() if self.continuous_usage else None
                    yield self._chunk([choice], include_usage, usage)
            if include_usage:
                yield self._chunk([], include_usage, usage=counter.usage())
        except Exception as exc:  # noqa: BLE001 - the engine's refusals, or a bug that stream_error logs
            yield error_event(stream_error(exc, f"completion stream {self.request_id}"))
        yield DONE

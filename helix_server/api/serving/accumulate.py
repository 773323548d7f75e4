"""Whole results from the engine's deltas, for non-streaming responses."""

from __future__ import annotations

from dataclasses import dataclass, field

from helix_server.api.errors import server_error
from helix_server.api.protocol.common import UsageInfo
from helix_server.api.serving.usage import usage_info
from helix_server.engine.outputs import RequestOutput, merge_delta
from helix_server.step_contract import TokenLogprob


@dataclass
class SequenceResult:
    """One finished sequence: all its text, tokens and logprobs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class PromptResult:
    """One prompt's `n` sequences and its prompt logprobs."""

    prompt_token_ids: list[int]
    sequences: list[SequenceResult]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    num_cached_tokens: int = 0


class ResultAccumulator:
    """Adds up the deltas of every prompt of one API request."""

    def __init__(self, prompts: list[list[int]], n: int) -> None:
        self.n = n
        self.results = [PromptResult(list(p), [SequenceResult() for _ in range(n)]) for p in prompts]

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        """Append one delta of prompt `prompt_index`."""
        result = self.results[prompt_index]
        if output.prompt_logprobs is not None:
            result.prompt_logprobs = output.prompt_logprobs
        if output.error:
            result.error = output.error
        result.num_cached_tokens = max(result.num_cached_tokens, output.num_cached_tokens)
        for delta in output.outputs:
            merge_delta(result.sequences[delta.index], delta)

    def raise_if_failed(self) -> None:
        """A 500 if the engine failed any sequence (its message says why)."""
        for result in self.results:
            if result.error or any(seq.finish_reason == "error" for seq in result.sequences):
                raise server_error(f"The request failed in the engine: {result.error or 'unknown error'}")

    def choices(self):
        """`(choice_index, prompt_result, sequence)` in OpenAI's order: prompt_index * n + index."""
        for p, result in enumerate(self.results):
            for i, seq in enumerate(result.sequences):
                yield p * self.n + i, result, seq

    def usage(self) -> UsageInfo:
        """Prompt tokens once per prompt, completion tokens of every choice, cached prompt tokens."""
        prompt = sum(len(r.prompt_token_ids) for r in self.results)
        completion = sum(len(s.token_ids) for r in self.results for s in r.sequences)
        return usage_info(prompt, completion, sum(r.num_cached_tokens for r in self.results))

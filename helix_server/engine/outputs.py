"""What the engine hands back for a request: new text, token ids, logprobs, finish reason.

The engine emits *deltas*: each `RequestOutput` carries, for every sequence of the request that
changed this step, only what is new. `LLM.generate` accumulates them into whole completions; the
HTTP layer streams them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from helix_server.step_contract import TokenLogprob


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic) of one request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    # Speculative decoding: drafts verified for this request, and how many of them were accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts over verified drafts, or None when nothing was drafted."""
        if not self.num_draft_tokens:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens


@dataclass
class CompletionOutput:
    """One sequence (`index` of the request's `n`): text and tokens, new since the previous output.

    `finish_reason` is "stop", "length", "abort" or "error" once the sequence ends, else None.
    `stop_reason` is the stop string or stop token id that ended it (None for EOS or length).
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_delta(into, delta: CompletionOutput) -> None:
    """Add a sequence's later `delta` to what `into` (a `CompletionOutput` or any object with the
    same text / token_ids / logprobs / finish_reason / stop_reason fields) holds so far."""
    into.text += delta.text
    into.token_ids.extend(delta.token_ids)
    if delta.logprobs is not None:
        if into.logprobs is None:
            into.logprobs = []
        into.logprobs.extend(delta.logprobs)
    if delta.finish_reason is not None:
        into.finish_reason = delta.finish_reason
        into.stop_reason = delta.stop_reason


@dataclass
class RequestOutput:
    """A request's progress: the sequences that changed, and whether the whole request is done.

    `prompt_logprobs` (when asked for) are delivered once, with the first output that has them; the
    first prompt token has none (None). `error` explains a finish_reason "error" (or an engine
    refusal: `error_code` "queue_timeout" for a request dropped after waiting too long to be
    scheduled). `num_cached_tokens`: prompt tokens whose KV the prefix cache held.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    error_code: str | None = None

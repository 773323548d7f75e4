"""The per-request state the `OutputProcessor` keeps: incremental text, stop strings, pending deltas.

A `RequestState` is one API request; its `SequenceState`s are its `n` sequences, each tied to one
scheduler `Request`. The scheduler decides stops on token ids (`scheduler.stop`); after every step
each sequence takes the tokens the scheduler appended, detokenizes them, checks the stop strings
(a match is reported back through `OutputProcessor.process_outputs`; the engine finishes the
request in the scheduler), and holds the delta until it is taken as a `RequestOutput`. Nothing here
edits the scheduler's request.
"""

from __future__ import annotations

import time

from helix_server.engine.detokenizer import IncrementalDetokenizer
from helix_server.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from helix_server.sampling_params import SamplingParams
from helix_server.scheduler.request import Request, RequestStatus
from helix_server.step_contract import TokenLogprob


class SequenceState:
    """One sequence's stop checks and not-yet-emitted delta."""

    def __init__(self, request: Request, detokenizer: IncrementalDetokenizer) -> None:
        self.request = request
        self.detokenizer = detokenizer
        self.finish_status: RequestStatus | None = None
        self.stop_reason: str | int | None = None
        self._text = ""
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._changed = False
        # Output tokens of the request already taken (`process_new_tokens`).
        self._num_processed = 0

    @property
    def index(self) -> int:
        return self.request.index

    @property
    def finished(self) -> bool:
        return self.finish_status is not None

    def process_new_tokens(self, logprobs: list[TokenLogprob] | None) -> None:
        """Take the tokens the scheduler appended to the request since the last call (it cut them at
        any EOS, stop token id or length stop, and finished the request then): detokenize them and
        check the stop strings. A stop string that matches ends the sequence at that token; the
        engine then finishes the request in the scheduler. Reads the scheduler's token list only."""
        request = self.request
        params: SamplingParams = request.sampling_params
        output = request.output_token_ids
        num_before = self._num_processed
        token_ids = output[num_before:]
        self._num_processed = len(output)
        stopped_on_token = request.status is RequestStatus.FINISHED_STOPPED
        for i, token_id in enumerate(token_ids):
            num_generated = num_before + i + 1
            self._token_ids.append(token_id)
            if logprobs is not None:
                self._logprobs.append(logprobs[i])
            last = i == len(token_ids) - 1
            if last and stopped_on_token:  # EOS or a stop token id: not part of the text
                self._finish(RequestStatus.FINISHED_STOPPED, request.stop_reason)
                break
            # Like vLLM, stop strings only count once min_tokens tokens exist.
            self.detokenizer.stop_strings_active = num_generated >= params.min_tokens
            self._text += self.detokenizer.add_tokens([token_id])
            if self.detokenizer.stop_reason is not None:
                self._finish(RequestStatus.FINISHED_STOPPED, self.detokenizer.stop_reason)
                break
            if last and request.status is RequestStatus.FINISHED_LENGTH:
                self._finish(RequestStatus.FINISHED_LENGTH, None)
        self._changed = True

    def finish_externally(self, status: RequestStatus) -> None:
        """End the sequence for a reason outside its tokens (abort, error, time limit)."""
        if not self.finished:
            self._finish(status, None)
            self._changed = True

    def _finish(self, status: RequestStatus, stop_reason: str | int | None) -> None:
        self.finish_status = status
        self.stop_reason = stop_reason
        if self.detokenizer.stop_reason is None:
            self._text += self.detokenizer.flush()

    def take_delta(self) -> CompletionOutput | None:
        """The sequence's output since the last call, or None if nothing changed."""
        if not self._changed:
            return None
        delta = CompletionOutput(
            index=self.index,
            text=self._text,
            token_ids=self._token_ids,
            logprobs=self._logprobs if self.request.sampling_params.logprobs is not None else None,
            finish_reason=self.finish_status.value if self.finish_status else None,
            stop_reason=self.stop_reason,
        )
        self._text, self._token_ids, self._logprobs, self._changed = "", [], [], False
        return delta


class RequestState:
    """One API request: its prompt, its `n` sequences, timestamps and pending prompt logprobs."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sequences: list[SequenceState],
        arrival_time: float,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.sequences = sequences
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.error: str | None = None
        # Why the engine refused to finish it normally ("queue_timeout"), for the API to map.
        self.error_code: str | None = None
        # Prompt tokens whose KV came from the prefix cache (known once the first sequence runs).
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self._prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)

    def add_prompt_logprobs(self, start_position: int, logprobs: list[TokenLogprob | None]) -> None:
        """Record prompt logprobs for positions start_position.. (a recomputation repeats none)."""
        known = len(self.prompt_logprobs)
        if start_position + len(logprobs) > known:
            self.prompt_logprobs.extend(logprobs[known - start_position :])

    def take_output(self) -> RequestOutput | None:
        """A delta `RequestOutput` with every sequence that changed, or None."""
        deltas = [d for d in (seq.take_delta() for seq in self.sequences) if d is not None]
        if not deltas:
            return None
        now = time.monotonic()
        if self.metrics.first_token_time is None and any(d.token_ids for d in deltas):
            self.metrics.first_token_time = now
        if any(d.token_ids for d in deltas):
            self.metrics.last_token_time = now
        finished = self.finished
        if finished:
            self.metrics.finished_time = now
        prompt_logprobs = None
        wants_prompt_logprobs = self.params.prompt_logprobs is not None
        if wants_prompt_logprobs and not self._prompt_logprobs_sent and (
            len(self.prompt_logprobs) >= len(self.prompt_token_ids) or finished
        ):
            prompt_logprobs = self.prompt_logprobs
            self._prompt_logprobs_sent = True
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=deltas,
            finished=finished,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
            metrics=self.metrics,
            error=self.error,
            error_code=self.error_code,
        )

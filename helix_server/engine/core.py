"""`EngineCore`: the synchronous heart of helix_server.

`step()` reads as its phases: schedule (pure Python decides who runs and with how many tokens) ->
execute (the runner runs one forward and samples, or verifies drafts) -> update (the scheduler
advances each request) -> emit (stop checks, incremental text, delta outputs) -> propose (with
speculative decoding, drafts for the next step). Requests enter through `add_core_request` once
the `InputProcessor` validated them (`add_request` does both for synchronous callers), and leave
when finished or aborted. Before each step the time limits are enforced: a request still queued
after `max_queue_wait` is dropped (its output carries `error_code` "queue_timeout"), one older than
`request_timeout` ends as "length".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from helix_server.config import EngineConfig
from helix_server.engine.admission import QueuedRequests
from helix_server.engine.checkpoint_reading import start_reading_checkpoint
from helix_server.engine.input_processor import (
    EngineCoreRequest,
    InputProcessor,
    check_request_id,
    sequence_ids,
)
from helix_server.engine.kv_events import build_kv_event_publisher
from helix_server.engine.output_processor import OutputProcessor
from helix_server.engine.outputs import RequestOutput
from helix_server.engine.request_state import RequestState, SequenceState
from helix_server.engine.stats import EngineCounters, EngineStats
from helix_server.engine.structured import StructuredOutputBackend
from helix_server.engine.structured.manager import StructuredOutputManager
from helix_server.engine.tokenizer import Tokenizer
from helix_server.runner.loader import load_model
from helix_server.runner.model_runner import ModelRunner
from helix_server.sampling_params import SamplingParams
from helix_server.scheduler import Request, RequestStatus, Scheduler
from helix_server.step_contract import SchedulerOutput

logger = logging.getLogger("helix_server")


class EngineCore:
    """Runs requests to completion with continuous batching over a paged KV cache.

    Not thread-safe: one thread calls `add_request`, `abort_request` and `step` (the offline `LLM`
    calls them directly; `AsyncEngine` from its background thread).
    """

    def __init__(self, config: EngineConfig, progress: Callable[[int, int], None] | None = None) -> None:
        # The tokenizer (and a GGUF file's config) is read in a child process while the weights load.
        reading = start_reading_checkpoint(config)
        try:
            loaded = load_model(config, progress=progress, gguf_config=lambda: reading.result().gguf_config)
        except BaseException:
            reading.cancel()
            raise
        self.config = config
        self.runtime = loaded.runtime
        self.tokenizer = Tokenizer(reading.result().tokenizer)
        self.tokenizer.sanitize_chat_content = not config.model.allow_special_tokens_in_content
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.scheduler = Scheduler(
            config.scheduler,
            self.runtime.block_size,
            self.runtime.num_kv_blocks,
            enable_caching=config.cache.enable_prefix_caching,
            eos_token_ids=self.eos_token_ids,
        )
        # --kv-events-config: the pool's block events, published in vLLM's format (None: off).
        self.kv_events = build_kv_event_publisher(config.cache.kv_events_config, self.runtime.block_size)
        if self.kv_events is not None:
            self.scheduler.kv_cache_manager.block_pool.event_sink = self.kv_events.put
        self.runner = ModelRunner.from_loaded(loaded, config, set(self.eos_token_ids))
        # Structured outputs: grammars compiled at request entry (`structured.compile_async`).
        self.structured = StructuredOutputBackend(self.tokenizer)
        self.structured_matchers = StructuredOutputManager(self.structured)
        # The bound on any sequence's tokens (prompt + completion): the model's context
        # (`max_model_len`), or the whole KV pool if smaller. A request's own bound is its
        # `Request.num_tokens_limit`.
        self.seq_num_tokens_limit = min(self.runtime.max_model_len, self.runtime.kv_pool_tokens)
        self.input_processor = InputProcessor(self.runtime.vocab_size, self.seq_num_tokens_limit, config.scheduler.max_n)
        # Detokenization, stop strings and delta outputs of every live request.
        self.output_processor = OutputProcessor(self.tokenizer)
        # Requests not scheduled yet (admission control reads its counts from other threads).
        self.queued = QueuedRequests()
        self.counters = EngineCounters()

    # ----------------------------------------------------------------- requests in and out

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """Check the id, validate and queue a request (for synchronous callers; `AsyncEngine` does
        the first two on its event loop and calls `add_core_request`). Raises `ParameterError`.

        With prefix caching, only requests with the same `cache_salt` (or none) share cached blocks.
        """
        check_request_id(request_id, params.n, self._num_sequences_of)
        self.add_core_request(
            self.input_processor.process(
                request_id, prompt_token_ids, params, arrival_time=arrival_time, cache_salt=cache_salt
            )
        )

    def add_core_request(self, core_request: EngineCoreRequest) -> None:
        """Queue a request the `InputProcessor` validated, under an id its front checked; its `n`
        sequences share the prompt's KV blocks."""
        request_id, params = core_request.request_id, core_request.params
        prompt_token_ids, arrival_time = core_request.prompt_token_ids, core_request.arrival_time
        if params.structured_output is not None:  # a cache hit when the API compiled it already
            self.structured.compile(params.structured_output)
        sequences: list[SequenceState] = []
        leader: Request | None = None
        for index, seq_id in enumerate(sequence_ids(request_id, params.n)):
            seq_params = params
            if params.n > 1 and params.seed is not None:
                seq_params = _replace_seed(params, params.seed + index)
            request = Request(
                seq_id,
                prompt_token_ids,
                seq_params,
                arrival_time=arrival_time,
                parent_id=request_id,
                index=index,
                fork_parent=leader,
                cache_salt=core_request.cache_salt,
            )
            leader = leader or request
            request.num_tokens_limit = len(prompt_token_ids) + (params.max_tokens or self.seq_num_tokens_limit)
            request.num_tokens_limit = min(request.num_tokens_limit, self.seq_num_tokens_limit)
            request.num_lookahead_tokens = self.runner.num_lookahead_tokens(params.speculation_depth)
            # Prompt logprobs need every prompt position computed: no prefix-cache hit for those.
            request.skip_reading_prefix_cache = params.prompt_logprobs is not None
            sequences.append(self.output_processor.new_sequence(request))
        state = RequestState(request_id, prompt_token_ids, params, sequences, arrival_time)
        self.output_processor.add_request(state)
        self.queued.add(request_id, arrival_time, params.n, len(prompt_token_ids))
        self.counters.prompt_tokens += len(prompt_token_ids)
        for seq in sequences:
            self.scheduler.add_request(seq.request)

    @property
    def num_speculative_tokens(self) -> int:
        """The most drafts a request may verify per step (0: no speculative decoding)."""
        return self.runner.num_speculative_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; its blocks are free when this returns. Returns its final
        output (finish_reason "abort"), or None if the request is unknown or already done."""
        state = self.output_processor.requests.get(request_id)
        if state is None:
            return None
        self._finish_request(state, RequestStatus.FINISHED_ABORTED)
        return self._take_output(state)

    def _num_sequences_of(self, request_id: str) -> int | None:
        state = self.output_processor.requests.get(request_id)
        return None if state is None else state.params.n

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.requests)

    def unfinished_request_ids(self) -> list[str]:
        return list(self.output_processor.requests)

    def stats(self) -> EngineStats:
        """A snapshot of queue sizes, KV pool use and totals (cheap; safe to call from any thread)."""
        scheduler = self.scheduler
        prefix_cache = scheduler.prefix_cache_stats
        spec = self.runner.spec_counters
        return EngineStats(
            num_requests_running=scheduler.num_running,
            num_requests_waiting=scheduler.num_waiting,
            num_kv_blocks_total=scheduler.num_total_blocks,
            num_kv_blocks_free=scheduler.num_free_blocks,
            kv_cache_usage=scheduler.kv_usage,
            num_preemptions_total=scheduler.num_preemptions_total,
            prefix_cache_queries_total=prefix_cache.queries,
            prefix_cache_hits_total=prefix_cache.hits,
            num_requests_rejected_total=dict(self.counters.rejected),
            prompt_tokens_total=self.counters.prompt_tokens,
            generation_tokens_total=self.counters.generation_tokens,
            finished_sequences_total=dict(self.counters.finished_sequences),
            spec_num_drafts_total=spec.num_drafts,
            spec_num_draft_tokens_total=spec.num_draft_tokens,
            spec_num_accepted_tokens_total=spec.num_accepted_tokens,
            spec_accepted_tokens_per_position_total=dict(spec.accepted_per_position),
        )

    # ----------------------------------------------------------------- the step

    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update, emit. Returns the delta outputs of every request that changed."""
        touched = self._enforce_time_limits()
        scheduler_output = self.scheduler.schedule()
        touched.update(self._finish_length_capped(scheduler_output))
        self._note_scheduled(scheduler_output)
        if scheduler_output.is_empty:
            self.runner.release_finished(scheduler_output)
            return self._collect(touched)

        started = time.perf_counter()
        bitmasks, grammar_errors = self.structured_matchers.bitmasks(scheduler_output.scheduled)
        try:
            if bitmasks:
                runner_output = self.runner.execute_model(scheduler_output, bitmasks)
            else:
                runner_output = self.runner.execute_model(scheduler_output)
        except Exception as exc:  # one bad batch fails its requests, never the engine
            logger.exception("model step failed; failing the %d requests in it", len(scheduler_output.scheduled))
            for scheduled in scheduler_output.scheduled:
                state = self.output_processor.parent_of.get(scheduled.request_id)
                if state is not None:
                    self._fail_request(state, f"model execution failed: {exc}")
                    touched[state.request_id] = state
            return self._collect(touched)

        self.runner.observe_step(scheduler_output, runner_output, time.perf_counter() - started)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        for request_id, num_drafts in runner_output.num_draft_tokens.items():
            state = self.output_processor.parent_of.get(request_id)
            if state is not None:
                state.metrics.num_draft_tokens += num_drafts
                state.metrics.num_accepted_tokens += len(runner_output.sampled_token_ids.get(request_id, ())) - 1

        for scheduled in scheduler_output.scheduled:
            state = self.output_processor.parent_of.get(scheduled.request_id)
            if state is None:
                continue
            if state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = time.monotonic()
            prompt_logprobs = runner_output.prompt_logprobs.get(scheduled.request_id)
            if prompt_logprobs is not None:
                state.add_prompt_logprobs(scheduled.start_position, prompt_logprobs)

        processed = self.output_processor.process_outputs(updated, runner_output.logprobs)
        touched.update(processed.touched)
        for seq_id, status in processed.stopped:
            self.scheduler.finish_requests([seq_id], status)
        for request_id, message in processed.failed.items():
            self._fail_request(processed.touched[request_id], message)
        for request_id, error in grammar_errors.items():
            state = self.output_processor.parent_of.get(request_id)
            if state is not None:
                self._fail_request(state, f"structured output failed: {error}")
                touched[state.request_id] = state
        outputs = self._collect(touched)
        if self.runner.speculator is not None:
            self._propose([r for r in updated if not r.is_finished])
        return outputs

    # ----------------------------------------------------------------- speculative decoding

    def _propose(self, requests: list[Request]) -> None:
        """Drafts for the next step of requests that just got new tokens; a grammar keeps the
        prefix of each request's drafts it allows."""
        proposals = self.runner.propose(
            requests,
            self.scheduler.num_running,
            self.scheduler.kv_cache_manager.get_block_ids,
            self.structured_matchers.draft_bitmask,
        )
        for request, drafts in proposals:
            request.spec_token_ids = self.structured_matchers.valid_drafts(request, drafts)

    # ----------------------------------------------------------------- time limits

    def _enforce_time_limits(self) -> dict[str, RequestState]:
        """Drop requests queued longer than `max_queue_wait`; end those older than `request_timeout`
        with what they have (finish_reason "length"). Both free the requests' blocks."""
        touched: dict[str, RequestState] = {}
        limits = self.config.scheduler
        now = time.monotonic()
        if limits.max_queue_wait is not None:
            for request_id in self.queued.arrived_before(now - limits.max_queue_wait):
                state = self.output_processor.requests[request_id]
                state.error = f"The request waited more than {limits.max_queue_wait:g} s to be scheduled."
                state.error_code = "queue_timeout"
                self.counters.rejected["queue_timeout"] += 1
                self._finish_request(state, RequestStatus.FINISHED_ABORTED)
                touched[request_id] = state
        if limits.request_timeout is not None:
            deadline = now - limits.request_timeout
            for state in self.output_processor.requests.values():
                if state.metrics.arrival_time < deadline and not state.finished:
                    self._finish_request(state, RequestStatus.FINISHED_LENGTH)
                    touched[state.request_id] = state
        return touched

    # ----------------------------------------------------------------- helpers

    def _note_scheduled(self, scheduler_output: SchedulerOutput) -> None:
        """Requests scheduled for the first time leave the queue; the first admission of a request's
        first sequence tells how many of its prompt tokens the prefix cache held."""
        for scheduled in scheduler_output.scheduled:
            state = self.output_processor.parent_of.get(scheduled.request_id)
            if state is None:
                continue
            self.queued.discard(state.request_id)
            request = scheduled.request
            if request.index == 0 and request.num_cached_tokens >= 0:
                state.num_cached_tokens = min(request.num_cached_tokens, request.num_prompt_tokens)

    def _finish_length_capped(self, scheduler_output: SchedulerOutput) -> dict[str, RequestState]:
        touched: dict[str, RequestState] = {}
        for request_id in scheduler_output.length_capped_request_ids:
            seq = self.output_processor.sequences.get(request_id)
            if seq is not None:
                seq.finish_externally(RequestStatus.FINISHED_LENGTH)
                state = self.output_processor.parent_of[request_id]
                touched[state.request_id] = state
        return touched

    def _fail_request(self, state: RequestState, message: str) -> None:
        state.error = message
        self._finish_request(state, RequestStatus.FINISHED_ERROR)

    def _finish_request(self, state: RequestState, status: RequestStatus) -> None:
        self.queued.discard(state.request_id)
        for seq in state.sequences:
            seq.finish_externally(status)
        self.scheduler.finish_requests([seq.request.request_id for seq in state.sequences], status)

    def _collect(self, touched: dict[str, RequestState]) -> list[RequestOutput]:
        outputs = []
        for state in touched.values():
            output = self._take_output(state)
            if output is not None:
                outputs.append(output)
        return outputs

    def _take_output(self, state: RequestState) -> RequestOutput | None:
        output = self.output_processor.take_output(state)
        if state.finished:
            self.structured_matchers.forget(seq.request.request_id for seq in state.sequences)
        if output is not None:
            for seq in output.outputs:
                self.counters.generation_tokens += len(seq.token_ids)
                if seq.finish_reason is not None:
                    self.counters.finished_sequences[seq.finish_reason] += 1
        if state.finished:
            self.queued.discard(state.request_id)
        return output


def _replace_seed(params: SamplingParams, seed: int) -> SamplingParams:
    """A copy of `params` with another seed (each of the `n` sequences gets seed + index)."""
    return replace(params, seed=seed)

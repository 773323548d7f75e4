"""Continuous batching: who runs this step, and with how many tokens.

The one rule: a request knows `num_tokens` tokens, `num_computed_tokens` of which have K/V in the
cache; each step it may be given up to `num_tokens - num_computed_tokens` more. A fresh prompt gets
its prefill (in chunks when the token budget is short), a request that just sampled gets its one new
token (decode), a preempted one recomputes everything it knew. Nothing here imports torch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from helix_server.scheduler.kv_cache_manager import KVCacheManager
from helix_server.scheduler.output import ScheduledRequest, SchedulerOutput
from helix_server.scheduler.request import Request, RequestStatus

if TYPE_CHECKING:
    from helix_server.config import SchedulerConfig
    from helix_server.runner.output import ModelRunnerOutput


class Scheduler:
    """FCFS continuous-batching scheduler over a paged KV cache, with preemption by recompute.

    Each step: running requests first, oldest first, each taking what it can of the token budget
    (`max_num_batched_tokens`); if its blocks cannot be allocated the youngest running request is
    preempted. Then, unless something was preempted, waiting requests are admitted in arrival order
    while the budget, `max_num_seqs` and the free blocks allow.

    Followers of an n > 1 request (`Request.fork_parent` set) wait until their leader's prompt K/V is
    computed, then share its full prompt blocks. Add a leader before its followers.
    """

    def __init__(self, scheduler_config: SchedulerConfig, block_size: int, num_blocks: int) -> None:
        if scheduler_config.max_num_batched_tokens < 1 or scheduler_config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.block_size = block_size
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size)
        # Every unfinished request, each in exactly one of `waiting` (WAITING / PREEMPTED) and
        # `running` (RUNNING, in admission order: oldest first).
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # leader request id -> followers still waiting to fork the leader's prompt blocks.
        self._followers: dict[str, list[Request]] = {}
        # Finished since the last schedule(); reported in the next SchedulerOutput.
        self._finished_request_ids: set[str] = set()
        self._num_preemptions_total = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.kv_cache_manager.num_total_blocks

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (0.0 to 1.0)."""
        return self.kv_cache_manager.usage

    @property
    def num_preemptions_total(self) -> int:
        return self._num_preemptions_total

    # ------------------------------------------------------------------ lifecycle

    def add_request(self, request: Request) -> None:
        """Queue a request at the back of the waiting queue."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)
        leader = request.fork_parent
        if leader is None:
            return
        leader_is_tracked = self.requests.get(leader.request_id) is leader
        if not leader_is_tracked or leader.prompt_token_ids != request.prompt_token_ids:
            # Leader unknown, already finished, or not the same prompt: compute from scratch.
            request.fork_parent = None
            return
        self._followers.setdefault(leader.request_id, []).append(request)
        if leader.num_computed_tokens >= leader.num_prompt_tokens:
            self._fork_followers(leader)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Stop tracking these requests wherever they are and free their blocks; unknown ids are ignored."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._release(request, status)
            self._finished_request_ids.add(request_id)

    def _release(self, request: Request, status: RequestStatus) -> None:
        """Forget a request that left both queues: free its blocks and cut its fork links."""
        del self.requests[request.request_id]
        request.status = status
        self.kv_cache_manager.free(request)
        leader = request.fork_parent
        if leader is not None:
            followers = self._followers.get(leader.request_id, [])
            if request in followers:
                followers.remove(request)
            if not followers:
                self._followers.pop(leader.request_id, None)
        # Followers that never got the prompt blocks compute the prompt themselves.
        for follower in self._followers.pop(request.request_id, ()):
            follower.fork_parent = None

    # ------------------------------------------------------------------ the step

    def schedule(self) -> SchedulerOutput:
        """Decide this step's batch: running requests first, then newly admitted ones."""
        output = SchedulerOutput(finished_request_ids=self._finished_request_ids)
        self._finished_request_ids = set()
        budget = self._schedule_running(output, self.max_num_batched_tokens)
        if not output.preempted_request_ids:
            self._schedule_waiting(output, budget)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        """Give each running request, oldest first, its share of the budget. Returns the budget left."""
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new_tokens = min(request.num_tokens_with_spec - request.num_computed_tokens, budget)
            if num_new_tokens <= 0:
                index += 1
                continue
            if self._allocate_running(index, num_new_tokens, output):
                self._add_scheduled(output, request, num_new_tokens)
                budget -= num_new_tokens
                index += 1
            elif request.status is RequestStatus.PREEMPTED:
                break
            # Otherwise it was length-capped and left `running`: the next request is now at `index`.
        return budget

    def _allocate_running(self, index: int, num_new_tokens: int, output: SchedulerOutput) -> bool:
        """Allocate blocks for running[index], preempting younger requests as needed.

        Returns False when the request could not be scheduled: it was preempted itself (older
        requests hold the blocks and will release them) or, if it is the oldest and still does not
        fit with every other block released, finished as FINISHED_LENGTH.
        """
        request = self.running[index]
        kv = self.kv_cache_manager
        while not kv.allocate_slots(request, num_new_tokens, _lookahead(request, num_new_tokens)):
            victim = self._youngest_victim(after=index)
            if victim is not None:
                self._preempt(victim, output)
            elif index > 0:
                self._preempt(index, output)
                return False
            elif not self._release_waiting_blocks(request, num_new_tokens):
                # The oldest request alone does not fit in the pool: it can never finish.
                self.running.pop(index)
                self._release(request, RequestStatus.FINISHED_LENGTH)
                output.length_capped_request_ids.append(request.request_id)
                output.finished_request_ids.add(request.request_id)
                return False
        return True

    def _youngest_victim(self, after: int) -> int | None:
        """Index of the youngest running request younger than running[after] whose release would
        free at least one block (one whose blocks are all shared frees nothing: not worth it)."""
        kv = self.kv_cache_manager
        for index in range(len(self.running) - 1, after, -1):
            if kv.blocks_freed_if_released(self.running[index]) > 0:
                return index
        return None

    def _preempt(self, index: int, output: SchedulerOutput) -> None:
        """Preempt running[index] by recompute: free its blocks, requeue it at the front."""
        request = self.running.pop(index)
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions_total += 1
        # Victims are taken youngest first, so successive appendlefts keep the older one in front.
        self.waiting.appendleft(request)
        output.preempted_request_ids.append(request.request_id)

    def _release_waiting_blocks(self, request: Request, num_new_tokens: int) -> bool:
        """Last resort when nothing running can make room: drop the forked prompt blocks of waiting
        followers (youngest first) until `request` fits. Without this, followers holding blocks
        while queued behind a request that needs them would deadlock the queue.
        Returns whether `request` got its blocks."""
        kv = self.kv_cache_manager
        for waiting in reversed(self.waiting):
            if waiting is request or not kv.num_blocks_held(waiting.request_id):
                continue
            kv.free(waiting)
            waiting.num_computed_tokens = 0
            if kv.allocate_slots(request, num_new_tokens, _lookahead(request, num_new_tokens)):
                return True
        return False

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests strictly in queue order while budget, seats and blocks allow.

        Followers still waiting for their leader's prompt are stepped over, keeping their place.
        """
        kv = self.kv_cache_manager
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.waiting_for_fork:
                skipped.append(self.waiting.popleft())
                continue
            # A forked follower already holds its shared prompt blocks: this allocates the rest.
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if not kv.allocate_slots(request, num_new_tokens, _lookahead(request, num_new_tokens)):
                # While anything runs, blocks will come back. With nothing running, only queued
                # followers' forked blocks can be holding the pool: reclaim those.
                if self.running or not self._release_waiting_blocks(request, num_new_tokens):
                    break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            self._add_scheduled(output, request, num_new_tokens)
            budget -= num_new_tokens
        self.waiting.extendleft(reversed(skipped))

    def _add_scheduled(self, output: SchedulerOutput, request: Request, num_new_tokens: int) -> None:
        block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
        # Drafts are the tail of the known tokens; a short budget may cut some of them off.
        num_spec = max(0, request.num_computed_tokens + num_new_tokens - request.num_tokens)
        output.scheduled.append(
            ScheduledRequest(request, request.num_computed_tokens, num_new_tokens, block_ids, num_spec)
        )

    # ------------------------------------------------------------------ after the step

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Advance each scheduled request by its computed tokens and append its sampled ones.

        Returns the requests that received new tokens (the engine checks their stop conditions).
        Requests finished between `schedule()` and now are skipped.

        With speculative decoding a request's new tokens are its accepted drafts plus one: the K/V
        of the rejected drafts was computed but is wrong, so `num_computed_tokens` rolls back over
        them (their slots are simply overwritten later). Drafts are consumed either way; the engine
        proposes the next ones after this.
        """
        updated: list[Request] = []
        sampled = model_runner_output.sampled_token_ids
        for scheduled in scheduler_output.scheduled:
            request = scheduled.request
            if (
                self.requests.get(request.request_id) is not request
                or request.num_computed_tokens != scheduled.start_position
            ):
                continue
            new_token_ids = sampled.get(request.request_id)
            num_rejected = 0
            if scheduled.num_spec_tokens and new_token_ids:
                num_rejected = scheduled.num_spec_tokens - (len(new_token_ids) - 1)
            request.num_computed_tokens += scheduled.num_new_tokens - num_rejected
            request.spec_token_ids = []
            if new_token_ids:
                request.append_output_token_ids(new_token_ids)
                updated.append(request)
            # The leader of an n > 1 request just finished its prompt: its followers may share it.
            prompt_done = request.num_computed_tokens >= request.num_prompt_tokens
            if prompt_done and request.request_id in self._followers:
                self._fork_followers(request)
        return updated

    def _fork_followers(self, leader: Request) -> None:
        """Share the leader's full prompt blocks with its waiting followers.

        Only blocks wholly before the last prompt token are shared: each follower recomputes at
        least that token, which gives it its own logits to sample from (and its own partial block
        to write into, so a shared block is never written again).
        """
        num_shared = ((leader.num_prompt_tokens - 1) // self.block_size) * self.block_size
        for follower in self._followers.pop(leader.request_id, ()):
            if num_shared:
                self.kv_cache_manager.fork(leader, follower, num_shared)
                follower.num_computed_tokens = num_shared
            follower.fork_parent = None


def _lookahead(request: Request, num_new_tokens: int) -> int:
    """KV slots to reserve past this step's tokens for the proposer's drafts: none unless the step
    reaches the end of the known tokens (a sampling step), and never past `max_num_tokens`."""
    if not request.num_lookahead_tokens:
        return 0
    end = request.num_computed_tokens + num_new_tokens
    if end < request.num_tokens:
        return 0
    if request.max_num_tokens is None:
        return request.num_lookahead_tokens
    return max(0, min(request.num_lookahead_tokens, request.max_num_tokens - end))

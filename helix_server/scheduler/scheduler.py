"""Continuous batching: who runs this step, and with how many tokens.

The one rule: a request knows `num_tokens` tokens, `num_computed_tokens` of which have K/V in the
cache; each step it may be given up to `num_tokens - num_computed_tokens` more. A fresh prompt gets
its prefill (in chunks when the token budget is short), a request that just sampled gets its one new
token (decode), a preempted one recomputes everything it knew. With prefix caching, a request
being admitted first takes the cached blocks of the longest prefix it shares with earlier requests
(its `num_computed_tokens` starts past them). Nothing here imports torch.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from helix_server.scheduler.block_hash import HashFn, sha256
from helix_server.scheduler.followers import Followers
from helix_server.scheduler.kv_cache_manager import KVCacheManager
from helix_server.scheduler.prefix_cache import PrefixCacheStats
from helix_server.scheduler.request import Request, RequestStatus
from helix_server.scheduler.stop import check_stop
from helix_server.step_contract import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from helix_server.config import SchedulerConfig
    from helix_server.step_contract import ModelRunnerOutput


class Scheduler:
    """FCFS continuous-batching scheduler over a paged KV cache, with preemption by recompute.

    Each step: running requests first, oldest first, each taking what it can of the token budget
    (`max_num_batched_tokens`); if its blocks cannot be allocated the youngest running request whose
    release frees a block is preempted. Then, unless something was preempted, waiting requests are
    admitted in queue order (preempted ones first) while the budget, `max_num_seqs` and the free
    blocks allow. "Oldest" is arrival order: `running` is kept sorted by it, so a request that was
    preempted and comes back is again older than everything that arrived after it. The oldest
    running request is never preempted, so with no new arrivals every request finishes.

    Followers of an n > 1 request (`Request.fork_parent` set) wait until their leader's prompt K/V is
    computed, then share its full prompt blocks. Add a leader before its followers.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        block_size: int,
        num_blocks: int,
        enable_caching: bool = False,
        hash_fn: HashFn = sha256,
        hash_seed: bytes | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        if scheduler_config.max_num_batched_tokens < 1 or scheduler_config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.block_size = block_size
        # Tokens that end a sequence (unless its params say `ignore_eos`); see `stop.check_stop`.
        self.eos_token_ids = frozenset(eos_token_ids)
        self.kv_cache_manager = KVCacheManager(
            num_blocks, block_size, enable_caching, hash_fn, hash_seed
        )
        # Every unfinished request, each in exactly one of `waiting` (WAITING / PREEMPTED) and
        # `running` (RUNNING, in admission order: oldest first).
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # leader request id -> followers still waiting to fork the leader's prompt blocks.
        self._followers = Followers()
        # Finished since the last schedule(); reported in the next SchedulerOutput.
        self._finished_request_ids: set[str] = set()
        self._num_preemptions_total = 0
        # Arrival order of every request added (sorts `running`).
        self._arrival_order: dict[str, int] = {}
        self._arrivals = itertools.count()

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

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up in the prefix cache at first admission, and how many hit."""
        return self.kv_cache_manager.prefix_cache_stats

    # ------------------------------------------------------------------ lifecycle

    def add_request(self, request: Request) -> None:
        """Queue a request at the back of the waiting queue."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._arrival_order[request.request_id] = next(self._arrivals)
        self.waiting.append(request)
        leader = request.fork_parent
        if leader is None:
            return
        # Leader unknown, already finished, or not the same prompt: the follower computes it all.
        waits = self._followers.link(request, self.requests.get(leader.request_id) is leader)
        if waits and leader.num_computed_tokens >= leader.num_prompt_tokens:
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
        del self._arrival_order[request.request_id]
        request.status = status
        self.kv_cache_manager.free(request)
        self._followers.unlink(request)

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
        lookahead = request.lookahead_slots(request.num_computed_tokens, num_new_tokens)
        while not kv.allocate_slots(request, num_new_tokens, lookahead):
            victim = self._youngest_victim(after=index)
            if victim is not None:
                self._preempt(victim, output)
            elif index > 0:
                self._preempt(index, output)
                return False
            elif not self._release_waiting_blocks(request, num_new_tokens, []):
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

    def _release_waiting_blocks(self, request: Request, num_new_tokens: int, cached_blocks: list) -> bool:
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
            if self._allocate(request, num_new_tokens, cached_blocks):
                return True
        return False

    def _allocate(self, request: Request, num_new_tokens: int, cached_blocks: list) -> bool:
        """`allocate_slots` for `num_new_tokens` past the cache hit (if any), with lookahead."""
        start = self.kv_cache_manager.start_position(request, cached_blocks)
        lookahead = request.lookahead_slots(start, num_new_tokens)
        return self.kv_cache_manager.allocate_slots(request, num_new_tokens, lookahead, cached_blocks)

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
            # Anyone else may start with cached blocks (a prefix-cache hit, taken only if admitted).
            cached = kv.find_cached_blocks(request) if request.num_computed_tokens == 0 else []
            num_new_tokens = min(request.num_tokens - kv.start_position(request, cached), budget)
            if not self._allocate(request, num_new_tokens, cached):
                # While anything runs, blocks will come back. With nothing running, only queued
                # followers' forked blocks can be holding the pool: reclaim those.
                if self.running or not self._release_waiting_blocks(request, num_new_tokens, cached):
                    break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = request.num_computed_tokens
            self._insert_running(request)
            self._add_scheduled(output, request, num_new_tokens)
            budget -= num_new_tokens
        self.waiting.extendleft(reversed(skipped))

    def _insert_running(self, request: Request) -> None:
        """Put a request into `running` at its place in arrival order (usually the end)."""
        order = self._arrival_order
        key = order[request.request_id]
        index = bisect.bisect_right(self.running, key, key=lambda r: order[r.request_id])
        self.running.insert(index, request)

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

        Returns the requests that received new tokens. Stop conditions on token ids (EOS, stop token
        ids, length: `stop.check_stop`) are decided here: tokens past a stop are dropped, and the
        request is finished (its status and `stop_reason` tell why) once every request is advanced.
        Stop strings are the engine's. Requests finished between `schedule()` and now are skipped.

        With speculative decoding a request's new tokens are its accepted drafts plus one: the K/V
        of the rejected drafts was computed but is wrong, so `num_computed_tokens` rolls back over
        them (their slots are simply overwritten later). Drafts are consumed either way; the engine
        proposes the next ones after this.
        """
        updated: list[Request] = []
        stopped: list[tuple[Request, RequestStatus]] = []
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
            # Only now, with rejected drafts rolled back, are full blocks safe to share.
            self.kv_cache_manager.cache_blocks(request)
            if new_token_ids:
                stop = check_stop(request, new_token_ids, self.eos_token_ids)
                request.append_output_token_ids(new_token_ids[: stop.num_kept])
                updated.append(request)
                if stop.status is not None:
                    request.stop_reason = stop.stop_reason
                    stopped.append((request, stop.status))
            # The leader of an n > 1 request just finished its prompt: its followers may share it.
            prompt_done = request.num_computed_tokens >= request.num_prompt_tokens
            if prompt_done and request.request_id in self._followers:
                self._fork_followers(request)
        for request, status in stopped:
            self.finish_requests([request.request_id], status)
        return updated

    def _fork_followers(self, leader: Request) -> None:
        """Share the leader's full prompt blocks with its waiting followers.

        Only blocks wholly before the last prompt token are shared: each follower recomputes at
        least that token, which gives it its own logits to sample from (and its own partial block
        to write into, so a shared block is never written again).
        """
        num_shared = ((leader.num_prompt_tokens - 1) // self.block_size) * self.block_size
        for follower in self._followers.take(leader):
            if num_shared:
                self.kv_cache_manager.fork(leader, follower, num_shared)
                follower.num_computed_tokens = num_shared
            follower.fork_parent = None


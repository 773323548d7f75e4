"""Scheduler and block pool invariants as properties: random arrivals sharing prefixes, n > 1 forks,
prefix-cache hits (also under a hash function that collides all the time), speculative drafts with
lookahead slots, preemption, aborts and steps on a small pool.

The fake runner is a model whose K/V and next token depend only on the token prefix: it keeps, for
every physical KV slot, the exact token prefix whose K/V it holds. Before computing a chunk it
checks that every position the request counts as computed holds the K/V of exactly that request's
prefix, which is what "a cache hit (or a fork) never shares wrong KV, and a shared block is never
overwritten" means. Drafts are verified greedily (accepted while they equal the model's token), so
speculation never changes a request's tokens. After every rule the block bookkeeping is recounted
independently, and the `drain` rule checks that, with no new arrivals, every request finishes
within a bound derived from the scheduler's progress guarantee.
"""

import hashlib
from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from helix_server.config import SchedulerConfig
from helix_server.scheduler import Request, RequestStatus, Scheduler
from helix_server.step_contract import ModelRunnerOutput

# A few "system prompts" that requests share a prefix of.
SYSTEM_PROMPTS = [[1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3], [3, 3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [7] * 14]
HASH_FUNCTIONS = {
    "sha256": lambda data: hashlib.sha256(data).digest(),
    # Two possible digests: almost every lookup hits a block holding other content.
    "colliding": lambda data: bytes([hashlib.sha256(data).digest()[0] & 1]),
}


def model_token(tokens) -> int:
    """The fake model's greedy next token: a function of the whole prefix."""
    return hash(tuple(tokens)) % 5


class SchedulerMachine(RuleBasedStateMachine):
    """Drives one Scheduler like an engine would and checks its invariants after every rule."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(2, 16),
        budget=st.integers(1, 24),
        max_seqs=st.integers(1, 5),
        caching=st.sampled_from(["off", "sha256", "colliding"]),
    )
    def setup(self, block_size, num_blocks, budget, max_seqs, caching):
        config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
        hash_fn = HASH_FUNCTIONS.get(caching, HASH_FUNCTIONS["sha256"])
        self.sched = Scheduler(
            config, block_size, num_blocks, enable_caching=caching != "off", hash_fn=hash_fn, hash_seed=b"seed"
        )
        self.block_size = block_size
        self.budget = budget
        self.max_seqs = max_seqs
        self.capacity = num_blocks * block_size
        self.live: dict[str, int] = {}  # request id -> max_tokens
        self.requests: dict[str, Request] = {}
        self.finished: set[str] = set()
        self.next_id = 0
        # (block id, offset) -> the token prefix whose K/V the slot holds ("junk": a draft's K/V).
        self.slots: dict[tuple[int, int], object] = {}
        event(f"caching {caching}")

    # ------------------------------------------------------------------ rules

    @rule(
        system=st.integers(0, len(SYSTEM_PROMPTS) - 1),
        system_len=st.integers(0, 16),
        suffix=st.lists(st.integers(0, 4), max_size=8),
        max_tokens=st.integers(1, 8),
        n=st.integers(1, 3),
        lookahead=st.sampled_from([0, 0, 1, 3]),
        salt=st.sampled_from([None, None, "a"]),
    )
    def add_request(self, system, system_len, suffix, max_tokens, n, lookahead, salt):
        prompt = (SYSTEM_PROMPTS[system][:system_len] + suffix) or [0]
        # The engine refuses prompts the pool can never hold; longer outputs get length-capped
        # (speculative requests, like the engine's, stop at the pool's size).
        prompt = prompt[: self.capacity]
        leader = None
        for index in range(n):
            request = Request(f"r{self.next_id}#{index}", prompt, index=index, fork_parent=leader, cache_salt=salt)
            leader = leader or request
            request.num_lookahead_tokens = lookahead
            if lookahead:
                request.num_tokens_limit = min(len(prompt) + max_tokens, self.capacity)
            self.sched.add_request(request)
            self.live[request.request_id] = max_tokens
            self.requests[request.request_id] = request
        self.next_id += 1

    @rule(num_steps=st.integers(1, 4))
    def step(self, num_steps):
        for _ in range(num_steps):
            self._step()

    @rule(data=st.data())
    def abort(self, data):
        if not self.live:
            return
        request_id = data.draw(st.sampled_from(sorted(self.live)))
        held = Counter(self.sched.kv_cache_manager.get_block_ids(request_id))
        before = {b.block_id: b.ref_cnt for b in self.sched.kv_cache_manager.block_pool.blocks}
        self.sched.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        # Exactly the blocks it held lost one reference each; nothing else changed.
        for block in self.sched.kv_cache_manager.block_pool.blocks:
            assert block.ref_cnt == before[block.block_id] - held[block.block_id]
        self._forget(request_id)

    @precondition(lambda self: len(self.live) >= 4)
    @rule()
    def drain(self):
        self._drain()

    def teardown(self):
        if hasattr(self, "sched"):
            self._drain()

    # ------------------------------------------------------------------ harness

    def _forget(self, request_id):
        del self.live[request_id]
        del self.requests[request_id]
        self.finished.add(request_id)

    def _drain(self):
        # The oldest running request is never preempted and gets >= 1 token a step, so it finishes
        # within (prompt + max_tokens) steps of becoming the oldest; with nothing running, the head
        # of the queue is admitted at once. Hence this bound (a cache hit only makes it quicker).
        bound = 2 + sum(self.requests[rid].num_prompt_tokens + mt + 2 for rid, mt in self.live.items())
        steps = 0
        while self.sched.has_unfinished_requests():
            assert steps < bound, f"not drained after {bound} steps: {list(self.sched.requests.values())}"
            self._step()
            steps += 1
        assert not self.live
        assert self.sched.num_free_blocks == self.sched.num_total_blocks
        event(f"drained in {'<10' if steps < 10 else '>=10'} steps")

    def _slot(self, table, position):
        return table[position // self.block_size], position % self.block_size

    def _run(self, scheduled) -> list[int] | None:
        """The fake model on one scheduled chunk: check the cached K/V, write the new K/V, and
        sample (verifying drafts greedily)."""
        request = scheduled.request
        kv = self.sched.kv_cache_manager
        table = scheduled.block_ids
        tokens = request.token_ids_between(0, scheduled.start_position + scheduled.num_new_tokens)
        for position in range(scheduled.start_position):
            assert self.slots.get(self._slot(table, position)) == tuple(tokens[: position + 1]), (
                f"{request.request_id} position {position}: wrong K/V"
            )
        # Everything this request (or its proposer) may write is its alone and not cached.
        for block_id in table[scheduled.start_position // self.block_size :]:
            block = kv.block_pool.blocks[block_id]
            assert block.ref_cnt == 1 and block.block_hash is None, f"write into shared {block}"
        for position in range(scheduled.start_position, scheduled.start_position + scheduled.num_new_tokens):
            self.slots[self._slot(table, position)] = tuple(tokens[: position + 1])
        if not scheduled.samples:
            return None
        known = request.all_token_ids
        accepted = []
        for draft in request.spec_token_ids[: scheduled.num_spec_tokens]:
            if draft != model_token(known + accepted):
                break
            accepted.append(draft)
        if scheduled.num_spec_tokens:
            event("verified drafts")
        return accepted + [model_token(known + accepted)]

    def _propose(self, request):
        """A proposer with lookahead: writes junk K/V from the first uncomputed position through its
        lookahead slots (as layer-skip does), then drafts (right, then wrong)."""
        kv = self.sched.kv_cache_manager
        table = kv.get_block_ids(request.request_id)
        room = request.num_tokens_limit - request.num_tokens - 1
        depth = min(request.num_lookahead_tokens, room)
        if depth <= 0:
            return
        for position in range(request.num_computed_tokens, request.num_tokens + depth - 1):
            if position // self.block_size < len(table):
                self.slots[self._slot(table, position)] = "junk"
        drafts = []
        for i in range(depth):
            token = model_token(request.all_token_ids + drafts)
            drafts.append(token if (request.num_tokens + i) % 3 else (token + 1) % 5)
        request.spec_token_ids = drafts

    def _step(self):
        sched = self.sched
        was_running = {r.request_id for r in sched.running}
        had_work = sched.has_unfinished_requests()
        output = sched.schedule()

        ids = [s.request_id for s in output.scheduled]
        assert len(set(ids)) == len(ids)
        assert output.total_num_scheduled_tokens <= self.budget
        assert len(ids) <= self.max_seqs and sched.num_running <= self.max_seqs
        order = [r.request_id for r in sched.running]
        assert order == sorted(order, key=lambda rid: (int(rid[1:].split("#")[0]), rid)), "running not oldest first"
        for scheduled in output.scheduled:
            request = scheduled.request
            assert request.status is RequestStatus.RUNNING
            assert scheduled.num_new_tokens >= 1
            assert scheduled.start_position == request.num_computed_tokens
            assert scheduled.start_position + scheduled.num_new_tokens <= request.num_tokens_with_spec
            # At least the last prompt token is computed, whatever the cache held.
            assert scheduled.start_position < request.num_tokens
            end = scheduled.start_position + scheduled.num_new_tokens
            assert len(scheduled.block_ids) * self.block_size >= end
            assert scheduled.block_ids == sched.kv_cache_manager.get_block_ids(request.request_id)
            if request.num_cached_tokens > 0:
                event("prefix cache hit")
        if output.preempted_request_ids:
            event("preemption")
            assert set(ids) <= was_running, "admitted a request in a step with a preemption"
            assert not set(output.preempted_request_ids) & set(ids)
        # Progress: with work to do, a step computes something or retires a request.
        if had_work:
            assert ids or output.length_capped_request_ids
        for request_id in output.length_capped_request_ids:
            event("length cap")
            assert request_id in output.finished_request_ids
            # Only a request whose known tokens cannot fit in the whole pool may be capped.
            capped = self.requests[request_id]
            assert capped.status is RequestStatus.FINISHED_LENGTH and not capped.num_lookahead_tokens
            assert sched.kv_cache_manager.num_blocks_for(capped.num_tokens) > sched.num_total_blocks
            self._forget(request_id)

        sampled = {}
        for scheduled in output.scheduled:
            tokens = self._run(scheduled)
            if tokens is not None:
                sampled[scheduled.request_id] = tokens
        updated = sched.update_from_output(output, ModelRunnerOutput(sampled_token_ids=sampled))
        assert {r.request_id for r in updated} == set(sampled)
        done = []
        for request in updated:
            limit = self.live[request.request_id]
            if request.num_tokens_limit is not None:
                limit = min(limit, request.num_tokens_limit - request.num_prompt_tokens)
            if request.num_output_tokens >= limit:
                del request.output_token_ids[limit:]  # as the engine drops tokens past a stop
                done.append(request.request_id)
            elif request.num_lookahead_tokens:
                self._propose(request)
        sched.finish_requests(done, RequestStatus.FINISHED_LENGTH)
        for request_id in done:
            self._forget(request_id)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def queues_match_live_requests(self):
        sched = self.sched
        assert set(sched.requests) == set(self.live)
        assert sched.num_waiting + sched.num_running == len(self.live)
        assert all(r.status is RequestStatus.RUNNING for r in sched.running)
        assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in sched.waiting)
        assert all(r.num_computed_tokens <= r.num_tokens for r in sched.requests.values())

    @invariant()
    def blocks_are_consistent(self):
        kv = self.sched.kv_cache_manager
        pool = kv.block_pool
        holders = Counter(b for rid in self.live for b in kv.get_block_ids(rid))
        free = set(pool.free_block_ids())
        assert all(not kv.get_block_ids(rid) for rid in self.finished)
        assert not free & set(holders), "a block is both free and owned"
        for block in pool.blocks:
            assert block.ref_cnt >= 0
            assert block.ref_cnt == holders[block.block_id]
        assert len(free) + len(holders) == kv.num_total_blocks
        if not self.sched.has_unfinished_requests():
            # Idle: every block is free (held by nobody), cached ones merely evictable.
            assert kv.num_free_blocks == kv.num_total_blocks and kv.usage == 0.0
        kv.check_invariants()


SchedulerMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_state_machine = SchedulerMachine.TestCase

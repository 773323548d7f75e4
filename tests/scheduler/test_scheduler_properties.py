"""Scheduler invariants as properties: random arrivals, n > 1 forks, aborts and steps on a small pool.

A fake runner samples one token per request whose chunk reaches its last known token; the harness
finishes requests at max_tokens the way the engine does. After every rule the block bookkeeping is
recounted independently, and the `drain` rule checks that, with no new arrivals, every request
finishes within a bound derived from the scheduler's progress guarantee.
"""

from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from helix_server.config import SchedulerConfig
from helix_server.runner.output import ModelRunnerOutput
from helix_server.scheduler import Request, RequestStatus, Scheduler


class SchedulerMachine(RuleBasedStateMachine):
    """Drives one Scheduler like an engine would and checks its invariants after every rule."""

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(2, 16),
        budget=st.integers(1, 24),
        max_seqs=st.integers(1, 5),
    )
    def setup(self, block_size, num_blocks, budget, max_seqs):
        config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs)
        self.sched = Scheduler(config, block_size, num_blocks)
        self.block_size = block_size
        self.budget = budget
        self.max_seqs = max_seqs
        self.capacity = num_blocks * block_size
        self.live: dict[str, int] = {}  # request id -> max_tokens
        self.requests: dict[str, Request] = {}
        self.finished: set[str] = set()
        self.next_id = 0

    # ------------------------------------------------------------------ rules

    @rule(
        prompt_len=st.integers(1, 20),
        max_tokens=st.integers(1, 8),
        n=st.integers(1, 3),
        first_token=st.integers(0, 3),
    )
    def add_request(self, prompt_len, max_tokens, n, first_token):
        # The engine refuses prompts the pool can never hold; longer outputs get length-capped.
        prompt = [first_token + i for i in range(min(prompt_len, self.capacity))]
        leader = None
        for index in range(n):
            request = Request(f"r{self.next_id}#{index}", prompt, index=index, fork_parent=leader)
            leader = leader or request
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
        self.sched.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
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
        # of the queue is admitted at once. Hence this bound.
        bound = 2 + sum(self.requests[rid].num_prompt_tokens + mt + 2 for rid, mt in self.live.items())
        steps = 0
        while self.sched.has_unfinished_requests():
            assert steps < bound, f"not drained after {bound} steps: {list(self.sched.requests.values())}"
            self._step()
            steps += 1
        assert not self.live
        assert self.sched.num_free_blocks == self.sched.num_total_blocks
        event(f"drained in {'<10' if steps < 10 else '>=10'} steps")

    def _step(self):
        sched = self.sched
        was_running = {r.request_id for r in sched.running}
        had_work = sched.has_unfinished_requests()
        output = sched.schedule()

        ids = [s.request_id for s in output.scheduled]
        assert len(set(ids)) == len(ids)
        assert output.total_num_scheduled_tokens <= self.budget
        assert len(ids) <= self.max_seqs and sched.num_running <= self.max_seqs
        for scheduled in output.scheduled:
            request = scheduled.request
            assert request.status is RequestStatus.RUNNING
            assert scheduled.num_new_tokens >= 1
            assert scheduled.start_position == request.num_computed_tokens
            assert scheduled.start_position + scheduled.num_new_tokens <= request.num_tokens
            end = scheduled.start_position + scheduled.num_new_tokens
            assert len(scheduled.block_ids) * self.block_size >= end
            assert scheduled.block_ids == sched.kv_cache_manager.get_block_ids(request.request_id)
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
            assert capped.status is RequestStatus.FINISHED_LENGTH
            assert sched.kv_cache_manager.num_blocks_for(capped.num_tokens) > sched.num_total_blocks
            self._forget(request_id)

        sampled = {s.request_id: [s.request.num_tokens % 5] for s in output.scheduled if s.samples}
        updated = sched.update_from_output(output, ModelRunnerOutput(sampled_token_ids=sampled))
        assert {r.request_id for r in updated} == set(sampled)
        done = [r.request_id for r in updated if r.num_output_tokens >= self.live[r.request_id]]
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
            assert kv.num_free_blocks == kv.num_total_blocks
        kv.check_invariants()


SchedulerMachine.TestCase.settings = settings(
    max_examples=600,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_state_machine = SchedulerMachine.TestCase

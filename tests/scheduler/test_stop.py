"""Stops on token ids are the scheduler's: EOS, stop token ids and length end a request in
`update_from_output`, and the tokens a step yielded past the stop are dropped."""

from __future__ import annotations

from helix_server.config import SchedulerConfig
from helix_server.sampling_params import SamplingParams
from helix_server.scheduler import Request, RequestStatus, Scheduler
from helix_server.step_contract import ModelRunnerOutput

EOS = 0


def _step(params: SamplingParams, sampled: list[int], num_tokens_limit: int | None = None) -> tuple[Scheduler, Request]:
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), 4, 16, eos_token_ids={EOS})
    request = Request("a", [3, 4, 5], params)
    request.num_tokens_limit = num_tokens_limit
    scheduler.add_request(request)
    output = scheduler.schedule()
    updated = scheduler.update_from_output(output, ModelRunnerOutput(sampled_token_ids={"a": sampled}))
    assert updated == [request]
    return scheduler, request


def test_eos_ends_the_request_and_drops_what_follows():
    scheduler, request = _step(SamplingParams(), [7, EOS, 8])
    assert request.output_token_ids == [7, EOS]
    assert request.status is RequestStatus.FINISHED_STOPPED and request.stop_reason is None
    assert "a" not in scheduler.requests and scheduler.num_free_blocks == scheduler.num_total_blocks


def test_ignore_eos_keeps_going():
    scheduler, request = _step(SamplingParams(ignore_eos=True), [7, EOS, 8])
    assert request.output_token_ids == [7, EOS, 8] and request.status is RequestStatus.RUNNING
    assert "a" in scheduler.requests


def test_a_stop_token_id_is_the_stop_reason():
    _, request = _step(SamplingParams(stop_token_ids=[9]), [7, 9, 8])
    assert request.output_token_ids == [7, 9]
    assert request.status is RequestStatus.FINISHED_STOPPED and request.stop_reason == 9


def test_length_ends_at_max_num_tokens():
    _, request = _step(SamplingParams(), [7, 8, 9], num_tokens_limit=5)  # 3 prompt tokens + 2
    assert request.output_token_ids == [7, 8]
    assert request.status is RequestStatus.FINISHED_LENGTH

"""`OutputProcessor`: detokenizes the tokens the scheduler appended, checks stop strings, and only
reports what ended (the scheduler's requests are left as they are); a finished request's output is
taken once and then forgotten."""

from __future__ import annotations

import pytest

from helix_server.engine.output_processor import OutputProcessor
from helix_server.engine.request_state import RequestState
from helix_server.engine.tokenizer import Tokenizer
from helix_server.sampling_params import SamplingParams
from helix_server.scheduler.request import Request, RequestStatus
from tests.engine.test_tokenizer import build_byte_level


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return build_byte_level(tmp_path_factory.mktemp("byte_level"))


def _add(processor: OutputProcessor, request_id: str, prompt: list[int], params: SamplingParams) -> Request:
    request = Request(request_id, prompt, params, parent_id=request_id)
    processor.add_request(RequestState(request_id, prompt, params, [processor.new_sequence(request)], 0.0))
    return request


def test_a_stop_string_is_reported_and_the_scheduler_request_left_alone(tok):
    processor = OutputProcessor(tok)
    text = "hello world, bye"
    ids = tok.encode(text)
    stopped = _add(processor, "s", ids[:1], SamplingParams(stop=["world"]))
    plain = _add(processor, "p", ids[:1], SamplingParams())
    for request in (stopped, plain):
        request.append_output_token_ids(ids[1:])
    status_before = stopped.status
    result = processor.process_outputs([stopped, plain], {})
    assert result.stopped == [("s", RequestStatus.FINISHED_STOPPED)]
    assert set(result.touched) == {"s", "p"} and not result.failed
    assert stopped.status == status_before  # reporting only: the engine finishes it in the scheduler
    output = processor.take_output(result.touched["s"])
    assert output.finished and output.outputs[0].stop_reason == "world"
    assert "world" not in output.outputs[0].text
    assert "s" not in processor.requests and "s" not in processor.sequences  # forgotten once finished
    assert "p" in processor.requests and processor.take_output(result.touched["p"]).outputs[0].text


def test_a_detokenization_failure_is_reported_for_that_request_only(tok):
    processor = OutputProcessor(tok)
    ids = tok.encode("abc def")
    bad = _add(processor, "bad", ids[:1], SamplingParams())
    good = _add(processor, "good", ids[:1], SamplingParams())
    for request in (bad, good):
        request.append_output_token_ids(ids[1:])

    def explode(token_ids):
        raise RuntimeError("boom")

    processor.sequences["bad"].detokenizer.add_tokens = explode
    result = processor.process_outputs([bad, good], {})
    assert list(result.failed) == ["bad"] and "boom" in result.failed["bad"]
    assert not result.stopped and "good" in result.touched

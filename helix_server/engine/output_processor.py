"""`OutputProcessor` (vLLM's name): detokenization, stop strings and delta outputs, in one place.

It holds the output side of every live request (a `RequestState` with one `SequenceState` per
sequence, see `request_state.py`). After each step `process_outputs` takes the tokens the scheduler
appended to the updated requests, detokenizes them and checks the stop strings; it only *reports*
what the engine must act on (sequences a stop string ended, requests whose output processing
failed) and never touches the scheduler. `take_output` turns a request's pending deltas into a
`RequestOutput` and forgets the request once it has finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from helix_server.engine.detokenizer import IncrementalDetokenizer
from helix_server.engine.outputs import RequestOutput
from helix_server.engine.request_state import RequestState, SequenceState
from helix_server.engine.tokenizer import Tokenizer
from helix_server.scheduler.request import Request, RequestStatus
from helix_server.step_contract import TokenLogprob

logger = logging.getLogger("helix_server")


@dataclass
class ProcessedOutputs:
    """What one step's output processing reports back to the engine."""

    # Requests (by API request id) that changed and have a delta to emit.
    touched: dict[str, RequestState] = field(default_factory=dict)
    # Sequences (scheduler ids) a stop string ended, with the status to finish them in the scheduler.
    stopped: list[tuple[str, RequestStatus]] = field(default_factory=list)
    # Requests whose output processing raised (e.g. detokenization), with the message.
    failed: dict[str, str] = field(default_factory=dict)


class OutputProcessor:
    """The output state of every live request, keyed by API request id and by sequence id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.sequences: dict[str, SequenceState] = {}
        self.parent_of: dict[str, RequestState] = {}

    def new_sequence(self, request: Request) -> SequenceState:
        """The output state of one scheduler `Request` (its detokenizer and stop strings)."""
        params = request.sampling_params
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            request.prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        return SequenceState(request, detokenizer)

    def add_request(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        for seq in state.sequences:
            self.sequences[seq.request.request_id] = seq
            self.parent_of[seq.request.request_id] = state

    def process_outputs(
        self, updated: list[Request], logprobs: dict[str, list[TokenLogprob]]
    ) -> ProcessedOutputs:
        """Detokenize and stop-check the new tokens of the requests the scheduler just updated."""
        result = ProcessedOutputs()
        for request in updated:
            seq_id = request.request_id
            seq = self.sequences.get(seq_id)
            if seq is None or seq.finished:
                continue
            state = self.parent_of[seq_id]
            if state.request_id in result.failed:  # the request fails whole: its other sequences stop
                continue
            result.touched[state.request_id] = state
            try:
                seq.process_new_tokens(logprobs.get(seq_id))
                if seq.finished and not request.is_finished:  # a stop string
                    result.stopped.append((seq_id, seq.finish_status))
            except Exception as exc:  # e.g. detokenization: fails this request only
                logger.exception("request %s failed while processing its output", state.request_id)
                result.failed[state.request_id] = f"output processing failed: {exc}"
        return result

    def take_output(self, state: RequestState) -> RequestOutput | None:
        """The request's delta output (None if nothing changed); a finished request is forgotten."""
        output = state.take_output()
        if state.finished:
            self.requests.pop(state.request_id, None)
            for seq in state.sequences:
                self.sequences.pop(seq.request.request_id, None)
                self.parent_of.pop(seq.request.request_id, None)
        return output

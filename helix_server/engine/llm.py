"""The offline Python API: `LLM(model=PATH).generate(prompts, params)` and `.chat(messages, params)`.

All prompts go through one `EngineCore` at once, so they are continuously batched exactly as they
would be by the server. Returns whole completions (the engine's deltas accumulated), in input order.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from helix_server.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from helix_server.default_model import with_default_model
from helix_server.engine.core import EngineCore
from helix_server.engine.outputs import CompletionOutput, RequestOutput, merge_delta
from helix_server.engine.tokenizer import Tokenizer
from helix_server.platform.process_policy import prepare_process
from helix_server.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict


class LLM:
    """A model loaded for offline generation.

    Keyword arguments are the engine settings (the same as the server's flags): `dtype`, `device`,
    `max_model_len`, `seed`, `block_size`, `num_kv_blocks`, `kv_cache_memory`,
    `max_num_batched_tokens`, `max_num_seqs`, `max_n`, `tokenizer`, and speculative decoding's
    `speculative_method`, `draft_model`, `num_speculative_tokens` (an int or "auto"),
    `max_speculative_tokens`, `ngram_min`, `ngram_max`, `draft_layers`. `model=None` loads the
    default model, SmolLM2-135M-Instruct (`"helix-pycoder-tiny"`: the tiny pair that ships inside
    helix, with its draft model as speculative proposer unless speculative decoding is configured).
    """

    def __init__(self, model: str | None = None, **settings) -> None:
        self.config = with_default_model(engine_config_from_settings(model, **settings))
        prepare_process(self.config.model.device)
        self.engine = EngineCore(self.config)

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); one `RequestOutput` per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_prompts = [p if not isinstance(p, str) else self.engine.tokenizer.encode(p) for p in prompts]
        return self._run(token_prompts, sampling_params)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_prompts = [
            self.engine.tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]
        return self._run(token_prompts, sampling_params)

    def _run(
        self,
        prompts: list[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params must be one value or one per prompt")
        batch_id = uuid.uuid4().hex[:8]  # fresh ids: no id can be in use
        ids = [f"{batch_id}-{i}" for i in range(len(prompts))]
        # Every prompt is validated before any is queued.
        requests = [self.engine.input_processor.process(*args) for args in zip(ids, prompts, params_list)]
        results = {rid: _Accumulator(rid, prompt, params.n) for rid, prompt, params in zip(ids, prompts, params_list)}
        try:
            for request in requests:
                self.engine.add_core_request(request)
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    results[output.request_id].add(output)
        finally:
            for rid in ids:
                self.engine.abort_request(rid)
        return [results[rid].result() for rid in ids]


class _Accumulator:
    """Builds a whole `RequestOutput` from the engine's deltas."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], n: int) -> None:
        self.output = RequestOutput(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            outputs=[CompletionOutput(index=i) for i in range(n)],
            finished=False,
        )

    def add(self, delta: RequestOutput) -> None:
        out = self.output
        out.finished = delta.finished
        out.num_cached_tokens = delta.num_cached_tokens
        out.metrics = delta.metrics
        out.error = delta.error
        if delta.prompt_logprobs is not None:
            out.prompt_logprobs = delta.prompt_logprobs
        for d in delta.outputs:
            merge_delta(out.outputs[d.index], d)

    def result(self) -> RequestOutput:
        return self.output


def engine_config_from_settings(model: str | None = None, **settings) -> EngineConfig:
    """An `EngineConfig` from flat keyword settings (unknown names are an error)."""
    sections = {
        "model": (ModelConfig, {"model": model}),
        "cache": (CacheConfig, {}),
        "scheduler": (SchedulerConfig, {}),
        "speculative": (SpeculativeConfig, {}),
    }
    for key, value in settings.items():
        for cls, values in sections.values():
            if key in cls.__struct_fields__:
                values[key] = value
                break
        else:
            raise TypeError(f"unknown engine setting {key!r}")
    return EngineConfig(**{name: cls(**values) for name, (cls, values) in sections.items()})

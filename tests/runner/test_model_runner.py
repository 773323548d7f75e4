"""`ModelRunner` on its own: it turns a `SchedulerOutput` into a forward and samples, step by step,
the same greedy tokens as transformers; a prompt split in chunks samples only at its end."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from helix_server.config import SchedulerConfig
from helix_server.engine.llm import engine_config_from_settings
from helix_server.runner.loader import load_model
from helix_server.runner.model_runner import ModelRunner
from helix_server.sampling_params import SamplingParams
from helix_server.scheduler import Request, Scheduler


def _hf_greedy(model_dir, prompt: list[int], num: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_runner_steps_match_transformers_greedy(tiny_model_dir):
    prompt = [5, 17, 42, 99, 3, 250, 7, 61, 300, 12, 8]
    config = engine_config_from_settings(str(tiny_model_dir), device="cpu", dtype="float32", block_size=4, num_kv_blocks=32)
    loaded = load_model(config)
    runner = ModelRunner.from_loaded(loaded, config, eos_token_ids=set())
    assert runner.speculator is None and runner.num_speculative_tokens == 0
    # A 4-token budget: the 11-token prompt runs as chunks of 4, 4 and 3 before the first sample.
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=4), 4, 32)
    request = Request("a", prompt, SamplingParams(temperature=0.0, ignore_eos=True))
    scheduler.add_request(request)
    sampled_per_step = []
    while request.num_output_tokens < 5:
        scheduler_output = scheduler.schedule()
        output = runner.execute_model(scheduler_output)
        sampled_per_step.append(output.sampled_token_ids.get("a"))
        scheduler.update_from_output(scheduler_output, output)
    assert sampled_per_step[:2] == [None, None]  # prompt chunks sample nothing
    assert all(len(tokens) == 1 for tokens in sampled_per_step[2:])
    assert request.output_token_ids == _hf_greedy(tiny_model_dir, prompt, 5)

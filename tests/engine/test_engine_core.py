"""EngineCore end to end on a tiny model: n > 1, aborts in every phase, stops, seeds, logprobs,
validation, and failure isolation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helix_server import LLM, SamplingParams
from helix_server.engine.core import EngineCore
from helix_server.engine.llm import engine_config_from_settings
from helix_server.errors import ParameterError

PROMPT = [17, 301, 45, 99, 260, 12, 7, 480, 33, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 9]


def _engine(model_dir, **settings) -> EngineCore:
    settings.setdefault("dtype", "float32")
    settings.setdefault("num_kv_blocks", 64)
    settings.setdefault("block_size", 8)
    return EngineCore(engine_config_from_settings(str(model_dir), **settings))


def _drain(engine: EngineCore, max_steps: int = 2000) -> dict[str, list]:
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError("engine did not finish")


def _all_free(engine: EngineCore) -> bool:
    return engine.scheduler.num_free_blocks == engine.scheduler.num_total_blocks


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(model=str(tiny_model_dir), dtype="float32", num_kv_blocks=128, block_size=8)


def test_n_sequences_share_the_prompt_blocks(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    engine.add_request("r", PROMPT, SamplingParams(temperature=0, n=3, max_tokens=6, ignore_eos=True))
    first = engine.step()  # the leader prefills the whole prompt and forks the followers
    manager = engine.scheduler.kv_cache_manager
    leader = manager.get_block_ids("r#0")
    shared = (len(PROMPT) - 1) // 8  # full blocks before the last prompt token
    assert shared == 2
    for follower in ("r#1", "r#2"):
        assert manager.get_block_ids(follower)[:shared] == leader[:shared]
    assert all(manager.block_pool.blocks[b].ref_cnt == 3 for b in leader[:shared])
    outputs = _drain(engine)
    texts = {}
    for output in first + outputs["r"]:
        for seq in output.outputs:
            texts.setdefault(seq.index, []).extend(seq.token_ids)
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) == 6
    assert _all_free(engine)


def test_n_sampled_sequences_equal_single_runs_with_seed_plus_index(llm):
    params = SamplingParams(temperature=1.0, n=3, seed=1234, max_tokens=12, ignore_eos=True)
    together = llm.generate([PROMPT], params)[0].outputs
    for index in range(3):
        alone = llm.generate(
            [PROMPT], SamplingParams(temperature=1.0, seed=1234 + index, max_tokens=12, ignore_eos=True)
        )[0].outputs[0]
        assert together[index].token_ids == alone.token_ids
    assert together[0].token_ids != together[1].token_ids


def test_seeded_output_is_the_same_whatever_else_is_in_the_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=20, ignore_eos=True)
    alone = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    others = [
        ([5, 6, 7, 8] * 9, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)),
        ([40, 41], SamplingParams(temperature=0.5, seed=7, max_tokens=5, ignore_eos=True)),
        ([300] * 50, SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)),
    ]
    for position in range(len(others) + 1):
        batch = [(p, s) for p, s in others]
        batch.insert(position, (PROMPT, params))
        results = llm.generate([p for p, _ in batch], [s for _, s in batch])
        assert results[position].outputs[0].token_ids == alone


@pytest.mark.parametrize("phase", ["waiting", "mid_prefill", "decoding", "n_followers"])
def test_abort_frees_every_block_in_every_phase(tiny_model_dir, phase):
    engine = _engine(tiny_model_dir, max_num_batched_tokens=8)
    n = 3 if phase == "n_followers" else 1
    engine.add_request("victim", PROMPT * 2, SamplingParams(temperature=0, n=n, max_tokens=50, ignore_eos=True))
    engine.add_request("bystander", PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    steps = {"waiting": 0, "mid_prefill": 2, "decoding": 8, "n_followers": 7}[phase]
    for _ in range(steps):
        engine.step()
    if phase == "mid_prefill":
        assert 0 < engine.scheduler.get_request("victim").num_computed_tokens < len(PROMPT) * 2
    if phase == "decoding":
        assert engine.scheduler.get_request("victim").num_output_tokens > 0
    final = engine.abort_request("victim")
    assert final is not None and final.finished
    assert {seq.finish_reason for seq in final.outputs} == {"abort"}
    assert engine.abort_request("victim") is None  # unknown now: harmless
    outputs = _drain(engine)
    assert outputs["bystander"][-1].outputs[0].finish_reason == "length"
    assert _all_free(engine)


def test_stop_string_spanning_tokens_is_cut_and_reported(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate([PROMPT], params)[0].outputs[0].text
    assert len(full) > 20
    stop = full[10:16]
    result = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))
    seq = result[0].outputs[0]
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert seq.text == full[: full.index(stop)]
    kept = llm.generate(
        [PROMPT],
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
    )[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_eos_and_min_tokens(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    stop_id = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_id)
    seq = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0].outputs[0]
    assert seq.token_ids == greedy.token_ids[: first + 1]
    assert seq.finish_reason == "stop" and seq.stop_reason == stop_id

    # A huge bias makes EOS (id 0) the greedy choice: it stops at once, unless min_tokens holds it off.
    eos_first = SamplingParams(temperature=0, max_tokens=10, logit_bias={0: 100})
    seq = llm.generate([PROMPT], eos_first)[0].outputs[0]
    assert seq.token_ids == [0] and seq.finish_reason == "stop" and seq.stop_reason is None and seq.text == ""
    held = SamplingParams(temperature=0, max_tokens=10, logit_bias={0: 100}, min_tokens=4)
    seq = llm.generate([PROMPT], held)[0].outputs[0]
    assert len(seq.token_ids) == 5 and seq.token_ids[-1] == 0 and 0 not in seq.token_ids[:4]
    ignored = SamplingParams(temperature=0, max_tokens=6, logit_bias={0: 100}, ignore_eos=True)
    seq = llm.generate([PROMPT], ignored)[0].outputs[0]
    assert seq.token_ids == [0] * 6 and seq.finish_reason == "length"


def test_stop_strings_wait_for_min_tokens(llm):
    full = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    early = full.text[2:5]  # completes within the first few tokens
    assert early and full.text.index(early) == 2
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[early]))
    assert stopped[0].outputs[0].text == full.text[:2]
    held = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[early], min_tokens=25)
    )[0].outputs[0]
    assert len(held.token_ids) >= 25 and held.text.startswith(full.text[:5])


def test_max_tokens_none_runs_to_the_context_limit(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=40, num_kv_blocks=32)
    seq = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0].outputs[0]
    assert len(PROMPT) + len(seq.token_ids) == 40 and seq.finish_reason == "length"


def test_logprobs_and_prompt_logprobs_match_transformers(llm, tiny_model_dir):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=5, prompt_logprobs=2)
    result = llm.generate([PROMPT], params)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    seq = result.outputs[0]
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT + seq.token_ids])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(PROMPT)
    for position, entry in enumerate(result.prompt_logprobs[1:], start=1):
        token = PROMPT[position]
        assert entry.token_id == token
        assert abs(entry.logprob - reference[position - 1, token].item()) < 1e-4
        assert len(entry.top) == 2
    for i, entry in enumerate(seq.logprobs):
        row = reference[len(PROMPT) - 1 + i]
        assert entry.token_id == seq.token_ids[i] and entry.rank == 1
        assert abs(entry.logprob - row.max().item()) < 1e-4
        top_ids = [t for t, _ in entry.top]
        assert top_ids == torch.topk(row, 5).indices.tolist()


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        ([], SamplingParams(), "prompt"),
        ([1, 2, 512], SamplingParams(), "prompt"),
        ([1, -1], SamplingParams(), "prompt"),
        (PROMPT, SamplingParams(n=17), "n"),
        (PROMPT, SamplingParams(max_tokens=300), "prompt"),
        ([5] * 256, SamplingParams(max_tokens=1), "prompt"),
        (PROMPT, SamplingParams(logit_bias={600: 1.0}), "logit_bias"),
        (PROMPT, SamplingParams(stop_token_ids=[9999]), "stop_token_ids"),
    ],
)
def test_invalid_requests_are_refused_with_the_parameter_named(tiny_model_dir, prompt, params, param):
    engine = _engine(tiny_model_dir, num_kv_blocks=64)
    with pytest.raises(ParameterError) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.param == param
    assert not engine.has_unfinished_requests() and _all_free(engine)


def test_context_error_uses_openai_wording(tiny_model_dir):
    engine = _engine(tiny_model_dir, num_kv_blocks=64)
    with pytest.raises(ParameterError) as info:
        engine.add_request("bad", PROMPT, SamplingParams(max_tokens=1000))
    assert info.value.code == "context_length_exceeded"
    assert info.value.message.startswith("This model's maximum context length is 256 tokens")


def test_request_that_can_never_fit_the_pool_is_refused(tiny_model_dir):
    engine = _engine(tiny_model_dir, num_kv_blocks=4, block_size=8)  # 32 slots in all
    with pytest.raises(ParameterError) as info:
        engine.add_request("big", PROMPT, SamplingParams(max_tokens=20))
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 32 tokens" in info.value.message


def test_an_exception_in_one_request_fails_only_that_request(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("ok", PROMPT, params)
    engine.add_request("broken", PROMPT[:7], params)

    def explode(token_ids):
        raise RuntimeError("boom")

    engine.output_processor.sequences["broken"].detokenizer.add_tokens = explode
    outputs = _drain(engine)
    assert outputs["broken"][-1].outputs[0].finish_reason == "error"
    assert "boom" in outputs["broken"][-1].error
    ok_tokens = [t for o in outputs["ok"] for t in o.outputs[0].token_ids]
    assert len(ok_tokens) == 8 and outputs["ok"][-1].outputs[0].finish_reason == "length"
    assert _all_free(engine)


def test_a_failed_model_step_fails_its_batch_and_the_engine_goes_on(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", PROMPT, params)
    real = engine.runner.execute_model
    engine.runner.execute_model = lambda _: (_ for _ in ()).throw(RuntimeError("device lost"))
    outputs = engine.step()
    assert outputs[0].outputs[0].finish_reason == "error" and "device lost" in outputs[0].error
    engine.runner.execute_model = real
    assert _all_free(engine)
    engine.add_request("b", PROMPT, params)
    outputs = _drain(engine)
    assert outputs["b"][-1].outputs[0].finish_reason == "length"


def test_duplicate_request_id_is_refused(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    engine.add_request("same", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(ParameterError):
        engine.add_request("same", PROMPT, SamplingParams(max_tokens=2))

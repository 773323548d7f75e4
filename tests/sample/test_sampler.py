"""Tests for the sampler: processors, filters, the exponential race, seeds and logprobs (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from helix_server.sample.sampler import Sampler, greedy_tokens
from helix_server.sample.sampling_row import SamplingRow
from helix_server.sampling_params import SamplingParams

CPU = torch.device("cpu")
# A known distribution over 6 tokens with distinct probabilities (sums to 1).
KNOWN = [0.40, 0.25, 0.15, 0.10, 0.06, 0.04]


def row(prompt=(0,), output=(), seed=None, **params) -> SamplingRow:
    p = SamplingParams(seed=seed, **params)
    generator = Sampler.make_generator(seed, CPU) if seed is not None else None
    return SamplingRow(p, list(prompt), list(output), generator)


def known_logits(n: int = 1) -> torch.Tensor:
    return torch.tensor(KNOWN).log().expand(n, -1).clone()  # [n, 6]


def support(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


# ----------------------------------------------------------------------------- greedy, processors


def test_greedy_is_argmax_and_draws_nothing():
    sampler = Sampler(50, {0}, CPU)
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    seeded = row(temperature=0.0, seed=3)
    rows = [row(temperature=0.0) for _ in range(4)] + [seeded]
    shared_state = sampler.generator.get_state()
    own_state = seeded.generator.get_state()
    out = sampler.sample(logits, rows)
    assert [t for t, _ in out] == logits.argmax(-1).tolist()
    assert all(lp is None for _, lp in out)
    assert torch.equal(sampler.generator.get_state(), shared_state)
    assert torch.equal(seeded.generator.get_state(), own_state)


def test_greedy_tokens_break_ties_and_nans_as_argmax():
    """The first of equal maxima wins, and a row with a NaN gives its first NaN, as `argmax`."""
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(2))
    logits[0, [7, 30000]] = 100.0  # a tie: 7
    logits[1, [5, 9]] = float("nan")  # 5
    logits[2, -1] = 100.0  # the last column
    assert greedy_tokens(logits).tolist() == logits.argmax(-1).tolist() == [7, 5, 49151, logits[3].argmax()]


def test_logit_bias_hand_computation():
    sampler = Sampler(4, set(), CPU)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]] * 3)
    rows = [
        row(temperature=0.0, logit_bias={2: 1.5, 99: 100.0}),  # 2 -> 3.5 > 3.0 wins; id 99 ignored
        row(temperature=0.0, logit_bias={2: 0.5}),  # 2 -> 2.5 < 3.0: argmax stays 1
        row(temperature=0.0, logit_bias={1: -2.5, 3: 2.0}),  # [1, 0.5, 2, 2.5] -> 3
    ]
    processed = sampler.process_logits(logits, rows)
    assert processed.tolist() == [[1.0, 3.0, 3.5, 0.5], [1.0, 3.0, 2.5, 0.5], [1.0, 0.5, 2.0, 2.5]]
    assert [t for t, _ in sampler.sample(logits, rows)] == [2, 1, 3]
    assert logits.tolist()[0] == [1.0, 3.0, 2.0, 0.5]  # input untouched


def test_repetition_penalty_positive_and_negative_logits():
    sampler = Sampler(6, set(), CPU)
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    # prompt {0, 3}, output {1}: seen logits 2.0 -> 1.0 (divided), -1.0 -> -2.0 and -0.5 -> -1.0
    # (multiplied); unseen 0.5, 3.0, 1.0 unchanged.
    r = row(prompt=[0, 3], output=[1, 1], repetition_penalty=2.0)
    assert sampler.process_logits(logits, [r]).tolist() == [[1.0, -2.0, 0.5, -1.0, 3.0, 1.0]]
    # p < 1 favours repeats: 2.0 / 0.5 = 4.0, -1.0 * 0.5 = -0.5.
    r = row(prompt=[0], output=[1], repetition_penalty=0.5)
    assert sampler.process_logits(logits, [r]).tolist() == [[4.0, -0.5, 0.5, -0.5, 3.0, 1.0]]


def test_frequency_and_presence_penalties_count_output_only():
    sampler = Sampler(6, set(), CPU)
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    # Output counts: token 2 x3, token 3 x1; token 0 is only in the prompt and is not penalised.
    r = row(prompt=[0, 0, 2], output=[2, 2, 2, 3], frequency_penalty=0.5, presence_penalty=0.25)
    # token 2: 0.5 - 0.5*3 - 0.25 = -1.25; token 3: -0.5 - 0.5*1 - 0.25 = -1.25
    assert sampler.process_logits(logits, [r]).tolist() == [[2.0, -1.0, -1.25, -1.25, 3.0, 1.0]]
    # Negative penalties reward repeats; repetition applies first, then the additive ones:
    # token 2: 0.5 / 2 = 0.25, then + 0.5*3 = 1.75; token 0 (prompt only): 2.0 / 2 = 1.0.
    r = row(prompt=[0], output=[2, 2, 2], frequency_penalty=-0.5, repetition_penalty=2.0)
    assert sampler.process_logits(logits, [r]).tolist() == [[1.0, -1.0, 1.75, -0.5, 3.0, 1.0]]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    sampler = Sampler(6, {4}, CPU)
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 6.0, 0.5]] * 3)
    rows = [
        row(temperature=0.0, min_tokens=3, stop_token_ids=[3], output=[1, 1]),  # 2 < 3: masked
        row(temperature=0.0, min_tokens=3, stop_token_ids=[3], output=[1, 1, 1]),  # reached
        row(temperature=0.0, min_tokens=2, ignore_eos=True, output=[]),  # EOS masked despite ignore_eos
    ]
    processed = sampler.process_logits(logits, rows)
    inf = float("-inf")
    assert processed.tolist() == [
        [0.0, 1.0, 2.0, inf, inf, 0.5],
        [0.0, 1.0, 2.0, 5.0, 6.0, 0.5],
        [0.0, 1.0, 2.0, 5.0, inf, 0.5],
    ]
    assert [t for t, _ in sampler.sample(logits, rows)] == [2, 4, 3]


# ----------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_k": 1}, {0}),
        ({"top_p": 0.6}, {0, 1}),  # 0.40 < 0.6, 0.65 crosses: the crossing token 1 is kept
        ({"top_p": 0.66}, {0, 1, 2}),  # 0.65 < 0.66: token 2 crosses
        ({"top_p": 0.3}, {0}),  # the top token alone exceeds top_p: always keep one
        ({"top_p": 1e-6}, {0}),
        ({"min_p": 0.3}, {0, 1, 2}),  # keep p >= 0.12
        ({"min_p": 0.2}, {0, 1, 2, 3}),  # keep p >= 0.08
        ({"min_p": 1.0}, {0}),
        # Order min_p -> top_k -> top_p, top_p on the renormalised survivors:
        # top_k 4 -> [.444, .278, .167, .111]: cumulative .444, .722 crosses 0.7 -> {0, 1}
        # (top_p on the original distribution would keep {0, 1, 2}).
        ({"top_k": 4, "top_p": 0.7}, {0, 1}),
        # min_p 0.3 -> [.5, .3125, .1875]: .5, .8125 crosses 0.75 -> {0, 1} (original: {0, 1, 2}).
        ({"min_p": 0.3, "top_p": 0.75}, {0, 1}),
        ({"top_k": -1, "top_p": 1.0, "min_p": 0.0}, {0, 1, 2, 3, 4, 5}),
    ],
)
def test_filters_keep_exact_support(params, kept):
    sampler = Sampler(6, set(), CPU, seed=7)
    logits = known_logits()
    rows = [row(**params)]
    probs = sampler.probs(sampler.process_logits(logits, rows), rows)[0]
    assert support(probs) == kept
    expected = torch.tensor([p if i in kept else 0.0 for i, p in enumerate(KNOWN)])
    torch.testing.assert_close(probs, expected / expected.sum())
    # Sampling never leaves the support and, over 4,000 draws, visits all of it.
    drawn = {t for t, _ in sampler.sample(logits.expand(4000, -1), rows * 4000)}
    assert drawn == kept


def test_probs_temperature_and_greedy_rows():
    sampler = Sampler(6, set(), CPU)
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    rows = [row(temperature=2.0), row(temperature=0.0), row(temperature=0.5, top_k=6)]
    probs = sampler.probs(logits, rows)
    torch.testing.assert_close(probs[0], torch.softmax(logits[0] / 2.0, -1))
    assert probs[1].tolist() == torch.nn.functional.one_hot(logits[1].argmax(), 6).float().tolist()
    torch.testing.assert_close(probs[2], torch.softmax(logits[2] / 0.5, -1))


# ----------------------------------------------------------------------------- randomness


def _run_steps(sampler: Sampler, target: SamplingRow, others: list[SamplingRow], position: int, steps: int):
    """Sample `steps` tokens for `target` placed at `position` among `others`; return its tokens."""
    vocab = 64
    step_logits = torch.Generator().manual_seed(123)
    other_logits = torch.Generator().manual_seed(position * 1000 + len(others))
    for _ in range(steps):
        mine = torch.randn(1, vocab, generator=step_logits) * 2.0  # same every run
        rest = torch.randn(len(others), vocab, generator=other_logits) * 2.0
        batch = torch.cat([rest[:position], mine, rest[position:]])
        rows = others[:position] + [target] + others[position:]
        results = sampler.sample(batch, rows)
        for r, (token, _) in zip(rows, results):
            r.output_token_ids.append(token)
    return target.output_token_ids


def test_seeded_row_is_reproducible_across_batch_compositions():
    def target(seed=1234):
        return row(seed=seed, temperature=0.9, top_k=40, top_p=0.95, presence_penalty=0.5)

    alone = _run_steps(Sampler(64, set(), CPU, seed=0), target(), [], 0, 40)
    compositions = [
        ([row(), row(temperature=0.0), row(seed=99)], 1),
        ([row(seed=1234, temperature=0.3), row(temperature=0.0, logprobs=3)], 0),
        ([row(min_p=0.1) for _ in range(4)] + [row(temperature=0.0)], 5),
    ]
    for seed, (others, position) in enumerate(compositions, start=1):
        got = _run_steps(Sampler(64, set(), CPU, seed=seed), target(), others, position, 40)
        assert got == alone
    # Sanity: the test can tell seeds apart.
    assert _run_steps(Sampler(64, set(), CPU), target(seed=4321), [], 0, 40) != alone


def test_make_generator_accepts_any_int_deterministically():
    def first_draws(seed):
        return torch.rand(4, generator=Sampler.make_generator(seed, CPU)).tolist()

    for seed in (0, 7, -1, -(2**70), 2**63, 2**64 + 5, 10**30):
        assert first_draws(seed) == first_draws(seed)
    assert first_draws(5) != first_draws(6)
    assert first_draws(2**64 + 5) == first_draws(5)  # reduced modulo 2**64


def _check_counts(counts: torch.Tensor, probs: torch.Tensor, samples: int) -> None:
    """Chi-square goodness of fit (scipy), else every count within 5 standard deviations + 1."""
    kept = probs > 0
    assert counts[~kept].sum() == 0
    expected = probs[kept] * samples
    observed = counts[kept].to(torch.float64)
    try:
        from scipy.stats import chisquare
    except ImportError:
        sd = (expected * (1 - probs[kept])).sqrt()
        assert ((observed - expected).abs() <= 5 * sd + 1).all(), (observed, expected)
        return
    expected = expected.to(torch.float64)
    expected = expected * observed.sum() / expected.sum()  # scipy wants exactly equal totals
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_distribution_matches_probs(seeded):
    samples = 12_000
    sampler = Sampler(10, set(), CPU, seed=11)
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, 1.5, -1.0, 0.7, -3.0, 0.1]])
    params = {"temperature": 0.8, "top_k": 8, "top_p": 0.97}
    # Unseeded rows share one block draw; seeded rows each draw from their own generator.
    rows = [row(seed=i if seeded else None, **params) for i in range(samples)]
    probs = sampler.probs(logits, rows[:1])[0]  # [10]
    assert 2 <= len(support(probs)) < 10
    tokens = torch.tensor([t for t, _ in sampler.sample(logits.expand(samples, -1), rows)])
    _check_counts(torch.bincount(tokens, minlength=10), probs, samples)


# ----------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_with_rank_and_ordered_top():
    sampler = Sampler(40, {0}, CPU, seed=3)
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(5)) * 3
    rows = [
        row(temperature=0.0, logprobs=20, logit_bias={7: 50.0}),  # bias changes choice, not logprob
        row(temperature=1.0, logprobs=0),
        row(temperature=0.7, logprobs=5, repetition_penalty=1.3, output=[1, 2]),
        row(temperature=0.0),  # no logprobs requested
    ]
    out = sampler.sample(logits, rows)
    assert out[0][0] == 7
    assert out[3][1] is None
    raw = torch.log_softmax(logits, -1)
    for i, n in enumerate([20, 0, 5]):
        token, lp = out[i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert lp.rank == 1 + int((raw[i] > raw[i, token]).sum())
        assert len(lp.top) == n
        assert [t for t, _ in lp.top] == raw[i].argsort(descending=True)[:n].tolist()
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        for t, v in lp.top:
            assert v == pytest.approx(raw[i, t].item(), abs=1e-6)
    assert out[0][1].rank > 1  # token 7 is not the raw argmax for this seed


def test_logprobs_of_prompt_positions():
    sampler = Sampler(30, set(), CPU)
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    raw = torch.log_softmax(logits.float(), -1)
    tokens = [4, 29, raw[2].argmax().item()]
    out = sampler.logprobs_of(logits, tokens, [2, 0, 3])
    assert [lp.token_id for lp in out] == tokens
    assert [len(lp.top) for lp in out] == [2, 0, 3]
    assert out[2].rank == 1 and out[2].top[0][0] == tokens[2]
    for i, lp in enumerate(out):
        assert lp.logprob == pytest.approx(raw[i, tokens[i]].item(), abs=1e-6)
        assert lp.rank == 1 + int((raw[i] > raw[i, tokens[i]]).sum())
    assert sampler.logprobs_of(logits[:0], [], 1) == []


# ----------------------------------------------------------------------------- shapes and batches


def test_logits_wider_than_vocab():
    sampler = Sampler(10, {3, 12}, CPU)  # EOS 12 lies beyond the logits width: ignored
    logits = torch.full((3, 16), -5.0)
    logits[:, 15] = 5.0  # a padding column of the LM head is still a token
    rows = [
        row(temperature=0.0, logit_bias={40: 1.0}),
        row(temperature=1.0, logprobs=16, min_tokens=2),
        row(temperature=0.5, top_k=12, frequency_penalty=0.1, output=[15, 100]),
    ]
    out = sampler.sample(logits, rows)
    assert [t for t, _ in out] == [15, 15, 15]
    assert len(out[1][1].top) == 16 and out[1][1].top[0][0] == 15
    assert sampler.probs(logits, rows).shape == (3, 16)


def test_mixed_batch_equals_rows_alone():
    vocab = 32
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(9)).to(torch.float16)

    def rows():
        return [
            row(temperature=0.0, logprobs=2),
            row(seed=1, temperature=0.8, top_k=5, logit_bias={3: 2.0}),
            row(temperature=0.0, repetition_penalty=2.0, output=[int(logits[2].float().argmax())]),
            row(seed=2, min_p=0.2, top_p=0.9, logprobs=4, min_tokens=4, stop_token_ids=[1]),
            row(seed=3, temperature=1.3, presence_penalty=1.0, frequency_penalty=0.5, output=[0, 0, 5]),
            row(temperature=0.0, min_tokens=1),
        ]

    batch = Sampler(vocab, {0}, CPU).sample(logits, rows())
    alone = [Sampler(vocab, {0}, CPU).sample(logits[i : i + 1], [r])[0] for i, r in enumerate(rows())]
    assert batch == alone
    assert batch[2][0] != int(logits[2].float().argmax())  # the penalty moved the argmax
    assert batch[5][0] != 0  # EOS masked under min_tokens


def test_process_logits_passthrough_and_no_mutation():
    sampler = Sampler(8, {1}, CPU)
    logits = torch.randn(2, 8)
    plain = sampler.process_logits(logits, [row(), row(temperature=0.0)])
    assert plain.dtype == torch.float32 and torch.equal(plain, logits)
    before = logits.clone()
    sampler.process_logits(logits, [row(min_tokens=1), row(presence_penalty=1.0, output=[2])])
    assert torch.equal(logits, before)
    assert math.isinf(sampler.process_logits(logits, [row(min_tokens=1), row()])[0, 1].item())

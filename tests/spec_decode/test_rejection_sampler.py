"""Tests for the rejection sampler: exact greedy semantics, seeds, padding, and the distribution.

Statistical tests. Every distribution check is a chi-square goodness-of-fit test on >= 10,000
independent samples (one batch row per trial, fixed seeds) and asserts p-value > 1e-3. Bins whose
expected count is below 5 are pooled into one bin (and that pool into the next-smallest bin while it
is still below 5); a sample in a bin of probability 0 fails outright. The p-value comes from the
regularized upper incomplete gamma function, computed here (series / continued fraction with
math.lgamma), so scipy is not needed; `test_chi_square_helper` checks it against closed forms.
Acceptance rates are checked against sum_x min(p(x), q(x)) within 5 binomial standard deviations.
"""

from __future__ import annotations

import math

import pytest
import torch

from helix_server.spec_decode.rejection_sampler import (
    PLACEHOLDER_TOKEN_ID,
    RejectionSamplerInput,
    rejection_sample,
    rejection_sample_tensors,
)
from tests.stats import chi2_sf, chi_square_pvalue

P_VALUE_BOUND = 1e-3
SIGMAS = 5.0


def test_chi_square_helper():
    for x in (0.1, 1.0, 3.0, 10.0, 40.0):
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
        assert chi2_sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-9)
    assert chi2_sf(21.666, 9) == pytest.approx(0.01, rel=1e-3)  # table value
    # Power: the classic bug (recovering from p instead of max(0, p - q)) is rejected at N = 20,000.
    p, q = _random_dist(8, 11), _random_dist(8, 12)
    wrong = torch.minimum(p, q) + (1 - torch.minimum(p, q).sum()) * p
    counts = _sample(wrong.expand(20_000, -1), torch.Generator().manual_seed(0)).bincount(minlength=8)
    assert chi_square_pvalue([(counts.tolist(), p.tolist())]) < P_VALUE_BOUND
    counts = _sample(p.expand(20_000, -1), torch.Generator().manual_seed(0)).bincount(minlength=8)
    assert chi_square_pvalue([(counts.tolist(), p.tolist())]) > P_VALUE_BOUND


# ----------------------------------------------------------------------------- helpers


def _random_dist(vocab: int, seed: int) -> torch.Tensor:
    """A random distribution `[V]` (normalised exponentials: Dirichlet(1))."""
    x = torch.empty(vocab).exponential_(generator=torch.Generator().manual_seed(seed))
    return x / x.sum()


def _dist(*weights: float) -> torch.Tensor:
    x = torch.tensor(weights, dtype=torch.float32)
    return x / x.sum()


def _sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of `probs` `[N, V]` by inverse CDF (test-side, independent of the code)."""
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(probs.shape[0], generator=generator)
    return (cdf < u.unsqueeze(1)).sum(-1).clamp(max=probs.shape[1] - 1)


def _run(target, draft, drafts, num_drafts, seed=0, generators=None):
    """All rows random; the shared generator seeded with `seed`."""
    rows, shared = target.shape[0], torch.Generator().manual_seed(seed)
    generators = generators or [None] * rows
    return rejection_sample(RejectionSamplerInput(target, draft, drafts, num_drafts, [False] * rows, generators, shared))


def _one_hot(token: int, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), vocab).to(torch.float32)


def _acceptance_ok(accepted: int, trials: int, beta: float) -> bool:
    if beta in (0.0, 1.0):
        return accepted == beta * trials
    return abs(accepted / trials - beta) <= SIGMAS * math.sqrt(beta * (1 - beta) / trials)


# ----------------------------------------------------------------------------- distribution of the output

N = 20_000
V = 8
_P = _random_dist(V, 1)
CASES = {
    "random": (_P, _random_dist(V, 2)),
    "disjoint": (_dist(4, 3, 2, 1, 0, 0, 0, 0), _dist(0, 0, 0, 0, 1, 2, 3, 4)),
    "one_hot_on_mode": (_P, _one_hot(int(_P.argmax()), V)),
    "one_hot_off_mode": (_P, _one_hot(int(_P.argmin()), V)),
    "one_hot_where_p_is_zero": (_dist(1, 2, 3, 4, 5, 6, 7, 0), _one_hot(7, V)),
    "q_zero_where_p_positive": (_P, _dist(3, 0, 1, 0, 2, 0, 5, 0)),
    "p_equals_q": (_P, _P.clone()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_token_is_distributed_as_p_and_acceptance_matches(case):
    p, q = CASES[case]
    gen = torch.Generator().manual_seed(7)
    drafts = _sample(q.expand(N, V), gen).unsqueeze(1)  # [N, 1]
    target = torch.stack([p, _random_dist(V, 3)]).expand(N, 2, V)  # [N, 2, V]: p, then the bonus p
    out, accepted = _run(target, q.expand(N, 1, V), drafts, [1] * N, seed=8)
    first = torch.tensor([row[0] for row in out])
    assert chi_square_pvalue([(first.bincount(minlength=V).tolist(), p.tolist())]) > P_VALUE_BOUND
    beta = float(torch.minimum(p, q).sum())
    assert _acceptance_ok(sum(accepted), N, beta), (sum(accepted) / N, beta)
    if case == "p_equals_q":
        assert all(a == 1 for a in accepted)


def test_joint_two_token_process():
    """2-token drafts with a position-2 target that depends on the first token: the emitted pair
    (continuing rejected rows with one more step) is distributed as p1(a) * p2(b | a), and the second
    token after an accepted first draft is distributed as p2(. | d1)."""
    v, n = 6, 30_000
    gen = torch.Generator().manual_seed(21)
    p1, q1 = _random_dist(v, 22), _random_dist(v, 23)
    p2 = torch.stack([_random_dist(v, 30 + a) for a in range(v)])  # [V, V]: row a = p2(. | a)
    q2 = torch.stack([_random_dist(v, 40 + a) for a in range(v)])
    p3 = torch.stack([_random_dist(v, 50 + a) for a in range(v)])  # bonus, given d2
    d1 = _sample(q1.expand(n, v), gen)
    d2 = _sample(q2[d1], gen)
    target = torch.stack([p1.expand(n, v), p2[d1], p3[d2]], dim=1)  # [N, 3, V]
    draft = torch.stack([q1.expand(n, v), q2[d1]], dim=1)  # [N, 2, V]
    out, accepted = _run(target, draft, torch.stack([d1, d2], dim=1), [2] * n, seed=24)

    short = [i for i, row in enumerate(out) if len(row) == 1]
    firsts = torch.tensor([out[i][0] for i in short])
    m = len(short)  # rows whose first draft was rejected: one more step (no drafts) gives token 2
    no_ids = torch.empty(m, 0, dtype=torch.long)
    more, _ = _run(p2[firsts].unsqueeze(1), torch.empty(m, 0, v), no_ids, [0] * m, seed=25)
    pairs = [row[:2] for row in out]
    for i, extra in zip(short, more):
        pairs[i] = pairs[i] + extra
    joint = torch.tensor([a * v + b for a, b in pairs]).bincount(minlength=v * v)  # bin (a, b)
    expected = (p1.unsqueeze(1) * p2).flatten()
    assert chi_square_pvalue([(joint.tolist(), expected.tolist())]) > P_VALUE_BOUND

    # [a, b]: the second token b after an accepted first draft d1 = a
    after_accept = [row[0] * v + row[1] for row, count in zip(out, accepted) if count >= 1]
    conditional = torch.tensor(after_accept).bincount(minlength=v * v).view(v, v)
    assert conditional.sum() >= 10_000
    groups = [(conditional[a].tolist(), p2[a].tolist()) for a in range(v)]
    assert chi_square_pvalue(groups) > P_VALUE_BOUND


def test_acceptance_decays_geometrically():
    """Three i.i.d. positions with the same (p, q): P(at least k accepted) = beta ** k."""
    p, q = CASES["random"]
    gen = torch.Generator().manual_seed(31)
    drafts = _sample(q.expand(N * 3, V), gen).view(N, 3)
    _, accepted = _run(p.expand(N, 4, V), q.expand(N, 3, V), drafts, [3] * N, seed=32)
    beta = float(torch.minimum(p, q).sum())
    for k in (1, 2, 3):
        assert _acceptance_ok(sum(a >= k for a in accepted), N, beta**k), k


def test_zero_drafts_and_mixed_draft_counts():
    """Rows with s = 0, 1, 2 drafts in one padded batch: lengths are right and the first token ~ p."""
    n = 30_000
    p, q = CASES["random"]
    gen = torch.Generator().manual_seed(41)
    counts = [i % 3 for i in range(n)]
    drafts = _sample(q.expand(2 * n, V), gen).view(n, 2)
    drafts[torch.tensor(counts) < 2, 1] = -5  # padding garbage
    drafts[torch.tensor(counts) == 0, 0] = 10**9
    out, accepted = _run(p.expand(n, 3, V), q.expand(n, 2, V), drafts, counts, seed=42)
    assert all(len(row) == a + 1 and a <= s for row, a, s in zip(out, accepted, counts))
    assert all(a == 0 for a, s in zip(accepted, counts) if s == 0)
    for s in range(3):
        first = torch.tensor([row[0] for row, c in zip(out, counts) if c == s])
        assert chi_square_pvalue([(first.bincount(minlength=V).tolist(), p.tolist())]) > P_VALUE_BOUND


def test_no_draft_slots():
    p, no_ids = _P, torch.empty(N, 0, dtype=torch.long)
    out, accepted = _run(p.expand(N, 1, V), torch.empty(N, 0, V), no_ids, [0] * N)
    assert accepted == [0] * N and all(len(row) == 1 for row in out)
    first = torch.tensor([row[0] for row in out])
    assert chi_square_pvalue([(first.bincount(minlength=V).tolist(), p.tolist())]) > P_VALUE_BOUND
    assert _run(p.expand(0, 1, V), torch.empty(0, 0, V), torch.empty(0, 0, dtype=torch.long), []) == ([], [])


# ----------------------------------------------------------------------------- corner cases


@pytest.mark.parametrize(
    "p, q, draft, recovered",
    [
        # q(d) == 0 although p(d) > 0: an impossible draft, always rejected; recover from max(0, p - q).
        (_dist(5, 3, 2), _dist(0, 2, 8), 0, _dist(5, 1, 0)),
        # p(d) == 0: always rejected and never emitted.
        (_dist(0, 5, 5), _dist(2, 4, 4), 0, _dist(0, 1, 1)),
        # p == q and q(d) == 0: max(0, p - q) is all zero, so the fallback draws from p.
        (_dist(0, 3, 7), _dist(0, 3, 7), 0, _dist(0, 3, 7)),
    ],
)
def test_forced_rejections(p, q, draft, recovered):
    n = 10_000
    out, accepted = _run(p.expand(n, 2, 3), q.expand(n, 1, 3), torch.full((n, 1), draft), [1] * n, seed=5)
    assert accepted == [0] * n
    tokens = torch.tensor([row[0] for row in out])
    assert chi_square_pvalue([(tokens.bincount(minlength=3).tolist(), recovered.tolist())]) > P_VALUE_BOUND


# ----------------------------------------------------------------------------- greedy rows


def test_greedy_exact_matching_and_no_draws():
    vocab, slots = 10, 3
    argmaxes = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 1, 2], [3, 3, 3, 3]]
    target = torch.stack([torch.stack([_one_hot(t, vocab) for t in row]) for row in argmaxes])  # [5, 4, V]
    drafts = torch.tensor([[1, 2, 3], [1, 2, 9], [0, 6, 7], [9, -1, 99], [7, 7, 7]])
    counts = [3, 3, 3, 1, 0]
    draft = torch.nn.functional.one_hot(drafts.clamp(0, vocab - 1), vocab).float()  # [5, 3, V]
    generators = [torch.Generator().manual_seed(i) if i % 2 else None for i in range(5)]
    states = [g.get_state() if g is not None else None for g in generators]
    shared = torch.Generator().manual_seed(123)
    shared_state = shared.get_state()
    greedy = [True] * 5
    out, accepted = rejection_sample(RejectionSamplerInput(target, draft, drafts, counts, greedy, generators, shared))
    assert out == [[1, 2, 3, 4], [1, 2, 3], [5], [9, 0], [3]]
    assert accepted == [3, 2, 0, 1, 0]
    assert torch.equal(shared.get_state(), shared_state)
    for g, state in zip(generators, states):
        assert g is None or torch.equal(g.get_state(), state)


def test_greedy_rows_beside_random_rows_draw_nothing():
    p, q = CASES["random"]
    seeded = torch.Generator().manual_seed(3)
    state = seeded.get_state()
    target = torch.stack([torch.stack([_one_hot(2, V)] * 3), p.expand(3, V)])  # [2, 3, V]
    draft = torch.stack([torch.stack([_one_hot(2, V)] * 2), q.expand(2, V)])
    drafts = torch.tensor([[2, 2], [0, 1]])
    out, _ = rejection_sample(
        RejectionSamplerInput(target, draft, drafts, [2, 2], [True, False], [seeded, None], torch.Generator())
    )
    assert out[0] == [2, 2, 2]
    assert torch.equal(seeded.get_state(), state)


def test_greedy_rows_do_not_shift_the_shared_stream():
    p, q = CASES["random"]
    greedy_row = torch.stack([_one_hot(4, V)] * 3)  # [3, V]
    random_row = p.expand(3, V)
    drafts = torch.tensor([[4, 4], [1, 6]])
    alone_gen, mixed_gen = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    alone, _ = rejection_sample(
        RejectionSamplerInput(random_row[None], q.expand(1, 2, V), drafts[1:], [2], [False], [None], alone_gen)
    )
    target, draft = torch.stack([greedy_row, random_row]), torch.stack([greedy_row[:2], q.expand(2, V)])
    mixed, _ = rejection_sample(
        RejectionSamplerInput(target, draft, drafts, [2, 2], [True, False], [None, None], mixed_gen)
    )
    assert mixed == [[4, 4, 4], alone[0]]
    assert torch.equal(mixed_gen.get_state(), alone_gen.get_state())


# ----------------------------------------------------------------------------- seeds, batch invariance


def test_seeded_rows_are_distributed_as_p():
    """10,000 rows, each with its own generator (the per-row draw path), same (p, q)."""
    n = 10_000
    p, q = CASES["random"]
    drafts = _sample(q.expand(n, V), torch.Generator().manual_seed(61)).unsqueeze(1)
    generators = [torch.Generator().manual_seed(10_000 + i) for i in range(n)]
    states = [g.get_state() for g in generators[:5]]
    out, accepted = _run(p.expand(n, 2, V), q.expand(n, 1, V), drafts, [1] * n, generators=generators)
    first = torch.tensor([row[0] for row in out])
    assert chi_square_pvalue([(first.bincount(minlength=V).tolist(), p.tolist())]) > P_VALUE_BOUND
    assert _acceptance_ok(sum(accepted), n, float(torch.minimum(p, q).sum()))
    assert all(not torch.equal(g.get_state(), s) for g, s in zip(generators, states))  # they were used


def _seeded_row(seed: int, slots: int):
    """One random row's inputs: p, q at 3 draft positions (+ bonus), drafts drawn from q, padded to
    `slots` with NaN probabilities and garbage ids."""
    p = torch.stack([_random_dist(V, 100 * seed + i) for i in range(4)])  # [4, V]
    q = torch.stack([_random_dist(V, 100 * seed + 50 + i) for i in range(3)])  # [3, V]
    drafts = _sample(q, torch.Generator().manual_seed(seed))  # [3]
    pad = slots - 3
    p = torch.cat([p, torch.full((pad, V), float("nan"))])
    q = torch.cat([q, torch.full((pad, V), float("nan"))])
    return p, q, torch.cat([drafts, torch.full((pad,), -7)])


def test_seeded_rows_ignore_the_batch():
    results = set()
    for seed in range(20):
        p, q, d = _seeded_row(seed, 3)
        alone_gen = torch.Generator().manual_seed(1000 + seed)
        alone = rejection_sample(
            RejectionSamplerInput(p[None], q[None], d[None], [3], [False], [alone_gen], torch.Generator())
        )[0][0]
        results.add(tuple(alone))

        # Same row at position 2 of a wider batch (S = 5) with greedy, shared and seeded companions.
        companions = [_seeded_row(seed + 500 + i, 5) for i in range(3)]
        p5, q5, d5 = _seeded_row(seed, 5)
        rows = [companions[0], companions[1], (p5, q5, d5), companions[2]]
        target = torch.stack([r[0] for r in rows]).nan_to_num(0.0)
        target[2] = p5  # keeps its NaN padding
        batch_gen = torch.Generator().manual_seed(1000 + seed)
        gens = [None, torch.Generator().manual_seed(seed), batch_gen, None]
        draft, ids = torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])
        greedy, shared = [False, True, False, False], torch.Generator().manual_seed(seed + 77)
        batch, _ = rejection_sample(RejectionSamplerInput(target, draft, ids, [3, 2, 3, 0], greedy, gens, shared))
        assert batch[2] == alone, seed
        assert torch.equal(batch_gen.get_state(), alone_gen.get_state())  # same amount consumed
    assert len(results) > 5  # the comparison is not trivially constant


# ----------------------------------------------------------------------------- tensor API


def test_tensor_api_layout():
    p, q = CASES["random"]
    n = 200
    drafts = _sample(q.expand(2 * n, V), torch.Generator().manual_seed(9)).view(n, 2)
    counts = [i % 3 for i in range(n)]
    args = (p.expand(n, 3, V), q.expand(n, 2, V), drafts, counts, [i % 4 == 0 for i in range(n)], [None] * n)
    output, num_accepted = rejection_sample_tensors(RejectionSamplerInput(*args, torch.Generator().manual_seed(1)))
    lists, accepted = rejection_sample(RejectionSamplerInput(*args, torch.Generator().manual_seed(1)))
    assert output.shape == (n, 3) and output.dtype == torch.long and num_accepted.tolist() == accepted
    for row, items, count, proposed in zip(output.tolist(), lists, accepted, drafts.tolist()):
        assert row[: count + 1] == items and row[:count] == proposed[:count]
        assert all(t == PLACEHOLDER_TOKEN_ID for t in row[count + 1 :])
    assert lists == rejection_sample(RejectionSamplerInput(*args, torch.Generator().manual_seed(1)))[0]

"""Tests for the prompt-lookup proposer: hand cases, then randomized agreement with a naive reference
(seeded random and hypothesis), with id alphabets chosen so that byte patterns straddle ids."""

from __future__ import annotations

import random
import time
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helix_server.spec_decode.ngram import NgramProposer, propose_ngram
from helix_server.spec_decode.proposer import ProposalRequest


def naive_ngram(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """The definition, written as plainly as possible (O(L * n) per n)."""
    length = len(tokens)
    if k <= 0:
        return []
    for n in range(ngram_max, ngram_min - 1, -1):
        if n >= length:
            continue
        tail = tokens[length - n :]
        for i in range(length - n - 1, -1, -1):  # starts before the tail itself, last one first
            if tokens[i : i + n] == tail:
                return tokens[i + n : i + n + k]
    return []


# ----------------------------------------------------------------------------- hand cases


def test_longest_n_wins():
    # tail 2-gram [7, 8] occurs at 0 (followed by 1); tail 1-gram [8] occurs later at 5 (followed by 2).
    tokens = [7, 8, 1, 1, 4, 8, 2, 7, 8]
    assert propose_ngram(tokens, 3, 1, 2) == [1, 1, 4]
    assert propose_ngram(tokens, 3, 1, 1) == [2, 7, 8]


def test_last_occurrence_wins():
    tokens = [5, 6, 1, 5, 6, 2, 5, 6, 3, 9, 5, 6]
    assert propose_ngram(tokens, 2, 2, 2) == [3, 9]


def test_overlapping_occurrence():
    # "a b a b a": tail "a b a" occurs at 0, overlapping the tail itself; continuation is "b a".
    assert propose_ngram([1, 2, 1, 2, 1], 5, 3, 3) == [2, 1]
    # A run: the tail [4, 4, 4] occurs one step earlier; only one token follows it.
    assert propose_ngram([4, 4, 4, 4], 3, 3, 3) == [4]
    assert propose_ngram([4, 4, 4, 4], 3, 1, 1) == [4]  # last earlier occurrence of [4] is index 2


def test_k_truncation_and_context_end():
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert propose_ngram(tokens, 2, 2, 2) == [3, 4]
    assert propose_ngram(tokens, 10, 2, 2) == [3, 4, 5, 6, 1, 2]  # the context ends first
    assert propose_ngram(tokens, 1, 1, 3) == [3]


def test_no_match_and_degenerate_inputs():
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []
    assert propose_ngram([], 3, 1, 3) == []
    assert propose_ngram([1], 3, 1, 3) == []
    assert propose_ngram([1, 1], 3, 1, 3) == [1]
    assert propose_ngram([1, 1], 3, 2, 3) == []  # the only 2-gram is the tail itself
    assert propose_ngram([1, 2, 1, 2], 0, 1, 2) == []  # k == 0
    assert propose_ngram([1, 2, 1, 2], -1, 1, 2) == []


def test_ngram_bounds_are_respected():
    tokens = [9, 1, 2, 3, 0, 3]  # only the 1-gram [3] recurs
    assert propose_ngram(tokens, 2, 1, 3) == [0, 3]
    assert propose_ngram(tokens, 2, 2, 3) == []  # n = 1 is below ngram_min
    tokens = [1, 2, 3, 4, 8, 1, 2, 3, 4]  # the 4-gram recurs
    assert propose_ngram(tokens, 1, 1, 4) == [8]
    assert propose_ngram(tokens, 1, 1, 3) == [8]  # n = 4 above ngram_max: the 3-gram matches too
    assert propose_ngram(tokens, 1, 5, 6) == []  # no 5-gram recurs
    with pytest.raises(ValueError):
        propose_ngram(tokens, 1, 0, 2)
    with pytest.raises(ValueError):
        propose_ngram(tokens, 1, 3, 2)
    with pytest.raises(ValueError):
        NgramProposer(2, 1)


def test_large_token_ids():
    big = [70_000, 2**20 + 3, 2**31 - 1, 2**32 - 1]
    tokens = big + [5] + big[:2]
    assert propose_ngram(tokens, 3, 1, 2) == [2**31 - 1, 2**32 - 1, 5]
    huge = [2**32, 2**40 + 1, 2**62, 7]  # beyond 4 bytes: the 8-byte path
    tokens = huge + [1] + huge[:3]
    assert propose_ngram(tokens, 2, 1, 3) == [7, 1]
    assert propose_ngram([-3, 4, -3], 1, 1, 1) == [4]  # negative ids are not expected but still work


def test_alignment_traps():
    # Little- or big-endian, the bytes of [a, b] contain those of [c] at a non-multiple-of-4 offset
    # for these values; a byte search without the alignment check would report a match.
    a, b = 0x01020304, 0x05060708
    trap = int.from_bytes((a.to_bytes(4, "little") + b.to_bytes(4, "little"))[2:6], "little")
    trap_be = int.from_bytes((a.to_bytes(4, "big") + b.to_bytes(4, "big"))[2:6], "big")
    for c in (trap, trap_be):
        assert propose_ngram([a, b, 9, c], 2, 1, 1) == []
        # A true occurrence further left is still found past the misaligned hit.
        assert propose_ngram([c, 11, a, b, 9, c], 2, 1, 1) == [11, a]
    # Zero bytes: [256, 0] contains the bytes of [1] (little-endian) and of [0] misaligned, etc.
    assert propose_ngram([256, 0, 1], 1, 1, 1) == []
    assert propose_ngram([1, 256, 0, 65536, 1], 2, 1, 1) == [256, 0]


def test_array_input_is_used_as_is():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 1, 4]
    for typecode in ("I", "q", "l", "H"):
        assert propose_ngram(array(typecode, tokens), 3, 1, 2) == [1, 5, 9]


def test_proposer_class():
    proposer = NgramProposer(2, 3)
    assert (proposer.ngram_min, proposer.ngram_max) == (2, 3)
    requests = [
        ProposalRequest("a", [1, 2, 3, 1, 2], num_computed_tokens=4, block_ids=[0], num_draft_tokens=4),
        ProposalRequest("b", [1, 2, 3, 1, 2], num_computed_tokens=4, block_ids=[1], num_draft_tokens=1),
        ProposalRequest("c", [4, 5, 6], num_computed_tokens=2, block_ids=[2], num_draft_tokens=2),
    ]
    proposal = proposer.propose(requests, choose=None)
    assert proposal.token_ids == [[3, 1, 2], [3], []]
    assert proposal.probs is None
    assert "ngram_min=2" in repr(proposer)


# ----------------------------------------------------------------------------- randomized


# Values whose little-endian bytes overlap in many ways (0 bytes, 1 bytes, shifted copies).
TRAP_ALPHABET = [0, 1, 256, 257, 65536, 65537, 2**24, 2**24 + 1, 2**24 + 256, 2**32 - 1, 2**16 - 1]


def test_random_agreement_with_naive_reference():
    rng = random.Random(1234)
    for trial in range(3000):
        alphabet = rng.choice([[0, 1], [1, 2, 3], TRAP_ALPHABET, list(range(50_000, 50_006))])
        if trial % 7 == 0:
            alphabet = alphabet + [2**40, 2**33 + 1]  # force the 8-byte path sometimes
        tokens = [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
        ngram_min = rng.randint(1, 4)
        ngram_max = rng.randint(ngram_min, 6)
        k = rng.randint(0, 6)
        args = (tokens, k, ngram_min, ngram_max)
        assert propose_ngram(*args) == naive_ngram(*args), args


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.sampled_from(TRAP_ALPHABET + [2**35]), max_size=30),
    k=st.integers(0, 5),
    ngram_min=st.integers(1, 3),
    extra=st.integers(0, 3),
)
def test_hypothesis_agreement_with_naive_reference(tokens, k, ngram_min, extra):
    ngram_max = ngram_min + extra
    assert propose_ngram(tokens, k, ngram_min, ngram_max) == naive_ngram(tokens, k, ngram_min, ngram_max)


def test_long_context_is_fast():
    # 8k tokens of random ids with a planted repeat of the tail: well under a millisecond per call in
    # practice; the bound is loose (20 ms) so that slow CI machines pass.
    rng = random.Random(5)
    tokens = [rng.randrange(32_000) for _ in range(8192)]
    tokens[1000:1004] = tokens[-4:]
    assert propose_ngram(tokens, 5, 2, 4) == tokens[1004:1009]
    start = time.perf_counter()
    for _ in range(50):
        propose_ngram(tokens, 5, 1, 4)
    assert (time.perf_counter() - start) / 50 < 0.02

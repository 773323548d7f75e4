"""The sampler: from one position's raw logits per request to the next token (and its logprobs).

The pipeline, one row of the logits matrix per request:

1. `process_logits`: float32, then logit_bias, min_tokens masking, penalties and the structured-output
   token bitmask (`logits_processors`).
2. `probs`: the processed distribution. Greedy rows (temperature < 1e-5, vLLM's epsilon, which also
   keeps `logits / temperature` finite) are one-hot at the argmax. Other rows: divide by temperature,
   softmax, then the filters in the order **min_p -> top_k -> top_p**, and renormalise.
   This is vLLM's order (v1 applies min_p as an argmax-invariant processor before its top-k/top-p
   sampler, and computes top-p's cumulative mass after top-k's mask). min_p and top_k both keep a
   prefix of the tokens sorted by probability, so they commute; top_p is the one whose result depends
   on the order, and it sees the distribution already renormalised over what min_p and top_k kept.
3. `sample_from_probs`: the exponential race, token = argmax(probs / E) with E ~ Exp(1) i.i.d.
   (P(argmax = i) = p_i; it is the Gumbel-max trick in disguise and needs no `torch.multinomial`,
   which DirectML lacks). A row with its own generator (seeded request) draws its V exponentials from
   it, one draw per sampled token, so its tokens depend only on its own history, never on the batch.
4. Logprobs: "raw" logprobs, like vLLM's default: log_softmax of the model's logits before any
   processing or temperature, so they describe the model, not the sampling settings.

`process_logits` and `probs` are public because speculative decoding's rejection sampler must score
draft and target with exactly this processed distribution.

Host synchronisation: `sample` makes a single `.tolist()` at the end (tokens and logprobs packed into
one tensor). Packing logprob ids and ranks as float32 is exact because widths are < 2**24.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from helix_server.sample.logits_processors import (
    apply_logit_bias,
    apply_min_tokens,
    apply_penalties,
    apply_token_bitmask,
    needs_processing,
)
from helix_server.sample.sampling_row import SamplingRow, is_greedy
from helix_server.step_contract import TokenLogprob

# float32 represents every integer up to 2**24 exactly: the bound on widths we can pack as floats.
_MAX_PACKED_INT = 2**24
_SEED_MODULUS = 2**64  # torch's manual_seed takes an unsigned 64-bit seed


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:  # [N, V] -> [N]
    """Each row's argmax: the first of equal maxima, a NaN's index where the row has one (as
    `argmax`). `torch.max` over the rows, which computes the same indices 2-3x faster on the CPU
    (measured over 49,152 logits: 63 -> 29 us for one row, 503 -> 163 us for 16)."""
    return torch.max(logits, dim=-1).indices


class Sampler:
    """Turns a batch of raw logits into next tokens (and logprobs) following each row's params.

    `vocab_size` is the tokenizer's vocabulary size (informational: logits may be wider and every
    column is a token). `eos_token_ids` are banned while a row is under `min_tokens`. Rows without a
    generator draw from the sampler's own generator, seeded with `seed`; nothing is global.
    """

    def __init__(self, vocab_size: int, eos_token_ids: set[int], device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.device = torch.device(device)
        self.generator = self.make_generator(seed, self.device)

    @staticmethod
    def make_generator(seed: int, device) -> torch.Generator:
        """A generator seeded with any Python int, reduced modulo 2**64 (deterministic, and the
        identity for seeds already in torch's unsigned range). Devices without their own generator
        type (DirectML) get a CPU generator; draws are then made on the CPU and moved over.
        """
        try:
            generator = torch.Generator(device=torch.device(device))
        except (RuntimeError, TypeError):
            generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed) % _SEED_MODULUS)
        return generator

    # ------------------------------------------------------------------ processing and probs

    def process_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Raw logits `[N, V]` (any float dtype) -> float32 processed logits `[N, V]`.

        Applies logit_bias, min_tokens masking, penalties, then the grammar's token bitmask. Never
        modifies `logits`; returns a float32 view of it when no row needs processing.
        """
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        if not any(needs_processing(row) for row in rows):
            return logits.to(torch.float32)
        out = logits.to(torch.float32, copy=True)  # [N, V]
        apply_logit_bias(out, rows)
        apply_min_tokens(out, rows, self.eos_token_ids)
        apply_penalties(out, rows)
        apply_token_bitmask(out, rows)
        return out

    def probs(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Processed logits `[N, V]` -> the distribution each row samples from, float32 `[N, V]`.

        Greedy rows are one-hot at their argmax; the others go through temperature, softmax, min_p,
        top_k, top_p and renormalisation (see the module docstring for the order).
        """
        logits = logits.to(torch.float32)
        greedy = [is_greedy(row.params) for row in rows]
        if not any(greedy):
            return self._filtered_probs(logits, rows)
        out = torch.zeros_like(logits)  # [N, V]
        out.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)  # one-hot at the argmax
        random_ids = [i for i, g in enumerate(greedy) if not g]
        if random_ids:
            index = torch.tensor(random_ids, device=logits.device)
            sub_rows = [rows[i] for i in random_ids]
            out.index_copy_(0, index, self._filtered_probs(logits.index_select(0, index), sub_rows))
        return out

    def _filtered_probs(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Non-greedy rows only: float32 `[R, V]` logits -> filtered, renormalised probs `[R, V]`."""
        device = logits.device
        width = logits.shape[1]
        temperature = _column([row.params.temperature for row in rows], device)  # [R, 1]
        probs = torch.softmax(logits / temperature, dim=-1)  # [R, V]

        min_p = [row.params.min_p for row in rows]
        if any(m > 0.0 for m in min_p):
            # Keep p >= min_p * max p. The max token always survives (min_p <= 1).
            threshold = _column(min_p, device) * probs.amax(dim=-1, keepdim=True)  # [R, 1]
            probs = probs.masked_fill(probs < threshold, 0.0)

        top_k = [row.params.top_k if 0 < row.params.top_k < width else width for row in rows]
        # top_p >= 1 disables the filter; an infinite threshold keeps rounding from dropping tails.
        top_p = [row.params.top_p if row.params.top_p < 1.0 else float("inf") for row in rows]
        use_top_k = any(k < width for k in top_k)
        use_top_p = any(p != float("inf") for p in top_p)
        if use_top_k or use_top_p:
            # A stable sort makes ties at the top-k boundary break the same way every time.
            sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [R, V] each
            if use_top_k:
                position = torch.arange(width, device=device).unsqueeze(0)  # [1, V]
                k = torch.tensor(top_k, device=device).unsqueeze(1)  # [R, 1]
                sorted_probs = sorted_probs.masked_fill(position >= k, 0.0)
            if use_top_p:
                # Mass strictly before each token (exclusive cumsum). A token is kept while that mass
                # is below top_p of the total surviving mass: the token that crosses the threshold is
                # kept and the first token (mass 0 before it, top_p > 0) always is.
                cumulative = sorted_probs.cumsum(dim=-1)  # [R, V]
                before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))  # [R, V]
                total = cumulative[:, -1:]  # [R, 1]
                limit = _column(top_p, device) * total  # [R, 1]
                sorted_probs = sorted_probs.masked_fill(before >= limit, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        return probs / probs.sum(dim=-1, keepdim=True)

    # ------------------------------------------------------------------ sampling

    def sample_from_probs(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Draw one token per row from `probs` `[N, V]` -> token ids, long `[N]` (stays on device).

        Every row consumes one draw of V exponentials: from its own generator when it has one, else
        from the sampler's shared generator (one block for all such rows).
        """
        exponentials = self._exponentials(rows, probs.shape[1], probs.device)  # [N, V]
        # exponential_ can return exactly 0; a floor of the smallest normal float keeps 0 / E = 0
        # (never NaN, which argmax would pick) and p / E finite (p <= 1, 1 / tiny < float32 max).
        exponentials.clamp_(min=torch.finfo(torch.float32).tiny)
        return (probs / exponentials).argmax(dim=-1)

    def _exponentials(self, rows: Sequence[SamplingRow], width: int, device: torch.device) -> torch.Tensor:
        """Exp(1) noise, float32 `[len(rows), width]`, each row from its generator (or the shared one)."""
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if len(shared) == len(rows):
            return _draw_exponentials(self.generator, len(rows), width, device)
        out = torch.empty((len(rows), width), dtype=torch.float32, device=device)
        if shared:
            block = _draw_exponentials(self.generator, len(shared), width, device)
            out.index_copy_(0, torch.tensor(shared, device=device), block)
        for i, row in enumerate(rows):
            if row.generator is not None:
                out[i] = _draw_exponentials(row.generator, 1, width, device)[0]
        return out

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> list[tuple[int, TokenLogprob | None]]:
        """One step: raw logits `[N, V]` -> per row (token id, TokenLogprob or None).

        Greedy rows take the argmax of their processed logits and draw no random numbers. The
        logprob is returned when `params.logprobs` is not None (see `logprobs_of`).
        """
        num_rows = len(rows)
        assert logits.dim() == 2 and logits.shape[0] == num_rows, (tuple(logits.shape), num_rows)
        if num_rows == 0:
            return []
        greedy = [is_greedy(row.params) for row in rows]
        want_logprobs = [row.params.logprobs is not None for row in rows]
        if all(greedy) and not any(want_logprobs) and not any(needs_processing(r) for r in rows):
            # Fast path: plain greedy batch, one argmax and one transfer.
            return [(token, None) for token in greedy_tokens(logits).tolist()]

        processed = self.process_logits(logits, rows)  # [N, V] float32
        tokens = greedy_tokens(processed)  # [N]; overwritten below for random rows
        random_ids = [i for i, g in enumerate(greedy) if not g]
        if len(random_ids) == num_rows:
            tokens = self.sample_from_probs(self._filtered_probs(processed, rows), rows)
        elif random_ids:
            index = torch.tensor(random_ids, device=logits.device)
            sub_rows = [rows[i] for i in random_ids]
            sub_probs = self._filtered_probs(processed.index_select(0, index), sub_rows)  # [R, V]
            tokens.index_copy_(0, index, self.sample_from_probs(sub_probs, sub_rows))

        logprob_ids = [i for i, w in enumerate(want_logprobs) if w]
        if not logprob_ids:
            return [(token, None) for token in tokens.tolist()]
        index = torch.tensor(logprob_ids, device=logits.device)
        num_top = [rows[i].params.logprobs for i in logprob_ids]
        raw = logits.index_select(0, index)  # [M, V]
        token_list, logprobs = self._fetch_with_logprobs(tokens, raw, logprob_ids, num_top)
        results: list[tuple[int, TokenLogprob | None]] = [(token, None) for token in token_list]
        for i, logprob in zip(logprob_ids, logprobs):
            results[i] = (token_list[i], logprob)
        return results

    # ------------------------------------------------------------------ logprobs

    def logprobs_of(
        self,
        raw_logits: torch.Tensor,
        token_ids: torch.Tensor | Sequence[int],
        num_top: int | Sequence[int],
    ) -> list[TokenLogprob]:
        """Raw logprobs of given tokens: `raw_logits` `[M, V]`, one chosen token per row -> M entries.

        Each entry has the token's logprob under log_softmax of the raw logits, its 1-based rank
        (1 + number of tokens with a strictly higher logprob) and the `num_top` (one int for all rows,
        or one per row) most likely (token_id, logprob) pairs, most likely first. Usable for prompt
        logprobs: pass the logits of positions 0..M-1 and the prompt tokens 1..M.
        """
        num_rows = raw_logits.shape[0]
        if num_rows == 0:
            return []
        tops = [num_top] * num_rows if isinstance(num_top, int) else list(num_top)
        ids = torch.as_tensor(token_ids, dtype=torch.long).to(raw_logits.device).reshape(num_rows)  # [M]
        return self._fetch_with_logprobs(ids, raw_logits, None, tops)[1]

    def _fetch_with_logprobs(
        self,
        tokens: torch.Tensor,
        raw_logits: torch.Tensor,
        index: list[int] | None,
        num_top: list[int],
    ) -> tuple[list[int], list[TokenLogprob]]:
        """Bring `tokens` `[N]` and the logprobs of `tokens[index]` to the host in ONE transfer.

        `raw_logits` `[M, V]` are the rows `index` of the batch (None: all N rows). Returns all tokens
        as ints and M TokenLogprobs.
        """
        if index is None:
            chosen = tokens  # [M] == [N]
        else:
            chosen = tokens.index_select(0, torch.tensor(index, device=tokens.device))  # [M]
        packed = self._logprob_tensor(raw_logits, chosen, max(num_top))  # [M, 2 + 2k]
        num_tokens = tokens.shape[0]
        values = torch.cat([tokens.to(torch.float32), packed.flatten()]).tolist()
        token_list = [int(v) for v in values[:num_tokens]]
        chosen_list = token_list if index is None else [token_list[i] for i in index]
        return token_list, _unpack_logprobs(values[num_tokens:], chosen_list, num_top, packed.shape[1])

    @staticmethod
    def _logprob_tensor(raw_logits: torch.Tensor, token_ids: torch.Tensor, max_top: int) -> torch.Tensor:
        """`[M, V]` raw logits, `[M]` token ids -> float32 `[M, 2 + 2 * k]`: per row the chosen
        logprob, its rank, then k top token ids and k top logprobs (k = min(max_top, V))."""
        width = raw_logits.shape[1]
        assert width <= _MAX_PACKED_INT, "token ids are packed as float32"
        logprobs = torch.log_softmax(raw_logits.to(torch.float32), dim=-1)  # [M, V]
        chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [M, 1]
        rank = (logprobs > chosen).sum(dim=-1, keepdim=True).to(torch.float32) + 1.0  # [M, 1]
        parts = [chosen, rank]
        k = min(max_top, width)
        if k > 0:
            top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [M, k] each, sorted descending
            parts += [top_ids.to(torch.float32), top_logprobs]
        return torch.cat(parts, dim=1)


def _unpack_logprobs(
    values: list[float], token_ids: list[int], num_top: list[int], stride: int
) -> list[TokenLogprob]:
    """Inverse of `Sampler._logprob_tensor` on host: flat floats (rows of `stride`) -> TokenLogprobs."""
    k = (stride - 2) // 2
    out = []
    for row, (token_id, n) in enumerate(zip(token_ids, num_top)):
        chunk = values[row * stride : (row + 1) * stride]
        n = min(n, k)
        top_ids = chunk[2 : 2 + k]
        top_logprobs = chunk[2 + k : 2 + 2 * k]
        top = [(int(top_ids[j]), top_logprobs[j]) for j in range(n)]
        out.append(TokenLogprob(token_id=token_id, logprob=chunk[0], rank=int(chunk[1]), top=top))
    return out


def _draw_exponentials(
    generator: torch.Generator, num_rows: int, width: int, device: torch.device
) -> torch.Tensor:
    """`[num_rows, width]` Exp(1) float32 draws from `generator`, made on the generator's own device
    (the CPU for DirectML) and moved to `device` (a no-op when they match)."""
    noise = torch.empty((num_rows, width), dtype=torch.float32, device=generator.device)
    return noise.exponential_(generator=generator).to(device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-row scalars as a float32 column `[R, 1]`."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

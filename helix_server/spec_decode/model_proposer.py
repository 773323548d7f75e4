"""Proposers that draft with a (smaller) model over the paged KV cache: a draft model, or the target
model's own first layers (layer-skip self-speculation).

Each proposal runs k forwards batched over the requests: the first feeds every token the drafter has
not seen yet (for a draft model right after a prompt, the whole prompt; afterwards the one or two
tokens since its last proposal), each later one feeds the previous draft. The drafter's K/V goes into
the same block slots as the target's (the scheduler reserves `k` lookahead slots for that), in the
drafter's own cache tensors (draft model) or the target's first layers (layer-skip).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from helix_server.layers.attention.builder import SequenceChunk, build_forward_context, order_for_attention
from helix_server.layers.attention.layer import short_query_len
from helix_server.spec_decode.proposer import DraftChooser, Proposal, ProposalRequest


class ModelProposer:
    """Autoregressive drafting with `model(input_ids, positions, ctx, num_layers)`.

    `own_kv_cache` is True for a separate draft model: its cache is valid only for the positions it
    has itself written with tokens that were then accepted, tracked per request. For layer-skip the
    cache is the target's, valid wherever the target has computed.

    Prefix caching shares the target's blocks between requests, and with them the draft model's
    slots in those blocks; but nothing records whether the draft model ever wrote them (the request
    that computed a block may have had speculation off, or been drafted for only partly). So a
    request's drafter K/V counts as valid only from this request's own proposals: after a prefix
    hit (`_written` is 0 for a new or preempted request) the drafter catches up from position 0 and
    rewrites its K/V for the shared blocks. What it writes there is the draft model's K/V of the
    very same tokens at the same positions (a shared block holds one exact token prefix), so other
    requests sharing the block read the same values as before; the target's tensors of a shared
    block are never written. Layer-skip writes only from the request's `num_computed_tokens` on,
    past every shared block.
    """

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
        num_layers: int | None = None,
        own_kv_cache: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.num_layers = num_layers
        self.own_kv_cache = own_kv_cache
        self.max_short_len = short_query_len(model)  # the forward's short queries, for its attention
        # request_id -> positions [0, n) the drafter wrote K/V for in its last proposal.
        self._written: dict[str, int] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._written.pop(request_id, None)

    def _valid_kv(self, request: ProposalRequest) -> int:
        """Leading positions whose drafter K/V is correct for the request's current tokens."""
        return self._num_valid(request.request_id, request.num_computed_tokens)

    def _num_valid(self, request_id: str, num_computed_tokens: int) -> int:
        if not self.own_kv_cache:
            return num_computed_tokens
        # Positions the drafter wrote hold accepted tokens up to the model's computed count; past it
        # they hold rejected drafts.
        return min(num_computed_tokens, self._written.get(request_id, 0))

    def backlog(self, request_id: str, num_computed_tokens: int, num_tokens: int) -> int:
        return num_tokens - self._num_valid(request_id, num_computed_tokens)

    @torch.inference_mode()
    def propose(self, requests: list[ProposalRequest], choose: DraftChooser) -> Proposal:
        num_steps = max(r.num_draft_tokens for r in requests)
        drafts: list[list[int]] = [[] for _ in requests]
        probs: torch.Tensor | None = None  # [R, K, V], filled step by step

        # Step 0: every request catches up on the tokens the drafter has not seen and drafts once.
        active = list(range(len(requests)))
        chunks = []
        for request in requests:
            start = self._valid_kv(request)
            chunks.append((request.token_ids[start:], start, request.block_ids))
        num_catch_up = sum(len(ids) for ids, _, _ in chunks)
        for step in range(num_steps):
            if step > 0:
                # Only requests that want another draft go on: the others' lookahead slots end here.
                active = [r for r in active if requests[r].num_draft_tokens > step]
                chunks = [([drafts[r][-1]], requests[r].num_tokens + step - 1, requests[r].block_ids) for r in active]
            tokens, step_probs = choose(self._forward(chunks), step, active)  # [A], [A, V]
            if probs is None:
                probs = step_probs.new_zeros((len(requests), num_steps, step_probs.shape[1]))
            probs[active, step] = step_probs
            for r, token in zip(active, tokens.tolist()):
                drafts[r].append(token)

        for request in requests:
            # K/V written for the known tokens and all drafts but the last.
            self._written[request.request_id] = request.num_tokens + request.num_draft_tokens - 1
        return Proposal(token_ids=drafts, probs=probs, num_catch_up_tokens=num_catch_up)

    def _forward(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """One forward over per-request chunks (token ids, start position, block ids); returns the
        logits of each request's last token, in input order: [R, V] float32."""
        seq_chunks = [SequenceChunk(start, len(ids), blocks) for ids, start, blocks in chunks]
        order = order_for_attention(seq_chunks, self.block_size, self.kv_caches[0][0].shape[0], self.max_short_len)
        input_ids: list[int] = []
        positions: list[int] = []
        last_rows = [0] * len(chunks)
        for i in order:
            ids, start, _ = chunks[i]
            input_ids.extend(ids)
            positions.extend(range(start, start + len(ids)))
            last_rows[i] = len(input_ids) - 1
        ctx = build_forward_context(
            [seq_chunks[i] for i in order], self.block_size, self.device, self.kv_caches, self.max_short_len
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            ctx,
            num_layers=self.num_layers,
        )  # [num_tokens, hidden]
        rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[rows]).float()  # [R, V]

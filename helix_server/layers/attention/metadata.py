"""Per-step attention metadata: where each new token's K/V goes and which cached K/V each query reads.

Built once per step by the runner (from the scheduler's block tables) and shared by every layer.
Token order in the flattened batch: the short queries first, in groups of equal length (decodes,
verification of drafts, a drafter catching up), then the long chunks (prompt chunks, recomputation
after preemption).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from helix_server.layers.attention.paged_inputs import PagedInputs


@dataclass
class PrefillChunk:
    """One request's multi-token query: rows [token_start, token_end) of the batch.

    `context_len` tokens of this request are already in the cache; the chunk's queries sit at
    positions context_len .. context_len + num_tokens - 1. When `context_len` is 0 the keys are the
    chunk's own K/V and `block_table` is not needed.
    """

    token_start: int
    token_end: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks] int64

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def seq_len(self) -> int:
        return self.context_len + self.num_tokens


@dataclass
class QueryGroup:
    """Requests with the same short query length (decodes: 1; verification of k drafts: k + 1),
    attended in one batched call: rows [token_start, token_end), `query_len` consecutive rows per
    request.

    The group's requests share one key-length class (`builder.padded_key_blocks`), the width of
    `block_tables` (0-padded): each request's keys are padded the same whatever else is in the
    step, so its result is too. With `key_start` set the group is one request whose padded keys
    are the pool slots [key_start, key_start + width * block_size), read in place.
    """

    token_start: int
    token_end: int
    query_len: int
    block_tables: torch.Tensor  # [n, max_num_blocks] int64 (0-padded)
    seq_lens: torch.Tensor  # [n] int64: keys per request, its new tokens included
    key_start: int | None = None

    @property
    def num_requests(self) -> int:
        return self.block_tables.shape[0]


@dataclass
class AttentionMetadata:
    """Everything an attention layer needs to write and read the paged KV cache for one step.

    Token rows: first the `query_groups` (short queries, batched), then the `prefills` (one call
    each)."""

    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: physical slot (block_id * block_size + offset)
    query_groups: list[QueryGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    # The dtype of queries and keys (masks are built in it).
    dtype: torch.dtype = torch.float32
    # The same rows as one flat layout for backends that attend every row in one launch (Triton):
    # set by a runner that builds it directly (CUDA graphs), else derived on first use
    # (`paged_inputs.paged_inputs_of`).
    paged: PagedInputs | None = None
    # Masks depend only on the metadata, the sliding window and the GQA group size, so the first
    # layer builds them and the others reuse them.
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _merged_groups: list[QueryGroup] | None = field(default=None, repr=False)

    def merged_query_groups(self) -> list[QueryGroup]:
        """The query groups with consecutive groups of one query length merged into one (block
        tables 0-padded to the widest), for kernels whose rows read exactly their own keys and so
        need no key-length classes (helix's CPU `paged_query_attention`): one call per query length
        instead of one per class. Built by the first layer, reused by the others."""
        if self._merged_groups is None:
            runs: list[list[QueryGroup]] = []
            for group in self.query_groups:
                if runs and runs[-1][0].query_len == group.query_len:
                    runs[-1].append(group)
                else:
                    runs.append([group])
            self._merged_groups = [run[0] if len(run) == 1 else _merge(run) for run in runs]
        return self._merged_groups

    def group_mask(self, index: int, sliding_window: int | None, gqa_group: int) -> torch.Tensor:
        """Additive float mask of query group `index`, [n, 1, gqa_group * query_len, S]: 0 where a
        query may attend key slot j, -inf elsewhere (float, not bool: SDPA would convert a bool mask
        in every layer). Rows follow the batched query layout (GQA group major, then token); with
        one token per request the mask is [n, 1, 1, S] and broadcasts over the group."""
        key = ("group", index, sliding_window, gqa_group)
        mask = self._masks.get(key)
        if mask is None:
            group = self.query_groups[index]
            num_slots = group.block_tables.shape[1] * self.block_size
            device = group.seq_lens.device
            j = torch.arange(num_slots, device=device)[None, None, :]  # [1, 1, S]
            # Token t of a request sits at position seq_len - query_len + t.
            t = torch.arange(group.query_len, device=device)[None, :, None]  # [1, q, 1]
            position = group.seq_lens[:, None, None] - group.query_len + t  # [n, q, 1]
            allowed = j <= position  # [n, q, S]
            if sliding_window is not None:
                allowed &= j > position - sliding_window
            if group.query_len > 1:
                n, q, s = allowed.shape
                allowed = allowed[:, None].expand(n, gqa_group, q, s).reshape(n, gqa_group * q, s)
            mask = _additive(allowed[:, None], self.dtype)
            self._masks[key] = mask
        return mask

    def prefill_mask(self, index: int, sliding_window: int | None) -> torch.Tensor | None:
        """[num_tokens, seq_len] additive float mask for chunk `index`, or None when plain causal
        attention is exact."""
        chunk = self.prefills[index]
        if chunk.context_len == 0 and sliding_window is None:
            return None
        key = ("prefill", index, sliding_window)
        mask = self._masks.get(key)
        if mask is None:
            device = chunk.block_table.device
            q_pos = torch.arange(chunk.context_len, chunk.seq_len, device=device)[:, None]
            k_pos = torch.arange(chunk.seq_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            mask = _additive(mask, self.dtype)
            self._masks[key] = mask
        return mask


def _merge(run: list[QueryGroup]) -> QueryGroup:
    """Consecutive query groups of one query length as one group (tables 0-padded to the widest)."""
    width = max(group.block_tables.shape[1] for group in run)
    tables = [torch.nn.functional.pad(group.block_tables, (0, width - group.block_tables.shape[1])) for group in run]
    return QueryGroup(
        token_start=run[0].token_start,
        token_end=run[-1].token_end,
        query_len=run[0].query_len,
        block_tables=torch.cat(tables),  # [n, width]
        seq_lens=torch.cat([group.seq_lens for group in run]),  # [n]
    )


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" -> additive mask: 0 where allowed, -inf where not."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass
class ForwardContext:
    """What a model forward needs besides token ids and positions: this step's metadata and the
    per-layer KV cache tensors `(key_cache, value_cache)`, each [num_blocks, block_size, kv_heads, head_dim].

    `bulk_start`: the first row of the step's long prompt chunks (they come last), which linear
    layers may compute with a throughput kernel (`helix_server.layers.linear.bulk_row_start`);
    None when there are none."""

    attn_metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    bulk_start: int | None = None

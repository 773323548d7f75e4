"""CUDA graphs for decode and verification steps: one graph per padded token count, captured at warm-up.

A step whose chunks are all short (decodes, verification of drafts, a drafter's catch-up: at most
`MAX_BATCHED_QUERY_LEN` tokens each) and whose token count fits the largest captured size replays
the graph of the smallest captured size that holds it, instead of launching every kernel from
Python. It needs the Triton attention backend, whose kernels take the step as one flat per-token
layout (`PagedInputs`) of fixed shape; any mix of query lengths with the same padded token count
replays the same graph.

The graphs read static device buffers, refreshed before each replay from pinned host buffers with
non-blocking copies (safe to reuse every step: the step ends with its one host read of the sampled
ids). Padding rows have slot -1 (the K/V store writes nothing) and position -1 (attention reads
nothing), so they touch no KV block any request owns. Graphs of all sizes share one memory pool,
captured largest first; `graph_pool_bytes` is what the KV pool sizing sets aside for it.
Without graphs (`--enforce-eager`, the CPU, other backends) `run` computes the same padded step
eagerly, which is how the CPU tests check the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helix_server.layers.attention.builder import MAX_BATCHED_QUERY_LEN, SequenceChunk
from helix_server.layers.attention.metadata import AttentionMetadata, ForwardContext
from helix_server.layers.attention.paged_inputs import PagedInputs
from helix_server.layers.attention.selector import TRITON, attention_backend

# Padding wastes at most a third of a step below 512 tokens.
_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def cuda_graphs_enabled(device: torch.device, enforce_eager: bool) -> bool:
    """Whether steps on `device` replay CUDA graphs: CUDA with the Triton attention backend, unless
    `--enforce-eager`."""
    return not enforce_eager and attention_backend(device) == TRITON


def graph_max_tokens(max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """The largest captured size: a full decode batch with drafts to verify, within the step's token
    budget and `_SIZES`' last (larger short steps run eagerly)."""
    return max(1, min(_SIZES[-1], max_num_batched_tokens, max_num_seqs * (1 + MAX_BATCHED_QUERY_LEN)))


def capture_sizes(max_capture_size: int) -> list[int]:
    """Padded token counts to capture: `_SIZES` up to `max_capture_size`, which is always the last."""
    return [s for s in _SIZES if s < max_capture_size] + [max_capture_size]


def bucket(num_tokens: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding `num_tokens`; None when none does."""
    return next((s for s in sizes if s >= num_tokens), None)


def graph_pool_bytes(hidden_size: int, intermediate_size: int, max_capture_size: int, dtype: torch.dtype) -> int:
    """An upper estimate of the memory the graphs pin: the largest size's activations (the residual
    stream, q/k/v, the attention output and the MLP's gate/up and down; reused across layers in the
    shared pool), doubled for the allocator's rounding, plus the static inputs."""
    element = torch.empty((), dtype=dtype).element_size()
    per_token = (6 * hidden_size + 3 * intermediate_size) * element
    return 2 * max_capture_size * per_token + (1 << 20)


@dataclass
class PaddedStep:
    """A step's inputs padded to `size` rows (host lists for the static buffers)."""

    size: int
    num_tokens: int
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]  # -1 for padding rows: no K/V written
    token_seq: list[int]
    token_pos: list[int]  # -1 for padding rows: no keys read
    block_table: list[list[int]]  # one row per chunk, 0-padded to the static width


def pad_step(
    chunks: list[SequenceChunk], input_ids: list[int], positions: list[int], block_size: int, size: int, width: int
) -> PaddedStep:
    """The flat per-token layout of `chunks` (rows in chunk order, as `input_ids`), padded to `size`."""
    slots: list[int] = []
    token_seq: list[int] = []
    token_pos: list[int] = []
    for index, chunk in enumerate(chunks):
        for pos in range(chunk.context_len, chunk.seq_len):
            slots.append(chunk.block_ids[pos // block_size] * block_size + pos % block_size)
            token_seq.append(index)
            token_pos.append(pos)
    num_tokens = len(slots)
    pad = size - num_tokens
    table = [c.block_ids[: -(-c.seq_len // block_size)] for c in chunks]
    return PaddedStep(
        size=size,
        num_tokens=num_tokens,
        input_ids=list(input_ids) + [0] * pad,
        positions=list(positions) + [0] * pad,
        slot_mapping=slots + [-1] * pad,
        token_seq=token_seq + [0] * pad,
        token_pos=token_pos + [-1] * pad,
        block_table=[row + [0] * (width - len(row)) for row in table],
    )


class CudaGraphRunner:
    """Runs short steps of `model` over `kv_caches` padded to captured sizes: replaying CUDA graphs
    once `capture()` ran (CUDA), eagerly on the same static buffers otherwise."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_capture_size: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = torch.device(device)
        self.sizes = capture_sizes(max_capture_size)
        self.width = -(-max_model_len // block_size)
        largest = self.sizes[-1]
        pin = self.device.type == "cuda"

        def buffers(shape, dtype):  # (host staging, device) pair
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, torch.zeros(shape, dtype=dtype, device=self.device)

        self._ids = buffers((largest,), torch.long)
        self._positions = buffers((largest,), torch.long)
        self._slots = buffers((largest,), torch.long)
        self._token_seq = buffers((largest,), torch.int32)
        self._token_pos = buffers((largest,), torch.int32)
        self._block_table = buffers((largest, self.width), torch.int32)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def can_run(self, chunks: list[SequenceChunk]) -> bool:
        """Whether a step of `chunks` fits: short chunks only, at most the largest size in all."""
        return (
            bool(chunks)
            and all(c.num_new_tokens <= MAX_BATCHED_QUERY_LEN for c in chunks)
            and sum(c.num_new_tokens for c in chunks) <= self.sizes[-1]
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size (CUDA only), largest first, sharing one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._stage(pad_step([], [], [], self.block_size, size, self.width))
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles, the allocator settles
                    self._forward(size)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(size)
            self._graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def run(self, chunks: list[SequenceChunk], input_ids: list[int], positions: list[int]) -> torch.Tensor:
        """Hidden states `[num_tokens, hidden]` of a step that `can_run`, rows in chunk order."""
        num_tokens = sum(c.num_new_tokens for c in chunks)
        size = bucket(num_tokens, self.sizes)
        step = pad_step(chunks, input_ids, positions, self.block_size, size, self.width)
        self._stage(step)
        captured = self._graphs.get(size)
        if captured is None:
            return self._forward(size)[:num_tokens]
        graph, out = captured
        graph.replay()
        return out[:num_tokens]

    def _stage(self, step: PaddedStep) -> None:
        """Host lists -> pinned buffers -> static device buffers (non-blocking on CUDA)."""
        n = step.size
        for (host, device), values in (
            (self._ids, step.input_ids),
            (self._positions, step.positions),
            (self._slots, step.slot_mapping),
            (self._token_seq, step.token_seq),
            (self._token_pos, step.token_pos),
        ):
            host[:n] = torch.tensor(values, dtype=host.dtype)
            device[:n].copy_(host[:n], non_blocking=True)
        host, device = self._block_table
        rows = len(step.block_table)
        if rows:
            host[:rows] = torch.tensor(step.block_table, dtype=torch.int32)
            device[:rows].copy_(host[:rows], non_blocking=True)

    def _forward(self, size: int) -> torch.Tensor:  # [size, hidden]
        metadata = AttentionMetadata(
            block_size=self.block_size,
            slot_mapping=self._slots[1][:size],
            dtype=self.kv_caches[0][0].dtype,
            paged=PagedInputs(self._block_table[1][:size], self._token_seq[1][:size], self._token_pos[1][:size]),
        )
        ctx = ForwardContext(attn_metadata=metadata, kv_caches=self.kv_caches)
        return self.model(self._ids[1][:size], self._positions[1][:size], ctx)

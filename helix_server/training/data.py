"""Token streams and batches: files tokenized, joined with `<|endoftext|>`, cut into windows.

Training batches are windows of `seq_len + 1` tokens at random offsets of the training stream (a
seeded `torch.Generator`, so a run is reproducible); evaluation uses fixed, non-overlapping windows
of the held-out stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch


def tokenize_files(tokenizer_file: Path, texts: list[str], eos_id: int) -> torch.Tensor:
    """One 1-D int32 stream: each text's ids followed by `eos_id`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)  # [num_tokens]


def random_batches(
    stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless batches `[batch_size, seq_len + 1]` (int64) of windows at seeded random offsets."""
    if stream.numel() < seq_len + 2:
        raise ValueError(f"the training stream ({stream.numel()} tokens) is shorter than one window")
    span = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
        yield stream[starts[:, None] + span[None, :]].long()  # [batch, seq_len + 1]


def eval_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows `[num_windows, seq_len + 1]` spread evenly over `stream`, together
    predicting at most `max_tokens` tokens (at least one window)."""
    if stream.numel() < seq_len + 1:
        raise ValueError(f"the held-out stream ({stream.numel()} tokens) is shorter than one window")
    count = max(1, min(max_tokens // seq_len, (stream.numel() - 1) // seq_len))
    last_start = stream.numel() - seq_len - 1
    starts = torch.linspace(0, last_start, count).long() if count > 1 else torch.zeros(1, dtype=torch.long)
    return stream[starts[:, None] + torch.arange(seq_len + 1)[None, :]].long()  # [count, seq_len + 1]

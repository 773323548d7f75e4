"""Block hashes: what identifies a full block's contents in the prefix cache.

A block's `BlockHash` chains its parent's digest with its own token ids (and, for a first block,
the request's extra keys such as a cache salt), so equal hashes mean equal token prefixes.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Callable, Sequence
from typing import NamedTuple

# bytes -> digest. SHA-256 by default; tests patch it to force collisions.
HashFn = Callable[[bytes], bytes]


def sha256(data: bytes) -> bytes:
    """The default block hash function."""
    return hashlib.sha256(data).digest()


class BlockHash(NamedTuple):
    """What a cached block holds: its chained digest (the lookup key) and the content it stands for.

    Two `BlockHash`es are equal only if digest, token ids and extra keys all are.
    """

    value: bytes
    token_ids: tuple[int, ...]
    extra_keys: tuple | None = None


def hash_block_tokens(
    hash_fn: HashFn, parent_value: bytes, token_ids: Sequence[int], extra_keys: tuple | None = None
) -> BlockHash:
    """The `BlockHash` of a full block whose parent block hashed to `parent_value`."""
    tokens = tuple(token_ids)
    # Length-prefixed fields keep the encoding unambiguous.
    payload = [struct.pack("<I", len(parent_value)), parent_value, struct.pack("<I", len(tokens))]
    payload.append(array("q", tokens).tobytes())
    if extra_keys:
        payload.append(repr(extra_keys).encode())
    return BlockHash(hash_fn(b"".join(payload)), tokens, extra_keys)

"""KV-cache events in vLLM's wire format, published over ZMQ (`--kv-events-config`).

The scheduler's `BlockPool` emits plain `BlockStoredEvent` / `BlockRemovedEvent`s (helix's own
digests) into `KVEventPublisher.put`; a background thread translates them into vLLM's events and
sends each batch of what accumulated as one ZMQ multipart message, like vLLM's `ZmqEventPublisher`:

    [topic, sequence number (8 bytes, big-endian), msgpack(KVEventBatch)]

Block hashes are computed as vLLM computes them by default: `sha256(pickle((parent, tokens,
extra_keys)))`, the first block's parent being `NONE_HASH` (`sha256(pickle(PYTHONHASHSEED))`, or
random when it is unset), and published as the integer of the digest's last 8 bytes (vLLM's
`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES` default). A router hashing a prompt the same way (llm-d's
precise prefix-cache scorer, with the same PYTHONHASHSEED) finds which replica holds its blocks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import queue
import threading
import time
from typing import Any

import msgspec

from helix_server.config import KVEventsConfig
from helix_server.scheduler.kv_events import BlockRemovedEvent, BlockStoredEvent, KVEvent

logger = logging.getLogger(__name__)
MEDIUM = "GPU"  # vLLM's name for the engine's primary KV tier (the only one helix has)


class BlockStored(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """vLLM's BlockStored: a run of blocks, each chained to the previous one."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """vLLM's BlockRemoved."""

    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """vLLM's AllBlocksCleared: forget everything this engine published before."""


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """vLLM's KVEventBatch: a timestamp and the events of one batch."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


def vllm_sha256(value: Any) -> bytes:
    """vLLM's default block hash function (`sha256` over a pickle)."""
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def vllm_none_hash(seed: str | None) -> bytes:
    """The parent hash of every first block: from PYTHONHASHSEED, or random when it is unset."""
    return os.urandom(32) if seed is None else vllm_sha256(seed)


def external_hash(digest: bytes) -> int:
    """A digest as vLLM publishes it: the integer of its last 8 bytes."""
    return int.from_bytes(digest[-8:], byteorder="big")


class VllmBlockHasher:
    """Maps helix's block digests to vLLM's, computed from the chain of stored blocks."""

    def __init__(self, none_hash: bytes) -> None:
        self.none_hash = none_hash
        self._vllm: dict[bytes, bytes] = {}  # helix digest -> vLLM digest, while cached

    def stored(self, event: BlockStoredEvent) -> tuple[bytes, bytes | None]:
        """vLLM's digest of a stored block, and its parent's (None for a first block)."""
        parent = None if event.parent_block_hash is None else self._vllm.get(event.parent_block_hash)
        if event.parent_block_hash is not None and parent is None:
            raise KeyError("a stored block's parent was never published")
        digest = vllm_sha256((parent or self.none_hash, tuple(event.token_ids), event.extra_keys))
        self._vllm[event.block_hash] = digest
        return digest, parent

    def removed(self, event: BlockRemovedEvent) -> bytes | None:
        """vLLM's digest of an evicted block (None if it was never published)."""
        return self._vllm.pop(event.block_hash, None)


class KVEventPublisher:
    """Publishes the scheduler's KV events as vLLM `KVEventBatch`es on a ZMQ PUB socket."""

    def __init__(self, config: KVEventsConfig, block_size: int, seed: str | None = None) -> None:
        import zmq

        self.config = config
        self.block_size = block_size
        self.hasher = VllmBlockHasher(vllm_none_hash(os.environ.get("PYTHONHASHSEED") if seed is None else seed))
        self._queue: queue.Queue[KVEvent | None] = queue.Queue(maxsize=config.max_queue_size)
        self._encoder = msgspec.msgpack.Encoder()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.set_hwm(config.hwm)
        endpoint = config.endpoint
        if "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
            self._socket.bind(endpoint)  # as vLLM: wildcards and local transports bind, others connect
        else:
            self._socket.connect(config.endpoint)
        self._topic = config.topic.encode()
        self._seq = 0
        self.num_dropped = 0
        self._thread = threading.Thread(target=self._run, name="helix-kv-events", daemon=True)
        self._thread.start()

    def put(self, event: KVEvent) -> None:
        """Queue one event (called from the engine thread; never blocks: drops when full)."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.num_dropped += 1

    def close(self) -> None:
        """Send what is queued, then close the socket."""
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._socket.close(linger=1000)
        self._context.term()

    def _run(self) -> None:
        self._send([AllBlocksCleared()])  # a (re)started engine holds nothing
        while True:
            events = [self._queue.get()]
            while True:  # everything that accumulated goes in one batch
                try:
                    events.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in events
            wire = self._translate([e for e in events if e is not None])
            if wire:
                self._send(wire)
            if stop:
                return

    def _translate(self, events: list[KVEvent]) -> list[BlockStored | BlockRemoved]:
        wire: list[BlockStored | BlockRemoved] = []
        last_digest: bytes | None = None
        for event in events:
            if isinstance(event, BlockStoredEvent):
                digest, parent = self.hasher.stored(event)
                previous = wire[-1] if wire else None
                if isinstance(previous, BlockStored) and parent is not None and parent == last_digest:
                    previous.block_hashes.append(external_hash(digest))  # the run continues
                    previous.token_ids.extend(event.token_ids)
                else:
                    wire.append(BlockStored(
                        [external_hash(digest)], None if parent is None else external_hash(parent),
                        list(event.token_ids), self.block_size, None, MEDIUM,
                    ))
                last_digest = digest
            else:
                digest = self.hasher.removed(event)
                last_digest = None
                if digest is not None:
                    wire.append(BlockRemoved([external_hash(digest)], MEDIUM))
        return wire

    def _send(self, events: list[BlockStored | BlockRemoved | AllBlocksCleared]) -> None:
        payload = self._encoder.encode(KVEventBatch(ts=time.time(), events=events))
        try:
            self._socket.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload])
        except Exception:  # a publishing failure must never stop the engine
            logger.exception("could not publish KV events")
        self._seq += 1


def build_kv_event_publisher(config_json: str | None, block_size: int) -> KVEventPublisher | None:
    """The publisher `--kv-events-config` asks for, or None."""
    if not config_json:
        return None
    config = KVEventsConfig.parse(config_json)
    if not config.enable_kv_cache_events or config.publisher == "null":
        return None
    return KVEventPublisher(config, block_size)

"""`--kv-events-config`: a real pyzmq subscriber decodes vLLM-format KV event batches (with the
`msgpack` library, not helix's encoder) while requests run, and they match the engine's cache."""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import time

import httpx
import msgpack
import pytest
import zmq

from helix_server.config import KVEventsConfig
from helix_server.errors import ParameterError
from helix_server.settings import build_config
from tests.api.conftest import engine_idle, start_live_server, wait_until
from tests.deploy.conftest import free_port

BLOCK_SIZE = 8
TOPIC = b"kv@helix"


def vllm_hash(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """vLLM's default `hash_block_tokens`: sha256 of the pickled (parent, tokens, extra_keys)."""
    return hashlib.sha256(pickle.dumps((parent, tokens, None), protocol=pickle.HIGHEST_PROTOCOL)).digest()


class Subscriber:
    """Receives [topic, seq, payload] messages on a bound SUB socket and keeps them decoded."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.bind(endpoint)
        self.socket.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self.messages: list[tuple[int, list]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.stop.is_set():
            if poller.poll(50):
                topic, seq, payload = self.socket.recv_multipart()
                assert topic == TOPIC
                self.messages.append((int.from_bytes(seq, "big"), msgpack.unpackb(payload)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def kv_server(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    port = free_port()
    subscriber = Subscriber(f"tcp://127.0.0.1:{port}")
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{port}",
              "topic": TOPIC.decode()}
    live = start_live_server(
        tiny_model_dir, block_size=BLOCK_SIZE, num_kv_blocks=40, kv_events_config=json.dumps(config)
    )
    yield live, subscriber
    live.stop()
    subscriber.close()


def test_events_match_the_engine_cache(kv_server):
    live, subscriber = kv_server
    prompts = [f"def function_{i}(argument):\n    return argument * {i} + sum(range({i}))\n" * 3 for i in range(12)]
    with httpx.Client(timeout=60) as client:
        for round_ in range(2):  # the second round hits the cache for the prompts still there
            for prompt in prompts:
                response = client.post(live.v1 + "/completions", json={"prompt": prompt, "max_tokens": 4})
                assert response.status_code == 200
    wait_until(lambda: engine_idle(live), timeout=30, what="engine idle")
    time.sleep(0.5)  # the publisher thread sends what is queued

    assert subscriber.messages, "no KV events received"
    seqs = [seq for seq, _ in subscriber.messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "sequence numbers are consecutive"

    none_hash = hashlib.sha256(pickle.dumps("0", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    digests: dict[int, bytes] = {}  # published hash -> full vLLM digest, recomputed here
    live_blocks: dict[int, tuple[int, ...]] = {}
    num_stored = num_removed = 0
    for _, batch in subscriber.messages:
        ts, events = batch[0], batch[1]
        assert isinstance(ts, float) and abs(ts - time.time()) < 120
        for event in events:
            kind = event[0]
            if kind == "BlockStored":
                _, hashes, parent, token_ids, block_size, lora_id, medium = event
                assert block_size == BLOCK_SIZE and lora_id is None and medium == "GPU"
                assert len(token_ids) == len(hashes) * BLOCK_SIZE
                parent_digest = none_hash if parent is None else digests[parent]
                for i, published in enumerate(hashes):
                    tokens = tuple(token_ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
                    parent_digest = vllm_hash(parent_digest, tokens)
                    assert published == int.from_bytes(parent_digest[-8:], "big"), "vLLM's block hash"
                    digests[published] = parent_digest
                    live_blocks[published] = tokens
                    num_stored += 1
            elif kind == "BlockRemoved":
                for published in event[1]:
                    del live_blocks[published]
                    num_removed += 1
            else:
                assert event == ["AllBlocksCleared"], event
                live_blocks.clear()
    assert num_stored > 40 and num_removed > 0, (num_stored, num_removed)

    pool = live.engine.core.scheduler.kv_cache_manager.block_pool
    cached = sorted(b.block_hash.token_ids for b in pool.blocks if b.block_hash is not None)
    assert sorted(live_blocks.values()) == cached, "the subscriber's view is the engine's cached blocks"


def test_kv_events_config_is_checked():
    good = '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557"}'
    assert build_config(env={"HELIX_KV_EVENTS_CONFIG": good}).engine.cache.kv_events_config == good
    assert KVEventsConfig.parse(good).endpoint == "tcp://*:5557"
    for bad in ('{"publisher": "kafka"}', "not json", '{"hwm": "many"}'):
        with pytest.raises(ParameterError) as error:
            build_config(env={"HELIX_KV_EVENTS_CONFIG": bad})
        assert error.value.param == "kv_events_config"

"""The engine's and server's configuration: a frozen tree of msgspec Structs, built once.

`settings.py` is the user-facing side (the table of flags, `HELIX_*` variables and TOML keys, parsed
and layered); this module is what they build and what the code reads: `EngineConfig` (model, cache,
scheduler, speculative), `ServerConfig`, and `HelixConfig` holding both. `config_validation.py`
checks an `EngineConfig` before the model loads.

Values learned at run time (the number of KV blocks, EOS ids, the resolved dtype) live in the engine's
runtime state, never written back here. Flag names follow vLLM's where one exists.
"""

from __future__ import annotations

import msgspec


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Which model to run and how."""

    # A local Hugging Face directory; None means the embedded default model.
    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    # float32 | bfloat16 | float16 | auto (the config's dtype; float32 on a CPU without fast half precision)
    dtype: str = "auto"
    # auto | cpu | cuda | cuda:N | xpu | xpu:N | directml
    device: str = "auto"
    # None: the model's max_position_embeddings.
    max_model_len: int | None = None
    # Seeds the sampler's shared generator (requests without their own `seed`).
    seed: int = 0
    # float32 on an AVX-512 CPU: helix's own kernels (compiled on first use); False: torch's.
    cpu_kernels: bool = True
    # CUDA: run every step eagerly; False: decode and verification steps replay CUDA graphs (with
    # the Triton attention backend; see runner/cuda_graphs.py). vLLM's name.
    enforce_eager: bool = False
    # One of QUANTIZATION_METHODS: a safetensors model's linear weights quantized at load ("int8":
    # weight-only, per output channel); None: the checkpoint's own weights.
    quantization: str | None = None
    # Chat messages' text may contain the tokenizer's control tokens (trusted clients only); False:
    # they are encoded as plain text, so a message can't forge a turn.
    allow_special_tokens_in_content: bool = False


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The paged KV cache pool."""

    block_size: int = 16
    # Exactly this many blocks, or None to size the pool from `kv_cache_memory`.
    num_kv_blocks: int | None = None
    # GiB for the pool on CPU/DirectML (capped at what max_num_seqs full-length sequences can use).
    kv_cache_memory: float = 2.0
    # CUDA: the fraction of the GPU's memory this engine may use in all (weights, activations and
    # the KV pool); the pool gets what is left of it after loading (capped like kv_cache_memory).
    gpu_memory_utilization: float = 0.9
    # Share the KV blocks of identical prompt prefixes between requests (hash of full blocks).
    enable_prefix_caching: bool = True
    # vLLM's `--kv-events-config` JSON (see `KVEventsConfig`); None: no KV-cache events.
    kv_events_config: str | None = None


class KVEventsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """vLLM's `--kv-events-config`: publish KV-cache block events (BlockStored / BlockRemoved /
    AllBlocksCleared) over ZMQ for prefix-aware routers."""

    enable_kv_cache_events: bool = False
    # "zmq" or "null" (no publishing).
    publisher: str = "null"
    # The ZMQ PUB socket to bind ("tcp://*:5557") or connect to.
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def parse(cls, text: str) -> KVEventsConfig:
        """The config from its JSON text (ValueError naming what is wrong)."""
        try:
            config = msgspec.json.decode(text, type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ValueError(f"invalid KV events config: {exc}") from exc
        if config.publisher not in ("zmq", "null"):
            raise ValueError(f"publisher {config.publisher!r} is not zmq or null")
        if config.replay_endpoint is not None:
            raise ValueError("replay_endpoint is not supported")
        return config


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Continuous batching limits."""

    # Tokens computed per step, summed over the batch (prompt chunks plus decodes).
    max_num_batched_tokens: int = 2048
    # Requests (sequences) in the running batch at once.
    max_num_seqs: int = 64
    # The largest `n` a single request may ask for.
    max_n: int = 16
    # The most prompts one request may carry (a completions `prompt` list); each counts n sequences.
    max_prompts_per_request: int = 64
    # Admission control. Requests not yet scheduled, counted in sequences (a request with n counts
    # n), and their prompt tokens: past either bound a new request is refused (503, Retry-After).
    # None: no bound.
    max_queued_requests: int | None = 1024
    max_queued_tokens: int | None = None
    # Seconds a request may wait to be scheduled before it is dropped (503); None: forever.
    max_queue_wait: float | None = None
    # Seconds from arrival after which a request ends with what it has (finish_reason "length").
    request_timeout: float | None = None


METRICS_NAME_PREFIXES = ("helix", "vllm", "both")

SPECULATIVE_METHODS = ("none", "draft", "ngram", "layer-skip")
# `--quantization` methods (weights quantized at load).
QUANTIZATION_METHODS = ("int8",)
# Drafted tokens per step when `num_speculative_tokens` is not set: adapted, so that speculation
# never makes a default setup much slower (a fixed depth with drafts that are rarely accepted can).
DEFAULT_SPECULATIVE_TOKENS: int | str = "auto"


class SpeculativeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Speculative decoding: a cheap proposer drafts tokens that the model verifies in one forward."""

    # none | draft | ngram | layer-skip; None picks "draft" when `draft_model` is set, else "none".
    speculative_method: str | None = None
    # A local HF directory with the target's vocabulary (method "draft").
    draft_model: str | None = None
    # Drafted tokens per step and request, or "auto": adapted per request and step (up to
    # `max_speculative_tokens`) from the measured acceptance rate and costs, down to 0. None (not
    # set): DEFAULT_SPECULATIVE_TOKENS ("auto").
    num_speculative_tokens: int | str | None = None
    max_speculative_tokens: int = 5
    # Prompt lookup: the trailing n-gram lengths tried, longest first.
    ngram_min: int = 1
    ngram_max: int = 4
    # Self-speculation: how many of the model's first layers draft (default: a quarter of them).
    draft_layers: int | None = None

    @property
    def method(self) -> str:
        if self.speculative_method is not None:
            return self.speculative_method
        return "draft" if self.draft_model else "none"

    @property
    def num_speculative_tokens_or_auto(self) -> int | str:
        """`num_speculative_tokens` as set, or its default when not set: a count or "auto"."""
        if self.num_speculative_tokens is None:
            return DEFAULT_SPECULATIVE_TOKENS
        return self.num_speculative_tokens

    @property
    def adaptive(self) -> bool:
        return self.num_speculative_tokens_or_auto == "auto"

    @property
    def resolved_num_speculative_tokens(self) -> int:
        """The configured maximum of tokens drafted per step for one request, as a count ("auto" is
        `max_speculative_tokens`; 0 when speculation is off). Past the config it is called
        `num_speculative_tokens` (`Speculator`, `ModelRunner`, `EngineCore`); the count a request
        drafts in one step, at most this, is its `num_spec_tokens` (`ScheduledRequest`)."""
        if self.method == "none":
            return 0
        if self.adaptive:
            return self.max_speculative_tokens
        return int(self.num_speculative_tokens_or_auto)


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the engine needs, as one value."""

    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = msgspec.field(default_factory=SpeculativeConfig)


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The HTTP server around the engine."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Require `Authorization: Bearer <api_key>` on every route but /health, /ready and /metrics.
    api_key: str | None = None
    # CORS stays off unless origins are listed ("*" allows any).
    allowed_origins: tuple[str, ...] = ()
    # Seconds in-flight requests may take to finish after SIGINT/SIGTERM before they are aborted.
    shutdown_timeout: float = 30.0
    # Largest accepted request body.
    max_request_body_bytes: int = 4 * 1024 * 1024
    # Seconds a client may take to send a request's head (from connecting, or from the first byte of
    # a later request on a kept-alive connection); then the connection is closed (408 if it sent part).
    header_timeout: float = 10.0
    # Seconds a request body may stall between two reads; then 408 and the connection is closed.
    body_timeout: float = 30.0
    # Seconds an idle kept-alive connection stays open after a response.
    keep_alive_timeout: float = 5.0
    log_level: str = "info"
    # The tool-call parser for tool_choice "auto": a family name, "auto" (detected from the chat
    # template) or "none"; and whether "auto" is allowed at all.
    tool_call_parser: str = "auto"
    enable_auto_tool_choice: bool = True
    # Prometheus metric names: "helix" (helix:...), "vllm" (vLLM's vllm:... names and model_name
    # label, for routers and autoscalers built on vLLM) or "both".
    metrics_name_prefix: str = "helix"
    # Answer requests that name any model with the served model (Claude Code sends its own model
    # names); by default an unknown name is a 404 model_not_found.
    accept_any_model_name: bool = False
    # Most responses of the Responses API kept for `previous_response_id` and GET (oldest forgotten
    # first); 0 stores none.
    max_stored_responses: int = 1000


class HelixConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The whole configuration of a `helix-server serve` process."""

    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)

"""The user-facing settings: one table of every setting, read from CLI flags, `HELIX_*` environment
variables and TOML files, and turned into the frozen config structs of `config.py` (which is what the
engine and server read).

Precedence: a command-line flag beats an environment variable, which beats the `--config` file,
which beats the default. Names are the same everywhere: `--max-num-seqs`, `HELIX_MAX_NUM_SEQS`,
`max_num_seqs = ...` in TOML (flat keys, or grouped under `[model]`, `[cache]`, `[scheduler]`,
`[server]` tables).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from helix_server.config import (
    METRICS_NAME_PREFIXES,
    QUANTIZATION_METHODS,
    SPECULATIVE_METHODS,
    CacheConfig,
    EngineConfig,
    HelixConfig,
    KVEventsConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    SpeculativeConfig,
)
from helix_server.errors import ParameterError

SECTIONS: dict[str, type[msgspec.Struct]] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "speculative": SpeculativeConfig,
    "server": ServerConfig,
}


def speculation_depth(text: str | int) -> int | str:
    """`--num-speculative-tokens`: a count of drafted tokens, or "auto"."""
    if isinstance(text, int):
        return text
    text = text.strip().lower()
    return "auto" if text == "auto" else int(text)


def boolean(text: str | bool) -> bool:
    """A switch: true/false, 1/0, yes/no, on/off (environment variables, TOML strings)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def optional_int(text: str | int | None) -> int | None:
    """A count, or "none" for no limit."""
    if text is None or isinstance(text, int):
        return text
    value = text.strip().lower()
    return None if value in ("none", "unlimited") else int(value)


def optional_float(text: str | float | None) -> float | None:
    """Seconds, or "none" for no limit."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    value = text.strip().lower()
    return None if value in ("none", "unlimited") else float(value)


def speculative_method(text: str) -> str:
    method = text.strip().lower()
    if method not in SPECULATIVE_METHODS:
        raise ValueError(f"{text!r} is not one of {', '.join(SPECULATIVE_METHODS)}")
    return method


def quantization(text: str) -> str | None:
    """`--quantization`: int8, or "none" for the checkpoint's own weights."""
    method = text.strip().lower()
    if method == "none":
        return None
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"{text!r} is not one of none, {', '.join(QUANTIZATION_METHODS)}")
    return method


def metrics_name_prefix(text: str) -> str:
    """`--metrics-name-prefix`: helix | vllm | both."""
    prefix = text.strip().lower()
    if prefix not in METRICS_NAME_PREFIXES:
        raise ValueError(f"{text!r} is not one of {', '.join(METRICS_NAME_PREFIXES)}")
    return prefix


def kv_events_config(text: str) -> str:
    """`--kv-events-config`: vLLM's JSON (checked here, kept as text)."""
    KVEventsConfig.parse(text)
    return text


def tool_call_parser(text: str) -> str:
    """`--tool-call-parser`: a parser family (or vLLM alias), "auto" or "none"."""
    from helix_server.engine.tool_parsers import AUTO, NONE, get_tool_parser

    name = text.strip().lower()
    if name not in (AUTO, NONE):
        get_tool_parser(name)
    return name


@dataclass(frozen=True)
class Setting:
    """One configurable value: its section in the config tree, its type and its help text."""

    name: str
    section: str
    kind: Callable[[Any], Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "HELIX_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("model", "model", str, "Local Hugging Face model directory or GGUF file, or a built-in model: "
            "smollm2-135m-instruct (the default) or helix-pycoder-tiny."),
    Setting("tokenizer", "model", str, "Tokenizer directory (default: the model directory)."),
    Setting("served_model_name", "model", str, "Model name clients use (default: the directory name)."),
    Setting("dtype", "model", str, "float32 | bfloat16 | float16 | auto (the model's dtype; float32 on CPUs "
            "without fast half precision)."),
    Setting("device", "model", str, "auto | cpu | cuda | cuda:N | xpu | xpu:N | directml."),
    Setting("max_model_len", "model", int, "Longest sequence (prompt + completion) in tokens "
            "(default: the model's max_position_embeddings)."),
    Setting("seed", "model", int, "Seed of the sampler for requests without their own seed."),
    Setting("cpu_kernels", "model", boolean, "float32/bfloat16 on an AVX-512 CPU: run helix's own kernels, compiled "
            "on first use (--no-cpu-kernels: torch's only)."),
    Setting("enforce_eager", "model", boolean, "CUDA: run every step eagerly, without CUDA graphs (by default "
            "decode and verification steps replay graphs captured at start-up)."),
    Setting("quantization", "model", quantization, "int8: quantize a safetensors model's linear weights at "
            "load (weight-only, symmetric, one scale per output channel; about a quarter of float32's "
            "bytes) | none."),
    Setting("allow_special_tokens_in_content", "model", boolean, "Chat messages may contain control tokens "
            "such as <|im_start|> (trusted clients only; by default they are encoded as plain text)."),
    Setting("block_size", "cache", int, "Tokens per KV cache block."),
    Setting("num_kv_blocks", "cache", int, "Exact number of KV cache blocks (overrides --kv-cache-memory)."),
    Setting("kv_cache_memory", "cache", float, "GiB for the KV cache pool on CPU / DirectML (capped at what "
            "--max-num-seqs full-length sequences can use)."),
    Setting("gpu_memory_utilization", "cache", float, "CUDA: fraction of the GPU's memory the engine may use "
            "in all; the KV pool gets what is left after loading the weights."),
    Setting("enable_prefix_caching", "cache", boolean, "Share the KV blocks of identical prompt prefixes "
            "between requests (--no-enable-prefix-caching turns it off)."),
    Setting("kv_events_config", "cache", kv_events_config, "vLLM's KV-cache events as JSON, e.g. "
            '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv"}: '
            "BlockStored/BlockRemoved/AllBlocksCleared batches in vLLM's msgpack format, with vLLM's block "
            "hashes (PYTHONHASHSEED seeds them, as in vLLM)."),
    Setting("max_num_batched_tokens", "scheduler", int, "Token budget of one step (prompt chunks + decodes)."),
    Setting("max_num_seqs", "scheduler", int, "Most sequences in the running batch."),
    Setting("max_n", "scheduler", int, "Largest `n` (completions per request) a request may ask for."),
    Setting("max_prompts_per_request", "scheduler", int, "Most prompts one request may carry (a list "
            "`prompt`); more are a 400."),
    Setting("max_queued_requests", "scheduler", optional_int, "Most requests waiting to be scheduled "
            "(a request with n counts n); more get 503 with Retry-After ('none': no limit)."),
    Setting("max_queued_tokens", "scheduler", optional_int, "Most prompt tokens waiting to be scheduled; "
            "more get 503 with Retry-After (default: no limit)."),
    Setting("max_queue_wait", "scheduler", optional_float, "Seconds a request may wait to be scheduled "
            "before it is dropped with 503 (default: forever)."),
    Setting("request_timeout", "scheduler", optional_float, "Seconds from arrival after which a request "
            "ends with what it has, finish_reason 'length' (default: no limit)."),
    Setting("speculative_method", "speculative", speculative_method, "Speculative decoding proposer: "
            "none | draft | ngram | layer-skip (default: draft when --draft-model is given, else none)."),
    Setting("draft_model", "speculative", str, "Draft model directory (same vocabulary as the model)."),
    Setting("num_speculative_tokens", "speculative", speculation_depth, "Tokens drafted per step and "
            "request, or 'auto' (adapted from the measured acceptance rate and costs, down to 0; the "
            "default)."),
    Setting("max_speculative_tokens", "speculative", int, "Most tokens 'auto' drafts per step and request."),
    Setting("ngram_min", "speculative", int, "Shortest trailing n-gram prompt lookup matches."),
    Setting("ngram_max", "speculative", int, "Longest trailing n-gram prompt lookup matches."),
    Setting("draft_layers", "speculative", int, "layer-skip: how many of the model's first layers draft "
            "(default: a quarter of them)."),
    Setting("host", "server", str, "Address to bind."),
    Setting("port", "server", int, "Port to bind."),
    Setting("api_key", "server", str, "Require 'Authorization: Bearer KEY' (not on /health, /ready, /metrics)."),
    Setting("allowed_origins", "server", list, "CORS origins to allow (comma-separated; off by default)."),
    Setting("shutdown_timeout", "server", float, "Seconds in-flight requests get to finish on SIGINT/SIGTERM."),
    Setting("max_request_body_bytes", "server", int, "Largest accepted request body, in bytes."),
    Setting("header_timeout", "server", float, "Seconds a client may take to send a request's head; then "
            "the connection is closed (408 when it sent part of one)."),
    Setting("body_timeout", "server", float, "Seconds a request body may stall between two reads; then 408 "
            "and the connection is closed."),
    Setting("keep_alive_timeout", "server", float, "Seconds an idle kept-alive connection stays open after "
            "a response."),
    Setting("log_level", "server", str, "debug | info | warning | error."),
    Setting("tool_call_parser", "server", tool_call_parser, "How tool calls are read from the model's output for "
            "tool_choice 'auto': hermes | llama3_json | mistral | auto (detected from the chat template) | "
            "none."),
    Setting("metrics_name_prefix", "server", metrics_name_prefix, "Prometheus metric names: helix "
            "(helix:num_requests_running, ...), vllm (vLLM's vllm:... names with a model_name label, for "
            "routers and autoscalers) or both."),
    Setting("max_stored_responses", "server", int, "Most Responses API responses kept in memory for "
            "previous_response_id and GET /v1/responses/{id} (oldest forgotten first; 0 stores none)."),
    Setting("accept_any_model_name", "server", boolean, "Serve requests naming any model with the served "
            "model (Claude Code and other clients send their own model names; default: an unknown name is a "
            "404)."),
    Setting("enable_auto_tool_choice", "server", boolean, "Allow tool_choice 'auto' (needs a tool-call "
            "parser; --no-enable-auto-tool-choice refuses it with 400)."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (default None, so an unset flag falls through to env/TOML/default)."""
    groups = {name: parser.add_argument_group(f"{name} options") for name in SECTIONS}
    for setting in SETTINGS:
        default = getattr(SECTIONS[setting.section](), setting.name)
        help_text = f"{setting.help} [env {setting.env}; default {default!r}]".replace("%", "%%")
        group = groups[setting.section]
        if setting.kind is boolean:  # --name and --no-name
            group.add_argument(
                setting.flag, dest=setting.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kind = _parse_list if setting.kind is list else setting.kind
        group.add_argument(setting.flag, dest=setting.name, type=kind, default=None, help=help_text)


def build_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> HelixConfig:
    """Merge flags > env > TOML > defaults into one frozen `HelixConfig`."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_toml(config_file))
    environ = os.environ if env is None else env
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.name] = _convert(setting, environ[setting.env], setting.env)
    for name, value in (flags or {}).items():
        if name in _BY_NAME and value is not None:
            values[name] = value
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for name, value in values.items():
        sections[_BY_NAME[name].section][name] = value
    try:
        structs = {name: msgspec.convert(v, SECTIONS[name]) for name, v in sections.items()}
    except msgspec.ValidationError as exc:
        raise ParameterError(f"invalid setting: {exc}") from exc
    engine = EngineConfig(
        model=structs["model"],
        cache=structs["cache"],
        scheduler=structs["scheduler"],
        speculative=structs["speculative"],
    )
    return HelixConfig(engine=engine, server=structs["server"])


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file: flat keys and/or `[model]`-style tables of them."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            items = value.items()
        else:
            items = [(key, value)]
        for name, item in items:
            if name not in _BY_NAME:
                raise ParameterError(f"{path}: unknown setting {name!r}", name)
            flat[name] = _convert(_BY_NAME[name], item, f"{path}: {name}")
    return flat


def _convert(setting: Setting, value: Any, source: str) -> Any:
    try:
        if setting.kind is list:
            return _parse_list(value) if isinstance(value, str) else tuple(value)
        if isinstance(value, str):  # text from the environment, a flag or a TOML string: parse it
            return setting.kind(value)
        if setting.kind is boolean and not isinstance(value, bool):
            raise TypeError(f"{value!r} is not true or false")
        if setting.kind in (float, optional_float):  # TOML writes 2 for 2.0
            return float(value)
        return value  # already typed by TOML; msgspec checks it
    except (TypeError, ValueError) as exc:
        kind = getattr(setting.kind, "__name__", "value").replace("_", " ")
        raise ParameterError(f"{source}: {value!r} is not a valid {kind}", setting.name) from exc


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())

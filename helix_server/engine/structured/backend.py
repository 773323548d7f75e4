"""The grammar backend (llguidance): compile constraints once, hand out per-sequence matchers.

Why llguidance: MIT, no dependencies, one wheel that installs everywhere helix runs; it computes
masks lazily (no per-schema precomputation over the vocabulary, so compiling a typical schema takes
milliseconds), covers most of JSON Schema and reports unsupported keywords instead of ignoring them,
takes Lark grammars with embedded `%json{...}` schemas, and bounds its own work with fuel limits, so
a pathological regex or schema fails instead of hanging a thread.

Interface (also used by tool calling for `tool_choice` required / named):

    backend = StructuredOutputBackend(tokenizer)          # helix `Tokenizer`; LLTokenizer built lazily
    compiled = backend.compile(spec)                      # cached; ParameterError naming spec.param
    compiled = await backend.compile_async(spec)          # the same, off the event loop, time-limited
    matcher = backend.new_matcher(spec)                   # GrammarMatcher: fill_bitmask /
                                                          # accept_tokens / valid_prefix / rollback /
                                                          # is_terminated
A constraint is a `sampling_params.StructuredOutputSpec`; for markup around JSON build a Lark grammar
with `grammar.json_schema_lark(schema, prefix, suffix)` and use kind "grammar".
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from helix_server.engine.structured.grammar import grammar_of
from helix_server.engine.structured.matcher import GrammarMatcher
from helix_server.errors import ParameterError
from helix_server.sampling_params import StructuredOutputSpec

if TYPE_CHECKING:  # llguidance is imported by the first structured request (it costs ~2 MiB resident)
    from llguidance import LLMatcher, LLTokenizer

# Compiled grammars kept (least recently used dropped first).
DEFAULT_CACHE_SIZE = 256
# Seconds a compile may take before the request is refused.
DEFAULT_COMPILE_TIMEOUT = 10.0
# llguidance's resource limits: the initial lexer fuel bounds regex analysis at compile time (about
# 50k units per ms), the step limits bound each mask computation.
PARSER_LIMITS = {
    "initial_lexer_fuel": 2_000_000,
    "step_lexer_fuel": 400_000,
    "step_max_items": 50_000,
    "max_lexer_states": 100_000,
    "max_grammar_size": 200_000,
    "verbose_errors": False,
}


@dataclass(frozen=True)
class CompiledGrammar:
    """A validated grammar and a matcher at its start, copied for each sequence."""

    grammar: str
    template: LLMatcher


class StructuredOutputBackend:
    """Compiles `StructuredOutputSpec`s for one tokenizer, with a bounded LRU cache (thread-safe)."""

    def __init__(
        self,
        tokenizer: Any,
        cache_size: int = DEFAULT_CACHE_SIZE,
        compile_timeout: float = DEFAULT_COMPILE_TIMEOUT,
    ) -> None:
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self.compile_timeout = compile_timeout
        self._cache: OrderedDict[tuple, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: LLTokenizer | None = None
        self.eos_token_id: int | None = _first_eos(tokenizer)

    @property
    def ll_tokenizer(self) -> LLTokenizer:
        """llguidance's view of the vocabulary (built on first use: about a second for 150k tokens)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = _ll_tokenizer(self.tokenizer, self.eos_token_id)
            return self._ll_tokenizer

    @property
    def num_words(self) -> int:
        """int32 words of one bitmask row."""
        return (self.ll_tokenizer.vocab_size + 31) // 32

    def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """The compiled grammar of `spec`, from the cache when it is there."""
        with self._lock:
            cached = self._cache.get(spec.key)
            if cached is not None:
                self._cache.move_to_end(spec.key)
                return cached
        if self.eos_token_id is None:
            raise ParameterError(
                "This model's tokenizer has no EOS token, so outputs cannot be constrained.", spec.param
            )
        grammar = grammar_of(spec)
        from llguidance import LLMatcher, LLParserLimits

        template = LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=LLParserLimits(**PARSER_LIMITS))
        if template.is_error():
            raise ParameterError(f"Invalid {spec.param}: {_short(template.get_error())}", spec.param)
        compiled = CompiledGrammar(grammar, template)
        with self._lock:
            self._cache[spec.key] = compiled
            self._cache.move_to_end(spec.key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    async def compile_async(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """`compile` in a worker thread; a compile longer than `compile_timeout` is a 400. (The
        thread itself is bounded by llguidance's fuel limits.)"""
        with self._lock:
            cached = self._cache.get(spec.key)
        if cached is not None:
            return cached
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.compile, spec), self.compile_timeout)
        except TimeoutError:
            raise ParameterError(
                f"The {spec.param} constraint took longer than {self.compile_timeout:g} s to compile.",
                spec.param,
            ) from None

    def new_matcher(self, spec: StructuredOutputSpec) -> GrammarMatcher:
        """A matcher at the start of `spec`'s grammar (compiled now if it left the cache)."""
        compiled = self.compile(spec)
        return GrammarMatcher(compiled.template.deep_copy(), self.eos_token_id, self.num_words)

    def __len__(self) -> int:
        return len(self._cache)


def _first_eos(tokenizer: Any) -> int | None:
    own = getattr(tokenizer, "eos_token_id", None)  # the tokenizer's own EOS token
    if own is not None:
        return int(own)
    ids = sorted(getattr(tokenizer, "eos_token_ids", ()))
    return ids[0] if ids else None


def _ll_tokenizer(tokenizer: Any, eos_token_id: int | None) -> LLTokenizer:
    """From the tokenizer's Rust backend when it has one (exact), else from helix's token bytes."""
    from llguidance import LLTokenizer, TokenizerWrapper

    eos = sorted(getattr(tokenizer, "eos_token_ids", ())) or eos_token_id
    backend = getattr(tokenizer, "backend", None)
    if backend is not None:
        return LLTokenizer(backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=eos)
    return LLTokenizer(TokenizerWrapper(_BytesVocabulary(tokenizer, eos_token_id)), eos_token=eos)


class _BytesVocabulary:
    """The duck-typed tokenizer `llguidance.TokenizerWrapper` reads: token bytes, EOS, encoder."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.bos_token_id = None
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(getattr(tokenizer, "all_special_ids", ()))

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def _short(message: str, limit: int = 500) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."

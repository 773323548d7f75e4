"""Structured outputs: the grammar backend (llguidance) and per-request matchers.

See `backend` for the interface: `StructuredOutputBackend.compile` (cached) -> `new_matcher` ->
`GrammarMatcher` (`fill_bitmask`, `accept_tokens`, `valid_prefix`, `rollback`, `is_terminated`).
`StructuredOutputManager` keeps the engine's matchers in step with its requests.
"""

from helix_server.engine.structured.backend import CompiledGrammar, StructuredOutputBackend
from helix_server.engine.structured.grammar import choice_lark, json_schema_lark
from helix_server.engine.structured.matcher import GrammarMatcher

__all__ = ["CompiledGrammar", "GrammarMatcher", "StructuredOutputBackend", "choice_lark", "json_schema_lark"]

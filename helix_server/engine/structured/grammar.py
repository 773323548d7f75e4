"""`StructuredOutputSpec` -> an llguidance grammar (the text `LLMatcher` compiles).

Pure translation with size bounds: every kind becomes one llguidance grammar string. Nothing here
touches a tokenizer; `backend.StructuredOutputBackend` compiles and validates the result.
"""

from __future__ import annotations

import json

from helix_server.errors import ParameterError
from helix_server.sampling_params import StructuredOutputSpec

# The largest schema, regex, grammar or choice list accepted, in characters of its text.
MAX_CONSTRAINT_CHARS = 64 * 1024
MAX_CHOICES = 1024
MAX_WHITESPACE_PATTERN_CHARS = 256
# Any JSON object (`response_format: {"type": "json_object"}`).
JSON_OBJECT_SCHEMA = {"type": "object"}


def grammar_of(spec: StructuredOutputSpec) -> str:
    """The llguidance grammar of `spec`; `ParameterError` naming `spec.param` when it is malformed
    or too large (compile errors surface later, in `StructuredOutputBackend.compile`)."""
    from llguidance import LLMatcher  # here, not at import: a server imports it on its first constraint

    if len(spec.value) > MAX_CONSTRAINT_CHARS:
        raise ParameterError(
            f"The {spec.kind} constraint is {len(spec.value)} characters long; at most "
            f"{MAX_CONSTRAINT_CHARS} are allowed.",
            spec.param,
        )
    if spec.kind in ("json", "json_object"):
        return _json_grammar(spec)
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        return LLMatcher.grammar_from_lark(choice_lark(_choices(spec)))
    if spec.kind == "grammar":
        if not spec.value.strip():
            raise ParameterError("The grammar is empty.", spec.param)
        return LLMatcher.grammar_from_lark(spec.value)
    raise ParameterError(f"Unknown structured output kind {spec.kind!r}.", spec.param)


def choice_lark(choices: list[str]) -> str:
    """A Lark grammar matching exactly one of `choices` (JSON string literals are Lark literals)."""
    return "start: " + " | ".join(json.dumps(choice) for choice in choices) + "\n"


def json_schema_lark(schema: dict, prefix: str = "", suffix: str = "") -> str:
    """A Lark grammar: `prefix`, then JSON matching `schema` (compact), then `suffix`.

    The building block for constraints wrapped in markup (e.g. a tool call's
    `<tool_call>{...}</tool_call>`); use it as `StructuredOutputSpec("grammar", ...)`.
    """
    parts = [json.dumps(prefix)] if prefix else []
    parts.append("%json " + json.dumps(_compact(schema)))
    if suffix:
        parts.append(json.dumps(suffix))
    return "start: " + " ".join(parts) + "\n"


def _json_grammar(spec: StructuredOutputSpec) -> str:
    if spec.kind == "json_object":
        schema: object = JSON_OBJECT_SCHEMA
    else:
        try:
            schema = json.loads(spec.value)
        except ValueError as exc:
            raise ParameterError(f"The JSON schema is not valid JSON: {exc}.", spec.param) from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise ParameterError("The JSON schema must be an object.", spec.param)
    options = _whitespace_options(spec)
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, overrides=options)


def _compact(schema: dict) -> dict:
    """`schema` with compact-JSON options (no whitespace), unless it sets its own."""
    if "x-guidance" in schema:
        return schema
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def _whitespace_options(spec: StructuredOutputSpec) -> dict:
    pattern = spec.whitespace_pattern
    if pattern is None:
        return {"whitespace_flexible": False}
    if len(pattern) > MAX_WHITESPACE_PATTERN_CHARS:
        raise ParameterError(
            f"whitespace_pattern is longer than {MAX_WHITESPACE_PATTERN_CHARS} characters.", spec.param
        )
    return {"whitespace_flexible": True, "whitespace_pattern": pattern}


def _choices(spec: StructuredOutputSpec) -> list[str]:
    try:
        choices = json.loads(spec.value)
    except ValueError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ParameterError("choice must be a non-empty list of strings.", spec.param)
    if len(choices) > MAX_CHOICES:
        raise ParameterError(f"choice allows at most {MAX_CHOICES} strings.", spec.param)
    if any(not c for c in choices):
        raise ParameterError("choice strings must not be empty.", spec.param)
    return choices

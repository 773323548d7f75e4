"""Wire constraints -> `StructuredOutputSpec`: OpenAI's `response_format` and vLLM's `structured_outputs`.

- `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`, or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
- `structured_outputs` (vLLM's extension): exactly one of `json` (a schema, object or JSON text),
  `regex`, `choice` (a list of strings), `grammar` (Lark) or `json_object: true`; optionally
  `whitespace_pattern` for the JSON kinds.
Shape errors are 400s naming the parameter; the schema or grammar itself is checked when it compiles
(`engine.structured`), with the same parameter in the error.
"""

from __future__ import annotations

import json
from typing import Any

from helix_server.api.errors import bad_request
from helix_server.engine.structured.grammar import MAX_CONSTRAINT_CHARS
from helix_server.sampling_params import StructuredOutputSpec

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_STRUCTURED_KEYS = frozenset(_KINDS) | {
    "whitespace_pattern",
    "disable_any_whitespace",
    "disable_fallback",
    "disable_additional_properties",
    "structural_tag",
}


def structured_output_spec(
    response_format: dict[str, Any] | None, structured_outputs: dict[str, Any] | None
) -> StructuredOutputSpec | None:
    """The constraint a request asks for, or None; at most one of the two parameters may set one."""
    from_format = _from_response_format(response_format)
    from_vllm = _from_structured_outputs(structured_outputs)
    if from_format is not None and from_vllm is not None:
        raise bad_request("Set either response_format or structured_outputs, not both.", "structured_outputs")
    return from_format or from_vllm


def _from_response_format(value: dict[str, Any] | None) -> StructuredOutputSpec | None:
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("response_format must be an object.", param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec("json_object", param=param)
    if kind != "json_schema":
        raise bad_request(
            f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}.", param
        )
    body = value.get("json_schema")
    if not isinstance(body, dict):
        raise bad_request("response_format.json_schema must be an object with a 'schema'.", param)
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise bad_request("response_format.json_schema.name must be a string.", param)
    schema = body.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise bad_request("response_format.json_schema.schema must be a JSON Schema object.", param)
    return StructuredOutputSpec("json", _schema_text(schema, param), param=param)


def _from_structured_outputs(value: dict[str, Any] | None) -> StructuredOutputSpec | None:
    param = "structured_outputs"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("structured_outputs must be an object.", param)
    unknown = sorted(set(value) - _STRUCTURED_KEYS)
    if unknown:
        raise bad_request(f"structured_outputs has unknown fields: {', '.join(unknown)}.", param)
    if value.get("structural_tag") is not None:
        raise bad_request("structured_outputs.structural_tag is not supported by this server.", param)
    chosen = [k for k in _KINDS if value.get(k) not in (None, False)]
    if len(chosen) != 1:
        raise bad_request(f"structured_outputs must set exactly one of {', '.join(_KINDS)}.", param)
    kind = chosen[0]
    whitespace = value.get("whitespace_pattern")
    if whitespace is not None and (not isinstance(whitespace, str) or kind not in ("json", "json_object")):
        raise bad_request("whitespace_pattern must be a string, used with json or json_object.", param)
    item = value[kind]
    if kind == "json":
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except ValueError:
                raise bad_request("structured_outputs.json must be a JSON Schema.", param) from None
        if not isinstance(item, (dict, bool)):
            raise bad_request("structured_outputs.json must be a JSON Schema object.", param)
        return StructuredOutputSpec("json", _schema_text(item, param), whitespace, param)
    if kind == "json_object":
        return StructuredOutputSpec("json_object", "", whitespace, param)
    if kind == "choice":
        if not isinstance(item, list) or not item or not all(isinstance(c, str) and c for c in item):
            raise bad_request(
                "structured_outputs.choice must be a non-empty list of non-empty strings.", param
            )
        return StructuredOutputSpec("choice", json.dumps(item), param=param)
    if not isinstance(item, str):
        raise bad_request(f"structured_outputs.{kind} must be a string.", param)
    return StructuredOutputSpec(kind, item, param=param)


def _schema_text(schema: object, param: str) -> str:
    """The schema as compact JSON text (property order kept: it is the order of the output)."""
    text = json.dumps(schema, separators=(",", ":"))
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise bad_request(
            f"The JSON schema is {len(text)} characters long; at most {MAX_CONSTRAINT_CHARS} are allowed.",
            param,
        )
    return text

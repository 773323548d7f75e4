"""The Responses API's options checked, and `text.format` turned into a structured-output constraint.

Options that ask for what this server lacks (reasoning, background runs, conversations, prompt
templates, log-probabilities, automatic truncation) are a 400 naming them, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from helix_server.api.errors import APIError, bad_request
from helix_server.api.protocol.responses import ResponsesRequest
from helix_server.api.serving.params import check_prompt_logprobs, check_stream_options, reject
from helix_server.api.serving.structured import structured_output_spec
from helix_server.sampling_params import StructuredOutputSpec

# `include` values that ask for nothing here: there are no reasoning items to include.
_HARMLESS_INCLUDES = frozenset({"reasoning.encrypted_content"})
_UNSUPPORTED = ("conversation", "prompt", "context_management")
_FORMAT_KEYS = frozenset({"type", "name", "schema", "strict", "description"})
_MAX_METADATA_KEYS = 16


def check_options(body: ResponsesRequest) -> None:
    """400 for any option this server can't honour (named in the error)."""
    for name in _UNSUPPORTED:
        if getattr(body, name) is not None:
            reject(name)
    if body.background:
        reject("background", "Background responses")
    if body.reasoning and any(
        v is not None for k, v in body.reasoning.items() if (k, v) != ("effort", "none")
    ):
        reject("reasoning", "Reasoning (this server's models have no reasoning items)")
    for value in body.include or ():
        if value not in _HARMLESS_INCLUDES:
            reject("include", f"include {value!r}")
    if body.truncation not in (None, "disabled"):
        reject("truncation", f"truncation {body.truncation!r}")
    if body.top_logprobs:
        reject("top_logprobs", "Log-probabilities on the Responses API")
    if body.n != 1:
        raise bad_request("n must be 1 on the Responses API.", "n")
    if body.return_token_ids:
        reject("return_token_ids", "return_token_ids on the Responses API")
    check_prompt_logprobs(body)
    if body.prompt_logprobs is not None:
        reject("prompt_logprobs", "prompt_logprobs on the Responses API")
    check_stream_options(body)
    _check_metadata(body.metadata)


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > _MAX_METADATA_KEYS or not all(isinstance(v, str) for v in metadata.values()):
        raise bad_request(f"metadata holds at most {_MAX_METADATA_KEYS} string values.", "metadata")


def text_format_spec(text: dict[str, Any] | None) -> StructuredOutputSpec | None:
    """The constraint `text.format` asks for: none for `text`, any JSON object for `json_object`, a
    schema for `json_schema` (checked as chat's `response_format`, errors naming `text.format`)."""
    if text is None:
        return None
    extra = sorted(set(text) - {"format", "verbosity"})
    if extra:
        raise bad_request(f"Unrecognized field of text: {extra[0]}", f"text.{extra[0]}")
    if text.get("verbosity") not in (None, "medium"):  # medium, OpenAI's default, asks for nothing
        reject("text.verbosity", f"text.verbosity {text['verbosity']!r}")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("text.format must be an object.", "text.format")
    unknown = sorted(set(fmt) - _FORMAT_KEYS)
    if unknown:
        raise bad_request(f"Unrecognized field of text.format: {unknown[0]}", f"text.format.{unknown[0]}")
    response_format: dict[str, Any] = {"type": fmt.get("type")}
    if fmt.get("type") == "json_schema":
        if "schema" not in fmt:
            raise bad_request("A json_schema format needs a 'schema'.", "text.format.schema")
        response_format["json_schema"] = {k: v for k, v in fmt.items() if k != "type"}
    try:
        spec = structured_output_spec(response_format, None)
    except APIError as exc:
        exc.param = "text.format"
        exc.message = exc.message.replace("response_format.json_schema", "text.format").replace(
            "response_format", "text.format"
        )
        raise
    return None if spec is None else dataclasses.replace(spec, param="text.format")

"""The responses the OpenAPI schema documents beyond Litestar's 200: errors, streams, Prometheus text.

Litestar documents each operation's 200 from the handler's return type; helix's handlers return raw
`Response`s and raise `APIError`s, so `document_responses` adds what the server really answers: every
error as OpenAI's envelope (`#/components/schemas/ErrorResponse`; Anthropic's `AnthropicError` on
the /v1/messages routes), the SSE endpoints as
`text/event-stream`, `/metrics` as `text/plain`, and the bearer scheme on every route that needs the
key. Which routes are public (no key, answered while draining) is read from the app's handlers.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Litestar
from litestar.routes import HTTPRoute

from helix_server.api.guards import PUBLIC
from helix_server.api.protocol.anthropic_events import AnthropicError
from helix_server.api.protocol.common import ErrorResponse

ERROR_SCHEMA = "ErrorResponse"
# Anthropic's routes answer errors in Anthropic's envelope, with 529 where the others send 503.
ANTHROPIC_ERROR_SCHEMA = "AnthropicError"
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
ANTHROPIC_BAD_REQUEST = "Invalid request: the error's message names the field at fault."
BEARER = "bearer"
METHODS = ("get", "head", "post", "put", "patch", "delete")

BAD_REQUEST = "Invalid request: the envelope's `param` names the parameter at fault."
UNAUTHORIZED = "Missing or wrong `Authorization: Bearer KEY` (only when the server runs with --api-key)."
TOO_LARGE = "The body is larger than --max-request-body-bytes."
UNAVAILABLE = (
    "The server is shutting down, its engine is not running, or the waiting queue is full or was waited "
    "in too long (`code` says which); retry after `Retry-After` seconds."
)
RETRY_AFTER = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
WWW_AUTHENTICATE = {"description": "`Bearer`.", "schema": {"type": "string"}}
SSE_DESCRIPTION = "With `stream: true`: server-sent events, `data: {chunk}` ... then `data: [DONE]`."
EVENTS_DESCRIPTION = (
    "With `stream: true`: server-sent events, `event: <type>` / `data: {event}` pairs (no `[DONE]`)."
)
RESPONSE_NOT_FOUND = "No stored response has this id (`response_not_found`)."

# Errors particular to one operation, beyond the rules in `_errors_for`.
EXTRA_ERRORS: dict[tuple[str, str], dict[str, str]] = {
    ("/v1/models/{model_id}", "get"): {"404": "The server does not serve this model (`model_not_found`)."},
    ("/generate/stream", "get"): {"400": BAD_REQUEST},
    ("/health", "get"): {"503": "The engine loop is dead or stuck (the body also carries the details)."},
    ("/ready", "get"): {"503": "Warming up, shutting down, or the engine loop is not running."},
    ("/v1/responses", "post"): {
        "404": "`previous_response_id` names no stored response, or an unknown model."
    },
    ("/v1/messages", "post"): {
        "404": "An unknown model (unless the server runs with --accept-any-model-name)."
    },
    ("/v1/responses/{response_id}", "get"): {"404": RESPONSE_NOT_FOUND},
    ("/v1/responses/{response_id}", "delete"): {"404": RESPONSE_NOT_FOUND},
}
EXTRA_ERRORS.update({(path, "head"): errors for (path, method), errors in list(EXTRA_ERRORS.items())})

# Operations that stream: "json+sse" answers JSON, or SSE with `stream: true`; "sse" always streams.
STREAMS: dict[tuple[str, str], str] = {
    ("/v1/completions", "post"): "json+sse",
    ("/v1/chat/completions", "post"): "json+sse",
    ("/v1/responses", "post"): "json+events",
    ("/v1/messages", "post"): "json+events",
    ("/generate/stream", "get"): "sse",
    ("/generate/stream", "post"): "sse",
}
PLAIN_TEXT = {("/metrics", "get"), ("/metrics", "head")}


def public_operations(app: Litestar) -> set[tuple[str, str]]:
    """(path, method) of every operation whose handler is marked public (`opt=PUBLIC`)."""
    public: set[tuple[str, str]] = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if all(handler.opt.get(key) == value for key, value in PUBLIC.items()):
                public.update((route.path_format, method.lower()) for method in handler.http_methods)
    return public


def document_responses(app: Litestar, schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of Litestar's `schema` with the error, stream and security documentation added."""
    schema = copy.deepcopy(schema)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(_envelope_schemas())
    components.setdefault("securitySchemes", {})[BEARER] = {"type": "http", "scheme": BEARER}
    public = public_operations(app)
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            key = (path, method)
            is_public = key in public
            operation["security"] = [] if is_public else [{BEARER: []}]
            responses = operation.setdefault("responses", {})
            _document_success(key, responses)
            errors = _errors_for(key, is_public, "requestBody" in operation)
            # Litestar's own error entries (its validation format) leave through our handlers too.
            for status in [s for s in responses if s[0] in "45" and s not in errors]:
                errors[status] = responses[status].get("description") or BAD_REQUEST
            if path in ANTHROPIC_PATHS:
                errors = _anthropic_errors(errors, responses)
            for status, description in sorted(errors.items()):
                schema_name = ANTHROPIC_ERROR_SCHEMA if path in ANTHROPIC_PATHS else ERROR_SCHEMA
                responses[status] = _error_response(status, description, schema_name)
    return schema


def _envelope_schemas() -> dict[str, Any]:
    """`ErrorResponse`, Anthropic's `AnthropicError` and what they refer to, as component schemas."""
    _, schemas = msgspec.json.schema_components(
        [ErrorResponse, AnthropicError], ref_template="#/components/schemas/{name}"
    )
    return schemas


def _anthropic_errors(errors: dict[str, str], responses: dict[str, Any]) -> dict[str, str]:
    """An Anthropic route's errors: 503 becomes 529 `overloaded_error`, 400s name the field in the message."""
    responses.pop("503", None)
    renamed = {"529" if status == "503" else status: description for status, description in errors.items()}
    if "400" in renamed:
        renamed["400"] = ANTHROPIC_BAD_REQUEST
    return renamed


def _errors_for(key: tuple[str, str], is_public: bool, has_body: bool) -> dict[str, str]:
    errors: dict[str, str] = {}
    if has_body:
        errors["400"] = BAD_REQUEST
        errors["413"] = TOO_LARGE
    if not is_public:
        errors["401"] = UNAUTHORIZED
        errors["503"] = UNAVAILABLE
    errors.update(EXTRA_ERRORS.get(key, {}))
    return errors


def _error_response(status: str, description: str, schema_name: str = ERROR_SCHEMA) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
    }
    if status in ("503", "529"):
        response["headers"] = {"Retry-After": RETRY_AFTER}
    elif status == "401":
        response["headers"] = {"WWW-Authenticate": WWW_AUTHENTICATE}
    return response


def _document_success(key: tuple[str, str], responses: dict[str, Any]) -> None:
    ok = responses.setdefault("200", {"description": "OK"})
    stream = STREAMS.get(key)
    event_stream = {"text/event-stream": {"schema": {"type": "string"}}}
    if stream == "sse":
        ok["content"] = event_stream
        ok["description"] = "Server-sent events."
    elif stream in ("json+sse", "json+events"):
        ok["content"] = {**ok.get("content", {"application/json": {}}), **event_stream}
        ok["description"] = f"JSON; {SSE_DESCRIPTION if stream == 'json+sse' else EVENTS_DESCRIPTION}"
    elif key in PLAIN_TEXT:
        ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        ok["description"] = "Prometheus text exposition format (version 0.0.4)."

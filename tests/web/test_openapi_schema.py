"""The OpenAPI schema documents what the server really answers: errors in OpenAI's envelope,
streams as `text/event-stream`, `/metrics` as Prometheus text, and which routes need the key."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import assert_error

ENVELOPE_REF = "#/components/schemas/ErrorResponse"
# Anthropic's Messages routes answer in Anthropic's envelope, and 529 where the others say 503.
ANTHROPIC_REF = "#/components/schemas/AnthropicError"
PUBLIC = {("/health", "get"), ("/ready", "get"), ("/metrics", "get")}


@pytest.fixture(scope="module")
def schema(web_server) -> dict:
    response = httpx.get(web_server.url + "/docs/openapi.json", timeout=30)
    assert response.status_code == 200
    return response.json()


def operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in {"get", "post", "put", "delete", "patch"}:
                yield path, method, operation


def error_statuses(operation: dict) -> set[str]:
    return {status for status in operation["responses"] if status[0] in "45"}


def test_the_error_envelope_is_a_component(schema):
    components = schema["components"]["schemas"]
    envelope = components["ErrorResponse"]
    assert envelope["required"] == ["error"]
    detail = components[envelope["properties"]["error"]["$ref"].rsplit("/", 1)[1]]
    assert set(detail["properties"]) == {"message", "type", "param", "code"}
    assert set(detail["required"]) == {"message", "type"}


def test_every_operation_documents_its_errors_with_the_envelope(schema):
    ops = list(operations(schema))
    assert len(ops) >= 14
    for path, method, operation in ops:
        errors = error_statuses(operation)
        anthropic = path.startswith("/v1/messages")
        if path != "/metrics":  # the one operation that always answers 200
            assert errors, f"{method.upper()} {path} documents no error response"
        for status in errors:
            content = operation["responses"][status]["content"]
            envelope = ANTHROPIC_REF if anthropic else ENVELOPE_REF
            assert content["application/json"]["schema"] == {"$ref": envelope}, (path, method, status)
        if (path, method) in PUBLIC:
            assert "401" not in errors and operation.get("security") == [], (path, method)
        else:
            assert {"401", "529" if anthropic else "503"} <= errors, (path, method, errors)
        if "requestBody" in operation:
            assert {"400", "413"} <= errors, (path, method, errors)


def test_specific_errors(schema):
    paths = schema["paths"]
    assert "404" in paths["/v1/models/{model_id}"]["get"]["responses"]
    assert "400" in paths["/generate/stream"]["get"]["responses"]
    for probe in ("/health", "/ready"):
        assert "503" in paths[probe]["get"]["responses"], probe
    overload = paths["/v1/chat/completions"]["post"]["responses"]["503"]
    assert "Retry-After" in overload["headers"]


def test_streams_are_event_streams(schema):
    paths = schema["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = paths[path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}, path
    for method in ("get", "post"):
        ok = paths["/generate/stream"][method]["responses"]["200"]["content"]
        assert set(ok) == {"text/event-stream"}, method


def test_metrics_are_plain_text(schema):
    ok = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(ok) == ["text/plain"]


def test_the_bearer_scheme_is_declared(schema):
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearer": []}]


def test_the_documented_envelope_is_what_errors_look_like(web_server, schema):
    """The schema's claim checked against the server: a 400 and a 404 carry the envelope."""
    bad = httpx.post(web_server.url + "/v1/chat/completions", json={"messages": "nope"}, timeout=30)
    assert_error(bad, 400, param="messages")
    missing = httpx.get(web_server.url + "/v1/models/nope", timeout=30)
    assert_error(missing, 404, param="model")

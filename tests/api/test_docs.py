"""The interactive API docs work offline: every asset the page loads comes from this server."""

from __future__ import annotations

import re
from urllib.parse import urljoin

URL_ATTRIBUTE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def test_docs_page_loads_only_local_assets(client):
    response = client.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    urls = URL_ATTRIBUTE.findall(html)
    assert len(urls) >= 3, urls
    assert not re.search(r"https?://", re.sub(r'"(description|url)":\s*"[^"]*"', "", html).split("<body")[0])
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"non-local asset {url}"
        asset = client.get(urljoin(str(response.url), url))
        assert asset.status_code == 200, url
        assert len(asset.content) > 100
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls)


def test_openapi_schema_documents_the_request_bodies(client):
    schema = client.get("/docs/openapi.json").json()
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/generate",
        "/tokenize",
        "/metrics",
    ):
        assert path in schema["paths"], path
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in body["required"]
    message = body["properties"]["messages"]["items"]
    assert set(message["properties"]["role"]["enum"]) == {"system", "developer", "user", "assistant", "tool"}
    assert "$ref" not in str(body)

"""`/docs` renders the OpenAPI 3.1 schema in a real browser, from local assets only."""

from __future__ import annotations

from tests.web.conftest import DESKTOP, PHONE


def test_docs_render_the_operations(web_server, new_page, tmp_path):
    page, console = new_page(DESKTOP)
    external: list[str] = []
    page.on("request", lambda r: r.url.startswith(web_server.url) or external.append(r.url))
    page.goto(web_server.url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    body = page.inner_text("body")
    page.screenshot(path=str(tmp_path / "docs-desktop.png"), full_page=False)
    assert "Unable to render" not in body
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/generate/stream", "/metrics"):
        assert any(p.replace("\u200b", "") == path for p in paths), (path, paths)
    assert not external, f"the docs page fetched from outside the server: {external}"
    assert not console.errors, console.errors


def test_docs_show_an_operations_error_responses(web_server, new_page, tmp_path):
    page, console = new_page(PHONE)
    page.goto(web_server.url + "/docs#/OpenAI/CompletionsCreateChatCompletion")
    page.wait_for_selector(".opblock-summary-path")
    page.locator(".opblock-summary-path", has_text="/v1/chat/completions").first.click()
    page.wait_for_selector(".responses-table")
    codes = page.locator(".responses-table .response-col_status").all_inner_texts()
    page.screenshot(path=str(tmp_path / "docs-phone.png"), full_page=False)
    assert {"200", "400", "401", "413", "503"} <= {c.strip() for c in codes}, codes
    assert not console.errors, console.errors

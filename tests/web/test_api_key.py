"""The playground against a server started with `--api-key`: the page loads without the key, a
request without it fails visibly, and once the key is typed chat works, also after a reload."""

from __future__ import annotations

import httpx

from tests.web.conftest import API_KEY, DESKTOP


def test_the_page_and_its_files_need_no_key(keyed_server):
    for path in ("/", "/playground", "/playground/app.js", "/playground/style.css", "/metrics"):
        response = httpx.get(keyed_server.url + path, timeout=10)
        assert response.status_code in (200, 307, 302), (path, response.status_code)
    assert httpx.get(keyed_server.url + "/v1/models", timeout=10).status_code == 401


def test_key_flow(keyed_server, new_page, tmp_path):
    page, console = new_page(DESKTOP)
    sent_keys: list[str | None] = []
    page.on(
        "request",
        lambda r: r.url.endswith("/v1/chat/completions") and sent_keys.append(r.headers.get("authorization")),
    )
    page.goto(keyed_server.url + "/playground")
    banner = page.locator("#banner")
    banner.wait_for(state="visible")
    assert "API key" in banner.inner_text()

    page.fill("#prompt", "Hi")
    page.click("#send")
    failed = page.locator(".msg.assistant.error")
    failed.wait_for()
    assert "401" in failed.inner_text() and "API key" in failed.inner_text()
    assert sent_keys == [None]
    page.screenshot(path=str(tmp_path / "key-missing.png"))

    page.fill("#api-key", API_KEY)
    page.click("#save-key")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    assert banner.is_hidden()
    page.fill("input[name=max_tokens]", "8")
    page.click("#regenerate")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]:not(.error)').length === 1")
    assert sent_keys[-1] == f"Bearer {API_KEY}"

    page.reload()
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    assert page.input_value("#api-key") == API_KEY
    page.fill("input[name=max_tokens]", "8")
    page.fill("#prompt", "Again")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]:not(.error)').length === 1")
    assert sent_keys[-1] == f"Bearer {API_KEY}"
    # The only console errors are the browser's notes on the 401s before the key was typed.
    assert all("401" in error for error in console.errors), console.errors

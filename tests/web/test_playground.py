"""The playground in a real browser: it loads cleanly, streams chat replies with their metrics, keeps
multi-turn history, regenerates, stops (and the server frees the request's blocks), shows the engine
panel, and never turns model text into markup."""

from __future__ import annotations

import json

import httpx
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.api.conftest import engine_idle, start_live_server, wait_until
from tests.web.conftest import DESKTOP, PHONE


def chat_requests(page) -> list[dict]:
    """Record the JSON body of every chat completion request the page sends."""
    bodies: list[dict] = []
    page.on(
        "request",
        lambda r: (
            r.url.endswith("/v1/chat/completions") and r.method == "POST" and bodies.append(r.post_data_json)
        ),
    )
    return bodies


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def last_reply(page):
    return page.locator(".msg.assistant").last


def wait_for_panel(page, metric: str, condition: str, arg: object = None) -> None:
    """Wait until the engine panel's `metric` satisfies the JS `condition` (on its text `t` and `arg`).

    The panel refreshes every 2 s; the wait allows 30 s, for a loaded CI machine. A timeout says
    what the panel showed and how many refreshes it had made.
    """
    script = f"arg => {{ const t = document.querySelector('[data-metric={metric}]').textContent; return {condition}; }}"
    try:
        page.wait_for_function(script, arg=arg, timeout=30_000)
    except PlaywrightTimeoutError:
        status = page.locator("#engine-updated")
        shown = page.locator(f'[data-metric="{metric}"]').inner_text()
        updates = status.get_attribute("data-updates")
        raise AssertionError(
            f"the panel's {metric} stayed {shown!r} (wanted {condition}, arg={arg!r}); "
            f"status {status.inner_text()!r} after {updates} refreshes"
        ) from None


def wait_done(page, count: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('.msg.assistant[data-done]').length >= n", arg=count, timeout=60_000
    )


def test_root_redirects_to_the_playground(web_server):
    response = httpx.get(web_server.url + "/", follow_redirects=False, timeout=10)
    assert response.status_code in (301, 302, 307, 308) and response.headers["location"] == "/playground"
    page = httpx.get(web_server.url + "/playground", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/playground/app.js">' in page.text


def test_page_loads_without_console_errors_and_only_local_files(web_server, new_page, tmp_path):
    page, console = new_page(DESKTOP)
    external: list[str] = []
    page.on(
        "request",
        lambda r: r.url.startswith(web_server.url) or r.url.startswith("data:") or external.append(r.url),
    )
    page.goto(web_server.url + "/")
    assert page.url == web_server.url + "/playground"
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    wait_for_panel(page, "kv", "t.includes('/ 256')")
    page.screenshot(path=str(tmp_path / "playground-empty.png"))
    assert not external, external
    assert not console.errors, console.errors


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_chat_streams_replies_with_history_and_regenerate(web_server, new_page, tmp_path, viewport):
    page, console = new_page(viewport)
    bodies = chat_requests(page)
    page.goto(web_server.url + "/playground")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.fill("textarea[name=system]", "Be brief.")
    page.fill("input[name=max_tokens]", "24")
    page.fill("input[name=seed]", "7")
    send(page, "Hello there")
    wait_done(page, 1)
    first = last_reply(page)
    assert first.locator(".body").inner_text().strip(), "no reply text"
    stats = {
        key: first.locator(f'[data-stat="{key}"]').inner_text() for key in ("ttft", "tps", "tokens", "state")
    }
    assert stats["ttft"].endswith("s to first token") and float(stats["ttft"].split()[0]) > 0, stats
    assert stats["tps"].endswith("tok/s"), stats
    assert stats["tokens"] == "24 tokens" and stats["state"] == "stopped at max tokens", stats
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"]["include_usage"] is True
    assert bodies[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    assert (
        bodies[0]["max_completion_tokens"] == 24 and bodies[0]["seed"] == 7 and bodies[0]["model"] == "tiny"
    )

    first_text = first.locator(".body").inner_text()
    send(page, "And again")
    wait_done(page, 2)
    history = bodies[1]["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[2]["content"].strip() and history[3]["content"] == "And again"

    page.click("#regenerate")
    page.wait_for_function("document.getElementById('regenerate').disabled === false", timeout=60_000)
    wait_done(page, 2)
    assert bodies[2]["messages"] == bodies[1]["messages"], "regenerate resends the same conversation"
    assert page.locator(".msg.assistant").count() == 2, "regenerate replaces the last reply"
    assert page.locator(".msg.assistant").first.locator(".body").inner_text() == first_text
    page.screenshot(path=str(tmp_path / f"playground-{viewport['width']}.png"), full_page=True)
    assert not console.errors, console.errors


def test_model_markup_is_shown_as_text(web_server, new_page):
    """A reply full of HTML (served by a stub stream) is displayed, never executed or parsed."""
    page, console = new_page(DESKTOP)
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>**bold** `<b>code</b>`\n```html\n<i>x</i>\n```'
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in (hostile[:20], hostile[20:])
    ]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=sse),
    )
    page.goto(web_server.url + "/playground")
    send(page, "say something dangerous")
    wait_done(page, 1)
    body = last_reply(page).locator(".body")
    assert body.locator("img, script, i, b").count() == 0
    assert page.evaluate("window.pwned") is None
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("p code").inner_text() == "<b>code</b>"
    assert body.locator("pre code").inner_text() == "<i>x</i>"
    assert '<img src=x onerror="window.pwned=1">' in body.inner_text()
    assert not console.errors, console.errors


LONG_REPLY = 16_000  # tokens: long enough to still be running when the test clicks stop


@pytest.fixture(scope="module")
def long_server(make_model_dir):
    """A 16k-context tiny model with a KV pool that holds one full-length request."""
    live = start_live_server(make_model_dir("llama", max_position_embeddings=16_384), num_kv_blocks=1040)
    yield live
    live.stop()


def test_stop_aborts_the_request_and_the_engine_frees_its_blocks(long_server, new_page, tmp_path):
    page, console = new_page(DESKTOP)
    page.goto(long_server.url + "/playground")
    page.fill("input[name=max_tokens]", str(LONG_REPLY))
    page.fill("textarea[name=extra]", '{"ignore_eos": true}')
    send(page, "Tell me a long story")
    wait_until(
        lambda: long_server.engine.stats().num_requests_running == 1, timeout=30, what="request running"
    )
    # The engine panel shows the running request and the blocks it holds.
    wait_for_panel(page, "running", "t === '1'")
    kv = page.locator('[data-metric="kv"]').inner_text()
    assert not kv.startswith("0 /"), kv
    page.wait_for_function(
        "() => parseInt(document.querySelector('.msg.assistant [data-stat=tokens]').textContent) > 5"
    )
    page.click("#stop")
    wait_until(lambda: engine_idle(long_server), timeout=10, what="engine idle after stop")
    reply = last_reply(page)
    page.wait_for_function(
        "document.querySelector('.msg.assistant [data-stat=state]').textContent === 'stopped'"
    )
    tokens = int(reply.locator('[data-stat="tokens"]').inner_text().split()[0])
    assert 5 < tokens < LONG_REPLY, tokens
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    wait_for_panel(page, "running", "t === '0'")
    wait_for_panel(page, "kv", "t.startsWith('0 /')")
    page.screenshot(path=str(tmp_path / "playground-stopped.png"))
    assert not console.errors, console.errors


def test_the_engine_panel_refreshes(web_server, new_page):
    page, _ = new_page(PHONE)
    page.goto(web_server.url + "/playground")
    status = page.locator("#engine-updated")
    page.wait_for_function("Number(document.getElementById('engine-updated').dataset.updates) >= 1")
    before = int(status.get_attribute("data-updates"))
    generated = int(page.locator('[data-metric="generated"]').inner_text())
    httpx.post(web_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=30)
    wait_for_panel(page, "generated", "Number(t) >= arg", arg=generated + 5)
    assert int(status.get_attribute("data-updates")) > before


@pytest.fixture(scope="module")
def speculative_server(tiny_model_dir):
    live = start_live_server(
        tiny_model_dir, speculative_method="layer-skip", num_speculative_tokens=3, draft_layers=1
    )
    yield live
    live.stop()


def test_a_reply_shows_its_draft_acceptance(speculative_server, new_page):
    """With speculation on, the reply's acceptance is the server's accepted / drafted tokens over it."""
    live = speculative_server
    page, console = new_page(DESKTOP)
    page.goto(live.url + "/playground")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    before = live.engine.stats()
    page.fill("input[name=max_tokens]", "40")
    page.fill("input[name=temperature]", "0")
    send(page, "Count to ten")
    wait_done(page, 1)
    acceptance = last_reply(page).locator('[data-stat="acceptance"]')
    page.wait_for_function(
        "document.querySelector('.msg.assistant [data-stat=acceptance]').textContent !== ''"
    )
    after = live.engine.stats()
    drafted = after.spec_num_draft_tokens_total - before.spec_num_draft_tokens_total
    accepted = after.spec_num_accepted_tokens_total - before.spec_num_accepted_tokens_total
    assert drafted > 0
    assert acceptance.inner_text() == f"{100 * accepted / drafted:.1f}% of {drafted} drafts"
    assert page.locator('[data-metric="acceptance"]').inner_text().endswith("%")
    assert not console.errors, console.errors


def test_structured_output_and_tool_calls_from_the_settings(web_server, new_page, tmp_path):
    """JSON-object output is valid JSON (the grammar guarantees it even on a random model); with
    tools and `required`, the reply shows the streamed tool call as text."""
    page, console = new_page(DESKTOP)
    bodies = chat_requests(page)
    page.goto(web_server.url + "/playground")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.fill("input[name=max_tokens]", "64")
    page.fill("input[name=seed]", "3")
    page.select_option("select[name=format]", "json_object")
    send(page, "Give me JSON")
    wait_done(page, 1)
    assert bodies[-1]["response_format"] == {"type": "json_object"}
    reply = last_reply(page)
    state = reply.locator("[data-stat=state]").inner_text()
    if state == "done":  # a finished reply parses; a cut one ("stopped at max tokens") need not
        json.loads(reply.locator(".body").inner_text())

    page.select_option("select[name=format]", "text")
    page.click("#clear")  # the tiny model's context is 256 tokens: room for the tools only
    # A small tool: the template's tool listing and the call's markup take most of those tokens.
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["a"],
                "additionalProperties": False,
            },
        },
    }
    page.fill("textarea[name=tools]", json.dumps([tool]))
    page.select_option("select[name=tool_choice]", "required")
    page.fill("textarea[name=extra]", '{"parallel_tool_calls": false}')
    send(page, "Call f")
    wait_done(page, 1)
    assert bodies[-1]["tools"] == [tool] and bodies[-1]["tool_choice"] == "required"
    reply = last_reply(page)
    assert reply.locator("[data-stat=state]").inner_text() == "tool calls"
    text = reply.locator("pre.tool-call").first.inner_text()
    assert text.startswith("f(") and 0 <= json.loads(text[len("f(") : -1])["a"] <= 9
    page.screenshot(path=str(tmp_path / "playground-tools.png"))
    assert not console.errors, console.errors

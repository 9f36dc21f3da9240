"""The consultation page at `/`, driven in Debian's Chromium by Playwright against the real server."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import hold_loading, tongue_photo


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (scripts/install.sh)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    contexts = []

    def open_at(url: str, viewport=(1280, 800), language: str = "en"):
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        context.add_init_script(f"localStorage.setItem('shizhen.lang', '{language}')")
        contexts.append(context)
        page = context.new_page()
        page.goto(url)
        return page

    yield open_at
    for context in contexts:
        context.close()


def _server_without_stop_tokens(start_server, monkeypatch):
    """Random weights may end an answer at once; these tests need answers that run on. Patched before the server
    starts, so its engine process (forked from this one) has it too."""
    monkeypatch.setattr("shizhen.engine.loader._stop_token_ids", lambda generation_config, processor: frozenset())
    return start_server()


def _wait_ready(page):
    page.wait_for_function("document.getElementById('status').textContent === 'Ready'", timeout=15000)


def _ask(page, question: str, max_tokens: int = 300):
    page.click("#toggle-settings")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#question", question)
    page.click("#send")


def test_question_streams_an_answer_that_grows(start_server, monkeypatch, open_page):
    server = _server_without_stop_tokens(start_server, monkeypatch)
    page = open_page(server.url)
    _wait_ready(page)
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => { const m = document.querySelector('.msg.assistant .body');
                                     if (m) window.lengths.push(m.textContent.length); })
          .observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true}); }""")
    _ask(page, "舌红苔黄腻是什么意思？", max_tokens=1500)
    page.wait_for_selector(".msg.assistant .meta:has-text('elapsed')", timeout=30000)
    lengths = page.evaluate("window.lengths")
    assert len(set(lengths)) >= 10, "the answer should appear piece by piece"
    assert len(page.inner_text(".msg.assistant .body")) > 100
    meta = page.inner_text(".msg.assistant .meta")
    assert "first token" in meta
    assert page.inner_text(".msg.user") == "舌红苔黄腻是什么意思？"


def test_markdown_is_rendered_without_html_injection(server, open_page):
    page = open_page(server.url)
    html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> **舌红**\\n- 苔黄\\n- *腻*')")
    assert "<img" not in html and "&lt;img" in html
    assert "<strong>舌红</strong>" in html and "<ul><li>苔黄</li><li><em>腻</em></li></ul>" in html


def test_photo_only_sends_an_image_with_the_default_question(start_server, open_page, received_turns, tmp_path):
    server = start_server()
    photo = tmp_path / "tongue.jpg"
    tongue_photo(2400, 1800).save(photo, format="JPEG")
    page = open_page(server.url)
    _wait_ready(page)
    page.set_input_files("#photo", str(photo))
    page.wait_for_selector("#preview.shown")
    page.click("#remove-photo")
    assert not page.is_visible("#preview-image")
    page.set_input_files("#photo", str(photo))
    page.wait_for_selector("#preview.shown")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .meta:has-text('elapsed')", timeout=30000)
    assert "请从中医角度解读这张舌苔。" in page.inner_text(".msg.user")
    [turn] = received_turns[-1]
    image, question = turn.parts
    assert question == "请从中医角度解读这张舌苔。"
    assert max(image.size) <= 1536 * 1.1 or image.width * image.height <= server.settings.image_max_pixels


def test_stop_ends_generation_on_the_server(start_server, monkeypatch, open_page):
    server = _server_without_stop_tokens(start_server, monkeypatch)
    page = open_page(server.url)
    _wait_ready(page)
    _ask(page, "请详细说明", max_tokens=3900)
    page.wait_for_function("(document.querySelector('.msg.assistant .body')?.textContent.length || 0) > 20")
    assert server.engine.stats.running == 1
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .meta:has-text('stopped')", timeout=5000)
    deadline = time.monotonic() + 2.0  # the server notices the closed connection within a few steps
    while server.engine.stats.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.stats.running == 0
    assert server.engine.stats.tokens_generated < 3000


def test_api_key_is_asked_for_until_entered(start_server, open_page):
    server = start_server(api_keys="clinic-key")
    page = open_page(server.url)
    _wait_ready(page)
    _ask(page, "你好", max_tokens=5)
    page.wait_for_selector(".msg.assistant.error")
    assert "API key is required" in page.inner_text(".msg.assistant.error")
    page.fill("#api-key", "clinic-key")
    page.dispatch_event("#api-key", "change")
    page.fill("#question", "你好")
    page.click("#send")
    page.wait_for_selector(".msg.assistant:not(.error) .meta:has-text('elapsed')", timeout=30000)
    assert page.evaluate("localStorage.getItem('shizhen.apiKey')") == "clinic-key"


def test_page_shows_loading_until_the_model_is_ready(start_server, open_page, tiny_checkpoint, tmp_path):
    folder, release = hold_loading(tiny_checkpoint, tmp_path / "held")
    try:
        server = start_server(wait=False, model=str(folder))
        page = open_page(server.url)
        page.wait_for_function("document.getElementById('status').textContent.startsWith('Model loading')")
        assert page.is_disabled("#send")
        release.set()
        _wait_ready(page)
        assert page.is_enabled("#send")
    finally:
        release.set()


def test_page_says_it_is_waking_the_model_while_a_serverless_worker_starts(server, open_page):
    """RunPod's load balancer answers 503 "no workers available" until a worker serves (a cold start)."""
    context_page = open_page("about:blank")
    context_page.route("**/health", lambda route: route.fulfill(
        status=503, content_type="application/json", body='{"error": "no workers available"}'))
    context_page.goto(server.url)
    context_page.wait_for_function(
        "/^Waking the model… \\([1-9]\\d* s\\)$/.test(document.getElementById('status').textContent)",
        timeout=15000)
    assert context_page.is_disabled("#send")
    context_page.unroute("**/health")  # a worker serves now
    _wait_ready(context_page)
    assert context_page.is_enabled("#send")


def test_screenshots_of_a_finished_consultation(start_server, monkeypatch, open_page, tmp_path):
    server = _server_without_stop_tokens(start_server, monkeypatch)
    photo = tmp_path / "tongue.png"
    tongue_photo(800, 600).save(photo)
    ARTIFACTS.mkdir(exist_ok=True)
    for name, viewport, language in (("phone", (390, 844), "zh"), ("desktop", (1280, 800), "en")):
        page = open_page(server.url, viewport=viewport, language=language)
        page.wait_for_function("document.getElementById('status').className === 'ok'", timeout=15000)
        page.set_input_files("#photo", str(photo))
        page.wait_for_selector("#preview.shown")
        _ask(page, "舌淡红，苔薄白，齿痕明显，请分析。", max_tokens=60)
        page.click("#toggle-settings")
        page.wait_for_selector(".msg.assistant .meta:not(:empty)", timeout=30000)
        path = ARTIFACTS / f"consultation-{name}.png"
        page.screenshot(path=str(path), full_page=False)
        assert path.stat().st_size > 10_000
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), "no sideways scroll"

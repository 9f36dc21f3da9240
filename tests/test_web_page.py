"""The consultation page at `/`, driven in Debian's Chromium by Playwright against the real server, on a desktop and
on a phone viewport with touch: what a receptionist or a patient sees, including a dropped connection, a wrong key,
a slow download and a failed load. Screenshots land in `test-artifacts/`."""

from __future__ import annotations

import base64
import io
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import tongue_photo
from hub_standin import StandInHub
from local_http import TcpProxy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
PHONE = {"viewport": {"width": 390, "height": 844}, "has_touch": True, "is_mobile": True, "device_scale_factor": 2}
SMALL_PHONE = PHONE | {"viewport": {"width": 360, "height": 740}}
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
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
    """open_page(url, device=DESKTOP, language="en", **context options) → a page; `page.requested` lists the URLs
    it asked for. The page's Content-Security-Policy is bypassed unless `bypass_csp=False`: Playwright's polling
    evaluates strings, which the policy forbids (one test checks the policy in the browser)."""
    contexts = []

    def open_at(url: str, device: dict = DESKTOP, language: str = "en", **options):
        context = browser.new_context(**device, **{"bypass_csp": True} | options)
        context.add_init_script(f"localStorage.setItem('shizhen.lang', '{language}')")
        contexts.append(context)
        page = context.new_page()
        page.requested = []
        page.on("request", lambda request: page.requested.append(request.url))
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(url)
        return page

    yield open_at
    for context in contexts:
        context.close()


@pytest.fixture
def long_answers(monkeypatch):
    """Random weights may end an answer at once; these tests need answers that run on. Patched before the server
    starts, so its engine process (forked from this one) has it too."""
    monkeypatch.setattr("shizhen.engine.loader._stop_token_ids", lambda generation_config, processor: frozenset())


def _wait_ready(page, timeout: float = 15000):
    page.wait_for_function("document.getElementById('status').className === 'ok'", timeout=timeout)


def _ask(page, question: str, max_tokens: int = 300):
    page.evaluate(f"document.getElementById('max-tokens').value = {max_tokens}")
    page.fill("#question", question)
    page.click("#send")


def _answered(page, count: int = 1, timeout: float = 30000):
    page.wait_for_function(f"""() => {{ const answers = document.querySelectorAll('.msg.assistant');
        return answers.length === {count} && answers[{count} - 1].querySelector('.meta').textContent !== ''; }}""",
                           timeout=timeout)


def _ask_with_a_photo(page, tmp_path, question: str, max_tokens: int) -> None:
    """Once the server is ready: a 400×300 tongue photo from the gallery, the question, and its whole answer."""
    _wait_ready(page)
    page.set_input_files("#photo", str(_photo(tmp_path, size=(400, 300))))
    page.wait_for_selector("#preview-image:visible")
    _ask(page, question, max_tokens=max_tokens)
    _answered(page)


def _answer_text(page) -> str:
    return page.inner_text(".msg.assistant:last-of-type .body")


def _photo(tmp_path, name="tongue.jpg", size=(2400, 1800)) -> Path:
    path = tmp_path / name
    tongue_photo(*size).save(path)
    return path


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 5_000


def _contrast(first: str, second: str) -> float:
    """WCAG contrast ratio of two CSS rgb() colours."""
    def luminance(css: str) -> float:
        channels = [int(float(v)) / 255 for v in css[css.index("(") + 1:css.index(")")].split(",")[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    high, low = sorted((luminance(first), luminance(second)), reverse=True)
    return (high + 0.05) / (low + 0.05)


# --- answering -------------------------------------------------------------------------------------------------------
def test_an_answer_streams_piece_by_piece_and_is_announced_once(start_server, long_answers, open_page):
    server = start_server()
    page = open_page(server.url)
    _wait_ready(page)
    page.evaluate("""() => { window.lengths = []; window.announced = []; window.busy = false;
        new MutationObserver(() => { const m = document.querySelector('.msg.assistant');
                                     if (!m) return;
                                     window.busy ||= m.getAttribute('aria-busy') === 'true';
                                     window.lengths.push(m.querySelector('.body').textContent.length); })
          .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        new MutationObserver(() => window.announced.push(document.getElementById('announcer').textContent))
          .observe(document.getElementById('announcer'), {subtree: true, childList: true, characterData: true}); }""")
    _ask(page, "舌红苔黄腻是什么意思？\n口苦\n便秘", max_tokens=400)
    _answered(page)
    assert len(set(page.evaluate("window.lengths"))) >= 10, "the answer should appear piece by piece"
    answer = _answer_text(page)
    assert len(answer) > 100
    meta = page.inner_text(".msg.assistant .meta")
    assert "elapsed" in meta and "first token" in meta and "reached max tokens" in meta
    assert page.inner_text(".msg.user .body") == "舌红苔黄腻是什么意思？\n口苦\n便秘"
    assert page.evaluate("window.busy"), "the answer is marked busy while it streams"
    announced = [text for text in page.evaluate("window.announced") if text]
    assert len(announced) == 1 and announced[0].startswith("Answer finished: ")
    assert page.get_attribute("#conversation", "aria-live") is None, "the streaming text is not re-announced"
    assert page.is_visible("#demo-banner") and "random weights" in page.inner_text("#demo-banner")
    assert page.inner_text("#model-name") == server.settings.model_name
    assert not page.errors


def test_answers_render_markdown_without_html_or_other_servers(server, open_page):
    page = open_page(server.url)
    html = page.evaluate("""renderMarkdown('### 辨证\\n\\n| 舌象 | 主病 |\\n|---|---|\\n| 苔黄腻 | 湿热 |\\n\\n'
        + '> 仅供参考\\n\\n`code` **舌红**\\n- 苔黄\\n- *腻*\\n\\n<img src=x onerror=alert(1)> <script>alert(1)</script>'
        + '\\n\\n![x](http://elsewhere.example/t.png) [a](javascript:alert(1)) [doc](https://example.org/)')""")
    assert "<h3>辨证</h3>" in html and "<table>" in html and "<td>苔黄腻</td>" in html
    assert "<blockquote>" in html and "<code>code</code>" in html and "<strong>舌红</strong>" in html
    assert "<ul>\n<li>苔黄</li>\n<li><em>腻</em></li>\n</ul>" in html
    assert "<img" not in html and "<script" not in html and "&lt;img" in html
    assert 'href="javascript:' not in html, "unsafe links are not made links"
    assert 'href="https://example.org/"' in html and 'rel="noopener noreferrer"' in html


def test_stop_ends_generation_on_the_server(start_server, long_answers, open_page):
    server = start_server()
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
    assert page.is_visible("#send") and page.is_enabled("#send")


def test_a_dropped_connection_keeps_the_partial_answer_and_retry_answers_again(
        start_server, long_answers, open_page, received_turns):
    server = start_server()
    proxy = TcpProxy(server.settings.port)
    port = int(proxy.url.rsplit(":", 1)[1])
    page = open_page(proxy.url)
    _wait_ready(page)
    _ask(page, "请详细说明舌诊", max_tokens=3900)
    page.wait_for_function("(document.querySelector('.msg.assistant .body')?.textContent.length || 0) > 30")
    proxy.cut()  # to the browser, the server has died mid-answer
    cut = time.monotonic()
    page.wait_for_function("document.getElementById('status').textContent === 'Unreachable'", timeout=2500)
    assert time.monotonic() - cut < 2.0, "the status follows the server within 2 s"
    page.wait_for_selector(".msg.assistant .error-line")
    assert "The connection dropped" in page.inner_text(".msg.assistant .error-line")
    assert len(_answer_text(page)) > 30, "the partial answer stays"
    assert page.inner_text(".msg.user .body") == "请详细说明舌诊"
    assert page.is_disabled("#send") and page.is_visible("#banner") and "cannot be reached" in page.inner_text("#banner")

    proxy = TcpProxy(server.settings.port, port=port)  # the server is back
    try:
        _wait_ready(page, timeout=5000)
        asked = len(received_turns)
        page.evaluate("document.getElementById('max-tokens').value = 40")
        page.click(".msg.assistant .error-line button:has-text('Retry')")
        _answered(page)
        assert not page.query_selector(".error-line") and page.locator(".msg.assistant").count() == 1
        [question] = [turn for turn in received_turns[asked] if turn.role == "user"]
        assert question.parts == ("请详细说明舌诊",), "the question is asked once, not dropped and not repeated"
    finally:
        proxy.close()


def test_a_required_key_is_asked_for_before_the_first_send_and_a_wrong_one_is_told_apart(start_server, open_page):
    server = start_server(api_keys="clinic-key")
    page = open_page(server.url, language="zh")
    page.wait_for_function("document.getElementById('status').textContent === '需要 API 密钥'")
    assert page.is_visible("#api-key") and "需要 API 密钥" in page.inner_text("#key-note")
    assert page.is_disabled("#send")
    page.fill("#api-key", "wrong-key")
    page.press("#api-key", "Enter")
    page.wait_for_function("document.getElementById('status').textContent === 'API 密钥不正确'")
    assert "API 密钥不正确" in page.inner_text("#key-note") and page.is_disabled("#send")
    page.fill("#api-key", "clinic-key")
    page.press("#api-key", "Enter")
    _wait_ready(page)
    assert page.inner_text("#key-note") == ""
    _ask(page, "你好", max_tokens=5)
    _answered(page)
    assert not page.query_selector(".error-line")
    assert page.evaluate("localStorage.getItem('shizhen.apiKey')") == "clinic-key"


# --- photos ---------------------------------------------------------------------------------------------------------
def test_a_photo_from_the_gallery_is_downscaled_and_sent_with_the_default_question(
        server, open_page, received_turns, tmp_path):
    page = open_page(server.url)
    _wait_ready(page)
    assert not page.is_visible("#take-photo"), "a desktop has no camera button"
    page.set_input_files("#photo", str(_photo(tmp_path)))
    page.wait_for_selector("#preview-image:visible")
    page.click("#remove-photo")
    assert not page.is_visible("#preview")
    page.set_input_files("#photo", str(_photo(tmp_path)))
    page.wait_for_selector("#preview-image:visible")
    page.click("#send")
    _answered(page)
    assert "请从中医角度解读这张舌苔。" in page.inner_text(".msg.user")
    assert page.is_visible(".msg.user img")
    [turn] = received_turns[-1]
    image, question = turn.parts
    assert question == "请从中医角度解读这张舌苔。"
    assert max(image.size) <= 1536 * 1.1 or image.width * image.height <= server.settings.image_max_pixels


def test_a_phone_offers_both_the_gallery_and_the_camera(server, open_page, tmp_path):
    page = open_page(server.url, PHONE)
    _wait_ready(page)
    assert page.is_visible("#choose-photo") and page.is_visible("#take-photo")
    assert page.get_attribute("#photo", "capture") is None, "the gallery button can pick a photo already taken"
    assert page.get_attribute("#camera", "capture") == "environment"
    with page.expect_file_chooser() as chooser:
        page.tap("#choose-photo")
    chooser.value.set_files(str(_photo(tmp_path)))
    page.wait_for_selector("#preview-image:visible")


def test_heic_goes_to_the_server_undecoded_and_other_files_get_a_clear_message(
        server, open_page, received_images, tmp_path):
    page = open_page(server.url)
    _wait_ready(page)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a photo")
    page.set_input_files("#photo", str(text_file))
    page.wait_for_function("document.getElementById('composer-note').textContent.includes('is not an image')")
    assert not page.is_visible("#preview")

    heic = tmp_path / "IMG_0001.HEIC"
    tongue_photo(320, 240).save(heic, format="HEIF")
    page.set_input_files("#photo", {"name": heic.name, "mimeType": "image/heic", "buffer": heic.read_bytes()})
    page.wait_for_selector("#preview:visible")
    assert "HEIC" in page.inner_text("#preview-label") and page.inner_text("#composer-note") == ""
    page.click("#send")
    _answered(page)
    assert not page.query_selector(".error-line")
    assert received_images[-1].size[0] > 0  # the server decoded the HEIC the browser could not


def test_paste_and_drag_and_drop_add_a_photo(server, open_page):
    page = open_page(server.url)
    _wait_ready(page)
    buffer = io.BytesIO()
    tongue_photo(400, 300).save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    make_transfer = f"""() => {{ const bytes = Uint8Array.from(atob('{png}'), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'tongue.png', {{type: 'image/png'}})); return transfer; }}"""
    transfer = page.evaluate_handle(make_transfer)
    page.focus("#question")
    page.evaluate("(transfer) => document.getElementById('question').dispatchEvent("
                  "new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true}))", transfer)
    page.wait_for_selector("#preview-image:visible")
    page.click("#remove-photo")
    transfer = page.evaluate_handle(make_transfer)
    page.dispatch_event("#conversation", "dragover", {"dataTransfer": transfer})
    assert page.is_visible("#drop-hint")
    page.dispatch_event("#conversation", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#preview-image:visible")
    assert not page.is_visible("#drop-hint")


# --- the server's state ----------------------------------------------------------------------------------------------
def test_a_slow_download_shows_progress_eta_and_elapsed_in_the_page_language(
        start_server, open_page, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 16 * 1024)  # progress in small steps
    hub = StandInHub("shizhen-tests/tiny-vl", tiny_checkpoint)
    hub.rate["model.safetensors"] = 200_000
    try:
        server = start_server(wait=False, model="shizhen-tests/tiny-vl", cache_dir=str(tmp_path / "models"),
                              hf_endpoint=hub.url, require_gpu=False)
        page = open_page(server.url, PHONE, language="zh")
        page.wait_for_function("""() => { const bar = document.getElementById('banner-progress');
            return !bar.hidden && bar.value > bar.max / 4 && !document.getElementById('banner-figures').textContent.includes('剩余约 –'); }""",
                               timeout=20000)
        assert page.inner_text("#status") == "加载中" and page.is_disabled("#send")
        assert "正在下载模型文件 model.safetensors" in page.inner_text("#banner-step")
        figures = page.inner_text("#banner-figures")
        assert "KiB / 9" in figures and "KiB/s" in figures and "剩余约" in figures and "已用" in figures
        _screenshot(page, "loading-download-phone")
        hub.rate.clear()
        _wait_ready(page, timeout=30000)
        assert not page.is_visible("#banner") and page.is_enabled("#send")
        assert page.inner_text("#model-name") == "shizhen-tests/tiny-vl"
    finally:
        hub.rate.clear()
        hub.close()


def test_a_failed_load_shows_its_reason_in_the_conversation(start_server, open_page, tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    server = start_server(wait=False, model=str(broken))
    page = open_page(server.url)
    page.wait_for_function("document.getElementById('status').textContent === 'Load failed'", timeout=30000)
    assert page.is_visible("#banner") and "could not be loaded" in page.inner_text("#banner-title")
    reason = page.inner_text("#banner-reason")
    assert reason and reason == httpx.get(f"{server.url}/health").json()["error"]
    assert page.is_disabled("#send")
    _screenshot(page, "load-failed-desktop")


def test_the_page_says_it_is_waking_the_model_while_a_serverless_worker_starts(server, open_page):
    """RunPod's load balancer answers 503 "no workers available" until a worker serves (a cold start)."""
    page = open_page("about:blank")
    page.route("**/health", lambda route: route.fulfill(
        status=503, content_type="application/json", body='{"error": "no workers available"}'))
    page.goto(server.url)
    page.wait_for_function("/^waited [1-9]\\d* s$/.test(document.getElementById('banner-figures').textContent)",
                           timeout=15000)
    assert page.inner_text("#status") == "Waking" and "Waking the model" in page.inner_text("#banner-title")
    assert page.is_disabled("#send")
    page.unroute("**/health")  # a worker serves now
    _wait_ready(page)
    assert page.is_enabled("#send") and not page.is_visible("#banner")


# --- keeping and handing over consultations --------------------------------------------------------------------------
def test_consultations_survive_a_reload_and_can_be_reopened_or_deleted(server, open_page, tmp_path):
    page = open_page(server.url)
    _ask_with_a_photo(page, tmp_path, "第一次问诊：舌淡苔白", max_tokens=8)
    first_answer = _answer_text(page)
    page.reload()
    _wait_ready(page)
    page.wait_for_selector(".msg.user img")
    assert page.inner_text(".msg.user .body") == "第一次问诊：舌淡苔白" and _answer_text(page) == first_answer

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    _ask(page, "第二次问诊", max_tokens=8)
    _answered(page)
    page.click("#toggle-history")
    assert page.get_attribute("#toggle-history", "aria-expanded") == "true"
    page.wait_for_function("document.querySelectorAll('#history-list li').length === 2")
    page.click("#history-list li:has-text('第一次问诊') .open")
    assert page.inner_text(".msg.user .body") == "第一次问诊：舌淡苔白"
    page.click("#history-list li:has-text('第二次问诊') .delete")
    page.wait_for_function("document.querySelectorAll('#history-list li').length === 1")
    page.reload()
    _wait_ready(page)
    page.wait_for_selector(".msg.user")
    assert page.inner_text(".msg.user .body") == "第一次问诊：舌淡苔白"


def test_a_new_chat_mid_answer_keeps_the_first_consultation_as_it_stopped(start_server, long_answers, open_page):
    server = start_server()
    page = open_page(server.url)
    _wait_ready(page)
    _ask(page, "第一次问诊", max_tokens=3000)
    page.wait_for_function("() => (document.querySelector('.msg.assistant .body')?.textContent.length || 0) > 20")
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.click("#toggle-history")
    page.wait_for_selector("#history-list li:has-text('第一次问诊')")
    page.click("#history-list li:has-text('第一次问诊') .open")
    page.wait_for_selector(".msg.assistant .meta:has-text('stopped')")
    assert not page.query_selector(".error-line"), "kept as stopped, not as interrupted"
    assert len(_answer_text(page)) > 20


def test_copy_regenerate_and_edit_messages(server, open_page, received_turns):
    page = open_page(server.url, permissions=["clipboard-read", "clipboard-write"])
    _wait_ready(page)
    _ask(page, "舌尖红", max_tokens=12)
    _answered(page)
    page.click(".msg.assistant button:has-text('Copy')")
    assert page.evaluate("navigator.clipboard.readText()") == page.evaluate("current.messages[1].text")
    asked = len(received_turns)
    page.click(".msg.assistant button:has-text('Regenerate')")
    _answered(page)
    assert len(received_turns) == asked + 1 and page.locator(".msg.assistant").count() == 1
    page.click(".msg.user button:has-text('Edit')")
    assert page.input_value("#question") == "舌尖红" and page.locator(".msg").count() == 0
    page.fill("#question", "舌尖红，心烦")
    page.click("#send")
    _answered(page)
    assert page.inner_text(".msg.user .body") == "舌尖红，心烦"


def test_a_consultation_prints_with_question_photo_answer_disclaimer_date_and_model(server, open_page, tmp_path):
    page = open_page(server.url)
    _ask_with_a_photo(page, tmp_path, "舌淡红，苔薄白", max_tokens=20)
    page.evaluate("window.dispatchEvent(new Event('beforeprint'))")
    page.emulate_media(media="print")
    assert not page.is_visible("header") and not page.is_visible("footer") and not page.is_visible(".actions")
    assert page.inner_text("#print-title") == "ShizhenGPT TCM consultation record"
    details = page.inner_text("#print-details")
    assert server.settings.model_name in details and time.strftime("%Y") in details
    assert page.is_visible(".msg.user img") and page.is_visible(".msg.assistant .body")
    assert "not medical advice" in page.inner_text(".print-disclaimer") and page.is_visible(".print-disclaimer")
    _screenshot(page, "consultation-print")
    ARTIFACTS.mkdir(exist_ok=True)
    page.pdf(path=str(ARTIFACTS / "consultation-print.pdf"))
    assert (ARTIFACTS / "consultation-print.pdf").stat().st_size > 10_000


# --- layout and accessibility ----------------------------------------------------------------------------------------
def test_phone_layout_composer_growth_and_touch_targets(server, open_page):
    page = open_page(server.url, SMALL_PHONE, language="zh")
    _wait_ready(page)
    before = page.eval_on_selector("#question", "el => el.offsetHeight")
    page.fill("#question", "口干\n口苦\n失眠\n便秘\n舌红苔黄")
    after = page.eval_on_selector("#question", "el => el.offsetHeight")
    assert after > before * 2, "the composer grows with a five-line symptom list"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scroll"
    assert page.eval_on_selector("h1 [data-text='titleTail']", "el => el.getClientRects().length") == 1, \
        "the title does not break inside 中医问诊"
    send, box = page.locator("#send").bounding_box(), page.locator("#question").bounding_box()
    assert send["x"] >= box["x"] + box["width"] and send["y"] > 740 * 0.75, "Send sits at the right, under the thumb"
    page.click("#toggle-menu")
    assert page.get_attribute("#toggle-menu", "aria-expanded") == "true" and page.is_visible("#toggle-history")
    small = page.evaluate("""() => [...document.querySelectorAll('button, select, textarea, input')]
        .filter((el) => el.offsetParent !== null)
        .map((el) => [el.id || el.textContent, el.getBoundingClientRect()])
        .filter(([, r]) => r.width < 44 || r.height < 44).map(([name]) => name)""")
    assert small == [], f"touch targets under 44 px: {small}"
    _screenshot(page, "phone-360-menu")


def test_keyboard_only_use_with_a_visible_focus_ring(server, open_page):
    page = open_page(server.url)
    _wait_ready(page)
    for _ in range(20):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "question":
            break
    assert page.evaluate("document.activeElement.id") == "question"
    assert page.evaluate("document.activeElement.labels[0].textContent") == "Your question"
    page.keyboard.type("舌淡胖")
    page.keyboard.press("Enter")
    _answered(page)
    page.focus("#question")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    outline = page.evaluate("""() => { const s = getComputedStyle(document.activeElement);
        return [s.outlineStyle, parseFloat(s.outlineWidth), s.outlineColor,
                getComputedStyle(document.querySelector('footer')).backgroundColor]; }""")
    style, width, color, background = outline
    assert style == "solid" and width >= 2 and _contrast(color, background) >= 3, outline
    field = page.evaluate("""() => [getComputedStyle(document.getElementById('question')).borderTopColor,
                                    getComputedStyle(document.querySelector('footer')).backgroundColor]""")
    assert _contrast(*field) >= 3, f"the input border needs 3:1 against its background: {field}"


@pytest.mark.parametrize("device", ["desktop", "phone"])
def test_no_serious_accessibility_violations(start_server, open_page, device):
    server = start_server(api_keys="clinic-key")
    page = open_page(server.url, PHONE if device == "phone" else DESKTOP)
    page.wait_for_function("document.getElementById('status').className === 'key'")
    page.fill("#api-key", "clinic-key")
    page.press("#api-key", "Enter")
    _wait_ready(page)
    _ask(page, "舌红少苔，请分析", max_tokens=20)
    _answered(page)
    if device == "phone":
        page.click("#toggle-menu")
    page.click("#toggle-history")
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("""async () => (await axe.run(document, {runOnly: ['wcag2a', 'wcag2aa', 'wcag21a',
        'wcag21aa', 'wcag22aa', 'best-practice']})).violations
        .map((v) => ({id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 3)}))""")
    serious = [violation for violation in result if violation["impact"] in ("serious", "critical")]
    assert serious == [], serious


# --- what the page asks of the network -------------------------------------------------------------------------------
def test_the_page_requests_only_its_own_server_and_serves_its_assets(server, open_page):
    with server.client() as http:
        page_response = http.get("/")
        assert "default-src 'self'" in page_response.headers["content-security-policy"]
        favicon = http.get("/favicon.ico")
        assert favicon.status_code == 200 and favicon.headers["content-type"] == "image/x-icon"
        assert favicon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
        for asset in ("/static/page.js", "/static/page.css", "/static/vendor/markdown-it.min.js",
                      "/static/vendor/purify.min.js"):
            assert http.get(asset).status_code == 200, asset
    page = open_page(server.url, bypass_csp=False)
    page.wait_for_function("() => document.getElementById('status').className === 'ok'")
    _ask(page, "你好", max_tokens=5)
    page.wait_for_function("() => document.querySelector('.msg.assistant .meta')?.textContent !== ''")
    assert page.requested and all(url.startswith(server.url) or url.startswith("data:") for url in page.requested)
    assert not page.errors
    blocked = page.evaluate("""() => new Promise((resolve) => {
        document.addEventListener('securitypolicyviolation', (e) => resolve(e.violatedDirective));
        const img = document.createElement('img'); img.src = 'http://elsewhere.example/pixel.png'; document.body.append(img);
        setTimeout(() => resolve(null), 2000); })""")
    assert blocked == "img-src", "the browser itself refuses requests to other servers"


def test_screenshots_of_a_finished_consultation(start_server, long_answers, open_page, tmp_path):
    server = start_server()
    for name, device, language in (("phone", PHONE, "zh"), ("desktop", DESKTOP, "en")):
        page = open_page(server.url, device, language=language)
        _ask_with_a_photo(page, tmp_path, "舌淡红，苔薄白，齿痕明显，请分析。", max_tokens=60)
        _screenshot(page, f"consultation-{name}")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), "no sideways scroll"

"""The demo page in a real browser: Debian's headless Chromium driven by Playwright.

Skips when /usr/bin/chromium is absent, unless VRWKV_REQUIRE_BROWSER=1 (CI sets it).
Writes the page's screenshot to docs/serve.png when VRWKV_SCREENSHOT=1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip

if not CHROMIUM.exists():
    if os.environ.get("VRWKV_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"VRWKV_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

from serve_helpers import API_KEY, live  # noqa: E402,F401 (live: the server fixture)


@pytest.mark.slow
def test_demo_page_uploads_asks_and_streams(live, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(image)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 720})
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('model:')")
            assert page.locator("#keyrow").is_visible()  # the server has a key: the page asks for it
            page.fill("#apikey", API_KEY)
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('preview').style.display === 'block'")
            page.fill("#maxtok", "40")
            page.fill("#question", "What color is the shape?")
            # count how often the answer's text changes while it streams in
            page.evaluate("""() => { window.__updates = 0;
                new MutationObserver(() => window.__updates++).observe(document.getElementById('chat'),
                    {subtree: true, characterData: true, childList: true}); }""")
            page.click("#send")
            page.wait_for_function("document.getElementById('stats').textContent.includes('answer tokens')", timeout=60_000)
            answer = page.locator("#answer-1").text_content()
            assert answer and answer.strip()
            assert page.locator("#error").text_content() == ""
            assert "tokens/s" in page.locator("#stats").text_content() or "answer tokens" in page.locator("#stats").text_content()
            assert page.evaluate("window.__updates") >= 2  # the user turn, then the streamed pieces
            # the page's (streamed) answer is the server's answer to the same request
            import httpx

            from serve_helpers import data_url

            body = {"model": live.model_name, "max_tokens": 40, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(Image.open(image))}},
                {"type": "text", "text": "What color is the shape?"}]}]}  # fmt: skip
            ref = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
            assert answer == ref.json()["choices"][0]["message"]["content"]
            # continue the conversation: the follow-up comes from the state cache
            page.fill("#question", "What shape is it?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.turn').length === 4 && !document.getElementById('send').disabled",
                                   timeout=60_000)  # fmt: skip
            assert "from the state cache" in page.locator("#stats").text_content()
            assert not page.locator("#stats").text_content().startswith("0 ")
            if os.environ.get("VRWKV_SCREENSHOT") == "1":
                page.screenshot(path=str(REPO / "docs" / "serve.png"))
            page.click("#reset")
            assert page.locator(".turn").count() == 0
        finally:
            browser.close()

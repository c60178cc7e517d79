"""The gateway's web page, served by the real gateway and driven in real headless Chromium.

The stack is ``tests/services/gateway/conftest.py``'s (captioner + detector + gateway processes, tiny
models). What the page shows is checked against what the API answers for the same image, through
``snap2caption.client``. Chromium is Debian's (``/usr/bin/chromium``, installed by setup); Playwright
only drives it, nothing is downloaded. A screenshot of each page test lands in
``$SNAP2CAPTION_TEST_ARTIFACTS`` (default ``var/test-artifacts/`` in the repo).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from snap2caption.client import AnalyzeResult, Snap2CaptionClient
from tests.gateway_stack import CAPTIONS, ImageServer, Stack, assert_envelope, colour_png

pytestmark = pytest.mark.integration

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VIEWPORT = {"width": 1280, "height": 900}
WAIT_MS = 60_000
BOX_TOLERANCE_PX = 1.5


def artifacts_dir() -> Path:
    """Where screenshots go: ``$SNAP2CAPTION_TEST_ARTIFACTS``, else ``var/test-artifacts/`` (git-ignored)."""
    folder = Path(os.environ.get("SNAP2CAPTION_TEST_ARTIFACTS") or REPO / "var" / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def rotated_noise_jpeg() -> bytes:
    """Noise stored 800 x 600 with EXIF orientation 6 (rotate 90° clockwise): shown 600 x 800 upright.

    Noise makes the random detector find boxes everywhere; the rotation checks that the page and the
    API agree on the frame the boxes are in; the height makes the page scale the image down.
    """
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80, exif=exif.tobytes())
    return buffer.getvalue()


# ---------------------------------------------------------------------------------- plain HTTP


def test_page_and_assets_are_served_locally_with_a_strict_policy(stack: Stack) -> None:
    with httpx.Client(base_url=stack.gateway.url, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assets = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
        assert sorted(assets) == ["/static/app.js", "/static/style.css"]  # nothing from elsewhere
        types = {"/static/app.js": "text/javascript", "/static/style.css": "text/css"}
        for path, media_type in types.items():
            asset = http.get(path)
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
            hosts = set(re.findall(r"https?://([\w.-]+)", asset.text)) - {"example.com"}
            assert not hosts, f"{path} refers to {hosts}"
            again = http.get(path, headers={"If-None-Match": asset.headers["etag"]})
            assert again.status_code == 304 and not again.content
        for missing in ("/static/nope.js", "/static/..%2Fconfig.py", "/static/web.py"):
            assert_envelope(http.get(missing), 404, "not_found")
        assert "/" not in http.get("/openapi.json").json()["paths"]  # the page is not part of the API


# ---------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium under Playwright; skipped only when no chromium binary exists."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (setup installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"]
        )
        try:
            yield browser
        finally:
            browser.close()


class PageProblems:
    """Uncaught script errors and Content-Security-Policy refusals seen by a page."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def console(self, message: Any) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.messages.append(message.text)


@pytest.fixture()
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh tab (own storage); a screenshot is saved at the end; script errors fail the test."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    problems = PageProblems()
    tab.on("pageerror", lambda error: problems.messages.append(f"uncaught: {error}"))
    tab.on("console", problems.console)
    try:
        yield tab
        shot = artifacts_dir() / f"web-{request.node.name}.png"
        tab.screenshot(path=str(shot), full_page=True)
        logger.info("screenshot: %s", shot)
    finally:
        context.close()
    assert problems.messages == []


def api(stack: Stack) -> Snap2CaptionClient:
    return Snap2CaptionClient(stack.gateway.url, timeout=60)


def upload(page: Any, name: str, mime: str, data: bytes) -> None:
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": mime, "buffer": data}])


def shown_result(page: Any) -> dict[str, Any]:
    """What the page shows, read from the DOM (boxes relative to the displayed image)."""
    shown: dict[str, Any] = page.evaluate(
        """() => {
        const img = document.getElementById("preview");
        const frame = img.getBoundingClientRect();
        const text = (id) => document.getElementById(id).textContent;
        return {
            caption: text("caption"),
            altText: text("alt-text"),
            imgAlt: img.alt,
            natural: [img.naturalWidth, img.naturalHeight],
            displayed: [frame.width, frame.height],
            tags: Array.from(document.querySelectorAll("#tags li"), (li) => li.textContent),
            requestId: text("request-id"),
            boxes: Array.from(document.querySelectorAll("#boxes .box"), (el) => {
                const r = el.getBoundingClientRect();
                return {label: el.dataset.label, x1: r.left - frame.left, y1: r.top - frame.top,
                        x2: r.right - frame.left, y2: r.bottom - frame.top};
            }),
        };
    }"""
    )
    return shown


def wait_for_result(page: Any, request_id_before: str = "") -> None:
    """Wait until the results show an analysis other than ``request_id_before``, image loaded."""
    page.wait_for_function(
        """(before) => {
            const rid = document.getElementById("request-id").textContent;
            const img = document.getElementById("preview");
            return !document.getElementById("results").hidden && rid && rid !== before
                && img.complete && img.naturalWidth > 0;
        }""",
        arg=request_id_before,
    )


def assert_boxes_match(shown: dict[str, Any], expected: AnalyzeResult) -> None:
    """One box per API object, placed where the API's original-pixel box lands on the displayed image."""
    assert expected.objects is not None
    assert len(shown["boxes"]) == len(expected.objects) > 0
    scale_x = shown["displayed"][0] / expected.image.width
    scale_y = shown["displayed"][1] / expected.image.height
    for box, obj in zip(shown["boxes"], expected.objects, strict=True):
        assert box["label"] == obj.label
        want = [
            max(0.0, obj.box.x1) * scale_x,
            max(0.0, obj.box.y1) * scale_y,
            min(expected.image.width, obj.box.x2) * scale_x,
            min(expected.image.height, obj.box.y2) * scale_y,
        ]
        got = [box["x1"], box["y1"], box["x2"], box["y2"]]
        assert got == pytest.approx(want, abs=BOX_TOLERANCE_PX), (got, want)


def test_upload_shows_boxes_caption_alt_text_tags_and_takes_feedback(stack: Stack, page: Any) -> None:
    page.goto(stack.gateway.url)
    assert page.title() == "Snap2Caption"
    unlabelled = page.evaluate(
        """() => Array.from(document.querySelectorAll("input, textarea, select")).filter((el) =>
            !el.labels.length && !el.getAttribute("aria-label")).map((el) => el.id || el.name)"""
    )
    assert unlabelled == []
    assert page.get_attribute("#results", "aria-live") == "polite"
    assert page.get_attribute("#error", "role") == "alert"

    # 1. A rotated photo: boxes drawn over the upright, scaled-down image where the API puts them.
    photo = rotated_noise_jpeg()
    with api(stack) as client:
        expected = client.analyze(photo)
    upload(page, "rotated.jpg", "image/jpeg", photo)
    wait_for_result(page)
    shown = shown_result(page)
    assert (expected.image.width, expected.image.height) == (600, 800)
    assert shown["natural"] == [600, 800]  # the browser shows it upright, as the API measured it
    assert shown["displayed"][1] < 800  # scaled to fit: the boxes had to be scaled too
    assert_boxes_match(shown, expected)
    assert page.text_content("#objects-count") == f"({len(expected.objects or [])})"
    page.screenshot(path=str(artifacts_dir() / "web-boxes-on-rotated-photo.png"), full_page=True)

    # 2. A red picture: the page says what the API says, alt text becomes the image's alt.
    red = colour_png("red", (320, 240))
    with api(stack) as client:
        expected = client.analyze(red)
    assert expected.caption is not None and expected.caption.confidence is not None
    assert expected.alt_text is not None and expected.tags
    upload(page, "red.png", "image/png", red)
    wait_for_result(page, shown["requestId"])
    shown = shown_result(page)
    assert shown["caption"] == expected.caption.text
    assert shown["imgAlt"] == expected.alt_text.text
    assert shown["altText"].startswith(expected.alt_text.text)
    assert shown["tags"] == [tag.hashtag for tag in expected.tags]
    note = f" — {expected.caption.note}" if expected.caption.note else ""  # why it is not the alt text
    assert (
        page.text_content("#caption-confidence")
        == f"Confidence {expected.caption.confidence * 100:.1f}%{note}"
    )
    timings = page.eval_on_selector_all("#timings dt", "els => els.map((el) => el.textContent)")
    assert timings == [k for k, v in expected.raw["timings"].items() if v is not None]  # fetch_ms: null
    assert "total_ms" in timings
    caption_model = expected.models["caption"]
    assert f"{caption_model.name} v{caption_model.version}" in (page.text_content("#models") or "")

    # 3. Feedback, by keyboard only: corrected caption, rating 4 (arrow keys in the radio group), send.
    page.focus("#feedback-caption")
    page.keyboard.press("Control+A")
    page.keyboard.type("a red bicycle leaning on a wall")
    page.keyboard.press("Tab")  # -> the first rating radio
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Tab")  # -> reason
    page.keyboard.type("wrong object")
    page.keyboard.press("Tab")  # -> send button
    with page.expect_response("**/v1/feedback") as answer:
        page.keyboard.press("Enter")
    response = answer.value
    assert response.status == 201
    receipt = response.json()
    assert json.loads(response.request.post_data) == {
        "inference_id": receipt["inference_id"],
        "caption": "a red bicycle leaning on a wall",
        "rating": 4,
        "reason": "wrong object",
    }
    assert receipt["request_id"] == shown["requestId"]  # the inference id named the analysis shown
    page.wait_for_selector("#feedback-status.ok")
    assert page.text_content("#feedback-status") == "Thank you, your feedback was recorded."


def test_a_text_file_gets_a_readable_unsupported_format_message(stack: Stack, page: Any) -> None:
    page.goto(stack.gateway.url)
    with page.expect_response("**/v1/analyze") as answer:
        upload(page, "notes.png", "image/png", b"just some notes, not a picture\n")
    assert answer.value.status == 415
    page.wait_for_selector("#error:not([hidden])")
    message = page.text_content("#error .error-message") or ""
    assert message.startswith("Not a supported image format (415 unsupported_format): ")
    assert answer.value.json()["error"]["message"] in message
    assert page.text_content("#error .error-request-id code") == answer.value.headers["x-request-id"]
    assert page.is_hidden("#results")


def test_url_form_works_from_the_keyboard_and_shows_refusals(stack: Stack, page: Any) -> None:
    page.goto(stack.gateway.url)
    page.focus("#url-input")
    page.keyboard.type("http://127.0.0.1:9/cat.png")  # loopback: this gateway refuses private hosts
    page.keyboard.press("Enter")
    page.wait_for_selector("#error:not([hidden])")
    message = page.text_content("#error .error-message") or ""
    assert message.startswith("That URL is not allowed (400 url_not_allowed): ")


DROP_OR_PASTE = """([kind, b64, name]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], name, {type: "image/png"}));
    if (kind === "drop") {
        const zone = document.getElementById("drop-zone");
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
    } else {
        document.body.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
    }
}"""


def test_drop_paste_and_feature_options(stack: Stack, page: Any) -> None:
    page.goto(stack.gateway.url)
    green = base64.b64encode(colour_png("green")).decode()
    page.evaluate(DROP_OR_PASTE, ["drop", green, "dropped.png"])
    wait_for_result(page)
    assert page.text_content("#caption") == CAPTIONS[2]
    before = page.text_content("#request-id") or ""

    page.click("summary:has-text('Options')")
    page.uncheck("input[name=feature][value=tags]")
    page.uncheck("input[name=feature][value=objects]")
    yellow = base64.b64encode(colour_png("yellow")).decode()
    with page.expect_request("**/v1/analyze*") as sent:
        page.evaluate(DROP_OR_PASTE, ["paste", yellow, "pasted.png"])
    assert sent.value.url.endswith("/v1/analyze?features=caption%2Calt_text")
    wait_for_result(page, before)
    assert page.text_content("#caption") == CAPTIONS[3]
    assert page.locator("#boxes .box").count() == 0
    assert page.text_content("#tags") == "not asked for"
    assert page.text_content("#objects") == "not asked for"


@pytest.fixture(scope="module")
def keyed_gateway(stack: Stack) -> tuple[str, str]:
    """A second gateway with API keys on that may fetch loopback URLs; returns (url, a valid key)."""
    from services.gateway.auth import KeyStore
    from services.gateway.db import make_engine

    # A database of its own, so the key exists before the gateway starts.
    database_url = f"sqlite:///{stack.workdir / 'web-page-keys.db'}"
    engine = make_engine(database_url)
    _, secret = KeyStore(engine).create("web page test")
    engine.dispose()
    service = stack.start_gateway(auth_enabled="true", allow_private_urls="true", database_url=database_url)
    return service.url, secret


def test_api_key_field_is_sent_kept_for_the_tab_and_urls_are_analysed(
    stack: Stack, keyed_gateway: tuple[str, str], image_server: ImageServer, page: Any
) -> None:
    url, secret = keyed_gateway
    image_server.files["/web-blue.png"] = ("image/png", colour_png("blue", (200, 150)))
    image_url = f"{image_server.url}/web-blue.png"
    page.goto(url)
    page.fill("#url-input", image_url)
    page.click("#url-submit")
    page.wait_for_selector("#error:not([hidden])")
    assert (page.text_content("#error .error-message") or "").startswith(
        "An API key is needed (or the one given is not valid) (401 unauthorized): "
    )

    page.click("summary:has-text('Options')")
    page.fill("#api-key", secret)
    page.reload()  # the key survives a reload of the tab (sessionStorage)
    assert page.input_value("#api-key") == secret
    page.fill("#url-input", image_url)
    with page.expect_request("**/v1/analyze") as sent:
        page.click("#url-submit")
    assert sent.value.headers["authorization"] == f"Bearer {secret}"
    assert json.loads(sent.value.post_data) == {"url": image_url}
    wait_for_result(page)
    with Snap2CaptionClient(url, api_key=secret, timeout=60) as client:
        expected = client.analyze(image_url)
    shown = shown_result(page)
    assert expected.caption is not None and shown["caption"] == expected.caption.text
    assert shown["natural"] == [200, 150]  # the browser loaded the picture from the URL itself
    assert len(shown["boxes"]) == len(expected.objects or [])
    assert page.is_hidden("#error")

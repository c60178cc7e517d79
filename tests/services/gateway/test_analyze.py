"""``POST /v1/analyze`` and ``/v1/analyze/batch`` through real processes: what the backends say arrives
intact (boxes in the original frame), every bad input gets its status and envelope, every valid but
unusual image is analysed, options work, OpenAPI documents it all."""

from __future__ import annotations

import hashlib
import io
import socket
import struct
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from services.gateway.images import normalise_image
from snap2caption.alt_text import gender_neutral
from snap2caption.imaging import DecodeLimits, decode_image, resize_max_side
from tests.gateway_stack import (
    BACKEND_MAX_SIDE,
    CAPTIONS,
    COLOURS,
    GATEWAY_CAPS,
    ImageServer,
    Stack,
    assert_envelope,
    colour_png,
    noise_png,
    post_analyze,
)
from tests.helpers import ServiceProcess, wait_for

LIMITS = DecodeLimits(
    max_bytes=int(GATEWAY_CAPS["max_image_bytes"]), max_pixels=int(GATEWAY_CAPS["max_image_pixels"])
)
BODY_CAP = int(GATEWAY_CAPS["max_body_bytes"])

pytestmark = pytest.mark.integration


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def direct(url: str, path: str, data: bytes, content_type: str, **params: Any) -> dict[str, Any]:
    """A backend's first result for ``data``, asked directly (no gateway)."""
    response = httpx.post(
        f"{url}{path}", content=data, headers={"content-type": content_type}, params=params, timeout=30
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


def expected_objects(stack: Stack, data: bytes) -> tuple[list[dict[str, Any]], float, float]:
    """The detector's objects for the image the gateway sends it, and the scale back to the original."""
    sent = normalise_image(data, LIMITS, BACKEND_MAX_SIDE, "auto")  # the gateway's default
    result = direct(stack.detector.url, "/v1/detect", sent.data, sent.content_type)
    return result["objects"], sent.width / sent.sent_width, sent.height / sent.sent_height


def assert_same_objects(got: list[dict[str, Any]], want: list[dict[str, Any]], sx: float, sy: float) -> None:
    """Same objects in the same order, boxes scaled by (sx, sy) and clamped to nothing smaller than 0."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"]
        assert g["score"] == pytest.approx(w["score"], abs=1e-6)
        b = w["box"]
        assert [g["box"][k] for k in ("x1", "y1", "x2", "y2")] == pytest.approx(
            [max(0.0, b["x1"] * sx), max(0.0, b["y1"] * sy), b["x2"] * sx, b["y2"] * sy], abs=0.02
        )


# ------------------------------------------------------------------------------------------ happy paths


def test_analyze_relays_every_backend_answer_with_boxes_in_the_original_frame(stack: Stack) -> None:
    data = noise_png(600, 400, seed=1)  # larger than the backends' 256 px: shrunk, boxes scaled back
    response = stack.analyze(data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["image"] == {"width": 600, "height": 400, "format": "png"}
    assert body["errors"] == []

    sent = normalise_image(data, LIMITS, BACKEND_MAX_SIDE, "auto")  # the gateway's default
    assert (sent.sent_width, sent.sent_height) == (256, 171)
    caption = direct(stack.captioner.url, "/v1/caption", sent.data, sent.content_type)
    assert body["caption"] == {
        "text": caption["caption"],
        "confidence": pytest.approx(caption["confidence"]),
        # The stack's tiny captioner has no domain description: null, and trusted as in domain.
        "in_domain": None,
        "domain_score": None,
        "used_for_alt_text": body["alt_text"]["source"] == "caption",
        "note": body["caption"]["note"],
    }
    assert caption["in_domain"] is None and caption["domain_score"] is None
    tags = direct(stack.detector.url, "/v1/tags", sent.data, sent.content_type, top_k=5)
    assert body["tags"] == [
        {"name": t["name"], "score": pytest.approx(t["score"], abs=1e-6), "hashtag": t["hashtag"]}
        for t in tags["tags"]
    ]
    want, sx, sy = expected_objects(stack, data)
    assert want, "the random detector finds boxes on noise"
    assert_same_objects(body["objects"], want, sx, sy)
    assert max(o["box"]["x2"] for o in body["objects"]) > 256  # really in the 600 px frame
    assert all(0 <= o["box"]["x1"] < o["box"]["x2"] <= 600 for o in body["objects"])
    assert all(0 <= o["box"]["y1"] < o["box"]["y2"] <= 400 for o in body["objects"])

    assert set(body["models"]) == {"caption", "tags", "objects"}
    assert body["models"]["caption"]["name"] == "captioner"
    assert body["models"]["objects"]["name"] == "detector" and body["models"]["tags"]["name"] == "tagger"
    timings = body["timings"]
    for key in ("decode_ms", "captioner_ms", "detector_tags_ms", "detector_objects_ms", "total_ms"):
        assert timings[key] > 0, key
    assert timings["total_ms"] >= max(timings["captioner_ms"], timings["detector_objects_ms"])


@pytest.mark.parametrize("colour", ["red", "blue", "green"])
def test_captions_and_alt_text_come_from_the_captioner(stack: Stack, colour: str) -> None:
    response = stack.analyze(files={"file": ("photo.png", colour_png(colour), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    text = CAPTIONS[list(COLOURS).index(colour)]
    assert body["caption"]["text"] == text
    assert body["caption"]["confidence"] >= 0.5  # over the alt-text threshold: alt text is the caption
    assert body["alt_text"] == {"text": text[0].upper() + text[1:] + ".", "source": "caption"}
    assert body["caption"]["used_for_alt_text"] is True and body["caption"]["note"] is None


def test_features_max_tags_and_min_confidence(stack: Stack) -> None:
    data = noise_png(120, 90, seed=2)
    only = stack.analyze(data, params={"features": "caption"}).json()
    assert only["caption"] is not None
    assert only["alt_text"] is None and only["tags"] is None and only["objects"] is None
    assert set(only["models"]) == {"caption"}
    assert only["timings"]["detector_tags_ms"] is None

    tags = stack.analyze(data, params={"features": "tags", "max_tags": 2}).json()
    assert tags["caption"] is None and len(tags["tags"]) == 2

    everything = stack.analyze(data).json()
    threshold = 0.9
    strict = stack.analyze(data, params={"features": "objects,tags", "min_confidence": threshold}).json()
    assert strict["objects"] == [o for o in everything["objects"] if o["score"] >= threshold]
    assert all(t["score"] >= threshold for t in strict["tags"])


def test_gender_neutral_option(stack: Stack) -> None:
    for colour in ("red", "blue", "green"):
        data = colour_png(colour)
        plain = stack.analyze(data, params={"features": "caption,alt_text"}).json()
        neutral = stack.analyze(
            data, params={"features": "caption,alt_text", "gender_neutral": "true"}
        ).json()
        assert neutral["caption"]["text"] == gender_neutral(plain["caption"]["text"])
        assert neutral["caption"]["text"] != plain["caption"]["text"]
        assert neutral["alt_text"]["text"] == gender_neutral(plain["alt_text"]["text"])
        words = set(neutral["caption"]["text"].split()) | set(neutral["alt_text"]["text"].lower().split())
        assert not words & {"man", "men", "woman", "women", "girl", "boy"}
    assert (
        stack.analyze(colour_png("red"), params={"gender_neutral": "true"}).json()["caption"]["text"]
        == "a person riding a red bike"
    )


# ------------------------------------------------------------------------------------------ unusual images


def _animated_gif() -> bytes:
    frames = [Image.new("P", (40, 30), i) for i in (1, 5, 9)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _palette_alpha_png() -> bytes:
    image = Image.new("P", (30, 20), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (10, 5, 20, 15))
    return encode(image, "PNG", transparency=bytes([0] + [255] * 255))


UNUSUAL: dict[str, tuple[bytes, tuple[int, int], str]] = {
    "cmyk-jpeg": (encode(Image.new("CMYK", (64, 48), (0, 200, 200, 20)), "JPEG"), (64, 48), "jpeg"),
    "16-bit-png": (
        encode(Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20), "PNG"),
        (64, 48),
        "png",
    ),
    "palette-alpha-png": (_palette_alpha_png(), (30, 20), "png"),
    "la-png": (encode(Image.new("LA", (33, 21), (120, 100)), "PNG"), (33, 21), "png"),
    "1-bit-png": (encode(Image.new("1", (50, 40), 1), "PNG"), (50, 40), "png"),
    "rgba-png": (encode(Image.new("RGBA", (40, 40), (10, 200, 10, 128)), "PNG"), (40, 40), "png"),
    "animated-gif": (_animated_gif(), (40, 30), "gif"),
    "1x1-png": (encode(Image.new("RGB", (1, 1), (255, 255, 255)), "PNG"), (1, 1), "png"),
    "webp": (encode(Image.new("RGB", (48, 32), (0, 0, 255)), "WEBP"), (48, 32), "webp"),
    "bmp": (encode(Image.new("RGB", (17, 9), (0, 0, 255)), "BMP"), (17, 9), "bmp"),
    "tiff": (encode(Image.new("RGB", (20, 10), (0, 50, 255)), "TIFF"), (20, 10), "tiff"),
}


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_valid_unusual_images_are_analysed(stack: Stack, name: str) -> None:
    data, (width, height), fmt = UNUSUAL[name]
    response = stack.analyze(data, headers={"content-type": "image/whatever"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": width, "height": height, "format": fmt}
    assert body["errors"] == []
    assert body["caption"]["text"] and body["alt_text"]["text"] and body["tags"]
    assert all(0 <= o["box"]["x2"] <= width and 0 <= o["box"]["y2"] <= height for o in body["objects"])


def test_exif_rotated_image_has_boxes_in_the_rotated_frame(stack: Stack) -> None:
    stored = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 150 x 90, displayed rotated 90 degrees: 90 x 150
    rotated = encode(stored, "PNG", exif=exif.tobytes())
    upright = encode(decode_image(rotated).image, "PNG")  # the same pixels, already upright, no EXIF

    a = stack.analyze(rotated).json()
    b = stack.analyze(upright).json()
    assert a["image"] == {"width": 90, "height": 150, "format": "png"}
    assert a["objects"] and a["objects"] == b["objects"]  # the backends saw the same upright pixels
    assert a["tags"] == b["tags"] and a["caption"] == b["caption"]
    assert all(o["box"]["x2"] <= 90 and o["box"]["y2"] <= 150 for o in a["objects"])
    assert max(o["box"]["y2"] for o in a["objects"]) > 90  # taller than the stored frame


def test_shrunk_image_boxes_scale_exactly(stack: Stack) -> None:
    big = noise_png(512, 384, seed=4)
    small = encode(
        resize_max_side(decode_image(big).image, BACKEND_MAX_SIDE), "PNG"
    )  # what the gateway sends
    a = stack.analyze(big, params={"features": "objects"}).json()["objects"]
    b = stack.analyze(small, params={"features": "objects"}).json()["objects"]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x["label"] == y["label"] and x["score"] == y["score"]
        assert [x["box"][k] for k in ("x1", "y1", "x2", "y2")] == pytest.approx(
            [y["box"][k] * 2 for k in ("x1", "y1", "x2", "y2")], abs=0.02
        )


# ------------------------------------------------------------------------------------------ bad input


def _pixel_bomb() -> bytes:
    """A real PNG whose header claims 20000 x 20000 pixels (refused before decoding)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", 20_000, 20_000)
    return bytes(data)


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
TRUNCATED = noise_png(80, 60, seed=5)[:400]

BAD_UPLOADS = {
    "text": (b"just some text, not an image", 415, "unsupported_format"),
    "pdf": (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n", 415, "unsupported_format"),
    "svg": (SVG, 415, "unsupported_format"),
    "elf": (b"\x7fELF\x02\x01\x01" + b"\x00" * 64, 415, "unsupported_format"),
    "truncated-png": (TRUNCATED, 422, "corrupt_image"),
    "pixel-bomb": (_pixel_bomb(), 413, "image_too_large"),
    "image-over-byte-cap": (
        b"\x89PNG\r\n\x1a\n" + b"\x00" * (LIMITS.max_bytes + 10),
        413,
        "payload_too_large",
    ),
}


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
@pytest.mark.parametrize("how", ["raw", "multipart"])
def test_bad_uploads_get_their_status_and_envelope(stack: Stack, name: str, how: str) -> None:
    data, status, code = BAD_UPLOADS[name]
    if how == "raw":
        response = stack.analyze(data, headers={"content-type": "image/jpeg"})  # the type lies
    else:
        response = stack.analyze(files={"file": ("cat.jpg", data, "image/jpeg")})
    assert_envelope(response, status, code)


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "bad_request"),
        ({"files": {"image": ("a.png", colour_png("red"), "image/png")}}, 400, "bad_request"),
        ({"data": {"file": "not a file"}, "files": {"x": ("x", b"x")}}, 400, "bad_request"),
        ({"files": {"file": ("empty.png", b"", "image/png")}}, 400, "bad_request"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
        ({"json": {"uri": "http://example.com/a.png"}}, 400, "bad_request"),
        ({"json": {"url": "http://example.com/a.png", "colour": "red"}}, 400, "bad_request"),
        ({"json": {"url": "ftp://example.com/a.png"}}, 400, "url_not_allowed"),
        ({"json": {"url": "http://127.0.0.1:1/a.png"}}, 400, "url_not_allowed"),
        ({"json": {"url": "http://169.254.169.254/latest/meta-data"}}, 400, "url_not_allowed"),
        (
            {"content": b"multipart junk", "headers": {"content-type": "multipart/form-data; boundary=zz"}},
            400,
            "bad_request",
        ),
    ],
    ids=[
        "empty-body",
        "missing-file-field",
        "file-field-is-text",
        "empty-file",
        "malformed-json",
        "empty-json",
        "json-without-url",
        "json-unknown-field",
        "url-bad-scheme",
        "url-loopback",
        "url-metadata",
        "malformed-multipart",
    ],
)
def test_bad_requests(stack: Stack, kwargs: dict[str, Any], status: int, code: str) -> None:
    assert_envelope(post_analyze(stack.gateway.url, **kwargs), status, code)


@pytest.mark.parametrize(
    "params",
    [
        {"features": "caption,faces"},
        {"features": ","},
        {"max_tags": 0},
        {"min_confidence": 2},
        {"max_tags": "x"},
    ],
)
def test_bad_options(stack: Stack, params: dict[str, Any]) -> None:
    assert_envelope(stack.analyze(colour_png("red"), params=params), 400, "bad_request")


def _raw_http(port: int, head: bytes, body_chunks: list[bytes], timeout_s: float = 10.0) -> bytes:
    """Send a request by hand (so the body can stop half-way) and return what the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed while we were still sending: fine, read its answer
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


def test_body_over_the_cap_by_content_length_is_refused_before_reading(stack: Stack) -> None:
    head = (
        b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {BODY_CAP * 5}\r\n\r\n".encode()
    )
    answer = _raw_http(stack.gateway.port, head, [])  # not one body byte sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer


def test_streamed_body_over_the_cap_stops_reading_at_the_cap(stack: Stack) -> None:
    head = (
        b"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"\x00" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    n = BODY_CAP // len(piece) + 2  # just past the cap, and the body is never finished (no 0-chunk):
    answer = _raw_http(stack.gateway.port, head, [chunk] * n)  # a server reading it all would hang here
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer


# ------------------------------------------------------------------------------------------ URLs


@pytest.fixture(scope="module")
def url_gateway(stack: Stack) -> ServiceProcess:
    """A gateway that may fetch from loopback (the image server of these tests)."""
    return stack.start_gateway(allow_private_urls="true")


def test_analyze_by_url(stack: Stack, url_gateway: ServiceProcess, image_server: ImageServer) -> None:
    image_server.files["/blue.png"] = ("image/png", colour_png("blue"))
    image_server.files["/blue-no-type"] = ("application/octet-stream", colour_png("blue"))
    for path in ("/blue.png", "/blue-no-type"):
        response = post_analyze(
            url_gateway.url, json={"url": f"{image_server.url}{path}", "features": ["caption"]}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["caption"]["text"] == CAPTIONS[1]
        assert body["timings"]["fetch_ms"] > 0 and body["tags"] is None
    # The session gateway keeps the default: loopback is refused before any connection.
    refused = post_analyze(stack.gateway.url, json={"url": f"{image_server.url}/blue.png"})
    assert_envelope(refused, 400, "url_not_allowed")


def test_url_errors(url_gateway: ServiceProcess, image_server: ImageServer) -> None:
    image_server.files["/page.html"] = ("text/html", b"<!doctype html><html><body>hi</body></html>")
    image_server.files["/broken.png"] = ("image/png", TRUNCATED)
    image_server.files["/empty.png"] = ("image/png", b"")
    cases = [("/missing.png", 422, "url_fetch_failed"), ("/page.html", 422, "url_fetch_failed")]
    cases += [("/empty.png", 422, "url_fetch_failed"), ("/broken.png", 422, "corrupt_image")]
    for path, status, code in cases:
        response = post_analyze(url_gateway.url, json={"url": f"{image_server.url}{path}"})
        assert_envelope(response, status, code)


# ------------------------------------------------------------------------------------------ batch


def test_batch_mixes_results_and_per_item_errors(stack: Stack) -> None:
    files = [
        ("files", ("red.png", colour_png("red"), "image/png")),
        ("files", ("notes.txt", b"plain text", "text/plain")),
        ("files", ("cut.png", TRUNCATED, "image/png")),
        (
            "files",
            (
                "blue.jpg",
                encode(Image.new("RGB", (96, 72), COLOURS["blue"]), "JPEG", quality=95),
                "image/jpeg",
            ),
        ),
        ("files", ("empty.png", b"", "image/png")),
        ("files", ("bomb.png", _pixel_bomb(), "image/png")),
    ]
    response = post_analyze(
        stack.gateway.url, path="/v1/analyze/batch", files=files, params={"features": "caption"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    rid = response.headers["x-request-id"]
    assert body["request_id"] == rid
    assert (body["succeeded"], body["failed"]) == (2, 4)
    items = body["items"]
    assert [i["index"] for i in items] == list(range(6))
    assert [i["filename"] for i in items] == [f[1][0] for f in files]
    assert items[0]["result"]["caption"]["text"] == CAPTIONS[0]
    assert items[3]["result"]["caption"]["text"] == CAPTIONS[1]
    assert items[0]["result"]["request_id"] == f"{rid}.0"
    errors = {i["index"]: (i["error"]["status"], i["error"]["code"]) for i in items if i["error"]}
    assert errors == {
        1: (415, "unsupported_format"),
        2: (422, "corrupt_image"),
        4: (400, "bad_request"),
        5: (413, "image_too_large"),
    }
    assert all(i["result"] is None for i in items if i["error"])


def test_batch_limits_and_bad_bodies(stack: Stack) -> None:
    url = stack.gateway.url
    many = [("files", (f"{i}.png", colour_png("red", (8, 8)), "image/png")) for i in range(17)]
    assert_envelope(post_analyze(url, path="/v1/analyze/batch", files=many), 400, "bad_request")
    raw = post_analyze(url, colour_png("red"), path="/v1/analyze/batch")
    assert_envelope(raw, 400, "bad_request")
    assert_envelope(post_analyze(url, path="/v1/analyze/batch", json={"urls": []}), 400, "bad_request")


def test_batch_by_urls(url_gateway: ServiceProcess, image_server: ImageServer) -> None:
    image_server.files["/green.png"] = ("image/png", colour_png("green"))
    urls = [f"{image_server.url}/green.png", f"{image_server.url}/nothing-here.png", "file:///etc/passwd"]
    response = post_analyze(
        url_gateway.url, path="/v1/analyze/batch", json={"urls": urls, "features": "caption"}
    )
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert items[0]["result"]["caption"]["text"] == CAPTIONS[2] and items[0]["url"] == urls[0]
    assert items[1]["error"]["code"] == "url_fetch_failed" and items[1]["error"]["status"] == 422
    assert items[2]["error"]["code"] == "url_not_allowed" and items[2]["error"]["status"] == 400


# ------------------------------------------------------------------------------------------ docs


def test_openapi_documents_the_routes_with_examples(stack: Stack) -> None:
    spec = httpx.get(f"{stack.gateway.url}/openapi.json", timeout=10).json()
    for path in ("/v1/analyze", "/v1/analyze/batch"):
        operation = spec["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(content)
        assert content["application/json"]["examples"]
        for status in ("200", "400", "413", "503"):
            assert status in operation["responses"], (path, status)
        assert "422" in operation["responses"] or path.endswith("batch")
    assert "image/*" in spec["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]
    schemas = spec["components"]["schemas"]
    assert schemas["AnalyzeResult"]["examples"][0]["alt_text"]["source"] == "caption"
    assert schemas["AnalyzeBatchResponse"]["examples"]
    params = {p["name"]: p for p in spec["paths"]["/v1/analyze"]["post"]["parameters"]}
    assert {"features", "max_tags", "min_confidence", "gender_neutral"} <= set(params)
    assert params["features"]["schema"]["examples"] == ["caption,alt_text"]
    docs = httpx.get(f"{stack.gateway.url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# ------------------------------------------------------------------------------------------ inference log


def _log_rows(stack: Stack, *request_ids: str) -> dict[str, Any]:
    """The inference log rows of ``request_ids``, once all are written (the writer is asynchronous)."""
    from sqlalchemy import create_engine, select

    from services.gateway.db import inference_log

    engine = create_engine(stack.gateway.env["SNAP2CAPTION_GATEWAY_DATABASE_URL"])

    def rows() -> dict[str, Any] | None:
        with engine.connect() as conn:
            found = conn.execute(
                select(inference_log).where(inference_log.c.request_id.in_(request_ids))
            ).all()
        by_id = {row.request_id: row for row in found}
        return by_id if len(by_id) == len(request_ids) else None

    try:
        return wait_for(rows, timeout_s=10, what=f"inference log rows {request_ids}")
    finally:
        engine.dispose()


def test_inference_log_has_one_record_per_image_and_per_failure(stack: Stack) -> None:
    data = colour_png("yellow")
    ok = stack.analyze(data, params={"features": "caption,tags"})
    bad = stack.analyze(b"not an image at all")
    batch = post_analyze(
        stack.gateway.url,
        path="/v1/analyze/batch",
        files=[("files", ("a.png", data, "image/png")), ("files", ("b.txt", b"text", "text/plain"))],
    )
    ok_id, bad_id, batch_id = (r.headers["x-request-id"] for r in (ok, bad, batch))
    rows = _log_rows(stack, ok_id, bad_id, f"{batch_id}.0", f"{batch_id}.1")

    row = rows[ok_id]
    assert row.status == 200 and row.error_code is None
    assert row.image_sha256 == hashlib.sha256(data).hexdigest() and row.image_bytes == len(data)
    assert (row.width, row.height, row.format) == (96, 72, "png")
    assert row.features == ["caption", "tags"]
    assert row.outputs["caption"]["text"] == CAPTIONS[3]
    assert set(row.model_versions) == {"caption", "tags"}
    assert row.latencies["total_ms"] > 0
    assert row.image is None  # images are not retained by default

    failed = rows[bad_id]
    assert (failed.status, failed.error_code) == (415, "unsupported_format")
    assert failed.image_sha256 is None and failed.image_bytes == len(b"not an image at all")
    assert rows[f"{batch_id}.0"].status == 200
    assert rows[f"{batch_id}.1"].error_code == "unsupported_format"

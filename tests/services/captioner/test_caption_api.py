"""POST /v1/caption through real HTTP against a running ``snap2caption serve captioner``."""

from __future__ import annotations

import asyncio
import io
import itertools
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.services.captioner.conftest import COLOURS, Deployment, image_bytes

pytestmark = pytest.mark.integration

PNG = {"content-type": "image/png"}


def caption(deployment: Deployment, body: bytes | None = None, **kwargs: Any) -> httpx.Response:
    with deployment.service.client() as client:
        if body is not None:
            kwargs.setdefault("headers", PNG)
            kwargs["content"] = body
        return client.post("/v1/caption", **kwargs)


def assert_envelope(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in error["message"]
    return str(error["message"])


def test_one_image_as_the_raw_body(deployment: Deployment) -> None:
    response = caption(deployment, image_bytes("red"))
    assert response.status_code == 200, response.text
    body = response.json()
    model = body["model"]
    assert (model["name"], model["alias"], model["backend"]) == ("captioner", "production", "torch")
    [result] = body["results"]
    assert result["caption"] == deployment.expected(model["version"], "red")
    assert result["index"] == 0 and result["filename"] is None
    assert 0 < result["confidence"] <= 1 and result["tokens"] >= 1
    assert result["raw_confidence"] == result["confidence"]  # an artifact without a calibration
    assert body["options"] == {"max_new_tokens": 24, "num_beams": 1}  # the model's defaults
    assert set(body["timings"]) == {"decode_ms", "queue_ms", "inference_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"] > 0


def test_several_images_as_multipart_come_back_in_order(deployment: Deployment) -> None:
    colours = ["blue", "green", "black", "blue"]
    files = [
        ("files", (f"{c}.jpg", image_bytes(c, (120, 80 + i), "JPEG"), "image/jpeg"))
        for i, c in enumerate(colours)
    ]
    files.append(("file", ("last.png", image_bytes("yellow"), "image/png")))
    response = caption(deployment, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    version = body["model"]["version"]
    assert [r["filename"] for r in body["results"]] == [f"{c}.jpg" for c in colours] + ["last.png"]
    assert [r["caption"] for r in body["results"]] == [
        deployment.expected(version, c) for c in [*colours, "yellow"]
    ]
    assert body["batch_size"] >= 5


def test_decoding_options_are_honoured(deployment: Deployment) -> None:
    response = caption(deployment, image_bytes("white"), params={"num_beams": 3, "max_new_tokens": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["options"] == {"max_new_tokens": 2, "num_beams": 3}
    assert body["results"][0]["tokens"] <= 2
    full = caption(deployment, image_bytes("white"), params={"num_beams": 3}).json()
    assert full["results"][0]["caption"] == deployment.expected(
        full["model"]["version"], "white", num_beams=3
    )


def test_concurrent_clients_each_get_their_own_captions(deployment: Deployment) -> None:
    """40 clients at once, six different images among them: every answer is for the client's own image."""
    colours = list(itertools.islice(itertools.cycle(COLOURS), 40))
    batches_before = deployment.metric("snap2caption_batch_size_count", model="captioner") or 0

    async def one(client: httpx.AsyncClient, colour: str) -> list[tuple[int, str, int, int]]:
        answers = []
        for _ in range(3):
            response = await client.post("/v1/caption", content=image_bytes(colour), headers=PNG)
            body = response.json() if response.status_code == 200 else {}
            version = body.get("model", {}).get("version", 0)
            text = body["results"][0]["caption"] if body else response.text
            answers.append((response.status_code, text, version, body.get("batch_size", 0)))
        return answers

    async def clients() -> list[list[tuple[int, str, int, int]]]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=deployment.service.url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(one(client, c) for c in colours))

    results = asyncio.run(clients())
    for colour, answers in zip(colours, results, strict=True):
        for status, text, version, _ in answers:
            assert status == 200, text
            assert text == deployment.expected(version, colour), (colour, version)
    sizes = [size for answers in results for *_, size in answers]
    assert max(sizes) > 1  # requests did share model calls
    batches = (deployment.metric("snap2caption_batch_size_count", model="captioner") or 0) - batches_before
    assert 0 < batches < 120


def test_bad_inputs_get_the_error_envelope(deployment: Deployment) -> None:
    assert "empty body" in assert_envelope(caption(deployment, b""), 400, "bad_request")
    assert_envelope(caption(deployment, b"%PDF-1.7 not an image", headers=PNG), 415, "unsupported_format")
    text = caption(deployment, b'{"image": "cat.png"}', headers={"content-type": "application/json"})
    assert_envelope(text, 415, "unsupported_format")
    assert_envelope(caption(deployment, image_bytes("red")[:60]), 422, "corrupt_image")
    assert_envelope(caption(deployment, b"\0" * 2_100_000), 413, "payload_too_large")  # the body cap
    buffer = io.BytesIO()
    Image.new("L", (1500, 1000)).save(buffer, format="PNG")  # 1.5 MP, a few KB: over the pixel cap
    assert_envelope(caption(deployment, buffer.getvalue()), 413, "image_too_large")

    message = assert_envelope(
        caption(
            deployment, files=[("files", ("ok.png", image_bytes("red"))), ("files", ("bad.png", b"GIF89a"))]
        ),
        422,
        "corrupt_image",
    )
    assert message.startswith("image 1:")
    wrong_field = caption(deployment, files=[("image", ("a.png", image_bytes("red")))])
    assert "'file' or 'files'" in assert_envelope(wrong_field, 400, "bad_request")
    too_many = [("files", (f"{i}.png", image_bytes("red"))) for i in range(17)]
    assert_envelope(caption(deployment, files=too_many), 400, "bad_request")
    text_field = caption(deployment, data={"file": "not a file"}, files=[("other", ("a.png", b"x"))])
    assert_envelope(text_field, 400, "bad_request")

    assert_envelope(caption(deployment, image_bytes("red"), params={"num_beams": 5}), 400, "bad_request")
    assert_envelope(caption(deployment, image_bytes("red"), params={"max_new_tokens": 0}), 400, "bad_request")
    assert_envelope(
        caption(deployment, image_bytes("red"), params={"max_new_tokens": 200}), 400, "bad_request"
    )
    assert_envelope(caption(deployment, image_bytes("red"), params={"timeout_ms": 1}), 504, "timeout")


def test_readiness_and_metrics_describe_the_model(deployment: Deployment) -> None:
    checks = deployment.ready()
    version = checks["version"]
    assert checks["model"] == "captioner" and checks["alias"] == "production"
    assert checks["backend"] == "auto" and checks["runtime"] == "torch"  # no ONNX export in this artifact
    assert checks["providers"] == {}  # torch: no ONNX Runtime session
    assert isinstance(version, int) and checks["loaded_at"]
    assert checks["calibrated"] is False  # no calibration.json: confidence is the raw one
    assert deployment.metric("snap2caption_model_info", model="captioner", version=str(version)) == 1
    caption(deployment, image_bytes("green"))
    for name in ("snap2caption_queue_seconds_count", "snap2caption_inference_seconds_count"):
        assert (deployment.metric(name, model="captioner") or 0) > 0
    assert deployment.metric("snap2caption_queue_depth", model="captioner") == 0

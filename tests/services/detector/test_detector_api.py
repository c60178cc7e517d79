"""POST /v1/detect and /v1/tags over real HTTP against running ``snap2caption serve detector`` processes."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from snap2caption.imaging import decode_image
from tests.services.detector.conftest import (
    Deployment,
    assert_same_objects,
    assert_same_tags,
    noise_image,
)

pytestmark = pytest.mark.integration


def assert_envelope(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in error["message"]
    return str(error["message"])


def test_detect_one_image_as_the_raw_body(deployment: Deployment) -> None:
    data = noise_image(80, 48, seed=1)
    response = deployment.post("/v1/detect", data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "detector", "version": 1, "alias": "production", "backend": "onnx"}
    assert body["options"] == {"conf": 0.25, "iou": 0.45, "max_det": 100, "include_out_of_domain": False}
    [result] = body["results"]
    assert result["index"] == 0 and result["filename"] is None
    assert result["image"] == {"width": 80, "height": 48}
    # An artifact without a domain model (as older ones): nothing said, nothing withheld.
    assert (result["in_domain"], result["domain_score"], result["withheld"]) == (None, None, 0)
    assert len(result["objects"]) > 3  # the random detector finds plenty
    assert_same_objects(result["objects"], deployment.expected_objects(data))
    scores = [o["score"] for o in result["objects"]]
    assert scores == sorted(scores, reverse=True)
    assert set(body["timings"]) == {"decode_ms", "queue_ms", "inference_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"] > 0


def test_boxes_are_in_the_exif_rotated_frame(deployment: Deployment) -> None:
    """A JPEG stored 80 x 48 with EXIF orientation 6 shows (and is analysed) 48 wide and 80 high."""
    data = noise_image(80, 48, seed=2, fmt="JPEG", exif_orientation=6)
    upright = decode_image(data).image
    assert upright.size == (48, 80)
    params = {"conf": 0.05, "max_det": 300}
    response = deployment.post("/v1/detect", data, headers={"content-type": "image/jpeg"}, params=params)
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert result["image"] == {"width": 48, "height": 80}
    objects = result["objects"]
    assert_same_objects(objects, deployment.expected_objects(data, conf=0.05, max_det=300))
    assert all(0 <= o["box"]["x1"] <= o["box"]["x2"] <= 48 for o in objects)
    assert all(0 <= o["box"]["y1"] <= o["box"]["y2"] <= 80 for o in objects)
    assert max(o["box"]["y2"] for o in objects) > 60  # only possible in the rotated frame
    # Not the stored frame: the same pixels without the rotation give other boxes.
    stored = deployment.detector.detect(
        [Image.open(io.BytesIO(data)).convert("RGB")], conf=0.05, max_det=300
    )[0]
    assert [d.box_xyxy for d in stored] != [tuple(o["box"].values()) for o in objects]


def test_several_images_as_multipart_come_back_in_order(deployment: Deployment) -> None:
    images = [
        noise_image(40 + 10 * i, 60 - 5 * i, seed=10 + i, fmt="JPEG" if i % 2 else "PNG") for i in range(4)
    ]
    files = [("files", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
    files.append(("file", ("last.png", images[0], "image/png")))
    params = {"conf": 0.3, "iou": 0.5, "max_det": 5}
    response = deployment.post("/v1/detect", files=files, params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["options"] == {"conf": 0.3, "iou": 0.5, "max_det": 5, "include_out_of_domain": False}
    assert [r["filename"] for r in body["results"]] == [f"{i}.img" for i in range(4)] + ["last.png"]
    assert [r["index"] for r in body["results"]] == list(range(5))
    for result, data in zip(body["results"], [*images, images[0]], strict=True):
        assert len(result["objects"]) <= 5
        assert_same_objects(
            result["objects"], deployment.expected_objects(data, conf=0.3, iou=0.5, max_det=5)
        )
        size = decode_image(data).image.size
        assert (result["image"]["width"], result["image"]["height"]) == size
    assert body["batch_size"] >= 5


def test_tags_one_and_several_images(deployment: Deployment) -> None:
    data = noise_image(70, 50, seed=3)
    response = deployment.post("/v1/tags", data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "tagger", "version": 1, "alias": "production", "backend": "onnx"}
    assert body["options"] == {"top_k": 5, "min_score": 0.0}
    [result] = body["results"]
    assert result["image"] == {"width": 70, "height": 50}
    assert set(result["tags"][0]) == {"name", "label", "score", "hashtag", "class_index"}
    assert_same_tags(result["tags"], deployment.expected_tags(data))
    assert len({t["name"] for t in result["tags"]}) == len(result["tags"]) == 5  # the two cat classes merged

    images = [noise_image(30 + i, 40, seed=20 + i) for i in range(3)]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = deployment.post("/v1/tags", files=files, params={"top_k": 2, "min_score": 0.01})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["options"] == {"top_k": 2, "min_score": 0.01}
    for result, data in zip(body["results"], images, strict=True):
        assert_same_tags(result["tags"], deployment.expected_tags(data, top_k=2, min_score=0.01))


def test_thirty_concurrent_clients_each_get_their_own_results(deployment: Deployment) -> None:
    """30 clients at once, each with its own image (its own size, so its own boxes), detect and tags twice."""
    images = [noise_image(32 + 3 * i, 90 - 2 * i, seed=100 + i) for i in range(30)]
    expected = [(deployment.expected_objects(d), deployment.expected_tags(d)) for d in images]
    batches_before = deployment.metric("snap2caption_batch_size_count", model="detector") or 0

    async def one(client: httpx.AsyncClient, data: bytes) -> list[httpx.Response]:
        answers = []
        for _ in range(2):
            for path in ("/v1/detect", "/v1/tags"):
                answers.append(await client.post(path, content=data, headers={"content-type": "image/png"}))
        return answers

    async def clients() -> list[list[httpx.Response]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=deployment.service.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, data) for data in images))

    results = asyncio.run(clients())
    sizes = []
    for (objects, tags), answers in zip(expected, results, strict=True):
        for response in answers:
            assert response.status_code == 200, response.text
        for detect in answers[0::2]:
            assert_same_objects(detect.json()["results"][0]["objects"], objects)
            sizes.append(detect.json()["batch_size"])
        for tagged in answers[1::2]:
            assert_same_tags(tagged.json()["results"][0]["tags"], tags)
            sizes.append(tagged.json()["batch_size"])
    assert max(sizes) > 1  # requests did share model calls
    batches = (deployment.metric("snap2caption_batch_size_count", model="detector") or 0) - batches_before
    assert 0 < batches < 60


def test_bad_inputs_get_the_error_envelope(deployment: Deployment) -> None:
    ok = noise_image(40, 30, seed=4)
    for path in ("/v1/detect", "/v1/tags"):
        assert "empty body" in assert_envelope(deployment.post(path, b""), 400, "bad_request")
        assert_envelope(deployment.post(path, b"%PDF-1.7 not an image"), 415, "unsupported_format")
        assert_envelope(deployment.post(path, ok[:60]), 422, "corrupt_image")
    text = deployment.post("/v1/detect", b'{"image": "x.png"}', headers={"content-type": "application/json"})
    assert_envelope(text, 415, "unsupported_format")
    assert_envelope(deployment.post("/v1/detect", b"\0" * 2_100_000), 413, "payload_too_large")  # body cap
    buffer = io.BytesIO()
    Image.new("L", (1500, 1000)).save(buffer, format="PNG")  # 1.5 MP in a few KB: over the pixel cap
    assert_envelope(deployment.post("/v1/tags", buffer.getvalue()), 413, "image_too_large")

    mixed = [("files", ("ok.png", ok)), ("files", ("bad.gif", b"GIF89a"))]
    assert assert_envelope(deployment.post("/v1/detect", files=mixed), 422, "corrupt_image").startswith(
        "image 1:"
    )
    wrong_field = deployment.post("/v1/detect", files=[("image", ("a.png", ok))])
    assert "'file' or 'files'" in assert_envelope(wrong_field, 400, "bad_request")
    too_many = [("files", (f"{i}.png", ok)) for i in range(17)]
    assert_envelope(deployment.post("/v1/tags", files=too_many), 400, "bad_request")

    bad_params: list[tuple[str, dict[str, Any]]] = [
        ("/v1/detect", {"conf": 1.5}),
        ("/v1/detect", {"conf": "nan"}),
        ("/v1/detect", {"iou": -0.1}),
        ("/v1/detect", {"max_det": 0}),
        ("/v1/detect", {"max_det": 301}),  # over the service's max_det_limit
        ("/v1/detect", {"conf": "high"}),
        ("/v1/tags", {"top_k": 0}),
        ("/v1/tags", {"top_k": 51}),  # over top_k_limit
        ("/v1/tags", {"min_score": 2}),
    ]
    for path, params in bad_params:
        assert_envelope(deployment.post(path, ok, params=params), 400, "bad_request")
    assert_envelope(deployment.post("/v1/detect", ok, params={"timeout_ms": 1}), 504, "timeout")


def test_readiness_and_metrics_describe_both_models(deployment: Deployment) -> None:
    data = noise_image(40, 30, seed=7)
    for path in ("/v1/detect", "/v1/tags"):  # a model call each, whichever tests ran before
        assert deployment.post(path, data).status_code == 200
    checks = deployment.ready()
    for name in ("detector", "tagger"):
        model = checks[name]
        assert (model["model"], model["alias"], model["version"]) == (name, "production", 1)
        assert (model["backend"], model["runtime"]) == ("auto", "onnx")
        assert model["providers"] == {"model": ["CPUExecutionProvider"]}  # auto, on a CPU-only machine
        assert model["loaded_at"] and model["last_load_error"] is None
        assert deployment.metric("snap2caption_model_info", model=name, version="1") == 1
        runtime = {"model": name, "version": "1", "runtime": "onnx", "session": "model"}
        cpu = {"provider": "CPUExecutionProvider", "providers": "CPUExecutionProvider"}
        assert deployment.metric("snap2caption_model_runtime_info", **runtime, **cpu) == 1
        assert deployment.metric("snap2caption_queue_depth", model=name) == 0
        assert (deployment.metric("snap2caption_inference_seconds_count", model=name) or 0) > 0
    assert checks["detector"]["domain"] is None  # this artifact has no domain model


def test_torch_backend_gives_the_same_results(tight: Deployment) -> None:
    data = noise_image(64, 40, seed=5)
    detect = tight.post("/v1/detect", data)
    assert detect.status_code == 200, detect.text
    assert detect.json()["model"]["backend"] == "torch"
    assert_same_objects(detect.json()["results"][0]["objects"], tight.expected_objects(data))
    tags = tight.post("/v1/tags", data)
    assert tags.status_code == 200, tags.text
    assert tags.json()["model"]["backend"] == "torch"
    assert_same_tags(tags.json()["results"][0]["tags"], tight.expected_tags(data))
    assert {m["runtime"] for m in tight.ready().values()} == {"torch"}
    assert [m["providers"] for m in tight.ready().values()] == [{}, {}]  # no ONNX Runtime session
    assert tight.metric("snap2caption_model_runtime_info", model="detector", runtime="torch", session="") == 1


def test_a_full_queue_answers_503_with_retry_after(tight: Deployment) -> None:
    """Queue of one image; a batch waits a second to fill: the request behind the first is refused.

    The second request must arrive within that second. On cores too busy for that it is simply answered
    (200) and the pair is tried again, so only a service that never refuses fails this test.
    """
    data = noise_image(40, 40, seed=6)

    async def pair(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        first = asyncio.create_task(client.post("/v1/detect", content=data))
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(tight.metric, "snap2caption_queue_depth", model="detector")) != 1:
            assert time.monotonic() < deadline, "the first request never queued"
            await asyncio.sleep(0.02)
        second = await client.post("/v1/detect", content=data)
        return await first, second

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=tight.service.url, timeout=30) as client:
            first, second = await pair(client)
            while second.status_code == 200 and time.monotonic() < deadline:
                first, second = await pair(client)
            return first, second

    first, second = asyncio.run(scenario())
    assert "queue full" in assert_envelope(second, 503, "overloaded")
    assert second.headers["retry-after"] == "2"
    assert first.status_code == 200, first.text
    assert_same_objects(first.json()["results"][0]["objects"], tight.expected_objects(data))
    assert (
        tight.metric("snap2caption_batcher_rejected_total", model="detector", reason="overloaded") or 0
    ) >= 1


def test_analyze_answers_what_detect_and_tags_answer_from_one_call(deployment: Deployment) -> None:
    images = [noise_image(50 + 9 * i, 70 - 6 * i, seed=40 + i, fmt="JPEG" if i else "PNG") for i in range(3)]
    files = [("files", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
    params = {"conf": 0.3, "max_det": 7, "top_k": 3, "min_score": 0.01}
    response = deployment.post("/v1/analyze", files=files, params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"tags", "objects"}
    objects = deployment.post("/v1/detect", files=files, params={"conf": 0.3, "max_det": 7}).json()
    tags = deployment.post("/v1/tags", files=files, params={"top_k": 3, "min_score": 0.01}).json()
    for got, alone in ((body["objects"], objects), (body["tags"], tags)):
        assert set(got) == set(alone) and set(got["timings"]) == set(alone["timings"])
        assert (got["model"], got["options"]) == (alone["model"], alone["options"])
        for result, result_alone in zip(got["results"], alone["results"], strict=True):
            assert set(result) == set(result_alone)
            assert (result["index"], result["filename"], result["image"]) == (
                result_alone["index"],
                result_alone["filename"],
                result_alone["image"],
            )
    for i, data in enumerate(images):
        assert_same_objects(
            body["objects"]["results"][i]["objects"],
            deployment.expected_objects(data, conf=0.3, max_det=7),
        )
        assert_same_tags(
            body["tags"]["results"][i]["tags"], deployment.expected_tags(data, top_k=3, min_score=0.01)
        )


def test_analyze_answers_only_the_features_asked_for(deployment: Deployment) -> None:
    data = noise_image(60, 45, seed=8)
    tags_only = deployment.post("/v1/analyze", data, params={"features": "tags", "top_k": 2})
    assert tags_only.status_code == 200, tags_only.text
    assert set(tags_only.json()) == {"tags"}
    assert_same_tags(tags_only.json()["tags"]["results"][0]["tags"], deployment.expected_tags(data, top_k=2))
    objects_only = deployment.post("/v1/analyze", data, params={"features": " objects "})
    assert objects_only.status_code == 200, objects_only.text
    assert set(objects_only.json()) == {"objects"}
    assert_same_objects(
        objects_only.json()["objects"]["results"][0]["objects"], deployment.expected_objects(data)
    )
    both = deployment.post("/v1/analyze", data, params={"features": "objects,tags"})
    assert set(both.json()) == {"tags", "objects"}


def test_analyze_refuses_bad_input_with_one_error(deployment: Deployment) -> None:
    ok = noise_image(40, 30, seed=9)
    for features in ("captions", "tags,boxes", "", ","):
        message = assert_envelope(
            deployment.post("/v1/analyze", ok, params={"features": features}), 400, "bad_request"
        )
        assert "tags,objects" in message
    assert "empty body" in assert_envelope(deployment.post("/v1/analyze", b""), 400, "bad_request")
    assert_envelope(deployment.post("/v1/analyze", b"%PDF-1.7 not an image"), 415, "unsupported_format")
    assert_envelope(deployment.post("/v1/analyze", ok[:60]), 422, "corrupt_image")
    mixed = [("files", ("ok.png", ok)), ("files", ("bad.gif", b"GIF89a"))]
    assert assert_envelope(deployment.post("/v1/analyze", files=mixed), 422, "corrupt_image").startswith(
        "image 1:"
    )
    for params in ({"top_k": 51}, {"max_det": 301}, {"conf": 1.5}, {"min_score": -1}):
        assert_envelope(deployment.post("/v1/analyze", ok, params=params), 400, "bad_request")
    assert_envelope(deployment.post("/v1/analyze", ok, params={"timeout_ms": 1}), 504, "timeout")

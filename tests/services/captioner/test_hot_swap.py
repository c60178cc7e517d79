"""Hot model swap on a running captioner: promotions under load, and a tampered version that must not load."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import httpx
import pytest

from snap2caption.models.caption import CaptionModel
from snap2caption.models.tokenizer import CaptionTokenizer
from tests.helpers import wait_for
from tests.services.captioner.conftest import COLOURS, MODEL, Deployment, image_bytes

pytestmark = pytest.mark.integration

Answer = tuple[int, int, str]  # (status, version, caption or error body)


async def keep_asking(url: str, colours: list[str], stop: asyncio.Event) -> list[list[tuple[str, Answer]]]:
    """Closed-loop clients, one per colour, asking until ``stop`` is set; every answer, in order."""

    async def client_loop(client: httpx.AsyncClient, colour: str) -> list[tuple[str, Answer]]:
        answers: list[tuple[str, Answer]] = []
        body = image_bytes(colour)
        while not stop.is_set():
            response = await client.post("/v1/caption", content=body, headers={"content-type": "image/png"})
            if response.status_code == 200:
                data = response.json()
                answers.append((colour, (200, data["model"]["version"], data["results"][0]["caption"])))
            else:
                answers.append((colour, (response.status_code, 0, response.text)))
        return answers

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client_loop(client, c) for c in colours))


def serving_version(deployment: Deployment) -> int:
    version = deployment.ready()["version"]
    assert isinstance(version, int)
    return version


def test_promotion_under_load_swaps_without_a_failed_request(
    deployment: Deployment, v2_model: tuple[CaptionModel, CaptionTokenizer]
) -> None:
    before = serving_version(deployment)
    colours = list(itertools.islice(itertools.cycle(COLOURS), 12))
    new_version = 0

    async def scenario() -> list[list[tuple[str, Answer]]]:
        nonlocal new_version
        stop = asyncio.Event()
        load = asyncio.create_task(keep_asking(deployment.service.url, colours, stop))
        await asyncio.sleep(0.5)  # the old version answers under load first
        new_version = await asyncio.to_thread(deployment.register, *v2_model)
        started = time.monotonic()
        while serving_version(deployment) != new_version:
            assert time.monotonic() - started < 20, "the new version never took over"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # and the new one answers under load after
        stop.set()
        return await load

    per_client = asyncio.run(scenario())
    answers = [a for client in per_client for a in client]
    assert len(answers) > 50
    for colour, (status, version, text) in answers:
        assert status == 200, text
        assert text == deployment.expected(version, colour)
    for client in per_client:
        versions = [version for _, (_, version, _) in client]
        assert versions == sorted(versions)  # old ... old, new ... new: never back
        assert versions[0] == before and versions[-1] == new_version
    assert deployment.metric("snap2caption_model_info", model=MODEL, version=str(before)) == 0
    assert deployment.metric("snap2caption_model_info", model=MODEL, version=str(new_version)) == 1


def test_a_tampered_version_never_replaces_the_serving_model(
    deployment: Deployment, v1_model: tuple[CaptionModel, CaptionTokenizer]
) -> None:
    before = serving_version(deployment)
    failures = deployment.metric("snap2caption_model_load_failures_total", model=MODEL) or 0
    tampered = deployment.register(*v1_model, promote=False)
    # Corrupt the registered copy in the artifact store (not the folder it was registered from).
    source = Path(deployment.registry.resolve(MODEL, tampered).source.removeprefix("file://"))
    weights = source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    deployment.promote()

    def load_error() -> dict[str, object] | None:
        error = deployment.ready()["last_load_error"]
        return error if isinstance(error, dict) and error.get("version") == tampered else None

    error = wait_for(load_error, 20, f"/readyz to report the failed load of v{tampered}")
    assert error["error"] == "artifact_integrity"
    assert "model.safetensors" in str(error["message"])
    assert (deployment.metric("snap2caption_model_load_failures_total", model=MODEL) or 0) > failures
    checks = deployment.ready()
    assert checks["version"] == before
    with deployment.service.client() as client:
        response = client.post(
            "/v1/caption", content=image_bytes("red"), headers={"content-type": "image/png"}
        )
    assert response.status_code == 200
    body = response.json()
    assert body["model"]["version"] == before
    assert body["results"][0]["caption"] == deployment.expected(before, "red")
    assert httpx.get(f"{deployment.service.url}/readyz").status_code == 200  # still serving

"""Hot model swap on a running captioner: promotions under load, and a tampered version that must not load."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from tests.helpers import wait_for
from tests.services.captioner.conftest import COLOURS, MODEL, Deployment, image_bytes

pytestmark = pytest.mark.integration

Answer = tuple[int, int, str]  # (status, version, caption or error body)


async def keep_asking(url: str, colours: list[str], answers: list[list[tuple[str, Answer]]]) -> None:
    """Closed-loop clients, one per colour, each appending every answer, in order, to its own list of
    ``answers``, until cancelled."""

    async def client_loop(client: httpx.AsyncClient, colour: str, mine: list[tuple[str, Answer]]) -> None:
        body = image_bytes(colour)
        while True:
            response = await client.post("/v1/caption", content=body, headers={"content-type": "image/png"})
            if response.status_code == 200:
                data = response.json()
                mine.append((colour, (200, data["model"]["version"], data["results"][0]["caption"])))
            else:
                mine.append((colour, (response.status_code, 0, response.text)))

    answers[:] = [[] for _ in colours]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(client_loop(client, c, a) for c, a in zip(colours, answers, strict=True)))


def serving_version(deployment: Deployment) -> int:
    version = deployment.ready()["version"]
    assert isinstance(version, int)
    return version


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll ``condition`` (each poll off the event loop, where the clients run) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def test_promotion_under_load_swaps_without_a_failed_request(
    deployment: Deployment, v2_model: tuple[CaptionModel, CaptionTokenizer]
) -> None:
    before = serving_version(deployment)
    colours = list(itertools.islice(itertools.cycle(COLOURS), 12))
    per_client: list[list[tuple[str, Answer]]] = []

    def every_client_saw(version: int) -> bool:
        return len(per_client) == len(colours) and all(
            any(answer[1] == version for _, answer in mine) for mine in per_client
        )

    async def scenario() -> int:
        load = asyncio.create_task(keep_asking(deployment.service.url, colours, per_client))
        # Events, not sleeps: every client is answered by the old version under load first, the swap
        # happens while they keep asking, and every client is answered by the new one after.
        await until(lambda: every_client_saw(before), f"every client to get v{before}")
        new_version = await asyncio.to_thread(deployment.register, *v2_model)
        await until(lambda: serving_version(deployment) == new_version, f"v{new_version} to take over")
        await until(lambda: every_client_saw(new_version), f"every client to get v{new_version}")
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        return new_version

    new_version = asyncio.run(scenario())
    for colour, (status, version, text) in (a for mine in per_client for a in mine):
        assert status == 200, text
        assert text == deployment.expected(version, colour)
    for mine in per_client:
        versions = [version for _, (_, version, _) in mine]
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

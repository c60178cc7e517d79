"""ModelStore: load by alias, swap only after warm-up, keep the old model when a load fails.

A stand-in registry (resolve/download like ``snap2caption.registry.Registry``) lets these tests move
the alias and break versions without MLflow; the real registry is exercised by the captioner tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from snap2caption.errors import ArtifactIntegrityError, NotReady
from snap2caption.registry import ModelNotFoundError, ModelVersionInfo
from snap2caption.serving import ModelStore


class FakeRegistry:
    """``alias`` -> version; versions in ``tampered`` fail their download like a hash mismatch."""

    def __init__(self, version: int | None = 1) -> None:
        self.version = version
        self.tampered: set[int] = set()
        self.downloads: list[int] = []

    def info(self, version: int) -> ModelVersionInfo:
        return ModelVersionInfo(
            name="m", version=version, aliases=(), metrics={}, tags={}, run_id=None, source="",
            status="READY", created=dt.datetime.now(dt.UTC),
        )  # fmt: skip

    def resolve(self, name: str, ref: str | int) -> ModelVersionInfo:
        if self.version is None:
            raise ModelNotFoundError(f"{name} has no alias {ref!r}")
        return self.info(self.version)

    def download(self, name: str, ref: str | int, dst: str | Path) -> tuple[Path, ModelVersionInfo]:
        version = int(ref)
        self.downloads.append(version)
        if version in self.tampered:
            raise ArtifactIntegrityError(f"{name} v{version}: model.safetensors does not match the manifest")
        return Path(dst) / name / f"v{version}", self.info(version)


class Model:
    def __init__(self, version: int) -> None:
        self.version = version
        self.warmed = False


def make_store(registry: FakeRegistry, name: str, tmp_path: Path, **kwargs: Any) -> ModelStore[Model]:
    def warmup(model: Model) -> None:
        model.warmed = True

    options: dict[str, Any] = {"poll_interval_s": 30.0, "warmup": warmup, **kwargs}
    return ModelStore(
        name,
        "production",
        loader=lambda path, info: Model(info.version),
        source_factory=lambda: registry,
        cache_dir=tmp_path,
        **options,
    )


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(test(), 10))


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_loads_the_alias_then_swaps_when_it_moves(tmp_path: Path) -> None:
    registry = FakeRegistry(1)
    store = make_store(registry, "s-swap", tmp_path)

    async def scenario() -> None:
        with pytest.raises(NotReady):
            store.get()
        assert await store.refresh_now()
        first = store.get()
        assert (first.version, first.model.warmed, first.path) == (1, True, tmp_path / "s-swap" / "v1")
        assert not await store.refresh_now()  # alias unchanged: nothing to do
        registry.version = 2
        assert await store.refresh_now()
        assert store.get().version == 2 and store.get().model.warmed
        assert first.model.version == 1  # a batch that started on v1 still holds v1

    run(scenario)
    assert registry.downloads == [1, 2]
    assert metric("snap2caption_model_info", model="s-swap", version="2") == 1
    assert metric("snap2caption_model_info", model="s-swap", version="1") == 0
    status = store.status()
    assert status["version"] == 2 and status["last_load_error"] is None


def test_the_old_model_serves_until_the_new_one_is_warm(tmp_path: Path) -> None:
    registry = FakeRegistry(1)
    release = threading.Event()
    warming = threading.Event()

    def slow_warmup(model: Model) -> None:
        if model.version == 2:
            warming.set()
            assert release.wait(5)
        model.warmed = True

    store = make_store(registry, "s-warm", tmp_path, warmup=slow_warmup, poll_interval_s=0.01)

    async def scenario() -> None:
        store.start()
        while store.current is None:
            await asyncio.sleep(0.01)
        registry.version = 2
        while not warming.is_set():
            await asyncio.sleep(0.01)
        assert store.get().version == 1  # v2 is loaded but not warm: v1 still serves
        release.set()
        while store.get().version != 2:
            await asyncio.sleep(0.01)
        assert store.get().model.warmed
        await store.close()

    run(scenario)


def test_a_tampered_version_never_replaces_the_good_model(tmp_path: Path) -> None:
    registry = FakeRegistry(1)
    store = make_store(registry, "s-bad", tmp_path, poll_interval_s=5.0)
    failures = "snap2caption_model_load_failures_total"

    async def scenario() -> None:
        await store.refresh_now()
        assert metric(failures, model="s-bad") == 0
        registry.version = 2
        registry.tampered.add(2)
        assert not await store.refresh_now()
        assert store.get().version == 1
        error = store.status()["last_load_error"]
        assert error["version"] == 2 and error["error"] == "artifact_integrity"
        assert "manifest" in error["message"] and error["attempts"] == 1
        assert not await store.refresh_now()  # backing off: no second download straight away
        assert registry.downloads == [1, 2]
        registry.version = 1  # rolled back to what serves: the error is history
        assert not await store.refresh_now()
        assert store.status()["last_load_error"] is None

    run(scenario)
    assert metric(failures, model="s-bad") == 1
    assert metric("snap2caption_model_info", model="s-bad", version="1") == 1


def test_a_broken_loader_keeps_the_old_model_too(tmp_path: Path) -> None:
    registry = FakeRegistry(1)

    def loader(path: Path, info: ModelVersionInfo) -> Model:
        if info.version == 2:
            raise ValueError("invalid caption config: decoder.n_embd (30) must be divisible by n_head (4)")
        return Model(info.version)

    store = ModelStore(
        "s-config", "production", loader=loader, source_factory=lambda: registry, cache_dir=tmp_path
    )

    async def scenario() -> None:
        await store.refresh_now()
        registry.version = 2
        await store.refresh_now()

    run(scenario)
    assert store.get().version == 1
    assert store.status()["last_load_error"]["error"] == "ValueError"


def test_not_ready_until_the_alias_exists_then_loads_by_itself(tmp_path: Path) -> None:
    registry = FakeRegistry(None)
    store = make_store(registry, "s-late", tmp_path, poll_interval_s=0.02)

    async def scenario() -> None:
        store.start()
        while store.status()["last_poll_error"] is None:  # the first poll resolves on a worker thread
            await asyncio.sleep(0.01)
        with pytest.raises(NotReady, match="not loaded"):
            store.get()
        assert "no alias" in store.status()["last_poll_error"]
        registry.version = 3
        while store.current is None:
            await asyncio.sleep(0.01)
        assert store.status()["last_poll_error"] is None
        await store.close()

    run(scenario)
    assert store.get().version == 3

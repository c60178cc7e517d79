"""ModelLane: a batch runs whole on the model current at its start, and only the items prepared for
another model's input spec are prepared again (the redo-after-swap rule every model service shares)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import REGISTRY

from snap2caption.serving import LoadedModel
from snap2caption.serving.lane import ModelLane
from snap2caption.serving.settings import ModelServiceSettings
from tests.snap2caption.serving.test_model_store import FakeRegistry, run


@dataclass
class Model:
    """Version v wants inputs made with spec ``v % 2`` (v1 and v3 alike, v2 another size)."""

    version: int
    runtime: str = "numpy"
    providers: dict[str, list[str]] = field(default_factory=lambda: {"model": ["FakeProvider", "Fallback"]})


@dataclass(frozen=True)
class Item:
    data: bytes
    spec: int
    pixels: str


def prepare(data: bytes, spec: int) -> Item:
    return Item(data, spec, f"{data.decode()}@{spec}")


def test_items_made_for_a_swapped_out_model_are_prepared_again(tmp_path: Path) -> None:
    registry = FakeRegistry(1)
    redone: list[bytes] = []
    batches: list[tuple[int, list[Item]]] = []

    def redo(item: Item, spec: int) -> Item:
        redone.append(item.data)
        return prepare(item.data, spec)

    def batch_fn(loaded: LoadedModel[Model], items: list[Item], key: Hashable) -> list[str]:
        batches.append((loaded.version, items))
        return [f"v{loaded.version}:{item.pixels}" for item in items]

    lane: ModelLane[Model, int, Item, str] = ModelLane(
        "lane-redo",
        "production",
        "auto",
        loader=lambda folder, info: Model(info.version),
        warmup=lambda model: None,
        spec=lambda model: model.version % 2,
        redo=redo,
        batch_fn=batch_fn,
        settings=ModelServiceSettings(model_cache_dir=tmp_path, poll_interval_s=30, max_wait_ms=0),
        source_factory=lambda: registry,
    )

    async def scenario() -> list[list[str]]:
        lane.batcher.start()  # the store moves only when told (refresh_now), not on a watcher's clock
        try:
            assert await lane.store.refresh_now()
            loaded, spec = lane.current()
            assert (loaded.version, spec) == (1, 1)
            made_for_v1 = [prepare(b"a", spec), prepare(b"b", spec)]
            registry.version = 2  # the alias moves while the request waits
            assert await lane.store.refresh_now()
            first = await lane.batcher.submit(made_for_v1)
            made_for_v2 = [prepare(b"c", lane.current()[1])]
            second = await lane.batcher.submit(made_for_v2)
            registry.version = 3  # another size again, but the same spec as v1
            assert await lane.store.refresh_now()
            third = await lane.batcher.submit([prepare(b"d", 1)])
            return [first.outputs, second.outputs, third.outputs]
        finally:
            await lane.close(1)

    outputs = run(scenario)
    assert outputs == [["v2:a@0", "v2:b@0"], ["v2:c@0"], ["v3:d@1"]]
    assert redone == [b"a", b"b"]  # only the items made for another spec
    assert [(version, [item.spec for item in items]) for version, items in batches] == [
        (2, [0, 0]),
        (2, [0]),
        (3, [1]),
    ]
    status = lane.status()
    assert (status["backend"], status["runtime"], status["version"]) == ("auto", "numpy", 3)
    assert status["providers"] == {"model": ["FakeProvider", "Fallback"]}

    def runtime_info(version: int) -> float | None:
        labels = {"model": "lane-redo", "version": str(version), "runtime": "numpy", "session": "model"}
        labels |= {"provider": "FakeProvider", "providers": "FakeProvider,Fallback"}
        return REGISTRY.get_sample_value("snap2caption_model_runtime_info", labels)

    assert (runtime_info(2), runtime_info(3)) == (0.0, 1.0)  # only the version serving now

"""One real captioner process for the folder, serving tiny models from a temporary MLflow registry.

The models are tiny caption models overfitted in a second to say a known caption for each solid colour,
so a wrong caption (an image answered with another request's caption, a stale version) is visible.
Tests find what to expect with :meth:`Deployment.expected`, for whichever version answered, so they
hold in any order even though the hot-swap tests move the alias.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from snap2caption.imaging import decode_image
from snap2caption.manifest import write_manifest
from snap2caption.models.caption.artifact import save_caption_model
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.model import CaptionModel, build_caption_model
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from snap2caption.models.domain import DomainModel
from snap2caption.registry import Registry
from tests.helpers import COLOURS, ServiceProcess, image_bytes, torch_threads

TINY_CONFIG = Path(__file__).resolve().parents[3] / "training" / "configs" / "caption" / "tiny.yaml"
CAPTIONS = [
    "a red circle",
    "a blue square",
    "two green triangles",
    "a yellow star",
    "a white cloud",
    "a black cat",
]
IMAGE_MAX_SIDE = 256  # recorded in the artifacts, so the service must read it from there
MODEL = "captioner"


def train_tiny(captions: list[str], seed: int, steps: int = 80) -> tuple[CaptionModel, CaptionTokenizer]:
    """A tiny caption model that says ``captions[i]`` for the i-th colour of COLOURS."""
    torch.manual_seed(seed)
    config = CaptionConfig.from_yaml(TINY_CONFIG)
    model, tokenizer = build_caption_model(config, captions=captions * 3)
    images = [decode_image(image_bytes(c)).image for c in COLOURS]
    pixels = torch.from_numpy(model.preprocess.batch(images))
    ids, mask = tokenizer.batch_encode(captions, config.tokenizer.max_caption_tokens)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(ids, mask, pixels=pixels).loss
        assert loss is not None
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), tokenizer


@dataclass
class Deployment:
    """The running service, its registry, and the models behind each registered version."""

    service: ServiceProcess
    registry: Registry
    workdir: Path
    models: dict[int, CaptionModel] = field(default_factory=dict)
    _cider: float = 1.0
    _expected: dict[tuple[int, str], str] = field(default_factory=dict)

    def register(
        self,
        model: CaptionModel,
        tokenizer: CaptionTokenizer,
        *,
        promote: bool = True,
        domain: DomainModel | None = None,
    ) -> int:
        """Save (with ``domain`` as its domain model, if given), register (with a better gate metric than
        any before) and, by default, promote."""
        self._cider += 0.5
        folder = save_caption_model(
            model,
            tokenizer,
            self.workdir / f"artifact-{self._cider}",
            extra={"image_max_side": IMAGE_MAX_SIDE},
        )
        if domain is not None:
            domain.save(folder)
            write_manifest(folder)
        version = self.registry.register(MODEL, folder, metrics={"test_cider_d": self._cider}).version
        self.models[version] = model
        if promote:
            self.promote()
        return version

    def promote(self) -> None:
        result = self.registry.promote(MODEL)
        assert result.status == "promoted", result.message

    def expected(self, version: int, colour: str, num_beams: int = 1) -> str:
        """What the model of ``version`` says for ``colour``, called directly (no service, no batching)."""
        key = (version, f"{colour}/{num_beams}")
        if key not in self._expected:
            model = self.models[version]
            image = decode_image(image_bytes(colour), max_side=IMAGE_MAX_SIDE).image
            pixels = torch.from_numpy(model.preprocess.batch([image]))
            self._expected[key] = model.generate(pixels, num_beams=num_beams)[0].text
        return self._expected[key]

    def ready(self) -> dict[str, object]:
        """``/readyz``'s checks (whatever the status)."""
        body = httpx.get(f"{self.service.url}/readyz", timeout=5).json()
        return body.get("checks") or body["error"]["details"]["checks"]

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample from ``/metrics``, or None when absent."""
        for line in httpx.get(f"{self.service.url}/metrics", timeout=5).text.splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
                return float(value)
        return None


@pytest.fixture(scope="session")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):  # tiny tensors; processes share the cores
        yield


@pytest.fixture(scope="session")
def v1_model(_one_thread: None) -> tuple[CaptionModel, CaptionTokenizer]:
    return train_tiny(CAPTIONS, seed=1)


@pytest.fixture(scope="session")
def v2_model(_one_thread: None) -> tuple[CaptionModel, CaptionTokenizer]:
    """Says the caption of the next colour: a swap to it shows in every answer."""
    return train_tiny(CAPTIONS[1:] + CAPTIONS[:1], seed=2)


@pytest.fixture(scope="session")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_template_db: Path,
    v1_model: tuple[CaptionModel, CaptionTokenizer],
) -> Iterator[Deployment]:
    """A captioner serving ``models:/captioner@production`` (v1 at first), polling the alias every 0.3 s."""
    workdir = tmp_path_factory.mktemp("captioner")
    db = workdir / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    registry = Registry(uri)
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "SNAP2CAPTION_HOME": str(workdir / "home"),
        "SNAP2CAPTION_CAPTIONER_MODEL_CACHE_DIR": str(workdir / "cache"),
        "SNAP2CAPTION_CAPTIONER_POLL_INTERVAL_S": "0.3",
        "SNAP2CAPTION_CAPTIONER_MAX_WAIT_MS": "10",
        "SNAP2CAPTION_CAPTIONER_MAX_BODY_BYTES": str(2_000_000),
        "SNAP2CAPTION_CAPTIONER_MAX_IMAGE_PIXELS": str(1_000_000),
    }
    service = ServiceProcess("captioner", workdir / "captioner.log", env=env, cwd=workdir)
    deployment = Deployment(service, registry, workdir)
    deployment.register(*v1_model)
    service.start(ready_timeout_s=120)
    yield deployment
    service.stop()

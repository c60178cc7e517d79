"""The captioner service answers whether each image is inside its model's training domain (issue 13):
``in_domain`` and ``domain_score`` per caption from the artifact's domain model, and ``/readyz`` says
whether the serving model has one. Older artifacts (every other test's) answer ``null``."""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image

from snap2caption.models.caption.domain import DOMAIN_FEATURE, pooled_prefix
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from snap2caption.models.domain import fit_domain
from tests.helpers import COLOURS, image_bytes
from tests.services.captioner.conftest import Deployment
from tests.services.captioner.test_caption_api import caption


def noisy_colours(n: int, seed: int) -> list[Image.Image]:
    """In-domain images for the tiny models: the solid colours they learned, with a little pixel noise."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS.values())
    images = []
    for i in range(n):
        base = np.array(colours[i % len(colours)], dtype=np.float64)
        pixels = base + rng.normal(0, 6, size=(72, 96, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def pooled(model: CaptionModel, images: list[Image.Image]) -> np.ndarray:
    with torch.inference_mode():
        prefix = model.encode(torch.from_numpy(model.preprocess.batch(images)))
    return pooled_prefix(prefix.numpy())


def photo_like(seed: int) -> bytes:
    """A busy, textured image (smooth gradients plus coarse noise): nothing like a solid colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:72, 0:96]
    pixels = np.stack([x * 2.5, y * 3.0, (x + y) * 1.5], axis=-1) + rng.normal(0, 40, size=(72, 96, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_captions_carry_the_domain_answer_of_a_model_with_a_domain_model(
    deployment: Deployment, v1_model: tuple[CaptionModel, CaptionTokenizer]
) -> None:
    before = deployment.ready()
    assert before["domain"] == {"present": False}  # the other tests' artifacts have none
    model, tokenizer = v1_model
    domain = fit_domain(
        pooled(model, noisy_colours(120, seed=0)),
        pooled(model, noisy_colours(120, seed=1)),
        feature=DOMAIN_FEATURE,
        extra={"test_rejection_rate": 0.0},
    )
    version = deployment.register(model, tokenizer, domain=domain)
    deadline = time.monotonic() + 60
    while deployment.ready().get("version") != version:
        assert time.monotonic() < deadline, "the new version was not loaded"
        time.sleep(0.2)
    checks = deployment.ready()
    assert checks["domain"] == {
        "present": True,
        "feature": DOMAIN_FEATURE,
        "false_rejection_rate": 0.02,
        "test_rejection_rate": 0.0,
        "n_fit": 120,
        "n_calibration": 120,
    }

    response = caption(deployment, image_bytes("red"))
    assert response.status_code == 200, response.text
    body = response.json()
    [result] = body["results"]
    assert body["model"]["version"] == version
    assert result["in_domain"] is True and 0.02 < result["domain_score"] <= 1.0
    assert result["caption"] == deployment.expected(version, "red")  # the caption is unchanged
    response = caption(deployment, photo_like(seed=3))
    [result] = response.json()["results"]
    assert result["in_domain"] is False and result["domain_score"] <= 0.02

"""The captioner knows its training domain (issue 13): training writes ``domain.json`` + ``domain.npz`` into
the artifact (covered by its manifest, checked on load), both runtimes answer ``in_domain`` and
``domain_score`` per image, held-out synthetic scenes are accepted at the stated rate and real photos
(scikit-image's, offline) are not, so their shape captions never become alt text.

One tiny run (frozen 3-conv encoder, so the features are cached as in the starter preset) on a synthetic
dataset large enough to calibrate and to test the rate: 2,500 scenes at 64 px, 40% of them in ``val``
(calibration) and 40% in ``test`` (held out: neither fitted nor calibrated on).
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snap2caption.alt_text import make_alt_text
from snap2caption.data.synth.scene import COLOURS, PLURALS, SHAPES
from snap2caption.errors import ArtifactError, ArtifactIntegrityError
from snap2caption.imaging import decode_image
from snap2caption.manifest import write_manifest
from snap2caption.models import caption
from snap2caption.models.caption.domain import DOMAIN_FEATURE
from snap2caption.models.domain import DEFAULT_FALSE_REJECTION_RATE, DOMAIN_ARRAYS_FILE, DOMAIN_FILE
from tests.training.caption.conftest import new_registry, tiny_run
from training.caption.data import SplitData
from training.caption.run import RunResult, train_caption

SHAPE_WORDS = {*COLOURS, *SHAPES, *PLURALS.values()}
# scikit-image's real photographs that load without a download (pooch): everyday scenes, grey ones,
# microscopy, astronomy and textures. Not the drawings (logo, horse silhouette, colour wheel).
EVERYDAY_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "stereo_motorcycle")
OTHER_PHOTOS = (
    "hubble_deep_field", "immunohistochemistry", "retina", "moon", "coins", "grass", "gravel", "brick",
    "page", "text", "clock", "cell", "microaneurysms",
)  # fmt: skip


def real_photo(name: str) -> bytes:
    """One of scikit-image's bundled photos as PNG bytes (the first view of a stereo pair)."""
    from skimage import data

    array = getattr(data, name)()
    if isinstance(array, tuple):
        array = array[0]
    array = np.asarray(array)
    if array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = (255 * (array.astype(np.float64) - low) / max(high - low, 1e-9)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[..., :3] if array.ndim == 3 else array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def domain_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from snap2caption.data.etl import EtlConfig, run_etl
    from snap2caption.data.synth import SynthConfig, write_synth

    root = tmp_path_factory.mktemp("domain_data")
    write_synth(root / "synth", SynthConfig(images=2500, seed=5, image_size=64, workers=1), progress=False)
    out = root / "processed"
    run_etl(
        EtlConfig(
            source="coco",
            images=root / "synth" / "images",
            annotations=[root / "synth" / "annotations" / "captions.json"],
            out=out,
            val_fraction=0.4,
            test_fraction=0.4,
            workers=1,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def domain_run(
    domain_data: Path, mlflow_template_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunResult, str]]:
    folder = tmp_path_factory.mktemp("domain_run")
    registry = new_registry(mlflow_template_db, folder / "mlflow")
    config = tiny_run(
        domain_data,
        folder / "run",
        "max_steps=30",
        "model.encoder.trainable=none",  # frozen: cached features, as the starter preset trains
        ("run.tracking_uri", registry.tracking_uri),
        "run.register=false",
    )
    yield train_caption(config), registry.tracking_uri


def captions_of(
    captioner: caption.Captioner, images: list[bytes], max_new_tokens: int | None = None
) -> list[caption.Caption]:
    """The runtime's captions of encoded images, decoded and preprocessed as the captioner service does."""
    side = captioner.image_max_side or 512
    out: list[caption.Caption] = []
    for start in range(0, len(images), 64):
        chunk = images[start : start + 64]
        pixels = np.stack([captioner.preprocess(decode_image(b, max_side=side).image) for b in chunk])
        out += captioner.generate(pixels, max_new_tokens=max_new_tokens)
    return out


def test_training_writes_the_domain_into_the_artifact_its_manifest_the_summary_and_mlflow(
    domain_run: tuple[RunResult, str], domain_data: Path
) -> None:
    from mlflow import MlflowClient

    result, tracking_uri = domain_run
    artifact = result.artifact_dir
    listed = json.loads((artifact / "MANIFEST.json").read_text())["files"]
    assert {DOMAIN_FILE, DOMAIN_ARRAYS_FILE} <= set(listed)
    info = json.loads((artifact / DOMAIN_FILE).read_text())
    val, test = SplitData.load(domain_data, "val"), SplitData.load(domain_data, "test")
    train = SplitData.load(domain_data, "train")
    assert info["feature"] == DOMAIN_FEATURE and info["false_rejection_rate"] == DEFAULT_FALSE_REJECTION_RATE
    assert (info["n_fit"], info["n_calibration"]) == (len(train), len(val))
    assert info["extra"]["n_test"] == len(test) and info["extra"]["calibration_split"] == "val"
    rate = info["extra"]["test_rejection_rate"]
    assert 0.0 <= rate <= 0.05
    summary = json.loads((result.out_dir / "metrics.json").read_text())["domain"]
    assert summary["test_rejection_rate"] == rate and summary["n_fit"] == len(train)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.metrics["domain_test_rejection_rate"] == pytest.approx(rate)
    assert run.data.metrics["domain_n_calibration"] == len(val)


def test_the_false_rejection_rate_is_a_train_setting(
    domain_run: tuple[RunResult, str], domain_data: Path, tmp_path: Path
) -> None:
    """``train.domain_false_rejection_rate`` (0.01 in the starter) is the rate the artifact is calibrated
    to; the same calibration images at a lower rate reject no more of themselves than the rate allows."""
    config = tiny_run(
        domain_data,
        tmp_path / "run",
        "max_steps=30",
        "model.encoder.trainable=none",
        "run.mlflow=false",
        "run.register=false",
        "train.domain_false_rejection_rate=0.01",
    )
    result = train_caption(config)
    info = json.loads((result.artifact_dir / DOMAIN_FILE).read_text())
    assert info["false_rejection_rate"] == 0.01
    assert info["n_calibration"] == len(SplitData.load(domain_data, "val"))
    assert info["calibration_rejection_rate"] <= 0.01  # conformal: at most floor(alpha * (n + 1) - 1) of n
    summary = json.loads((result.out_dir / "metrics.json").read_text())["domain"]
    assert summary["false_rejection_rate"] == 0.01
    default = json.loads((domain_run[0].artifact_dir / DOMAIN_FILE).read_text())
    assert default["false_rejection_rate"] == DEFAULT_FALSE_REJECTION_RATE


def test_a_tampered_or_half_domain_model_fails_the_load_and_none_is_a_legacy_artifact(
    domain_run: tuple[RunResult, str], tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(domain_run[0].artifact_dir, folder)
    path = folder / DOMAIN_FILE
    original = path.read_text()
    path.write_text(original.replace('"false_rejection_rate": 0.02', '"false_rejection_rate": 0.5'))
    for runtime in ("torch", "onnx"):
        with pytest.raises(ArtifactIntegrityError, match=r"domain\.json was modified"):
            caption.load(folder, runtime)
    path.write_text(original)
    (folder / DOMAIN_ARRAYS_FILE).unlink()
    write_manifest(folder)  # consistent manifest, inconsistent model: still refused
    with pytest.raises(ArtifactError, match="must come together"):
        caption.load(folder, "onnx")
    path.unlink()
    write_manifest(folder)  # an artifact from before domain models: loads, answers None
    legacy = caption.load(folder, "onnx")
    assert legacy.domain is None
    (answer,) = captions_of(legacy, [real_photo("chelsea")])
    assert answer.in_domain is None and answer.domain_score is None


@pytest.fixture(scope="module")
def served(domain_run: tuple[RunResult, str]) -> dict[str, caption.Captioner]:
    folder = domain_run[0].artifact_dir
    return {runtime: caption.load(folder, runtime) for runtime in ("onnx", "torch")}


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_held_out_synthetic_scenes_are_in_domain_at_the_stated_rate(
    served: dict[str, caption.Captioner], domain_data: Path, runtime: str
) -> None:
    """The test split (1,044 scenes with this seed) was neither fitted nor calibrated on.

    Why 95% cannot fail by chance: with n = 959 calibration images (the val split) at alpha = 0.02 the
    threshold is the 19th largest calibration distance, so the true rejection rate of a fresh in-domain
    image is Beta(19, 941)-distributed (mean 0.02), and the rejections among m = 1,044 test images are
    beta-binomial: P(more than 52, 5%, rejected) = 6.4e-5 (scipy.stats.betabinom.sf(52, 1044, 19, 941)).
    With a fixed p = 0.02 and only 100 test images P(more than 5) would be 0.016: too likely.
    """
    test = SplitData.load(domain_data, "test")
    assert len(test) >= 900
    # The domain answer does not depend on the caption's length: two tokens keep the test short.
    answers = captions_of(served[runtime], [p.read_bytes() for p in test.paths], max_new_tokens=2)
    accepted = sum(a.in_domain is True for a in answers) / len(answers)
    assert accepted >= 0.95, f"{runtime}: {accepted:.3f} of held-out synthetic scenes in domain"
    assert all(a.domain_score is not None and 0.0 < a.domain_score <= 1.0 for a in answers)


def test_real_photos_are_outside_the_domain_and_their_captions_never_become_alt_text(
    served: dict[str, caption.Captioner],
) -> None:
    everyday = [real_photo(name) for name in EVERYDAY_PHOTOS]
    others = [real_photo(name) for name in OTHER_PHOTOS]
    scores: dict[str, list[float]] = {}
    for runtime, captioner in served.items():
        answers = captions_of(captioner, everyday)
        caught = [a.in_domain is False for a in answers]
        assert all(caught), (
            f"{runtime}: everyday photos let in: {np.array(EVERYDAY_PHOTOS)[~np.array(caught)]}"
        )
        # The rest of scikit-image's photos, textures included: the tiny test model's encoder is a random
        # frozen 3-conv net, so grey textures and microscopy can look like flat synthetic backgrounds to
        # it. Measured with this run: 7 of 13 detected (let in: immunohistochemistry, moon, grass, gravel,
        # clock, microaneurysms); held here so that it cannot get worse unnoticed. (The starter captioner,
        # a pretrained EfficientNet-Lite0, rejects all of them: README.)
        rest = captions_of(captioner, others)
        detected = sum(a.in_domain is False for a in rest)
        assert detected >= 7, f"{runtime}: only {detected} of {len(rest)} other real photos detected"
        scores[runtime] = [a.domain_score or 0.0 for a in answers + rest]
        # Whatever the caption says and however sure it is, it is not alt text for these photos.
        for answer in answers + rest:
            if answer.in_domain is False:
                alt = make_alt_text(
                    answer.text, math.exp(answer.confidence), ["tabby cat"], min_confidence=0.0,
                    caption_in_domain=answer.in_domain,
                )  # fmt: skip
                assert alt is not None and not set(re.findall(r"[a-z]+", alt.text.lower())) & SHAPE_WORDS
    # Both runtimes compute the same feature (the pooled prefix), so the same answers.
    assert scores["onnx"] == pytest.approx(scores["torch"], abs=0.02)


def test_a_trainable_encoder_fits_from_pixels_on_a_capped_sample(
    domain_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without cached features (the encoder trains) the domain features come from the image files, and at
    most ``DOMAIN_FIT_MAX_IMAGES`` training images (a seeded sample) are fitted on."""
    import training.caption.run as run

    monkeypatch.setattr(run, "DOMAIN_FIT_MAX_IMAGES", 200)
    config = tiny_run(domain_data, tmp_path / "run", "max_steps=2", "run.mlflow=false", "run.register=false")
    result = train_caption(config)
    info = json.loads((result.artifact_dir / DOMAIN_FILE).read_text())
    assert info["n_fit"] == 200 and info["n_calibration"] == len(SplitData.load(domain_data, "val"))
    assert info["extra"]["test_rejection_rate"] is not None
    assert DOMAIN_FILE in json.loads((result.artifact_dir / "MANIFEST.json").read_text())["files"]

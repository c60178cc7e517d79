"""The Ray Data backfill on real tiny models from a real MLflow registry, in a real local Ray.

The registry holds the gateway stack's three tiny models (``tests/gateway_stack.py``): a captioner that
says a known caption per solid colour, a random YOLOv8n detector and a six-class tagger, all promoted to
``production``. The input folder holds those colours as PNG and JPEG (one in a subfolder), a truncated
PNG and a text file. One Ray session (2 CPUs, no dashboard) serves the module and is shut down after it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from snap2caption.alt_text import DEFAULT_MIN_CONFIDENCE, alt_text_labels, make_alt_text
from snap2caption.backfill import BackfillConfig, run_backfill
from snap2caption.backfill.job import FINISH_CPUS
from snap2caption.backfill.output import QUARANTINE, RESULTS, read_results
from snap2caption.backfill.stages import ModelOptions, alt_text_batch
from snap2caption.cli import main
from tests.gateway_stack import CAPTIONS, _register_models
from tests.helpers import COLOURS, image_bytes

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

CAPTION_OF = dict(zip(COLOURS, CAPTIONS, strict=True))


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> str:
    return _register_models(tmp_path_factory.mktemp("backfill-registry"), mlflow_template_db)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def _library(folder: Path) -> dict[str, bytes]:
    """Colour images (the captioner knows each), a corrupt PNG and a text file; returns key -> bytes."""
    files: dict[str, bytes] = {}
    for i, colour in enumerate(COLOURS):
        fmt, suffix = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        key = f"{'album/' if i == 0 else ''}{colour}.{suffix}"
        files[key] = image_bytes(colour, fmt=fmt)
    files["broken.png"] = image_bytes("red")[:60]  # header intact, pixel data cut off
    files["notes.png"] = b"shopping list: eggs, milk\n"  # a text file whatever its name says
    for key, data in files.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(data)
    return files


def _config(source: Path, out: Path, registry_uri: str, **kwargs: object) -> BackfillConfig:
    options = ModelOptions(tracking_uri=registry_uri, cache_dir=str(out.parent / "model-cache"))
    return BackfillConfig(source, out, options=options, batch_size=4, progress=False, **kwargs)  # type: ignore[arg-type]


def test_rows_quarantine_resume_and_idempotence(tmp_path: Path, registry_uri: str) -> None:
    source = tmp_path / "library"
    files = _library(source)
    out = tmp_path / "out"

    summary = run_backfill(_config(source, out, registry_uri))
    assert (summary.found, summary.skipped, summary.done, summary.quarantined) == (8, 0, 6, 2)
    assert summary.models == {"caption": "captioner/1", "tags": "tagger/1", "objects": "detector/1"}
    assert set(summary.nodes) == {"decode", "caption", "tags", "objects"}
    assert json.loads((out / "summary.json").read_text())["done"] == 6

    rows = read_results(out).to_pylist()
    assert [r["path"] for r in rows] == sorted(k for k in files if k not in ("broken.png", "notes.png"))
    for row in rows:
        colour = Path(row["path"]).stem
        assert row["sha256"] == hashlib.sha256(files[row["path"]]).hexdigest()
        assert (row["width"], row["height"]) == (96, 72)
        assert row["format"] == ("jpeg" if row["path"].endswith(".jpg") else "png")
        assert row["caption"] == CAPTION_OF[colour]
        assert 0 < row["caption_confidence"] <= 1
        assert (row["caption_model"], row["tags_model"], row["objects_model"]) == (
            "captioner/1", "tagger/1", "detector/1",
        )  # fmt: skip
        assert 1 <= len(row["tags"]) <= 5 and all(t["hashtag"].startswith("#") for t in row["tags"])
        # As the detector service: an image outside the detector's domain has its objects withheld.
        assert row["objects_withheld"] >= 0
        if row["objects_in_domain"] is False:
            assert row["objects"] == []
        else:
            assert row["objects_withheld"] == 0
        for obj in row["objects"]:
            box = obj["box"]
            assert 0 <= box["x1"] <= box["x2"] <= 96 and 0 <= box["y1"] <= box["y2"] <= 72
        # The gateway's alt-text rules on this row's own caption and labels.
        labels = alt_text_labels(
            [t["name"] for t in row["tags"]],
            [o["label"] for o in row["objects"]],
            objects_in_domain=row["objects_in_domain"],
            caption_in_domain=row["caption_in_domain"],
        )
        expected = make_alt_text(
            row["caption"],
            row["caption_confidence"],
            labels,
            min_confidence=DEFAULT_MIN_CONFIDENCE,
            caption_in_domain=row["caption_in_domain"],
        )
        assert expected is not None
        assert (row["alt_text"], row["alt_text_source"]) == (expected.text, expected.source)

    quarantined = {r["path"]: r for r in read_results(out, QUARANTINE).to_pylist()}
    assert set(quarantined) == {"broken.png", "notes.png"}
    assert quarantined["broken.png"]["reason"].startswith("corrupt_image: ")
    assert quarantined["notes.png"]["reason"].startswith("unsupported_format: ")
    assert quarantined["notes.png"]["sha256"] == hashlib.sha256(files["notes.png"]).hexdigest()

    # A second run does nothing and writes nothing.
    parts = sorted(p.name for p in (out / RESULTS).iterdir()) + sorted(
        p.name for p in (out / QUARANTINE).iterdir()
    )
    again = run_backfill(_config(source, out, registry_uri))
    assert (again.skipped, again.done, again.quarantined) == (8, 0, 0)
    assert (
        sorted(p.name for p in (out / RESULTS).iterdir())
        + sorted(p.name for p in (out / QUARANTINE).iterdir())
        == parts
    )

    # The same library done in two runs (3 images, then the rest) gives the same table as one run.
    split = tmp_path / "split"
    first = run_backfill(_config(source, split, registry_uri, limit=3))
    assert first.done + first.quarantined == 3
    rest = run_backfill(_config(source, split, registry_uri))
    assert (rest.skipped, rest.done + rest.quarantined) == (3, 5)
    assert _comparable(read_results(split).to_pylist()) == _comparable(rows)
    assert read_results(split, QUARANTINE).to_pylist() == read_results(out, QUARANTINE).to_pylist()

    # New images added later are the only ones a resumed run does.
    shutil.copyfile(source / "album" / "red.png", source / "red-copy.png")
    added = run_backfill(_config(source, out, registry_uri))
    assert (added.skipped, added.done, added.quarantined) == (8, 1, 0)
    paths = [r["path"] for r in read_results(out).to_pylist()]
    assert len(paths) == len(set(paths)) == 7


def _comparable(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows with scores rounded: a batch of another size may change a float's last bits."""
    return json.loads(json.dumps(rows, default=str), parse_float=lambda s: round(float(s), 4))


def test_cli_with_a_manifest_and_one_feature(tmp_path: Path, registry_uri: str) -> None:
    source = tmp_path / "library"
    _library(source)
    manifest = tmp_path / "manifest.parquet"
    import pyarrow as pa

    pq.write_table(
        pa.table({"path": ["library/blue.jpg", "library/notes.png", "library/blue.jpg"]}), manifest
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "backfill", "--input", str(manifest), "--out", str(out), "--features", "caption",
            "--tracking-uri", registry_uri, "--no-progress", "--batch-size", "2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["found"], summary["done"], summary["quarantined"]) == (2, 1, 1)
    assert summary["models"] == {"caption": "captioner/1"}
    assert "images/s" in result.stderr
    [row] = read_results(out).to_pylist()
    assert (row["path"], row["caption"], row["caption_model"]) == (
        "library/blue.jpg",
        CAPTION_OF["blue"],
        "captioner/1",
    )
    assert row["tags"] is None and row["objects"] is None and row["alt_text"] is None


def test_alt_text_never_uses_a_caption_outside_the_captioners_domain() -> None:
    """The gateway's policy on a pipeline batch: an out-of-domain caption falls back to the labels (or to
    no alt text); None (a model without a domain description) counts as in domain."""
    batch = {
        "key": ["a", "b", "c", "d"],
        "error": [None, None, None, None],
        "caption": ["a small orange square", "a small orange square", "a red circle", "a red circle"],
        "caption_confidence": [0.9, 0.9, 0.9, 0.9],
        "caption_in_domain": [False, False, True, None],
        "tags": [json.dumps([{"name": "tabby cat"}]), "[]", "[]", "[]"],
        "objects": ["[]", "[]", "[]", "[]"],
    }
    out = alt_text_batch(batch, min_confidence=0.35, max_chars=125, gender_neutral_=False)
    assert out["alt_text"] == ["Image may contain: tabby cat.", None, "A red circle.", "A red circle."]
    assert out["alt_text_source"] == ["fallback", None, "caption", "caption"]


def test_alt_text_names_objects_only_when_no_model_places_the_image_outside_its_domain() -> None:
    """Unsure captions fall back to tags and objects; the objects' classes are left out when the captioner
    rejects the image even though the detector passed it. The domain columns come as numpy booleans, as in
    a pipeline batch (``np.False_ is False`` does not hold)."""
    square = json.dumps([{"label": "square", "score": 0.8, "box": {}}])
    batch = {
        "key": ["a", "b", "c", "d"],
        "error": [None, None, None, None],
        "caption": ["a small orange square"] * 4,
        "caption_confidence": [0.1] * 4,
        "caption_in_domain": np.array([np.False_, np.True_, None, np.True_], dtype=object),
        "objects_in_domain": np.array([np.True_, np.True_, None, np.False_], dtype=object),
        "tags": [json.dumps([{"name": "moon"}])] * 4,
        "objects": [square, square, square, "[]"],
    }
    out = alt_text_batch(batch, min_confidence=0.35, max_chars=125, gender_neutral_=False)
    assert out["alt_text"] == [
        "Image may contain: moon.",
        "Image may contain: moon and square.",
        "Image may contain: moon and square.",
        "Image may contain: moon.",
    ]


def test_the_last_step_fits_beside_the_model_actors_on_two_cores() -> None:
    """Model actors hold their CPUs until the input ends; a last step that did not fit beside them on a
    2-core machine (Ray's drop_columns reserves a whole CPU) held every finished row back until then (measured
    on 600 images: the first rows came back after 29.6 of 31.5 s; 10.6 of 27.9 s once it fitted)."""
    config = BackfillConfig(Path("in"), Path("out"))
    held = len(config.parts()) * config.actors * config.actor_cpus
    assert held + FINISH_CPUS <= 2

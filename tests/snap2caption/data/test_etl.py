"""The offline ETL: quarantine, duplicates, splits, YOLO labels, manifests, idempotency, CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from snap2caption.cli import main
from snap2caption.data.captions import CaptionPolicy
from snap2caption.data.etl import (
    CACHE_NAME,
    MANIFEST_SCHEMA,
    EtlConfig,
    EtlReport,
    clip_box,
    hash_split,
    orient_box,
    run_etl,
    safe_image_id,
)
from snap2caption.errors import BadRequest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "formats"
# Sizes the fixture annotations declare.
COCO_IMAGES = {
    "COCO_val2014_000000391895.jpg": (640, 360),
    "COCO_val2014_000000522418.jpg": (640, 480),
    "COCO_val2014_000000184613.jpg": (500, 336),
}


def _jpeg(path: Path, size: tuple[int, int], colour: tuple[int, int, int], orientation: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, format="JPEG", quality=90, exif=exif)
    return path


def _coco(path: Path, images: Sequence[dict[str, Any]], categories: Sequence[str] = ()) -> Path:
    """A COCO captions+instances file: images as {id, file_name, captions, boxes: [(cat, bbox)]}."""
    cat_ids = {name: i + 1 for i, name in enumerate(categories)}
    annotations: list[dict[str, Any]] = []
    for image in images:
        for caption in image.get("captions", []):
            annotations.append({"image_id": image["id"], "id": len(annotations), "caption": caption})
        for cat, bbox in image.get("boxes", []):
            annotations.append(
                {
                    "image_id": image["id"],
                    "id": len(annotations),
                    "bbox": list(bbox),
                    "category_id": cat_ids[cat],
                    "iscrowd": 0,
                    "area": bbox[2] * bbox[3],
                }
            )
    doc = {
        "images": [
            {k: v for k, v in image.items() if k in ("id", "file_name", "width", "height")}
            for image in images
        ],
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "shape"} for n, i in cat_ids.items()],
    }
    path.write_text(json.dumps(doc))
    return path


def _cfg(images: Path, annotations: Sequence[Path], out: Path, source: str = "coco", **kw: Any) -> EtlConfig:
    return EtlConfig(source=source, images=images, annotations=list(annotations), out=out, workers=1, **kw)


def _run(cfg: EtlConfig) -> EtlReport:
    return run_etl(cfg, progress=False)


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    rows = {}
    for split in ("train", "val", "test"):
        for row in pq.read_table(out / "manifests" / f"{split}.parquet").to_pylist():
            rows[row["image_id"]] = row
    return rows


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()
    }


@pytest.fixture()
def coco_images(tmp_path: Path) -> Path:
    images = tmp_path / "coco"
    for i, (name, size) in enumerate(COCO_IMAGES.items()):
        _jpeg(images / "val2014" / name, size, (40 * i, 100, 200 - 40 * i))
    return images


# --- the real COCO files, end to end ---------------------------------------------------------------


def test_coco_fixture_to_yolo_and_manifests(coco_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    annotations = [FIXTURES / "captions_val2014.json", FIXTURES / "instances_val2014.json"]
    report = _run(_cfg(coco_images, annotations, out, max_side=256))

    assert report.images_ok == 3 and report.quarantined == [] and report.duplicates == []
    assert report.captions_kept == 15 and report.boxes_kept == 7
    assert report.images_decoded == 3 and report.images_cached == 0
    rows = _rows(out)
    moped = rows["391895"]
    assert (moped["width"], moped["height"]) == (640, 360)  # the original size, not the resized one
    assert moped["source_file"] == "val2014/COCO_val2014_000000391895.jpg"
    assert moped["captions"][0] == "a man with a red helmet on a small moped on a dirt road"
    with Image.open(out / moped["path"]) as resized:
        assert resized.size == (256, 144) and resized.mode == "RGB"
    motorcycle = [b for b in moped["boxes"] if b["category"] == "motorcycle"]
    assert motorcycle[0]["class_id"] == 2
    assert motorcycle[0]["bbox"] == pytest.approx([359.17, 146.17, 112.45, 213.57], rel=1e-6)

    # The known box: motorcycle (class 2 = third category by id) in the 640 x 360 image.
    label = out / "labels" / moped["split"] / "391895.txt"
    assert label.read_text().splitlines()[1] == "2 0.649055 0.702653 0.175703 0.593250"
    assert len((out / "labels" / rows["184613"]["split"] / "184613.txt").read_text().splitlines()) == 2

    data_yaml = yaml.safe_load((out / "dataset.yaml").read_text())
    assert "path" not in data_yaml  # Ultralytics takes the file's folder: the same bytes wherever it is built
    assert (data_yaml["train"], data_yaml["val"], data_yaml["test"]) == (
        "images/train",
        "images/val",
        "images/test",
    )
    assert data_yaml["names"] == dict(
        enumerate(["person", "bicycle", "motorcycle", "cow", "umbrella", "knife", "cake"])
    )

    saved = json.loads((out / "report.json").read_text())
    assert saved["counts"]["images_ok"] == 3
    assert "seconds" not in saved and "images_decoded" not in saved


def test_manifest_schema(coco_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(_cfg(coco_images, [FIXTURES / "instances_val2014.json"], out))
    for split in ("train", "val", "test"):
        table = pq.read_table(out / "manifests" / f"{split}.parquet")
        assert table.schema.equals(MANIFEST_SCHEMA)
        for row in table.to_pylist():
            assert row["split"] == split
            assert (out / row["path"]).is_file()
            assert len(row["sha256"]) == 64
            assert all(len(b["bbox"]) == 4 for b in row["boxes"])
    box = pa.struct([("category", pa.string()), ("class_id", pa.int32()), ("bbox", pa.list_(pa.float32()))])
    expected = {
        "image_id": pa.string(),
        "path": pa.string(),
        "width": pa.int32(),
        "height": pa.int32(),
        "captions": pa.list_(pa.string()),
        "boxes": pa.list_(box),
        "split": pa.string(),
        "sha256": pa.string(),
        "source_file": pa.string(),
    }
    assert {f.name: f.type for f in MANIFEST_SCHEMA} == expected


# --- bad images --------------------------------------------------------------------------------------


def test_corrupt_and_missing_images_are_quarantined_and_the_run_goes_on(tmp_path: Path) -> None:
    images = tmp_path / "images"
    good = _jpeg(images / "good.jpg", (64, 48), (200, 10, 10))
    truncated = images / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (images / "text.jpg").write_text("this is not an image\n")
    (images / "empty.jpg").write_bytes(b"")
    names = ["good.jpg", "truncated.jpg", "text.jpg", "empty.jpg", "missing.jpg", "../escape.jpg"]
    ann = _coco(
        tmp_path / "captions.json",
        [{"id": i, "file_name": n, "captions": [f"a picture number {i}"]} for i, n in enumerate(names)],
    )
    out = tmp_path / "out"
    report = _run(_cfg(images, [ann], out))

    assert report.images_ok == 1
    codes = {q["file"]: q["code"] for q in report.quarantined}
    assert codes["truncated.jpg"] == "corrupt_image"
    assert codes["text.jpg"] == "unsupported_format"
    assert codes["empty.jpg"] in {"unsupported_format", "corrupt_image"}
    assert codes["missing.jpg"] == "missing_file"
    assert codes["../escape.jpg"] == "bad_path"
    assert all(q["reason"] for q in report.quarantined)
    saved = json.loads((out / "report.json").read_text())
    assert saved["quarantined"] == report.quarantined
    assert saved["counts"]["quarantined"] == 5
    assert list(_rows(out)) == ["0"]

    # Quarantine verdicts are cached too: nothing is decoded again.
    again = _run(_cfg(images, [ann], out))
    assert again.quarantined == report.quarantined
    assert again.images_decoded == 0


def test_duplicate_images_are_collapsed_and_captions_merged(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _jpeg(images / "a.jpg", (32, 32), (0, 128, 0))
    (images / "copy_of_a.jpg").write_bytes((images / "a.jpg").read_bytes())
    _jpeg(images / "b.jpg", (32, 32), (0, 0, 128))
    ann = _coco(
        tmp_path / "captions.json",
        [
            {"id": 1, "file_name": "a.jpg", "captions": ["A green square.", "A green tile ."]},
            {"id": 2, "file_name": "copy_of_a.jpg", "captions": ["a green square", "A plain green image."]},
            {"id": 3, "file_name": "b.jpg", "captions": ["A blue square."]},
        ],
    )
    out = tmp_path / "out"
    report = _run(_cfg(images, [ann], out))
    assert report.images_ok == 2
    assert report.duplicates == [
        {"kept": "a.jpg", "dropped": "copy_of_a.jpg", "kept_id": "1", "dropped_id": "2"}
    ]
    assert report.images_decoded == 2  # the copy is never decoded
    assert report.captions_repeated == 1
    rows = _rows(out)
    assert set(rows) == {"1", "3"}
    assert rows["1"]["captions"] == ["a green square", "a green tile", "a plain green image"]
    assert json.loads((out / "report.json").read_text())["counts"]["duplicates_collapsed"] == 1


def test_captions_outside_the_policy_are_dropped(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _jpeg(images / "a.jpg", (16, 16), (1, 2, 3))
    ann = _coco(
        tmp_path / "c.json",
        [{"id": 1, "file_name": "a.jpg", "captions": ["One.", "Two words", "A Three Words .", " "]}],
    )
    out = tmp_path / "out"
    report = _run(_cfg(images, [ann], out, captions=CaptionPolicy(lowercase=False, min_words=2, max_words=2)))
    assert (report.captions_kept, report.captions_dropped) == (1, 3)
    assert _rows(out)["1"]["captions"] == ["Two words"]


# --- splits -------------------------------------------------------------------------------------------


def test_hash_split_is_stable_and_follows_the_fractions() -> None:
    ids = [str(i) for i in range(4000)]
    splits = [hash_split(i, 0, 0.1, 0.2) for i in ids]
    assert splits == [hash_split(i, 0, 0.1, 0.2) for i in ids]
    assert 0.08 < splits.count("val") / 4000 < 0.12
    assert 0.18 < splits.count("test") / 4000 < 0.22
    assert splits != [hash_split(i, 1, 0.1, 0.2) for i in ids]
    assert {hash_split(i, 0, 0.0, 0.0) for i in ids} == {"train"}


def test_etl_splits_are_deterministic(tmp_path: Path) -> None:
    images = tmp_path / "images"
    records = []
    for i in range(12):
        _jpeg(images / f"{i}.jpg", (8, 8), (i * 20, 0, 0))
        records.append({"id": i, "file_name": f"{i}.jpg", "captions": ["a red square"]})
    ann = _coco(tmp_path / "c.json", records)
    splits = [
        {k: r["split"] for k, r in _rows(out).items()}
        for out in (tmp_path / "one", tmp_path / "two")
        if _run(_cfg(images, [ann], out, val_fraction=0.3, test_fraction=0.3))
    ]
    assert splits[0] == splits[1]
    assert splits[0] == {str(i): hash_split(str(i), 0, 0.3, 0.3) for i in range(12)}
    assert set(splits[0].values()) == {"train", "val", "test"}


def test_karpathy_splits_are_kept(tmp_path: Path) -> None:
    images = tmp_path / "coco"
    _jpeg(images / "val2014" / "COCO_val2014_000000391895.jpg", (64, 36), (1, 1, 1))
    _jpeg(images / "val2014" / "COCO_val2014_000000522418.jpg", (64, 48), (2, 2, 2))
    _jpeg(images / "val2014" / "COCO_val2014_000000184613.jpg", (50, 34), (3, 3, 3))
    _jpeg(images / "train2014" / "COCO_train2014_000000057870.jpg", (64, 48), (4, 4, 4))
    out = tmp_path / "out"
    report = _run(_cfg(images, [FIXTURES / "dataset_coco.json"], out, source="karpathy", seed=123))
    rows = _rows(out)
    assert {k: r["split"] for k, r in rows.items()} == {
        "391895": "train",  # restval
        "522418": "test",
        "184613": "val",
        "57870": "train",
    }
    assert report.splits == {"train": 2, "val": 1, "test": 1}
    assert rows["522418"]["path"] == "images/test/522418.jpg"
    # No categories: no detection outputs.
    assert not (out / "dataset.yaml").exists()
    assert not any((out / "labels").rglob("*.txt"))


def test_flickr30k_fixture_through_etl(tmp_path: Path) -> None:
    images = tmp_path / "flickr30k_images"
    for i, name in enumerate(["1000092795.jpg", "10002456.jpg", "1000268201.jpg", "2199200615.jpg"]):
        _jpeg(images / name, (50, 33), (i * 50, 80, 80))
    out = tmp_path / "out"
    report = _run(_cfg(images, [FIXTURES / "results.csv"], out, source="flickr30k"))
    assert report.images_ok == 4 and report.captions_kept == 19
    assert (
        _rows(out)["10002456"]["captions"][0]
        == "several men in hard hats are operating a giant pulley system"
    )


# --- boxes ----------------------------------------------------------------------------------------------


def test_boxes_are_clipped_and_degenerate_ones_dropped(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _jpeg(images / "a.jpg", (100, 50), (9, 9, 9))
    boxes = [
        ("circle", (-10.0, 10.0, 30.0, 20.0)),  # sticks out on the left -> (0, 10, 20, 20)
        ("square", (90.0, 40.0, 50.0, 50.0)),  # sticks out right and bottom -> (90, 40, 10, 10)
        ("square", (120.0, 10.0, 5.0, 5.0)),  # outside the image
        ("circle", (10.0, 10.0, 0.0, 5.0)),  # zero width
    ]
    ann = _coco(tmp_path / "i.json", [{"id": 7, "file_name": "a.jpg", "boxes": boxes}], ["circle", "square"])
    out = tmp_path / "out"
    report = _run(_cfg(images, [ann], out, val_fraction=0.0, test_fraction=0.0))
    assert (report.boxes_kept, report.boxes_dropped) == (2, 2)
    assert (out / "labels/train/7.txt").read_text() == (
        "0 0.100000 0.400000 0.200000 0.400000\n1 0.950000 0.900000 0.100000 0.200000\n"
    )
    assert [b["bbox"] for b in _rows(out)["7"]["boxes"]] == [[0, 10, 20, 20], [90, 40, 10, 10]]


def test_exif_rotated_image_gets_upright_size_and_boxes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    # Stored 80 x 40 with a red block at x 0..20, y 0..10; EXIF 6 means "turn 90 degrees clockwise".
    stored = Image.new("RGB", (80, 40), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    images.mkdir()
    stored.save(images / "rot.jpg", format="JPEG", quality=95, exif=exif)
    ann = _coco(
        tmp_path / "i.json",
        [{"id": 1, "file_name": "rot.jpg", "width": 80, "height": 40, "boxes": [("block", (0, 0, 20, 10))]}],
        ["block"],
    )
    out = tmp_path / "out"
    _run(_cfg(images, [ann], out, val_fraction=0.0, test_fraction=0.0))
    row = _rows(out)["1"]
    assert (row["width"], row["height"]) == (40, 80)
    assert row["boxes"][0]["bbox"] == [30, 0, 10, 20]  # top-right corner once upright
    with Image.open(out / row["path"]) as upright:
        assert upright.size == (40, 80)
        rgb = upright.convert("RGB")
        block, elsewhere = rgb.getpixel((35, 10)), rgb.getpixel((5, 10))
    assert isinstance(block, tuple) and isinstance(elsewhere, tuple)
    assert block[0] > 200 and block[1] < 60 and block[2] < 60
    assert elsewhere[1] > 200  # white where the block is not
    assert (out / "labels/train/1.txt").read_text() == "0 0.875000 0.125000 0.250000 0.250000\n"


def test_orient_box_round_trips_through_every_orientation() -> None:
    box = (10.0, 5.0, 20.0, 8.0)
    assert orient_box(box, 1, 100, 50) == box
    assert orient_box(box, 3, 100, 50) == (70.0, 37.0, 20.0, 8.0)
    assert orient_box(box, 8, 100, 50) == (5.0, 70.0, 8.0, 20.0)
    # Two 180 degree turns and double mirrors are the identity.
    for orientation in (2, 3, 4):
        assert orient_box(orient_box(box, orientation, 100, 50), orientation, 100, 50) == box
    # 90 clockwise then 90 counter-clockwise (on the turned, 50 x 100 image) is the identity.
    assert orient_box(orient_box(box, 6, 100, 50), 8, 50, 100) == box
    assert clip_box((float("nan"), 0.0, 5.0, 5.0), 10, 10) is None


def test_safe_image_id() -> None:
    assert safe_image_id("391895") == "391895"
    assert safe_image_id("a/b") != safe_image_id("a_b")
    assert safe_image_id("..").startswith("__-")
    assert "/" not in safe_image_id("x/../../y")


# --- idempotency and incremental runs --------------------------------------------------------------


def test_second_run_changes_nothing_and_decodes_nothing(coco_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _cfg(coco_images, [FIXTURES / "captions_val2014.json", FIXTURES / "instances_val2014.json"], out)
    first = _run(cfg)
    before = _snapshot(out)
    assert CACHE_NAME in before and "report.json" in before
    second = _run(cfg)
    assert _snapshot(out) == before
    assert (second.images_decoded, second.images_cached) == (0, 3)
    assert second.to_dict(deterministic=True) == first.to_dict(deterministic=True)

    # A touched but unchanged file is re-hashed, not re-decoded, and no output changes.
    os.utime(coco_images / "val2014" / "COCO_val2014_000000522418.jpg", ns=(1, 1))
    third = _run(cfg)
    assert third.images_decoded == 0
    assert {k: v for k, v in _snapshot(out).items() if k != CACHE_NAME} == {
        k: v for k, v in before.items() if k != CACHE_NAME
    }


def test_changed_settings_and_vanished_images_update_the_outputs(tmp_path: Path) -> None:
    images = tmp_path / "images"
    records = []
    for i in range(4):
        _jpeg(images / f"{i}.jpg", (40, 20), (i * 60, 0, 0))
        records.append(
            {"id": i, "file_name": f"{i}.jpg", "captions": ["a red thing"], "boxes": [("t", (1, 1, 9, 9))]}
        )
    out = tmp_path / "out"
    _run(_cfg(images, [_coco(tmp_path / "all.json", records, ["t"])], out))
    assert len(list((out / "images").rglob("*.jpg"))) == 4

    fewer = _run(_cfg(images, [_coco(tmp_path / "fewer.json", records[:2], ["t"])], out))
    assert fewer.images_decoded == 0
    assert sorted(p.stem for p in (out / "images").rglob("*.jpg")) == ["0", "1"]
    assert sorted(p.stem for p in (out / "labels").rglob("*.txt")) == ["0", "1"]
    assert set(_rows(out)) == {"0", "1"}

    smaller = _run(_cfg(images, [tmp_path / "fewer.json"], out, max_side=10))
    assert smaller.images_decoded == 2
    for path in (out / "images").rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.size == (10, 5)


def test_progress_is_reported(coco_images: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    run_etl(
        _cfg(coco_images, [FIXTURES / "captions_val2014.json"], tmp_path / "out"),
        progress=False,
        on_progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    for stage in ("hash", "decode", "write"):
        assert (stage, 0, 3) in calls and (stage, 3, 3) in calls


# --- configuration and bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": "voc"}, "unknown source"),
        ({"images": Path("/nonexistent/images")}, "images folder not found"),
        ({"annotations": []}, "at least one annotation"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "leave some images"),
        ({"max_side": 0}, "max_side"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_config_is_a_bad_request(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    (tmp_path / "images").mkdir()
    fields: dict[str, Any] = {
        "source": "coco",
        "images": tmp_path / "images",
        "annotations": [FIXTURES / "captions_val2014.json"],
        "out": tmp_path / "out",
        "workers": 1,
    }
    with pytest.raises(BadRequest, match=message):
        run_etl(EtlConfig(**{**fields, **change}), progress=False)


def test_output_that_would_hold_source_images_is_refused(tmp_path: Path) -> None:
    # Stale-file removal in out/images must never reach a source image.
    images = tmp_path / "data" / "images" / "train"
    _jpeg(images / "a.jpg", (8, 8), (0, 0, 0))
    ann = _coco(tmp_path / "c.json", [{"id": 1, "file_name": "images/train/a.jpg", "captions": ["a"]}])
    with pytest.raises(BadRequest, match="overlaps"):
        _run(_cfg(images, [ann], tmp_path / "data"))
    with pytest.raises(BadRequest, match="lies in the output folder"):
        _run(_cfg(tmp_path / "data", [ann], tmp_path / "data"))
    assert (images / "a.jpg").is_file()


def test_output_may_sit_inside_the_images_folder(tmp_path: Path) -> None:
    _jpeg(tmp_path / "a.jpg", (8, 8), (0, 0, 0))
    ann = _coco(tmp_path / "c.json", [{"id": 1, "file_name": "a.jpg", "captions": ["a black square"]}])
    assert _run(_cfg(tmp_path, [ann], tmp_path / "processed")).images_ok == 1


def test_bad_annotation_file_is_a_bad_request(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(BadRequest, match="not valid JSON"):
        _run(_cfg(tmp_path, [tmp_path / "bad.json"], tmp_path / "out"))


def test_cli_etl(coco_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["data", "etl", "--source", "coco", "--images", str(coco_images), "--out", str(out)]
    args += ["--annotations", str(FIXTURES / "captions_val2014.json")]
    args += ["--annotations", str(FIXTURES / "instances_val2014.json")]
    result = CliRunner().invoke(
        main, [*args, "--workers", "1", "--no-progress", "--max-side", "64", "--no-lowercase"]
    )
    assert result.exit_code == 0, result.output
    assert "etl: 3 images" in result.output and "0 quarantined" in result.output
    assert _rows(out)["391895"]["captions"][0].startswith("A man")

    bad = CliRunner().invoke(main, [*args[:-2], "--annotations", str(tmp_path / "nope.json")])
    assert bad.exit_code == 2
    assert "not found" in bad.output and "Traceback" not in bad.output


# --- from the synthetic generator, through the process pool ---------------------------------------


@pytest.mark.parametrize(
    ("source", "annotation_files"),
    [
        ("coco", ["captions.json", "instances.json"]),
        ("karpathy", ["dataset_synth.json"]),
        ("flickr30k", ["results.csv"]),
    ],
)
def test_synth_through_etl(
    tmp_path_factory: pytest.TempPathFactory, source: str, annotation_files: list[str]
) -> None:
    from snap2caption.data.synth import SynthConfig, write_synth

    synth_dir = tmp_path_factory.getbasetemp() / "synth_for_etl"
    if not (synth_dir / "annotations" / "results.csv").exists():
        write_synth(
            synth_dir,
            SynthConfig(images=24, seed=5, image_size=96),
            formats=("coco", "karpathy", "flickr30k"),
            progress=False,
        )
    out = tmp_path_factory.mktemp(f"etl_{source}")
    cfg = EtlConfig(
        source=source,
        images=synth_dir / "images",
        annotations=[synth_dir / "annotations" / name for name in annotation_files],
        out=out,
        workers=2,  # 24 images: enough for the process pool
    )
    report = run_etl(cfg, progress=False)
    assert report.images_ok == 24 and report.quarantined == []
    assert report.captions_kept >= 24
    rows = _rows(out)
    assert len(rows) == 24
    if source == "coco":
        assert report.boxes_kept > 0
        assert len(list((out / "labels").rglob("*.txt"))) == 24
        assert len(yaml.safe_load((out / "dataset.yaml").read_text())["names"]) > 0
    before = _snapshot(out)
    again = run_etl(cfg, progress=False)
    assert again.images_decoded == 0 and _snapshot(out) == before

"""Readers of the real formats, on excerpts of the real files (tests/fixtures/formats/)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from snap2caption.data.formats import READERS, coco, flickr30k, karpathy
from snap2caption.errors import BadRequest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "formats"
COCO_FILES = [FIXTURES / "captions_val2014.json", FIXTURES / "instances_val2014.json"]


def _touch_image(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path, format="JPEG")


def test_readers_registry() -> None:
    assert set(READERS) == {"coco", "karpathy", "flickr30k"}
    assert READERS["coco"] is coco.read
    assert READERS["karpathy"] is karpathy.read
    assert READERS["flickr30k"] is flickr30k.read


# --- COCO -----------------------------------------------------------------------------------------


def test_coco_merges_captions_and_instances_by_image_id(tmp_path: Path) -> None:
    ds = coco.read(tmp_path, COCO_FILES)
    assert ds.source == "coco"
    # Category-id order (1, 2, 4, 21, 28, 49, 61), names only.
    assert ds.categories == ["person", "bicycle", "motorcycle", "cow", "umbrella", "knife", "cake"]
    assert [r.image_id for r in ds.records] == ["184613", "391895", "522418"]
    moped = ds.records[1]
    assert moped.file_name == "COCO_val2014_000000391895.jpg"
    assert (moped.width, moped.height) == (640, 360)
    assert moped.split is None
    assert len(moped.captions) == 5
    assert moped.captions[0] == "A man with a red helmet on a small moped on a dirt road. "
    assert [(b.category, b.bbox) for b in moped.boxes] == [
        ("person", (339.88, 22.16, 153.88, 300.73)),
        ("motorcycle", (359.17, 146.17, 112.45, 213.57)),
        ("bicycle", (235.92, 199.65, 40.74, 33.71)),
    ]
    # 184613 has a crowd annotation of cows: skipped, the single cow and the umbrella kept.
    assert [b.category for b in ds.records[0].boxes] == ["umbrella", "cow"]


def test_coco_captions_alone_has_no_categories(tmp_path: Path) -> None:
    ds = coco.read(tmp_path, [COCO_FILES[0]])
    assert ds.categories == []
    assert all(r.boxes == [] and len(r.captions) == 5 for r in ds.records)


def test_coco_files_are_told_apart_by_content_not_name(tmp_path: Path) -> None:
    swapped = [tmp_path / "instances.json", tmp_path / "captions.json"]
    shutil.copy(COCO_FILES[0], swapped[0])
    shutil.copy(COCO_FILES[1], swapped[1])
    ds = coco.read(tmp_path, swapped)
    assert sum(len(r.captions) for r in ds.records) == 15
    assert sum(len(r.boxes) for r in ds.records) == 7


def test_coco_categories_follow_category_id_order(tmp_path: Path) -> None:
    doc = json.loads(COCO_FILES[1].read_text())
    doc["categories"].reverse()
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(doc))
    assert coco.read(tmp_path, [path]).categories[:3] == ["person", "bicycle", "motorcycle"]


def test_coco_finds_images_in_split_subfolders(tmp_path: Path) -> None:
    # The user points at coco/ rather than coco/val2014/.
    _touch_image(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    _touch_image(tmp_path / "COCO_val2014_000000522418.jpg")  # directly under the folder given
    ds = coco.read(tmp_path, COCO_FILES)
    by_id = {r.image_id: r.file_name for r in ds.records}
    assert by_id["391895"] == "val2014/COCO_val2014_000000391895.jpg"
    assert by_id["522418"] == "COCO_val2014_000000522418.jpg"
    assert by_id["184613"] == "COCO_val2014_000000184613.jpg"  # missing: left for the ETL to quarantine


def test_coco_2017_names_resolve_through_the_annotation_file_name(tmp_path: Path) -> None:
    doc = json.loads(COCO_FILES[0].read_text())
    for image in doc["images"]:
        image["file_name"] = f"{image['id']:012d}.jpg"
    ann = tmp_path / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(doc))
    _touch_image(tmp_path / "val2017" / "000000391895.jpg")
    ds = coco.read(tmp_path, [ann])
    assert {r.image_id: r.file_name for r in ds.records}["391895"] == "val2017/000000391895.jpg"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ('{"images": []}', "not a COCO annotation file"),
        ('[{"image_id": 1}]', "not a COCO annotation file"),
        ('{"images": [{"id": 1}], "annotations": [{"caption": "x"}]}', "malformed"),
        ('{"images": {}, "annotations": []}', "must be a list"),
        (
            '{"images": [], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 9}],'
            ' "categories": []}',
            "category ids",
        ),
    ],
)
def test_coco_bad_files_are_bad_requests(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "captions.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BadRequest, match=message):
        coco.read(tmp_path, [path])


def test_coco_needs_a_file(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="at least one"):
        coco.read(tmp_path, [])


# --- Karpathy -------------------------------------------------------------------------------------


def test_karpathy_coco_keeps_splits_and_coco_ids(tmp_path: Path) -> None:
    ds = karpathy.read(tmp_path, [FIXTURES / "dataset_coco.json"])
    assert ds.source == "karpathy"
    assert ds.categories == []
    assert [(r.image_id, r.file_name, r.split) for r in ds.records] == [
        ("391895", "val2014/COCO_val2014_000000391895.jpg", "train"),  # restval -> train
        ("522418", "val2014/COCO_val2014_000000522418.jpg", "test"),
        ("184613", "val2014/COCO_val2014_000000184613.jpg", "val"),
        ("57870", "train2014/COCO_train2014_000000057870.jpg", "train"),
    ]
    assert ds.records[0].captions[0] == "A man with a red helmet on a small moped on a dirt road. "
    assert all(len(r.captions) == 5 for r in ds.records)


def test_karpathy_coco_when_pointed_at_the_split_folder(tmp_path: Path) -> None:
    _touch_image(tmp_path / "COCO_val2014_000000522418.jpg")
    ds = karpathy.read(tmp_path, [FIXTURES / "dataset_coco.json"])
    assert ds.records[1].file_name == "COCO_val2014_000000522418.jpg"


def test_karpathy_flickr30k_uses_file_stems_as_ids(tmp_path: Path) -> None:
    ds = karpathy.read(tmp_path, [FIXTURES / "dataset_flickr30k.json"])
    assert [(r.image_id, r.file_name, r.split) for r in ds.records] == [
        ("1000092795", "1000092795.jpg", "train"),
        ("10002456", "10002456.jpg", "train"),
        ("1000268201", "1000268201.jpg", "test"),
        ("1000344755", "1000344755.jpg", "val"),
    ]
    assert ds.records[0].captions[0] == (
        "Two young guys with shaggy hair look at their hands while hanging out in the yard."
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("", "not valid JSON"),
        ('{"dataset": "coco"}', "not a Karpathy split file"),
        ('{"images": [{"split": "train"}]}', "malformed"),
    ],
)
def test_karpathy_bad_files_are_bad_requests(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "dataset_coco.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BadRequest, match=message):
        karpathy.read(tmp_path, [path])


def test_karpathy_rejects_a_coco_captions_file(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="malformed"):
        karpathy.read(tmp_path, [COCO_FILES[0]])


# --- Flickr30K ------------------------------------------------------------------------------------


def test_flickr30k_results_csv_groups_rows_and_skips_the_malformed_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="snap2caption.data.formats.flickr30k"):
        ds = flickr30k.read(tmp_path, [FIXTURES / "results.csv"])
    assert ds.source == "flickr30k"
    assert [(r.image_id, r.file_name, len(r.captions)) for r in ds.records] == [
        ("1000092795", "1000092795.jpg", 5),
        ("10002456", "10002456.jpg", 5),
        ("1000268201", "1000268201.jpg", 5),
        ("2199200615", "2199200615.jpg", 4),  # row 4 lacks its second separator
    ]
    assert ds.records[0].captions[0] == (
        "Two young guys with shaggy hair look at their hands while hanging out in the yard ."
    )
    assert all(r.split is None for r in ds.records)
    assert "line 21 is malformed" in caplog.text


def test_flickr30k_orders_by_comment_number_and_keeps_pipes_in_comments(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_bytes(
        b"\xef\xbb\xbfimage_name| comment_number| comment\n"
        b"1.jpg| 1| second | with a pipe\n"
        b"1.jpg| 0| first\n"
        b"\n"
        b"2.jpg| x| not a number\n"
        b"2.jpg| 0| \xff\xfe not utf-8\n"
        b'3.jpg| 0| "quoted" text\n'
    )
    ds = flickr30k.read(tmp_path, [path])
    assert [(r.image_id, r.captions) for r in ds.records] == [
        ("1", ["first", "second | with a pipe"]),
        ("3", ['"quoted" text']),
    ]


def test_flickr30k_reads_the_official_token_file(tmp_path: Path) -> None:
    path = tmp_path / "results_20130124.token"
    path.write_text(
        "1000092795.jpg#0\tTwo young guys with shaggy hair look at their hands while hanging out .\n"
        "1000092795.jpg#1\tTwo young , White males are outside near many bushes .\n"
    )
    ds = flickr30k.read(tmp_path, [path])
    assert [(r.image_id, len(r.captions)) for r in ds.records] == [("1000092795", 2)]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), (b"", "empty"), (b"\n\n", "empty"), (b"a,b,c\n1,2,3\n", "header")],
)
def test_flickr30k_bad_files_are_bad_requests(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "results.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadRequest, match=message):
        flickr30k.read(tmp_path, [path])


def test_flickr30k_refuses_a_json_file(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="header"):
        flickr30k.read(tmp_path, [FIXTURES / "dataset_flickr30k.json"])

"""Writers for COCO, Karpathy and Flickr30K files: exactly the public formats, parsed back by hand."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from snap2caption.data.formats import (
    flickr30k_comment,
    karpathy_tokens,
    write_coco,
    write_flickr30k_csv,
    write_karpathy,
)
from snap2caption.data.records import SourceBox, SourceRecord, default_split

CAPTIONS = [
    "A man with a red helmet on a small moped on a dirt road.",
    "Man riding a motor bike on a dirt road on the countryside.",
    "A man riding on the back of a motorcycle.",
    "A dirt path with a young person on a motor bike rests to the foreground of a verdant area.",
    "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
]


def coco_records() -> list[SourceRecord]:
    return [
        SourceRecord(
            image_id="391895",
            file_name="COCO_val2014_000000391895.jpg",
            captions=CAPTIONS,
            boxes=[
                SourceBox("person", (339.88, 22.16, 153.88, 300.73)),
                SourceBox("motorcycle", (359.0, 146.0, 12.0, 10.0)),
            ],
            split="test",
            width=640,
            height=360,
        ),
        SourceRecord(
            image_id="522418",
            file_name="COCO_val2014_000000522418.jpg",
            captions=["A woman wearing a net on her head cutting a cake. "],
            boxes=[],
            width=640,
            height=480,
        ),
    ]


def test_coco_files_have_the_real_layout(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    captions_path, instances_path = tmp_path / "captions_val2014.json", tmp_path / "instances_val2014.json"
    write_coco(
        coco_records(),
        ["person", "motorcycle"],
        captions_path,
        instances_path,
        segmentations={"391895": [[340.0, 22.0, 493.0, 22.0, 493.0, 322.0], None]},
    )
    captions = json.loads(captions_path.read_text())
    assert list(captions) == ["info", "licenses", "images", "annotations"]
    assert list(captions["images"][0]) == [
        "license",
        "file_name",
        "coco_url",
        "height",
        "width",
        "date_captured",
        "flickr_url",
        "id",
    ]
    assert captions["images"][0]["id"] == 391895 and captions["images"][0]["width"] == 640
    anns = captions["annotations"]
    assert [list(a) for a in anns] == [["image_id", "id", "caption"]] * 6
    assert [a["id"] for a in anns] == [1, 2, 3, 4, 5, 6]
    assert [a["caption"] for a in anns if a["image_id"] == 391895] == CAPTIONS

    instances = json.loads(instances_path.read_text())
    assert list(instances) == ["info", "licenses", "images", "annotations", "categories"]
    assert instances["categories"] == [
        {"supercategory": "shape", "id": 1, "name": "person"},
        {"supercategory": "shape", "id": 2, "name": "motorcycle"},
    ]
    person, motorcycle = instances["annotations"]
    assert list(person) == ["segmentation", "area", "iscrowd", "image_id", "bbox", "category_id", "id"]
    assert person["segmentation"] == [[340.0, 22.0, 493.0, 22.0, 493.0, 322.0]]
    assert person["area"] == pytest.approx(153 * 300 / 2)  # the polygon's area, as in COCO
    assert person["bbox"] == [339.88, 22.16, 153.88, 300.73] and person["iscrowd"] == 0
    assert motorcycle["segmentation"] == [] and motorcycle["area"] == 120.0
    assert motorcycle["category_id"] == 2 and motorcycle["image_id"] == 391895

    coco = COCO(str(instances_path))
    assert coco.getAnnIds(imgIds=[391895]) == [1, 2]
    assert coco.loadImgs([522418])[0]["file_name"] == "COCO_val2014_000000522418.jpg"


def test_coco_output_is_stable_and_compact(tmp_path: Path) -> None:
    write_coco(coco_records(), ["person", "motorcycle"], tmp_path / "a.json", tmp_path / "b.json")
    first = (tmp_path / "a.json").read_bytes() + (tmp_path / "b.json").read_bytes()
    write_coco(coco_records(), ["person", "motorcycle"], tmp_path / "a.json", tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() + (tmp_path / "b.json").read_bytes() == first
    assert b'{"info":{' in first and b", " not in (tmp_path / "b.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporary files left


def test_coco_ids_and_errors(tmp_path: Path) -> None:
    records = [
        SourceRecord(image_id=f"img-{i}", file_name=f"{i}.jpg", captions=["x"], width=8, height=8)
        for i in range(3)
    ]
    write_coco(records, [], tmp_path / "c.json")
    assert [im["id"] for im in json.loads((tmp_path / "c.json").read_text())["images"]] == [1, 2, 3]
    with pytest.raises(ValueError, match="width and height"):
        write_coco([SourceRecord(image_id="1", file_name="1.jpg")], [], tmp_path / "d.json")
    with pytest.raises(ValueError, match="unknown category"):
        write_coco(coco_records(), ["person"], None, tmp_path / "e.json")
    with pytest.raises(ValueError, match="duplicate"):
        write_coco(records + records[:1], [], tmp_path / "f.json")
    with pytest.raises(ValueError, match="captions_path or instances_path"):
        write_coco(records, [], None, None)


def test_karpathy_coco_flavour(tmp_path: Path) -> None:
    records = coco_records()
    records[1].file_name = "val2014/COCO_val2014_000000522418.jpg"
    path = tmp_path / "dataset_coco.json"
    write_karpathy(records, path, "coco", filepath="val2014")
    data = json.loads(path.read_text())
    assert list(data) == ["images", "dataset"] and data["dataset"] == "coco"
    first, second = data["images"]
    assert list(first) == ["filepath", "sentids", "filename", "imgid", "split", "sentences", "cocoid"]
    assert first["filepath"] == "val2014" and first["filename"] == "COCO_val2014_000000391895.jpg"
    assert first["cocoid"] == 391895 and first["imgid"] == 0 and first["split"] == "test"
    assert first["sentids"] == [0, 1, 2, 3, 4] and second["sentids"] == [5]
    sentence = first["sentences"][0]
    assert list(sentence) == ["tokens", "raw", "imgid", "sentid"]
    assert sentence["raw"] == CAPTIONS[0]
    assert " ".join(sentence["tokens"]) == "a man with a red helmet on a small moped on a dirt road"
    assert (sentence["imgid"], sentence["sentid"]) == (0, 0)
    assert second["filepath"] == "val2014" and second["filename"] == "COCO_val2014_000000522418.jpg"
    assert second["split"] == default_split("522418")  # no split on the record: the hashed default
    assert second["sentences"][0]["sentid"] == 5 and second["sentences"][0]["imgid"] == 1
    assert ", " in path.read_text()  # json.dump's default separators, as in the real file


def test_karpathy_flickr30k_flavour(tmp_path: Path) -> None:
    records = [
        SourceRecord(image_id="1000092795", file_name="1000092795.jpg", captions=CAPTIONS[:2], split="train"),
        SourceRecord(image_id="10002456", file_name="10002456.jpg", captions=CAPTIONS[2:], split="val"),
    ]
    path = tmp_path / "dataset_flickr30k.json"
    write_karpathy(records, path, "flickr30k")
    data = json.loads(path.read_text())
    assert data["dataset"] == "flickr30k"
    first, second = data["images"]
    assert list(first) == ["sentids", "imgid", "sentences", "split", "filename"]
    assert "filepath" not in first and "cocoid" not in first
    assert first["filename"] == "1000092795.jpg" and first["split"] == "train"
    assert second["imgid"] == 1 and second["sentids"] == [2, 3, 4]
    assert [s["sentid"] for s in second["sentences"]] == [2, 3, 4]
    with pytest.raises(ValueError, match="flavour"):
        write_karpathy(records, path, "flickr8k")  # type: ignore[arg-type]


def test_karpathy_tokens() -> None:
    assert karpathy_tokens("A man's red T-shirt, on a bike. ") == [
        "a",
        "mans",
        "red",
        "tshirt",
        "on",
        "a",
        "bike",
    ]


def test_flickr30k_csv_has_the_kaggle_layout(tmp_path: Path) -> None:
    records = [
        SourceRecord(
            image_id="1000092795",
            file_name="flickr30k_images/1000092795.jpg",
            captions=[
                "Two young guys with shaggy hair look at their hands while hanging out in the yard.",
                "Two young, White males are outside near many bushes.",
                "Two men in green shirts are standing in a yard .",
                "A man in a blue shirt standing in a garden",
                "Two friends enjoy time spent together!",
            ],
        ),
        SourceRecord(
            image_id="2", file_name="10002456.jpg", captions=["two shapes: a red circle and a blue square"]
        ),
    ]
    path = tmp_path / "results.csv"
    write_flickr30k_csv(records, path)
    raw = path.read_text()
    assert raw.endswith("\n")
    lines = raw.splitlines()
    assert lines[0] == "image_name| comment_number| comment"
    # The first data row of the real file, byte for byte.
    assert lines[1] == (
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands"
        " while hanging out in the yard ."
    )
    rows = [line.split("| ") for line in lines[1:]]
    assert all(len(row) == 3 for row in rows)
    assert [row[1] for row in rows] == ["0", "1", "2", "3", "4", "0"]
    assert Counter(row[0] for row in rows) == {"1000092795.jpg": 5, "10002456.jpg": 1}
    assert rows[1][2] == "Two young , White males are outside near many bushes ."
    assert rows[2][2] == "Two men in green shirts are standing in a yard ."
    assert rows[3][2] == "A man in a blue shirt standing in a garden ."
    assert rows[4][2] == "Two friends enjoy time spent together !"
    assert rows[5][2] == "two shapes : a red circle and a blue square ."


def test_flickr30k_comment_refuses_pipes() -> None:
    with pytest.raises(ValueError, match=r"\|"):
        flickr30k_comment("a | b")


def test_default_split_is_deterministic_and_about_80_10_10() -> None:
    counts = Counter(default_split(str(i)) for i in range(20_000))
    assert counts["train"] / 20_000 == pytest.approx(0.8, abs=0.02)
    assert counts["val"] / 20_000 == pytest.approx(0.1, abs=0.01)
    assert counts["test"] / 20_000 == pytest.approx(0.1, abs=0.01)
    assert [default_split(str(i)) for i in range(50)] == [default_split(str(i)) for i in range(50)]

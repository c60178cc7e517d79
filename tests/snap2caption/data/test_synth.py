"""The synthetic shapes benchmark: determinism, true captions, clean boxes, real COCO files."""

from __future__ import annotations

import hashlib
import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from snap2caption.data.records import SourceDataset
from snap2caption.data.synth import (
    COLOURS,
    PLURALS,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    Scene,
    SceneObject,
    SynthConfig,
    describe_scene,
    generate_scene,
    render_scene,
    write_synth,
)

CFG = SynthConfig(images=0)
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
SINGULAR = {plural: shape for shape, plural in PLURALS.items()} | {shape: shape for shape in SHAPES}
_SIZES = "|".join(SIZES)
_COLOURS = "|".join(COLOURS)
_NOUNS = "|".join(sorted(SINGULAR, key=len, reverse=True))
# A noun phrase the captions use: determiner, optional size and colour, a shape word.
NP = rf"(?:(?:{_SIZES}) )?(?:(?:{_COLOURS}) )?(?:{_NOUNS})"
NP_WITH_DET = re.compile(rf"\b(?P<det>an|a|the|single|one|two|three|four) (?P<np>{NP})\b")
RELATION = re.compile(
    rf"\b(?:an|a|the) ({NP}) (?:is )?(to the left of|to the right of|above|below) (?:an|a|the) ({NP})\b"
)
POSITION = re.compile(
    rf"\b(?:an|a) ({NP}) (in the (?:top|bottom) (?:left|right) corner|on the (?:left|right)"
    rf"|at the (?:top|bottom)|in the middle)"
)
VOCABULARY_LIMIT = 80
# Looser than the generator's own rule (centres apart by 5% of the image), checked independently.
RELATION_HOLDS = {
    "to the left of": lambda a, b, margin: centre(a)[0] + margin < centre(b)[0],
    "to the right of": lambda a, b, margin: centre(a)[0] > centre(b)[0] + margin,
    "above": lambda a, b, margin: centre(a)[1] + margin < centre(b)[1],
    "below": lambda a, b, margin: centre(a)[1] > centre(b)[1] + margin,
}


def scenes(count: int, seed: int = 0, cfg: SynthConfig = CFG) -> list[tuple[Scene, list[str]]]:
    """Scenes and captions drawn exactly as write_synth draws them (render step skipped)."""
    out = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        scene = generate_scene(rng, cfg)
        out.append((scene, describe_scene(scene, rng)))
    return out


def matching(scene: Scene, phrase: str) -> list[SceneObject]:
    """Objects that fit a noun phrase like "large red circles"."""
    words = phrase.split()
    shape = SINGULAR[words[-1]]
    sizes = [w for w in words if w in SIZES]
    colours = [w for w in words if w in COLOURS]
    return [
        o
        for o in scene.objects
        if o.shape == shape and all(o.size == s for s in sizes) and all(o.colour == c for c in colours)
    ]


def centre(obj: SceneObject) -> tuple[float, float]:
    x, y, w, h = obj.bbox
    return x + w / 2, y + h / 2


def check_caption(scene: Scene, caption: str) -> int:
    """Assert every checkable claim in a caption; return how many claims were checked."""
    checked = 0
    size = scene.width
    for match in NP_WITH_DET.finditer(caption):
        det, phrase = match["det"], match["np"]
        noun = phrase.split()[-1]
        found = matching(scene, phrase)
        plural = noun != SINGULAR[noun]
        if det in ("a", "an"):
            assert det == ("an" if phrase[0] in "aeiou" else "a"), caption
            assert not plural and found, (caption, phrase)
        elif det == "the":
            assert not plural and len(found) == 1, (caption, phrase)
        elif det == "single":
            assert len(scene.objects) == 1 and len(found) == 1, caption
        else:
            assert plural == (NUMBERS[det] > 1), caption
            assert len(found) == NUMBERS[det], (caption, phrase, len(found))
        checked += 1
    if m := re.match(r"^(one|two|three|four) (?:shapes|objects):", caption):
        assert len(scene.objects) == NUMBERS[m[1]], caption
        checked += 1
    for m in RELATION.finditer(caption):
        pairs = [(a, b) for a in matching(scene, m[1]) for b in matching(scene, m[3]) if a is not b]
        holds = RELATION_HOLDS[m[2]]
        assert any(holds(a, b, 0.05 * size) for a, b in pairs), (caption, [o.bbox for o in scene.objects])
        checked += 1
    for m in POSITION.finditer(caption):
        where = m[2]

        def fits(o: SceneObject, where: str = where) -> bool:
            cx, cy = centre(o)[0] / size, centre(o)[1] / size
            ok = True
            if "left" in where:
                ok &= cx < 0.4
            if "right" in where:
                ok &= cx > 0.6
            if "top" in where:
                ok &= cy < 0.4
            if "bottom" in where:
                ok &= cy > 0.6
            if "middle" in where:
                ok &= abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1
            return ok

        assert any(fits(o) for o in matching(scene, m[1])), (caption, [o.bbox for o in scene.objects])
        checked += 1
    if m := re.match(rf"^(two|three|four) ({_NOUNS}), (.*)$", caption):
        group = [o for o in scene.objects if o.shape == SINGULAR[m[2]]]
        assert len(group) == NUMBERS[m[1]], caption
        for count, colour in re.findall(rf"(one|two|three) ({_COLOURS})", m[3]):
            assert sum(o.colour == colour for o in group) == NUMBERS[count], caption
        checked += 1
    if m := re.match(rf"^the (largest|smallest) shape is (?:an|a) ({NP})$", caption):
        extreme = (max if m[1] == "largest" else min)(scene.objects, key=lambda o: max(o.bbox[2:]))
        assert extreme in matching(scene, m[2]), caption
        checked += 1
    if m := re.search(r" on a (plain|gradient|textured) background$", caption):
        assert scene.background.kind == m[1], caption
        checked += 1
    return checked


def test_captions_are_true_distinct_and_varied() -> None:
    vocabulary: set[str] = set()
    openings: set[str] = set()
    for scene, captions in scenes(200):
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            assert check_caption(scene, caption) > 0, caption
            assert caption == caption.strip() and "  " not in caption
            vocabulary.update(re.findall(r"[a-z]+", caption))
            openings.add(" ".join(caption.split()[:2]))
        # The first caption names every object: counts per (colour, shape) add up to the scene.
        mentioned: dict[tuple[str, str], int] = {}
        for match in NP_WITH_DET.finditer(captions[0]):
            words = match["np"].split()
            key = (next(w for w in words if w in COLOURS), SINGULAR[words[-1]])
            mentioned[key] = mentioned.get(key, 0) + NUMBERS.get(match["det"], 1)
        actual: dict[tuple[str, str], int] = {}
        for o in scene.objects:
            actual[(o.colour, o.shape)] = actual.get((o.colour, o.shape), 0) + 1
        assert mentioned == actual, captions[0]
    assert len(vocabulary) <= VOCABULARY_LIMIT, sorted(vocabulary)
    assert {"left", "above", "below", "corner", "two", "there", "largest"} <= vocabulary
    assert len(openings) >= 20  # structures vary, not five copies of one template


def test_relations_and_positions_are_stated() -> None:
    """The geometric templates fire often enough to teach relations."""
    captions = [c for _, caps in scenes(100) for c in caps]
    assert sum(bool(RELATION.search(c)) for c in captions) >= 50
    assert sum(bool(POSITION.search(c)) for c in captions) >= 50


def test_scenes_cover_classes_colours_sizes_and_keep_boxes_clean() -> None:
    drawn = scenes(50)
    objects = [o for scene, _ in drawn for o in scene.objects]
    assert len(SHAPES) >= 8 and {o.shape for o in objects} == set(SHAPES)
    assert len({o.colour for o in objects}) >= 7
    assert {o.size for o in objects} == set(SIZES)
    assert {scene.background.kind for scene, _ in drawn} == {"plain", "gradient", "textured"}
    assert {len(scene.objects) for scene, _ in drawn} == {1, 2, 3, 4}
    for scene, _ in drawn:
        for o in scene.objects:
            x, y, w, h = o.bbox
            assert x >= 0 and y >= 0 and x + w <= scene.width and y + h <= scene.height
            lo, hi = SIZE_RANGES[o.size]
            assert lo * scene.width - 0.5 <= max(w, h) <= hi * scene.width + 0.5
            xs, ys = [p[0] for p in o.polygon], [p[1] for p in o.polygon]
            assert min(xs) == pytest.approx(x, abs=0.02) and max(ys) == pytest.approx(y + h, abs=0.02)
        for a, b in combinations(scene.objects, 2):
            assert iou(a.bbox, b.bbox) < 0.05


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def colour_near(pixels: np.ndarray, rgb: tuple[int, int, int], radius: float = 60.0) -> np.ndarray:
    return np.linalg.norm(pixels.astype(float) - np.array(rgb, dtype=float), axis=-1) < radius


SYNTH_CFG = SynthConfig(images=24, seed=7)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SourceDataset]:
    out = tmp_path_factory.mktemp("synth")
    dataset = write_synth(out, SYNTH_CFG, formats=("coco", "karpathy", "flickr30k"), progress=False)
    return out, dataset


@pytest.fixture(scope="module")
def synth_dir(synth: tuple[Path, SourceDataset]) -> Path:
    return synth[0]


def test_rendered_pixels_match_boxes_and_contrast_with_background(synth_dir: Path) -> None:
    instances = json.loads((synth_dir / "annotations" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    rng = np.random.default_rng(0)
    for image in instances["images"]:
        pixels = np.asarray(Image.open(synth_dir / "images" / image["file_name"]).convert("RGB"))
        scene = generate_scene(np.random.default_rng([SYNTH_CFG.seed, image["id"] - 1]), SYNTH_CFG)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for ann, obj in zip(by_image[image["id"]], scene.objects, strict=True):
            assert names[ann["category_id"]] == obj.shape
            x, y, w, h = (round(v) for v in ann["bbox"])
            inside = pixels[y : y + h, x : x + w]
            # The object's colour fills a good part of its box (a star fills the least, about a third).
            assert colour_near(inside, COLOURS[obj.colour]).mean() > 0.2, (image["file_name"], obj)
            outside[max(0, y - 3) : y + h + 3, max(0, x - 3) : x + w + 3] = False
        # ...and no object colour of the scene shows up in the background.
        for obj in scene.objects:
            assert colour_near(pixels[outside], COLOURS[obj.colour], radius=40).mean() < 0.01
    # render_scene on its own gives the configured size and mode.
    scene = generate_scene(rng, SynthConfig(images=1, image_size=128))
    image = render_scene(scene, rng)
    assert image.size == (128, 128) and image.mode == "RGB"


def test_coco_files_load_in_pycocotools(synth_dir: Path) -> None:
    from pycocotools.coco import COCO

    coco = COCO(str(synth_dir / "annotations" / "instances.json"))
    categories = coco.loadCats(coco.getCatIds())
    assert [c["name"] for c in categories] == list(SHAPES)
    assert [c["id"] for c in categories] == list(range(1, len(SHAPES) + 1))
    assert all(c["supercategory"] == "shape" for c in categories)
    assert len(coco.getImgIds()) == SYNTH_CFG.images
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert ann["iscrowd"] == 0 and len(ann["segmentation"]) == 1
        # COCO's area is the mask area; the polygon rasterises to about that many pixels.
        assert coco.annToMask(ann).sum() == pytest.approx(ann["area"], rel=0.15)
    captions = json.loads((synth_dir / "annotations" / "captions.json").read_text())
    assert set(captions) == {"info", "licenses", "images", "annotations"}
    per_image: dict[int, list[str]] = {}
    for ann in captions["annotations"]:
        assert set(ann) == {"image_id", "id", "caption"}
        per_image.setdefault(ann["image_id"], []).append(ann["caption"])
    assert len(per_image) == SYNTH_CFG.images and all(len(set(c)) == 5 for c in per_image.values())
    image = captions["images"][0]
    assert image["file_name"] == "000000000001.jpg" and image["id"] == 1
    assert {"width", "height", "license", "date_captured"} <= set(image)
    for name in ("dataset_synth.json", "results.csv"):
        assert (synth_dir / "annotations" / name).is_file()
    assert len(list((synth_dir / "images").glob("*.jpg"))) == SYNTH_CFG.images


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files_in_any_number_of_processes(tmp_path: Path) -> None:
    serial = write_synth(tmp_path / "a", SynthConfig(images=16, seed=3, workers=1), progress=False)
    parallel = write_synth(tmp_path / "b", SynthConfig(images=16, seed=3, workers=2), progress=False)
    write_synth(tmp_path / "c", SynthConfig(images=16, seed=4, workers=1), progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert serial.records == parallel.records
    differs = {k for k, v in digest(tmp_path / "c").items() if digest(tmp_path / "a")[k] != v}
    assert "annotations/instances.json" in differs and len(differs) > 12


def test_returned_records_match_files(synth: tuple[Path, SourceDataset]) -> None:
    synth_dir, dataset = synth
    assert dataset.categories == list(SHAPES)
    captions = json.loads((synth_dir / "annotations" / "captions.json").read_text())
    assert [a["caption"] for a in captions["annotations"]] == [c for r in dataset.records for c in r.captions]
    assert {r.split for r in dataset.records} <= {"train", "val", "test"}
    assert all(r.width == r.height == 256 for r in dataset.records)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_objects"):
        SynthConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="seed"):
        SynthConfig(seed=-1)
    with pytest.raises(ValueError, match="unknown formats"):
        write_synth("/nonexistent", SynthConfig(images=1), formats=("yolo",))


def test_cli_writes_dataset_and_summary(tmp_path: Path) -> None:
    from snap2caption.cli import main

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main,
        ["data", "synth", "--out", str(out), "--images", "6", "--seed", "1", "--formats", "coco,flickr30k"],
    )
    assert result.exit_code == 0, result.output
    assert "synth: 6 images, 30 captions" in result.output
    assert (out / "annotations" / "instances.json").is_file()
    assert (out / "annotations" / "results.csv").is_file()
    assert not (out / "annotations" / "dataset_synth.json").exists()

"""The detector runtime: letterbox, NMS, post-processing, and ONNX Runtime vs PyTorch parity."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snap2caption.manifest import write_manifest
from snap2caption.models import detector as detector_model
from snap2caption.models.detector import yolo
from snap2caption.models.detector.boxes import Letterbox, letterbox, nms, postprocess
from snap2caption.models.detector.config import FEATURE_NAME, DetectorConfig
from snap2caption.models.detector.runtime import Detector
from snap2caption.models.domain import DomainModel, fit_domain
from snap2caption.models.onnx_io import read_metadata

NAMES = ["circle", "square", "star"]
# Parity tolerance, ONNX Runtime vs PyTorch, both float32 on CPU: boxes within 0.01 px at 64 px input,
# scores within 1e-4 (measured differences are ~1e-5 px and ~1e-7).
BOX_ATOL, SCORE_ATOL = 1e-2, 1e-4


@pytest.fixture(scope="module", autouse=True)
def _yolo_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo-config")))
    yield


def test_letterbox_matches_ultralytics_geometry() -> None:
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    pixels, box = letterbox(image, 64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32
    assert box == Letterbox(gain=0.32, pad_x=0, pad_y=16, width=200, height=100)
    assert pixels[:, 0, 0] == pytest.approx([114 / 255] * 3)  # grey padding above
    assert pixels[:, 32, 32] == pytest.approx([1.0, 0.0, 0.0])  # the image, RGB order, / 255
    small, box_small = letterbox(Image.new("L", (10, 20)), 64)  # upscaled, grey converted
    assert (box_small.gain, box_small.pad_x, box_small.pad_y) == (3.2, 16, 0) and small.shape == (3, 64, 64)


def test_nms_keeps_best_and_drops_overlaps() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.5, 0.9, 0.3, 0.1], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 2, 3]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_postprocess_maps_boxes_to_original_pixels() -> None:
    # One image 200x100 letterboxed to 64: gain 0.32, pad_y 16. Anchor 0: a square at (32, 32) 16 px wide.
    raw = np.zeros((1, 4 + len(NAMES), 3), np.float32)
    raw[0, :4, 0] = [32, 32, 16, 16]
    raw[0, 4 + 1, 0] = 0.8  # square
    raw[0, :4, 1] = [33, 32, 16, 16]  # same place, same class, lower score: suppressed
    raw[0, 4 + 1, 1] = 0.6
    raw[0, :4, 2] = [33, 32, 16, 16]  # same place, other class: kept (class-aware NMS)
    raw[0, 4 + 2, 2] = 0.5
    (dets,) = postprocess(raw, [Letterbox(0.32, 0, 16, 200, 100)], NAMES, conf=0.25, iou=0.45)
    assert [(d.class_name, d.score) for d in dets] == [("square", pytest.approx(0.8)), ("star", 0.5)]
    assert dets[0].box_xyxy == pytest.approx((75.0, 25.0, 125.0, 75.0))
    assert postprocess(raw, [Letterbox(0.32, 0, 16, 200, 100)], NAMES, conf=0.9) == [[]]
    with pytest.raises(ValueError, match="does not fit"):
        postprocess(raw, [], NAMES)


def _random_yolo(seed: int = 0) -> tuple[torch.nn.Module, dict[str, object]]:
    """yolov8n.yaml with random weights, made to look like a detector: class biases spread so that scores
    differ, and box distances peaked at one DFL bin (one stride per side, varying a little with the image)
    so that boxes have sizes NMS can tell apart instead of all covering the whole input."""
    torch.manual_seed(seed)
    cfg = yolo.model_yaml("yolov8n.yaml")
    model = yolo.build_detection_model(cfg, nc=len(NAMES))
    head = yolo.detect_head(model)
    with torch.no_grad():
        for branch in head.cv3:
            branch[-1].bias.normal_(0.0, 2.0)
        for branch in head.cv2:
            branch[-1].weight.mul_(0.1)
            bias = torch.full((4, head.reg_max), -3.0)
            bias[:, 1] = 3.0
            branch[-1].bias.copy_(bias.flatten())
    return model.eval(), cfg


@pytest.fixture(scope="module")
def random_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from snap2caption.models.detector.artifact import write_artifact

    model, cfg = _random_yolo()
    config = DetectorConfig(names=NAMES, imgsz=64, stride=32, model="yolov8n.yaml")
    folder = write_artifact(tmp_path_factory.mktemp("detector"), model, cfg, config)
    write_manifest(folder)
    return folder


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in ((48, 80), (64, 64), (90, 30))
    ]


def test_onnx_and_torch_agree(random_artifact: Path) -> None:
    onnx_det = detector_model.load(random_artifact, "onnx")
    torch_det = detector_model.load(random_artifact, "torch")
    assert (onnx_det.runtime, torch_det.runtime, detector_model.load(random_artifact).runtime) == (
        "onnx",
        "torch",
        "onnx",  # auto: the artifact has model.onnx
    )
    pixels, _ = onnx_det.preprocess(_photos())
    (raw_onnx, feat_onnx), (raw_torch, feat_torch) = onnx_det.forward(pixels), torch_det.forward(pixels)
    assert raw_onnx.shape == raw_torch.shape == (3, 4 + len(NAMES), 8 * 8 + 4 * 4 + 2 * 2)
    np.testing.assert_allclose(raw_onnx[:, :4], raw_torch[:, :4], atol=BOX_ATOL)
    np.testing.assert_allclose(raw_onnx[:, 4:], raw_torch[:, 4:], atol=SCORE_ATOL)
    np.testing.assert_array_equal(onnx_det.raw(pixels), raw_onnx)  # raw: the same pass, boxes only
    # The detector's own features come from the same pass, equal on both runtimes: yolov8n's layers 2 and
    # 4 have 32 and 64 channels at width 0.25.
    assert feat_onnx is not None and feat_torch is not None
    assert feat_onnx.shape == feat_torch.shape == (3, 32 + 64)
    np.testing.assert_allclose(feat_onnx, feat_torch, rtol=1e-4, atol=1e-5 * np.abs(feat_torch).max())
    assert np.abs(feat_onnx[0] - feat_onnx[1]).max() > 1e-3 * np.abs(feat_onnx).max()  # per image
    assert onnx_det.domain is None and torch_det.domain is None  # this artifact has no domain model
    assert [a.domain for a in onnx_det.analyze(_photos())] == [None] * 3

    # Batched and one-by-one give the same detections; both backends give the same detections.
    a = onnx_det.detect(_photos(), conf=0.3, batch_size=8)
    b = torch_det.detect(_photos(), conf=0.3, batch_size=1)
    assert [len(x) for x in a] == [len(x) for x in b] and sum(len(x) for x in a) > 3
    for dets_a, dets_b in zip(a, b, strict=True):
        unmatched = list(dets_b)  # equal scores may come out in another order: match, don't zip
        for da in dets_a:
            match = next(
                db
                for db in unmatched
                if db.class_id == da.class_id
                and db.score == pytest.approx(da.score, abs=SCORE_ATOL)
                and db.box_xyxy == pytest.approx(da.box_xyxy, abs=BOX_ATOL / 0.32)  # / gain: original pixels
            )
            unmatched.remove(match)


def test_onnx_metadata_describes_the_model(random_artifact: Path) -> None:
    meta = read_metadata(random_artifact / "model.onnx")
    assert meta["snap2caption.format"] == "snap2caption.detector"
    assert json.loads(meta["names"]) == NAMES and json.loads(meta["imgsz"]) == 64
    assert json.loads(meta["input"])["shape"] == ["batch", 3, 64, 64]
    assert json.loads(meta["letterbox"])["pad_value"] == 114
    # The ONNX file alone is enough for a runtime: its metadata rebuild the config.
    assert Detector.from_onnx(random_artifact / "model.onnx").names == NAMES


def test_load_refuses_mismatched_metadata_and_tampering(random_artifact: Path, tmp_path: Path) -> None:
    import shutil

    from snap2caption.errors import ArtifactIntegrityError

    copy = tmp_path / "copy"
    shutil.copytree(random_artifact, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "names": ["a", "b", "c"]}))
    with pytest.raises(ArtifactIntegrityError):
        detector_model.load(copy)
    with pytest.raises(ValueError, match=r"does not match config\.json"):
        detector_model.load(copy, verify=False)
    with pytest.raises(ValueError, match="did you mean 'names'"):
        DetectorConfig.from_dict({**config, "nmes": NAMES})


def test_int8_export_loads_and_tracks_the_float_model(random_artifact: Path, tmp_path: Path) -> None:
    import shutil

    from snap2caption.models.detector.export import export_int8

    det = detector_model.load(random_artifact)
    pixels, _ = det.preprocess(_photos())
    folder = tmp_path / "artifact"
    shutil.copytree(random_artifact, folder)
    export_int8(folder, [pixels])
    write_manifest(folder)
    int8 = detector_model.load(folder, "onnx", int8=True)
    assert "int8" in read_metadata(folder / "model.int8.onnx")["quantization"]
    with pytest.raises(ValueError, match="int8 is an ONNX variant"):
        detector_model.load(folder, "torch", int8=True)
    (raw, features), (raw_int8, features_int8) = det.forward(pixels), int8.forward(pixels)
    assert raw_int8.shape == raw.shape
    assert np.abs(raw_int8[:, :4] - raw[:, :4]).mean() < 2.0  # pixels; a random net is a hard case
    # The int8 graph keeps the features output (quantized layers: close to, not equal to, float). Mean
    # error relative to the mean magnitude, on this random net: 0.106 with onnxruntime 1.32 (under 0.1 with
    # earlier releases, whose quantizer rounds differently); the direction of each image's features (what
    # the domain distance reads) agrees far more closely: cosine 0.997 each.
    assert features is not None and features_int8 is not None and features_int8.shape == features.shape
    assert np.abs(features_int8 - features).mean() < 0.2 * np.abs(features).mean()
    flat, flat_int8 = features.reshape(len(features), -1), features_int8.reshape(len(features), -1)
    cosine = (flat * flat_int8).sum(1) / np.linalg.norm(flat, axis=1) / np.linalg.norm(flat_int8, axis=1)
    assert (cosine > 0.99).all(), cosine


def test_fine_tuning_weights_load_without_unpickling_code(tmp_path: Path) -> None:
    import datetime as dt

    # An Ultralytics-style checkpoint: the whole (half-precision) COCO model object under "model".
    coco = yolo.build_detection_model(yolo.model_yaml("yolov8n.yaml"), nc=80).half()
    torch.save({"model": coco, "epoch": -1, "date": "2024-01-01"}, tmp_path / "coco.pt")
    state = yolo.read_pretrained(tmp_path / "coco.pt")  # torch.load(weights_only=True), allow-listed classes
    model, _ = _random_yolo()
    own = model.state_dict()
    copied, total = yolo.transfer_weights(model, state)
    fits = [k for k in own if k in state and state[k].shape == own[k].shape]
    assert copied == len(fits) and total == len(own)
    head = f"model.{yolo.detect_head(model).i}."  # the Detect layer, by index
    assert all(k in fits for k in own if not k.startswith(head))  # the whole backbone and neck
    assert any(k.startswith(head + "cv2.") for k in fits)  # box branch kept
    assert not any(k.startswith(head + "cv3.0.2.") for k in fits)  # class convs: 80 -> 3 classes
    assert torch.equal(model.state_dict()["model.0.conv.weight"], state["model.0.conv.weight"])

    torch.save({"model": coco, "when": dt.date(2024, 1, 1)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"refusing a checkpoint that names \['datetime.date'\]"):
        yolo.read_pretrained(tmp_path / "odd.pt")
    with pytest.raises(FileNotFoundError, match="offline"):
        yolo.read_pretrained(tmp_path / "missing.pt")


def test_importing_ultralytics_leaves_the_safe_decoder_alone() -> None:
    """Ultralytics patches PIL.Image.open process-wide; prepare_ultralytics undoes it."""
    import io

    from PIL import Image

    from snap2caption.errors import CorruptImage
    from snap2caption.imaging import decode_image
    from snap2caption.models.detector.yolo import prepare_ultralytics

    prepare_ultralytics()
    assert Image.open.__module__ == "PIL.Image"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="GIF")
    with pytest.raises(CorruptImage):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 10])


def _domain_for(detector: Detector, seed: int = 0) -> DomainModel:
    """A domain model in the detector's feature space, fitted on noise images (enough to load and check)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(70)]
    pixels, _ = detector.preprocess(images)
    features = detector.forward(pixels)[1]
    assert features is not None
    return fit_domain(features[:20], features[20:], feature=FEATURE_NAME)


def test_domain_model_loads_with_the_detector_and_is_checked(random_artifact: Path, tmp_path: Path) -> None:
    import shutil

    from snap2caption.errors import ArtifactError, ArtifactIntegrityError

    folder = tmp_path / "with-domain"
    shutil.copytree(random_artifact, folder)
    domain = _domain_for(detector_model.load(random_artifact, "onnx"))
    domain.save(folder)
    write_manifest(folder)
    for runtime in ("onnx", "torch"):
        det = detector_model.load(folder, runtime)
        assert det.domain is not None and det.domain.dim == 96
        answers = det.analyze(_photos())
        assert all(a.domain is not None and a.features is not None for a in answers)
        expected = domain.check(np.stack([a.features for a in answers if a.features is not None]))
        got = [a.domain for a in answers if a.domain is not None]
        assert [c.in_domain for c in got] == [c.in_domain for c in expected]
        assert [c.distance for c in got] == pytest.approx([c.distance for c in expected])

    (folder / "domain.npz").unlink()  # half a domain model: refused, manifest or not
    with pytest.raises(ArtifactIntegrityError):
        detector_model.load(folder)
    with pytest.raises(ArtifactError, match="must come together"):
        detector_model.load(folder, verify=False)


def test_an_artifact_exported_before_features_still_loads(random_artifact: Path, tmp_path: Path) -> None:
    """``model.onnx`` with ``output0`` alone (as exported before the features output): it loads, detects as
    before, and says nothing about its domain; a domain model beside it is refused (it cannot be checked)."""
    import shutil

    from snap2caption.errors import ArtifactError
    from snap2caption.models.detector.config import INPUT_NAME, OUTPUT_NAME
    from snap2caption.models.onnx_export import export_onnx

    folder = tmp_path / "old"
    shutil.copytree(random_artifact, folder)
    model, _ = _random_yolo()
    config = DetectorConfig(names=NAMES, imgsz=64, stride=32, model="yolov8n.yaml")
    example = torch.zeros(1, 3, 64, 64)
    export_onnx(yolo.inference_model(model), folder / "model.onnx", example, input_name=INPUT_NAME,
                output_name=OUTPUT_NAME, metadata=config.onnx_metadata())  # fmt: skip
    write_manifest(folder)
    old = detector_model.load(folder, "onnx")
    assert not old.has_features and old.domain is None
    pixels, _ = old.preprocess(_photos())
    raw, features = old.forward(pixels)
    assert features is None
    np.testing.assert_allclose(raw, detector_model.load(random_artifact, "onnx").raw(pixels), atol=1e-4)
    assert [a.domain for a in old.analyze(_photos())] == [None] * 3
    assert old.detect(_photos()) == [a.objects for a in old.analyze(_photos())]
    rebuilt = detector_model.load(folder, "torch")  # from the weights: features, still no domain model
    assert rebuilt.has_features and rebuilt.domain is None

    _domain_for(detector_model.load(random_artifact, "onnx")).save(folder)
    write_manifest(folder)
    with pytest.raises(ArtifactError, match="gives no features"):
        detector_model.load(folder, "onnx")

"""The object detector at run time: letterbox, a YOLO network (ONNX Runtime or PyTorch), numpy NMS.

``Detector.load(artifact_dir, backend="onnx")`` is what the detector service runs; ``backend="torch"``
rebuilds the Ultralytics network from ``model.yaml`` + ``model.safetensors`` (no pickle). Both backends
share the preprocessing and post-processing below, so they differ only in the network's arithmetic.

An artifact folder::

    model.safetensors   DetectionModel state dict (float32, unfused)
    model.yaml          the Ultralytics model definition (dict, ``nc`` and ``scale`` included)
    model.onnx          images (B, 3, S, S) float32 -> output0 (B, 4 + nc, anchors); metadata_props hold
                        the class names, input size, letterbox and normalisation (``DetectorConfig``)
    model.int8.onnx     optional: the same graph, int8 (``snap2caption export detector --int8``)
    config.json         ``DetectorConfig`` plus ``extra`` (training config, metrics, data)
    README.md           model card
    MANIFEST.json       sha256 of every other file

Preprocessing (``letterbox``): RGB, resize keeping the aspect ratio so the longer side is ``imgsz`` (PIL
bilinear, antialiased when shrinking), pad to ``imgsz`` x ``imgsz`` with grey 114 centred, pixels / 255,
NCHW float32. Boxes come back in the pixels of the image passed in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from snap2caption.config import from_dict

if TYPE_CHECKING:
    import onnxruntime

FORMAT = "snap2caption.detector"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MODEL_YAML_FILE = "model.yaml"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "output0"
_MAX_WH = 7680.0  # class offset for class-aware NMS in one pass: larger than any letterboxed side
_MAX_NMS = 30000  # candidates kept (by score) before NMS

Backend = Literal["onnx", "torch"]


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        class_id: Index into the detector's class names.
        class_name: The class name.
        score: Class confidence in [0, 1].
        box_xyxy: ``(x1, y1, x2, y2)`` in pixels of the image given to :meth:`Detector.detect`.
    """

    class_id: int
    class_name: str
    score: float
    box_xyxy: tuple[float, float, float, float]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything besides the weights that a runtime needs; ``config.json`` and the ONNX metadata.

    Attributes:
        names: Class names in output order.
        imgsz: Side of the square network input.
        stride: Largest stride of the network (``imgsz`` is a multiple of it).
        model: The Ultralytics model YAML it was built from (``yolov8n.yaml``).
        pad_value: Letterbox padding grey level (0..255).
        resample: PIL filter of the letterbox resize.
        scale: Pixel scale: input = RGB pixel * ``scale``.
        format: Artifact format name.
        format_version: Bumped when the layout changes.
        extra: Facts kept with the model (training config, metrics, data); not used at run time.
    """

    names: list[str]
    imgsz: int
    stride: int
    model: str
    pad_value: int = 114
    resample: Literal["bilinear"] = "bilinear"
    scale: float = 1.0 / 255.0
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.format != FORMAT or self.format_version != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} config: {self.format} v{self.format_version}")
        if not self.names:
            raise ValueError("a detector needs at least one class name")
        if self.imgsz < self.stride or self.imgsz % self.stride:
            raise ValueError(f"imgsz {self.imgsz} must be a positive multiple of the stride {self.stride}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        """Build from a dict; unknown keys are refused with the nearest known one."""
        extra = data.get("extra", {})
        config = from_dict(cls, {k: v for k, v in data.items() if k != "extra"})
        return DetectorConfig(**{**asdict(config), "extra": dict(extra)})

    def onnx_metadata(self) -> dict[str, Any]:
        """What goes into the ONNX file's ``metadata_props`` (JSON values), so the file describes itself."""
        return {
            "snap2caption.format": self.format,
            "format_version": self.format_version,
            "task": "detect",
            "names": self.names,
            "imgsz": self.imgsz,
            "stride": self.stride,
            "model": self.model,
            "input": {
                "name": INPUT_NAME,
                "shape": ["batch", 3, self.imgsz, self.imgsz],
                "layout": "NCHW RGB",
            },
            "output": {
                "name": OUTPUT_NAME,
                "shape": ["batch", 4 + self.num_classes, "anchors"],
                "rows": "cx, cy, w, h (input pixels), then one sigmoid score per class; NMS not included",
            },
            "letterbox": {
                "resize": f"keep aspect, longer side = imgsz, PIL {self.resample}",
                "pad_value": self.pad_value,
                "center": True,
            },
            "normalize": {"scale": self.scale, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        }

    def check_onnx_metadata(self, metadata: dict[str, str]) -> None:
        """Raise ``ValueError`` unless an ONNX file's metadata matches this config (names, size, format)."""
        for key in ("snap2caption.format", "names", "imgsz"):
            if key not in metadata:
                raise ValueError(
                    f"ONNX metadata has no {key!r}; export it with `snap2caption export detector`"
                )
        got = (metadata["snap2caption.format"], json.loads(metadata["names"]), json.loads(metadata["imgsz"]))
        if got != (self.format, self.names, self.imgsz):
            raise ValueError(
                f"ONNX metadata {got} does not match config.json {(self.format, self.names, self.imgsz)}"
            )


@dataclass(frozen=True)
class Letterbox:
    """How one image was letterboxed: ``input = original * gain + pad``."""

    gain: float
    pad_x: int
    pad_y: int
    width: int
    height: int


def letterbox(image: Image.Image, imgsz: int, pad_value: int = 114) -> tuple[np.ndarray, Letterbox]:
    """Resize (aspect kept, longer side ``imgsz``) and pad an RGB image to a square, as Ultralytics does.

    Returns:
        ``(pixels, letterbox)``: (3, imgsz, imgsz) float32 in [0, 1], and the transform to undo on boxes.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    gain = min(imgsz / width, imgsz / height)
    new_w, new_h = max(1, round(width * gain)), max(1, round(height * gain))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pad_x, pad_y = round((imgsz - new_w) / 2 - 0.1), round((imgsz - new_h) / 2 - 0.1)
    canvas = np.full((imgsz, imgsz, 3), pad_value, dtype=np.uint8)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = np.asarray(image)
    pixels = canvas.transpose(2, 0, 1).astype(np.float32) / 255.0  # (3, S, S)
    return pixels, Letterbox(gain, pad_x, pad_y, width, height)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best score first.

    Args:
        boxes: (N, 4) ``x1, y1, x2, y2``.
        scores: (N,).
        iou_threshold: A box is dropped when its IoU with a kept, better box is above this.
    """
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        if not rest.size:
            break
        w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (areas[best] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    raw: np.ndarray,
    boxes_meta: Sequence[Letterbox],
    names: Sequence[str],
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 100,
    multi_label: bool = False,
) -> list[list[Detection]]:
    """Turn raw network output into detections in original-image pixels.

    Each anchor gives one candidate, its best class (Ultralytics' predict mode), or with ``multi_label``
    one per class above ``conf`` (the YOLO evaluation protocol: mAP rewards the second hypothesis of an
    ambiguous object); candidates go through class-aware NMS; at most ``max_det`` per image remain, best
    first.

    Args:
        raw: (B, 4 + nc, anchors) from the network.
        boxes_meta: The letterbox of each image.
        names: Class names.
        conf: Minimum class score.
        iou: NMS IoU threshold.
        max_det: Most detections per image.
        multi_label: One candidate per (anchor, class) above ``conf`` instead of per anchor.
    """
    if raw.ndim != 3 or raw.shape[1] != 4 + len(names) or raw.shape[0] != len(boxes_meta):
        raise ValueError(
            f"raw output {raw.shape} does not fit {len(boxes_meta)} images x {len(names)} classes"
        )
    results: list[list[Detection]] = []
    for pred, meta in zip(raw.transpose(0, 2, 1), boxes_meta, strict=True):  # (anchors, 4 + nc)
        scores_all = pred[:, 4:]
        if multi_label:
            anchor, cls = np.nonzero(scores_all > conf)
        else:
            best = scores_all.argmax(1)
            anchor = np.nonzero(scores_all[np.arange(len(best)), best] > conf)[0]
            cls = best[anchor]
        if not len(anchor):
            results.append([])
            continue
        xywh, score = pred[anchor, :4], scores_all[anchor, cls]
        if len(score) > _MAX_NMS:
            top = np.argsort(-score, kind="stable")[:_MAX_NMS]
            xywh, cls, score = xywh[top], cls[top], score[top]
        xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        keep = nms(xyxy + cls[:, None] * _MAX_WH, score, iou)[:max_det]
        xyxy = (xyxy[keep] - [meta.pad_x, meta.pad_y, meta.pad_x, meta.pad_y]) / meta.gain
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, meta.width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, meta.height)
        results.append(
            [
                Detection(
                    int(c), names[int(c)], float(s), (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
                )
                for b, c, s in zip(xyxy, cls[keep], score[keep], strict=True)
            ]
        )
    return results


class Detector:
    """A YOLO detector: ``detect(images) -> detections`` on ONNX Runtime or PyTorch.

    Args:
        config: Class names, input size, letterbox.
        runner: ``pixels (B, 3, S, S) float32 -> raw (B, 4 + nc, anchors) float32``.
        backend: ``"onnx"`` or ``"torch"``, for logs and reports.
    """

    def __init__(
        self, config: DetectorConfig, runner: Callable[[np.ndarray], np.ndarray], backend: str
    ) -> None:
        self.config = config
        self.runner = runner
        self.backend = backend

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backend: Backend = "onnx",
        *,
        int8: bool = False,
        threads: int = 1,
        session_options: onnxruntime.SessionOptions | None = None,
        verify: bool = True,
    ) -> Detector:
        """Load an artifact folder (see the module docstring).

        Args:
            directory: The folder.
            backend: ``"onnx"`` (ONNX Runtime, CPU) or ``"torch"`` (Ultralytics network rebuilt from
                YAML + safetensors; needs the ``train`` extra).
            int8: Run ``model.int8.onnx`` instead of ``model.onnx`` (ONNX only).
            threads: ONNX Runtime intra-op threads (torch uses the process's own setting).
            session_options: ONNX Runtime options to use as they are (a service's own).
            verify: Check every file against ``MANIFEST.json`` first.

        Raises:
            ArtifactIntegrityError: ``verify`` and the files do not match the manifest.
            FileNotFoundError: A needed file is missing.
            ValueError: A bad config, ONNX metadata that does not match it, or weights that do not fit.
        """
        folder = Path(directory)
        if verify:
            from snap2caption.registry import verify_manifest

            verify_manifest(folder)
        config = DetectorConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        if backend == "onnx":
            return cls.from_onnx(
                folder / (INT8_ONNX_FILE if int8 else ONNX_FILE),
                config,
                threads=threads,
                session_options=session_options,
            )
        if backend == "torch":
            if int8:
                raise ValueError("int8 is an ONNX variant; use backend='onnx'")
            return cls.from_torch(load_torch_model(folder), config)
        raise ValueError(f"backend must be 'onnx' or 'torch', got {backend!r}")

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        config: DetectorConfig | None = None,
        *,
        threads: int = 1,
        session_options: onnxruntime.SessionOptions | None = None,
    ) -> Detector:
        """A detector on one ONNX file; ``config`` defaults to the file's own metadata."""
        from snap2caption.models.onnx_io import cpu_session, session_metadata

        session = cpu_session(path, threads=threads, options=session_options)
        metadata = session_metadata(session)
        if config is None:
            config = config_from_metadata(metadata)
        config.check_onnx_metadata(metadata)
        input_name = session.get_inputs()[0].name

        def run(pixels: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {input_name: pixels})[0])

        return cls(config, run, "onnx")

    @classmethod
    def from_torch(cls, model: Any, config: DetectorConfig) -> Detector:
        """A detector on an in-memory Ultralytics network (made ready with ``yolo.inference_model``)."""
        import torch

        def run(pixels: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = model(torch.from_numpy(pixels))
            return np.asarray((out[0] if isinstance(out, tuple | list) else out).float().numpy())

        return cls(config, run, "torch")

    @property
    def names(self) -> list[str]:
        """Class names."""
        return self.config.names

    @property
    def imgsz(self) -> int:
        """Network input side."""
        return self.config.imgsz

    def preprocess(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[Letterbox]]:
        """Letterbox a batch: ``(B, 3, S, S)`` float32 and the per-image transforms."""
        arrays, metas = [], []
        for image in images:
            pixels, meta = letterbox(image, self.config.imgsz, self.config.pad_value)
            arrays.append(pixels)
            metas.append(meta)
        if not arrays:
            return np.zeros((0, 3, self.imgsz, self.imgsz), np.float32), []
        return np.stack(arrays), metas

    def raw(self, pixels: np.ndarray) -> np.ndarray:
        """Run the network on letterboxed pixels: (B, 3, S, S) -> (B, 4 + nc, anchors) float32."""
        return self.runner(np.ascontiguousarray(pixels, dtype=np.float32))

    def detect(
        self,
        images: Sequence[Image.Image],
        conf: float = 0.25,
        iou: float = 0.45,
        max_det: int = 100,
        batch_size: int = 16,
        multi_label: bool = False,
    ) -> list[list[Detection]]:
        """Detect objects in each image, in batches of at most ``batch_size``.

        Args:
            images: PIL images (converted to RGB when they are not).
            conf: Minimum class score.
            iou: NMS IoU threshold (class-aware).
            max_det: Most detections per image.
            batch_size: Images per network call.
            multi_label: Several classes per anchor (for mAP evaluation; see :func:`postprocess`).

        Returns:
            Per image, detections best first, boxes in that image's pixels.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[list[Detection]] = []
        for start in range(0, len(images), batch_size):
            pixels, metas = self.preprocess(images[start : start + batch_size])
            out.extend(postprocess(self.raw(pixels), metas, self.names, conf, iou, max_det, multi_label))
        return out


def config_from_metadata(metadata: dict[str, str]) -> DetectorConfig:
    """Rebuild a ``DetectorConfig`` from ONNX ``metadata_props`` written by ``onnx_metadata``."""
    try:
        return DetectorConfig(
            names=list(json.loads(metadata["names"])),
            imgsz=int(json.loads(metadata["imgsz"])),
            stride=int(json.loads(metadata["stride"])),
            model=metadata.get("model", ""),
            pad_value=int(json.loads(metadata["letterbox"])["pad_value"]),
            scale=float(json.loads(metadata["normalize"])["scale"]),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"ONNX metadata does not describe a detector: {exc}") from exc


def load_torch_model(directory: str | Path) -> Any:
    """The Ultralytics network of an artifact folder, rebuilt from YAML + safetensors, ready for inference."""
    import yaml
    from safetensors.torch import load_file

    from snap2caption.models import yolo

    folder = Path(directory)
    cfg = yaml.safe_load((folder / MODEL_YAML_FILE).read_text())
    model = yolo.build_detection_model(cfg, nc=int(cfg["nc"]))
    yolo.load_state(model, load_file(str(folder / WEIGHTS_FILE)))
    return yolo.inference_model(model)

"""The backfill's Ray Data stages: decode once, then one actor class per model, then the alt text.

A batch is Ray Data's ``numpy`` format, a dict of equal-length columns. Every row carries ``error``:
empty for an image the decoder accepted, else the reason it was refused (``corrupt_image: ...``). Model
stages skip refused rows and pass them on untouched, so one pipeline carries both and the driver sorts
them into results and quarantine. Tags and objects travel as JSON text (Ray's numpy blocks hold
strings well, nested lists of dicts badly) and become Parquet lists of structs in :mod:`.output`.

Each stage also writes the Ray node it ran on (``node_<stage>``), so a run can show where its work landed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image

from snap2caption.alt_text import alt_text_labels, gender_neutral, make_alt_text
from snap2caption.api import Feature
from snap2caption.errors import ImageError
from snap2caption.hashing import sha256_file
from snap2caption.imaging import DecodeLimits, decode_image, probe_image, resize_max_side
from snap2caption.manifest import MANIFEST_NAME
from snap2caption.models.domain import DomainCheck
from snap2caption.models.runtime import RuntimeChoice

Batch = dict[str, Any]
_Model = TypeVar("_Model")
Part = Literal["caption", "tags", "objects"]
"""What one model computes; features are built from parts (as in the gateway)."""

# The parts each feature needs: alt text needs the caption, and the labels for its fallback.
FEATURES_PARTS: dict[Feature, tuple[Part, ...]] = {
    "caption": ("caption",),
    "alt_text": ("caption", "tags", "objects"),
    "tags": ("tags",),
    "objects": ("objects",),
}
DEFAULT_CAPTION_MAX_SIDE = 512  # as the captioner service: the ETL's resized store, which training reads


@dataclass(frozen=True)
class ModelRef:
    """One model as every actor loads it.

    Attributes:
        source: What the loader gets: ``models:/NAME/VERSION`` (pinned, never an alias) or a folder.
        label: What the rows record as its version: ``NAME/VERSION``, or ``<folder>@<manifest sha256[:12]>``.
        runtime: The loader's runtime (``auto``, ``torch``, ``onnx``...).
    """

    source: str
    label: str
    runtime: RuntimeChoice = "auto"

    @classmethod
    def resolve(cls, name: str, ref: str, runtime: RuntimeChoice, tracking_uri: str | None) -> ModelRef:
        """Pin ``ref`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a bare alias, or a folder).

        Raises:
            ModelNotFoundError: No such model, alias or version.
            NotFound: A folder that does not exist.
        """
        from snap2caption.models.uri import resolve_model_dir
        from snap2caption.registry import Registry, parse_model_ref

        if not ref.startswith("models:/") and not Path(ref).expanduser().exists():
            ref = f"models:/{name}@{ref}"  # a bare alias or version: this model's
        if ref.startswith("models:/"):
            registered, pointer = parse_model_ref(ref)
            info = Registry(tracking_uri).resolve(registered, pointer)
            return cls(f"models:/{registered}/{info.version}", f"{registered}/{info.version}", runtime)
        folder = resolve_model_dir(ref)
        manifest = folder / MANIFEST_NAME
        digest = sha256_file(manifest)[:12] if manifest.is_file() else "unverified"
        return cls(str(folder.resolve()), f"{folder.resolve()}@{digest}", runtime)


@dataclass(frozen=True)
class ModelOptions:
    """How the actors run their models (the services' defaults).

    Attributes:
        tracking_uri: MLflow URI the actors download pinned versions from (same on every node).
        cache_dir: Where each node keeps downloaded models (default ``$SNAP2CAPTION_HOME/models``).
        threads: Intra-op threads per actor (torch and ONNX Runtime).
        conf: Minimum object score (the detector service's default).
        iou: NMS IoU threshold.
        max_det: Most objects per image.
        top_k: Most tags per image.
        min_tag_score: Minimum tag probability (None: the tagger artifact's calibrated ``min_score``, as the
            detector service).
    """

    tracking_uri: str | None = None
    cache_dir: str | None = None
    threads: int = 1
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 100
    top_k: int = 5
    min_tag_score: float | None = None


def _node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _load_on_actor(load: Callable[..., _Model], model: ModelRef, options: ModelOptions) -> _Model:
    """Set this actor's torch threads, then load ``model`` with its package's ``load`` (the services' loader
    and artifact cache)."""
    from snap2caption.serving import configure_torch_threads

    configure_torch_threads(options.threads)
    return load(
        model.source,
        model.runtime,
        threads=options.threads,
        tracking_uri=options.tracking_uri,
        cache_dir=options.cache_dir,
    )


def _ok(batch: Batch) -> list[int]:
    """Rows the decoder accepted."""
    return [i for i, error in enumerate(batch["error"]) if not error]


def _images(batch: Batch, rows: list[int]) -> list[Image.Image]:
    return [Image.fromarray(np.asarray(batch["pixels"][i], dtype=np.uint8)) for i in rows]


# ------------------------------------------------------------------------------------------ decoding


def decode_batch(batch: Batch, limits: DecodeLimits, max_side: int) -> Batch:
    """Read and decode each file with the shared safe decoder, once; a refused file keeps its reason.

    Args:
        batch: Columns ``key`` and ``file``.
        limits: Byte and pixel caps, checked before any pixel is decoded.
        max_side: Longest side of the decoded copy the models share (JPEG scales in the DCT).

    Returns:
        The batch with ``sha256``, ``format``, ``width`` and ``height`` (the original's, after EXIF
        orientation: the frame of the boxes), ``pixels`` ((H, W, 3) uint8, empty when refused),
        ``error`` and ``node_decode``.
    """
    n = len(batch["key"])
    out: Batch = {
        "sha256": [""] * n, "format": [""] * n, "width": [0] * n, "height": [0] * n,
        "pixels": [np.zeros((0, 0, 3), np.uint8)] * n, "error": [""] * n,
    }  # fmt: skip
    for i, file in enumerate(batch["file"]):
        try:
            with open(file, "rb") as f:  # at most one byte past the cap, as decode_file reads
                data = f.read(limits.max_bytes + 1)
        except OSError as exc:
            out["error"][i] = f"unreadable: {exc.strerror or exc}"
            continue
        try:
            stored = probe_image(data, limits)  # the original's size, for scaling boxes back
            decoded = decode_image(data, limits, max_side=max_side)
        except ImageError as exc:
            out["sha256"][i] = hashlib.sha256(data).hexdigest()
            out["error"][i] = f"{exc.code}: {exc}"
            continue
        out["sha256"][i] = decoded.sha256
        out["format"][i] = decoded.format
        out["width"][i], out["height"][i] = stored.upright_size(decoded.orientation)
        out["pixels"][i] = np.asarray(decoded.image)
    return {"key": batch["key"], **out, "node_decode": [_node()] * n}


# ------------------------------------------------------------------------------------------ models


class CaptionStage:
    """An actor with the caption model: ``caption`` and ``caption_confidence`` per accepted row, and
    ``caption_in_domain`` (the model's domain answer, None without a domain model) for the alt text only."""

    def __init__(self, model: ModelRef, options: ModelOptions, gender_neutral: bool = False) -> None:
        from snap2caption.models import caption

        self.captioner = _load_on_actor(caption.load, model, options)
        self.max_side = self.captioner.image_max_side or DEFAULT_CAPTION_MAX_SIDE
        self.label = model.label
        self.neutral = gender_neutral
        self.node = _node()

    def __call__(self, batch: Batch) -> Batch:
        rows = _ok(batch)
        n = len(batch["key"])
        text: list[str | None] = [None] * n
        confidence: list[float | None] = [None] * n
        in_domain: list[bool | None] = [None] * n
        if rows:
            preprocess = self.captioner.preprocess
            pixels = preprocess.batch([resize_max_side(im, self.max_side) for im in _images(batch, rows)])
            for i, c in zip(rows, self.captioner.generate(pixels), strict=True):  # pixels: (B, 3, H, W)
                text[i] = gender_neutral(c.text) if self.neutral else c.text
                confidence[i] = c.probability  # calibrated when the artifact has a calibration
                in_domain[i] = c.in_domain
        return {
            **batch,
            "caption": text,
            "caption_confidence": confidence,
            "caption_in_domain": in_domain,
            "caption_model": [self.label] * n,
            "node_caption": [self.node] * n,
        }


class TagStage:
    """An actor with the tagger: ``tags`` (JSON list of ``{name, score, hashtag}``) per accepted row."""

    def __init__(self, model: ModelRef, options: ModelOptions) -> None:
        from snap2caption.models import tagger

        self.tagger = _load_on_actor(tagger.load, model, options)
        self.options = options
        self.label = model.label
        self.node = _node()

    def __call__(self, batch: Batch) -> Batch:
        rows = _ok(batch)
        n = len(batch["key"])
        tags: list[str | None] = [None] * n
        if rows:
            o = self.options
            logits = self.tagger.forward(self.tagger.preprocess.batch(_images(batch, rows)))  # (B, classes)
            found = self.tagger.from_logits(
                logits,
                top_k=o.top_k,
                min_score=self.tagger.min_score if o.min_tag_score is None else o.min_tag_score,
            )
            for i, image_tags in zip(rows, found, strict=True):
                tags[i] = json.dumps(
                    [{"name": t.name, "score": t.score, "hashtag": t.hashtag} for t in image_tags]
                )
        return {**batch, "tags": tags, "tags_model": [self.label] * n, "node_tags": [self.node] * n}


class ObjectStage:
    """An actor with the detector: ``objects`` (JSON list of ``{label, score, box}``, boxes in the
    original's pixels after EXIF orientation) per accepted row, ``objects_in_domain`` (the detector's domain
    answer) and ``objects_withheld``: as the detector service, the objects of an image outside the
    detector's domain are withheld (an empty list and their count)."""

    def __init__(self, model: ModelRef, options: ModelOptions) -> None:
        from snap2caption.models import detector

        self.detector = _load_on_actor(detector.load, model, options)
        self.options = options
        self.label = model.label
        self.node = _node()

    def __call__(self, batch: Batch) -> Batch:
        from snap2caption.models.detector.boxes import letterbox, postprocess

        rows = _ok(batch)
        n = len(batch["key"])
        objects: list[str | None] = [None] * n
        in_domain: list[bool | None] = [None] * n
        withheld: list[int | None] = [None] * n
        if rows:
            d, o = self.detector, self.options
            boxed = [letterbox(im, d.imgsz, d.config.pad_value) for im in _images(batch, rows)]
            raw, features = d.forward(np.stack([pixels for pixels, _ in boxed]))  # (B, 4 + nc, anchors)
            found = postprocess(raw, [box for _, box in boxed], d.names, o.conf, o.iou, o.max_det)
            found_checks = d.check_domain(features)
            checks: list[DomainCheck | None] = (
                list(found_checks) if found_checks is not None else [None] * len(rows)
            )
            for i, (_, box), detections, check in zip(rows, boxed, found, checks, strict=True):
                withheld[i] = 0
                if check is not None:
                    in_domain[i] = check.in_domain
                    if not check.in_domain:
                        withheld[i], detections = len(detections), []
                # Boxes come in the decoded copy's pixels; the rows give them in the original's.
                width, height = int(batch["width"][i]), int(batch["height"][i])
                sx, sy = width / box.width, height / box.height
                objects[i] = json.dumps([
                    {
                        "label": det.class_name,
                        "score": det.score,
                        "box": {
                            key: round(min(max(value * scale, 0.0), float(limit)), 2)
                            for key, value, scale, limit in zip(
                                ("x1", "y1", "x2", "y2"), det.box_xyxy, (sx, sy, sx, sy),
                                (width, height, width, height), strict=True,
                            )
                        },
                    }
                    for det in detections
                ])  # fmt: skip
        return {
            **batch,
            "objects": objects,
            "objects_in_domain": in_domain,
            "objects_withheld": withheld,
            "objects_model": [self.label] * n,
            "node_objects": [self.node] * n,
        }


# ------------------------------------------------------------------------------------------ alt text


def alt_text_batch(batch: Batch, min_confidence: float, max_chars: int, gender_neutral_: bool) -> Batch:
    """The gateway's alt text for each accepted row: the caption when in the captioner's domain and
    confident, else its labels (never a caption of an image outside the captioner's domain, and objects
    only when no model places the image outside its domain: :func:`alt_text_labels`)."""
    n = len(batch["key"])
    text: list[str | None] = [None] * n
    source: list[str | None] = [None] * n
    for i in _ok(batch):
        caption = batch["caption"][i]
        confidence = batch["caption_confidence"][i]
        in_domain = _domain_answer(batch, "caption_in_domain", i)
        labels = alt_text_labels(
            [t["name"] for t in json.loads(batch["tags"][i] or "[]")],
            [o["label"] for o in json.loads(batch["objects"][i] or "[]")],
            objects_in_domain=_domain_answer(batch, "objects_in_domain", i),
            caption_in_domain=in_domain,
        )
        alt = make_alt_text(
            caption or None,
            None if confidence is None else float(confidence),
            labels,
            min_confidence=min_confidence,
            max_chars=max_chars,
            caption_in_domain=in_domain,
        )
        if alt is not None:
            text[i] = gender_neutral(alt.text) if gender_neutral_ else alt.text
            source[i] = alt.source
    return {**batch, "alt_text": text, "alt_text_source": source}


def _domain_answer(batch: Batch, column: str, i: int) -> bool | None:
    """Row ``i``'s domain answer in ``column`` as a Python bool (the batch may hold numpy booleans, for
    which ``is False`` never holds); None when the column is absent or the model has no domain model."""
    value = batch[column][i] if column in batch else None
    return None if value is None else bool(value)


def finish_batch(batch: Batch, alt_text: Callable[[Batch], Batch] | None = None) -> Batch:
    """The pipeline's last step: alt text (when asked for), then the pixels dropped, so that the driver
    receives text and numbers only."""
    if alt_text is not None:
        batch = alt_text(batch)
    return {name: values for name, values in batch.items() if name != "pixels"}

"""Ultralytics YOLO, offline and without pickle: import it safely, build a model from YAML, move weights.

:func:`prepare_ultralytics` must run before anything imports ``ultralytics``. It switches off, one by one,
everything in Ultralytics 8.4 that reaches the network:

- the online probe (DNS lookups of one.one.one.one / dns.google at import) and with it the PyPI update
  check, the pip auto-install and the usage events: ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=false``;
- the settings file, hub sync and third-party loggers: a private ``YOLO_CONFIG_DIR`` (under
  ``$SNAP2CAPTION_HOME/ultralytics``) whose settings say ``sync: false`` and turn off the ClearML, Comet,
  DVC, MLflow, Ray Tune, TensorBoard and W&B callbacks (this project logs to MLflow with its own callback);
- the plot font: ``check_font`` downloads ``Arial.ttf`` unless it sits in the config folder, so matplotlib's
  bundled DejaVu Sans is copied there under both names Ultralytics asks for;
- the AMP check (it downloads YOLO weights): never reached, because training passes ``amp=False`` and
  Ultralytics skips it on CPU anyway;
- weights: nothing here hands a ``.pt`` name to Ultralytics; models are built from YAML and filled from
  safetensors (:func:`load_state`), or from a user's COCO checkpoint read by :func:`read_pretrained`.

A detector is stored as its Ultralytics model YAML (as a dict, ``nc`` included) plus a safetensors state
dict; :func:`build_detection_model` rebuilds the ``DetectionModel`` from those alone.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from snap2caption.models.detector.config import FEATURE_LAYERS

if TYPE_CHECKING:
    from types import ModuleType

    from torch import nn

logger = logging.getLogger(__name__)

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
# Settings Ultralytics persists in settings.json; every network or third-party integration off.
OFFLINE_SETTINGS: dict[str, Any] = {
    "sync": False,
    "api_key": "",
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}
# Globals a trusted Ultralytics checkpoint may name: module classes and containers, nothing callable beyond
# constructors of these. ``torch.load(weights_only=True)`` refuses anything else.
_PRETRAINED_GLOBAL_PREFIXES = (
    "ultralytics.nn.",
    "ultralytics.utils.loss.",  # older checkpoints keep the loss object on the model
    "ultralytics.utils.tal.",
    "torch.nn.modules.",
    "ultralytics.utils.IterableSimpleNamespace",
    "collections.OrderedDict",
    "builtins.set",
    "torch.Size",
)
# Ultralytics' own YAMLs are named by family + scale; the "u" of yolov5nu is the anchor-free head that
# yolov5.yaml already uses, so the name maps onto the plain scale file.
_ALIASES = {f"yolov5{s}u.yaml": f"yolov5{s}.yaml" for s in "nsmlx"}

_lock = threading.Lock()
_prepared: Path | None = None


def ultralytics_config_dir() -> Path:
    """The private Ultralytics config folder: ``$YOLO_CONFIG_DIR`` when set, else under the home folder."""
    from snap2caption.registry import snap2caption_home

    env = os.environ.get("YOLO_CONFIG_DIR")
    return Path(env).expanduser().resolve() if env else snap2caption_home() / "ultralytics"


def prepare_ultralytics() -> ModuleType:
    """Import ``ultralytics`` with every network feature switched off (see the module docstring).

    Idempotent and thread-safe. Call it before any other import of ``ultralytics``: its online probe runs
    at import time. If something imported it first, the probe's result is overridden (and a warning says
    a DNS lookup may already have happened).

    Returns:
        The ``ultralytics`` module.
    """
    global _prepared
    with _lock:
        if _prepared is not None:
            return importlib.import_module("ultralytics")
        already = "ultralytics" in sys.modules
        config_dir = ultralytics_config_dir()
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_AUTOINSTALL"] = "false"
        user_dir = config_dir / "Ultralytics"  # Ultralytics' USER_CONFIG_DIR under YOLO_CONFIG_DIR
        _install_font(user_dir)

        ultralytics = importlib.import_module("ultralytics")
        utils = importlib.import_module("ultralytics.utils")
        if already:
            logger.warning(
                "ultralytics was imported before prepare_ultralytics(); its import-time online probe may "
                "have made a DNS lookup. Forcing it offline now."
            )
            for name in ("ultralytics.utils", "ultralytics.utils.checks", "ultralytics.utils.events"):
                module = importlib.import_module(name)
                if hasattr(module, "ONLINE"):
                    setattr(module, "ONLINE", False)  # noqa: B010 - a module global, set on purpose
        if Path(utils.USER_CONFIG_DIR).resolve() != user_dir.resolve():
            # Imported earlier with another config folder: put the font where that one looks too.
            _install_font(Path(utils.USER_CONFIG_DIR))
        runs = config_dir / "runs"
        utils.SETTINGS.update(
            {
                **OFFLINE_SETTINGS,
                "runs_dir": str(runs),
                "datasets_dir": str(config_dir / "datasets"),
                "weights_dir": str(config_dir / "weights"),
            }
        )
        _restore_pillow_open()
        _prepared = config_dir
        logger.debug("ultralytics %s prepared offline (config %s)", ultralytics.__version__, config_dir)
        return ultralytics


def _restore_pillow_open() -> None:
    """Undo Ultralytics' process-wide patch of ``PIL.Image.open``.

    Ultralytics replaces ``Image.open`` with a wrapper that, on an unidentified image, tries to import
    (or pip-install) ``pi-heif`` and registers a HEIF opener. That would change what the safe decoder
    (``snap2caption.imaging``) accepts and let a ModuleNotFoundError escape it, in every process that
    imports Ultralytics (the detector service, training). Pillow's own function is kept by the patch.
    """
    from PIL import Image

    patches = importlib.import_module("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def _install_font(user_dir: Path) -> None:
    """Copy matplotlib's bundled DejaVu Sans to the names ``check_font`` looks for, so it never downloads."""
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    user_dir.mkdir(parents=True, exist_ok=True)
    for name in FONT_NAMES:
        target = user_dir / name
        if not target.is_file() or target.stat().st_size != source.stat().st_size:
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)


def model_yaml(name_or_path: str | Path) -> dict[str, Any]:
    """The Ultralytics model definition for ``yolov8n.yaml``, ``yolo11n.yaml``, ``yolov5nu.yaml`` or a path.

    The scale letter in the name (n, s, m, l, x) is kept in the dict (``scale``), so the dict alone builds
    the same network.

    Raises:
        FileNotFoundError: Neither a file nor a model YAML that Ultralytics ships.
    """
    prepare_ultralytics()
    from ultralytics.nn.tasks import yaml_model_load

    text = str(name_or_path)
    path = Path(text)
    if not path.is_file():
        text = _ALIASES.get(path.name, text)
    data: dict[str, Any] = yaml_model_load(text)
    data.pop("yaml_file", None)  # a path on the training machine; the dict is self-contained
    return data


def build_detection_model(cfg: dict[str, Any], nc: int, *, verbose: bool = False) -> nn.Module:
    """An Ultralytics ``DetectionModel`` with random weights from a model dict (:func:`model_yaml`)."""
    prepare_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel({**cfg, "nc": nc}, nc=nc, verbose=verbose)


def state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of ``model`` as contiguous float32 CPU tensors, for ``safetensors.torch.save_file``."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        out[key] = (value.float() if value.is_floating_point() else value).contiguous()
    return out


def load_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Fill ``model`` with ``state``; every key must match both ways.

    Raises:
        ValueError: Missing or unexpected keys, or shapes that do not fit.
    """
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ValueError(f"detector weights do not fit the model: {exc}") from exc
    if missing or unexpected:
        raise ValueError(
            f"detector weights do not fit the model: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )


def transfer_weights(model: nn.Module, state: dict[str, Tensor]) -> tuple[int, int]:
    """Copy every tensor of ``state`` whose name and shape match into ``model`` (fine-tuning).

    The class-score convolutions of a COCO checkpoint (80 classes) do not fit a model with another class
    count and are left at their initialisation, as Ultralytics does.

    Returns:
        ``(tensors copied, tensors in the model)``.
    """
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return len(fitting), len(own)


def read_pretrained(path: str | Path) -> dict[str, Tensor]:
    """Weights to fine-tune from: a safetensors state dict, or an Ultralytics ``.pt`` checkpoint.

    A ``.pt`` file is read with ``torch.load(weights_only=True)``, allowing only the classes an Ultralytics
    checkpoint is made of (``ultralytics.nn.*`` and ``torch.nn`` modules, containers); a checkpoint naming
    anything else is refused, so a file from elsewhere cannot run code while loading.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a safetensors file or a checkpoint with only allowed classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} not found (offline: give a local file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    prepare_ultralytics()
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    refused = sorted(n for n in names if not n.startswith(_PRETRAINED_GLOBAL_PREFIXES))
    if refused:
        raise ValueError(f"{path}: refusing a checkpoint that names {refused[:5]} (not an Ultralytics model)")
    allowed = [_import_global(n) for n in names]
    with torch.serialization.safe_globals(allowed):
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    module = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else ckpt
    if module is None or not hasattr(module, "state_dict"):
        raise ValueError(f"{path}: no 'model' or 'ema' module in the checkpoint")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.state_dict().items()}


def _import_global(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def detect_head(model: nn.Module) -> Any:
    """The ``Detect`` head: the last layer of an Ultralytics detection model."""
    head = model.model[-1]  # type: ignore[index]  # DetectionModel.model: nn.Sequential of layers
    if not hasattr(head, "stride") or not hasattr(head, "nc"):
        raise ValueError(f"{type(head).__name__} is not an Ultralytics Detect head")
    return head


def feature_layers(model: nn.Module) -> list[nn.Module]:
    """The backbone layers ``config.FEATURE_NAME`` pools: its blocks at strides 4 and 8 (layers 2 and 4 of
    YOLOv5u, YOLOv8 and YOLO11: C3 / C2f / C3k2)."""
    layers: list[nn.Module] = [model.model[i] for i in FEATURE_LAYERS]  # type: ignore[index,misc]
    return layers


def with_features(model: nn.Module) -> nn.Module:
    """``model`` (from :func:`inference_model`) whose forward returns ``(raw, features)`` from one pass.

    ``features`` is ``config.FEATURE_NAME``, ``(B, C2 + C4)``: the global average pool of the outputs of
    backbone layers 2 and 4 (strides 4 and 8), concatenated. The domain model
    (``snap2caption.models.domain``) is fitted on it. Early layers, because what sets a photo apart from the
    synthetic scenes is its low-level statistics (texture, shading): on the starter data's held-out scenes
    and scikit-image's photos, a 1-epoch detector's pooled SPPF output flagged 1 of 15 photos, these layers
    14 of 15, each at the same ~1-2% rejection of held-out scenes.

    Forward hooks add it: one per layer keeps its output (per thread, so concurrent calls do not mix), one
    on the model returns the pooled features with the raw output. The ONNX export traces the same hooks
    into a second graph output.
    """
    kept = threading.local()

    def keep(index: int) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            setattr(kept, f"layer{index}", output)  # (B, C, H, W)

        return hook

    def add(_module: nn.Module, _inputs: Any, output: Tensor) -> tuple[Tensor, Tensor]:
        maps = [kept.__dict__.pop(f"layer{i}") for i in FEATURE_LAYERS]
        pooled = torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)  # (B, C2 + C4)
        return output, pooled  # (B, 4 + nc, anchors), (B, C2 + C4)

    for index, layer in zip(FEATURE_LAYERS, feature_layers(model), strict=True):
        layer.register_forward_hook(keep(index))
    model.register_forward_hook(add)
    return model


def inference_model(model: nn.Module) -> nn.Module:
    """Fused (conv + batch norm), in eval mode, whose forward returns only ``(B, 4 + nc, anchors)``.

    The output rows are box centre x, y, width, height in input pixels, then the per-class sigmoid scores,
    one column per anchor point of the three strides.
    """
    model = model.float().fuse(verbose=False).eval()  # type: ignore[operator]
    head = detect_head(model)
    head.export = True  # forward returns the decoded tensor alone (no training-feature tuple)
    head.format = "onnx"
    for p in model.parameters():
        p.requires_grad_(False)
    return model

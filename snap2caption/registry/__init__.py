"""Model registry: register, resolve, download, promote and roll back models in MLflow.

A model is a plain folder of files (safetensors, ONNX, JSON config, ``tokenizer.json``, a model card
``README.md``) with a ``MANIFEST.json`` (:mod:`snap2caption.manifest`, the one writer and checker). The
package, one job a module:

    client.py    :class:`Registry`, the MLflow client that training, services and the CLI go through
    gates.py     the promotion gate per model and its verdict
    versions.py  aliases, version tags and :class:`ModelVersionInfo`, what callers get back
    paths.py     the home folder and the tracking URI (SQLite under ``$SNAP2CAPTION_HOME`` by default)
    errors.py    the registry's typed errors

The client, its results and errors, the gates, the aliases and the paths are re-exported here, so
``from snap2caption.registry import Registry`` stays the way in; tag names live in ``versions``.
"""

from __future__ import annotations

from snap2caption.registry.client import Registry
from snap2caption.registry.errors import ModelNotFoundError, PromotionError, RegistryError, RollbackError
from snap2caption.registry.gates import GATES, Gate, PromotionResult
from snap2caption.registry.paths import default_tracking_uri, snap2caption_home
from snap2caption.registry.versions import CANARY, CANDIDATE, PRODUCTION, ModelVersionInfo, parse_model_ref

__all__ = [
    "CANARY",
    "CANDIDATE",
    "GATES",
    "PRODUCTION",
    "Gate",
    "ModelNotFoundError",
    "ModelVersionInfo",
    "PromotionError",
    "PromotionResult",
    "Registry",
    "RegistryError",
    "RollbackError",
    "default_tracking_uri",
    "parse_model_ref",
    "snap2caption_home",
]

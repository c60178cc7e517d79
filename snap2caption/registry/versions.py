"""What the registry records about a model version: aliases, version tags, and the version as callers see it.

Aliases: ``register`` points ``candidate`` at the new version; ``promote`` moves ``production`` to it
through the gate; ``rollback`` moves ``production`` back along a history kept as a registered-model tag.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from snap2caption.registry.errors import RegistryError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

CANDIDATE = "candidate"
PRODUCTION = "production"
CANARY = "canary"  # a version served beside production to a share of the traffic (`snap2caption release`)

# Version tags written by the registry client. Metrics go in as ``metric.<key>`` so that they never
# collide with the caller's own tags and the MLflow UI groups them together.
METRIC_TAG_PREFIX = "metric."
TAG_MANIFEST_SHA256 = "manifest_sha256"
TAG_REGISTERED_BY = "registered_by"
TAG_REGISTERED_AT = "registered_at"
TAG_PROMOTED_AT = "promoted_at"
TAG_PROMOTED_BY = "promoted_by"
TAG_PROMOTED_FROM = "promoted_from_version"
TAG_OVERRIDE = "promoted_by_override"
TAG_OVERRIDE_REASON = "override_reason"
TAG_OVERRIDE_AT = "override_at"
TAG_OVERRIDE_BY = "override_by"
TAG_ROLLED_BACK_AT = "rolled_back_at"
TAG_ROLLED_BACK_BY = "rolled_back_by"
# The version tags above: what this registry writes about a version itself (a push to another registry
# writes its own there, and carries over only the caller's tags and the metrics).
REGISTRY_TAGS = frozenset(
    {
        TAG_MANIFEST_SHA256, TAG_REGISTERED_BY, TAG_REGISTERED_AT, TAG_PROMOTED_AT, TAG_PROMOTED_BY,
        TAG_PROMOTED_FROM, TAG_OVERRIDE, TAG_OVERRIDE_REASON, TAG_OVERRIDE_AT, TAG_OVERRIDE_BY,
        TAG_ROLLED_BACK_AT, TAG_ROLLED_BACK_BY,
    }
)  # fmt: skip
# Registered-model tags: JSON lists, newest last.
TAG_PRODUCTION_HISTORY = "production_history"
TAG_OVERRIDE_HISTORY = "override_history"
# Bounded so that the tags stay far below MLflow's tag size limit however long a model lives.
HISTORY_LIMIT = 100


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version, as the registry client reports it.

    Attributes:
        name: Registered model name.
        version: Version number.
        aliases: Aliases pointing at this version (``candidate``, ``production``, ...).
        metrics: Gate and other metrics stored at registration (``metric.*`` version tags).
        tags: The other version tags.
        run_id: The MLflow run whose artifacts hold the files.
        source: Artifact URI of the model folder.
        status: MLflow's version status (``READY`` once created).
        created: Creation time (UTC).
        description: Version description.
    """

    name: str
    version: int
    aliases: tuple[str, ...]
    metrics: dict[str, float]
    tags: dict[str, str]
    run_id: str | None
    source: str
    status: str
    created: dt.datetime
    description: str = ""

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``: pins this exact version."""
        return f"models:/{self.name}/{self.version}"

    @classmethod
    def from_mlflow(cls, mv: ModelVersion, aliases: Mapping[str, Any]) -> ModelVersionInfo:
        """Convert MLflow's ModelVersion; ``aliases`` is the registered model's alias -> version map."""
        tags = dict(mv.tags or {})
        metrics: dict[str, float] = {}
        for key in [k for k in tags if k.startswith(METRIC_TAG_PREFIX)]:
            raw = tags.pop(key)
            try:
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(raw)
            except ValueError:
                tags[key] = raw  # not ours after all; keep it visible as a plain tag
        version = int(mv.version)
        return cls(
            name=mv.name,
            version=version,
            aliases=tuple(sorted(a for a, v in aliases.items() if int(v) == version)),
            metrics=metrics,
            tags=tags,
            run_id=mv.run_id or None,
            source=mv.source or "",
            status=str(mv.status),
            created=dt.datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, tz=dt.UTC),
            description=mv.description or "",
        )


def parse_model_ref(ref: str) -> tuple[str, str]:
    """Split ``NAME@ALIAS`` or ``NAME/VERSION`` (an optional ``models:/`` prefix is accepted).

    Returns:
        ``(name, alias_or_version)``.
    """
    body = ref.removeprefix("models:/")
    for sep in ("@", "/"):
        name, found, rest = body.partition(sep)
        if found and name and rest:
            return name, rest
    raise RegistryError(f"expected NAME@ALIAS or NAME/VERSION, got {ref!r}")

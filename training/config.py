"""What every training job shares: the ``run:`` section of its config, and how its config is loaded.

Both trainers read a sectioned YAML preset (``training/configs/<model>/<preset>.yaml``) through the one
loader, :func:`snap2caption.config.load_config`: ``run:`` says where the run reads and writes and under which
names MLflow and the registry know it; the other sections say what to train and how. The CLI's ``--data``,
``--out``, ``--name``, ``--experiment``, ``--register/--no-register`` and ``--tracking-uri`` set the ``run``
keys of the same names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from snap2caption.config import ConfigError, Override, load_config, to_dict, with_overrides

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class RunConfig:
    """Where a training run reads and writes, and the names it is tracked and registered under.

    Attributes:
        data: The ETL output the run trains and tests on (``manifests/``, ``images/``, ``labels/``).
        out: The run's output folder; ``""``: the trainer's default.
        name: The registered model name.
        experiment: The MLflow experiment; ``""``: the model name.
        register: Register the artifact as ``name`` (alias ``candidate``).
        tracking_uri: MLflow tracking URI; None: ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store.
        preset: The preset (or YAML file name) the config was loaded from, for tags and the model card;
            the loader sets it.
    """

    data: str = "data/processed"
    out: str = ""
    name: str = ""
    experiment: str = ""
    register: bool = True
    tracking_uri: str | None = None
    preset: str = "custom"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(*problems)

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when nothing is); trainers add their own."""
        return [f"run.{key} may not be empty" for key in ("data", "name") if not getattr(self, key)]

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment this run logs into: ``experiment``, else the model name."""
        return self.experiment or self.name


class TrainingConfig:
    """Loading, for the config dataclass of a trainer: sectioned, with a ``run`` section (a mixin).

    Attributes:
        PRESETS: The trainer's preset folder under ``training/configs/`` (``caption``, ``detector``).
    """

    PRESETS: ClassVar[str]

    @classmethod
    def load(cls, config: str | os.PathLike[str], overrides: Sequence[Override] = ()) -> Self:
        """A preset name or YAML path, plus ``key=value`` overrides (see :mod:`snap2caption.config`).

        ``run.preset`` names the file loaded, unless an override sets it.

        Raises:
            ConfigError: Every problem: no such preset, unknown keys (nearest suggested), bad values.
        """
        preset = ("run.preset", Path(config).stem)
        return load_config(cls, config, [preset, *overrides], presets=CONFIGS_DIR / cls.PRESETS)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-safe)."""
        return to_dict(self)

    def with_overrides(self, overrides: Sequence[Override]) -> Self:
        """A copy with ``key=value`` overrides applied."""
        return with_overrides(self, overrides)

"""The registry client: register, resolve, download, promote and roll back models in MLflow.

Training registers a model folder, services pull the version an alias names
(``models:/captioner@production``), and operators promote or roll back through the
``snap2caption registry`` CLI. All three go through :class:`Registry`.

Nothing here uses an MLflow flavour (they pickle): the folder is logged as run artifacts and the model
version points at that artifact URI. The sha256 of the folder's ``MANIFEST.json`` is stored as a version
tag, so a download is checked against the registry database, not only against a file that sits next to
the files it vouches for. A tracking server URL works like the embedded SQLite file; the server then
decides where artifacts go.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import math
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from snap2caption.errors import ArtifactIntegrityError
from snap2caption.manifest import verify_manifest
from snap2caption.registry.errors import ModelNotFoundError, PromotionError, RegistryError, RollbackError
from snap2caption.registry.gates import GATES, Gate, PromotionResult, judge
from snap2caption.registry.paths import default_tracking_uri, snap2caption_home, sqlite_path
from snap2caption.registry.versions import (
    CANARY,
    CANDIDATE,
    HISTORY_LIMIT,
    METRIC_TAG_PREFIX,
    PRODUCTION,
    TAG_MANIFEST_SHA256,
    TAG_OVERRIDE,
    TAG_OVERRIDE_AT,
    TAG_OVERRIDE_BY,
    TAG_OVERRIDE_HISTORY,
    TAG_OVERRIDE_REASON,
    TAG_PRODUCTION_HISTORY,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_BY,
    TAG_PROMOTED_FROM,
    TAG_REGISTERED_AT,
    TAG_REGISTERED_BY,
    TAG_ROLLED_BACK_AT,
    TAG_ROLLED_BACK_BY,
    ModelVersionInfo,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "snap2caption-registry"

DESCRIPTIONS: dict[str, str] = {
    "captioner": "Image -> caption: image encoder, mapping network, GPT-2 decoder (safetensors/ONNX).",
    "detector": "Object detector (Ultralytics YOLO exported to ONNX/safetensors): boxes and classes.",
    "tagger": "ImageNet tagger (EfficientNet-Lite0): top-k tags per image.",
}


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _quiet_mlflow() -> None:
    """Silence MLflow before it is imported: no telemetry, no progress bars, no emoji run links on
    stdout (a tracking server), no migration or "waiting for version" chatter.

    ``setdefault`` so that an operator who wants them back can still set the variables.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def whoami() -> str:
    """The operator's user name for audit tags (``unknown`` where the OS cannot say, e.g. bare containers)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _check_name(name: str) -> None:
    # The name ends up inside MLflow filter strings and URIs; keep it to a safe alphabet.
    if not _NAME_RE.match(name):
        raise RegistryError(f"invalid model name {name!r}: use letters, digits, '_', '.', '-'")


class Registry:
    """Registry client over MLflow's tracking and model-registry APIs.

    Args:
        tracking_uri: MLflow tracking URI; default :func:`default_tracking_uri`. The model registry uses
            the same URI (or ``MLFLOW_REGISTRY_URI`` when set and ``tracking_uri`` is not given).
        artifact_root: Where experiments created here keep their artifacts. Default: the ``artifacts``
            folder beside a SQLite database, ``$SNAP2CAPTION_HOME/mlflow/artifacts`` for another
            database URL, and whatever the server decides for an ``http(s)`` tracking server.
        gates: Extra or replacement gates by model name, merged over :data:`GATES`.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        artifact_root: str | Path | None = None,
        gates: Mapping[str, Gate] | None = None,
    ) -> None:
        _quiet_mlflow()
        uri = tracking_uri or default_tracking_uri()
        db_path = sqlite_path(uri)
        if db_path is not None:
            # Absolute, so that the URI means the same file whatever the working directory later is;
            # and sqlite does not create missing folders.
            db_path = db_path.expanduser().resolve()
            db_path.parent.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{db_path}"
        self.tracking_uri = uri
        # An explicit tracking URI means "that store", registry included; the env var only refines defaults.
        self.registry_uri = (None if tracking_uri else os.environ.get("MLFLOW_REGISTRY_URI")) or uri

        scheme = urllib.parse.urlparse(uri).scheme
        self.artifact_root: Path | None
        if artifact_root is not None:
            self.artifact_root = Path(artifact_root).expanduser().resolve()
        elif db_path is not None:
            self.artifact_root = db_path.parent / "artifacts"
        elif scheme in ("http", "https", "databricks", "file", ""):
            self.artifact_root = None
        else:  # postgresql://, mysql://, ... without a server: keep artifacts in the home folder
            self.artifact_root = snap2caption_home() / "mlflow" / "artifacts"
        self.gates: dict[str, Gate] = {**GATES, **(gates or {})}

        from mlflow import MlflowClient

        self._client: MlflowClient = MlflowClient(
            tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
        )

    # ------------------------------------------------------------------ setup

    def ensure_experiment(self, name: str = DEFAULT_EXPERIMENT) -> str:
        """Return the id of experiment ``name``, creating it with the local artifact folder if needed.

        MLflow's own default for a SQLite store is ``./mlruns`` relative to the working directory, so an
        experiment made with ``mlflow.set_experiment`` scatters artifacts wherever a job was started.
        Training should create its experiments through this method.

        Args:
            name: Experiment name.

        Returns:
            The experiment id.
        """
        from mlflow.exceptions import MlflowException

        existing = self._client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage != "active":
                raise RegistryError(f"experiment {name!r} is deleted; restore it or pick another name")
            return str(existing.experiment_id)
        location = None
        if self.artifact_root is not None:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "experiment"
            location = (self.artifact_root / slug).as_uri()
        try:
            return str(self._client.create_experiment(name, artifact_location=location))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # Another process created it between our lookup and create.
            again = self._client.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again.experiment_id)

    def ensure_registered_model(self, name: str, description: str | None = None) -> None:
        """Create registered model ``name`` if it does not exist (idempotent).

        Args:
            name: Registered model name.
            description: Description for a new model; default from :data:`DESCRIPTIONS`.
        """
        from mlflow.exceptions import MlflowException

        _check_name(name)
        try:
            self._client.get_registered_model(name)
            return
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            self._client.create_registered_model(name, description=description or DESCRIPTIONS.get(name))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def gate_for(self, name: str) -> Gate | None:
        """The gate for ``name`` (None when none is defined)."""
        return self.gates.get(name)

    # ------------------------------------------------------------------ register

    def register(
        self,
        name: str,
        artifact_dir: str | Path,
        *,
        metrics: Mapping[str, float],
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
    ) -> ModelVersionInfo:
        """Upload a model folder, create a new version from it and point ``candidate`` at it.

        Args:
            name: Registered model name (created if missing).
            artifact_dir: Model folder with a valid ``MANIFEST.json`` (``snap2caption.manifest``).
            metrics: Evaluation metrics; must include the model's gate metric. Stored as version tags.
            run_id: Training run to attach the files to; when None a run is created in ``experiment``.
            tags: Extra version tags (config hash, dataset version, git commit, ...).
            description: Version description.
            experiment: Experiment for the run created when ``run_id`` is None.

        Returns:
            The new version (with the ``candidate`` alias).

        Raises:
            ArtifactIntegrityError: The folder does not match its manifest or holds a pickle.
            RegistryError: The gate metric is missing or a metric is not a finite number.
        """
        from mlflow.entities import Metric, RunStatus

        _check_name(name)
        folder = Path(artifact_dir)
        manifest_sha = verify_manifest(folder)
        clean_metrics = self._check_metrics(name, metrics)
        self.ensure_registered_model(name)

        created_run = run_id is None
        if run_id is None:
            run = self._client.create_run(
                self.ensure_experiment(experiment),
                run_name=f"register-{name}",
                tags={"snap2caption.model": name},
            )
            run_id = run.info.run_id
        else:
            run = self._client.get_run(run_id)
        # Content-addressed path: registering twice from one run never overwrites the files an earlier
        # version points at.
        artifact_path = f"registry/{name}-{manifest_sha[:12]}"
        try:
            self._client.log_artifacts(run_id, str(folder), artifact_path)
            if created_run:
                ts = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
                self._client.log_batch(
                    run_id, metrics=[Metric(k, v, ts, 0) for k, v in clean_metrics.items()]
                )
        except BaseException:
            if created_run:
                self._client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
            raise
        if created_run:
            self._client.set_terminated(run_id)

        version_tags = {
            **{str(k): str(v) for k, v in (tags or {}).items()},
            **{METRIC_TAG_PREFIX + k: repr(v) for k, v in clean_metrics.items()},
            TAG_MANIFEST_SHA256: manifest_sha,
            TAG_REGISTERED_BY: whoami(),
            TAG_REGISTERED_AT: _now(),
        }
        # MlflowClient.create_model_version with the run's own artifact URI: mlflow.register_model would
        # look for an MLmodel file (or a LoggedModel) under a runs:/ URI, which a plain folder lacks.
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        mv = self._client.create_model_version(
            name, source, run_id, tags=version_tags, description=description
        )
        self._client.set_registered_model_alias(name, CANDIDATE, str(mv.version))
        logger.info("registered %s v%s from run %s; alias %s", name, mv.version, run_id, CANDIDATE)
        return self.resolve(name, str(mv.version))

    def _check_metrics(self, name: str, metrics: Mapping[str, float]) -> dict[str, float]:
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise RegistryError(f"{name}: metric {key!r}={value!r} is not a number") from exc
            if not math.isfinite(number):
                raise RegistryError(f"{name}: metric {key!r}={value!r} is not finite")
            clean[str(key)] = number
        gate = self.gate_for(name)
        if gate is not None and gate.metric not in clean:
            # A version without its gate metric could never be compared, so refuse it up front.
            raise RegistryError(f"{name}: metrics must include the gate metric {gate.metric!r}")
        return clean

    # ------------------------------------------------------------------ read

    def resolve(self, name: str, ref: str | int) -> ModelVersionInfo:
        """The version an alias names, or a version by number.

        Args:
            name: Registered model name.
            ref: Alias (``production``) or version number (``3`` or ``"3"``).

        Raises:
            ModelNotFoundError: No such model, alias or version.
        """
        from mlflow.exceptions import MlflowException

        _check_name(name)
        ref = str(ref)
        try:
            if ref.isdigit():
                mv = self._client.get_model_version(name, ref)
            else:
                mv = self._client.get_model_version_by_alias(name, ref)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ModelNotFoundError(f"{name}@{ref}: {exc.message}") from exc
            raise
        return ModelVersionInfo.from_mlflow(mv, {alias: mv.version for alias in mv.aliases or ()})

    def _resolve_or_none(self, name: str, ref: str) -> ModelVersionInfo | None:
        try:
            return self.resolve(name, ref)
        except ModelNotFoundError:
            return None

    def list_models(self) -> list[str]:
        """Names of all registered models, sorted."""
        names: list[str] = []
        token: str | None = None
        while True:
            page = self._client.search_registered_models(max_results=1000, page_token=token)
            names.extend(rm.name for rm in page)
            token = page.token
            if not token:
                return sorted(names)

    def list_versions(self, name: str) -> list[ModelVersionInfo]:
        """Every version of ``name``, newest first, with aliases and metrics.

        Raises:
            ModelNotFoundError: No such registered model.
        """
        from mlflow.exceptions import MlflowException

        _check_name(name)
        try:
            aliases = dict(self._client.get_registered_model(name).aliases)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ModelNotFoundError(f"no registered model {name!r}") from exc
            raise
        versions: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = self._client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
            versions.extend(page)
            token = page.token
            if not token:
                break
        # search_model_versions leaves ``aliases`` empty on the SQL store, hence the registered model's map.
        return sorted(
            (ModelVersionInfo.from_mlflow(mv, aliases) for mv in versions),
            key=lambda v: v.version,
            reverse=True,
        )

    # ------------------------------------------------------------------ download

    def download(self, name: str, ref: str | int, dst: str | Path) -> tuple[Path, ModelVersionInfo]:
        """Download a version into ``dst/<name>/v<version>`` and verify it against its manifest.

        The alias is resolved once, so the files and the returned info always describe the same version
        even when the alias moves meanwhile. A folder already there that verifies is reused, so a service
        restart does not download again; the download goes to a temporary folder and is renamed into
        place only after it verifies, so a reader never sees half a model.

        Args:
            name: Registered model name.
            ref: Alias or version number.
            dst: Cache folder (created if missing).

        Returns:
            ``(model folder, version info)``.

        Raises:
            ModelNotFoundError: No such model, alias or version.
            ArtifactIntegrityError: The downloaded files do not match the registered manifest.
        """
        import mlflow.artifacts

        info = self.resolve(name, ref)
        expected = info.tags.get(TAG_MANIFEST_SHA256)
        if not expected:
            raise ArtifactIntegrityError(f"{name} v{info.version} has no {TAG_MANIFEST_SHA256} tag")
        parent = Path(dst).expanduser().resolve() / name
        target = parent / f"v{info.version}"
        if target.is_dir():
            try:
                verify_manifest(target, expected_sha256=expected)
                logger.info("%s v%s already at %s", name, info.version, target)
                return target, info
            except ArtifactIntegrityError as exc:
                logger.warning("cached %s does not verify (%s); downloading again", target, exc)
                shutil.rmtree(target)
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".v{info.version}-", dir=parent))
        try:
            uri = self._client.get_model_version_download_uri(name, str(info.version))
            # A concrete artifact URI, not models:/...: for models:/ MLflow resolves the registry from the
            # process-wide mlflow.get_registry_uri() and ignores this client's URI.
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=str(staging), tracking_uri=self.tracking_uri
                )
            )
            verify_manifest(local, expected_sha256=expected)
            try:
                local.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
                # Another process put the same version in place first; theirs verified too.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("downloaded %s v%s to %s", name, info.version, target)
        return target, info

    # ------------------------------------------------------------------ promote / rollback

    def promote(
        self,
        name: str,
        *,
        margin: float | None = None,
        force: bool = False,
        reason: str | None = None,
    ) -> PromotionResult:
        """Move ``production`` to the ``candidate`` version if it passes the gate.

        The gate passes when there is no production version yet, or when the candidate's gate metric is
        not worse than production's by more than ``margin``. A candidate that was rolled back out of
        production is refused unless forced. ``force`` overrides a failed gate; it needs a ``reason``,
        and the override is recorded as version tags, in the ``override_history`` registered-model tag
        and as a warning log.

        Args:
            name: Registered model name.
            margin: Absolute slack in the gate metric's units; default the gate's ``default_margin``.
            force: Promote even if the gate fails.
            reason: Why; required with ``force``.

        Returns:
            What happened, with the gate's numbers.

        Raises:
            PromotionError: ``force`` without a reason, a negative margin, or no candidate.
        """
        if force and not (reason and reason.strip()):
            raise PromotionError(f"{name}: --force needs a reason (it is recorded with the override)")
        gate = self.gate_for(name)
        if margin is None:
            margin = gate.default_margin if gate else 0.0
        if margin < 0 or not math.isfinite(margin):
            raise PromotionError(f"{name}: margin must be a finite number >= 0, got {margin}")
        candidate = self._resolve_or_none(name, CANDIDATE)
        if candidate is None:
            raise PromotionError(f"{name}: no version has the {CANDIDATE!r} alias; register one first")
        production = self._resolve_or_none(name, PRODUCTION)

        metric = gate.metric if gate else None
        cand_value = candidate.metrics.get(metric) if metric else None
        prod_value = production.metrics.get(metric) if metric and production else None

        def result(
            status: Literal["promoted", "overridden", "refused", "unchanged"], msg: str
        ) -> PromotionResult:
            return PromotionResult(
                name, status, candidate, production, metric, cand_value, prod_value, margin, msg
            )

        if production is not None and production.version == candidate.version:
            return result("unchanged", f"{name} v{candidate.version} is already {PRODUCTION}")

        passed, verdict = judge(gate, candidate, production, margin)
        if not passed and not force:
            logger.info("promotion of %s v%s refused: %s", name, candidate.version, verdict)
            return result("refused", f"refused: {verdict}")

        user, now = whoami(), _now()
        override_tags = {}
        if not passed:
            override_tags = {
                TAG_OVERRIDE: "true",
                TAG_OVERRIDE_REASON: str(reason),
                TAG_OVERRIDE_AT: now,
                TAG_OVERRIDE_BY: user,
            }
        self._set_production(name, candidate, production, override_tags)

        if passed:
            logger.info("promoted %s v%s to %s: %s", name, candidate.version, PRODUCTION, verdict)
            return result("promoted", f"promoted v{candidate.version}: {verdict}")
        overrides = self._history(name, TAG_OVERRIDE_HISTORY)
        overrides.append(
            {
                "version": str(candidate.version),
                "from_version": str(production.version) if production else None,
                "reason": reason,
                "by": user,
                "at": now,
                "gate": verdict,
            }
        )
        self._set_history(name, TAG_OVERRIDE_HISTORY, overrides)
        logger.warning(
            "OVERRIDE: %s v%s promoted to %s by %s despite a failed gate (%s); reason: %s",
            name, candidate.version, PRODUCTION, user, verdict, reason,
        )  # fmt: skip
        return result("overridden", f"promoted v{candidate.version} by override: {verdict}; reason: {reason}")

    def _set_production(
        self,
        name: str,
        version: ModelVersionInfo,
        production: ModelVersionInfo | None,
        extra_tags: Mapping[str, str] | None = None,
    ) -> None:
        """Point ``production`` at ``version``: tag who and when, and extend the production history."""
        self._client.set_registered_model_alias(name, PRODUCTION, str(version.version))
        tags = {
            TAG_PROMOTED_AT: _now(),
            TAG_PROMOTED_BY: whoami(),
            TAG_PROMOTED_FROM: str(production.version) if production else "",
            **(extra_tags or {}),
        }
        for key, value in tags.items():
            self._client.set_model_version_tag(name, str(version.version), key, value)
        history = self._history(name, TAG_PRODUCTION_HISTORY)
        if production is not None and (not history or history[-1] != str(production.version)):
            # production was moved outside this client; keep it so that rollback can return to it.
            history.append(str(production.version))
        history.append(str(version.version))
        self._set_history(name, TAG_PRODUCTION_HISTORY, history)

    # ------------------------------------------------------------------ canary

    def start_canary(self, name: str, version: int) -> ModelVersionInfo:
        """Give ``version`` the ``canary`` alias (the canary model service follows it).

        Raises:
            ModelNotFoundError: No such version.
            PromotionError: The version is already ``production``.
        """
        info = self.resolve(name, version)
        production = self._resolve_or_none(name, PRODUCTION)
        if production is not None and production.version == info.version:
            raise PromotionError(f"{name} v{info.version} is already {PRODUCTION}: nothing to canary")
        self._client.set_registered_model_alias(name, CANARY, str(info.version))
        logger.info("%s v%s is the %s", name, info.version, CANARY)
        return info

    def canary(self, name: str) -> ModelVersionInfo | None:
        """The version holding the ``canary`` alias, or ``None``."""
        return self._resolve_or_none(name, CANARY)

    def end_canary(self, name: str) -> ModelVersionInfo | None:
        """Remove the ``canary`` alias (a rollback of the canary); returns the version that held it."""
        info = self._resolve_or_none(name, CANARY)
        if info is not None:
            self._client.delete_registered_model_alias(name, CANARY)
            logger.info("%s: %s alias removed from v%s", name, CANARY, info.version)
        return info

    def promote_canary(self, name: str) -> ModelVersionInfo:
        """Point ``production`` at the ``canary`` version (it passed its canary) and remove ``canary``.

        No gate runs here: the canary's live comparison with production was the gate.

        Raises:
            PromotionError: No version has the ``canary`` alias.
        """
        info = self._resolve_or_none(name, CANARY)
        if info is None:
            raise PromotionError(f"{name}: no version has the {CANARY!r} alias")
        self._set_production(name, info, self._resolve_or_none(name, PRODUCTION))
        self._client.delete_registered_model_alias(name, CANARY)
        logger.info("promoted %s v%s from %s to %s", name, info.version, CANARY, PRODUCTION)
        return self.resolve(name, PRODUCTION)

    def rollback(self, name: str) -> ModelVersionInfo:
        """Point ``production`` back at the version that held it before the current one.

        Each call steps one further back along the production history; the version rolled back from
        is tagged (``rolled_back_at``/``rolled_back_by``) so that ``promote`` will not quietly put it
        back.

        Returns:
            The version now in production.

        Raises:
            RollbackError: No production version, or no earlier one to return to.
        """
        from mlflow.exceptions import MlflowException

        current = self._resolve_or_none(name, PRODUCTION)
        if current is None:
            raise RollbackError(f"{name}: no {PRODUCTION} version to roll back")
        history = self._history(name, TAG_PRODUCTION_HISTORY)
        if not history or history[-1] != str(current.version):
            history.append(str(current.version))
        history.pop()
        previous: str | None = None
        while history:
            try:
                self._client.get_model_version(name, history[-1])
                previous = history[-1]
                break
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                history.pop()  # a deleted version cannot come back; step past it
        if previous is None:
            raise RollbackError(
                f"{name}: no previous {PRODUCTION} version to roll back to (v{current.version} is the first)"
            )
        user, now = whoami(), _now()
        self._client.set_registered_model_alias(name, PRODUCTION, previous)
        self._client.set_model_version_tag(name, str(current.version), TAG_ROLLED_BACK_AT, now)
        self._client.set_model_version_tag(name, str(current.version), TAG_ROLLED_BACK_BY, user)
        self._set_history(name, TAG_PRODUCTION_HISTORY, history)
        logger.warning(
            "rolled back %s %s from v%s to v%s by %s", name, PRODUCTION, current.version, previous, user
        )
        return self.resolve(name, previous)

    def production_history(self, name: str) -> list[str]:
        """Versions that held ``production``, oldest first (what ``rollback`` steps back through)."""
        return [str(v) for v in self._history(name, TAG_PRODUCTION_HISTORY)]

    def override_history(self, name: str) -> list[dict[str, Any]]:
        """Every forced promotion of ``name``: version, from_version, reason, by, at, gate numbers."""
        return [dict(entry) for entry in self._history(name, TAG_OVERRIDE_HISTORY)]

    def _history(self, name: str, tag: str) -> list[Any]:
        raw = self._client.get_registered_model(name).tags.get(tag)
        if not raw:
            return []
        try:
            value = json.loads(raw)
        except ValueError:
            logger.warning("%s: registered-model tag %s is not JSON; starting it afresh", name, tag)
            return []
        return list(value) if isinstance(value, list) else []

    def _set_history(self, name: str, tag: str, entries: list[Any]) -> None:
        self._client.set_registered_model_tag(name, tag, json.dumps(entries[-HISTORY_LIMIT:]))

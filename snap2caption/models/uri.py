"""Model references on the command line: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a folder."""

from __future__ import annotations

from pathlib import Path

from snap2caption.errors import NotFound


def resolve_model_dir(
    uri: str, *, tracking_uri: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local model folder for ``uri``: registry references are downloaded and verified, folders returned.

    Args:
        uri: ``models:/detector@production``, ``models:/tagger/3``, or a path to an artifact folder.
        tracking_uri: MLflow tracking URI for registry references (default: the project's).
        cache_dir: Download cache (default ``$SNAP2CAPTION_HOME/models``).

    Raises:
        NotFound: A path that is not a folder.
        ModelNotFoundError, ArtifactIntegrityError: From the registry.
    """
    if uri.startswith("models:/"):
        from snap2caption.registry import Registry, parse_model_ref, snap2caption_home

        name, ref = parse_model_ref(uri)
        folder, _ = Registry(tracking_uri).download(name, ref, cache_dir or snap2caption_home() / "models")
        return folder
    path = Path(uri).expanduser()
    if not path.is_dir():
        raise NotFound(f"model {uri!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION nor a folder")
    return path

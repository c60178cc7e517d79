"""Registry errors a caller can act on.

A model folder that fails its manifest check raises :class:`snap2caption.errors.ArtifactIntegrityError`
instead: the one error of every manifest check, in the registry, the loaders and the exports alike.
"""

from __future__ import annotations

from snap2caption.errors import Snap2CaptionError


class RegistryError(Snap2CaptionError):
    """Base class for registry failures a caller can act on."""

    code = "registry_error"
    status = 500


class ModelNotFoundError(RegistryError):
    """No such registered model, version or alias."""

    code = "model_not_found"
    status = 404


class PromotionError(RegistryError):
    """A promotion request that cannot be carried out as asked (no candidate, force without reason)."""

    code = "promotion_error"
    status = 409


class RollbackError(RegistryError):
    """No earlier production version to roll back to."""

    code = "rollback_error"
    status = 409

"""Typed errors shared by the library and every service.

Each error carries the machine-readable ``code`` and the HTTP ``status`` of the error contract in
DESIGN.md, so a service turns any of them into the one envelope
``{"error": {"code", "message", "request_id"}}`` without a lookup table of its own.
"""

from __future__ import annotations


class Snap2CaptionError(Exception):
    """Base class: an error a caller can act on, with a stable code and an HTTP status."""

    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(Snap2CaptionError):
    code = "bad_request"
    status = 400


class NotFound(Snap2CaptionError):
    code = "not_found"
    status = 404


class Conflict(Snap2CaptionError):
    """The request contradicts what the server holds (e.g. feedback's image is not the analysed one)."""

    code = "conflict"
    status = 409


class ImageError(Snap2CaptionError):
    """Base class for every reason an image is refused."""


class UnsupportedFormat(ImageError):
    """The bytes are not one of the allowed image formats (judged by magic bytes only)."""

    code = "unsupported_format"
    status = 415


class CorruptImage(ImageError):
    """The bytes claim an allowed format but are truncated or corrupt."""

    code = "corrupt_image"
    status = 422


class PayloadTooLarge(ImageError):
    """More bytes than the byte cap."""

    code = "payload_too_large"
    status = 413


class ImageTooLarge(ImageError):
    """Width x height over the pixel cap (a decompression bomb is refused from its header)."""

    code = "image_too_large"
    status = 413


class ArtifactError(Snap2CaptionError):
    """A model folder that cannot be used: incomplete, tampered with, or not of a known format."""

    code = "invalid_artifact"
    status = 500


class ArtifactIntegrityError(ArtifactError):
    """A model folder does not match its ``MANIFEST.json`` (tampered, truncated, extra or pickled files)."""

    code = "artifact_integrity"
    status = 500


class ProviderUnavailable(Snap2CaptionError):
    """An ONNX Runtime execution provider asked for by name (CUDA, TensorRT) that this machine cannot run."""

    code = "provider_unavailable"
    status = 500


class RetryLater(Snap2CaptionError):
    """Base class: an error the client should retry after ``retry_after`` seconds (the ``Retry-After``
    header the error handler sends)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(RetryLater):
    """A queue is full or the service is shedding load; the client should retry after ``retry_after`` s."""

    code = "overloaded"
    status = 503


class Timeout(Snap2CaptionError):
    """A deadline passed before the work finished."""

    code = "timeout"
    status = 504


class RequestTimeout(Snap2CaptionError):
    """The client sent its request body too slowly (under the minimum rate, or over the total time)."""

    code = "request_timeout"
    status = 408


class NotReady(Snap2CaptionError):
    """The process is alive but cannot serve yet (starting, loading, draining)."""

    code = "not_ready"
    status = 503


class UrlNotAllowed(Snap2CaptionError):
    """A URL refused before any connection: scheme, loopback/private/link-local/metadata address,
    too many redirects."""

    code = "url_not_allowed"
    status = 400


class UrlFetchFailed(Snap2CaptionError):
    """A URL that was allowed but could not be fetched, or did not return an image."""

    code = "url_fetch_failed"
    status = 422


class Unauthorized(Snap2CaptionError):
    """A missing, unknown or revoked API key."""

    code = "unauthorized"
    status = 401


class RateLimited(RetryLater):
    """The caller's key is over its request rate; retry after ``retry_after`` seconds."""

    code = "rate_limited"
    status = 429

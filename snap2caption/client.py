"""Python client of the Snap2Caption gateway: ``Snap2CaptionClient`` (sync) and ``AsyncSnap2CaptionClient``.

Example::

    from snap2caption.client import Snap2CaptionClient

    with Snap2CaptionClient("http://127.0.0.1:8000", api_key="...") as client:
        result = client.analyze("photo.jpg", features=["caption", "tags"])
        print(result.caption.text, [t.hashtag for t in result.tags])

Both clients keep one pooled HTTP connection set (httpx) for their lifetime, raise
``Snap2CaptionAPIError`` built from the error envelope ``{"error": {"code", "message", "request_id"}}``, and
retry only answers that say "try again later" (503 ``overloaded``, 429 ``rate_limited``), only when
``max_retries`` asks for it, waiting what ``Retry-After`` says.
"""

from __future__ import annotations

import asyncio
import mimetypes
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from snap2caption.api import (
    FEATURES,
    AltTextResult,
    AnalyzeBatchResponse,
    AnalyzeResult,
    AnalyzeTimings,
    BatchItem,
    Box,
    CaptionResult,
    FeatureError,
    FeedbackResponse,
    ImageInfo,
    ItemError,
    ModelInfo,
    ObjectResult,
    ObjectsDomain,
    TagResult,
    WireModel,
)

__all__ = [
    "FEATURES",
    "AltText",
    "AnalyzeResult",
    "AsyncSnap2CaptionClient",
    "BatchItem",
    "BatchResult",
    "Box",
    "Caption",
    "DetectedObject",
    "FeatureError",
    "FeedbackReceipt",
    "ImageInfo",
    "ItemError",
    "ModelInfo",
    "ObjectsDomain",
    "Snap2CaptionAPIError",
    "Snap2CaptionClient",
    "Snap2CaptionClientError",
    "Snap2CaptionConnectionError",
    "Tag",
    "Timings",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0
# Statuses that mean "the same request may work later"; nothing else is ever retried.
RETRY_STATUSES = frozenset({429, 503})

ImageInput = bytes | str | Path
FeaturesArg = str | Sequence[str] | None


# ---------------------------------------------------------------------------------------------- results
# The answers are the gateway's own response schemas (``snap2caption.api``), under the client's names.

Caption = CaptionResult
AltText = AltTextResult
Tag = TagResult
DetectedObject = ObjectResult
Timings = AnalyzeTimings
BatchResult = AnalyzeBatchResponse
FeedbackReceipt = FeedbackResponse


# ----------------------------------------------------------------------------------------------- errors


class Snap2CaptionClientError(Exception):
    """Base class of everything the client raises."""


class Snap2CaptionConnectionError(Snap2CaptionClientError):
    """The gateway could not be reached, or did not answer in time."""


@dataclass(eq=False)  # eq=False keeps exceptions hashable, as Python expects
class Snap2CaptionAPIError(Snap2CaptionClientError):
    """The gateway answered with an error (the envelope's fields; ``retry_after`` from ``Retry-After``).

    Attributes:
        status: HTTP status.
        code: Stable error code (``unsupported_format``, ``rate_limited``, ...), or ``http_<status>`` when
            the body was not an envelope (a proxy's error page).
        message: Human-readable message.
        request_id: The request id to quote (envelope, else the ``X-Request-ID`` header), or ``None``.
        retry_after: Seconds to wait before retrying, when the server said.
    """

    status: int
    code: str
    message: str
    request_id: str | None = None
    retry_after: float | None = None
    details: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle by fields (the default would call the class with the message alone).
        fields = (self.status, self.code, self.message, self.request_id, self.retry_after, self.details)
        return (type(self), fields)

    def __str__(self) -> str:
        rid = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status} {self.code}: {self.message}{rid}"


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def error_from_response(response: httpx.Response) -> Snap2CaptionAPIError:
    """Build the exception for an error response, from the envelope when there is one."""
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    header_rid = response.headers.get("x-request-id")
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        details = error.get("details")
        return Snap2CaptionAPIError(
            status=response.status_code,
            code=error["code"],
            message=str(error.get("message") or response.reason_phrase),
            request_id=error.get("request_id") or header_rid,
            retry_after=retry_after,
            details=details if isinstance(details, dict) else None,
        )
    # Not our envelope (a proxy or load balancer answered): keep a readable one-line excerpt.
    text = " ".join(response.text.split())[:200] if response.content else ""
    return Snap2CaptionAPIError(
        status=response.status_code,
        code=f"http_{response.status_code}",
        message=text or response.reason_phrase or "error",
        request_id=header_rid,
        retry_after=retry_after,
    )


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class _Request:
    """One request, ready for ``httpx.Client.request`` (built once, sent as often as retries need)."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None  # text fields of a multipart body

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"params": self.params or None}
        if self.json is not None:
            out["json"] = self.json
        if self.files is not None:
            out["files"] = self.files
        if self.data is not None:
            out["data"] = self.data
        return out


def is_url(value: object) -> bool:
    """Whether ``value`` is a string that is an http(s) URL (anything else is read as a path)."""
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def _features_param(features: FeaturesArg) -> str | None:
    if features is None:
        return None
    names = [features] if isinstance(features, str) else list(features)
    parts = [part.strip() for name in names for part in name.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(FEATURES))
    if unknown or not parts:
        raise ValueError(f"features must be among {', '.join(FEATURES)}; got {features!r}")
    return ",".join(dict.fromkeys(parts))


def _options(
    features: FeaturesArg, max_tags: int | None, min_confidence: float | None, gender_neutral: bool | None
) -> dict[str, Any]:
    """The options that were given, as JSON values (``features`` as a comma string)."""
    options: dict[str, Any] = {
        "features": _features_param(features),
        "max_tags": None if max_tags is None else int(max_tags),
        "min_confidence": None if min_confidence is None else float(min_confidence),
        "gender_neutral": gender_neutral,
    }
    return {key: value for key, value in options.items() if value is not None}


def _query(options: dict[str, Any]) -> dict[str, str]:
    # Uploads carry the options in the query string; JSON requests carry them in the body.
    return {key: str(v).lower() if isinstance(v, bool) else str(v) for key, v in options.items()}


def _file_part(image: bytes | str | Path, filename: str | None, index: int = 0) -> tuple[str, bytes, str]:
    """``(filename, bytes, content type)`` of an upload. The gateway judges the format by magic bytes; the
    content type is a courtesy."""
    if isinstance(image, bytes | bytearray | memoryview):
        name = filename or f"image-{index}"
        data = bytes(image)
    else:
        path = Path(image)
        data = path.read_bytes()
        name = filename or path.name
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return name, data, content_type


def _analyze_request(image: ImageInput, filename: str | None, options: dict[str, Any]) -> _Request:
    if is_url(image):
        return _Request("POST", "/v1/analyze", json={"url": image, **options})
    return _Request("POST", "/v1/analyze", _query(options), files=[("file", _file_part(image, filename))])


def _batch_request(images: Iterable[ImageInput], options: dict[str, Any]) -> _Request:
    items = list(images)
    if not items:
        raise ValueError("analyze_batch needs at least one image")
    urls = [is_url(item) for item in items]
    if all(urls):
        return _Request("POST", "/v1/analyze/batch", json={"urls": items, **options})
    if any(urls):
        # The gateway takes either uploads or URLs in one batch, not a mix.
        raise ValueError("analyze_batch takes either all URLs or all files/bytes, not a mix")
    files = [("files", _file_part(item, None, i)) for i, item in enumerate(items)]
    return _Request("POST", "/v1/analyze/batch", _query(options), files=files)


def _feedback_request(
    inference_id: str | None,
    request_id: str | None,
    caption: str | None,
    rating: int | None,
    reason: str | None,
    image: bytes | str | Path | None,
) -> _Request:
    if (inference_id is None) == (request_id is None):
        raise ValueError("name the analysis by its inference_id (or its request_id), one of the two")
    if caption is None and rating is None:
        raise ValueError("feedback needs a corrected caption, a rating, or both")
    if rating is not None and not 1 <= rating <= 5:
        raise ValueError(f"rating must be 1..5, got {rating}")
    fields = {"inference_id": inference_id, "request_id": request_id, "caption": caption, "rating": rating}
    body: dict[str, Any] = {k: v for k, v in {**fields, "reason": reason}.items() if v is not None}
    if image is None:
        return _Request("POST", "/v1/feedback", json=body)
    # With the image: the same fields as multipart text fields, the image as `file`.
    return _Request(
        "POST",
        "/v1/feedback",
        data={k: str(v) for k, v in body.items()},
        files=[("file", _file_part(image, None))],
    )


def _headers(api_key: str | None, user_agent: str) -> dict[str, str]:
    headers = {"User-Agent": user_agent, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _user_agent() -> str:
    from snap2caption import __version__

    return f"snap2caption-client/{__version__}"


M = TypeVar("M", bound=WireModel)


def _parse(response: httpx.Response, model: type[M]) -> M:
    if response.is_error:
        raise error_from_response(response)
    try:
        data = response.json()
        parsed = model.model_validate(data)
    except ValueError as exc:  # JSON or validation error: the server is not the gateway we know
        raise Snap2CaptionAPIError(
            status=response.status_code,
            code="invalid_response",
            message=f"unexpected response body for {model.__name__}: {str(exc).splitlines()[0]}",
            request_id=response.headers.get("x-request-id"),
        ) from None
    parsed._raw = data
    return parsed


@dataclass(frozen=True)
class _RetryPolicy:
    max_retries: int
    backoff_s: float
    max_wait_s: float

    def wait_s(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or ``None`` to give up and raise."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        said = parse_retry_after(response.headers.get("retry-after"))
        wait = said if said is not None else self.backoff_s * 2**attempt
        if wait > self.max_wait_s:
            return None  # longer than the caller will wait: report the error now, not later
        return wait


# ----------------------------------------------------------------------------------------------- clients


class _ClientBase:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
        retry_backoff_s: float,
        max_retry_wait_s: float,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self._retry = _RetryPolicy(max_retries, retry_backoff_s, max_retry_wait_s)
        self._client_kwargs: dict[str, Any] = {
            "base_url": self.base_url,
            "headers": _headers(api_key, _user_agent()),
            "timeout": timeout,
            # Connection pooling: one keep-alive pool per client, shared by every call.
            "limits": httpx.Limits(max_connections=64, max_keepalive_connections=16),
        }


class Snap2CaptionClient(_ClientBase):
    """Synchronous client of the gateway; use it as a context manager (or call ``close``).

    Args:
        base_url: The gateway, e.g. ``http://127.0.0.1:8000``.
        api_key: Sent as ``Authorization: Bearer <key>`` when the gateway has auth on.
        timeout: Seconds per HTTP request (or an ``httpx.Timeout``).
        max_retries: How many times to retry a 503 ``overloaded`` or 429 ``rate_limited`` answer
            (0: never). Other errors are never retried.
        retry_backoff_s: Wait before the first retry when the server sends no ``Retry-After``; doubles.
        max_retry_wait_s: Raise instead of retrying when the server asks for a longer wait than this.
        transport: An httpx transport (tests, proxies, unix sockets); the default opens TCP connections.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        *,
        max_retries: int = 0,
        retry_backoff_s: float = 0.5,
        max_retry_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, retry_backoff_s, max_retry_wait_s)
        self._http = httpx.Client(transport=transport, **self._client_kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def _send(self, request: _Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(request.method, request.path, **request.kwargs())
            except httpx.TimeoutException as exc:
                raise Snap2CaptionConnectionError(f"no answer from {self.base_url} in time: {exc}") from exc
            except httpx.TransportError as exc:
                raise Snap2CaptionConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
            wait = self._retry.wait_s(attempt, response) if response.is_error else None
            if wait is None:
                return response
            time.sleep(wait)
            attempt += 1

    def analyze(
        self,
        image: ImageInput,
        *,
        features: FeaturesArg = None,
        max_tags: int | None = None,
        min_confidence: float | None = None,
        gender_neutral: bool | None = None,
        filename: str | None = None,
    ) -> AnalyzeResult:
        """Analyse one image.

        Args:
            image: Image bytes, a path, or an http(s) URL string (the gateway fetches it). Any other
                string is a path.
            features: Subset of ``caption, alt_text, tags, objects`` (a list or a comma string);
                ``None`` for the gateway's default (all).
            max_tags: At most this many tags.
            min_confidence: Drop tags and objects scored below this.
            gender_neutral: Ask for gender-neutral wording in caption and alt text.
            filename: Name sent with bytes (paths send their own name).

        Returns:
            The typed result.

        Raises:
            Snap2CaptionAPIError: The gateway refused or failed the request.
            Snap2CaptionConnectionError: The gateway could not be reached in time.
            ValueError: Unknown features.
        """
        options = _options(features, max_tags, min_confidence, gender_neutral)
        return _parse(self._send(_analyze_request(image, filename, options)), AnalyzeResult)

    def analyze_batch(
        self,
        images: Iterable[ImageInput],
        *,
        features: FeaturesArg = None,
        max_tags: int | None = None,
        min_confidence: float | None = None,
        gender_neutral: bool | None = None,
    ) -> BatchResult:
        """Analyse up to 16 images in one request: all bytes/paths (uploaded) or all URLs.

        One bad image fails only its own item (``BatchItem.error``); the call raises only when the
        whole request is refused. Options are as for ``analyze``.
        """
        options = _options(features, max_tags, min_confidence, gender_neutral)
        return _parse(self._send(_batch_request(images, options)), BatchResult)

    def feedback(
        self,
        inference_id: str | None = None,
        caption: str | None = None,
        rating: int | None = None,
        reason: str | None = None,
        *,
        request_id: str | None = None,
        image: bytes | str | Path | None = None,
    ) -> FeedbackReceipt:
        """Send a corrected caption and/or a 1-5 rating for an earlier analysis, and maybe its image.

        Args:
            inference_id: ``AnalyzeResult.inference_id`` of the analysis.
            caption: The caption it should have given.
            rating: 1 (useless) to 5 (perfect).
            reason: Free text, e.g. what was wrong.
            request_id: Instead of ``inference_id``: ``AnalyzeResult.request_id`` (the gateway accepts it
                only when it names one analysis; 409 ``ambiguous_request_id`` otherwise).
            image: The analysed image (bytes or a path), byte for byte, so that the feedback can become
                training data although the gateway keeps no images (409 ``image_mismatch`` if it is
                not the one analysed).

        Returns:
            The gateway's receipt.

        Raises:
            ValueError: Neither or both of ``inference_id`` and ``request_id``, nothing to say, or a
                rating outside 1..5.
        """
        request = _feedback_request(inference_id, request_id, caption, rating, reason, image)
        return _parse(self._send(request), FeedbackReceipt)


class AsyncSnap2CaptionClient(_ClientBase):
    """Asynchronous client of the gateway; ``async with`` it (or ``await aclose()``).

    Same arguments, methods and errors as ``Snap2CaptionClient``, with ``await``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        *,
        max_retries: int = 0,
        retry_backoff_s: float = 0.5,
        max_retry_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, retry_backoff_s, max_retry_wait_s)
        self._http = httpx.AsyncClient(transport=transport, **self._client_kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def _send(self, request: _Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(request.method, request.path, **request.kwargs())
            except httpx.TimeoutException as exc:
                raise Snap2CaptionConnectionError(f"no answer from {self.base_url} in time: {exc}") from exc
            except httpx.TransportError as exc:
                raise Snap2CaptionConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
            wait = self._retry.wait_s(attempt, response) if response.is_error else None
            if wait is None:
                return response
            await asyncio.sleep(wait)
            attempt += 1

    async def analyze(
        self,
        image: ImageInput,
        *,
        features: FeaturesArg = None,
        max_tags: int | None = None,
        min_confidence: float | None = None,
        gender_neutral: bool | None = None,
        filename: str | None = None,
    ) -> AnalyzeResult:
        """Analyse one image; see ``Snap2CaptionClient.analyze``."""
        options = _options(features, max_tags, min_confidence, gender_neutral)
        return _parse(await self._send(_analyze_request(image, filename, options)), AnalyzeResult)

    async def analyze_batch(
        self,
        images: Iterable[ImageInput],
        *,
        features: FeaturesArg = None,
        max_tags: int | None = None,
        min_confidence: float | None = None,
        gender_neutral: bool | None = None,
    ) -> BatchResult:
        """Analyse up to 16 images in one request; see ``Snap2CaptionClient.analyze_batch``."""
        options = _options(features, max_tags, min_confidence, gender_neutral)
        return _parse(await self._send(_batch_request(images, options)), BatchResult)

    async def feedback(
        self,
        inference_id: str | None = None,
        caption: str | None = None,
        rating: int | None = None,
        reason: str | None = None,
        *,
        request_id: str | None = None,
        image: bytes | str | Path | None = None,
    ) -> FeedbackReceipt:
        """Send feedback on an analysis, and maybe its image; see ``Snap2CaptionClient.feedback``."""
        request = _feedback_request(inference_id, request_id, caption, rating, reason, image)
        return _parse(await self._send(request), FeedbackReceipt)

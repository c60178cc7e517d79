"""The gateway's engine: decode and normalise an image once, fan out to the backends, merge the answers.

Request side:

1. :meth:`Gateway.normalise`: the shared safe decoder checks the bytes (caps, format, pixel bomb) and
   decodes them upright (EXIF orientation applied) on a worker thread; the result is shrunk to
   ``backend_max_side`` and re-encoded (JPEG q95 4:4:4 or PNG), so backends never see the raw upload.
2. :meth:`Gateway.analyze`: the captioner (``/v1/caption``) and the detector (``/v1/tags``,
   ``/v1/detect``) are called concurrently through one pooled keep-alive client per backend
   (:class:`BackendClient`: per-call timeouts, one retry with jitter on connection errors only, and a
   :class:`CircuitBreaker`). Boxes are scaled from the normalised frame back to the original's.
3. A backend that fails leaves its features out (``errors`` lists them); nothing computable is 503
   ``overloaded``. A backend's 413/415/422 about the image is the caller's error, passed on as such.

The request's deadline (``time.monotonic()``, from its budget) bounds everything: :func:`within_deadline`
wraps the URL fetch and the decode, and each backend call gets at most what is left of it (the backend is
told the same, as ``timeout_ms``, so it drops work nobody will wait for). When it runs out:

- a backend that has answered keeps its features and the cut one is listed in ``errors`` with code
  ``timeout`` (the partial-result rule of one backend failing);
- nothing computed at all is 504 ``timeout``.

Neither verdict touches the circuit breaker: a caller's short budget says nothing about a backend's
health. Nor does a backend's 503 ``overloaded``: that is backpressure (a full queue shedding load for a
moment), and opening the circuit would switch its features off for a whole cooldown. With nothing computed
because backends shed load, the answer is 503 ``overloaded`` with their Retry-After.

Readiness: a background task polls every backend's ``/readyz``; the gateway is ready while each has
answered 200 recently.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from anyio import CapacityLimiter
from anyio.to_thread import run_sync

from services.gateway import metrics
from services.gateway.alt_text import gender_neutral, make_alt_text
from services.gateway.config import Settings
from snap2caption.api import (
    FEATURES,
    AltTextResult,
    AnalyzeResult,
    AnalyzeTimings,
    Box,
    CaptionResult,
    Feature,
    FeatureError,
    ImageInfo,
    ModelInfo,
    ObjectResult,
    TagResult,
)
from snap2caption.errors import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    Overloaded,
    PayloadTooLarge,
    Timeout,
    UnsupportedFormat,
)
from snap2caption.imaging import DecodeLimits, decode_image, probe_image
from snap2caption.logs import request_id_var
from snap2caption.service import Readiness
from snap2caption.serving.inputs import to_ms

logger = logging.getLogger(__name__)

CAPTIONER, DETECTOR = "captioner", "detector"
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
# A backend's refusal of the image itself is the caller's error, with the same status and code.
_IMAGE_ERRORS: dict[str, type[ImageError]] = {
    "unsupported_format": UnsupportedFormat,
    "corrupt_image": CorruptImage,
    "payload_too_large": PayloadTooLarge,
    "image_too_large": ImageTooLarge,
}


# ------------------------------------------------------------------------------------------ breaker


class BreakerState(enum.IntEnum):
    """Circuit breaker states, valued as the ``snap2caption_circuit_breaker_state`` gauge shows them."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Stop calling a backend that keeps failing, and try it again after a cooldown.

    Closed: calls go through; ``failure_threshold`` consecutive failures open the circuit. Open: calls
    fail at once (no connection, no timeout to wait out) until ``cooldown_s`` has passed. Half-open: one
    trial call goes through; its success closes the circuit, its failure opens it for another cooldown.

    Args:
        name: Backend name, the gauge's label.
        failure_threshold: Consecutive failures that open the circuit.
        cooldown_s: Time open before a trial call.
        clock: ``time.monotonic`` (injectable for tests).
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or cooldown_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown_s > 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._gauge = metrics.BREAKER_STATE.labels(name)
        self._gauge.set(BreakerState.CLOSED)

    @property
    def state(self) -> BreakerState:
        """The current state (an open circuit whose cooldown has passed reads as half-open)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    @property
    def retry_after_s(self) -> float:
        """Seconds until an open circuit lets a trial call through (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open, only the one trial call may."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded: the backend is healthy."""
        self._failures = 0
        self._trial_in_flight = False
        if self._state is not BreakerState.CLOSED:
            logger.info("circuit %s closed", self.name)
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """A call failed (connection, timeout, 5xx)."""
        self._failures += 1
        was_trial = self._trial_in_flight
        self._trial_in_flight = False
        if was_trial or self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            if self._state is not BreakerState.OPEN:
                logger.warning("circuit %s opened after %d failure(s)", self.name, self._failures)
            self._opened_at = self._clock()
            self._set(BreakerState.OPEN)

    def release(self) -> None:
        """A call ended with no verdict on the backend (cancelled, or a 4xx about the input)."""
        self._trial_in_flight = False

    def _set(self, state: BreakerState) -> None:
        self._state = state
        self._gauge.set(int(state))


# ------------------------------------------------------------------------------------------ backends


class BackendFailed(Exception):
    """A backend call gave no usable answer; the features it serves are left out of the response.

    Attributes:
        code: ``backend_unavailable``, ``timeout``, ``circuit_open``, or the backend's own error code
            (``overloaded`` when it sheds load).
        message: One line for the client.
        retry_after: The backend's Retry-After, when it shed load (503 ``overloaded``).
        by_deadline: The request's deadline cut the call (rather than the backend's own timeout).
    """

    def __init__(
        self, code: str, message: str, *, retry_after: float | None = None, by_deadline: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.by_deadline = by_deadline


@dataclass(frozen=True)
class BackendAnswer:
    """A backend's JSON body and the wall time of the call (retries included)."""

    body: dict[str, Any]
    seconds: float


@dataclass
class BackendHealth:
    """What the last ``/readyz`` polls of a backend said."""

    last_ok: float | None = None  # time.monotonic() of the last 200
    detail: str = "not polled yet"


class BackendClient:
    """One backend service: a pooled keep-alive HTTP client, retries, a circuit breaker, metrics.

    Args:
        name: ``captioner`` or ``detector`` (metric label).
        base_url: The backend's base URL.
        settings: Timeouts, retry and breaker parameters.
        transport: An httpx transport to use instead of the network (tests of this class only).
    """

    def __init__(
        self, name: str, base_url: str, settings: Settings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.retries = settings.retries
        self.retry_jitter_s = settings.retry_jitter_s
        self.timeout_s = settings.backend_timeout_s
        self.breaker = CircuitBreaker(name, settings.breaker_failure_threshold, settings.breaker_cooldown_s)
        self.health = BackendHealth()
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(settings.backend_timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
            ),
            transport=transport,
        )
        self._duration = metrics.BACKEND_DURATION.labels(name)
        self._outcomes = {
            outcome: metrics.BACKEND_REQUESTS.labels(name, outcome)
            for outcome in ("ok", "error", "timeout", "circuit_open", "overloaded", "deadline", "cancelled")
        }

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self.client.aclose()

    async def post_image(
        self, path: str, image: bytes, content_type: str, params: Mapping[str, Any], *, deadline: float
    ) -> BackendAnswer:
        """POST one image as the raw body; return the JSON answer.

        The call gets ``timeout_s``, or what is left until ``deadline`` when that is less; the backend is
        sent the same budget as ``timeout_ms``.

        Args:
            path: The backend route.
            image: The normalised image.
            content_type: Its media type.
            params: Query parameters of the route.
            deadline: The request's deadline (``time.monotonic()``).

        Raises:
            BackendFailed: Circuit open, connection failure (after the retry), timeout, the deadline,
                5xx (503 ``overloaded`` with the backend's Retry-After), a bad body.
            ImageError: The backend refused the image (413/415/422), passed on to the caller as is.
        """
        left = deadline - time.monotonic()
        if left <= 0:
            self._outcomes["deadline"].inc()
            raise BackendFailed("timeout", f"no time left to call the {self.name}", by_deadline=True)
        budget = min(self.timeout_s, left)
        by_deadline = left < self.timeout_s  # if it runs out, the caller's budget did, not the backend
        if not self.breaker.allow():
            self._outcomes["circuit_open"].inc()
            raise BackendFailed(
                "circuit_open",
                f"{self.name} is failing; calls paused for {self.breaker.retry_after_s:.1f} s",
            )
        started = time.perf_counter()
        verdict: bool | None = None  # True: backend healthy, False: failed, None: no verdict
        outcome = "error"
        headers = {"content-type": content_type}
        if rid := request_id_var.get():
            headers["x-request-id"] = rid  # one id across the gateway and backend logs
        timer = asyncio.timeout(budget)
        try:
            async with timer:
                response = await self._send(
                    path, image, headers, {**params, "timeout_ms": max(1, int(budget * 1000))}
                )
            if response.status_code == 200:
                body = _json_object(response)
                if body is None:
                    verdict = False
                    raise BackendFailed("backend_error", f"{self.name} answered 200 without a JSON object")
                verdict, outcome = True, "ok"
                return BackendAnswer(body, time.perf_counter() - started)
            code, message = _envelope(response)
            if code in _IMAGE_ERRORS and 400 <= response.status_code < 500:
                verdict = True  # the backend works; the image is the problem
                outcome = "ok"
                raise _IMAGE_ERRORS[code](message)
            if response.status_code == Overloaded.status and code == Overloaded.code:
                outcome = "overloaded"  # backpressure: no verdict on the backend's health
                raise BackendFailed(
                    code, f"{self.name} is overloaded: {message}", retry_after=_retry_after_s(response)
                )
            if response.status_code == Timeout.status and by_deadline:
                outcome = "deadline"
                raise BackendFailed(code, f"{self.name} ran out of the request's time", by_deadline=True)
            if response.status_code >= 500:
                verdict = False
                outcome = "timeout" if response.status_code == Timeout.status else "error"
            raise BackendFailed(code, f"{self.name} answered {response.status_code}: {message}")
        except TimeoutError as exc:
            if not timer.expired():
                raise
            if by_deadline:
                outcome = "deadline"
                raise BackendFailed(
                    "timeout", f"{self.name} did not answer within the request's time", by_deadline=True
                ) from exc
            verdict, outcome = False, "timeout"
            raise BackendFailed("timeout", f"{self.name} did not answer in {budget:g} s") from exc
        except httpx.TimeoutException as exc:
            verdict, outcome = False, "timeout"
            raise BackendFailed(
                "timeout", f"{self.name} did not answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.HTTPError as exc:
            verdict = False
            raise BackendFailed(
                "backend_unavailable", f"{self.name} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        except asyncio.CancelledError:
            outcome = "cancelled"  # the request was abandoned (its client left)
            raise
        finally:
            if verdict is True:
                self.breaker.record_success()
            elif verdict is False:
                self.breaker.record_failure()
            else:
                self.breaker.release()
            self._outcomes[outcome].inc()
            self._duration.observe(time.perf_counter() - started)

    async def _send(
        self, path: str, image: bytes, headers: dict[str, str], params: Mapping[str, Any]
    ) -> httpx.Response:
        """One call, retried on connection errors only (nothing reached the model): a refused connect,
        or a pooled keep-alive connection the backend had closed."""
        attempt = 0
        while True:
            try:
                return await self.client.post(path, content=image, headers=headers, params=dict(params))
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                if attempt >= self.retries:
                    raise
                attempt += 1
                logger.info("%s %s: %s; retry %d", self.name, path, type(exc).__name__, attempt)
                await asyncio.sleep(random.uniform(0, self.retry_jitter_s))

    async def poll_ready(self) -> None:
        """GET the backend's ``/readyz`` once and remember the answer."""
        try:
            response = await self.client.get("/readyz", timeout=2.0)
        except httpx.HTTPError as exc:
            self.health.detail = f"unreachable: {type(exc).__name__}"
            return
        if response.status_code == 200:
            self.health.last_ok = time.monotonic()
            self.health.detail = "ready"
        else:
            _, message = _envelope(response)
            self.health.detail = f"{response.status_code}: {message}"


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _retry_after_s(response: httpx.Response) -> float | None:
    """A response's ``Retry-After`` in seconds, or ``None`` (absent, an HTTP date, nonsense)."""
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86_400 else None


def _envelope(response: httpx.Response) -> tuple[str, str]:
    """``(code, message)`` of a backend's error envelope, or generic ones for other bodies."""
    body = _json_object(response) or {}
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return error["code"], str(error.get("message", ""))[:300]
    return ("backend_error" if response.status_code >= 500 else "bad_request"), response.reason_phrase


# ------------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class NormalisedImage:
    """An accepted image, and the normalised copy the backends get.

    Attributes:
        data: The normalised image, encoded (``content_type``); upright, longer side <= max side.
        content_type: ``image/jpeg`` or ``image/png``.
        width: Width of the original after EXIF orientation (the frame of the returned boxes).
        height: Height likewise.
        sent_width: Width of the normalised image.
        sent_height: Height of the normalised image.
        format: The original's format (magic bytes).
        n_bytes: Size of the original.
        sha256: Hex SHA-256 of the original bytes.
        original: The original bytes (kept only for the inference log when images are retained).
    """

    data: bytes
    content_type: str
    width: int
    height: int
    sent_width: int
    sent_height: int
    format: str
    n_bytes: int
    sha256: str
    original: bytes = field(repr=False)


def normalise_image(data: bytes, limits: DecodeLimits, max_side: int, encoding: str) -> NormalisedImage:
    """Check, decode (EXIF orientation applied, first frame, alpha on white), shrink and re-encode.

    Args:
        data: The raw upload.
        limits: Byte and pixel caps, checked before any pixel is decoded.
        max_side: Longest side of the normalised copy (never upscaled).
        encoding: ``jpeg`` or ``png``.

    Raises:
        PayloadTooLarge, UnsupportedFormat, ImageTooLarge, CorruptImage: From the shared decoder.
    """
    stored = probe_image(data, limits)  # header only: the original's size, for scaling boxes back
    decoded = decode_image(data, limits, max_side=max_side)
    width, height = stored.width, stored.height
    if decoded.orientation in _SWAPS_SIDES:
        width, height = height, width
    buffer = io.BytesIO()
    if encoding == "png":
        decoded.image.save(buffer, format="PNG", compress_level=1)
        content_type = "image/png"
    else:
        decoded.image.save(buffer, format="JPEG", quality=95, subsampling=0)
        content_type = "image/jpeg"
    return NormalisedImage(
        data=buffer.getvalue(),
        content_type=content_type,
        width=width,
        height=height,
        sent_width=decoded.width,
        sent_height=decoded.height,
        format=decoded.format,
        n_bytes=decoded.n_bytes,
        sha256=decoded.sha256,
        original=data,
    )


# ------------------------------------------------------------------------------------------ analysis


@contextlib.asynccontextmanager
async def within_deadline(deadline: float, doing: str) -> AsyncIterator[None]:
    """Run the block before the request's ``deadline`` (``time.monotonic()``), or stop it there.

    Args:
        deadline: The request's deadline.
        doing: What the block does, for the message (``fetching the URL``).

    Raises:
        Timeout: The deadline passed first (504).
    """
    timer = asyncio.timeout(deadline - time.monotonic())
    try:
        async with timer:
            yield
    except TimeoutError:
        if not timer.expired():
            raise
        raise Timeout(f"the request's time ran out while {doing}") from None


@dataclass(frozen=True)
class AnalyzeOptions:
    """A request's options, resolved.

    Attributes:
        features: What to compute.
        max_tags: Most tags.
        min_confidence: Minimum tag and object score, or ``None`` for the detector's defaults.
        gender_neutral: Neutral wording in caption and alt text.
    """

    features: frozenset[Feature] = frozenset(FEATURES)
    max_tags: int = 5
    min_confidence: float | None = None
    gender_neutral: bool = False


# Which backend call each feature needs; alt text needs the caption, and the labels for its fallback.
_CALLS_FOR: dict[Feature, tuple[str, ...]] = {
    "caption": ("caption",),
    "alt_text": ("caption", "tags", "objects"),
    "tags": ("tags",),
    "objects": ("objects",),
}
_FEATURE_CALL: dict[Feature, str] = {"caption": "caption", "tags": "tags", "objects": "objects"}


class Gateway:
    """The backends, the decoder's worker threads, and the analysis of one image.

    Args:
        settings: Gateway settings.
        transports: Per-backend httpx transports instead of the network (unit tests only).
    """

    def __init__(
        self, settings: Settings, transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
    ) -> None:
        self.settings = settings
        transports = transports or {}
        self.captioner = BackendClient(CAPTIONER, settings.captioner_url, settings, transports.get(CAPTIONER))
        self.detector = BackendClient(DETECTOR, settings.detector_url, settings, transports.get(DETECTOR))
        self.backends = (self.captioner, self.detector)
        self.limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self._decode_limiter = CapacityLimiter(settings.decode_threads)
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start polling the backends' readiness (on the running loop)."""
        self._poller = asyncio.create_task(self._poll_forever(), name="gateway-readiness")

    async def close(self) -> None:
        """Stop polling and close the connection pools."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for backend in self.backends:
            await backend.aclose()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(b.poll_ready() for b in self.backends))
            await asyncio.sleep(self.settings.ready_poll_interval_s)

    def readiness(self) -> Readiness:
        """Ready while every backend answered ``/readyz`` 200 within ``ready_max_age_s``."""
        now = time.monotonic()
        checks: dict[str, Any] = {}
        down: list[str] = []
        for backend in self.backends:
            last_ok = backend.health.last_ok
            fresh = last_ok is not None and now - last_ok <= self.settings.ready_max_age_s
            checks[backend.name] = {
                "ready": fresh,
                "url": backend.base_url,
                "detail": backend.health.detail,
                "last_ok_age_s": None if last_ok is None else round(now - last_ok, 3),
                "circuit": backend.breaker.state.name.lower(),
            }
            if not fresh:
                down.append(backend.name)
        reason = f"backend(s) not ready: {', '.join(down)}" if down else ""
        return Readiness(ready=not down, checks=checks, reason=reason)

    # ------------------------------------------------------------------------------ requests

    async def normalise(self, data: bytes) -> NormalisedImage:
        """Check, decode and normalise an upload on a worker thread (see :func:`normalise_image`)."""
        s = self.settings
        image = await run_sync(
            normalise_image, data, self.limits, s.backend_max_side, s.backend_image_format,
            limiter=self._decode_limiter,
        )  # fmt: skip
        metrics.INPUT_IMAGE_BYTES.observe(image.n_bytes)
        metrics.INPUT_IMAGE_PIXELS.observe(image.width * image.height)
        metrics.INPUT_IMAGES.labels(image.format).inc()
        return image

    async def analyze(
        self,
        image: NormalisedImage,
        options: AnalyzeOptions,
        decode_s: float,
        fetch_s: float | None = None,
        *,
        deadline: float,
    ) -> AnalyzeResult:
        """Call the backends the features need, concurrently, and merge their answers.

        Args:
            image: From :meth:`normalise`.
            options: The request's options.
            decode_s: Time spent in :meth:`normalise` (reported in the timings).
            fetch_s: Time spent fetching the URL, for URL requests.
            deadline: The request's deadline (``time.monotonic()``); no backend call outlives it.

        Returns:
            The result; features whose backend failed are ``None`` and listed in ``errors``.

        Raises:
            ImageError: A backend refused the image (413/415/422).
            Timeout: The deadline cut a backend call and nothing requested was computed (504).
            Overloaded: No requested feature could be computed (503 with Retry-After).
        """
        started = time.perf_counter()
        calls = self._calls(image, options, deadline)
        names = list(calls)
        outcomes = await asyncio.gather(*calls.values(), return_exceptions=True)
        answers: dict[str, BackendAnswer] = {}
        failures: dict[str, BackendFailed] = {}
        for name, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, BackendAnswer):
                answers[name] = outcome
            elif isinstance(outcome, BackendFailed):
                failures[name] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome  # ImageError (the caller's 4xx) or a bug: the middleware makes it a 500
        result = self._merge(image, options, answers, failures)
        if all(getattr(result, feature) is None for feature in options.features):
            reasons = "; ".join(f"{name}: {f.message}" for name, f in failures.items())
            if any(f.by_deadline for f in failures.values()):
                raise Timeout(f"the request's time ran out with nothing computed ({reasons})")
            raise Overloaded(
                f"no requested feature could be computed ({reasons})", retry_after=self._retry_after(failures)
            )
        seconds = {name: answer.seconds for name, answer in answers.items()}
        fan_out_s = time.perf_counter() - started
        result.timings = AnalyzeTimings(
            decode_ms=to_ms(decode_s),
            fetch_ms=None if fetch_s is None else to_ms(fetch_s),
            captioner_ms=_ms_or_none(seconds.get("caption")),
            detector_tags_ms=_ms_or_none(seconds.get("tags")),
            detector_objects_ms=_ms_or_none(seconds.get("objects")),
            total_ms=to_ms(decode_s + (fetch_s or 0.0) + fan_out_s),
        )
        return result

    def _retry_after(self, failures: Mapping[str, BackendFailed]) -> float:
        """Retry-After of a 503: the backends' own when every one shed load, else the gateway's (never
        before an open circuit lets a call through)."""
        hints = [f.retry_after for f in failures.values() if f.retry_after is not None]
        if hints and len(hints) == len(failures):
            return max(hints)
        waits = [b.breaker.retry_after_s for b in self.backends]
        return max([self.settings.retry_after_s, *waits, *hints])

    def _calls(
        self, image: NormalisedImage, options: AnalyzeOptions, deadline: float
    ) -> dict[str, Awaitable[BackendAnswer]]:
        needed = {call for feature in options.features for call in _CALLS_FOR[feature]}
        conf = {} if options.min_confidence is None else {"conf": options.min_confidence}
        min_score = {} if options.min_confidence is None else {"min_score": options.min_confidence}
        data, content_type = image.data, image.content_type
        calls: dict[str, Awaitable[BackendAnswer]] = {}
        if "caption" in needed:
            calls["caption"] = self.captioner.post_image(
                "/v1/caption", data, content_type, {}, deadline=deadline
            )
        if "tags" in needed:
            params = {"top_k": options.max_tags, **min_score}
            calls["tags"] = self.detector.post_image(
                "/v1/tags", data, content_type, params, deadline=deadline
            )
        if "objects" in needed:
            calls["objects"] = self.detector.post_image(
                "/v1/detect", data, content_type, conf, deadline=deadline
            )
        return calls

    def _merge(
        self,
        image: NormalisedImage,
        options: AnalyzeOptions,
        answers: Mapping[str, BackendAnswer],
        failures: dict[str, BackendFailed],
    ) -> AnalyzeResult:
        """Build the result from the answers; an unreadable answer is added to ``failures`` (in place)."""
        result = AnalyzeResult(
            request_id=request_id_var.get() or "-",
            image=ImageInfo(width=image.width, height=image.height, format=image.format),
            timings=AnalyzeTimings(decode_ms=0.0, total_ms=0.0),
        )
        parsers: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "caption": lambda body: _caption(body, options.gender_neutral),
            "tags": _tags,
            "objects": lambda body: _objects(body, image),
        }
        parsed: dict[str, Any] = {}
        for name, answer in answers.items():
            try:
                parsed[name] = parsers[name](answer.body)
                result.models[name] = ModelInfo.model_validate(answer.body["model"])
            except (KeyError, TypeError, ValueError, IndexError) as exc:  # ValidationError is a ValueError
                # A 200 we cannot read is that backend's failure, not the caller's and not a 500.
                logger.error("unreadable %s answer: %s: %s", name, type(exc).__name__, exc)
                parsed.pop(name, None)
                failures[name] = BackendFailed("backend_error", f"unreadable answer from the {name} backend")
        caption: CaptionResult | None = parsed.get("caption")
        tags: list[TagResult] | None = parsed.get("tags")
        objects: list[ObjectResult] | None = parsed.get("objects")

        wanted = options.features
        if "caption" in wanted:
            result.caption = caption
            if caption is not None:
                metrics.CAPTION_CONFIDENCE.observe(caption.confidence)
                metrics.CAPTION_WORDS.observe(len(caption.text.split()))
        if "tags" in wanted:
            result.tags = tags
            if tags is not None:
                metrics.TAGS_PER_IMAGE.observe(len(tags))
        if "objects" in wanted:
            result.objects = objects
            if objects is not None:
                metrics.OBJECTS_PER_IMAGE.observe(len(objects))
        if "alt_text" in wanted:
            result.alt_text = self._alt_text(caption, tags, objects, options)
            if result.alt_text is not None and result.alt_text.source == "fallback":
                metrics.ALT_TEXT_FALLBACKS.inc()

        for feature in sorted(wanted, key=FEATURES.index):
            if getattr(result, feature) is not None:
                continue
            failed = failures.get(_FEATURE_CALL.get(feature, "caption"))
            if failed is None:  # alt text with neither caption nor labels
                failed = BackendFailed("unavailable", "no caption, tag or object to describe the image with")
            result.errors.append(FeatureError(feature=feature, code=failed.code, message=failed.message))
            metrics.PARTIAL_RESULTS.labels(feature).inc()
        return result

    def _alt_text(
        self,
        caption: CaptionResult | None,
        tags: list[TagResult] | None,
        objects: list[ObjectResult] | None,
        options: AnalyzeOptions,
    ) -> AltTextResult | None:
        # Labels best first: tags, then objects by score (the detector sorts them).
        labels = [t.name for t in tags or []] + [o.label for o in objects or []]
        alt = make_alt_text(
            caption.text if caption else None,
            caption.confidence if caption else None,
            labels,
            min_confidence=self.settings.alt_text_min_confidence,
            max_chars=self.settings.alt_text_max_chars,
        )
        if alt is None:
            return None
        text = gender_neutral(alt.text) if options.gender_neutral else alt.text
        return AltTextResult(text=text, source=alt.source)


def _ms_or_none(seconds: float | None) -> float | None:
    return None if seconds is None else to_ms(seconds)


def _first_result(body: Mapping[str, Any]) -> dict[str, Any]:
    results = body.get("results")
    if not isinstance(results, list) or not results or not isinstance(results[0], dict):
        raise ValueError("the answer has no results")
    first: dict[str, Any] = results[0]
    return first


def _caption(body: Mapping[str, Any], neutral: bool) -> CaptionResult:
    first = _first_result(body)
    text = str(first["caption"])
    return CaptionResult(
        text=gender_neutral(text) if neutral else text, confidence=float(first["confidence"])
    )


def _tags(body: Mapping[str, Any]) -> list[TagResult]:
    return [
        TagResult(name=t["name"], score=t["score"], hashtag=t["hashtag"]) for t in _first_result(body)["tags"]
    ]


def _objects(body: Mapping[str, Any], image: NormalisedImage) -> list[ObjectResult]:
    """Objects with boxes scaled from the frame the detector saw to the original's (after orientation)."""
    first = _first_result(body)
    seen = first.get("image") or {}
    sx = image.width / float(seen.get("width") or image.sent_width)
    sy = image.height / float(seen.get("height") or image.sent_height)
    out = []
    for obj in first["objects"]:
        box = obj["box"]
        out.append(
            ObjectResult(
                label=obj["label"],
                score=obj["score"],
                box=Box(
                    x1=_clamp(box["x1"] * sx, image.width),
                    y1=_clamp(box["y1"] * sy, image.height),
                    x2=_clamp(box["x2"] * sx, image.width),
                    y2=_clamp(box["y2"] * sy, image.height),
                ),
            )
        )
    return out


def _clamp(value: float, limit: int) -> float:
    return round(min(max(float(value), 0.0), float(limit)), 2)

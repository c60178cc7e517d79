"""The gateway's backends: one remote service each (captioner, detector), called through a circuit breaker.

A :class:`BackendClient` is one pooled keep-alive HTTP client per backend service: per-call timeouts (the
backend's own, or what is left of the request's deadline when that is less, sent along as ``timeout_ms``),
one retry with jitter on connection errors only, a :class:`CircuitBreaker`, and the
``snap2caption_gateway_backend_*`` metrics (labels ``backend``: the service's name, and ``track``:
``production``, or ``canary`` for the service serving a model's canary).

What a call can end in:

- an answer (:class:`BackendAnswer`);
- :class:`BackendFailed`: the features the backend serves are left out of the response; only a failure of
  the backend itself (connection, its own timeout, 5xx) counts against the breaker. Neither the request's
  deadline (a caller's short budget says nothing about a backend's health) nor a 503 ``overloaded`` does:
  that is backpressure (a full queue shedding load for a moment), and opening the circuit would switch the
  backend's features off for a whole cooldown;
- an :class:`~snap2caption.errors.ImageError`: the backend refused the image (413/415/422), which is the
  caller's error, passed on with the same status and code.

Readiness: :meth:`BackendClient.poll_ready` asks the backend's ``/readyz`` and remembers the answer,
with the model versions it serves (the gateway sends a canary's share only to a service serving it).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.gateway import metrics
from services.gateway.config import Settings
from snap2caption.errors import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    Overloaded,
    PayloadTooLarge,
    Timeout,
    UnsupportedFormat,
)
from snap2caption.logs import request_id_var

logger = logging.getLogger(__name__)

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
        track: The backend's release track (the gauge's other label).
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        track: str = "production",
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
        self._gauge = metrics.BREAKER_STATE.labels(name, track)
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

    def reset(self) -> None:
        """Forget past failures: the backend now serves something else (a new canary release)."""
        self._failures = 0
        self._trial_in_flight = False
        self._set(BreakerState.CLOSED)

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
    versions: frozenset[int] = frozenset()  # model versions the last 200 said it serves
    # Model -> whether its artifact carries a domain description, as the last 200 said (``checks.domain``
    # of a one-model service, ``checks.<model>.domain`` of the detector's); a model that says nothing is
    # absent.
    domains: dict[str, bool] = field(default_factory=dict)


class BackendClient:
    """One backend service: a pooled keep-alive HTTP client, retries, a circuit breaker, metrics.

    Args:
        name: ``captioner`` or ``detector`` (metric label).
        base_url: The backend's base URL.
        settings: Timeouts, retry and breaker parameters.
        track: ``production``, or ``canary`` for the service serving the model's canary (metric label).
    """

    def __init__(self, name: str, base_url: str, settings: Settings, track: str = "production") -> None:
        self.name = name
        self.track = track
        self.base_url = base_url.rstrip("/")
        self.retries = settings.retries
        self.retry_jitter_s = settings.retry_jitter_s
        self.timeout_s = settings.backend_timeout_s
        self.breaker = CircuitBreaker(
            name, settings.breaker_failure_threshold, settings.breaker_cooldown_s, track=track
        )
        self.health = BackendHealth()
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(settings.backend_timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
            ),
        )
        self._duration = metrics.BACKEND_DURATION.labels(name, track)
        self._outcomes = {
            outcome: metrics.BACKEND_REQUESTS.labels(name, outcome, track)
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
            # Serves nothing now: no canary share goes to it until a 200 says what it serves again (its
            # last 200 may be a previous process's on the same port).
            self.health.versions = frozenset()
            return
        if response.status_code == 200:
            self.health.last_ok = time.monotonic()
            self.health.detail = "ready"
            body = _json_object(response)
            self.health.versions = frozenset(_served_versions(body))
            self.health.domains = _domain_presence(self.name, body)
        else:
            _, message = _envelope(response)
            self.health.detail = f"{response.status_code}: {message}"
            self.health.versions = frozenset()  # not ready: nothing to route a canary share to

    def forget_health(self) -> None:
        """Forget what past ``/readyz`` polls said: nothing is routed to it on their word any more."""
        self.health = BackendHealth()


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _served_versions(body: Any) -> set[int]:
    """Every ``version`` a model service's ``/readyz`` shows for its models (nested in its checks)."""
    found: set[int] = set()
    if isinstance(body, dict):
        if isinstance(body.get("version"), int) and "alias" in body:
            found.add(body["version"])
        for value in body.values():
            found |= _served_versions(value)
    elif isinstance(body, list):
        for value in body:
            found |= _served_versions(value)
    return found


def _domain_presence(service: str, body: Any) -> dict[str, bool]:
    """Which models of a model service's ``/readyz`` have a domain description: ``checks.domain.present``
    names the service's one model (the captioner), ``checks.<model>.domain.present`` each of several."""
    checks = body.get("checks") if isinstance(body, dict) else None
    if not isinstance(checks, dict):
        return {}
    found: dict[str, bool] = {}
    for name, value in {service: checks, **checks}.items():
        domain = value.get("domain") if isinstance(value, dict) else None
        if isinstance(domain, dict) and isinstance(domain.get("present"), bool):
            found[name] = domain["present"]
    return found


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

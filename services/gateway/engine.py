"""The gateway's engine: normalise an image once, fan out to the backends, merge their answers.

Request side:

1. :meth:`Gateway.normalise`: :func:`~services.gateway.images.normalise_image` on a worker thread (the
   shared safe decoder, once; the backends get a small upright JPEG or PNG).
2. :meth:`Gateway.analyze`: at most one call per backend, concurrently, through its pooled client
   (:class:`~services.gateway.backends.BackendClient`): the captioner's ``/v1/caption`` for the caption,
   and the detector's ``/v1/analyze`` for tags and objects together (``features=`` names the parts the
   request needs). Boxes are scaled from the normalised frame back to the original's.
3. A backend that fails leaves its features out (``errors`` lists them); nothing computable is 503
   ``overloaded``. A backend's 413/415/422 about the image is the caller's error, passed on as such.

What one full ``/v1/analyze`` costs in image decodes: three. The gateway decodes the upload once (after a
header-only probe), the captioner decodes the normalised copy once, and the detector decodes it once for
both of its models (its ``/v1/analyze`` feeds the tagger and the object detector from one decode). The
copy is at most ``backend_max_side`` pixels and plain JPEG or PNG, so those two backend decodes are cheap
whatever the upload was. A request for the caption alone costs two; for tags or objects alone, two.

The request's deadline (``time.monotonic()``, from its budget) bounds everything: :func:`within_deadline`
wraps the URL fetch and the decode, and each backend call gets at most what is left of it (the backend is
told the same, as ``timeout_ms``, so it drops work nobody will wait for). When it runs out:

- a backend that has answered keeps its features and the cut one is listed in ``errors`` with code
  ``timeout`` (the partial-result rule of one backend failing);
- nothing computed at all is 504 ``timeout``.

With nothing computed because backends shed load, the answer is 503 ``overloaded`` with their Retry-After.

Canary track: :meth:`Gateway.route` picks, per request, production or a model's canary service (a
running release's share of the traffic, by :func:`~services.gateway.releases.bucket` of the request id;
only while the canary service is ready and serves the release's version); each part's metrics are
labelled with the track of the backend that computed it.

Readiness: a background task polls every backend's ``/readyz`` (the canary services' too) and reads the
running releases; the gateway is ready while each production backend has answered 200 recently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from anyio import CapacityLimiter
from anyio.to_thread import run_sync

from services.gateway import metrics
from services.gateway.backends import BackendAnswer, BackendClient, BackendFailed
from services.gateway.config import Settings
from services.gateway.images import NormalisedImage, normalise_image
from services.gateway.releases import DECISIONS, MODELS, Release, ReleaseStore, Track, bucket
from services.gateway.schemas import AnalyzeOptions
from snap2caption.alt_text import alt_text_labels, caption_note, gender_neutral, make_alt_text
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
    ObjectsDomain,
    TagResult,
)
from snap2caption.errors import BadRequest, Overloaded, Timeout
from snap2caption.http import Readiness
from snap2caption.imaging import DecodeLimits
from snap2caption.logs import request_id_var
from snap2caption.serving.inputs import to_ms

logger = logging.getLogger(__name__)

CAPTIONER, DETECTOR = "captioner", "detector"

Part = Literal["caption", "tags", "objects"]
"""A piece of an analysis one model computes; the features are built from them."""

# The parts each feature needs: alt text needs the caption, and the labels for its fallback.
_PARTS_FOR: dict[Feature, tuple[Part, ...]] = {
    "caption": ("caption",),
    "alt_text": ("caption", "tags", "objects"),
    "tags": ("tags",),
    "objects": ("objects",),
}
# The part whose failure a missing feature reports (alt text: the caption's).
_PART_OF: dict[Feature, Part] = {
    "caption": "caption",
    "alt_text": "caption",
    "tags": "tags",
    "objects": "objects",
}
_DETECTOR_PARTS: tuple[Part, ...] = ("tags", "objects")  # in the order the ``features=`` list names them


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
class _Call:
    """One backend call of an analysis and the parts its answer holds.

    Attributes:
        backend: Who is called.
        parts: What the answer holds.
        answer: The call.
        nested: The answer holds one object per part, under the part's name (the detector's
            ``/v1/analyze``); otherwise the answer is the one part's.
    """

    backend: BackendClient
    parts: tuple[Part, ...]
    answer: Awaitable[BackendAnswer]
    nested: bool


@dataclass(frozen=True)
class Route:
    """The backends one request goes to, and its track (``canary`` when any of them is a canary)."""

    captioner: BackendClient
    detector: BackendClient

    @property
    def track(self) -> Track:
        canary = "canary" in (self.captioner.track, self.detector.track)
        return "canary" if canary else "production"


class Gateway:
    """The backends, the decoder's worker threads, and the analysis of one image.

    Args:
        settings: Gateway settings.
        releases: Where the running releases are read (``None``: no canary is ever routed to).
    """

    def __init__(self, settings: Settings, releases: ReleaseStore | None = None) -> None:
        self.settings = settings
        self.captioner = BackendClient(CAPTIONER, settings.captioner_url, settings)
        self.detector = BackendClient(DETECTOR, settings.detector_url, settings)
        self.backends = (self.captioner, self.detector)
        canary_urls = {CAPTIONER: settings.canary_captioner_url, DETECTOR: settings.canary_detector_url}
        self.canaries = {
            name: BackendClient(name, url, settings, track="canary")
            for name, url in canary_urls.items()
            if url
        }
        self.releases = releases
        self.running: dict[str, Release] = {}  # read with the readiness polls
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
        for backend in (*self.backends, *self.canaries.values()):
            await backend.aclose()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.gather(
                *(b.poll_ready() for b in (*self.backends, *self.canaries.values())), self._read_releases()
            )
            await asyncio.sleep(self.settings.ready_poll_interval_s)

    async def _read_releases(self) -> None:
        """Read the running releases and export them (and the decisions taken) as gauges."""
        if self.releases is None:
            return
        try:
            running, counts = await asyncio.to_thread(
                lambda: (self.releases.running(), self.releases.decision_counts())  # type: ignore[union-attr]
            )
        except Exception as exc:  # the database being away must not stop the readiness polls
            logger.warning("cannot read the releases (routing unchanged): %s: %s", type(exc).__name__, exc)
            return
        if running.keys() != self.running.keys():
            logger.info("running canaries: %s", {m: f"v{r.version} {r.share:g}%" for m, r in running.items()})
        for model, release in running.items():
            if model in self.canaries and self.running.get(model) != release:
                # A new release: the last canary's failures (its circuit) and readiness say nothing about
                # this one; its share waits for a /readyz 200 polled after the release started.
                self.canaries[model].breaker.reset()
                self.canaries[model].forget_health()
        self.running = running
        for model in MODELS:
            release = running.get(model)
            metrics.RELEASE_CANARY_SHARE.labels(model).set(release.share if release else 0.0)
            metrics.RELEASE_CANARY_VERSION.labels(model).set(release.version if release else 0)
            for decision in DECISIONS:
                metrics.RELEASE_DECISIONS.labels(model, decision).set(counts.get((model, decision), 0))

    def route(self, request_id: str, override: str | None = None) -> Route:
        """The backends for one request: each model's canary for ``share`` percent of the request ids.

        A model's canary gets the request while its release runs, its service is ready (within
        ``ready_max_age_s``) and serves the release's version; otherwise production does, so a canary
        service that is down or still loading never costs a request.

        Args:
            request_id: The request's id (hashed into its bucket).
            override: The ``X-Snap2Caption-Track`` header: ``canary`` or ``production`` force the track
                of every model with a canary running (``None``: the share decides).

        Raises:
            BadRequest: An override other than the two tracks.
        """
        if override is not None and override not in ("production", "canary"):
            raise BadRequest(f"X-Snap2Caption-Track must be 'production' or 'canary', not {override!r}")
        place = bucket(request_id)
        chosen = {CAPTIONER: self.captioner, DETECTOR: self.detector}
        now = time.monotonic()
        for name, canary in self.canaries.items():
            release = self.running.get(name)
            if release is None or release.version not in canary.health.versions:
                continue
            last_ok = canary.health.last_ok
            if last_ok is None or now - last_ok > self.settings.ready_max_age_s:
                continue
            if override == "canary" or (override is None and place < release.share):
                chosen[name] = canary
        return Route(captioner=chosen[CAPTIONER], detector=chosen[DETECTOR])

    def readiness(self) -> Readiness:
        """Ready while every backend answered ``/readyz`` 200 within ``ready_max_age_s``."""
        now = time.monotonic()
        checks: dict[str, Any] = {}
        down: list[str] = []
        for backend in self.backends:  # a canary service's state never makes the gateway unready
            last_ok = backend.health.last_ok
            fresh = last_ok is not None and now - last_ok <= self.settings.ready_max_age_s
            checks[backend.name] = {
                "ready": fresh,
                "url": backend.base_url,
                "detail": backend.health.detail,
                "last_ok_age_s": None if last_ok is None else round(now - last_ok, 3),
                "circuit": backend.breaker.state.name.lower(),
                # Model -> whether its artifact has a domain description; one without (an older
                # artifact) answers in_domain null, which counts as in domain.
                "domain_models": dict(backend.health.domains),
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
            s.backend_png_max_pixels, limiter=self._decode_limiter,
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
        route: Route | None = None,
    ) -> AnalyzeResult:
        """Call the backends the features need, concurrently (one call each), and merge their answers.

        Args:
            image: From :meth:`normalise`.
            options: The request's options.
            decode_s: Time spent in :meth:`normalise` (reported in the timings).
            fetch_s: Time spent fetching the URL, for URL requests.
            deadline: The request's deadline (``time.monotonic()``); no backend call outlives it.
            route: The backends to call (:meth:`route`); default production.

        Returns:
            The result; features whose backend failed are ``None`` and listed in ``errors``.

        Raises:
            ImageError: A backend refused the image (413/415/422).
            Timeout: The deadline cut a backend call and nothing requested was computed (504).
            Overloaded: No requested feature could be computed (503 with Retry-After).
        """
        started = time.perf_counter()
        route = route or Route(self.captioner, self.detector)
        calls = self._calls(image, options, deadline, route)
        outcomes = await asyncio.gather(*(call.answer for call in calls), return_exceptions=True)
        bodies: dict[Part, Any] = {}
        seconds: dict[Part, float] = {}
        failures: dict[Part, BackendFailed] = {}
        for call, outcome in zip(calls, outcomes, strict=True):
            if isinstance(outcome, BackendAnswer):
                for part in call.parts:
                    bodies[part] = outcome.body.get(part) if call.nested else outcome.body
                    seconds[part] = outcome.seconds
            elif isinstance(outcome, BackendFailed):
                failures.update(dict.fromkeys(call.parts, outcome))
            elif isinstance(outcome, BaseException):
                raise outcome  # ImageError (the caller's 4xx) or a bug: the middleware makes it a 500
        result = self._merge(image, options, bodies, failures, route)
        if all(getattr(result, feature) is None for feature in options.features):
            # One failed call may stand for several parts: say each once.
            reasons = "; ".join(dict.fromkeys(f.message for f in failures.values()))
            if any(f.by_deadline for f in failures.values()):
                raise Timeout(f"the request's time ran out with nothing computed ({reasons})")
            raise Overloaded(
                f"no requested feature could be computed ({reasons})", retry_after=self._retry_after(failures)
            )
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

    def _retry_after(self, failures: Mapping[Part, BackendFailed]) -> float:
        """Retry-After of a 503: the backends' own when every one shed load, else the gateway's (never
        before an open circuit lets a call through)."""
        hints = [f.retry_after for f in failures.values() if f.retry_after is not None]
        if hints and len(hints) == len(failures):
            return max(hints)
        waits = [b.breaker.retry_after_s for b in self.backends]
        return max([self.settings.retry_after_s, *waits, *hints])

    def _calls(
        self, image: NormalisedImage, options: AnalyzeOptions, deadline: float, route: Route
    ) -> list[_Call]:
        """The calls the features need: the captioner for the caption; the detector once, for every
        detector part needed (its ``/v1/analyze`` decodes the image once for both of its models)."""
        needed = {part for feature in options.features for part in _PARTS_FOR[feature]}
        data, content_type = image.data, image.content_type
        calls: list[_Call] = []
        if "caption" in needed:
            answer = route.captioner.post_image("/v1/caption", data, content_type, {}, deadline=deadline)
            calls.append(_Call(route.captioner, ("caption",), answer, nested=False))
        parts = tuple(part for part in _DETECTOR_PARTS if part in needed)
        if parts:
            params: dict[str, Any] = {"features": ",".join(parts)}
            if "tags" in parts:
                params["top_k"] = options.max_tags or self.settings.default_max_tags
                if options.min_confidence is not None:
                    params["min_score"] = options.min_confidence
            if "objects" in parts and options.min_confidence is not None:
                params["conf"] = options.min_confidence
            answer = route.detector.post_image("/v1/analyze", data, content_type, params, deadline=deadline)
            calls.append(_Call(route.detector, parts, answer, nested=True))
        return calls

    def _merge(
        self,
        image: NormalisedImage,
        options: AnalyzeOptions,
        bodies: Mapping[Part, Any],
        failures: dict[Part, BackendFailed],
        route: Route,
    ) -> AnalyzeResult:
        """Build the result from each part's answer; an unreadable one is added to ``failures`` (in place).

        Each part's metrics carry the track of the backend that computed it; the alt text's, the request's.
        """
        result = AnalyzeResult(
            request_id=request_id_var.get() or "-",
            image=ImageInfo(width=image.width, height=image.height, format=image.format),
            timings=AnalyzeTimings(decode_ms=0.0, total_ms=0.0),
        )
        parsed: dict[Part, Any] = {}
        objects_domain: ObjectsDomain | None = None
        for part, body in bodies.items():
            try:
                if not isinstance(body, Mapping):
                    raise TypeError(f"no {part} object in the answer")
                if part == "caption":
                    parsed[part] = _caption(body, options.gender_neutral)
                elif part == "tags":
                    parsed[part] = _tags(body)
                else:
                    parsed[part] = _objects(body, image)
                    objects_domain = _objects_domain(body)
                result.models[part] = ModelInfo.model_validate(body["model"])
            except (KeyError, TypeError, ValueError, IndexError) as exc:  # ValidationError is a ValueError
                # A 200 we cannot read is that backend's failure, not the caller's and not a 500.
                backend = CAPTIONER if part == "caption" else DETECTOR
                logger.error(
                    "unreadable %s answer from the %s: %s: %s", part, backend, type(exc).__name__, exc
                )
                parsed.pop(part, None)
                failures[part] = BackendFailed(
                    "backend_error", f"unreadable {part} answer from the {backend}"
                )
        caption: CaptionResult | None = parsed.get("caption")
        tags: list[TagResult] | None = parsed.get("tags")
        objects: list[ObjectResult] | None = parsed.get("objects")

        wanted = options.features
        track_of: dict[Feature, str] = {
            "caption": route.captioner.track,
            "alt_text": route.track,
            "tags": route.detector.track,
            "objects": route.detector.track,
        }
        if "caption" in wanted:
            result.caption = caption
            if caption is not None:
                metrics.CAPTION_CONFIDENCE.labels(track_of["caption"]).observe(caption.confidence)
                metrics.CAPTION_WORDS.labels(track_of["caption"]).observe(len(caption.text.split()))
        if "tags" in wanted:
            result.tags = tags
            if tags is not None:
                metrics.TAGS_PER_IMAGE.labels(track_of["tags"]).observe(len(tags))
        if "objects" in wanted:
            result.objects = objects
            result.objects_domain = objects_domain if objects is not None else None
            if objects is not None:
                metrics.OBJECTS_PER_IMAGE.labels(track_of["objects"]).observe(len(objects))
        if "alt_text" in wanted:
            result.alt_text = self._alt_text(caption, tags, objects, objects_domain, options)
            if result.alt_text is not None and result.alt_text.source == "fallback":
                metrics.ALT_TEXT_FALLBACKS.labels(track_of["alt_text"]).inc()
        if result.caption is not None:
            used = (
                None
                if "alt_text" not in wanted
                else bool(result.alt_text and result.alt_text.source == "caption")
            )
            result.caption.used_for_alt_text = used
            result.caption.note = caption_note(
                result.caption.confidence,
                result.caption.in_domain,
                min_confidence=self.settings.alt_text_min_confidence,
                used=used,
            )

        for feature in sorted(wanted, key=FEATURES.index):
            if getattr(result, feature) is not None:
                continue
            failed = failures.get(_PART_OF[feature])
            if failed is None:  # alt text with neither a usable caption nor labels
                failed = BackendFailed(
                    "unavailable",
                    "no caption, tag or object to describe the image with (a caption of an image outside "
                    "the captioner's training domain is not used)",
                )
            result.errors.append(FeatureError(feature=feature, code=failed.code, message=failed.message))
            metrics.PARTIAL_RESULTS.labels(feature, track_of[feature]).inc()
        return result

    def _alt_text(
        self,
        caption: CaptionResult | None,
        tags: list[TagResult] | None,
        objects: list[ObjectResult] | None,
        objects_domain: ObjectsDomain | None,
        options: AnalyzeOptions,
    ) -> AltTextResult | None:
        """The caption when the captioner is in its domain and sure enough, else "Image may contain: ..."
        from the tags and, when neither the detector nor the captioner places the image outside its
        domain, the objects' classes."""
        # Labels best first: tags, then objects by score (the detector sorts them).
        labels = alt_text_labels(
            [t.name for t in tags or []],
            [o.label for o in objects or []],
            objects_in_domain=objects_domain.in_domain if objects_domain else None,
            caption_in_domain=caption.in_domain if caption else None,
        )
        alt = make_alt_text(
            caption.text if caption else None,
            caption.confidence if caption else None,
            labels,
            min_confidence=self.settings.alt_text_min_confidence,
            max_chars=self.settings.alt_text_max_chars,
            caption_in_domain=caption.in_domain if caption else None,
        )
        if alt is None:
            return None
        text = gender_neutral(alt.text) if options.gender_neutral else alt.text
        return AltTextResult(text=text, source=alt.source)


# ------------------------------------------------------------------------------------------ answers
# Each parser reads one part: today's answer of the backend route that computes it (``/v1/caption``, and
# the ``tags`` and ``objects`` objects of the detector's ``/v1/analyze``, which are ``/v1/tags``' and
# ``/v1/detect``'s answers).


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
    score = first.get("domain_score")
    return CaptionResult(
        text=gender_neutral(text) if neutral else text,
        confidence=float(first["confidence"]),
        in_domain=_optional_bool(first.get("in_domain")),
        domain_score=None if score is None else float(score),
    )


def _optional_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise TypeError(f"in_domain must be true, false or null, got {value!r}")


def _objects_domain(body: Mapping[str, Any]) -> ObjectsDomain:
    """The detector's domain answer for the image (all ``null`` / 0 from a detector that gives none)."""
    first = _first_result(body)
    score = first.get("domain_score")
    return ObjectsDomain(
        in_domain=_optional_bool(first.get("in_domain")),
        domain_score=None if score is None else float(score),
        withheld=int(first.get("withheld") or 0),
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

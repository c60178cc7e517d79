"""The gateway engine's parts without the stack: the deadline, how an analysis calls the backends (one
call each, against real loopback sockets) and reads their answers, box scaling, option parsing."""

from __future__ import annotations

import asyncio
import io
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from services.gateway.config import Settings
from services.gateway.engine import Gateway, _objects, within_deadline
from services.gateway.images import NormalisedImage, normalise_image
from services.gateway.routes import merge_options
from services.gateway.schemas import AnalyzeOptions, parse_features
from snap2caption.api import AnalyzeResult
from snap2caption.errors import BadRequest, Overloaded, Timeout
from snap2caption.imaging import DecodeLimits
from tests.services.gateway.loopback import loopback_server, unit_settings

# ------------------------------------------------------------------------------------------ deadline


def test_within_deadline_stops_the_block_at_the_deadline_with_a_504() -> None:
    async def run(block_s: float, inner: BaseException | None = None) -> None:
        async with within_deadline(time.monotonic() + 0.2, "doing the thing"):
            await asyncio.sleep(block_s)
            if inner is not None:
                raise inner

    with pytest.raises(Timeout, match="ran out while doing the thing") as cut:
        asyncio.run(run(30))
    assert cut.value.status == 504
    asyncio.run(run(0))  # in time: nothing happens
    with pytest.raises(
        TimeoutError, match="its own"
    ):  # a TimeoutError of the block's own is not the deadline
        asyncio.run(run(0, TimeoutError("its own")))


# ------------------------------------------------------------------------------------------ answers


def test_boxes_are_scaled_to_the_original_frame_and_clamped() -> None:
    image = NormalisedImage(
        data=b"", content_type="image/jpeg", width=1000, height=500, sent_width=200, sent_height=100,
        format="png", n_bytes=0, sha256="", original=b"",
    )  # fmt: skip
    body = {
        "results": [
            {
                "image": {"width": 200, "height": 100},
                "objects": [
                    {"label": "a", "score": 0.9, "box": {"x1": 10, "y1": 20, "x2": 50, "y2": 60}},
                    {"label": "b", "score": 0.5, "box": {"x1": -1, "y1": 0, "x2": 201, "y2": 100.5}},
                ],
            }
        ]
    }
    a, b = _objects(body, image)
    assert (a.box.x1, a.box.y1, a.box.x2, a.box.y2) == (50, 100, 250, 300)
    assert (b.box.x1, b.box.y1, b.box.x2, b.box.y2) == (0, 0, 1000, 500)


# ------------------------------------------------------------------------------------------ options


def test_parse_features() -> None:
    assert parse_features(None) == {"caption", "alt_text", "tags", "objects"}
    assert parse_features("caption, TAGS") == {"caption", "tags"}
    assert parse_features(["objects"]) == {"objects"}
    with pytest.raises(BadRequest, match="unknown feature"):
        parse_features("caption,faces")
    with pytest.raises(BadRequest, match="empty"):
        parse_features(" , ")


def test_json_options_override_query_options() -> None:
    query = AnalyzeOptions(features="caption", max_tags=3, gender_neutral=True)
    body = AnalyzeOptions(features=["tags"], min_confidence=0.4)
    options = merge_options(query, body)
    assert options.features == {"tags"}
    assert options.max_tags == 3 and options.min_confidence == 0.4 and options.gender_neutral
    defaults = merge_options(AnalyzeOptions(), None)
    assert defaults.features == {"caption", "alt_text", "tags", "objects"}
    assert defaults.max_tags is None and not defaults.gender_neutral and defaults.min_confidence is None
    with pytest.raises(BadRequest, match="unknown feature"):  # a JSON body's features, checked alike
        AnalyzeOptions.model_validate_json('{"features": ["caption", "faces"]}')


def test_settings_production_profile_turns_auth_on_and_origins_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAP2CAPTION_GATEWAY_PROFILE", "production")
    monkeypatch.setenv("SNAP2CAPTION_GATEWAY_CORS_ALLOW_ORIGINS", "https://a.example, https://b.example")
    settings = Settings()
    assert settings.auth_enabled and settings.port == 8000
    assert settings.cors_allow_origins == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("SNAP2CAPTION_GATEWAY_CORS_ALLOW_ORIGINS", "*")
    with pytest.raises(ValueError, match="list origins"):
        Settings()
    monkeypatch.delenv("SNAP2CAPTION_GATEWAY_CORS_ALLOW_ORIGINS")
    monkeypatch.delenv("SNAP2CAPTION_GATEWAY_PROFILE")
    assert not Settings().auth_enabled


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


async def analyze(settings: Settings, features: str) -> AnalyzeResult | Exception:
    """Analyse an 8 x 8 image for ``features`` through a fresh gateway: the result, or what it raised."""
    image = normalise_image(_png(8, 8), DecodeLimits(), max_side=64, encoding="png")
    gateway = Gateway(settings)
    try:
        return await gateway.analyze(
            image, AnalyzeOptions(features=features), 0.0, deadline=time.monotonic() + 30
        )
    except Exception as exc:
        return exc
    finally:
        await gateway.close()


def test_unreadable_backend_answers_are_backend_failures_not_500s() -> None:
    async def run() -> AnalyzeResult | Exception:
        # Both backends answer 200, but without results: unreadable, so nothing is computable (503).
        async with loopback_server(["ok"]) as (url, _):
            return await analyze(unit_settings(captioner_url=url, detector_url=url), "caption,tags")

    error = asyncio.run(run())
    assert isinstance(error, Overloaded), error
    assert "unreadable caption answer from the captioner" in error.message
    assert "unreadable tags answer from the detector" in error.message


def test_tags_and_objects_come_from_one_detector_call_each_part_read_on_its_own() -> None:
    targets: list[str] = []

    async def run() -> AnalyzeResult | Exception:
        async with loopback_server(["tags-only"], targets) as (url, _):
            settings = unit_settings(captioner_url=url, detector_url=url, default_max_tags=3)
            return await analyze(settings, "tags,objects")

    result = asyncio.run(run())
    assert isinstance(result, AnalyzeResult), result
    (target,) = targets  # one call, to the detector alone
    path = urlsplit(target)
    assert path.path == "/v1/analyze"
    query = parse_qs(path.query)
    assert query["features"] == ["tags,objects"] and query["top_k"] == ["3"]
    assert "conf" not in query and "min_score" not in query  # the detector's own defaults
    # The answer held tags but no objects: the tags stand, the objects are that backend's failure.
    assert [t.name for t in result.tags or []] == ["cat"]
    assert result.objects is None and set(result.models) == {"tags"}
    assert [(e.feature, e.code, e.message) for e in result.errors] == [
        ("objects", "backend_error", "unreadable objects answer from the detector")
    ]

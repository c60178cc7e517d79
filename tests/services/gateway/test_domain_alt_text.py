"""The gateway's alt-text policy with the models' domain answers (issue 13): a caption of an image outside
the captioner's training domain is never the alt text (the caption field says why), detector classes are
named only when no model places the image outside its domain (neither the detector nor the captioner),
and a model without a domain description (``in_domain`` null) counts as in domain.

The real gateway engine calls two scripted backends on real loopback sockets (``loopback.py``), one per
service, each answering in the real wire format with the domain fields the services add.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from typing import Any

from PIL import Image

from services.gateway.engine import Gateway
from services.gateway.images import normalise_image
from services.gateway.schemas import AnalyzeOptions
from snap2caption.api import AnalyzeResult
from snap2caption.data.synth.scene import COLOURS, PLURALS, SHAPES
from snap2caption.imaging import DecodeLimits
from tests.services.gateway.loopback import loopback_server, unit_settings

MODEL = {"name": "m", "version": 1, "alias": "production", "backend": "onnx"}
SHAPE_CAPTION = "a small orange square and a medium orange cross"  # what the starter says of a cat photo
# Every colour and shape word of the synthetic vocabulary: none may reach alt text for a real photo.
SHAPE_WORDS = {*COLOURS, *SHAPES, *PLURALS.values()}
MIN_CONFIDENCE = 0.35


def caption_answer(
    in_domain: bool | None, confidence: float = 0.74, text: str = SHAPE_CAPTION
) -> dict[str, Any]:
    result = {"index": 0, "caption": text, "confidence": confidence, "tokens": 9}
    if in_domain is not None:
        result |= {"in_domain": in_domain, "domain_score": 0.5 if in_domain else 0.0099}
    return {"model": MODEL, "results": [result]}


def detector_answer(
    tags: list[str], labels: list[str], in_domain: bool | None, withheld: int = 0
) -> dict[str, Any]:
    objects = [
        {"label": label, "score": 0.8, "box": {"x1": 1, "y1": 1, "x2": 5, "y2": 5}} for label in labels
    ]
    result: dict[str, Any] = {"index": 0, "image": {"width": 8, "height": 8}, "objects": objects}
    if in_domain is not None:
        result |= {"in_domain": in_domain, "domain_score": 0.4 if in_domain else 0.002, "withheld": withheld}
    tag_list = [{"name": t, "score": 0.6, "hashtag": f"#{t.replace(' ', '')}"} for t in tags]
    return {
        "tags": {"model": MODEL, "results": [{"index": 0, "tags": tag_list}]},
        "objects": {"model": MODEL, "results": [result]},
    }


def analyze(caption: dict[str, Any], detector: dict[str, Any], features: str | None = None) -> AnalyzeResult:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buffer, format="PNG")
    image = normalise_image(buffer.getvalue(), DecodeLimits(), max_side=64, encoding="png")

    async def run() -> AnalyzeResult:
        async with loopback_server([caption]) as (c_url, _), loopback_server([detector]) as (d_url, _):
            settings = unit_settings(
                captioner_url=c_url, detector_url=d_url, alt_text_min_confidence=MIN_CONFIDENCE
            )
            gateway = Gateway(settings)
            try:
                options = AnalyzeOptions(**({"features": features} if features else {}))
                return await gateway.analyze(image, options, 0.0, deadline=time.monotonic() + 30)
            finally:
                await gateway.close()

    return asyncio.run(run())


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_a_caption_outside_the_captioners_domain_is_never_alt_text_and_says_why() -> None:
    # Both models outside their domains: the detector withheld its detections; the tags speak.
    result = analyze(caption_answer(False), detector_answer(["tabby cat"], [], False, withheld=2))
    assert result.alt_text is not None
    assert (result.alt_text.text, result.alt_text.source) == ("Image may contain: tabby cat.", "fallback")
    assert not words(result.alt_text.text) & SHAPE_WORDS
    caption = result.caption
    assert caption is not None and caption.text == SHAPE_CAPTION  # still there, flagged
    assert caption.in_domain is False and caption.domain_score == 0.0099
    assert caption.used_for_alt_text is False
    assert caption.note is not None and "outside the captioner's training domain" in caption.note
    assert result.objects == []
    domain = result.objects_domain
    assert domain is not None and (domain.in_domain, domain.domain_score, domain.withheld) == (
        False,
        0.002,
        2,
    )

    # Out of domain but no label to fall back on: no alt text at all rather than the shape caption.
    result = analyze(caption_answer(False), detector_answer([], [], False, withheld=1))
    assert result.alt_text is None
    assert [(e.feature, e.code) for e in result.errors] == [("alt_text", "unavailable")]
    assert result.caption is not None and result.caption.used_for_alt_text is False


def test_detector_classes_are_named_only_when_no_model_places_the_image_outside_its_domain() -> None:
    # Detections flagged out of domain (a detector asked to include them) never reach the alt text.
    result = analyze(caption_answer(False), detector_answer(["tabby cat"], ["square", "cross"], False))
    assert result.alt_text is not None and result.alt_text.text == "Image may contain: tabby cat."
    assert [o.label for o in result.objects or []] == ["square", "cross"]  # relayed, flagged
    assert result.objects_domain is not None and result.objects_domain.in_domain is False

    # The detector's check passes the image but the captioner's rejects it (the starter detector's check
    # misses grey photos such as scikit-image's moon): the objects are relayed as the detector answered,
    # and the alt text names the tags only.
    for detector_in_domain in (True, None):
        detector = detector_answer(["tabby cat"], ["square"], detector_in_domain)
        result = analyze(caption_answer(False), detector)
        assert result.alt_text is not None and result.alt_text.text == "Image may contain: tabby cat."
        assert not words(result.alt_text.text) & SHAPE_WORDS
        assert [o.label for o in result.objects or []] == ["square"]
        assert result.objects_domain is not None
        assert result.objects_domain.in_domain is detector_in_domain

    # No model objects (in domain, or without a domain description: null counts as in domain): named.
    for caption_in_domain, detector_in_domain in ((True, True), (None, None), (True, None), (None, True)):
        result = analyze(
            caption_answer(caption_in_domain, 0.2),
            detector_answer(["tabby cat"], ["square"], detector_in_domain),
        )
        assert result.alt_text is not None
        assert result.alt_text.text == "Image may contain: tabby cat and square."


def test_an_in_domain_confident_caption_is_the_alt_text_and_legacy_captions_count_as_in_domain() -> None:
    caption = "a red circle above a blue square"
    for in_domain in (True, None):
        result = analyze(
            caption_answer(in_domain, 0.8, caption), detector_answer(["balloon"], ["circle"], True)
        )
        assert result.alt_text is not None
        assert (result.alt_text.text, result.alt_text.source) == (
            "A red circle above a blue square.",
            "caption",
        )
        assert result.caption is not None and result.caption.in_domain is in_domain
        assert result.caption.used_for_alt_text is True and result.caption.note is None

    # In domain but unsure: the fallback, and the note says it was the confidence.
    result = analyze(caption_answer(True, 0.2, caption), detector_answer(["balloon"], ["circle"], True))
    assert result.alt_text is not None and result.alt_text.text == "Image may contain: balloon and circle."
    assert result.caption is not None and result.caption.used_for_alt_text is False
    assert result.caption.note is not None and "under the alt-text threshold" in result.caption.note

    # The caption alone (no alt text asked for): not judged as alt text, but the note still warns.
    result = analyze(caption_answer(False), detector_answer([], [], False), features="caption")
    assert result.alt_text is None and result.errors == []
    assert result.caption is not None and result.caption.used_for_alt_text is None
    assert result.caption.note is not None and "outside" in result.caption.note


def test_readiness_reads_which_models_have_a_domain_description() -> None:
    from services.gateway.backends import _domain_presence

    captioner = {"ready": True, "checks": {"model": "captioner", "domain": {"present": True, "n_fit": 9}}}
    assert _domain_presence("captioner", captioner) == {"captioner": True}
    detector = {"checks": {"detector": {"domain": {"present": False}}, "tagger": {"version": 1}}}
    assert _domain_presence("detector", detector) == {"detector": False}
    assert _domain_presence("detector", {"checks": {"detector": {"version": 1}}}) == {}  # says nothing
    assert _domain_presence("captioner", {"error": {"code": "not_ready"}}) == {}

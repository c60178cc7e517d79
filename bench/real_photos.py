"""Real photos against the running system: is a photo ever taken for a synthetic scene?

The starter models know only synthetic shapes, and each knows its domain (issue 13): a real photo must get
``caption.in_domain: false``, no shape words in its alt text and no objects from an out-of-domain detector.
Training measures this on scikit-image's photos as they are; uploads are rarely that clean. This script
sends each photo as it is and changed the way uploads change it, through the gateway's ``POST /v1/analyze``
(real HTTP, a running stack such as ``make up``'s), and counts what got through:

- ``captioner_in_domain``: answers whose caption the captioner took for in-domain;
- ``alt_text_shape_words``: alt texts naming a synthetic shape ("circle", "stars", ...) that no returned
  tag names either (a tag such as "crossword puzzle" is the tagger's word, not the shape model's);
- ``objects_returned``: answers with detections (the detector took the photo for in-domain and found
  "shapes").

Variants: ``orig``, ``grey`` (greyscale), ``thumb64`` (64 px on the longer side), ``crop40`` (the centre
40 %), ``corner`` (the top-left quarter), ``jpeg10`` (JPEG quality 10), ``rot90``, ``dark`` (brightness x
0.3), ``blur`` (Gaussian, radius 4), ``poster`` (2 bits per channel: flat colours, the closest a photo gets
to the synthetic scenes), ``contrast`` (x 2.5) and ``saturated`` (colour x 3).

Photos: scikit-image's bundled photographs that load without a download, read by
``training.detector.domain.real_photos`` (no drawings: its logo, colour wheel and horse silhouette are
graphics, which a shapes model may fairly call shapes). Not a speed benchmark, so no baseline ratio: the
figures are rates, written as JSON with the machine and versions like
every ``bench/`` result. Example::

    .venv/bin/python bench/real_photos.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_post import analyze
from result_json import BenchRecord, add_out_argument

from snap2caption.data.synth.scene import PLURALS, SHAPES
from training.detector.domain import real_photos

PHOTOS = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "motorcycle_left", "motorcycle_right", "retina", "rocket", "brick",
    "cell", "clock", "microaneurysms", "page", "text",
)  # fmt: skip
SHAPE_WORDS = frozenset(SHAPES) | frozenset(PLURALS.values())


def _crop(image: Image.Image, fraction: float, *, centre: bool) -> Image.Image:
    width, height = image.size
    w, h = max(1, int(width * fraction)), max(1, int(height * fraction))
    x, y = ((width - w) // 2, (height - h) // 2) if centre else (0, 0)
    return image.crop((x, y, x + w, y + h))


def _thumbnail(image: Image.Image, side: int) -> Image.Image:
    small = image.copy()
    small.thumbnail((side, side))
    return small


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "orig": lambda im: im,
    "grey": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "thumb64": lambda im: _thumbnail(im, 64),
    "crop40": lambda im: _crop(im, 0.4, centre=True),
    "corner": lambda im: _crop(im, 0.5, centre=False),
    "jpeg10": lambda im: _jpeg(im, 10),
    "rot90": lambda im: im.rotate(90, expand=True),
    "dark": lambda im: ImageEnhance.Brightness(im).enhance(0.3),
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(4)),
    "poster": lambda im: ImageOps.posterize(im, 2),
    "contrast": lambda im: ImageEnhance.Contrast(im).enhance(2.5),
    "saturated": lambda im: ImageEnhance.Color(im).enhance(3.0),
}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Answer:
    """What the gateway said of one photo variant (``status`` 0: no HTTP answer)."""

    photo: str
    variant: str
    status: int
    captioner_in_domain: bool | None = None
    detector_in_domain: bool | None = None
    alt_text: str = ""
    shape_words: tuple[str, ...] = ()
    objects: int = 0


def shape_words(alt_text: str, tags: Sequence[str]) -> tuple[str, ...]:
    """Synthetic shape words in ``alt_text`` that none of the returned ``tags`` contains."""
    words = set(re.findall(r"[a-z]+", alt_text.lower())) & SHAPE_WORDS
    tag_words = {w for tag in tags for w in re.findall(r"[a-z]+", tag.lower())}
    return tuple(sorted(words - tag_words))


def answer(photo_name: str, variant: str, status: int, body: dict[str, Any] | None) -> Answer:
    """An :class:`Answer` from ``/v1/analyze``'s JSON (None or an error envelope: only the status)."""
    if status != 200 or not body:
        return Answer(photo_name, variant, status)
    caption = body.get("caption") or {}
    alt_text = (body.get("alt_text") or {}).get("text") or ""
    tags = [t.get("name", "") for t in body.get("tags") or []]
    return Answer(
        photo_name,
        variant,
        status,
        captioner_in_domain=caption.get("in_domain"),
        detector_in_domain=(body.get("objects_domain") or {}).get("in_domain"),
        alt_text=alt_text,
        shape_words=shape_words(alt_text, tags),
        objects=len(body.get("objects") or []),
    )


def tally(answers: Sequence[Answer]) -> dict[str, Any]:
    """The figures: counts and rates over the answered requests, each kind of miss listed by photo/variant."""
    answered = [a for a in answers if a.status == 200]
    n = len(answered)

    def rate(count: int) -> float | None:
        return round(count / n, 4) if n else None

    captioner_in = [f"{a.photo}/{a.variant}" for a in answered if a.captioner_in_domain]
    detector_in = [f"{a.photo}/{a.variant}" for a in answered if a.detector_in_domain]
    shapes = [f"{a.photo}/{a.variant}: {a.alt_text}" for a in answered if a.shape_words]
    objects = [f"{a.photo}/{a.variant}: {a.objects}" for a in answered if a.objects]
    return {
        "requests": len(answers),
        "errors": len(answers) - n,
        "captioner_in_domain": len(captioner_in),
        "captioner_out_of_domain_rate": rate(n - len(captioner_in)),
        "detector_in_domain": len(detector_in),
        "detector_out_of_domain_rate": rate(n - len(detector_in)),
        "alt_text_shape_words": len(shapes),
        "objects_returned": len(objects),
        "captioner_in_domain_on": captioner_in,
        "detector_in_domain_on": detector_in,
        "alt_text_shape_words_on": shapes,
        "objects_returned_on": objects,
    }


def run(url: str, photos: Sequence[str], variants: Sequence[str], timeout_s: float) -> list[Answer]:
    """Send every photo x variant to ``url``'s ``/v1/analyze``, one at a time."""
    answers = []
    loaded = real_photos(photos)
    if loaded is None:
        raise RuntimeError("scikit-image is not installed: it ships the photos")
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for name, original in loaded:
            for variant in variants:
                data = png(VARIANTS[variant](original))
                status, body = analyze(client, f"{name}.png", data, f"{name}/{variant}")
                answers.append(answer(name, variant, status, body))
    return answers


def _names(value: str, known: Sequence[str], what: str) -> list[str]:
    names = [v for v in value.split(",") if v] if value else list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {list(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway [%(default)s]")
    parser.add_argument("--photos", default="", help="comma-separated scikit-image photos [all]")
    parser.add_argument("--variants", default="", help=f"comma-separated, of {','.join(VARIANTS)} [all]")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per request [%(default)s]")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    try:
        photos = _names(args.photos, PHOTOS, "photos")
        variants = _names(args.variants, list(VARIANTS), "variants")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    record = BenchRecord("real_photos")
    answers = run(args.url, photos, variants, args.timeout_s)
    figures = tally(answers)
    # Each answer as JSON has it (its tuple a list), so the returned figures equal the written ones.
    figures["answers"] = [{**asdict(a), "shape_words": list(a.shape_words)} for a in answers]
    print(
        f"{figures['requests']} requests ({len(photos)} photos x {len(variants)} variants), "
        f"{figures['errors']} errors: captioner in domain {figures['captioner_in_domain']}, "
        f"detector in domain {figures['detector_in_domain']}, alt text with shape words "
        f"{figures['alt_text_shape_words']}, objects returned {figures['objects_returned']}"
    )
    for key in ("captioner_in_domain_on", "alt_text_shape_words_on", "objects_returned_on"):
        for line in figures[key]:
            print(f"  {key.removesuffix('_on')}: {line}")
    config = {**vars(args), "photos": photos, "variants": variants}
    record.write(figures, config=config, out=args.out)
    return figures


if __name__ == "__main__":
    main()

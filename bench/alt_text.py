"""Held-out synthetic scenes against the running system: how often does a scene keep its caption as alt text?

Issue 13 asks that in-domain images keep their caption as alt text (at least 95 % of held-out synthetic
scenes) while alt text stays something a blind reader can trust. This script measures both the way a
platform meets them: it sends a split's images (default the ETL output's ``test`` split, scenes no training
saw) through the gateway's ``POST /v1/analyze`` (real HTTP, a running stack such as ``make up``'s) and
counts, per image:

- ``in_domain``: the captioner took the scene for in-domain (``caption.in_domain``);
- ``kept``: the alt text is the caption (``alt_text.source == "caption"``: in domain and the calibrated
  confidence at least the gateway's ``ALT_TEXT_MIN_CONFIDENCE``);
- ``right``: the caption names exactly the (colour, shape) pairs of the scene's references (the
  calibration's definition of right, ``training.caption.evaluate.pairs_right``).

It prints the shares of all images (the kept one with its 95 % Wilson interval: the sampling error of a
few hundred scenes), the share of kept captions that are right, and both by the number of
(colour, shape) pairs in the scene. Not a speed benchmark, so no baseline ratio: the figures are rates,
written as JSON with the machine and versions like every ``bench/`` result. Example::

    .venv/bin/python bench/alt_text.py --url http://127.0.0.1:8000 --data data/processed
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_post import analyze
from result_json import BenchRecord, add_out_argument

from training.caption.data import SplitData
from training.caption.evaluate import named_pairs, pairs_right


@dataclass(frozen=True)
class Scene:
    """What the gateway said of one scene (``status`` 0: no HTTP answer)."""

    image_id: str
    pairs: int
    status: int
    caption: str = ""
    in_domain: bool | None = None
    kept: bool = False
    right: bool = False


def scene(image_id: str, references: Sequence[str], status: int, body: dict[str, Any] | None) -> Scene:
    """A :class:`Scene` from ``/v1/analyze``'s JSON (None or an error envelope: only the status)."""
    pairs = len(set().union(*(named_pairs(r) for r in references)))
    if status != 200 or not body:
        return Scene(image_id, pairs, status)
    caption = body.get("caption") or {}
    text = caption.get("text") or ""
    return Scene(
        image_id,
        pairs,
        status,
        caption=text,
        in_domain=caption.get("in_domain"),
        kept=(body.get("alt_text") or {}).get("source") == "caption",
        right=bool(text) and pairs_right(references, text),
    )


def wilson_interval(count: int, of: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score interval (95 % at ``z`` 1.96) of the share ``count / of``; None when ``of`` is 0.

    A share of a few hundred scenes moves by a point or more between samples of the same system; the
    interval says how far (for 95 % kept of 285 scenes: 0.92-0.97).
    """
    if not of:
        return None
    p, zz = count / of, z * z
    centre = (p + zz / (2 * of)) / (1 + zz / of)
    half = z * math.sqrt(p * (1 - p) / of + zz / (4 * of * of)) / (1 + zz / of)
    return [round(max(centre - half, 0.0), 4), round(min(centre + half, 1.0), 4)]


def _shares(scenes: Sequence[Scene]) -> dict[str, Any]:
    n = len(scenes)
    kept = [s for s in scenes if s.kept]

    def share(count: int, of: int) -> float | None:
        return round(count / of, 4) if of else None

    return {
        "images": n,
        "in_domain": share(sum(s.in_domain is True for s in scenes), n),
        "kept": share(len(kept), n),
        "kept_interval": wilson_interval(len(kept), n),
        "right": share(sum(s.right for s in scenes), n),
        "kept_right": share(sum(s.right for s in kept), len(kept)),
    }


def tally(scenes: Sequence[Scene]) -> dict[str, Any]:
    """The figures over the answered scenes: the shares, and the same by number of (colour, shape) pairs."""
    answered = [s for s in scenes if s.status == 200]
    by_pairs = {
        str(n): _shares([s for s in answered if s.pairs == n]) for n in sorted({s.pairs for s in answered})
    }
    return {
        "requests": len(scenes),
        "errors": len(scenes) - len(answered),
        **_shares(answered),
        "by_pairs": by_pairs,
    }


def run(url: str, split: SplitData, timeout_s: float) -> list[Scene]:
    """Send every image of ``split`` (its file's bytes, as stored) to ``url``'s ``/v1/analyze``."""
    scenes = []
    references = split.references()
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for image_id, path in zip(split.image_ids, split.paths, strict=True):
            status, body = analyze(client, Path(path).name, Path(path).read_bytes(), image_id)
            scenes.append(scene(image_id, references[image_id], status, body))
    return scenes


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway [%(default)s]")
    parser.add_argument("--data", type=Path, default=Path("data/processed"), help="ETL output [%(default)s]")
    parser.add_argument("--split", default="test", help="which split's scenes [%(default)s]")
    parser.add_argument("--limit", type=int, default=0, help="the first N scenes (0: all) [%(default)s]")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per request [%(default)s]")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    try:
        split = SplitData.load(args.data, args.split).head(args.limit)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"cannot read the {args.split!r} split of {args.data}: {exc}")
    record = BenchRecord("alt_text")
    scenes = run(args.url, split, args.timeout_s)
    figures = tally(scenes)
    figures["scenes"] = [asdict(s) for s in scenes]
    print(
        f"{figures['requests']} scenes ({args.split}), {figures['errors']} errors: in domain "
        f"{figures['in_domain']}, caption kept as alt text {figures['kept']} (95 % interval "
        f"{figures['kept_interval']}; right: {figures['kept_right']}), caption right {figures['right']}"
    )
    for pairs, shares in figures["by_pairs"].items():
        print(f"  {pairs} pairs: {shares}")
    record.write(figures, config=vars(args), out=args.out)
    return figures


if __name__ == "__main__":
    main()

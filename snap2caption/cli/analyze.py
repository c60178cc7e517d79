"""``snap2caption analyze IMAGE|URL``: ask a running gateway about one image and print the answer.

Exit codes: 0 done; 1 the gateway answered with an error (one line on stderr: status, code, message,
request id); 2 bad usage (click's own); 3 the gateway could not be reached in time.

The client (and httpx, which the ``serve`` extra brings) is imported when the command runs, so the rest
of the CLI works without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from snap2caption.client import AnalyzeResult

DEFAULT_GATEWAY = "http://127.0.0.1:8000"  # snap2caption.client.DEFAULT_BASE_URL, without importing httpx
EXIT_API_ERROR = 1
EXIT_UNREACHABLE = 3


def _check_features(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from snap2caption.client import FEATURES

    if value is None:
        return None
    parts = [part.strip() for part in value.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(FEATURES))
    if unknown or not parts:
        raise click.BadParameter(f"choose from {', '.join(FEATURES)} (comma-separated); got {value!r}")
    return ",".join(parts)


@click.command("analyze")
@click.argument("image", metavar="IMAGE|URL")
@click.option(
    "--gateway",
    default=DEFAULT_GATEWAY,
    show_default=True,
    envvar="SNAP2CAPTION_GATEWAY_URL",
    help="Gateway base URL (env SNAP2CAPTION_GATEWAY_URL).",
)
@click.option(
    "--api-key",
    envvar="SNAP2CAPTION_API_KEY",
    default=None,
    help="API key, when the gateway requires one (env SNAP2CAPTION_API_KEY).",
)
@click.option(
    "--features",
    callback=_check_features,
    default=None,
    help="Comma-separated subset of caption,alt_text,tags,objects [default: all].",
)
@click.option("--max-tags", type=click.IntRange(1, 50), default=None, help="At most this many tags.")
@click.option(
    "--min-confidence",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Drop tags and objects scored below this.",
)
@click.option(
    "--gender-neutral/--no-gender-neutral",
    default=None,
    help="Gender-neutral wording in caption and alt text [default: the gateway's].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the gateway's JSON answer as is.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True, help="Seconds.")
@click.option(
    "--retries",
    type=click.IntRange(0, 10),
    default=2,
    show_default=True,
    help="Retries when the gateway is overloaded (503) or rate-limits (429), after its Retry-After.",
)
def analyze(
    image: str,
    gateway: str,
    api_key: str | None,
    features: str | None,
    max_tags: int | None,
    min_confidence: float | None,
    gender_neutral: bool | None,
    as_json: bool,
    timeout: float,
    retries: int,
) -> None:
    """Caption, alt text, tags and objects of IMAGE (a file, '-' for stdin) or URL, from a running gateway."""
    from snap2caption.client import (
        Snap2CaptionAPIError,
        Snap2CaptionClient,
        Snap2CaptionConnectionError,
        is_url,
    )

    source: bytes | str | Path
    filename = None
    if is_url(image):
        source = image
    elif image == "-":
        source = sys.stdin.buffer.read()
        filename = "stdin"
    else:
        path = Path(image)
        if not path.is_file():
            raise click.BadParameter(f"no such file: {image}", param_hint="IMAGE|URL")
        source = path
    try:
        with Snap2CaptionClient(gateway, api_key=api_key, timeout=timeout, max_retries=retries) as client:
            result = client.analyze(
                source,
                features=features,
                max_tags=max_tags,
                min_confidence=min_confidence,
                gender_neutral=gender_neutral,
                filename=filename,
            )
    except Snap2CaptionAPIError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_API_ERROR)
    except Snap2CaptionConnectionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if as_json:
        click.echo(json.dumps(result.raw, indent=2, ensure_ascii=False))
    else:
        click.echo(summary(result))


def _box(x1: float, y1: float, x2: float, y2: float) -> str:
    return f"({x1:.0f}, {y1:.0f})-({x2:.0f}, {y2:.0f})"


def summary(result: AnalyzeResult) -> str:
    """The readable multi-line summary ``snap2caption analyze`` prints.

    Args:
        result: A gateway answer.

    Returns:
        Lines such as ``caption   a red circle (confidence 0.62)``, one section per feature.
    """
    img = result.image
    lines = [f"{'image':9s} {img.width} x {img.height}" + (f" {img.format}" if img.format else "")]
    if result.caption is not None:
        conf = result.caption.confidence
        sure = f" (confidence {conf:.2f})" if conf is not None else ""
        lines.append(f"{'caption':9s} {result.caption.text}{sure}")
    if result.alt_text is not None:
        source = f" [{result.alt_text.source}]" if result.alt_text.source else ""
        lines.append(f"{'alt text':9s} {result.alt_text.text}{source}")
    if result.tags is not None:
        tags = "  ".join(f"{tag.hashtag} {tag.score:.2f}" for tag in result.tags) or "none"
        lines.append(f"{'tags':9s} {tags}")
    if result.objects is not None:
        lines.append(f"{'objects':9s} {len(result.objects)}")
        width = max((len(obj.label) for obj in result.objects), default=0)
        for obj in result.objects:
            b = obj.box
            lines.append(f"  {obj.label:{width}s}  {obj.score:.2f}  {_box(b.x1, b.y1, b.x2, b.y2)}")
    for error in result.errors:
        lines.append(f"{'failed':9s} {error.feature}: {error.code}: {error.message}")
    timings = {k: v for k, v in result.timings.model_dump().items() if isinstance(v, int | float)}
    if timings:
        parts = ", ".join(f"{key.removesuffix('_ms')} {value:.1f} ms" for key, value in timings.items())
        lines.append(f"{'timings':9s} {parts}")
    if result.models:
        parts = ", ".join(
            f"{feature} {m.name} v{m.version}" + (f" ({m.backend})" if m.backend else "")
            for feature, m in result.models.items()
        )
        lines.append(f"{'models':9s} {parts}")
    lines.append(f"{'request':9s} {result.request_id}")
    return "\n".join(lines)

"""Smoke-test a deployed gateway: ready, then one image analysed end to end. Standard library only, so it
runs from a bare CI runner or an operator's laptop:

    python scripts/smoke_test.py https://api.example.org [--api-key KEY]

The image is a small PNG made here (a red disc on white). Exit status 0 when ``/readyz`` answers 200 and
``/v1/analyze`` answers 200 with a caption, tags and no per-feature errors; 1 otherwise, with one line
saying why.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import urllib.error
import urllib.request
import zlib


def red_disc_png(size: int = 96) -> bytes:
    """A ``size`` x ``size`` RGB PNG: a red disc on white."""
    centre, radius = (size - 1) / 2, size / 3
    rows = b"".join(
        b"\x00"  # filter type 0 for each row
        + b"".join(
            b"\xdc\x1e\x1e" if (x - centre) ** 2 + (y - centre) ** 2 <= radius**2 else b"\xff\xff\xff"
            for x in range(size)
        )
        for y in range(size)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def check(base_url: str, api_key: str | None, timeout_s: float) -> str:
    """Run the checks; return a one-line summary. Raises RuntimeError naming what failed."""
    base_url = base_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base_url}/readyz", timeout=timeout_s) as ready:
            ready.read()
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"{base_url}/readyz: {exc}") from exc
    headers = {"content-type": "image/png"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        f"{base_url}/v1/analyze", data=red_disc_png(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"/v1/analyze: {exc.code} {exc.read()[:500]!r}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"/v1/analyze: {exc}") from exc
    if body.get("errors") or not (body.get("caption") or {}).get("text") or not body.get("tags"):
        raise RuntimeError(f"/v1/analyze answered without a caption or tags: {json.dumps(body)[:500]}")
    versions = ", ".join(f"{m['name']} v{m['version']}" for m in body.get("models", {}).values())
    return (
        f"ok: {body['caption']['text']!r} ({versions}) in {body.get('timings', {}).get('total_ms', '?')} ms"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url", help="The gateway, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None, help="Sent as a bearer token (production profile).")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(check(args.base_url, args.api_key, args.timeout_s) + "\n")
    except RuntimeError as exc:
        sys.stderr.write(f"smoke test failed: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

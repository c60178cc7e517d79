"""One upload to a running gateway's ``POST /v1/analyze``, as the quality bench scripts send it
(``alt_text.py``, ``real_photos.py``): the status and the JSON answer, a transport failure as status 0."""

from __future__ import annotations

from typing import Any

import httpx


def analyze(
    client: httpx.Client, filename: str, data: bytes, label: str
) -> tuple[int, dict[str, Any] | None]:
    """Upload ``data`` as ``filename``; returns the HTTP status and the JSON body of a 200 answer (else
    None). No answer at all (refused, reset, timed out) is printed with ``label`` and returned as status 0."""
    try:
        response = client.post("/v1/analyze", files={"file": (filename, data)})
    except httpx.HTTPError as exc:
        print(f"{label}: no answer ({exc})", flush=True)
        return 0, None
    return response.status_code, response.json() if response.status_code == 200 else None

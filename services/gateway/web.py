"""The gateway's web page: ``GET /`` and its assets under ``/static/``.

The page (``static/index.html``, ``app.js``, ``style.css``) is plain HTML, CSS and JavaScript: no build
step, no CDN, nothing fetched from anywhere but this gateway, so it works offline. It calls the public
API (``/v1/analyze``, ``/v1/feedback``) from the browser like any other client.

Only the files found in ``static/`` at import time are served, looked up by exact name, so no request
path can reach anything else on disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response

from snap2caption.errors import NotFound

STATIC_DIR = Path(__file__).with_name("static")
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# The page talks only to this origin. Images: the user's own file (blob:) or the URL they pasted
# (http/https), which the browser shows directly while the gateway fetches it for analysis.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data: http: https:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is small and changes with deployments: always revalidate (the ETag makes that cheap).
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


def _load_assets(folder: Path) -> dict[str, _Asset]:
    """Every servable file of ``folder`` by name, read once (the whole page is a few tens of kB)."""
    assets: dict[str, _Asset] = {}
    for path in sorted(folder.iterdir()):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if path.is_file() and media_type is not None:
            body = path.read_bytes()
            assets[path.name] = _Asset(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:16]}"')
    return assets


_ASSETS = _load_assets(STATIC_DIR)

router = APIRouter(include_in_schema=False)


def _serve(asset: _Asset, request: Request) -> Response:
    headers = {**_PAGE_HEADERS, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/")
async def index(request: Request) -> Response:
    """The web page: analyse an image (upload, drop, paste, URL); see boxes, caption, tags; send feedback."""
    return _serve(_ASSETS["index.html"], request)


@router.get("/static/{name}")
async def static(name: str, request: Request) -> Response:
    """One of the page's assets, by exact file name."""
    asset = _ASSETS.get(name)
    if asset is None:
        raise NotFound(f"no static asset named {name!r}")
    return _serve(asset, request)

"""Network access the services make on a caller's behalf (today: fetching an image by URL, SSRF-safe)."""

from __future__ import annotations

from snap2caption.net.fetch import FetchedImage, FetchPolicy, address_block_reason, fetch_url

__all__ = ["FetchPolicy", "FetchedImage", "address_block_reason", "fetch_url"]

"""Snap2Caption: captions, alt text, tags and objects for images, and the ML loop behind them."""

from __future__ import annotations

__version__ = "0.1.0"

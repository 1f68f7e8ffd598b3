"""Aerial tile thumbnails for the result page, made from the tile's ``source`` image."""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path

from PIL import Image


class ThumbnailError(Exception):
    pass


class Thumbnails:
    """Bounded LRU of JPEG thumbnails keyed by (source path, mtime, size)."""

    def __init__(self, max_side: int, capacity: int) -> None:
        self.max_side = max_side
        self._cached = functools.lru_cache(maxsize=capacity)(self._make)  # thread safe; errors are not kept

    def get(self, source: Path) -> bytes:
        try:
            st = os.stat(source)
        except OSError:
            raise ThumbnailError("tile image is not available") from None
        return self._cached(str(source), st.st_mtime_ns, st.st_size)

    def _make(self, source: str, mtime_ns: int, size: int) -> bytes:
        try:
            with Image.open(source) as img:
                img.draft("RGB", (self.max_side, self.max_side))  # fast JPEG downscale on decode
                img.thumbnail((self.max_side, self.max_side))
                rgb = img.convert("RGB")
        except Exception as exc:
            raise ThumbnailError(f"tile image could not be read ({type(exc).__name__})") from None
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=85)
        return out.getvalue()

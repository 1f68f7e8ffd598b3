"""Aerial tile thumbnails for the result page, made from the tile's ``source`` image."""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image


class ThumbnailError(Exception):
    pass


class Thumbnails:
    """Bounded LRU of JPEG thumbnails keyed by (source path, mtime, size)."""

    def __init__(self, max_side: int, capacity: int) -> None:
        self.max_side = max_side
        self.capacity = capacity
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: Path) -> bytes:
        try:
            st = os.stat(source)
        except OSError:
            raise ThumbnailError("tile image is not available") from None
        key = (str(source), st.st_mtime_ns, st.st_size)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        data = self._make(source)
        if self.capacity:
            with self._lock:
                self._cache[key] = data
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return data

    def _make(self, source: Path) -> bytes:
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

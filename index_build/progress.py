"""Progress of the encode stage, on stderr, for a terminal and for a log alike.

On a terminal: a tqdm bar of whole tiles, redrawn in place and cleared when the stage ends (the
build then logs one line with the totals, so the final count is printed once). Anywhere else (a
log file, `docker compose logs`, a CI job) every redraw would become a line of its own, so there
is no bar: a log line every `every_s` seconds instead.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("index_build")


class TileProgress:
    def __init__(self, total: int, desc: str, enabled: bool = True, every_s: float = 30.0, stream=None):
        self.total = int(total)
        self.desc = desc
        self.enabled = enabled
        self.every_s = every_s
        self.done = 0
        self._bar = None
        self._started = self._logged = time.perf_counter()
        stream = stream if stream is not None else sys.stderr
        if enabled and hasattr(stream, "isatty") and stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="tile", file=stream, leave=False,
                             dynamic_ncols=True, smoothing=0.05)

    def update(self, tiles: int) -> None:
        self.done += tiles
        if self._bar is not None:
            self._bar.update(tiles)
            return
        now = time.perf_counter()
        if self.enabled and now - self._logged >= self.every_s and self.done < self.total:
            self._logged = now
            rate = self.done / (now - self._started)
            log.info("%s: %d/%d tiles (%d%%), %.1f tiles/s", self.desc, self.done, self.total,
                     100 * self.done // max(1, self.total), rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

"""Prometheus metrics of one app instance (own registry, so several apps can live in one test).

Several server processes (``python -m service --workers N``, ``uvicorn --workers N``) share their
metrics through prometheus_client's multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty
directory writable by all of them, and ``GET /metrics`` from any process adds up every process's.
"""
from __future__ import annotations

import contextlib
import os
import re
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# Milliseconds-scale buckets expressed in seconds, as Prometheus convention wants.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("decode", "queue", "encode", "search", "total")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        counter, histogram = partial(Counter, registry=r), partial(Histogram, registry=r, buckets=_LATENCY_BUCKETS)
        gauge = partial(Gauge, registry=r, multiprocess_mode="livemax")  # several processes: the largest value
        self.requests = counter("geoloc_http_requests_total", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"])
        self.request_seconds = histogram("geoloc_http_request_duration_seconds",
                                         "HTTP request latency by route template.", ["route"])
        stage_seconds = histogram("geoloc_stage_duration_seconds",
                                  "Per-image latency of each stage: decode, queue, encode, search, total.", ["stage"])
        self.stage = {name: stage_seconds.labels(name) for name in STAGES}
        self.batch_size = histogram("geoloc_batch_size", "Images per micro-batch (one forward + one search).",
                                    buckets=_BATCH_BUCKETS)
        self.queue_depth = gauge("geoloc_queue_depth", "Images waiting for an encoder thread.",
                                 multiprocess_mode="livesum")
        self.queue_capacity = gauge("geoloc_queue_capacity", "Images that may wait before 503.",
                                    multiprocess_mode="livesum")
        self.rejected = counter("geoloc_rejected_total", "Requests refused before inference, by reason.", ["reason"])
        self.dropped = counter("geoloc_dropped_images_total",
                               "Queued images not computed, by reason (client_disconnected, timeout, shutdown).",
                               ["reason"])
        for reason in ("client_disconnected", "timeout", "shutdown"):  # at 0 from the start: an alert's rate() is 0
            self.dropped.labels(reason)
        self.rejected.labels("queue_full")
        self.images = counter("geoloc_images_localized_total", "Images encoded and searched.")
        self.index_size = gauge("geoloc_index_size", "Vectors in the index being served.")
        self.index_generation = gauge("geoloc_index_generation", "Index swaps since start (1 = the first load).")
        self.index_info = gauge("geoloc_index_info", "The index artifact being served (1; 0 for one served before).",
                                ["model_fingerprint", "built_at", "catalog_sha256", "index_type", "count"])
        self.model_info = gauge("geoloc_model_info", "The model being served (1).",
                                ["fingerprint", "checkpoint", "embedding_dim", "device"])
        self.reloads = counter("geoloc_index_reloads_total", "Index reload attempts by trigger and result.",
                               ["trigger", "result"])
        self.reload_failed = gauge("geoloc_index_reload_failing",
                                   "1 while the newest published artifact could not be loaded (old one still served).")
        self.ready = gauge("geoloc_ready", "1 when model and index are loaded.", multiprocess_mode="livemin")
        self._index_labels: tuple | None = None

    def observe_batch(self, images: int, encode_s: float, search_s: float) -> None:
        self.batch_size.observe(images)
        self.images.inc(images)
        for _ in range(images):
            self.stage["encode"].observe(encode_s)
            self.stage["search"].observe(search_s)

    def observe_request(self, images: int, decode_s: float, queue_s: float, total_s: float) -> None:
        for _ in range(images):
            self.stage["decode"].observe(decode_s / images)
            self.stage["queue"].observe(queue_s)
            self.stage["total"].observe(total_s)

    def set_index(self, info) -> None:
        """``info``: the IndexInfo of the index now served. The previous one's info series drops to 0
        (a multiprocess file can not forget a series)."""
        if self._index_labels is not None:
            self.index_info.labels(*self._index_labels).set(0)
        self._index_labels = (info.model_fingerprint, info.built_at, info.catalog_sha256 or "",
                              info.index_type, str(info.count))
        self.index_info.labels(*self._index_labels).set(1)
        self.index_size.set(info.count)
        self.index_generation.set(info.generation)

    def exposition(self) -> bytes:
        """The text format of this process's metrics, or of every process's in multiprocess mode."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        _forget_dead_processes(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    @staticmethod
    def process_exit() -> None:  # (a process killed outright: _forget_dead_processes)
        """In multiprocess mode, forget this process's live gauges (queue depth, readiness)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.mark_process_dead(os.getpid())


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]*_([0-9]+)\.db")  # prometheus_client's name: mode, pid


def _forget_dead_processes(directory: str) -> None:
    """Drop the live gauges of worker processes that died without their shutdown (killed, out of memory):
    their last queue depth, readiness and index would count for ever. (One host: a pid is this host's.)"""
    for pid in {int(m[1]) for name in os.listdir(directory) if (m := _LIVE_GAUGE_FILE.fullmatch(name))}:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, OverflowError):  # (a pid too large for one: no process either)
            with contextlib.suppress(FileNotFoundError):  # another scrape removing them at the same time
                multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass  # alive, another user's

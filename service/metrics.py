"""Prometheus metrics of one app instance (own registry, so several apps can live in one test)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Milliseconds-scale buckets expressed in seconds, as Prometheus convention wants.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "geoloc_http_requests_total", "HTTP requests by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "geoloc_http_request_duration_seconds", "HTTP request latency by route template.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.stage_seconds = Histogram(
            "geoloc_stage_duration_seconds",
            "Per-image latency of each stage: decode, queue, encode, search, total.",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        # the labelled children, looked up once: several observations per request
        self.stage = {name: self.stage_seconds.labels(name)
                      for name in ("decode", "queue", "encode", "search", "total")}
        self.batch_size = Histogram(
            "geoloc_batch_size", "Images per micro-batch (one forward + one search).",
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "geoloc_queue_depth", "Images waiting for the inference worker.", registry=r
        )
        self.queue_capacity = Gauge(
            "geoloc_queue_capacity", "Images that may wait before 503.", registry=r
        )
        self.rejected = Counter(
            "geoloc_rejected_total", "Requests refused before inference, by reason.",
            ["reason"], registry=r,
        )
        self.dropped = Counter(
            "geoloc_dropped_images_total",
            "Queued images not computed, by reason (client_disconnected, timeout, shutdown).",
            ["reason"], registry=r,
        )
        self.encoder_restarts = Counter(
            "geoloc_encoder_restarts_total",
            "Encoder processes started again after they died (killed, out of memory).", registry=r,
        )
        self.images = Counter(
            "geoloc_images_localized_total", "Images encoded and searched.", registry=r
        )
        self.index_size = Gauge(
            "geoloc_index_size", "Vectors in the index being served.", registry=r
        )
        self.index_generation = Gauge(
            "geoloc_index_generation", "Index swaps since start (1 = the first load).", registry=r
        )
        self.index_info = Gauge(
            "geoloc_index_info", "The index artifact being served (value 1).",
            ["model_fingerprint", "built_at", "catalog_sha256", "index_type", "count"],
            registry=r,
        )
        self.model_info = Info("geoloc_model", "The model being served.", registry=r)
        self.reloads = Counter(
            "geoloc_index_reloads_total", "Index reload attempts by trigger and result.",
            ["trigger", "result"], registry=r,
        )
        self.reload_failed = Gauge(
            "geoloc_index_reload_failing",
            "1 while the newest published artifact could not be loaded (old one still served).",
            registry=r,
        )
        self.ready = Gauge("geoloc_ready", "1 when model and index are loaded.", registry=r)

    def set_index(self, info: dict) -> None:
        self.index_info.clear()
        self.index_info.labels(
            model_fingerprint=info["model_fingerprint"],
            built_at=info["built_at"],
            catalog_sha256=info.get("catalog_sha256") or "",
            index_type=info["index_type"],
            count=str(info["count"]),
        ).set(1)
        self.index_size.set(info["count"])
        self.index_generation.set(info["generation"])

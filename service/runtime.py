"""Loading model + index at startup, and the hot index reload (watcher + admin trigger).

Startup runs in a background thread so that /healthz answers while a large checkpoint loads;
/readyz says 503 until the engine serves. A fatal startup error (missing file, fingerprint
mismatch between checkpoint and artifact) is logged as one clear line and, unless
``exit_on_load_failure`` is off, ends the process with status 3: the service refuses to start.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from model import load_checkpoint
from model.encode import available_cpus, pick_device
from model.inference import InferenceEncoder

from .artifact import ArtifactChanged, ArtifactError, ServedIndex, Signature, load_artifact, public_text
from .engine import Engine
from .logs import stop_logging
from .metrics import Metrics
from .schemas import ModelInfo, ReloadResult
from .settings import EXIT_LOAD_FAILURE, Settings

log = logging.getLogger("service.runtime")


class ReloadFailed(Exception):
    """A new artifact could not be served; the old one still is."""


@dataclass(frozen=True)
class LoadedModel:
    encoder: InferenceEncoder  # .config: the model's L2LTRConfig
    info: ModelInfo  # what every answer says about it


def encoder_plan(settings: Settings, on_gpu: bool) -> tuple[int, int | None, int | None]:
    """(encoder threads, torch threads per encoder thread, torch threads of a lone image). On a CPU two
    threads with half the cores each beat one forward over every core under load: an OpenMP forward
    stalls at each parallel region's barrier whenever the event loop pre-empts one of its threads
    (bench/RESULTS.md); a lone image still gets every core (Engine: a wide batch), unless
    GEOLOC_TORCH_THREADS says how many a forward may use. On a GPU one thread by default; more may
    decode a batch while another's runs on the device (their searches of a FAISS GPU index take
    turns: ServedIndex.search_lock)."""
    if on_gpu:
        return settings.encoder_workers or 1, settings.torch_threads, None
    cpus = available_cpus()
    workers = settings.encoder_workers or (2 if cpus >= 2 else 1)
    threads = settings.torch_threads or max(1, cpus // workers)
    lone = cpus if settings.torch_threads is None and workers > 1 and threads < cpus else None
    return workers, threads, lone


def load_model(settings: Settings) -> LoadedModel:
    device = pick_device(settings.device)
    checkpoint = Path(settings.checkpoint)
    net = load_checkpoint(checkpoint)
    if settings.view_phases is not None:  # refused at start, not at the first query
        from model.orientation import phase_step

        try:
            phase_step(net.config.ground_size[1], net.config.grid("ground")[1], settings.view_phases)
        except ValueError as exc:
            raise ValueError(f"GEOLOC_VIEW_PHASES={settings.view_phases}: {exc}") from None
    info = ModelInfo(fingerprint=net.fingerprint(), checkpoint=checkpoint.name, embedding_dim=net.embedding_dim,
                     device=str(device), ground_size=tuple(net.config.ground_size))
    return LoadedModel(InferenceEncoder(net, device, branches=("ground",)), info)


class Runtime:
    """Everything with a lifetime: loader thread, engine, watcher thread, readiness state."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = "loading"  # loading -> ready | failed; ready -> stopping
        self.error: str | None = None
        self.last_reload_error: str | None = None
        self.model: LoadedModel | None = None
        self.engine: Engine | None = None
        self._generation = 0
        self._reload_lock = threading.Lock()
        self._failed_signature: Signature | None = None
        self._stop = threading.Event()
        self._loader: threading.Thread | None = None
        self._watcher: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="geoloc-loader", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.state == "ready"

    def stop(self) -> None:
        if self.state == "ready":
            self.state = "stopping"
        self.metrics.ready.set(0)
        self._stop.set()
        for thread, timeout in ((self._loader, 30), (self._watcher, 5)):
            if thread is not None:
                thread.join(timeout)
        if self.engine is not None:
            self.engine.stop()

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine is not None and self.engine.running

    def not_ready_reason(self) -> str:
        if self.state == "ready":
            return "the encoder threads are not running"
        if self.state == "failed":
            return self.error or "loading failed"
        return {"loading": "model and index are loading", "stopping": "shutting down"}[self.state]

    def public_text(self, text: str) -> str:
        """``text`` as unauthenticated answers show it: artifact.public_text, also without the
        directories of the index (as configured and as resolved now) and of the checkpoint."""
        index = self.settings.index
        around = [self.settings.checkpoint.parent]
        if index is not None:
            around += [index.parent, Path(os.path.realpath(index)).parent]  # (resolve() raises on a symlink loop)
        return public_text(text, around)

    def _load(self) -> None:
        s = self.settings
        try:
            if s.index is None:
                raise ArtifactError("GEOLOC_INDEX is not set: point it at an index artifact directory")
            t0 = time.perf_counter()
            model = load_model(s)
            log.info("model loaded", extra={
                "checkpoint": str(s.checkpoint), "fingerprint": model.info.fingerprint,
                "device": model.info.device, "seconds": round(time.perf_counter() - t0, 3)})
            index = self._load_index(model)
            if self._stop.is_set():
                return
            workers, threads, lone = encoder_plan(s, model.encoder.device.type == "cuda")
            engine = Engine(
                lambda images, view_phases, photos: model.encoder.encode_uint8_with_columns(
                    images, "ground", s.max_batch_size, columns=view_phases > 0, phases=max(view_phases, 1),
                    photos=photos), index,
                metrics=self.metrics, workers=workers, threads_per_worker=threads, lone_threads=lone,
                max_batch_size=s.max_batch_size, max_batch_wait_ms=s.max_batch_wait_ms, view_phases=s.view_phases,
                queue_size=s.queue_size, request_timeout_s=s.request_timeout_s)
            engine.start()
        except Exception as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.critical("refusing to start: %s", exc, extra={"error": type(exc).__name__})
            if s.exit_on_load_failure:
                stop_logging()
                sys.stderr.flush()
                os._exit(EXIT_LOAD_FAILURE)
            return
        self.model, self.engine = model, engine
        self.state = "ready"
        self.metrics.ready.set(1)
        info = model.info
        self.metrics.model_info.labels(info.fingerprint, info.checkpoint, str(info.embedding_dim),
                                       info.device).set(1)
        self.metrics.reloads.labels("startup", "success").inc()
        log.info("ready", extra={"index": str(index.path), "tiles": index.count,
                                 "index_type": index.info.index_type, "encoder_threads": workers,
                                 "torch_threads": threads, "view_phases": engine.view_phases_for(index)})
        if s.reload_poll_s > 0 and not self._stop.is_set():
            self._watcher = threading.Thread(target=self._watch, name="geoloc-watcher", daemon=True)
            self._watcher.start()

    def _load_index(self, model: LoadedModel, attempts: int = 5) -> ServedIndex:
        device = model.encoder.device
        for attempt in range(1, attempts + 1):
            try:
                index = load_artifact(Path(self.settings.index),  # type: ignore[arg-type]
                                      expected_fingerprint=model.info.fingerprint,
                                      embedding_dim=model.info.embedding_dim, generation=self._generation + 1,
                                      column_shape=model.encoder.config.column_shape(),
                                      gpu=(device.index or 0) if device.type == "cuda" else None)
                break
            except ArtifactChanged:  # published while we read it: read the new one
                if attempt == attempts:
                    raise
                time.sleep(0.05 * attempt)
        self._generation += 1
        return index

    # --- hot reload -----------------------------------------------------------------------
    def reload(self, trigger: str, force: bool = False) -> ReloadResult:
        """Load the artifact now published at GEOLOC_INDEX beside the current one and swap.

        Blocking (call it from a thread). Raises ReloadFailed and keeps the old index serving
        when the new artifact is broken or built for another model.
        """
        if not self.ready:
            raise ReloadFailed("the service is not ready; nothing to reload into")
        assert self.model is not None and self.engine is not None
        with self._reload_lock:
            current = self.engine.index
            path = Path(self.settings.index)  # type: ignore[arg-type]
            attempted = None  # what a failure is recorded as: not whatever is published by the time it fails
            try:
                attempted = Signature.of(path)
                if not force and attempted == current.signature:
                    self._reload_succeeded()  # the published artifact is the one served (again)
                    return ReloadResult(status="unchanged", index=current.info)
                t0 = time.perf_counter()
                new = self._load_index(self.model)
            except Exception as exc:
                message = str(exc) if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {exc}"
                self._failed_signature = attempted
                self.metrics.reloads.labels(trigger, "failure").inc()
                self.metrics.reload_failed.set(1)
                self.last_reload_error = message  # last: what /readyz shows comes after the metrics agree with it
                log.error("index reload failed, still serving %s: %s", current.path, message,
                          extra={"trigger": trigger})
                raise ReloadFailed(message) from None
            self._reload_succeeded()
            self.metrics.reloads.labels(trigger, "success").inc()
            self.engine.index = new  # last, as above
            log.info("index reloaded", extra={
                "trigger": trigger, "index": str(new.path), "tiles": new.count,
                "generation": new.generation, "previous": str(current.path),
                "view_phases": self.engine.view_phases_for(new), "seconds": round(time.perf_counter() - t0, 3)})
            return ReloadResult(status="reloaded", index=new.info, previous=current.info)

    def _reload_succeeded(self) -> None:
        self._failed_signature = None
        self.metrics.reload_failed.set(0)
        self.last_reload_error = None

    def _watch(self) -> None:
        """Poll GEOLOC_INDEX; reload when the resolved directory or its manifest changes."""
        path = Path(self.settings.index)  # type: ignore[arg-type]
        while not self._stop.wait(self.settings.reload_poll_s):
            try:
                signature = Signature.of(path)
            except OSError:
                continue  # mid-publish (directory renamed away for an instant) or gone
            served = signature == self.engine.index.signature  # type: ignore[union-attr]
            if signature == self._failed_signature or (served and self.last_reload_error is None):
                continue
            try:
                self.reload("watch")  # the served artifact published again: "unchanged", the failure forgotten
            except ReloadFailed:
                pass  # logged and counted in reload()
            except Exception:
                log.exception("index watcher error")

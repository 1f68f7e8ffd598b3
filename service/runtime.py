"""Loading model + index at startup, and the hot index reload (watcher + admin trigger).

Startup runs in a background thread so that /healthz answers while a large checkpoint loads;
/readyz says 503 until the worker serves. A fatal startup error (missing file, fingerprint
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
from typing import NamedTuple

import torch

from model import load_checkpoint
from model.encode import available_cpus, pick_device, prepare_for_inference

from .artifact import ArtifactChanged, ArtifactError, LoadedIndex, Signature, load_artifact
from .engine import Engine, LoadedModel
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("service.runtime")

EXIT_LOAD_FAILURE = 3


class ReloadFailed(Exception):
    """A new artifact could not be served; the old one still is."""


@dataclass
class ReloadOutcome:
    status: str  # "reloaded" | "unchanged"
    index: LoadedIndex
    previous: LoadedIndex | None


_OPENMP_BINDING = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def _physical_core(cpu: int) -> tuple[int, int, int]:
    """(package, core, cpu) from sysfs, so that sorting puts hyper-thread siblings side by side
    (Linux often numbers them N/2 apart); (0, cpu, cpu) where the topology is not readable."""
    topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        package = int((topology / "physical_package_id").read_text())
        core = int((topology / "core_id").read_text())
    except (OSError, ValueError):
        return 0, cpu, cpu
    return package, core, cpu


class EncoderPlan(NamedTuple):
    workers: int
    threads: int | None  # torch threads per worker; None = torch's default
    cpu_sets: list[set[int]] | None  # per worker: the CPUs it is pinned to; None = not pinned
    decode_threads: int  # 0: the encoder workers decode their own micro-batches
    nice: int  # how much nicer than the rest of the process the workers run
    processes: bool = False  # each worker computes in a child process of its own


def encoder_plan(settings: Settings) -> EncoderPlan:
    """Encoder workers, torch threads per worker, CPU pinning and upload decoding for the settings
    and this machine.

    On a CPU the encoder workers decode their own micro-batches: the cores are all busy anyway, and
    a separate decoding thread only adds hand-offs and pre-empts the forwards (bench/RESULTS.md).
    Two or more CPU workers compute in encoder processes of their own (``service.encoder_process``),
    so that the event loop's Python never makes them wait for the interpreter lock.
    On a GPU, threads decode beside the one worker so that the device never waits for the CPU.
    Workers are pinned only when they fill this process's CPUs exactly: then a worker never
    migrates to a core whose cache holds another worker's state, and no core is left to whatever
    else the pinning would crowd out. Hyper-thread siblings go to the same worker, and nothing is
    pinned where the OpenMP runtime is told to bind threads itself."""
    on_gpu = settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())
    if on_gpu:
        if settings.encoder_processes:
            log.warning("GEOLOC_ENCODER_PROCESSES is for CPU encoders; on a GPU the worker is a thread")
        decode = 2 if settings.decode_threads is None else settings.decode_threads
        # the one worker feeds the device: it must not wait behind the decoding threads
        return EncoderPlan(settings.encoder_workers or 1, settings.torch_threads, None, decode, 0)
    count = available_cpus()
    workers = settings.encoder_workers or (2 if count >= 2 else 1)
    threads = settings.torch_threads or max(1, count // workers)
    cpu_sets = None
    if (settings.pin_workers and workers > 1 and workers * threads == count
            and hasattr(os, "sched_setaffinity")
            and not any(name in os.environ for name in _OPENMP_BINDING)):
        ordered = sorted(os.sched_getaffinity(0), key=_physical_core)
        cpu_sets = [set(ordered[i * threads:(i + 1) * threads]) for i in range(workers)]
    decode = 0 if settings.decode_threads is None else settings.decode_threads
    # a niceness per thread is Linux's; elsewhere the workers run as the rest of the process
    nice = settings.worker_nice if sys.platform.startswith("linux") else 0
    processes = settings.encoder_processes
    if processes is None:
        processes = workers > 1
    return EncoderPlan(workers, threads, cpu_sets, decode, nice, processes)


def load_model(settings: Settings, *, keep_weights: bool = True) -> LoadedModel:
    """The checkpoint, ready for inference; without ``keep_weights`` (the encoder processes load
    their own) only what the service itself needs: fingerprint, configuration, dimension."""
    device = pick_device(settings.device)
    checkpoint = Path(settings.checkpoint)
    net = load_checkpoint(checkpoint)
    if keep_weights:
        net = prepare_for_inference(net, device)
    return LoadedModel(
        net=net if keep_weights else None, config=net.config, fingerprint=net.fingerprint(),
        device=device, checkpoint=checkpoint, embedding_dim=int(net.embedding_dim),
    )


class Runtime:
    """Everything with a lifetime: engine, loader thread, watcher thread, readiness state."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.plan = encoder_plan(settings)
        self.engine = Engine(
            metrics=metrics, max_batch_size=settings.max_batch_size,
            max_batch_wait_ms=settings.max_batch_wait_ms, queue_size=settings.queue_size,
            request_timeout_s=settings.request_timeout_s, workers=self.plan.workers,
            threads_per_worker=self.plan.threads, cpu_sets=self.plan.cpu_sets,
            worker_nice=self.plan.nice, processes=self.plan.processes,
        )
        self.state = "loading"  # loading -> ready | failed; ready -> stopping
        self.error: str | None = None
        self.last_reload_error: str | None = None
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
        if self._loader is not None:
            self._loader.join(30)
        if self._watcher is not None:
            self._watcher.join(5)
        self.engine.stop()

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.engine.running

    def _load(self) -> None:
        s = self.settings
        try:
            if s.index is None:
                raise ArtifactError("GEOLOC_INDEX is not set: point it at an index artifact directory")
            t0 = time.perf_counter()
            model = load_model(s, keep_weights=not self.plan.processes)
            log.info("model loaded", extra={
                "checkpoint": str(s.checkpoint), "fingerprint": model.fingerprint,
                "device": str(model.device), "seconds": round(time.perf_counter() - t0, 3)})
            index = self._load_index(Path(s.index), model)
            if self._stop.is_set():
                return
            self.engine.start(model, index)
        except Exception as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.critical("refusing to start: %s", exc, extra={"error": type(exc).__name__})
            if s.exit_on_load_failure:
                for handler in logging.getLogger("service").handlers:
                    handler.flush()
                sys.stderr.flush()
                os._exit(EXIT_LOAD_FAILURE)
            return
        self.state = "ready"
        self.metrics.ready.set(1)
        self.metrics.model_info.info({k: str(v) for k, v in model.info().items()})
        self.metrics.reloads.labels("startup", "success").inc()
        log.info("ready", extra={"index": str(index.path), "tiles": index.count,
                                 "index_type": index.manifest["index_type"]})
        if s.reload_poll_s > 0 and not self._stop.is_set():
            self._watcher = threading.Thread(target=self._watch, name="geoloc-watcher", daemon=True)
            self._watcher.start()

    def _load_index(self, path: Path, model: LoadedModel, attempts: int = 5) -> LoadedIndex:
        for attempt in range(attempts):
            try:
                return load_artifact(path, expected_fingerprint=model.fingerprint,
                                     embedding_dim=model.embedding_dim)
            except ArtifactChanged:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    # --- hot reload -----------------------------------------------------------------------
    def reload(self, trigger: str, force: bool = False) -> ReloadOutcome:
        """Load the artifact now published at GEOLOC_INDEX beside the current one and swap.

        Blocking (call it from a thread). Raises ReloadFailed and keeps the old index serving
        when the new artifact is broken or built for another model.
        """
        if not self.ready:
            raise ReloadFailed("the service is not ready; nothing to reload into")
        model = self.engine.model
        assert model is not None and self.settings.index is not None
        with self._reload_lock:
            current = self.engine.current
            assert current is not None
            path = Path(self.settings.index)
            try:
                signature = Signature.of(path)
                if not force and signature == current.signature:
                    return ReloadOutcome("unchanged", current, None)
                t0 = time.perf_counter()
                new = self._load_index(path, model)
                previous = self.engine.swap(new).result(timeout=60)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ArtifactError) \
                    else str(exc)
                self.last_reload_error = message
                try:
                    self._failed_signature = Signature.of(path)
                except OSError:
                    self._failed_signature = None
                self.metrics.reloads.labels(trigger, "failure").inc()
                self.metrics.reload_failed.set(1)
                log.error("index reload failed, still serving %s: %s", current.path, message,
                          extra={"trigger": trigger})
                raise ReloadFailed(message) from None
            self.last_reload_error = None
            self._failed_signature = None
            self.metrics.reloads.labels(trigger, "success").inc()
            self.metrics.reload_failed.set(0)
            log.info("index reloaded", extra={
                "trigger": trigger, "index": str(new.path), "tiles": new.count,
                "generation": new.generation, "previous": str(previous.path) if previous else None,
                "seconds": round(time.perf_counter() - t0, 3)})
            return ReloadOutcome("reloaded", new, previous)

    def _watch(self) -> None:
        """Poll GEOLOC_INDEX; reload when the resolved directory or its manifest changes."""
        path = Path(self.settings.index)  # type: ignore[arg-type]
        while not self._stop.wait(self.settings.reload_poll_s):
            current = self.engine.current
            if current is None:
                continue
            try:
                signature = Signature.of(path)
            except OSError:
                continue  # mid-publish (directory renamed away for an instant) or gone
            if signature == current.signature or signature == self._failed_signature:
                continue
            try:
                self.reload("watch")
            except ReloadFailed:
                pass  # logged and counted in reload()
            except Exception:
                log.exception("index watcher error")

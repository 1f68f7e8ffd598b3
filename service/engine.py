"""The inference engine: worker threads that own the model and the FAISS index (or hand their
batches to encoder processes that do).

Requests put *jobs* (one or more images) into a bounded queue. A worker takes whatever is
queued, up to ``max_batch_size`` images, waiting at most ``max_batch_wait_ms`` after the oldest
job arrived for more to join, then runs ONE ground-branch forward and ONE FAISS search for the
whole micro-batch and hands each job its rows. A job arrives either decoded or with its
``decode`` function, which the worker then runs first (on a CPU: see ``service.localize``).

On a GPU there is one worker. On a CPU there are by default two, each running its forward with
its own small share of the cores: a single forward spread over every core with OpenMP stalls at
each parallel region's barrier whenever the event loop or a decoding thread pre-empts one of its
threads, while two single-threaded forwards merely slow down a little (bench/RESULTS.md). Each
CPU worker hands its micro-batches to an encoder process of its own (``service.encoder_process``:
no interpreter lock shared with the event loop); with threads instead (one worker, or
``GEOLOC_ENCODER_PROCESSES=false``) the workers share one read-only model. Control commands (an
index swap, tests holding the engine) run only while no batch is in flight, and hold every worker,
so a batch never sees two indexes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import torch
from model.encode import encode_batch
from model.preprocess import normalize_uint8_nchw

from .artifact import LoadedIndex
from .encoder_process import EncoderProcess, EncoderProcessDied, ProcessSpec
from .metrics import Metrics

log = logging.getLogger("service.engine")


class Overloaded(Exception):
    """The queue is full; the caller answers 503 with Retry-After."""


class NotReady(Exception):
    """Model or index not loaded (yet), or shutting down."""


class ClientGone(Exception):
    """The client disconnected while its job waited; nothing was computed for it."""


class ResultTimeout(Exception):
    """No result within request_timeout_s."""


@dataclass
class LoadedModel:
    net: Any  # None where encoder processes hold the weights
    config: Any
    fingerprint: str
    device: torch.device
    checkpoint: Path
    embedding_dim: int

    def info(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "checkpoint": self.checkpoint.name,
            "embedding_dim": self.embedding_dim,
            "device": str(self.device),
            "ground_size": tuple(self.config.ground_size),
        }


@dataclass(eq=False)
class Job:
    n: int  # images
    k: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    images: torch.Tensor | None = None  # [n, 3, H, W] uint8 at the model's ground size, or
    decode: Callable[[], torch.Tensor] | None = None  # how the worker makes them (after queueing)
    decode_ms: float = 0.0
    enqueued: float = field(default_factory=time.perf_counter)
    request_id: str | None = None
    dropped: str | None = None  # why nobody waits for it any more (a metrics label); the worker skips it


@dataclass
class JobResult:
    matches: list[list[tuple[str, float, float, float]]]  # per image: (tile_id, lat, lon, score)
    index: LoadedIndex
    queue_ms: float
    encode_ms: float
    search_ms: float
    batch_size: int
    decode_ms: float


SWAP_TIMEOUT_S = 60.0  # for the workers to finish their batches and let an index swap happen
IDLE_CHECK_S = 1.0  # how often an idle worker checks that its encoder process is alive


class JobQueue:
    """Bounded FIFO counted in images, plus a channel of control commands for the worker."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._controls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._images = 0
        self._closed = False
        self._expected = 0  # requests being decoded right now, about to offer a job
        self._busy = 0  # workers computing a batch
        self._in_control = False  # a worker is running control commands; the others wait

    @property
    def depth(self) -> int:
        return self._images

    def expect(self) -> None:
        """A request started decoding; the worker may wait (max_wait) for its job to join."""
        with self._cond:
            self._expected += 1

    def unexpect(self) -> None:
        with self._cond:
            self._expected -= 1
            self._cond.notify()

    def offer(self, job: Job, expected: bool = False) -> bool:
        with self._cond:
            if expected:
                self._expected -= 1
            if self._closed:
                self._cond.notify()
                raise NotReady("shutting down")
            if self._images + job.n > self.capacity:
                self._cond.notify()
                return False
            self._jobs.append(job)
            self._images += job.n
            self._cond.notify()
            return True

    def control(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise NotReady("shutting down")
            self._controls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def close(self) -> list[Job]:
        """Stop accepting work; return the jobs that were still waiting."""
        with self._cond:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._images = 0
            for _, fut in self._controls:
                fut.set_exception(NotReady("shutting down"))
            self._controls.clear()
            self._cond.notify_all()
            return left

    def take(self, max_images: int, max_wait_s: float, idle_s: float | None = None):
        """Block for work. Returns ("control", [(fn, fut)...]), ("jobs", [job...]), ("closed", [])
        or, after ``idle_s`` without any, ("idle", []).

        Every "jobs" or "control" answer must be followed by `done(kind)` once it is handled."""
        idle_until = None if idle_s is None else time.monotonic() + idle_s
        with self._cond:
            while True:
                if self._controls:
                    if self._busy == 0 and not self._in_control:
                        controls = list(self._controls)
                        self._controls.clear()
                        self._in_control = True
                        return "control", controls
                elif self._jobs and not self._in_control:
                    break
                elif self._closed:
                    return "closed", []
                if idle_until is None:
                    self._cond.wait()
                elif not self._cond.wait(max(0.0, idle_until - time.monotonic())):
                    return "idle", []
            self._busy += 1  # from here on: a control waits for this batch, even while it gathers
            deadline = self._jobs[0].enqueued + max_wait_s
            taken: list[Job] = []
            images = 0
            while True:
                while self._jobs and (not taken or images + self._jobs[0].n <= max_images):
                    job = self._jobs.popleft()
                    self._images -= job.n
                    taken.append(job)
                    images += job.n
                if images >= max_images or self._jobs or self._closed or self._controls:
                    break  # full, or the next job does not fit, or something else to do
                if self._expected <= 0:
                    break  # nobody is about to join: waiting would only add latency
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return "jobs", taken

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_closed(self, timeout: float) -> None:
        with self._cond:
            if not self._closed:
                self._cond.wait(timeout)

    def done(self, kind: str) -> None:
        """A worker finished what `take` gave it."""
        with self._cond:
            if kind == "control":
                self._in_control = False
            elif kind == "jobs":
                self._busy -= 1
            self._cond.notify_all()


def _to_gpu(index, device: torch.device):
    """Move a CPU FAISS index to the model's GPU when this FAISS build can; else keep it."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index, None
    try:
        resources = faiss.StandardGpuResources()  # must outlive the GPU index: kept beside it
        return faiss.index_cpu_to_gpu(resources, device.index or 0, index), resources
    except Exception:  # index type without a GPU implementation: search on the CPU
        log.warning("FAISS index stays on the CPU (no GPU version of %s)", type(index).__name__)
        return index, None


SEARCH_BLAS_MIN_QUERIES = 4


@functools.cache
def _blas_threshold_counts_elements() -> bool:
    """Older faiss compares the number of queries with distance_compute_blas_threshold (default
    20), newer faiss the query matrix's elements, queries x dimension (default 128,000). Read
    once, before this module changes it."""
    import faiss

    return faiss.cvar.distance_compute_blas_threshold > 1000


def search_blas_threshold(dim: int) -> int:
    """faiss's threshold (process-wide) for a flat search of SEARCH_BLAS_MIN_QUERIES or more
    queries to be one BLAS product over the stored vectors instead of a scan of them per query.
    A micro-batch searched by one thread is where that pays: 2.2x less CPU per query at 8
    queries and 10k vectors; a single query stays a scan (bench/RESULTS.md)."""
    return SEARCH_BLAS_MIN_QUERIES * (dim if _blas_threshold_counts_elements() else 1)


def encode_uint8(net, images: torch.Tensor, device: torch.device, max_batch_size: int) -> np.ndarray:
    """uint8 images [n, 3, H, W] -> unit ground descriptors, at most ``max_batch_size`` per
    forward; normalising the whole micro-batch at once costs a fraction of doing it per image."""
    n = int(images.shape[0])
    parts = [encode_batch(net, normalize_uint8_nchw(images[i:i + max_batch_size]), "ground", device)
             for i in range(0, n, max_batch_size)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def _run_nicer(nice: int) -> None:
    """Make the calling worker thread ``nice`` steps nicer (Linux applies niceness per thread;
    becoming nicer needs no privilege), so that the event loop gets a core first. Where that is
    refused the worker runs as it is."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError, OverflowError, ValueError) as exc:
        log.warning("encoder worker keeps its scheduling priority (%s)", exc)


def _resolve(future: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _resolve_many(items: list[tuple[asyncio.Future, Any]]) -> None:
    for future, value in items:
        _resolve(future, value)


def _deliver_results(results: list[tuple[Job, Any]]) -> None:
    """Resolve a micro-batch's jobs with one wake-up of each event loop they came from (one loop
    in practice), instead of one per job: each wake-up is a hand-over of the GIL."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
    for job, value in results:
        by_loop.setdefault(job.loop, []).append((job.future, value))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_many, items)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


def _up(encoder: EncoderProcess) -> bool:
    return encoder.serving and encoder.running


def _deliver(job: Job, value: Any = None, error: BaseException | None = None) -> None:
    try:
        job.loop.call_soon_threadsafe(_resolve, job.future, value, error)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        pass


def _fail(jobs: list[Job], error: BaseException) -> None:
    """A micro-batch that could not be computed: every job gets ``error``."""
    for job in jobs:
        _deliver(job, error=error)


class Engine:
    """Owns the worker threads (and their encoder processes); the async side only enqueues jobs
    and awaits futures."""

    def __init__(self, *, metrics: Metrics, max_batch_size: int, max_batch_wait_ms: float,
                 queue_size: int, request_timeout_s: float, workers: int = 1,
                 threads_per_worker: int | None = None,
                 cpu_sets: list[set[int]] | None = None, worker_nice: int = 0,
                 processes: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if cpu_sets is not None and len(cpu_sets) != workers:
            raise ValueError(f"{len(cpu_sets)} CPU sets for {workers} workers")
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.cpu_sets = cpu_sets
        self.worker_nice = worker_nice
        self.processes = processes
        self._encoders: list[EncoderProcess] = []
        # index generations an encoder process may be asked to search (current + one being
        # swapped in): what a restarted process must load
        self._generations: dict[int, LoadedIndex] = {}
        self._generations_lock = threading.Lock()
        # a child silent for this long is hung, and killed: well beyond any batch's time
        self.reply_timeout_s = max(120.0, 4 * request_timeout_s)
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_batch_wait_ms / 1000.0
        self.request_timeout_s = request_timeout_s
        self.queue = JobQueue(queue_size)
        self.model: LoadedModel | None = None
        self.current: LoadedIndex | None = None
        self._threads: list[threading.Thread] = []
        self._generation = 0
        self._startup_error: BaseException | None = None
        metrics.queue_capacity.set(queue_size)

    # --- lifecycle (called from the loader thread / lifespan) ----------------------------
    def start(self, model: LoadedModel, index: LoadedIndex) -> None:
        """Take ownership of model and index and start the workers (blocks until warmed up)."""
        import faiss

        self.model = model
        # process-wide, so once here rather than in each worker
        faiss.cvar.distance_compute_blas_threshold = search_blas_threshold(model.embedding_dim)
        if self.processes:
            self._start_encoders(model, index)
            self._serve(index)
            index = None
        for i in range(self.workers):
            started = threading.Event()
            thread = threading.Thread(target=self._run, args=(i, index if i == 0 else None, started),
                                      name=f"geoloc-worker-{i}", daemon=True)
            thread.start()
            started.wait()
            if self._startup_error is not None:
                raise self._startup_error
            self._threads.append(thread)

    def _start_encoders(self, model: LoadedModel, index: LoadedIndex) -> None:
        """Start an encoder process per worker, side by side, with ``index`` installed."""
        for i in range(self.workers):
            spec = ProcessSpec(
                checkpoint=str(model.checkpoint), fingerprint=model.fingerprint,
                threads=self.threads_per_worker,
                cpu_set=frozenset(self.cpu_sets[i]) if self.cpu_sets is not None else None,
                nice=self.worker_nice, max_batch_size=self.max_batch_size)
            self._encoders.append(EncoderProcess(spec, f"encoder process {i}",
                                                 reply_timeout_s=self.reply_timeout_s))
        try:
            for encoder in self._encoders:
                encoder.launch()
            for encoder in self._encoders:
                encoder.wait_ready()
            self._install_in_processes(index)
        except BaseException:
            for encoder in self._encoders:
                encoder.stop()
            raise
        for encoder in self._encoders:
            encoder.serving = True

    @property
    def encoder_pids(self) -> list[int | None]:
        """Process ids of the encoder processes (empty when the workers compute in threads)."""
        return [encoder.pid for encoder in self._encoders]

    @property
    def running(self) -> bool:
        """Serving: a worker alive, an index in place and (with processes) one of them up."""
        return (any(t.is_alive() for t in self._threads) and self.current is not None
                and (not self._encoders or any(e.probably_up for e in self._encoders)))

    def stop(self, timeout: float = 10.0) -> None:
        for job in self.queue.close():
            self.metrics.dropped.labels("shutdown").inc(job.n)
            _deliver(job, error=NotReady("shutting down"))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for encoder in self._encoders:
            if any(t.is_alive() for t in self._threads):
                encoder.kill()  # a worker still in a batch: do not wait for it
            encoder.close()
        self.metrics.queue_depth.set(0)

    def swap(self, new: LoadedIndex) -> concurrent.futures.Future:
        """Serve ``new`` from the next batch on; the future resolves to the old index. With
        encoder processes, each loads ``new`` first (blocking, while batches go on); then every
        worker is held for a moment while ``current`` changes; then they drop the old one."""
        if not self._encoders:
            return self.queue.control(lambda: self._install(new))
        self._install_in_processes(new)
        done: concurrent.futures.Future = concurrent.futures.Future()
        flip = self.queue.control(lambda: self._serve(new))
        try:
            old = flip.result(timeout=SWAP_TIMEOUT_S)
        except BaseException as exc:
            if self._forget(new):  # abandoned: the flip, should it still run, refuses it
                done.set_exception(exc)
                return done
            old = flip.result()  # it was served meanwhile after all
        self._forget(old)
        done.set_result(old)
        return done

    def _install_in_processes(self, new: LoadedIndex) -> None:
        """Give ``new`` a generation and load it in every running encoder process, side by side.
        A process that is down (or dies meanwhile) is skipped: its restart installs every
        generation registered here. Raises, with nothing left behind, if a process refuses it."""
        with self._generations_lock:
            self._generation += 1
            new.generation = self._generation
            self._generations[new.generation] = new

        def install(encoder: EncoderProcess) -> None:
            if not encoder.running:
                return
            try:
                encoder.control("install", new.generation, str(new.path), new.signature)
            except EncoderProcessDied as exc:
                log.warning("%s; it loads the new index when it is restarted", exc)

        with concurrent.futures.ThreadPoolExecutor(len(self._encoders)) as pool:
            outcomes = [pool.submit(install, encoder) for encoder in self._encoders]
        errors = [f.exception() for f in outcomes if f.exception() is not None]
        if errors:
            self._forget(new)
            raise errors[0]

    def _serve(self, new: LoadedIndex) -> LoadedIndex | None:
        """Make ``new`` (installed in the processes) the index of the next batch; returns the old
        one. A control command: no batch is in flight."""
        with self._generations_lock:
            if new.generation not in self._generations:
                raise RuntimeError(f"index generation {new.generation} was abandoned (swap timed out)")
            old = self.current
            self.current = new
        new.index = None  # the encoder processes search their own copies
        self.metrics.set_index(new.info())
        return old

    def _forget(self, index: LoadedIndex | None) -> bool:
        """Drop a generation nobody will search again from the registry and from the processes
        (best effort: a process that fails to drop it keeps some memory, nothing else). False if
        it is the one being served."""
        if index is None:
            return True
        with self._generations_lock:
            if index is self.current:
                return False
            self._generations.pop(index.generation, None)
        for encoder in self._encoders:
            if encoder.running:
                try:
                    encoder.control("drop", index.generation)
                except Exception as exc:
                    log.warning("%s could not drop index generation %d: %s", encoder.name,
                                index.generation, exc)
        return True

    def call_in_worker(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on a worker thread while no batch is in flight; every worker waits for it
        (tests use it to hold the engine)."""
        return self.queue.control(fn)

    # --- async API ------------------------------------------------------------------------
    async def localize(self, k: int, *, images: torch.Tensor | None = None,
                       decode: Callable[[], torch.Tensor] | None = None, n: int | None = None,
                       decode_ms: float = 0.0, request_id: str | None = None,
                       disconnected: Callable[[], Awaitable[Any]] | None = None,
                       expected: bool = False) -> JobResult:
        """Queue one job and wait for it: ``images`` (decoded, in ``decode_ms``), or ``n`` images
        that the worker makes with ``decode``. ``expected``: the caller announced it
        (queue.expect)."""
        if (images is None) == (decode is None) or (decode is not None and not n):
            raise ValueError("give either images, or decode and n")
        if not self.running:
            if expected:
                self.queue.unexpect()
            raise NotReady("model and index are not loaded")
        loop = asyncio.get_running_loop()
        job = Job(n=int(images.shape[0]) if images is not None else int(n),  # type: ignore[arg-type]
                  k=k, loop=loop, future=loop.create_future(), images=images, decode=decode,
                  decode_ms=decode_ms, request_id=request_id)
        if not self.queue.offer(job, expected):
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(f"queue full ({self.queue.capacity} images waiting)")
        self.metrics.queue_depth.set(self.queue.depth)

        def give_up(reason: str, error: Callable[[], Exception]) -> None:
            if not job.future.done():
                job.dropped = reason
                job.future.set_exception(error())

        timer = loop.call_later(self.request_timeout_s, give_up, "timeout", lambda: ResultTimeout(
            f"no result within {self.request_timeout_s:g} s"))
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        if watcher is not None:
            watcher.add_done_callback(lambda w: w.cancelled() or give_up(
                "client_disconnected",
                lambda: ClientGone("client disconnected before its result was computed")))
        try:
            return await job.future
        except asyncio.CancelledError:
            job.dropped = job.dropped or "client_disconnected"
            raise
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    # --- worker thread --------------------------------------------------------------------
    def _install(self, new: LoadedIndex) -> LoadedIndex | None:
        """Serve ``new`` from the next batch on (runs on the worker thread only)."""
        if self.model is not None and self.model.device.type == "cuda":
            new.index, new.gpu_resources = _to_gpu(new.index, self.model.device)
        old = self.current
        self._generation += 1
        new.generation = self._generation
        self.current = new
        self.metrics.set_index(new.info())
        return old

    def _run(self, worker: int, first: LoadedIndex | None, started: threading.Event) -> None:
        encoder = self._encoders[worker] if self._encoders else None
        try:
            if encoder is None:  # (an encoder process pins itself and sets its own threads)
                self._prepare_thread(worker)
            if first is not None:
                self._install(first)
        except BaseException as exc:
            self._startup_error = exc
            self.current = None
            return
        finally:
            started.set()
        while True:
            if encoder is not None and not _up(encoder) and not self._revive(encoder):
                return  # shutting down
            # with a process, look at it now and then: one that died idle is started again
            # without waiting for a request (which would find the service not ready)
            kind, items = self.queue.take(self.max_batch_size, self.max_wait_s,
                                          IDLE_CHECK_S if encoder is not None else None)
            self.metrics.queue_depth.set(self.queue.depth)
            if kind == "closed":
                return
            if kind == "idle":
                continue
            try:
                if kind == "control":
                    for fn, fut in items:
                        try:
                            fut.set_result(fn())
                        except BaseException as exc:  # reported to whoever asked
                            fut.set_exception(exc)
                    continue
                live = []
                for job in items:
                    if job.dropped:
                        self.metrics.dropped.labels(job.dropped).inc(job.n)
                    elif encoder is not None or self._decode(job):
                        live.append(job)
                if live and encoder is not None:
                    self._compute_in(encoder, live)
                elif live:
                    self._compute(live)
            finally:
                self.queue.done(kind)

    def _prepare_thread(self, worker: int) -> None:
        """A worker that computes on its own thread: its cores, priority and threads; warm-up."""
        if self.cpu_sets is not None:  # before torch starts this thread's OpenMP team
            os.sched_setaffinity(0, self.cpu_sets[worker])
        if self.worker_nice:
            _run_nicer(self.worker_nice)
        # torch's OpenMP thread count is per thread: each worker sets its own share.
        if self.threads_per_worker:
            torch.set_num_threads(self.threads_per_worker)
        # faiss-cpu ships its own OpenMP runtime beside torch's: after every search its
        # threads would spin on the cores the next forward needs. A micro-batch search is
        # small; one thread does it without fighting the encoder.
        import faiss

        faiss.omp_set_num_threads(1)
        self._warm_up()

    def _decode(self, job: Job) -> bool:
        """Make the job's images with its decode function, if it came without them; False: its
        error is delivered."""
        if job.images is not None:
            return True
        assert job.decode is not None
        started = time.perf_counter()
        try:
            job.images = job.decode()
        except Exception as exc:  # a bad upload fails its own job, not the batch
            _deliver(job, error=exc)
            return False
        finally:
            job.decode_ms = (time.perf_counter() - started) * 1000.0
        return True

    def _encode(self, images: torch.Tensor) -> np.ndarray:
        model = self.model
        assert model is not None
        return encode_uint8(model.net, images, model.device, self.max_batch_size)

    def _warm_up(self) -> None:
        model = self.model
        assert model is not None
        h, w = model.config.ground_size
        self._encode(torch.zeros(1, 3, h, w, dtype=torch.uint8))

    def _compute(self, jobs: list[Job]) -> None:
        index = self.current
        assert index is not None
        started = time.perf_counter()
        try:
            images = jobs[0].images if len(jobs) == 1 else torch.cat([j.images for j in jobs])
            assert images is not None
            vectors = self._encode(images)
            encoded = time.perf_counter()
            k = min(max(j.k for j in jobs), index.count)
            scores, rows = index.index.search(vectors, k)
            searched = time.perf_counter()
        except Exception as exc:
            log.exception("inference failed for a batch of %d job(s)", len(jobs))
            _fail(jobs, exc)
            return
        self._finish(jobs, index, scores, rows, started, (encoded - started) * 1000.0,
                     (searched - encoded) * 1000.0)

    def _restart(self, encoder: EncoderProcess) -> None:
        """Start ``encoder``'s process again with every index generation that may be searched;
        raises if it can not."""
        with encoder.lock:  # a swap's install waits for this, then finds the generation there
            if self.queue.closed:
                raise NotReady("shutting down")
            encoder.stop()
            try:
                encoder.start()
                with self._generations_lock:
                    indexes = list(self._generations.values())
                for index in indexes:
                    encoder.control("install", index.generation, str(index.path), index.signature)
            except BaseException:
                encoder.stop()  # never a running process without the indexes it may be asked for
                raise
            encoder.serving = True
        self.metrics.encoder_restarts.inc()
        log.warning("%s restarted (pid %s)", encoder.name, encoder.pid)

    def _revive(self, encoder: EncoderProcess) -> bool:
        """Restart a dead encoder process, retrying with a growing pause (the other workers serve
        meanwhile); False once the engine shuts down."""
        pause = 1.0
        while not self.queue.closed:
            try:
                self._restart(encoder)
                return True
            except NotReady:
                return False
            except Exception as exc:
                log.error("%s could not be restarted (%s); next try in %g s", encoder.name,
                          exc, pause)
                self.queue.wait_closed(pause)
                pause = min(30.0, pause * 2)
        return False

    def _compute_in(self, encoder: EncoderProcess, jobs: list[Job]) -> None:
        """The micro-batch decoded, encoded and searched by ``encoder``'s process. A process that
        died is started again (its batch fails with EncoderProcessDied: 503, retry)."""
        index = self.current
        assert index is not None
        if not _up(encoder):  # died since its last batch
            try:
                self._restart(encoder)
            except Exception as exc:
                _fail(jobs, EncoderProcessDied(f"{encoder.name} is down: {exc}"))
                return  # the worker loop retries the restart before it takes more work
        started = time.perf_counter()
        # numpy, not tensors: pickling a tensor for another process would share its storage
        # through torch.multiprocessing's file descriptors, which our child does not speak
        payloads = [(job.images.numpy(), None) if job.images is not None else (None, job.decode)
                    for job in jobs]
        try:
            outcome = encoder.request("batch", index.generation, max(j.k for j in jobs), payloads)
        except EncoderProcessDied as exc:
            log.error("%s; failing its batch of %d job(s); it is restarted", exc, len(jobs))
            _fail(jobs, exc)
            return  # the worker loop restarts it before it takes more work
        except Exception as exc:
            log.exception("inference failed for a batch of %d job(s)", len(jobs))
            _fail(jobs, exc)
            return
        live = []
        for job, error, decode_ms in zip(jobs, outcome.errors, outcome.decode_ms):
            if job.images is None:  # decoded there (else: decoded here, its time already set)
                job.decode_ms = decode_ms
            if error is not None:
                _deliver(job, error=error)
            else:
                live.append(job)
        if live:  # as on a worker thread: the forward starts once the batch is decoded
            self._finish(live, index, outcome.scores, outcome.rows,
                         started + sum(outcome.decode_ms) / 1000.0, outcome.encode_ms,
                         outcome.search_ms)

    def _finish(self, jobs: list[Job], index: LoadedIndex, scores: np.ndarray, rows: np.ndarray,
                started: float, encode_ms: float, search_ms: float) -> None:
        """Count the micro-batch and hand each job its rows of the search."""
        n = int(scores.shape[0])
        self.metrics.batch_size.observe(n)
        self.metrics.images.inc(n)
        for _ in range(n):
            self.metrics.stage["encode"].observe(encode_ms / 1000.0)
            self.metrics.stage["search"].observe(search_ms / 1000.0)
        offset = 0
        results: list[tuple[Job, JobResult]] = []
        for job in jobs:
            per_image = []
            for i in range(offset, offset + job.n):
                matches = []
                for score, row in zip(scores[i, : job.k], rows[i, : job.k]):
                    if row < 0:
                        continue
                    row = int(row)
                    matches.append((index.tile_ids[row], float(index.lat[row]),
                                    float(index.lon[row]), float(score)))
                per_image.append(matches)
            offset += job.n
            # from the queue to the forward, less its own decoding (its own timing field)
            own_decode = job.decode_ms if job.decode is not None else 0.0
            queue_ms = (started - job.enqueued) * 1000.0 - own_decode
            results.append((job, JobResult(per_image, index, queue_ms, encode_ms, search_ms, n,
                                           job.decode_ms)))
        _deliver_results(results)

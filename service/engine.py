"""The batching engine, in the manner of Triton's dynamic batcher or Ray Serve's ``@serve.batch``.

A request becomes a *job*: one or more uploaded images and how to decode them. Jobs wait in a
bounded queue counted in images; when it is full a request is refused at once (503). Each of N
executor threads takes what is queued, up to ``max_batch_size`` images (waiting at most
``max_batch_wait_ms`` for more to join the oldest), decodes it, runs ONE ground-branch forward (one per
sub-column phase the views are encoded at, against an index stored at phases) and ONE FAISS search for the
whole micro-batch, and hands every job its rows. Thread 0 takes work
first; the others take what it leaves while it computes. A one-image batch that thread 0 takes
while nothing else is queued or computing runs *wide*, with ``lone_threads`` torch threads (the
others wait for it): a lone request gets the whole CPU, a loaded service splits it into lanes
(bench/RESULTS.md, "Service load": c=1 about 4 ms faster, c=16 unchanged). A job that arrives during
a wide batch had to wait for it: none runs wide for ``wide_cooldown_s`` after that, so a few clients
at a time keep their side-by-side lanes.

The index being served is an immutable ``ServedIndex``: a reload replaces the engine's reference
to it, and a batch reads the reference once, so it is answered from one generation whole while
the next batch already sees the new one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

import numpy as np
import torch

from .artifact import Answer, Near, ServedIndex
from .metrics import Metrics

log = logging.getLogger("service.engine")

WIDE_COOLDOWN_S = 1.0  # after a job waited for a wide batch, none runs wide for this long


class Overloaded(Exception):
    """No room: the queue (or the upload byte budget) is full; answered 503 with Retry-After."""


class NotReady(Exception):
    """Model or index not loaded (yet), or shutting down."""


class ClientGone(Exception):
    """The client disconnected while its job waited; nothing was computed for it."""


class ResultTimeout(Exception):
    """No result within request_timeout_s."""


@dataclass(eq=False)
class Job:
    n: int  # images
    k: int
    # -> ([n, 3, H, W] uint8 at the model's ground size, [n, W] bool: the pixel columns each view covers)
    decode: Callable[[], tuple[torch.Tensor, np.ndarray]]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    abandoned: str | None = None  # why nobody waits for it any more (a metrics label)
    near: list[Near | None] | None = None  # per image: the geographic prior its search is restricted to
    # per image: placed at a given heading, trusted to this many degrees (None: its heading is searched)
    heading_within: list[float | None] | None = None
    photos: list[bool] | None = None  # per image: a phone photo (its columns through the head's photo map)


@dataclass(frozen=True)
class JobResult:
    answers: list[Answer]  # per image
    index: ServedIndex  # the generation that answered
    decode_ms: float
    queue_ms: float  # from queueing to the start of its batch
    encode_ms: float  # the batch's forward
    search_ms: float  # the batch's search
    batch_size: int  # images in the batch


Outcome = tuple[Job, JobResult | BaseException]  # a job and its result, or why it has none


def _settle(outcomes: list[Outcome]) -> None:
    for job, outcome in outcomes:
        if job.future.done():
            continue
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)


class Engine:
    """Bounded job queue + executor threads. ``encode(images, view_phases, photos)`` maps uint8 images to unit
    rows and, when ``view_phases`` > 0 and the model has an orientation head, column features at that many
    sub-column phases (the model's ground branch; 0: none), those of the images flagged in ``photos`` (bool
    [n]) through the head's photo map where it has one: ``view_phases``, or None: the served index's tile
    phases; ``index`` is the ServedIndex searched, replaced by assignment."""

    def __init__(self, encode: Callable[[torch.Tensor, int, np.ndarray], tuple[np.ndarray, np.ndarray | None]],
                 index: ServedIndex, *,
                 metrics: Metrics, workers: int, threads_per_worker: int | None, lone_threads: int | None = None,
                 max_batch_size: int, max_batch_wait_ms: float, queue_size: int,
                 request_timeout_s: float, wide_cooldown_s: float = WIDE_COOLDOWN_S,
                 view_phases: int | None = None) -> None:
        self._encode = encode
        self.view_phases = view_phases
        self.metrics = metrics
        self.index = index
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.lone_threads = lone_threads  # torch threads of a wide batch; None: none runs wide
        self.wide_cooldown_s = wide_cooldown_s
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_batch_wait_ms / 1000.0
        self.capacity = queue_size
        self.request_timeout_s = request_timeout_s
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._paused = 0
        self._busy = 0  # executor threads computing a batch
        self._lead_busy = False  # thread 0 computing: the others take only what it leaves
        self._wide = False  # a lone batch runs on every thread's cores: the others wait for it
        self._narrow_until = 0.0  # perf_counter time before which no batch runs wide
        self._closed = False
        self._threads: list[threading.Thread] = []
        metrics.queue_capacity.set(queue_size)

    @property
    def index(self) -> ServedIndex:
        return self._index

    @index.setter
    def index(self, new: ServedIndex) -> None:
        self._index = new  # one reference assignment: batches read it once each
        self.metrics.set_index(new.info)

    @property
    def depth(self) -> int:
        """Images waiting in the queue."""
        with self._cond:
            return sum(job.n for job in self._jobs)

    def _report_depth(self) -> None:
        # Read and set under the queue's lock: two threads setting it outside could leave a stale depth.
        with self._cond:
            self.metrics.queue_depth.set(self.depth)  # the lock is re-entrant

    @property
    def running(self) -> bool:
        """Open, and thread 0 alive: the other threads take only what it leaves."""
        return not self._closed and bool(self._threads) and self._threads[0].is_alive()

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._run, args=(i == 0,), name=f"geoloc-encoder-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, fail the waiting ones, let the batches in flight finish."""
        with self._cond:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in left:
            self.metrics.dropped.labels("shutdown").inc(job.n)
        self._deliver([(job, NotReady("shutting down")) for job in left])
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.metrics.queue_depth.set(0)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new batch starts while inside (the batches in flight finish): jobs wait in the queue.
        For maintenance and for tests that need requests to meet in one batch."""
        with self._cond:
            self._paused += 1
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    # --- the event loop's side ------------------------------------------------------------
    async def localize(self, decode: Callable[[], tuple[torch.Tensor, np.ndarray]], *, n: int, k: int,
                       disconnected: Callable[[], Awaitable[Any]] | None = None,
                       near: list[Near | None] | None = None,
                       heading_within: list[float | None] | None = None,
                       photos: list[bool] | None = None) -> JobResult:
        """Queue ``n`` images (made by ``decode`` on an executor thread) and wait for their matches."""
        job = Job(n=n, k=k, decode=decode, future=asyncio.get_running_loop().create_future(), near=near,
                  heading_within=heading_within, photos=photos)
        with self._cond:
            if self._closed:
                raise NotReady("shutting down")
            if self.depth + n > self.capacity:
                self.metrics.rejected.labels("queue_full").inc()
                raise Overloaded(f"queue full ({self.capacity} images waiting)")
            self._jobs.append(job)
            if self._wide:  # it waits for a wide batch: others like it are likely to follow
                self._narrow_until = job.enqueued + self.wide_cooldown_s
            self._cond.notify_all()  # thread 0 must hear of it: the others take only what it leaves
        self._report_depth()

        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        if watcher is not None:
            watcher.add_done_callback(lambda w: w.cancelled() or job.future.done() or job.future.set_exception(
                ClientGone("client disconnected before its result was computed")))
        try:
            return await asyncio.wait_for(job.future, self.request_timeout_s)
        except asyncio.TimeoutError:
            self._withdraw(job, "timeout")
            raise ResultTimeout(f"no result within {self.request_timeout_s:g} s") from None
        except (ClientGone, asyncio.CancelledError):
            self._withdraw(job, "client_disconnected")
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    def _withdraw(self, job: Job, reason: str) -> None:
        """Nobody waits for ``job`` any more: still queued, it leaves the queue now (its images and
        upload bytes with it); already taken, its batch skips it unless it is being computed."""
        if job.abandoned:
            return
        job.abandoned = reason
        with self._cond:
            if job not in self._jobs:
                return
            self._jobs.remove(job)
        self.metrics.dropped.labels(reason).inc(job.n)
        self._report_depth()

    # --- executor threads -------------------------------------------------------------------
    def _take(self, lead: bool) -> tuple[list[Job], bool] | None:
        """The next micro-batch and whether it runs wide (alone, on all the cores), or None once the
        engine stops."""
        with self._cond:
            while not self._closed and (self._paused or self._wide or not self._jobs
                                        or (not lead and not self._lead_busy)):
                self._cond.wait()
            if self._closed:
                return None
            deadline = self._jobs[0].enqueued + self.max_wait_s
            batch: list[Job] = []
            images = 0
            while True:
                while self._jobs and (not batch or images + self._jobs[0].n <= self.max_batch_size):
                    job = self._jobs.popleft()
                    batch.append(job)
                    images += job.n
                remaining = deadline - time.perf_counter()
                if images >= self.max_batch_size or self._jobs or self._closed or remaining <= 0:
                    self._wide = (lead and images == 1 and self.lone_threads is not None and self._busy == 0
                                  and not self._jobs and time.perf_counter() >= self._narrow_until)
                    self._busy += 1
                    if lead:
                        self._lead_busy = True
                        if self._jobs:
                            self._cond.notify_all()  # what thread 0 left is the others' now
                    return batch, self._wide
                self._cond.wait(remaining)

    def _run(self, lead: bool) -> None:
        own = self.threads_per_worker or torch.get_num_threads()
        threads = None
        while (taken := self._take(lead)) is not None:
            jobs, wide = taken
            outcomes: list[Outcome] = []
            try:
                want = self.lone_threads if wide else own
                if want != threads:
                    torch.set_num_threads(want)  # per thread: its share of the cores, or all of them alone
                    threads = want
                self._report_depth()
                outcomes = self._compute(jobs)
            except Exception as exc:  # never lose a worker; its jobs get the error
                log.exception("inference failed for a batch of %d job(s)", len(jobs))
                outcomes = [(job, exc) for job in jobs]
            finally:
                if wide:
                    with self._cond:  # before its answers go out: a client's next request does not wait for it
                        self._wide = False
                try:
                    self._deliver(outcomes)
                finally:
                    with self._cond:
                        self._busy -= 1
                        self._lead_busy = self._lead_busy and not lead
                        self._cond.notify_all()

    def view_phases_for(self, index: ServedIndex) -> int:
        """The sub-column phases a view is encoded at against ``index``, one forward each: 0 without its column
        features, else ``view_phases`` or the index's tile phases."""
        return 0 if index.orientation is None else self.view_phases or index.tile_phases

    def _compute(self, jobs: list[Job]) -> list[Outcome]:
        """Decode, encode and search a micro-batch; its jobs' outcomes (a job whose upload fails to
        decode is answered at once)."""
        index = self.index  # read once: the whole batch is answered by this generation
        started = time.perf_counter()
        live, images, seen, failed, decode_ms = [], [], [], [], {}
        for job in jobs:
            if job.abandoned:
                self.metrics.dropped.labels(job.abandoned).inc(job.n)
                continue
            t0 = time.perf_counter()
            try:
                job_images, job_seen = job.decode()
                images.append(job_images)
                seen.append(job_seen)
                live.append(job)
            except Exception as exc:  # a bad upload fails its own job, not the batch
                failed.append((job, exc))
            decode_ms[job] = (time.perf_counter() - t0) * 1000.0
        self._deliver(failed)
        if not live:
            return []
        t0 = time.perf_counter()
        # column features only for an index that holds its own to align them with (2-4% of a forward), the
        # views encoded at its tiles' sub-column phases unless told (one forward each: view_phase_scores)
        photos = np.array([p for job in live for p in (job.photos or [False] * job.n)], dtype=bool)
        vectors, columns = self._encode(images[0] if len(images) == 1 else torch.cat(images),
                                        self.view_phases_for(index), photos)
        t1 = time.perf_counter()
        near = [prior for job in live for prior in (job.near or [None] * job.n)]
        ks = [job.k for job in live for _ in range(job.n)]
        within = [given for job in live for given in (job.heading_within or [None] * job.n)]
        answers = index.answer(vectors, columns, np.concatenate(seen), ks, near, within)
        t2 = time.perf_counter()
        n = len(answers)
        encode_ms, search_ms = (t1 - t0) * 1000.0, (t2 - t1) * 1000.0
        self.metrics.observe_batch(n, encode_ms / 1000.0, search_ms / 1000.0)
        outcomes, row = [], 0
        for job in live:
            mine, row = answers[row:row + job.n], row + job.n
            error = next((a for a in mine if isinstance(a, Exception)), None)  # an image's error: its job's alone
            outcomes.append((job, error if error is not None else JobResult(
                mine, index, decode_ms[job], (started - job.enqueued) * 1000.0, encode_ms, search_ms, n)))
        return outcomes

    @staticmethod
    def _deliver(outcomes: list[Outcome]) -> None:
        """Settle jobs' futures with one call into the event loop they came from (the app's one loop)."""
        if outcomes:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
                outcomes[0][0].future.get_loop().call_soon_threadsafe(_settle, outcomes)

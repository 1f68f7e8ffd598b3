"""An encoder worker's model and index in a child process of its own (the CPU default).

In one process the HTTP event loop and the encoder workers share one interpreter lock: every
time the event loop runs Python, a worker that has finished a forward waits for it before it can
search, and the other way round (bench/RESULTS.md: workers blocked ~8% of their time). Here each
worker thread of the engine keeps its place in the micro-batching (it takes jobs from the queue
and delivers results), but hands the decoding, forward and search of each micro-batch to a child
process with its own interpreter, model and copy of the index, pinned to the worker's cores.

The parent talks to a child over a socket pair with ``multiprocessing.connection`` messages:
``(command, *args)`` in, ``("ok", value)`` or ``("error", exception)`` out, one at a time. The
child is started as ``python -m service.encoder_process FD`` (not forked: the parent's torch and
OpenMP thread pools must not be copied mid-flight) and loads the checkpoint itself; its model's
fingerprint must equal the parent's. An index is installed in every child, under its generation
number, before the parent serves it; each batch names the generation it is searched in.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("service.engine")

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


class EncoderProcessDied(RuntimeError):
    """The child process ended (killed, out of memory, crashed) while it had work."""


class RemoteError(RuntimeError):
    """An error raised in the child whose own exception type could not be sent back."""


@dataclass(frozen=True)
class ProcessSpec:
    """What a child needs to become an encoder worker (sent as its first message)."""

    checkpoint: str
    fingerprint: str
    threads: int | None
    cpu_set: frozenset[int] | None
    nice: int
    max_batch_size: int
    # a batch computed while every other worker is idle ("solo") may use all the workers' CPUs
    solo_threads: int | None = None
    solo_cpus: frozenset[int] | None = None


@dataclass
class BatchOutcome:
    """A micro-batch computed by a child. ``errors[i]``: job i failed to decode (it has no rows)."""

    scores: Any  # np.ndarray [images, k]
    rows: Any  # np.ndarray [images, k]
    errors: list[BaseException | None]
    decode_ms: list[float]
    encode_ms: float
    search_ms: float


def _sendable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RemoteError(f"{type(exc).__name__}: {exc}")


# --- the child --------------------------------------------------------------------------------

class _Worker:
    """The child's state: model, indexes by generation; one method per command."""

    def __init__(self, spec: ProcessSpec) -> None:
        if spec.solo_cpus is not None:  # the OpenMP team starts (below) on all of them...
            os.sched_setaffinity(0, spec.solo_cpus)
        if spec.nice:
            os.nice(spec.nice)
        import faiss
        import torch

        from model import load_checkpoint
        from model.encode import prepare_for_inference

        from .engine import search_blas_threshold

        faiss.omp_set_num_threads(1)  # see Engine._run: a micro-batch search is one thread's work
        self.spec = spec
        self.device = torch.device("cpu")
        self.net = prepare_for_inference(load_checkpoint(Path(spec.checkpoint)), self.device)
        if self.net.fingerprint() != spec.fingerprint:
            raise RuntimeError(f"{spec.checkpoint} changed on disk: fingerprint "
                               f"{self.net.fingerprint()}, the service loaded {spec.fingerprint}")
        faiss.cvar.distance_compute_blas_threshold = search_blas_threshold(int(self.net.embedding_dim))
        self.indexes: dict[int, Any] = {}
        h, w = self.net.config.ground_size
        warm_up = torch.zeros(1, 3, h, w, dtype=torch.uint8)
        if spec.solo_threads:
            torch.set_num_threads(spec.solo_threads)
            self.encode(warm_up)
        self._alone(False)  # ...while this thread works on its own CPUs outside solo batches
        self.encode(warm_up)

    def _alone(self, solo: bool) -> None:
        """Use every worker's CPUs (solo) or only this worker's share."""
        import torch

        spec = self.spec
        if solo and spec.solo_threads:
            if spec.solo_cpus is not None:
                os.sched_setaffinity(0, spec.solo_cpus)
            torch.set_num_threads(spec.solo_threads)
            return
        if spec.cpu_set is not None:
            os.sched_setaffinity(0, spec.cpu_set)
        if spec.threads:
            torch.set_num_threads(spec.threads)

    def encode(self, images):
        from .engine import encode_uint8

        return encode_uint8(self.net, images, self.device, self.spec.max_batch_size)

    def install(self, generation: int, directory: str, signature) -> None:
        from .artifact import ArtifactChanged, load_artifact

        loaded = load_artifact(Path(directory), expected_fingerprint=self.spec.fingerprint,
                               embedding_dim=int(self.net.embedding_dim))
        if loaded.signature != signature:
            raise ArtifactChanged(f"{directory}: artifact replaced while the encoder processes loaded it")
        self.indexes[generation] = loaded.index

    def drop(self, generation: int) -> None:
        self.indexes.pop(generation, None)

    def batch(self, generation: int, k: int, payloads: list, solo: bool = False) -> BatchOutcome:
        import numpy as np
        import torch

        errors: list[BaseException | None] = []
        decode_ms: list[float] = []
        tensors = []
        for images, decode in payloads:
            started = time.perf_counter()
            try:
                tensors.append(decode() if images is None else torch.from_numpy(images))
                errors.append(None)
            except Exception as exc:  # a bad upload fails its own job, not the batch
                errors.append(_sendable(exc))
            decode_ms.append((time.perf_counter() - started) * 1000.0)
        if not tensors:
            empty = np.zeros((0, k))
            return BatchOutcome(empty, empty, errors, decode_ms, 0.0, 0.0)
        started = time.perf_counter()
        images = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        if solo:
            self._alone(True)
            try:
                vectors = self.encode(images)
            finally:
                self._alone(False)
        else:
            vectors = self.encode(images)
        encoded = time.perf_counter()
        index = self.indexes[generation]
        scores, rows = index.search(vectors, min(k, index.ntotal))
        searched = time.perf_counter()
        return BatchOutcome(scores, rows, errors, decode_ms, (encoded - started) * 1000.0,
                            (searched - encoded) * 1000.0)

    def placement(self) -> dict[str, tuple[list[int], int]]:
        """(CPUs, torch threads) for an ordinary and for a solo batch, as this process sets them."""
        import torch

        seen = {}
        for mode, solo in (("solo", True), ("batch", False)):
            self._alone(solo)
            seen[mode] = (sorted(os.sched_getaffinity(0)), torch.get_num_threads())
        return seen


def serve(conn: Connection) -> None:
    """The child's loop: the first message is the ProcessSpec, then commands until "stop" or EOF
    (the parent went away, however it ended)."""
    # Ctrl-C in a terminal reaches the whole process group: the parent shuts down in order and
    # stops us; dying first would fail the requests it is still finishing
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            worker = _Worker(conn.recv())
        except BaseException as exc:
            conn.send(("error", _sendable(exc)))
            return
        conn.send(("ok", os.getpid()))
        while True:
            command, *args = conn.recv()
            if command == "stop":
                conn.send(("ok", None))
                return
            try:
                reply = ("ok", getattr(worker, command)(*args))
            except Exception as exc:
                reply = ("error", _sendable(exc))
            conn.send(reply)
    except (EOFError, OSError):  # the parent closed its end or died
        return


# --- the parent -------------------------------------------------------------------------------

class EncoderProcess:
    """The parent's handle on one child; used by one engine worker thread at a time."""

    def __init__(self, spec: ProcessSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._conn is not None and self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the child and wait until its model is loaded and warmed up."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the child process (returns at once; several children load side by side)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "service.encoder_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())

    def wait_ready(self) -> None:
        """Send the spec; returns when the child has loaded and warmed up its model."""
        self.request("spec", self.spec, raw=True)

    def request(self, command: str, *args: Any, raw: bool = False) -> Any:
        """Send one command and wait for its answer; the child's exception is raised here."""
        conn = self._conn
        if conn is None:
            raise EncoderProcessDied(f"{self.name} is not running")
        try:
            conn.send(args[0] if raw else (command, *args))
            status, value = conn.recv()
        except (EOFError, OSError) as exc:
            code = self._proc.poll() if self._proc is not None else None
            self._close()
            raise EncoderProcessDied(f"{self.name} ended (exit status {code}) during {command!r}") from exc
        if status == "error":
            raise value
        return value

    def stop(self, timeout: float = 5.0) -> None:
        if self._conn is not None:
            try:
                self.request("stop")
            except Exception:
                pass
        self._close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


if __name__ == "__main__":
    # through the package's module, so that what the child pickles names service.encoder_process
    from service.encoder_process import serve as _serve

    _serve(Connection(int(sys.argv[1])))

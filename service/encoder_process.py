"""An encoder worker's model and index in a child process of its own (the CPU default).

In one process the HTTP event loop and the encoder workers share one interpreter lock: every
time the event loop runs Python, a worker that has finished a forward waits for it before it can
search, and the other way round (bench/RESULTS.md: workers blocked ~8% of their time). Here each
worker thread of the engine keeps its place in the micro-batching (it takes jobs from the queue
and delivers results), but hands the decoding, forward and search of each micro-batch to a child
process with its own interpreter, model and copy of the index, pinned to the worker's cores.

The parent talks to a child over two socket pairs with ``multiprocessing.connection`` messages,
``(command, *args)`` in, ``("ok", value)`` or ``("error", exception)`` out, one at a time on each:
the *batch* channel belongs to the engine's worker thread (batches; the child's main thread), the
*control* channel to whoever installs or drops an index (a thread of its own in the child, so that
a new index loads while batches go on). The child is started as ``python -m
service.encoder_process BATCH_FD CONTROL_FD`` (not forked: the parent's torch and OpenMP thread
pools must not be copied mid-flight) and loads the checkpoint itself; its model's fingerprint must
equal the parent's. Every index generation the service may search is installed in every child
before a batch names it. The child ends when told to, or when the parent's ends of the sockets
close (the parent ended, however); it ignores SIGINT and SIGTERM sent to the whole process group,
so the parent can finish its in-flight requests first.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger("service.engine")

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
START_TIMEOUT_S = 900.0  # loading and warming up a model; a large one from a slow disk too
ALIVE_RECHECK_S = 0.05  # see EncoderProcess.probably_up


class EncoderProcessDied(RuntimeError):
    """The child process ended (killed, out of memory, crashed, or hung and killed) with work."""


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
        if spec.cpu_set is not None:  # before torch starts this process's OpenMP team
            os.sched_setaffinity(0, spec.cpu_set)
        if spec.nice:
            os.nice(spec.nice)
        import faiss
        import torch

        from model import load_checkpoint
        from model.encode import prepare_for_inference

        # jobs' decode functions live in localize: imported now, not while the first batch unpickles
        from . import localize  # noqa: F401
        from .engine import encode_uint8, search_blas_threshold

        if spec.threads:
            torch.set_num_threads(spec.threads)
        faiss.omp_set_num_threads(1)  # see Engine._prepare_thread: one thread searches a micro-batch
        self.spec = spec
        self.device = torch.device("cpu")
        self.net = prepare_for_inference(load_checkpoint(Path(spec.checkpoint)), self.device)
        if self.net.fingerprint() != spec.fingerprint:
            raise RuntimeError(f"{spec.checkpoint} changed on disk: fingerprint "
                               f"{self.net.fingerprint()}, the service loaded {spec.fingerprint}")
        faiss.cvar.distance_compute_blas_threshold = search_blas_threshold(int(self.net.embedding_dim))
        self._encode_uint8 = encode_uint8
        self.indexes: dict[int, Any] = {}
        h, w = self.net.config.ground_size
        self.encode(torch.zeros(1, 3, h, w, dtype=torch.uint8))  # warm-up

    def encode(self, images):
        return self._encode_uint8(self.net, images, self.device, self.spec.max_batch_size)

    def install(self, generation: int, directory: str, signature) -> None:
        """Load an index generation (on the control thread, beside the batches)."""
        from .artifact import load_search_index

        if generation in self.indexes:
            return
        self.indexes[generation] = load_search_index(
            Path(directory), expected_signature=signature,
            expected_fingerprint=self.spec.fingerprint, embedding_dim=int(self.net.embedding_dim))

    def drop(self, generation: int) -> None:
        self.indexes.pop(generation, None)

    def held(self) -> list[int]:
        """The index generations this process holds."""
        return sorted(self.indexes)

    def batch(self, generation: int, k: int, payloads: list) -> BatchOutcome:
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
        vectors = self.encode(images)
        encoded = time.perf_counter()
        index = self.indexes[generation]
        scores, rows = index.search(vectors, min(k, index.ntotal))
        searched = time.perf_counter()
        return BatchOutcome(scores, rows, errors, decode_ms, (encoded - started) * 1000.0,
                            (searched - encoded) * 1000.0)

    @staticmethod
    def placement() -> tuple[list[int], int]:
        """(CPUs, torch threads) of the thread that runs the batches."""
        import torch

        return sorted(os.sched_getaffinity(0)), torch.get_num_threads()


def _answer(conn: Connection, worker: _Worker, command: str, args: list) -> None:
    try:
        reply = ("ok", getattr(worker, command)(*args))
    except Exception as exc:
        reply = ("error", _sendable(exc))
    conn.send(reply)


def _serve_control(conn: Connection, worker: _Worker) -> None:
    """The control thread: install/drop index generations; "stop" ends the process at once."""
    try:
        while True:
            command, *args = conn.recv()
            if command == "stop":
                conn.send(("ok", None))
                break
            if command not in ("install", "drop", "held"):
                conn.send(("error", ValueError(f"{command!r} is not a control command")))
                continue
            _answer(conn, worker, command, args)
    except (EOFError, OSError):  # the parent closed its end or died
        pass
    os._exit(0)


def serve(batches: Connection, control: Connection) -> None:
    """The child: the spec arrives on the batch channel; then batches there, index commands on the
    control channel, until "stop" or until the parent's ends close."""
    # a Ctrl-C or a SIGTERM to the whole process group reaches us too: the parent shuts down in
    # order and stops us; dying first would fail the requests it is still finishing
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        try:
            worker = _Worker(batches.recv())
        except Exception as exc:
            batches.send(("error", _sendable(exc)))
            return
        threading.Thread(target=_serve_control, args=(control, worker), name="control",
                         daemon=True).start()
        batches.send(("ok", os.getpid()))
        while True:
            command, *args = batches.recv()
            if command not in ("batch", "placement"):
                batches.send(("error", ValueError(f"{command!r} is not a batch command")))
                continue
            _answer(batches, worker, command, args)
    except (EOFError, OSError):  # the parent closed its end or died
        return


# --- the parent -------------------------------------------------------------------------------

class EncoderProcess:
    """The parent's handle on one child.

    ``request`` (the batch channel) is for the one engine worker thread that owns this process;
    ``control`` may be called from any thread. ``lock`` serialises the control channel with
    starting and stopping the child."""

    def __init__(self, spec: ProcessSpec, name: str, reply_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.name = name
        self.reply_timeout_s = reply_timeout_s  # a child silent for longer is hung: killed
        self.lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._batches: Connection | None = None
        self._control: Connection | None = None
        self.serving = False  # started and holding every index it may be asked for (the engine's)
        self._closed = False  # close() was called: no process is started any more
        self._alive_until = 0.0  # `probably_up` asks the OS again from then on

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """The process is alive (it may still be loading)."""
        return self._batches is not None and self._proc is not None and self._proc.poll() is None

    @property
    def probably_up(self) -> bool:
        """Serving, and alive when the OS was last asked, at most ALIVE_RECHECK_S ago. Admission
        and readiness ask on every request, and asking the OS (waitpid) is a system call. A
        request admitted in the moments after a child died unnoticed is computed by another
        worker, or by this one once it has started the child again (its worker checks exactly)."""
        if not self.serving:
            return False
        now = time.monotonic()
        if now >= self._alive_until:
            if not self.running:
                return False
            self._alive_until = now + ALIVE_RECHECK_S
        return True

    def start(self) -> None:
        """Start the child and wait until its model is loaded and warmed up."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the child process (returns at once; several children load side by side)."""
        with self.lock:
            if self._closed:
                raise EncoderProcessDied(f"{self.name} is closed (the service is stopping)")
            pairs = [socket.socketpair() for _ in range(2)]
            theirs = [pair[1].fileno() for pair in pairs]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "service.encoder_process", *map(str, theirs)],
                    pass_fds=theirs, env=env, stdin=subprocess.DEVNULL)
            except BaseException:
                for ours, their in pairs:
                    ours.close()
                raise
            finally:
                for _, their in pairs:
                    their.close()
            self._batches = Connection(pairs[0][0].detach())
            self._control = Connection(pairs[1][0].detach())

    def wait_ready(self) -> None:
        """Send the spec; returns when the child has loaded and warmed up its model."""
        self._exchange(self._batches, self.spec, "start", START_TIMEOUT_S)

    def request(self, command: str, *args: Any) -> Any:
        """A batch-channel command (the owning worker thread only)."""
        return self._exchange(self._batches, (command, *args), command)

    def control(self, command: str, *args: Any) -> Any:
        """A control-channel command: install or drop an index generation."""
        # loading an index may take as long as loading the model
        timeout = START_TIMEOUT_S if command == "install" else None
        with self.lock:
            return self._exchange(self._control, (command, *args), command, timeout)

    def kill(self) -> None:
        """End the child at once, without waiting for whoever uses it (shutdown)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _exchange(self, conn: Connection | None, message: Any, what: str,
                  timeout: float | None = None) -> Any:
        """Send one message and wait for its answer; the child's exception is raised here."""
        timeout = self.reply_timeout_s if timeout is None else timeout
        if conn is None or self._proc is None:
            raise EncoderProcessDied(f"{self.name} is not running")
        try:
            conn.send(message)
            if not conn.poll(timeout):
                self.serving = False
                self._proc.kill()
                self._proc.wait()
                raise EncoderProcessDied(f"{self.name} did not answer {what!r} within "
                                         f"{timeout:g} s and was killed")
            status, value = conn.recv()
        except (EOFError, OSError, TypeError) as exc:
            if isinstance(exc, TypeError) and not conn.closed:
                raise  # (a TypeError with an open connection is a real one)
            self.serving = False
            try:  # else the connection was closed under us: the process is being stopped
                code = self._proc.wait(1)
            except subprocess.TimeoutExpired:
                code = None
            raise EncoderProcessDied(f"{self.name} ended (exit status {code}) during {what!r}") from exc
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the child for good (shutdown): a restart under way fails instead of starting one."""
        self._closed = True
        self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """End the child (at once, even mid-batch) and release its sockets. Idempotent."""
        self.serving = False
        if not self.lock.acquire(timeout=1.0):
            self.kill()  # another thread is in a long exchange (a restart, an index load): end it
            self.lock.acquire()
        try:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                try:
                    self._control.send(("stop",))  # type: ignore[union-attr]
                except (AttributeError, OSError):
                    pass
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # the child is gone: a worker thread still reading the batch channel gets EOF
            for conn in (self._batches, self._control):
                if conn is not None:
                    conn.close()
            self._batches = self._control = None
        finally:
            self.lock.release()


if __name__ == "__main__":
    # through the package's module, so that what the child pickles names service.encoder_process
    from service.encoder_process import serve as _serve

    _serve(Connection(int(sys.argv[1])), Connection(int(sys.argv[2])))

"""JSON log lines carrying the id of the request being served."""
from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import threading
import time
import weakref

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "geoloc_request_id", default=None
)

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Attributes every LogRecord has; anything else passed via ``extra=`` is emitted as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}

log = logging.getLogger("service")


_ID_BYTES = 16
_IDS_PER_READ = 256
_spare_ids: list[str] = []  # random ids read ahead; list.pop is atomic, so threads may share it


def _forget_spare_ids() -> None:
    _spare_ids.clear()  # a forked process must not hand out its parent's ids


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_spare_ids)


def new_request_id(incoming: str | None) -> str:
    """Reuse a well-formed incoming X-Request-ID, otherwise make a fresh random one (32 hex
    digits). The random bytes are read 256 ids at a time: a read of the OS's random source per
    request (uuid4) is a system call on the event loop, which hands the GIL to the encoder workers
    and waits to get it back: ~0.1 ms per request at full load (bench/RESULTS.md)."""
    if incoming and _SAFE_ID.match(incoming):
        return incoming
    try:
        return _spare_ids.pop()
    except IndexError:
        block = os.urandom(_ID_BYTES * _IDS_PER_READ).hex()
        step = 2 * _ID_BYTES
        _spare_ids.extend(block[i:i + step] for i in range(step, len(block), step))
        return block[:step]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get() or "-"
        return super().format(record)


class BatchedStreamHandler(logging.StreamHandler):
    """Writes INFO and DEBUG lines in batches, at most ``max_delay_s`` after they were logged (or
    once ``max_lines`` wait), WARNING and above at once after whatever waits, so the order of this
    handler's lines holds (other handlers on the same stream, uvicorn's, write at once).

    Each write is a system call, and on the event loop a system call hands the GIL to the encoder
    workers: one access-log write per request cost ~3% of the service's throughput at full load
    (bench/RESULTS.md). A background thread writes what waits; so does ``flush``/``close``, which
    ``logging.shutdown`` calls at exit."""

    def __init__(self, stream=None, max_delay_s: float = 0.2, max_lines: int = 512) -> None:
        super().__init__(stream)
        self.max_delay_s = max_delay_s
        self.max_lines = max_lines
        self._waiting: list[str] = []
        self._start_writer()
        _batched_handlers.add(self)

    def _start_writer(self) -> None:
        self._stopped = threading.Event()
        self._writer = threading.Thread(target=self._write_periodically, daemon=True,
                                         name="geoloc-log-writer")
        self._writer.start()

    def _after_fork(self) -> None:
        """In a forked child: the parent writes what waited at the fork; the writer thread did not
        survive it, so start another."""
        self._waiting.clear()
        if not self._stopped.is_set():
            self._start_writer()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._waiting.append(self.format(record) + self.terminator)
            if (record.levelno >= logging.WARNING or len(self._waiting) >= self.max_lines
                    or self._stopped.is_set()):  # closed: no writer any more
                self._write_waiting()
        except Exception:
            self.handleError(record)

    def _write_waiting(self) -> None:  # with self.lock held
        if self._waiting:
            text = "".join(self._waiting)
            self._waiting.clear()
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write_waiting()
            except (OSError, ValueError):  # the stream is gone (closed at exit): nothing to do
                self._waiting.clear()

    def _write_periodically(self) -> None:
        while not self._stopped.wait(self.max_delay_s):
            self.flush()

    def close(self) -> None:
        self._stopped.set()
        self.flush()
        super().close()


_batched_handlers: "weakref.WeakSet[BatchedStreamHandler]" = weakref.WeakSet()


def _restart_log_writers() -> None:
    for handler in list(_batched_handlers):
        handler._after_fork()


if hasattr(os, "register_at_fork"):  # after logging's own hook, which re-creates handler locks
    os.register_at_fork(after_in_child=_restart_log_writers)


_HANDLER_MARK = "_geoloc_handler"


def flush_logs() -> None:
    """Write the service's waiting log lines now (at shutdown, not only at interpreter exit)."""
    for handler in log.handlers:
        handler.flush()


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Install one stderr handler on the ``service`` logger and restyle uvicorn's loggers.

    Idempotent: calling it again (another ``create_app``) replaces the previous handler.
    """
    formatter: logging.Formatter = JsonFormatter() if json_logs else PlainFormatter()
    for handler in list(log.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            log.removeHandler(handler)
            handler.close()
    handler = BatchedStreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(formatter)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    if json_logs:
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            for existing in logging.getLogger(name).handlers:
                existing.setFormatter(formatter)

"""Log lines (JSON by default) carrying the id of the request being served.

The ``service`` logger hands its records to a ``logging.handlers.QueueHandler``; a
``QueueListener`` thread formats and writes them, so a request's log line costs the event loop a
queue put, not a write to stderr.
"""
from __future__ import annotations

import atexit
import contextvars
import json
import logging
import queue
import re
import sys
import time
import uuid
from logging.handlers import QueueHandler, QueueListener

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "geoloc_request_id", default=None
)

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Attributes every LogRecord has; anything else passed via ``extra=`` is emitted as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message", "request_id"}

log = logging.getLogger("service")


def new_request_id(incoming: str | None) -> str:
    """A well-formed incoming X-Request-ID, otherwise a fresh random one (32 hex digits)."""
    if incoming and _SAFE_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


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
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get() or "-"
        # one record, one line: a request path with %0A in it must not write a line of its own
        record.msg, record.args = record.getMessage().replace("\r", "\\r").replace("\n", "\\n"), None
        return super().format(record)


class _ContextQueueHandler(QueueHandler):
    """Takes what only the logging thread knows (its request id, the exception's traceback) into
    the record before the listener thread formats it."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = logging.makeLogRecord(vars(record))
        record.request_id = getattr(record, "request_id", None) or request_id_var.get()
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


_listener: QueueListener | None = None


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """The ``service`` and ``uvicorn`` loggers through a queue to stderr, and uvicorn's access log off (the
    service logs every request itself, with its id). Calling it again (another ``create_app``) replaces
    the previous set-up."""
    global _listener
    stop_logging()
    formatter: logging.Formatter = JsonFormatter() if json_logs else PlainFormatter()
    records: queue.SimpleQueue = queue.SimpleQueue()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(formatter)
    # uvicorn's lines too (uvicorn.error propagates to uvicorn): none written on the event loop, where a
    # stalled stderr pipe would stop every request
    handler = _ContextQueueHandler(records)
    for logger in (log, logging.getLogger("uvicorn")):
        logger.handlers, logger.propagate = [handler], False
    for name in ("service", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    _listener = QueueListener(records, writer)
    _listener.start()
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def stop_logging() -> None:
    """Write every waiting line and stop the writer thread (shutdown, exit); later lines are written
    straight to stderr. (uvicorn ends a process stopped by SIGTERM by raising it again, so no atexit
    runs: the app's shutdown calls this, or uvicorn's last lines would wait in the queue for ever.)"""
    global _listener
    if _listener is None:
        return
    writer = _listener.handlers[0]
    loggers = (log, logging.getLogger("uvicorn"))
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, _ContextQueueHandler)}:
        with handler.lock:  # from now on straight to the writer, so none lands behind the listener's end mark
            handler.emit = writer.handle  # type: ignore[method-assign]
    _listener.stop()
    _listener = None
    for logger in loggers:
        logger.handlers = [writer]


atexit.register(stop_logging)

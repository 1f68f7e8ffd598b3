"""JSON log lines carrying the id of the request being served."""
from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import secrets
import sys
import time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "geoloc_request_id", default=None
)

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Attributes every LogRecord has; anything else passed via ``extra=`` is emitted as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}

log = logging.getLogger("service")


def _fresh_id_source() -> None:
    global _id_prefix, _id_counter
    _id_prefix = secrets.token_hex(10)
    _id_counter = itertools.count()


_id_prefix = ""
_id_counter = itertools.count()
_fresh_id_source()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_id_source)  # forked workers must not repeat ids


def new_request_id(incoming: str | None) -> str:
    """Reuse a well-formed incoming X-Request-ID, otherwise make a fresh one: 32 hex digits, a
    random prefix per process and a counter. (A uuid4 per request reads the OS's random source
    each time, and on the event loop that system call hands the GIL to the encoder workers:
    ~0.1 ms per request at full load, bench/RESULTS.md.)"""
    if incoming and _SAFE_ID.match(incoming):
        return incoming
    return f"{_id_prefix}{next(_id_counter):012x}"


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


_HANDLER_MARK = "_geoloc_handler"


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    """Install one stderr handler on the ``service`` logger and restyle uvicorn's loggers.

    Idempotent: calling it again (another ``create_app``) replaces the previous handler.
    """
    formatter: logging.Formatter = JsonFormatter() if json_logs else PlainFormatter()
    for handler in list(log.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(formatter)
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    if json_logs:
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            for existing in logging.getLogger(name).handlers:
                existing.setFormatter(formatter)

"""``python -m service``: the API on uvicorn, with what a bare ``uvicorn service.app:app`` lacks.

- A header deadline: uvicorn times out idle keep-alive connections but not a client that opens a
  connection and sends its request headers slowly or never (slowloris); here a request's headers
  must arrive within ``GEOLOC_READ_TIMEOUT_S`` or the connection gets 408 and is closed. (The app
  itself times out a stalled body, under either server.)
- The glibc allocator settings of ``model.allocator.allocator_env``, and one BLAS thread
  (``service.__main__.SERVICE_ENV_DEFAULTS``; the process starts itself once more with them).
- Several worker processes (``--workers N``) with their Prometheus metrics added up: without a
  ``PROMETHEUS_MULTIPROC_DIR`` of your own, one is made for the run.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import tempfile

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .logs import configure_logging
from .settings import EXIT_LOAD_FAILURE, Settings, settings_or_exit

log = logging.getLogger("service.server")


@functools.cache
def header_timeout_s() -> float:
    return Settings().read_timeout_s


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline from a connection's start (and from each later
    request's first byte) to the end of that request's headers."""

    _deadline = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(header_timeout_s(), self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        body = json.dumps({"detail": f"request headers not received within {header_timeout_s():g} s",
                           "code": "request_timeout", "request_id": None}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()
        log.info("request headers not received within %g s: 408, connection closed", header_timeout_s(),
                 extra={"status": 408, "client": (self.client or ("", 0))[0]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve the geo-localization API (settings: GEOLOC_* environment variables, "
                    "see docs/CONFIGURATION.md).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes, each with its own model, index and encoder threads "
                             "(give each its share of the cores with GEOLOC_ENCODER_WORKERS / GEOLOC_TORCH_THREADS)")
    parser.add_argument("--timeout-keep-alive", type=int, default=5,
                        help="seconds an idle keep-alive connection is kept open")
    parser.add_argument("--timeout-graceful-shutdown", type=int, default=30,
                        help="seconds requests in progress may take to finish after SIGTERM/Ctrl-C")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    settings = settings_or_exit("python -m service")  # a bad GEOLOC_* variable: one clear error now, not one per worker
    configure_logging(settings.log_level, settings.json_logs)  # the supervisor's lines like the workers'
    own_metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_metrics_dir = tempfile.mkdtemp(prefix="geoloc-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir  # before any worker starts
    elif args.workers > 1 and any(name.endswith(".db") for name in _listing(os.environ["PROMETHEUS_MULTIPROC_DIR"])):
        log.warning("PROMETHEUS_MULTIPROC_DIR %s holds an earlier run's metrics: its counters go on from theirs "
                    "(empty it before each start)", os.environ["PROMETHEUS_MULTIPROC_DIR"])
    # uvicorn's supervisor of several workers stops by itself only when one exits with uvicorn's
    # STARTUP_FAILURE (3, our EXIT_LOAD_FAILURE too: it stops rather than start refusing workers for ever),
    # and then exits 0: the exit status says so instead
    startup_failed = _Seen("failed to start")
    logging.getLogger("uvicorn.error").addFilter(startup_failed)
    try:
        uvicorn.run("service.app:app", host=args.host, port=args.port, workers=args.workers,
                    http=HeaderDeadlineProtocol, access_log=False, timeout_keep_alive=args.timeout_keep_alive,
                    timeout_graceful_shutdown=args.timeout_graceful_shutdown, log_config=None)
        return EXIT_LOAD_FAILURE if startup_failed.seen else 0
    finally:
        logging.getLogger("uvicorn.error").removeFilter(startup_failed)
        if own_metrics_dir:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


class _Seen(logging.Filter):
    """Notes whether a record whose message holds ``text`` went by (it lets every record through)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, False

    def filter(self, record: logging.LogRecord) -> bool:
        self.seen = self.seen or self.text in record.getMessage()
        return True


def _listing(directory: str) -> list[str]:
    return os.listdir(directory) if os.path.isdir(directory) else []

"""The service as it runs in production: `python -m service` (uvicorn) on 127.0.0.1, spoken to over
sockets."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_service_api import BAD_UPLOADS, _bad_payload
from test_service_support import (  # noqa: F401  (world is a fixture)
    ServiceProcess, metric_value, publish_symlink, settings_for, world,
)

ADMIN = {"Authorization": "Bearer adm1n"}
READ_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def live_link(world, tmp_path_factory) -> Path:
    link = tmp_path_factory.mktemp("live") / "current"
    publish_symlink(link, world.artifact_a.resolve())
    return link


def _serve(env: dict[str, str], log_path: Path):
    proc = ServiceProcess(env, log_path)
    try:
        yield proc
    finally:
        code = proc.stop()
        # uvicorn re-raises the SIGTERM it handled once shutdown is done: -15 is a clean exit.
        assert code in (0, -15), f"uvicorn died ({code}):\n{proc.log()[-3000:]}"
        assert "Application shutdown complete" in proc.log()


@pytest.fixture(scope="module")
def server(world, live_link, tmp_path_factory):
    env = {
        "GEOLOC_CHECKPOINT": str(world.checkpoint), "GEOLOC_INDEX": str(live_link),
        "GEOLOC_RELOAD_POLL_S": "0.2", "GEOLOC_ADMIN_TOKEN": "adm1n",
        "GEOLOC_QUEUE_SIZE": "4", "GEOLOC_MAX_BATCH_SIZE": "2", "GEOLOC_MAX_BATCH_IMAGES": "4",
        "GEOLOC_MAX_UPLOAD_BYTES": str(64 * 1024), "GEOLOC_MAX_PIXELS": "2000000",
    }
    yield from _serve(env, tmp_path_factory.mktemp("logs") / "uvicorn.log")


@pytest.fixture()
def impatient_server(world, tmp_path):
    """Its own server with a short read timeout: on the shared one, 40 clients of one busy process could
    stall that long between connecting and sending, and get a 408 another test did not ask for."""
    env = {"GEOLOC_CHECKPOINT": str(world.checkpoint), "GEOLOC_INDEX": str(world.artifact_a),
           "GEOLOC_RELOAD_POLL_S": "0", "GEOLOC_READ_TIMEOUT_S": str(READ_TIMEOUT_S)}
    yield from _serve(env, tmp_path / "uvicorn.log")


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _post(http, data: bytes, k: int = 5, ctype: str = "image/jpeg", headers=None):
    return http.post(f"/localize?k={k}", files={"image": ("pano.jpg", data, ctype)},
                     headers=headers or {})


def test_every_route(http, world):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz").json()
    assert ready["status"] == "ready" and ready["index"]["count"] == 24
    resp = _post(http, world.pano, k=3)
    assert resp.status_code == 200 and len(resp.json()["results"]) == 3
    rid = resp.headers["x-request-id"]
    assert rid and len(rid) == 32
    geo = _post(http, world.pano, k=3, headers={"Accept": "application/geo+json"})
    assert geo.headers["content-type"].startswith("application/geo+json")
    assert geo.json()["type"] == "FeatureCollection"
    batch = http.post("/localize/batch?k=2", files=[("images", ("a.jpg", world.pano, "image/jpeg")),
                                                    ("images", ("b.jpg", world.pano, "image/jpeg"))])
    assert batch.status_code == 200 and len(batch.json()["items"]) == 2
    tile = resp.json()["results"][0]["tile_id"]
    thumb = http.get(f"/tiles/{tile}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert http.get("/tiles/nope").json()["code"] == "unknown_tile"
    assert http.get("/v1/index").json()["count"] == 24
    assert http.get("/docs").status_code == 200
    assert "/localize" in http.get("/openapi.json").json()["paths"]
    assert "upload-form" in http.get("/").text
    assert http.get("/static/style.css").status_code == 200
    assert http.post("/admin/reload", headers=ADMIN).json()["status"] == "unchanged"
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert metric_value(metrics.text, "geoloc_http_requests_total", route="/localize",
                        method="POST", status="200") >= 2


def test_bad_inputs_over_http(http, world):
    for name, (_, ctype, status, code) in sorted(BAD_UPLOADS.items()):
        resp = _post(http, _bad_payload(name, world), ctype=ctype)
        assert (resp.status_code, resp.json()["code"]) == (status, code), name
    for query in ("k=0", "k=101"):
        resp = http.post(f"/localize?{query}", files={"image": ("p.jpg", world.pano, "image/jpeg")})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "k"]
    resp = http.post("/localize", files={"other": ("p.jpg", world.pano, "image/jpeg")})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "image"]
    assert http.get("/localize").status_code == 405
    assert http.put("/localize/batch").status_code == 405
    assert _post(http, world.pano).status_code == 200


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    return data


def test_oversized_upload_rejected_while_streaming(server):
    # Declared too large: 413 before a single body byte is sent.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /localize HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n"
                     b"Content-Type: multipart/form-data; boundary=BB\r\n\r\n")
        head = _read_response(sock, 5)
        assert head.startswith(b"HTTP/1.1 413"), head
    # No length (chunked): the server answers 413 once the limit is crossed, while the client
    # is still sending; the body is never completed.
    limit = 64 * 1024
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /localize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=BB\r\n\r\n")
        preamble = (b'--BB\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
                    b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff")
        sock.sendall(b"%x\r\n%s\r\n" % (len(preamble), preamble))
        sent, head = 0, b""
        sock.settimeout(0.2)
        while sent < 20 * limit:
            piece = os.urandom(8192)
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
            try:
                head = sock.recv(65536)
            except socket.timeout:
                continue
            if head:
                break
        if not head:
            head = _read_response(sock, 5)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        assert sent < 3 * limit, f"server read {sent} bytes before refusing"
        body = json.loads(head.split(b"\r\n\r\n", 1)[1] or b"{}") if b"\r\n\r\n" in head else {}
        if body:
            assert body["code"] == "upload_too_large"


def test_a_client_that_stalls_its_headers_or_its_body_gets_408(impatient_server, world):
    server = impatient_server
    logged_before = server.log().count("request headers not received within")
    head = (b"POST /localize HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=BB\r\n\r\n")
    for sent in (b"", b"POST /localize HTTP/1.1\r\nHost: x\r\n",  # headers never (or half) sent
                 head + b'--BB\r\nContent-Disposition: form-data; name="image"\r\n\r\n\xff\xd8'):  # body stops
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            t0 = time.monotonic()
            sock.sendall(sent)
            answer = _read_response(sock, 10 * READ_TIMEOUT_S)
            waited = time.monotonic() - t0
            assert answer.startswith(b"HTTP/1.1 408"), (sent[:40], answer[:200])
            assert READ_TIMEOUT_S * 0.9 < waited < READ_TIMEOUT_S + 5
            assert b"request_timeout" in answer + _read_response(sock, 2)
            sock.settimeout(5)
            assert sock.recv(1 << 16) == b""  # and the connection is closed
    with httpx.Client(base_url=server.url, timeout=30) as c:  # the server is fine
        assert _post(c, world.pano).status_code == 200

    def logged() -> int:
        return server.log().count("request headers not received within") - logged_before

    deadline = time.monotonic() + 5  # the two header timeouts are in the log (the queue's writer thread writes it)
    while logged() < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logged() == 2


def test_the_entry_point_runs_with_the_allocator_settings(server):
    from model.allocator import ALLOCATOR_ENV

    environ = Path(f"/proc/{server.proc.pid}/environ")
    if not environ.exists():
        pytest.skip("no /proc on this system")
    variables = dict(item.split("=", 1) for item in environ.read_text().split("\0") if "=" in item)
    assert {k: variables.get(k) for k in ALLOCATOR_ENV} == ALLOCATOR_ENV


def test_reload_during_load_has_no_failed_or_mixed_requests(server, world, live_link, http):
    stop = threading.Event()
    outcomes: list[tuple[int, dict | str]] = []
    lock = threading.Lock()

    def client_loop():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/localize?k=5", files={"image": ("p.jpg", world.pano, "image/jpeg")})
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") \
                    else r.text
                with lock:
                    outcomes.append((r.status_code, body))

    def wait_for(pred, what: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def generation() -> int:
        return http.get("/readyz").json()["index"]["generation"]

    def answered_at(gen: int) -> bool:  # a request was served by that generation (fixed sleeps raced a slow box)
        with lock:
            return any(isinstance(body, dict) and body.get("index", {}).get("generation") == gen
                       for _, body in outcomes)

    start_gen = generation()
    threads = [threading.Thread(target=client_loop) for _ in range(4)]  # <= queue size: no 503
    for t in threads:
        t.start()
    try:
        wait_for(lambda: answered_at(start_gen), "a request served by the first index", timeout=60)
        publish_symlink(live_link, world.artifact_b.resolve())  # what index_build does
        wait_for(lambda: generation() == start_gen + 1, "the watcher to load artifact b")
        wait_for(lambda: answered_at(start_gen + 1), "a request served by artifact b", timeout=60)
        forced = http.post("/admin/reload?force=true", headers=ADMIN)
        assert forced.status_code == 200 and forced.json()["index"]["count"] == 16
        time.sleep(0.3)
        failures_before = metric_value(http.get("/metrics").text, "geoloc_index_reloads_total",
                                       trigger="watch", result="failure")
        publish_symlink(live_link, world.artifact_other.resolve())  # wrong model: refused
        wait_for(lambda: metric_value(http.get("/metrics").text, "geoloc_index_reloads_total",
                                      trigger="watch", result="failure") > failures_before,
                 "the watcher to report the broken artifact")
        assert http.post("/admin/reload", headers=ADMIN).status_code == 409
        time.sleep(0.3)
        publish_symlink(live_link, world.artifact_a.resolve())
        wait_for(lambda: generation() == start_gen + 3, "the watcher to load artifact a again")
        time.sleep(0.5)
        wait_for(lambda: len(outcomes) >= 40, "40 answered requests", timeout=120)  # slow or busy machine
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    statuses = [s for s, _ in outcomes]
    assert len(outcomes) >= 40, len(outcomes)
    assert set(statuses) == {200}, [o for o in outcomes if o[0] != 200][:3]
    seen = set()
    for _, body in outcomes:
        count = body["index"]["count"]
        prefix = {24: "a", 16: "b"}[count]
        assert all(r["tile_id"].startswith(prefix) for r in body["results"]), body
        seen.add((count, body["index"]["generation"]))
    assert {c for c, _ in seen} == {24, 16}
    assert len({g for _, g in seen}) >= 3  # served by a, then b, b (forced), then a again


def test_overload_answers_503_with_retry_after(server, world):
    start = threading.Barrier(40)
    results: list[tuple[int, dict, dict, float]] = []
    lock = threading.Lock()

    def one(i: int):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            if i % 5 == 0:
                files = [("images", (f"{j}.jpg", world.pano, "image/jpeg")) for j in range(4)]
                url = "/localize/batch"
            else:
                files = {"image": ("p.jpg", world.pano, "image/jpeg")}
                url = "/localize"
            start.wait()
            t0 = time.perf_counter()
            r = c.post(url, files=files)
            with lock:
                results.append((r.status_code, r.json(), dict(r.headers), time.perf_counter() - t0))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = sorted({s for s, *_ in results})
    assert len(results) == 40
    assert statuses == [200, 503], statuses
    for status, body, headers, _ in results:
        if status == 503:
            assert body["code"] == "overloaded"
            assert headers["retry-after"] == "1"


def test_no_file_descriptor_or_thread_leak(server, http, world):
    pid = server.proc.pid
    fd_dir = Path(f"/proc/{pid}/fd")
    if not fd_dir.exists():
        pytest.skip("no /proc on this system")

    def fds() -> int:
        return len(os.listdir(fd_dir))

    def threads() -> int:
        return len(os.listdir(f"/proc/{pid}/task"))

    for _ in range(5):  # warm up lazily created thread pools
        _post(http, world.pano)
    before_fds, before_threads = fds(), threads()
    for _ in range(4):
        for name, (_, ctype, status, _) in BAD_UPLOADS.items():
            assert _post(http, _bad_payload(name, world), ctype=ctype).status_code == status
        assert _post(http, world.pano).status_code == 200
    time.sleep(0.2)
    assert fds() <= before_fds + 2
    assert threads() <= before_threads + 2


@pytest.mark.parametrize("workers", ["1", "2"])  # uvicorn's supervisor of several exits 0 by itself
def test_fingerprint_mismatch_process_exits(world, tmp_path, workers):
    env = {"GEOLOC_CHECKPOINT": str(world.checkpoint), "GEOLOC_INDEX": str(world.artifact_other),
           "GEOLOC_ENCODER_WORKERS": "1", "GEOLOC_TORCH_THREADS": "1"}
    proc = ServiceProcess(env, tmp_path / "refused.log", wait_ready=False, args=("--workers", workers))
    try:
        code = proc.proc.wait(90)
    finally:
        proc.stop()
    log = proc.log()
    assert code == 3, log
    line = next(json.loads(ln) for ln in log.splitlines() if "refusing to start" in ln)
    assert line["level"] == "CRITICAL"
    assert world.fingerprint in line["msg"]


def test_a_stopped_service_writes_its_last_lines(world, tmp_path):
    """uvicorn ends a process stopped by SIGTERM by raising the signal again (no atexit): the lines it
    logs after the app's shutdown must not wait in the log queue."""
    env = {"GEOLOC_CHECKPOINT": str(world.checkpoint), "GEOLOC_INDEX": str(world.artifact_a),
           "GEOLOC_ENCODER_WORKERS": "1", "GEOLOC_TORCH_THREADS": "1", "GEOLOC_RELOAD_POLL_S": "0"}
    proc = ServiceProcess(env, tmp_path / "stop.log")
    proc.stop()
    lines = [json.loads(ln) for ln in proc.log().splitlines() if ln.startswith("{")]
    assert [r["msg"] for r in lines][-2:] == ["Application shutdown complete.", f"Finished server process [{proc.proc.pid}]"]


# --- in-process uvicorn, so the test can hold the worker --------------------------------------

class ThreadedServer:
    def __init__(self, app) -> None:
        import uvicorn

        # Bound here and handed over: a port found free and bound later could be taken meanwhile.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def test_disconnected_client_is_not_computed(world):
    from service.app import create_app

    app = create_app(settings_for(world, world.artifact_a))
    with ThreadedServer(app) as srv:
        runtime = app.state.runtime
        assert runtime.wait_loaded(60)
        engine = runtime.engine

        def metric(name: str, **labels: str) -> float:
            return metric_value(runtime.metrics.exposition().decode(), name, **labels)

        body = (b'--BB\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n" + world.pano + b"\r\n--BB--\r\n")
        with engine.paused():
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(b"POST /localize HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                         b"Content-Type: multipart/form-data; boundary=BB\r\n\r\n" % len(body) + body)
            deadline = time.monotonic() + 10
            while engine.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.depth == 1
            images_before = metric("geoloc_images_localized_total")
            sock.close()  # the client gives up while its job waits
            deadline = time.monotonic() + 10  # withdrawn while the queue is still paused: a fixed sleep raced it
            while engine.depth > 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.depth == 0, "the abandoned job was not withdrawn from the queue"
        deadline = time.monotonic() + 5
        while metric("geoloc_dropped_images_total", reason="client_disconnected") < 1:
            assert time.monotonic() < deadline, "the abandoned job was not dropped"
            time.sleep(0.02)
        assert metric("geoloc_images_localized_total") == images_before  # nothing was computed for it
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", timeout=30) as c:
            assert _post(c, world.pano).status_code == 200
        assert metric("geoloc_images_localized_total") == images_before + 1
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:  # gone half-way through its upload
            sock.sendall(b"POST /localize HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                         b"Content-Type: multipart/form-data; boundary=BB\r\n\r\n" % len(body) + body[:len(body) // 2])
            time.sleep(0.2)

        def gone() -> float:  # 499, "client closed request", in both cases
            return metric("geoloc_http_requests_total", route="/localize", method="POST", status="499")

        deadline = time.monotonic() + 5
        while gone() < 2:
            assert time.monotonic() < deadline, metric("geoloc_http_requests_total", route="/localize",
                                                       method="POST", status="400")
            time.sleep(0.02)


def test_two_server_processes_answer_and_add_up_their_metrics(world, tmp_path):
    env = {"GEOLOC_CHECKPOINT": str(world.checkpoint), "GEOLOC_INDEX": str(world.artifact_a),
           "GEOLOC_ENCODER_WORKERS": "1", "GEOLOC_TORCH_THREADS": "1", "GEOLOC_RELOAD_POLL_S": "0"}
    proc = ServiceProcess(env, tmp_path / "two.log", args=("--workers", "2"))
    try:
        answered = 0
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            # both workers load their model and index: each logs "ready" once (asking /readyz may reach the
            # same process every time, and geoloc_ready, the minimum over the processes, leaves out one that
            # has not written its metrics yet)
            deadline = time.monotonic() + 90
            while not (len(_workers(proc.proc.pid)) == 2 and proc.log().count('"msg": "ready"') == 2
                       and metric_value(c.get("/metrics").text, "geoloc_ready") == 1):
                assert time.monotonic() < deadline, "the two workers were not both ready within 90 s"
                time.sleep(0.2)
            for _ in range(12):
                assert _post(c, world.pano).status_code == 200
                answered += 1
            totals = {metric_value(c.get("/metrics").text, "geoloc_http_requests_total", route="/localize",
                                   method="POST", status="200") for _ in range(6)}
            assert totals == {answered}  # whichever process answers /metrics counts both
            assert metric_value(c.get("/metrics").text, "geoloc_ready") == 1
            capacity = metric_value(c.get("/metrics").text, "geoloc_queue_capacity")  # the two workers' sum
            # a worker killed outright: uvicorn starts another; the dead one's gauges must not count on
            os.kill(_workers(proc.proc.pid)[0], signal.SIGKILL)
            deadline = time.monotonic() + 90
            while not (len(_workers(proc.proc.pid)) == 2 and proc.log().count('"msg": "ready"') == 3):
                assert time.monotonic() < deadline, "no worker took the killed one's place within 90 s"
                time.sleep(0.2)
            assert {metric_value(c.get("/metrics").text, "geoloc_queue_capacity") for _ in range(4)} == {capacity}
        assert len(_workers(proc.proc.pid)) == 2
        # the supervisor's own lines are JSON lines too
        assert json.loads(next(ln for ln in proc.log().splitlines() if "parent process" in ln))["level"] == "INFO"
    finally:
        code = proc.stop()
    assert code in (0, -15), proc.log()[-3000:]


def _workers(pid: int) -> list[int]:
    """The worker processes uvicorn's supervisor ``pid`` started (not multiprocessing's helpers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("no /proc children list on this system")
    children = [int(p) for p in path.read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

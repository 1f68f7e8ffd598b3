"""The service in-process, through FastAPI's TestClient: routes, errors, auth, metrics, reload."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ship_support import assert_same_matches
from test_service_support import (  # noqa: F401  (world is a fixture)
    image_bytes, jpeg_bytes, metric_value, publish_symlink, running_client, settings_for, world,
)


def _post(client, data: bytes, *, k: int | None = None, ctype: str = "image/jpeg",
          name: str = "pano.jpg", field: str = "image", headers: dict | None = None):
    url = "/localize" if k is None else f"/localize?k={k}"
    return client.post(url, files={field: (name, data, ctype)}, headers=headers or {})


def _assert_error(resp, status: int, code: str):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code, body
    assert body["detail"]
    assert body["request_id"] == resp.headers["x-request-id"]
    return body


_LIMITS = dict(max_upload_bytes=64 * 1024, max_pixels=2_000_000, max_batch_images=4)


@pytest.fixture(scope="module")
def client(world):
    """The CPU default: each encoder worker decodes its own micro-batch."""
    with running_client(settings_for(world, world.artifact_a, **_LIMITS)) as c:
        assert c.app.state.runtime.plan.decode_threads == 0
        yield c


@pytest.fixture(scope="module")
def pool_client(world):
    """The GPU default on a CPU: a thread pool decodes uploads before they are queued."""
    with running_client(settings_for(world, world.artifact_a, decode_threads=2, **_LIMITS)) as c:
        yield c


# --- lifecycle ----------------------------------------------------------------------------------

def test_healthz_answers_and_readyz_is_503_until_loaded(world):
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(settings_for(world, world.artifact_a))
    bare = TestClient(app)  # no `with`: lifespan not started, nothing loaded
    assert bare.get("/healthz").json() == {"status": "ok"}
    resp = bare.get("/readyz")
    assert resp.status_code == 503 and resp.json()["status"] == "loading"
    resp = _post(bare, world.pano)
    _assert_error(resp, 503, "not_ready")
    assert resp.headers["retry-after"] == "1"
    with TestClient(app) as live:
        assert app.state.runtime.wait_loaded(60)
        ready = live.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["model"]["fingerprint"] == world.fingerprint


def test_fingerprint_mismatch_refuses_to_start(world, capfd):
    settings = settings_for(world, world.artifact_other)
    with running_client(settings, wait=False) as client:
        runtime = client.app.state.runtime
        assert not runtime.wait_loaded(60)
        resp = client.get("/readyz")
        assert resp.status_code == 503
        body = resp.json()
        assert body["status"] == "failed" and "fingerprint" in body["detail"]
        _assert_error(_post(client, world.pano), 503, "not_ready")
    err = capfd.readouterr().err
    line = next(ln for ln in err.splitlines() if "refusing to start" in ln)
    record = json.loads(line)
    assert record["level"] == "CRITICAL"
    assert world.fingerprint in record["msg"] and "model fingerprint" in record["msg"]


def test_missing_index_setting_is_a_clear_failure(world):
    with running_client(settings_for(world, None), wait=False) as client:
        assert not client.app.state.runtime.wait_loaded(60)
        assert "GEOLOC_INDEX" in client.get("/readyz").json()["detail"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_request_ids_are_random_and_not_repeated_across_a_fork():
    import re

    from service.logs import new_request_id

    ids = [new_request_id(None) for _ in range(10_000)]
    assert len(set(ids)) == 10_000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # random, not a counter: consecutive ids share no long prefix
    assert sum(a[:8] == b[:8] for a, b in zip(ids, ids[1:])) == 0
    assert new_request_id("req-123") == "req-123"
    assert re.fullmatch(r"[0-9a-f]{32}", new_request_id("not safe; id"))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # e.g. a pre-forking process manager: the child must not reuse ids read ahead
        os.write(write, "".join(new_request_id(None) for _ in range(300)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64 * 300).decode()
    os.close(read)
    os.close(write)
    parent = {new_request_id(None) for _ in range(300)}
    assert len(child) == 32 * 300 and not parent & {child[i:i + 32] for i in range(0, len(child), 32)}


@contextlib.contextmanager
def _logger_with(handler, name: str):
    """A logger of its own that sends INFO and above to `handler` only; the handler is closed after."""
    import logging

    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_log_lines_are_written_in_batches_in_order():
    import logging

    from service.logs import BatchedStreamHandler

    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, max_delay_s=60, max_lines=3)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    with _logger_with(handler, "test.batched") as logger:
        logger.info("one")
        assert stream.getvalue() == ""  # waits for the writer thread (here: 60 s) or a flush
        logger.warning("two")  # at once, after what waited
        assert stream.getvalue() == "INFO one\nWARNING two\n"
        for i in range(3):
            logger.info("n%d", i)
        assert stream.getvalue().endswith("INFO n2\n")  # max_lines reached
        logger.info("last")
        handler.flush()
        assert stream.getvalue().endswith("INFO n2\nINFO last\n")
        logger.info("at close")
    assert stream.getvalue().endswith("INFO at close\n")
    quick = BatchedStreamHandler(io.StringIO(), max_delay_s=0.05)
    quick.emit(logging.makeLogRecord({"msg": "late", "levelno": logging.INFO}))
    deadline = time.monotonic() + 5
    while "late" not in quick.stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert quick.stream.getvalue() == "late\n"  # the writer thread wrote it
    quick.close()
    quick.emit(logging.makeLogRecord({"msg": "after close", "levelno": logging.INFO}))
    assert quick.stream.getvalue() == "late\nafter close\n"  # no writer any more: at once


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_batched_log_lines_survive_a_fork_once(tmp_path):
    from service.logs import BatchedStreamHandler

    path = tmp_path / "log.txt"
    with path.open("a") as stream, _logger_with(BatchedStreamHandler(stream, max_delay_s=60),
                                                "test.batched.fork") as logger:
        handler = logger.handlers[0]
        logger.info("waiting at the fork")
        pid = os.fork()
        if pid == 0:
            ok = handler._writer.is_alive()  # the child has a writer thread of its own
            logger.info("from the child")
            handler.flush()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        handler.flush()
    lines = path.read_text().splitlines()
    assert sorted(lines) == ["from the child", "waiting at the fork"]  # each once


# --- POST /localize -----------------------------------------------------------------------------

def _tiles(artifact: Path) -> dict[str, tuple[float, float]]:
    import csv

    with (artifact / "tiles.csv").open() as fh:
        return {r["tile_id"]: (float(r["lat"]), float(r["lon"])) for r in csv.DictReader(fh)}


def test_localize_returns_top_k_with_coordinates(client, world):
    resp = _post(client, world.pano, k=7, headers={"X-Request-ID": "req-123"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "req-123"
    body = resp.json()
    tiles = _tiles(world.artifact_a)
    results = body["results"]
    assert [r["rank"] for r in results] == list(range(1, 8))
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    for r in results:
        assert (r["lat"], r["lon"]) == pytest.approx(tiles[r["tile_id"]])
    assert body["model"]["fingerprint"] == world.fingerprint
    assert body["model"]["embedding_dim"] == 32
    assert body["index"]["count"] == 24 and body["index"]["model_fingerprint"] == world.fingerprint
    assert set(body["timing_ms"]) >= {"decode", "encode", "search", "total"}
    assert all(v >= 0 for v in body["timing_ms"].values())
    assert body["timing_ms"]["total"] >= body["timing_ms"]["encode"]
    assert _post(client, world.pano).json()["results"].__len__() == 5  # default k


def test_same_image_same_answer_and_k_above_count_is_capped(client, world):
    one = _post(client, world.pano, k=100).json()["results"]
    two = _post(client, world.pano, k=100).json()["results"]
    assert len(one) == 24  # only 24 tiles in the index
    assert_same_matches(one, two)


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("WEBP", "image/webp"),
                                       ("JPEG", "application/octet-stream")])
def test_png_webp_and_untyped_uploads(client, fmt, ctype):
    resp = _post(client, image_bytes(fmt, 300, 80), ctype=ctype, name="x")
    assert resp.status_code == 200, resp.text


def test_geojson_feature_collection(client, world):
    plain = _post(client, world.pano, k=3).json()
    resp = _post(client, world.pano, k=3, headers={"Accept": "application/geo+json"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/geo+json")
    fc = resp.json()
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 3
    for feature, match in zip(fc["features"], plain["results"]):
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Point"
        # RFC 7946: [longitude, latitude]
        assert feature["geometry"]["coordinates"] == [match["lon"], match["lat"]]
        assert feature["properties"]["tile_id"] == match["tile_id"]
        assert feature["properties"]["rank"] == match["rank"]
    assert fc["model"]["fingerprint"] == world.fingerprint


@pytest.mark.parametrize("accept,geo", [
    (None, False), ("*/*", False), ("application/json", False),
    ("application/geo+json", True), ("application/geo+json, */*;q=0.1", True),
    ("application/json, application/geo+json;q=0.5", False),
    ("application/geo+json;q=0.9, application/json;q=0.5", True),
    ("application/geo+json;q=0", False), ("text/html, */*", False),
])
def test_accept_negotiation(accept, geo):
    from service.localize import wants_geojson

    assert wants_geojson(accept) is geo


def test_batch(client, world):
    files = [("images", ("a.jpg", world.pano, "image/jpeg")),
             ("images", ("b.png", image_bytes("PNG", 400, 100), "image/png")),
             ("images", ("c.webp", image_bytes("WEBP", 400, 100), "image/webp"))]
    resp = client.post("/localize/batch?k=4", files=files)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [it["image"] for it in body["items"]] == [0, 1, 2]
    assert [it["filename"] for it in body["items"]] == ["a.jpg", "b.png", "c.webp"]
    assert all(len(it["results"]) == 4 for it in body["items"])
    single = _post(client, world.pano, k=4).json()["results"]
    assert_same_matches(body["items"][0]["results"], single)
    geo = client.post("/localize/batch?k=2", files=files, headers={"Accept": "application/geo+json"})
    assert geo.headers["content-type"].startswith("application/geo+json")
    assert sorted(f["properties"]["image"] for f in geo.json()["features"]) == [0, 0, 1, 1, 2, 2]
    too_many = [("images", (f"{i}.jpg", world.pano, "image/jpeg")) for i in range(5)]
    _assert_error(client.post("/localize/batch", files=too_many), 413, "too_many_images")
    bad = files[:1] + [("images", ("bad.jpg", b"not an image at all", "image/jpeg"))]
    body = _assert_error(client.post("/localize/batch", files=bad), 400, "not_an_image")
    assert "image 1 (bad.jpg)" in body["detail"]


# --- bad input ----------------------------------------------------------------------------------

def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels; the pixel data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _solid_jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (20, 30, 40)).save(out, format="JPEG", quality=50)
    return out.getvalue()


BAD_UPLOADS = {
    "empty": (b"", "image/jpeg", 400, "empty_upload"),
    "text_declared_as_jpeg": (b"hello, I am plain text" * 10, "image/jpeg", 400, "not_an_image"),
    "truncated_jpeg": (None, "image/jpeg", 400, "undecodable_image"),
    "corrupt_jpeg_header": (b"\xff\xd8\xff\xe0" + b"\x00" * 200, "image/jpeg", 400, "not_an_image"),
    "gif": (None, "image/gif", 415, "unsupported_media_type"),
    "bmp_as_octet_stream": (None, "application/octet-stream", 415, "unsupported_media_type"),
    "text_plain": (b"just text", "text/plain", 415, "unsupported_media_type"),
    "pdf": (b"%PDF-1.4 ...", "application/pdf", 415, "unsupported_media_type"),
    "bomb_header": (None, "image/png", 413, "too_many_pixels"),
    "too_many_pixels": (None, "image/jpeg", 413, "too_many_pixels"),
    "one_by_one": (None, "image/png", 400, "bad_dimensions"),
    "absurd_aspect": (None, "image/png", 400, "bad_dimensions"),
    "over_byte_limit": (None, "image/jpeg", 413, "upload_too_large"),
}


def _bad_payload(name: str, world) -> bytes:
    data = BAD_UPLOADS[name][0]
    if data is not None:
        return data
    return {
        "truncated_jpeg": lambda: world.pano[: len(world.pano) // 2],
        "gif": lambda: image_bytes("GIF", 64, 32),
        "bmp_as_octet_stream": lambda: image_bytes("BMP", 64, 32),
        "bomb_header": lambda: _bomb_png(50_000, 50_000),
        "too_many_pixels": lambda: _solid_jpeg(2000, 1001),  # 2.002 M > 2 M limit, small file
        "one_by_one": lambda: image_bytes("PNG", 1, 1),
        "absurd_aspect": lambda: image_bytes("PNG", 4000, 16),
        "over_byte_limit": lambda: jpeg_bytes(600, 300, seed=9, quality=100),  # ~> 64 KiB
    }[name]()


@pytest.mark.parametrize("decoder", ["worker", "pool"])
@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_bad_uploads_are_clear_json_errors(request, world, name, decoder):
    client = request.getfixturevalue("client" if decoder == "worker" else "pool_client")
    _, ctype, status, code = BAD_UPLOADS[name]
    data = _bad_payload(name, world)
    if name == "over_byte_limit":
        assert len(data) > 64 * 1024
    _assert_error(_post(client, data, ctype=ctype), status, code)
    assert _post(client, world.pano).status_code == 200  # and the service is fine
    queue = client.app.state.runtime.engine.queue
    assert queue._expected == 0 and queue.depth == 0  # nothing announced or queued is left behind


def test_oversized_body_refused_from_content_length_and_while_streaming(client, world):
    big = b"\xff\xd8\xff" + os.urandom(200 * 1024)
    resp = _post(client, big)  # Content-Length says too much: refused before reading the body
    _assert_error(resp, 413, "upload_too_large")
    assert resp.headers.get("connection") == "close"

    sent = []

    def chunks():  # no Content-Length: chunked transfer; the limit applies as bytes arrive
        boundary = b"xyzBOUNDARY"
        yield (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; '
               b'filename="big.jpg"\r\nContent-Type: image/jpeg\r\n\r\n')
        for _ in range(50):
            sent.append(1)
            yield os.urandom(8192)
        yield b"\r\n--" + boundary + b"--\r\n"

    resp = client.post("/localize", content=chunks(),
                       headers={"Content-Type": "multipart/form-data; boundary=xyzBOUNDARY"})
    _assert_error(resp, 413, "upload_too_large")


@pytest.mark.parametrize("query", ["k=0", "k=101", "k=abc", "k=-3"])
def test_k_out_of_range_is_422(client, world, query):
    resp = client.post(f"/localize?{query}", files={"image": ("p.jpg", world.pano, "image/jpeg")})
    body = _assert_error(resp, 422, "validation_error")
    assert body["detail"][0]["loc"] == ["query", "k"]


def _results(resp) -> list[dict]:
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def test_plain_localize_requests_take_the_direct_route_with_the_same_answers(world, monkeypatch):
    import service.deps as deps
    import service.routes as routes
    from service.engine import NotReady

    direct = []
    real_require_ready = routes.require_ready

    async def counting(request):
        direct.append(request.url.path)
        return await real_require_ready(request)

    monkeypatch.setattr(routes, "require_ready", counting)  # only the direct route calls it so
    files = {"image": ("p.jpg", world.pano, "image/jpeg")}
    with running_client(settings_for(world, world.artifact_a, api_keys="key-one")) as client:
        key = {"X-API-Key": "key-one"}
        plain = _results(client.post("/localize?k=3", files=files, headers=key))
        assert direct == ["/localize"]
        # the same k spelt so that only FastAPI reads it (encoded name, repeated): FastAPI's route
        assert_same_matches(_results(client.post("/localize?%6B=3", files=files, headers=key)), plain)
        assert_same_matches(_results(client.post("/localize?k=3&k=3", files=files, headers=key)), plain)
        assert direct == ["/localize"]
        _assert_error(client.post("/localize?k=3", files=files), 401, "unauthorized")
        assert direct == ["/localize"]  # refused by the key check before readiness, as FastAPI does
        batch = client.post("/localize/batch", files=[("images", ("p.jpg", world.pano, "image/jpeg"))],
                            headers=key)
        assert batch.status_code == 200 and direct[-1] == "/localize/batch"
        assert_same_matches(batch.json()["items"][0]["results"],
                            _results(client.post("/localize", files=files, headers=key)))
        text = client.get("/metrics").text
        assert metric_value(text, "geoloc_http_requests_total", route="/localize", method="POST",
                            status="200") == 4

        async def not_ready():
            raise NotReady("overridden")

        client.app.dependency_overrides[deps.require_ready] = not_ready  # FastAPI's to honour
        try:
            assert "overridden" in _assert_error(
                client.post("/localize", files=files, headers=key), 503, "not_ready")["detail"]
        finally:
            client.app.dependency_overrides.clear()
        assert direct == ["/localize", "/localize/batch", "/localize"]


def test_the_direct_route_refuses_a_route_it_would_not_replicate(monkeypatch):
    from fastapi import APIRouter, BackgroundTasks, Depends, Request

    import service.routes as routes

    async def audit() -> None:
        return None

    router = APIRouter()
    router.add_api_route("/localize", routes.localize_one, methods=["POST"])
    assert len(routes.direct_routes(router.routes)) == 1
    router = APIRouter(dependencies=[Depends(audit)])
    router.add_api_route("/localize", routes.localize_one, methods=["POST"])
    with pytest.raises(RuntimeError, match="does not replicate"):
        routes.direct_routes(router.routes)

    async def with_background(request: Request, runtime: routes.ReadyRuntime,
                              background: BackgroundTasks, k: routes.KQuery = 5) -> None:
        return None

    monkeypatch.setattr(routes, "_DIRECT_ENDPOINTS", (with_background,))
    router = APIRouter()
    router.add_api_route("/localize", with_background, methods=["POST"])
    with pytest.raises(RuntimeError, match="background"):
        routes.direct_routes(router.routes)


def test_missing_field_and_wrong_body_types(client, world):
    body = _assert_error(client.post("/localize", files={"photo": ("p.jpg", world.pano, "image/jpeg")}),
                         422, "validation_error")
    assert body["detail"][0]["loc"] == ["body", "image"]
    _assert_error(client.post("/localize"), 422, "validation_error")
    _assert_error(client.post("/localize", data={"image": "not a file"}), 415,
                  "unsupported_media_type")  # urlencoded form
    _assert_error(client.post("/localize", json={"image": "x"}), 415, "unsupported_media_type")
    _assert_error(client.post("/localize", content=b"--nope\r\n",
                              headers={"Content-Type": "multipart/form-data; boundary=zz"}),
                  400, "bad_multipart")


@pytest.mark.parametrize("method,path", [("GET", "/localize"), ("PUT", "/localize"),
                                         ("DELETE", "/localize/batch"), ("POST", "/healthz"),
                                         ("GET", "/admin/reload")])
def test_wrong_method_is_405(client, method, path):
    _assert_error(client.request(method, path), 405, "method_not_allowed")


def test_unknown_path_is_404_json(client):
    _assert_error(client.get("/nope"), 404, "not_found")


# --- other routes -------------------------------------------------------------------------------

def test_tile_thumbnail(client, world):
    tile_id = _post(client, world.pano, k=1).json()["results"][0]["tile_id"]
    resp = client.get(f"/tiles/{tile_id}")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(resp.content)) as img:
        assert img.format == "JPEG" and max(img.size) <= 256
    _assert_error(client.get("/tiles/does-not-exist"), 404, "unknown_tile")
    sneaky = client.get("/tiles/..%2F..%2Fetc%2Fpasswd")  # ids are looked up, never used as paths
    assert sneaky.status_code == 404 and sneaky.json()["code"] in ("not_found", "unknown_tile")


def test_v1_index_is_the_manifest(client, world):
    resp = client.get("/v1/index")
    assert resp.status_code == 200
    on_disk = json.loads((world.artifact_a / "manifest.json").read_text())
    assert resp.json() == on_disk


def test_docs_openapi_and_page(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/localize", "/localize/batch", "/healthz", "/readyz", "/metrics", "/v1/index",
            "/tiles/{tile_id}", "/admin/reload"} <= set(spec["paths"])
    body = spec["paths"]["/localize"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["image"]
    assert "application/geo+json" in spec["paths"]["/localize"]["post"]["responses"]["200"]["content"]
    assert "FeatureCollection" in spec["components"]["schemas"]
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="image"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_metrics(client, world):
    for _ in range(3):
        _post(client, world.pano)
    _post(client, b"", ctype="image/jpeg")
    text = client.get("/metrics").text
    assert metric_value(text, "geoloc_http_requests_total", route="/localize", method="POST",
                        status="200") >= 3
    assert metric_value(text, "geoloc_http_requests_total", route="/localize", method="POST",
                        status="400") >= 1
    for stage in ("decode", "queue", "encode", "search", "total"):
        assert metric_value(text, "geoloc_stage_duration_seconds_count", stage=stage) >= 3
    assert metric_value(text, "geoloc_batch_size_count") >= 3
    assert "geoloc_queue_depth 0.0" in text
    assert metric_value(text, "geoloc_index_size") == 24
    assert metric_value(text, "geoloc_model_info", fingerprint=world.fingerprint) == 1
    assert metric_value(text, "geoloc_index_info", model_fingerprint=world.fingerprint,
                        count="24") == 1
    assert metric_value(text, "geoloc_ready") == 1


# --- auth, CORS ---------------------------------------------------------------------------------

def test_api_keys(world):
    settings = settings_for(world, world.artifact_a, api_keys="key-one, key-two",
                            admin_token="adm")
    with running_client(settings) as client:
        _assert_error(_post(client, world.pano), 401, "unauthorized")
        _assert_error(_post(client, world.pano, headers={"X-API-Key": "nope"}), 401, "unauthorized")
        assert _post(client, world.pano, headers={"X-API-Key": "key-two"}).status_code == 200
        for path in ("/v1/index", "/tiles/a0000"):
            _assert_error(client.get(path), 401, "unauthorized")
            assert client.get(path, headers={"X-API-Key": "key-one"}).status_code == 200
        _assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer adm"}),
                      401, "unauthorized")
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200
        schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert "APIKeyHeader" in schemes  # documented where keys are required
        with running_client(settings_for(world, world.artifact_a)) as open_client:
            schemes = open_client.get("/openapi.json").json()["components"].get("securitySchemes", {})
            assert "APIKeyHeader" not in schemes
            assert _post(open_client, world.pano).status_code == 200


def test_cors(world):
    settings = settings_for(world, world.artifact_a, cors_origins="https://maps.example")
    with running_client(settings) as client:
        pre = client.options("/localize", headers={
            "Origin": "https://maps.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://maps.example"
        resp = _post(client, world.pano, headers={"Origin": "https://maps.example"})
        assert resp.headers["access-control-allow-origin"] == "https://maps.example"
        other = _post(client, world.pano, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_settings_from_environment(monkeypatch, world):
    from service.settings import Settings

    monkeypatch.setenv("GEOLOC_CHECKPOINT", str(world.checkpoint))
    monkeypatch.setenv("GEOLOC_INDEX", str(world.artifact_a))
    monkeypatch.setenv("GEOLOC_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("GEOLOC_API_KEYS", '["a", "b"]')
    monkeypatch.setenv("GEOLOC_CORS_ORIGINS", "https://x.example,https://y.example")
    monkeypatch.setenv("GEOLOC_ADMIN_TOKEN", "t0k")
    s = Settings()
    assert s.max_batch_size == 4 and s.index == world.artifact_a
    assert [k.get_secret_value() for k in s.api_keys] == ["a", "b"]
    assert s.cors_origins == ["https://x.example", "https://y.example"]
    assert "t0k" not in repr(s)
    monkeypatch.setenv("GEOLOC_QUEUE_SIZE", "2")
    monkeypatch.setenv("GEOLOC_MAX_BATCH_IMAGES", "8")
    with pytest.raises(ValueError):
        Settings()


# --- backpressure -------------------------------------------------------------------------------

def test_full_queue_answers_503_at_once(world):
    settings = settings_for(world, world.artifact_a, queue_size=2, max_batch_images=2,
                            max_batch_size=1, retry_after_s=3)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        gate = threading.Event()
        held = engine.call_in_worker(gate.wait)  # the worker is now busy until we let go
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(client, world.pano)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.queue.depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queue.depth == 2
        t0 = time.perf_counter()
        resp = _post(client, world.pano)
        assert time.perf_counter() - t0 < 1.0
        _assert_error(resp, 503, "overloaded")
        assert resp.headers["retry-after"] == "3"
        gate.set()
        held.result(5)
        for t in threads:
            t.join(10)
        assert [r.status_code for r in results] == [200, 200]
        text = client.get("/metrics").text
        assert metric_value(text, "geoloc_rejected_total", reason="queue_full") == 1


def test_answers_are_compared_with_a_score_tolerance_and_near_ties_as_sets():
    def matches(*pairs):
        return [{"tile_id": t, "score": s} for t, s in pairs]

    want = matches(("a", 0.9), ("b", 0.8), ("c", 0.79999), ("d", 0.5), ("e", 0.49999))
    assert_same_matches(matches(("a", 0.90001), ("c", 0.8), ("b", 0.79999), ("d", 0.5), ("e", 0.5)), want)
    assert_same_matches(matches(("a", 0.9), ("b", 0.8), ("c", 0.79999), ("e", 0.5), ("d", 0.49999)), want)
    for wrong in (matches(("b", 0.9), ("a", 0.8), ("c", 0.79999), ("d", 0.5), ("e", 0.49999)),  # decided order
                  matches(("a", 0.9), ("b", 0.8), ("c", 0.799), ("d", 0.5), ("e", 0.49999)),    # a score
                  matches(("a", 0.9), ("b", 0.8), ("x", 0.79999), ("d", 0.5), ("e", 0.49999)),  # a tile
                  want[:4]):
        with pytest.raises(AssertionError):
            assert_same_matches(wrong, want)


def _post_while_held(client, data: bytes, n: int) -> list:
    """Post ``n`` uploads at once while a control command holds every worker, so that they all
    wait in the queue together; then let go and return the answers."""
    engine = client.app.state.runtime.engine
    gate = threading.Event()
    held = engine.call_in_worker(gate.wait)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(_post(client, data))) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while engine.queue.depth < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.queue.depth == n
    gate.set()
    held.result(5)
    for t in threads:
        t.join(20)
    return results


def test_micro_batching_groups_queued_requests(world):
    settings = settings_for(world, world.artifact_a, queue_size=16, max_batch_size=8)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        results = _post_while_held(client, world.pano, 6)
        sizes = [r.json()["batch_size"] for r in results]
        assert sizes == [6] * 6  # one forward + one search for all six
        first = results[0].json()["results"]
        for r in results:
            assert_same_matches(r.json()["results"], first)
        # six queries are searched as one BLAS product, one alone by a scan: the same answer
        import faiss
        from service.engine import SEARCH_BLAS_MIN_QUERIES

        dim = engine.model.embedding_dim
        assert SEARCH_BLAS_MIN_QUERIES <= 6
        # faiss's own default says which quantity it compares: 20 queries (older faiss) or
        # 128,000 query elements, queries x dimension (faiss-cpu 1.15)
        default = int(subprocess.run(
            [sys.executable, "-c", "import faiss; print(faiss.cvar.distance_compute_blas_threshold)"],
            capture_output=True, text=True, check=True).stdout)
        per_element = {20: False, 128_000: True}[default]
        expected = SEARCH_BLAS_MIN_QUERIES * (dim if per_element else 1)
        assert faiss.cvar.distance_compute_blas_threshold == expected
        alone = _post(client, world.pano).json()
        assert alone["batch_size"] == 1
        assert_same_matches(alone["results"], first)


@pytest.mark.parametrize("decode_threads", [0, 2])
def test_a_bad_upload_fails_alone_and_its_batch_companions_are_answered(world, decode_threads):
    settings = settings_for(world, world.artifact_a, queue_size=16, max_batch_size=8,
                            encoder_workers=1, decode_threads=decode_threads)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        gate = threading.Event()
        engine.call_in_worker(gate.wait)
        truncated = world.pano[: len(world.pano) // 2]
        results: dict[int, object] = {}

        def post(i: int, data: bytes) -> None:
            results[i] = _post(client, data)

        threads = [threading.Thread(target=post, args=(i, data))
                   for i, data in enumerate([world.pano, truncated, world.pano])]
        for t in threads:
            t.start()
        # decoded in the worker: all three wait in the queue; decoded first: the bad one is refused
        want = 3 if decode_threads == 0 else 2
        deadline = time.monotonic() + 10
        while engine.queue.depth < want and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queue.depth == want
        gate.set()
        for t in threads:
            t.join(10)
        _assert_error(results[1], 400, "undecodable_image")
        good = [results[0].json(), results[2].json()]
        assert [g["batch_size"] for g in good] == [2, 2]  # one forward for the two good ones
        assert_same_matches(good[0]["results"], good[1]["results"])
        assert all(g["timing_ms"]["decode"] > 0 for g in good)


@pytest.mark.parametrize("decode_threads", [0, 2])
def test_no_result_in_time_is_504_and_the_job_is_dropped(world, decode_threads):
    settings = settings_for(world, world.artifact_a, request_timeout_s=0.3, encoder_workers=1,
                            decode_threads=decode_threads)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        gate = threading.Event()
        held = engine.call_in_worker(gate.wait)
        t0 = time.monotonic()
        _assert_error(_post(client, world.pano), 504, "timeout")
        assert 0.25 < time.monotonic() - t0 < 5
        gate.set()
        held.result(5)
        assert _post(client, world.pano).status_code == 200
        text = client.get("/metrics").text
        # the timed-out job was skipped, not computed: one image localized (the second request)
        assert metric_value(text, "geoloc_dropped_images_total", reason="timeout") == 1
        assert metric_value(text, "geoloc_images_localized_total") == 1
        assert engine.queue._expected == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_workers_that_fill_the_cpus_are_pinned_one_core_set_each(world, processes):
    cpus = sorted(os.sched_getaffinity(0))

    def pinned_to(engine) -> list[set[int]]:
        if processes:  # each encoder process, seen from outside
            return [os.sched_getaffinity(pid) for pid in engine.encoder_pids]
        return [engine.call_in_worker(lambda: os.sched_getaffinity(0)).result(10)]

    settings = settings_for(world, world.artifact_a, encoder_workers=len(cpus), torch_threads=1,
                            encoder_processes=processes)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        assert len(engine.encoder_pids) == (len(cpus) if processes else 0)
        assert engine.cpu_sets is not None and sorted(c for s in engine.cpu_sets for c in s) == cpus
        seen = pinned_to(engine)
        assert all(s in engine.cpu_sets and len(s) == 1 for s in seen)
        if processes:
            assert sorted(c for s in seen for c in s) == cpus
        assert os.sched_getaffinity(0) == set(cpus)  # the rest of the process is not pinned
        assert _post(client, world.pano).status_code == 200
    unpinned = settings_for(world, world.artifact_a, encoder_workers=len(cpus), torch_threads=1,
                            pin_workers=False, encoder_processes=processes)
    with running_client(unpinned) as client:
        assert pinned_to(client.app.state.runtime.engine)[0] == set(cpus)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_encoder_workers_can_run_nicer_than_the_event_loop(world, processes):
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def worker_niceness(engine) -> int:
        if processes:
            return os.getpriority(os.PRIO_PROCESS, engine.encoder_pids[0])
        return engine.call_in_worker(niceness).result(10)

    before = niceness()
    settings = settings_for(world, world.artifact_a, worker_nice=7, encoder_processes=processes)
    with running_client(settings) as client:
        assert client.app.state.runtime.plan.nice == 7
        assert worker_niceness(client.app.state.runtime.engine) == min(19, before + 7)
        assert niceness() == before  # only the encoder workers
        assert _post(client, world.pano).status_code == 200
    settings = settings_for(world, world.artifact_a, encoder_processes=processes)  # default: as it is
    with running_client(settings) as client:
        assert worker_niceness(client.app.state.runtime.engine) == before


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_two_encoder_workers_run_batches_side_by_side_and_controls_hold_both(world, processes):
    settings = settings_for(world, world.artifact_a, queue_size=16, max_batch_size=1, encoder_workers=2,
                            torch_threads=1, encoder_processes=processes)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        assert engine.workers == 2 and len(engine._threads) == 2
        assert len(set(engine.encoder_pids)) == (2 if processes else 0)
        both_inside = threading.Barrier(2, timeout=10)
        # the step that hands a batch to its forward: the worker's own, or its process's
        step = "_compute_in" if processes else "_encode"
        original = getattr(engine, step)

        def meet_then_go(*args):
            both_inside.wait()  # breaks (and the request fails) unless two batches overlap
            return original(*args)

        setattr(engine, step, meet_then_go)
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(client, world.pano))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
        setattr(engine, step, original)
        # a control command holds every worker: nothing is computed until it returns
        gate = threading.Event()
        held = engine.call_in_worker(gate.wait)
        threads = [threading.Thread(target=lambda: results.append(_post(client, world.pano))) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.queue.depth < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert engine.queue.depth == 3 and len(results) == 2
        gate.set()
        held.result(5)
        for t in threads:
            t.join(10)
        assert [r.status_code for r in results] == [200] * 5


def test_a_killed_encoder_process_fails_only_its_batch_and_is_started_again(world, tmp_path):
    from service.encoder_process import EncoderProcessDied

    settings = settings_for(world, world.artifact_a, encoder_workers=2, torch_threads=1,
                            encoder_processes=True)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        expected = _post(client, world.pano).json()["results"]
        before = list(engine.encoder_pids)
        # killed while idle: started again by its worker (within a second, or at its next batch)
        os.kill(before[0], signal.SIGKILL)
        assert engine._encoders[0]._proc.wait(10) == -signal.SIGKILL  # dead before the next batch
        deadline = time.monotonic() + 30
        while engine.encoder_pids[0] == before[0] and time.monotonic() < deadline:
            answer = _post(client, world.pano)  # served by either process meanwhile
            assert answer.status_code == 200, answer.text
            assert_same_matches(answer.json()["results"], expected)
        assert engine.encoder_pids[0] != before[0]
        # killed mid-batch (a job whose "decoding" is a 30 s sleep that tells us its process):
        # that job fails, the process is started again, the other one serves meanwhile
        marker = tmp_path / "busy.pid"
        slow = client.portal.start_task_soon(lambda: engine.localize(5, decode=functools.partial(
            subprocess.run, ["sh", "-c", f"echo $PPID $$ > {marker}.tmp && mv {marker}.tmp {marker}"
                                         " && sleep 30"]), n=1))
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), "the slow job never reached an encoder process"
        busy, shell = map(int, marker.read_text().split())
        assert busy in engine.encoder_pids
        os.kill(busy, signal.SIGKILL)
        os.kill(shell, signal.SIGKILL)  # (its sleep, orphaned, ends by itself)
        with pytest.raises(EncoderProcessDied, match="ended"):
            slow.result(10)
        answers = [_post(client, world.pano) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        assert client.get("/readyz").status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and metric_value(
                client.get("/metrics").text, "geoloc_encoder_restarts_total") < 2:
            time.sleep(0.05)  # the restart (model load, warm-up) takes a second or two
        assert metric_value(client.get("/metrics").text, "geoloc_encoder_restarts_total") == 2
        assert busy not in engine.encoder_pids and all(e.running for e in engine._encoders)


def test_encoder_processes_that_all_died_idle_come_back_without_a_request(world):
    settings = settings_for(world, world.artifact_a, encoder_workers=2, torch_threads=1,
                            encoder_processes=True)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        before = list(engine.encoder_pids)
        for pid, encoder in zip(before, engine._encoders):
            os.kill(pid, signal.SIGKILL)
            encoder._proc.wait(10)
        assert client.get("/readyz").status_code == 503  # nothing can compute right now
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and metric_value(
                client.get("/metrics").text, "geoloc_encoder_restarts_total") < 2:
            time.sleep(0.05)
        assert metric_value(client.get("/metrics").text, "geoloc_encoder_restarts_total") == 2
        assert client.get("/readyz").status_code == 200
        assert not set(engine.encoder_pids) & set(before)
        assert _post(client, world.pano).status_code == 200


def test_a_process_that_can_not_be_restarted_is_retried_and_never_left_without_its_index(
        world, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(world.artifact_a.resolve(), served)
    settings = settings_for(world, served, encoder_workers=2, torch_threads=1,
                            encoder_processes=True)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        expected = _post(client, world.pano).json()["results"]
        hidden = tmp_path / "hidden"
        os.rename(served, hidden)  # the served artifact's files vanish (a careless pruner)
        os.kill(engine.encoder_pids[0], signal.SIGKILL)
        engine._encoders[0]._proc.wait(10)
        time.sleep(4)  # restarts fail (model loads, the index does not) and are retried
        assert not engine._encoders[0].serving  # never up without the index it would be asked for
        answers = [_post(client, world.pano) for _ in range(4)]  # the other process serves
        assert [a.status_code for a in answers] == [200] * 4
        for a in answers:
            assert_same_matches(a.json()["results"], expected)
        os.rename(hidden, served)
        deadline = time.monotonic() + 60
        while not engine._encoders[0].serving and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine._encoders[0].serving and engine._encoders[0].control("held") == [1]


def test_a_dead_encoder_process_is_answered_503_retry(world, client):
    from service.encoder_process import EncoderProcessDied

    handler = client.app.exception_handlers[EncoderProcessDied]
    response = asyncio.run(handler(None, EncoderProcessDied("encoder process 1 ended (exit status -9)")))
    assert response.status_code == 503 and response.headers["Retry-After"]
    body = json.loads(response.body)
    assert body["code"] == "encoder_restarting" and "exit status -9" in body["detail"]


def test_encoder_plan_pins_hyperthread_siblings_together_and_leaves_openmp_binding_alone(
        world, monkeypatch):
    import service.runtime as runtime

    # 4 logical CPUs numbered like Linux often does: 0/2 and 1/3 are hyper-thread siblings
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(runtime, "_physical_core", lambda cpu: (0, cpu % 2, cpu))
    plan = runtime.encoder_plan(settings_for(world, world.artifact_a))
    assert plan.workers == 2 and plan.threads == 2 and plan.cpu_sets == [{0, 2}, {1, 3}]
    assert runtime.encoder_plan(settings_for(world, world.artifact_a, torch_threads=1)).cpu_sets is None
    monkeypatch.setenv("OMP_PROC_BIND", "true")
    assert runtime.encoder_plan(settings_for(world, world.artifact_a)).cpu_sets is None


def test_encoder_plan(world):
    from service.runtime import encoder_plan

    cpus = sorted(os.sched_getaffinity(0))
    plan = encoder_plan(settings_for(world, world.artifact_a, encoder_workers=3, torch_threads=2))
    assert plan[:2] == (3, 2)
    assert plan.cpu_sets == ([set(cpus[0:2]), set(cpus[2:4]), set(cpus[4:6])] if len(cpus) == 6 else None)
    workers, threads, cpu_sets, *_ = encoder_plan(settings_for(world, world.artifact_a))
    assert workers == (2 if len(cpus) >= 2 else 1) and threads == max(1, len(cpus) // workers)
    if workers * threads == len(cpus) and workers > 1:  # the workers fill the CPUs: one core set each
        assert sorted(c for s in cpu_sets for c in s) == cpus and all(len(s) == threads for s in cpu_sets)
    else:
        assert cpu_sets is None
    assert encoder_plan(settings_for(world, world.artifact_a, pin_workers=False)).cpu_sets is None
    # on a CPU the encoder workers decode their own uploads unless threads are asked for
    assert encoder_plan(settings_for(world, world.artifact_a)).decode_threads == 0
    assert encoder_plan(settings_for(world, world.artifact_a, decode_threads=3)).decode_threads == 3
    assert encoder_plan(settings_for(world, world.artifact_a)).nice == 0
    # the one worker feeding a GPU stays as it is
    assert encoder_plan(settings_for(world, world.artifact_a, device="cuda", worker_nice=5)).nice == 0


# --- hot reload ---------------------------------------------------------------------------------

def _wait_generation(client, generation: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = client.get("/readyz").json()
        if ready["index"]["generation"] >= generation:
            return ready
        time.sleep(0.05)
    raise AssertionError(f"index generation {generation} not reached: {ready}")


def test_watcher_picks_up_a_directory_swap(world, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(world.artifact_a.resolve(), live)
    settings = settings_for(world, live, reload_poll_s=0.1)
    with running_client(settings) as client:
        assert _post(client, world.pano).json()["index"]["count"] == 24
        staged = tmp_path / "live.new"
        shutil.copytree(world.artifact_b.resolve(), staged)
        os.rename(live, tmp_path / "live.old")  # publish by directory swap
        os.rename(staged, live)
        ready = _wait_generation(client, 2)
        assert ready["index"]["count"] == 16
        body = _post(client, world.pano, k=3).json()
        assert body["index"]["generation"] == 2
        assert all(r["tile_id"].startswith("b") for r in body["results"])
        text = client.get("/metrics").text
        assert metric_value(text, "geoloc_index_reloads_total", trigger="watch",
                            result="success") == 1
        assert metric_value(text, "geoloc_index_size") == 16


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_admin_reload_and_broken_artifacts_keep_the_old_index(world, tmp_path, processes):
    link = tmp_path / "current"
    publish_symlink(link, world.artifact_a.resolve())
    settings = settings_for(world, link, admin_token="s3cret", encoder_workers=2, torch_threads=1,
                            encoder_processes=processes)
    auth = {"Authorization": "Bearer s3cret"}
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine

        def held() -> list[list[int]]:  # index generations in each encoder process
            return [e.control("held") for e in engine._encoders] if processes else []

        _assert_error(client.post("/admin/reload"), 401, "unauthorized")
        _assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer x"}),
                      401, "unauthorized")
        same = client.post("/admin/reload", headers=auth)
        assert same.status_code == 200 and same.json()["status"] == "unchanged"
        if processes:  # a process that is down during the swap loads the new index when restarted
            assert held() == [[1], [1]]
            os.kill(engine.encoder_pids[1], signal.SIGKILL)
            engine._encoders[1]._proc.wait(10)

        publish_symlink(link, world.artifact_b.resolve())
        swapped = client.post("/admin/reload", headers=auth).json()
        assert swapped["status"] == "reloaded"
        assert swapped["index"]["count"] == 16 and swapped["previous"]["count"] == 24
        assert swapped["index"]["generation"] == 2
        if processes:
            deadline = time.monotonic() + 30
            while not (engine._encoders[1].serving and engine._encoders[1].running) \
                    and time.monotonic() < deadline:
                assert _post(client, world.pano).json()["index"]["count"] == 16
            assert held() == [[2], [2]]
            results = _post_while_held(client, world.pano, 8)  # both processes get a batch
            assert [r.json()["index"]["count"] for r in results] == [16] * 8

        # Built with another model: refused, the old one keeps serving.
        publish_symlink(link, world.artifact_other.resolve())
        body = _assert_error(client.post("/admin/reload", headers=auth), 409, "reload_failed")
        assert "fingerprint" in body["detail"]
        # Corrupt FAISS file.
        corrupt = tmp_path / "corrupt"
        shutil.copytree(world.artifact_a.resolve(), corrupt)
        (corrupt / "index.faiss").write_bytes(b"garbage")
        publish_symlink(link, corrupt)
        _assert_error(client.post("/admin/reload", headers=auth), 409, "reload_failed")
        # tiles.csv inconsistent with the index.
        short = tmp_path / "short"
        shutil.copytree(world.artifact_a.resolve(), short)
        lines = (short / "tiles.csv").read_text().splitlines()
        (short / "tiles.csv").write_text("\n".join(lines[:-3]) + "\n")
        publish_symlink(link, short)
        body = _assert_error(client.post("/admin/reload", headers=auth), 409, "reload_failed")
        assert "rows" in body["detail"]

        resp = _post(client, world.pano)
        assert resp.status_code == 200 and resp.json()["index"]["count"] == 16
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and "reload failed" in ready["detail"]
        text = client.get("/metrics").text
        assert metric_value(text, "geoloc_index_reloads_total", trigger="admin",
                            result="failure") == 3
        assert metric_value(text, "geoloc_index_reload_failing") == 1

        assert held() == ([[2], [2]] if processes else [])  # refused ones are not kept

        publish_symlink(link, world.artifact_a.resolve())
        assert client.post("/admin/reload", headers=auth).json()["index"]["count"] == 24
        text = client.get("/metrics").text
        assert metric_value(text, "geoloc_index_reload_failing") == 0
        assert client.get("/readyz").json()["detail"] is None
        assert held() == ([[3], [3]] if processes else [])


def test_admin_disabled_without_token(client):
    _assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer x"}),
                  403, "forbidden")

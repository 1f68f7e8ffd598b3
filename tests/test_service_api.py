"""The service in-process, through FastAPI's TestClient: routes, errors, auth, metrics, reload."""
from __future__ import annotations

import asyncio
import contextlib
import csv
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

import numpy as np
import pytest
import torch
from PIL import Image

from ship_support import assert_same_matches
from test_service_support import (  # noqa: F401  (world is a fixture)
    image_bytes, jpeg_bytes, metric_value, publish_symlink, running_client, settings_for, with_gpano_heading, world,
)

pytestmark = pytest.mark.cross_cpu  # compares numbers of two paths: `make test` reruns it with other CPU kernels


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
    with running_client(settings_for(world, world.artifact_a, **_LIMITS)) as c:
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
        assert str(world.root) not in body["detail"]  # the artifact named, not where it lies
        _assert_error(_post(client, world.pano), 503, "not_ready")
    err = capfd.readouterr().err
    line = next(ln for ln in err.splitlines() if "refusing to start" in ln)
    record = json.loads(line)
    assert record["level"] == "CRITICAL"
    assert world.fingerprint in record["msg"] and "model fingerprint" in record["msg"]


def test_directories_with_spaces_and_brackets_stay_out_of_public_answers(world, tmp_path):
    odd = tmp_path / "geo data (prod): v2" / "grid"
    shutil.copytree(world.artifact_other.resolve(), odd)
    link = tmp_path / "serving [blue]" / "current"
    link.parent.mkdir()
    link.symlink_to(odd)
    with running_client(settings_for(world, link), wait=False) as client:
        assert not client.app.state.runtime.wait_loaded(60)
        detail = client.get("/readyz").json()["detail"]
        assert "index artifact grid was built" in detail and "geo data" not in detail and "/" not in detail
        assert "geo data" not in _post(client, world.pano).json()["detail"]


def test_an_unexpected_error_is_a_500_that_carries_its_request_id(world):
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(settings_for(world, world.artifact_a))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    resp = TestClient(app, raise_server_exceptions=False).get("/boom", headers={"X-Request-ID": "req-500"})
    assert resp.status_code == 500 and resp.json() == {
        "detail": "internal server error", "code": "internal_error", "request_id": "req-500"}
    assert resp.headers["x-request-id"] == "req-500"


def test_an_index_path_that_is_a_symlink_loop_is_a_clear_failure(world, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with running_client(settings_for(world, tmp_path / "a"), wait=False) as client:
        assert not client.app.state.runtime.wait_loaded(60)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed", ready.text
        assert str(tmp_path) not in ready.json()["detail"]


def test_missing_index_setting_is_a_clear_failure(world):
    with running_client(settings_for(world, None), wait=False) as client:
        assert not client.app.state.runtime.wait_loaded(60)
        assert "GEOLOC_INDEX" in client.get("/readyz").json()["detail"]


def test_request_ids_are_random_unless_a_safe_one_comes_in():
    import re

    from service.logs import new_request_id

    ids = [new_request_id(None) for _ in range(10_000)]
    assert len(set(ids)) == 10_000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert new_request_id("req-123") == "req-123"
    assert re.fullmatch(r"[0-9a-f]{32}", new_request_id("not safe; id"))


def test_log_lines_are_json_written_by_a_listener_thread_in_order_with_request_ids(capfd):
    import logging

    from service.logs import configure_logging, log, request_id_var, stop_logging

    configure_logging("INFO", json_logs=True)
    writer_threads = []
    original_emit = logging.StreamHandler.emit

    def spy(self, record):
        writer_threads.append(threading.current_thread().name)
        original_emit(self, record)

    token = request_id_var.set("rid-7")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(logging.StreamHandler, "emit", spy)
            for i in range(50):
                log.info("line %d", i, extra={"n": i})
            logging.getLogger("uvicorn.error").info("from uvicorn")  # its lines through the queue too
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
            stop_logging()  # writes every waiting line
    finally:
        request_id_var.reset(token)
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert [r["msg"] for r in lines] == [f"line {i}" for i in range(50)] + ["from uvicorn", "failed"]
    assert all(r["request_id"] == "rid-7" for r in lines)  # taken in the logging thread
    assert lines[3]["n"] == 3 and "ValueError: boom" in lines[-1]["exc"]
    assert writer_threads and threading.main_thread().name not in writer_threads
    assert logging.getLogger("uvicorn.access").getEffectiveLevel() > logging.INFO  # logged once, by us


def test_gauges_of_dead_worker_processes_are_dropped(tmp_path, monkeypatch):
    from prometheus_client import multiprocess

    from service.metrics import _forget_dead_processes

    dead, alive = 2 ** 22 + 1, os.getpid()  # (above Linux's largest pid)
    for name in (f"gauge_livesum_{dead}.db", f"gauge_livesum_{alive}.db", "gauge_livesum_99999999999999999999.db",
                 f"counter_{dead}.db", "gauge_liveall_x.db"):
        (tmp_path / name).write_bytes(b"")
    _forget_dead_processes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"gauge_livesum_{alive}.db", f"counter_{dead}.db", "gauge_liveall_x.db"])

    def raced(pid, path):  # another scrape removed them first
        raise FileNotFoundError(path)

    monkeypatch.setattr(multiprocess, "mark_process_dead", raced)
    (tmp_path / f"gauge_livemax_{dead}.db").write_bytes(b"")
    _forget_dead_processes(str(tmp_path))


def test_plain_log_lines_are_one_line_each_and_the_level_holds_for_uvicorn(capfd):
    import logging

    from service.logs import configure_logging, log, stop_logging

    logging.getLogger("uvicorn.error").setLevel(logging.INFO)  # as uvicorn's own logging set-up leaves it
    configure_logging("WARNING", json_logs=False)
    try:
        forged = "/x\n2026-12-05 11:00:00,000 CRITICAL service.runtime [-] index deleted by admin"
        log.warning("GET %s 404", forged)  # a request path with %0A in it
        logging.getLogger("uvicorn.error").info("not at WARNING")
    finally:
        stop_logging()
    log.warning("after the stop")  # (the app's shutdown stops the writer thread: later lines go straight out)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1].endswith("after the stop") and lines[0].endswith("GET /x\\n2026-12-05 11:00:00,000 CRITICAL service.runtime [-] "
                                                 "index deleted by admin 404")


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
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 4  # the position, then the matches
    assert fc["features"][0]["properties"]["kind"] == "position"
    for feature, match in zip(fc["features"][1:], plain["results"]):
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
    ("Application/GEO+json;Q=0.1, application/json;q=0.5", False), ("application/geo+json ; Q = 0.9", True),
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
    assert sorted(f["properties"]["image"] for f in geo.json()["features"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    too_many = [("images", (f"{i}.jpg", world.pano, "image/jpeg")) for i in range(5)]
    _assert_error(client.post("/localize/batch", files=too_many), 413, "too_many_images")
    bad = files[:1] + [("images", ("bad.jpg", b"not an image at all", "image/jpeg"))]
    body = _assert_error(client.post("/localize/batch", files=bad), 400, "not_an_image")
    assert body["detail"] == "image 1 (bad.jpg) is not an image (JPEG, PNG or WebP)"  # no "<_io.BytesIO at 0x..>"


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


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_bad_uploads_are_clear_json_errors(client, world, name):
    _, ctype, status, code = BAD_UPLOADS[name]
    data = _bad_payload(name, world)
    if name == "over_byte_limit":
        assert len(data) > 64 * 1024
    _assert_error(_post(client, data, ctype=ctype), status, code)
    assert _post(client, world.pano).status_code == 200  # and the service is fine
    assert client.app.state.runtime.engine.depth == 0  # nothing queued is left behind
    assert client.app.state.upload_budget.used == 0  # nor any upload byte held


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


def test_k_must_be_written_as_a_whole_number(client, world):
    files = {"image": ("p.jpg", world.pano, "image/jpeg")}
    for query in ("k=5.0", "k=5e0", "k=%205", "k=0x5"):
        body = _assert_error(client.post(f"/localize?{query}", files=files), 422, "validation_error")
        assert body["detail"][0]["loc"] == ["query", "k"] and "whole number" in body["detail"][0]["msg"]
    encoded = client.post("/localize?%6B=3", files=files)  # the name percent-encoded is still k
    assert encoded.status_code == 200 and len(encoded.json()["results"]) == 3


def test_a_multipart_boundary_over_the_parsers_limit_is_a_400(client, world):
    boundary = "b" * 300
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + world.pano + f"\r\n--{boundary}--\r\n".encode()
    resp = client.post("/localize", content=body,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    body = _assert_error(resp, 400, "bad_multipart")
    assert "256" in body["detail"]


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


def test_a_tile_id_with_a_slash_has_its_thumbnail(world, tmp_path):
    """A catalogue's ids may hold '/' (index_build takes them); the web page asks for /tiles/a%2Fb."""
    artifact = tmp_path / "slashed"
    shutil.copytree(world.artifact_a.resolve(), artifact)
    tiles = artifact / "tiles.csv"
    tiles.write_text(tiles.read_text().replace("\na0000,", "\nzurich/a0000,", 1))
    with running_client(settings_for(world, artifact)) as client:
        for path in ("/tiles/zurich%2Fa0000", "/tiles/zurich/a0000"):
            resp = client.get(path)
            assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg", path
        _assert_error(client.get("/tiles/zurich/a0001"), 404, "unknown_tile")


def test_v1_index_is_the_manifest_without_host_names_or_directories(client, world):
    resp = client.get("/v1/index")
    assert resp.status_code == 200
    on_disk = json.loads((world.artifact_a / "manifest.json").read_text())
    shown = resp.json()
    assert on_disk["build"]["host"] and str(world.root) in on_disk["checkpoint"]  # what must not show
    assert "host" not in shown["build"] and str(world.root) not in resp.text and os.uname().nodename not in \
        json.dumps(shown["build"])
    assert shown["checkpoint"] == "micro.safetensors" and shown["source"].endswith(":tiles.csv")
    assert {k: v for k, v in shown.items() if k not in ("checkpoint", "source", "build")} == \
        {k: v for k, v in on_disk.items() if k not in ("checkpoint", "source", "build")}


def test_docs_openapi_and_page(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "https://" not in docs.text  # no CDN: served from a package
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/favicon.ico"):
        assert client.get(asset).status_code == 200, asset
    assert client.get("/redoc").status_code == 404  # one documentation page: ReDoc fetches a logo from its CDN
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
    # the refusal and drop counters are there at 0 before anything is refused or dropped: an alert reads 0, not "no data"
    for name, reason in (("geoloc_rejected_total", "queue_full"), ("geoloc_rejected_total", "upload_budget"),
                         ("geoloc_dropped_images_total", "client_disconnected"),
                         ("geoloc_dropped_images_total", "timeout"), ("geoloc_dropped_images_total", "shutdown")):
        assert f'{name}{{reason="{reason}"}} 0.0' in text


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


@pytest.mark.parametrize("keys", [",", " , ", "a,", "a,,b", '["a", ""]', '["a", " "]'])
def test_a_blank_api_key_is_refused_not_dropped(monkeypatch, keys):
    """"${K1},${K2}" with both unset must not start a service without authentication."""
    from service.settings import Settings

    monkeypatch.setenv("GEOLOC_API_KEYS", keys)
    with pytest.raises(ValueError, match="GEOLOC_API_KEYS must not contain empty keys"):
        Settings()
    monkeypatch.setenv("GEOLOC_API_KEYS", " ")
    assert Settings().api_keys == []  # blank: no keys, as documented
    monkeypatch.setenv("GEOLOC_CORS_ORIGINS", "https://x.example,")
    with pytest.raises(ValueError, match="GEOLOC_CORS_ORIGINS must not contain empty origins"):
        Settings()


# --- backpressure -------------------------------------------------------------------------------

def test_full_queue_answers_503_at_once(world):
    settings = settings_for(world, world.artifact_a, queue_size=2, max_batch_images=2,
                            max_batch_size=1, retry_after_s=3)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        results = []
        with engine.paused():  # nothing is computed until we let go
            threads = [threading.Thread(target=lambda: results.append(_post(client, world.pano)))
                       for _ in range(2)]
            for t in threads:
                t.start()
            _wait_depth(engine, 2)
            t0 = time.perf_counter()
            resp = _post(client, world.pano)
            assert time.perf_counter() - t0 < 10  # at once: the queue stays paused, it would wait forever
            _assert_error(resp, 503, "overloaded")
            assert resp.headers["retry-after"] == "3"
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


def _wait_depth(engine, n: int) -> None:
    deadline = time.monotonic() + 10
    while engine.depth < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.depth == n


def _post_while_held(client, data: bytes, n: int) -> list:
    """Post ``n`` uploads at once while the engine is paused, so that they all wait in the queue
    together; then let go and return the answers."""
    engine = client.app.state.runtime.engine
    results: list = []
    with engine.paused():
        threads = [threading.Thread(target=lambda: results.append(_post(client, data))) for _ in range(n)]
        for t in threads:
            t.start()
        _wait_depth(engine, n)
    for t in threads:
        t.join(20)
    return results


def test_micro_batching_groups_queued_requests(world):
    settings = settings_for(world, world.artifact_a, queue_size=16, max_batch_size=8)
    with running_client(settings) as client:
        results = _post_while_held(client, world.pano, 6)
        sizes = [r.json()["batch_size"] for r in results]
        assert sizes == [6] * 6  # one forward + one search for all six
        first = results[0].json()["results"]
        for r in results:
            assert_same_matches(r.json()["results"], first)
        alone = _post(client, world.pano).json()
        assert alone["batch_size"] == 1
        assert_same_matches(alone["results"], first)


def test_a_bad_upload_fails_alone_and_its_batch_companions_are_answered(world):
    settings = settings_for(world, world.artifact_a, queue_size=16, max_batch_size=8, encoder_workers=1)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        truncated = world.pano[: len(world.pano) // 2]  # its header passes: decoded by the worker
        results: dict[int, object] = {}

        def post(i: int, data: bytes) -> None:
            results[i] = _post(client, data)

        with engine.paused():
            threads = [threading.Thread(target=post, args=(i, data))
                       for i, data in enumerate([world.pano, truncated, world.pano])]
            for t in threads:
                t.start()
            _wait_depth(engine, 3)
        for t in threads:
            t.join(10)
        _assert_error(results[1], 400, "undecodable_image")
        good = [results[0].json(), results[2].json()]
        assert [g["batch_size"] for g in good] == [2, 2]  # one forward for the two good ones
        assert_same_matches(good[0]["results"], good[1]["results"])
        assert all(g["timing_ms"]["decode"] > 0 for g in good)


def test_no_result_in_time_is_504_and_the_job_is_dropped(world):
    # long enough for a request on a busy machine, short enough for the test
    settings = settings_for(world, world.artifact_a, request_timeout_s=1.0, encoder_workers=1)
    with running_client(settings) as client:
        engine = client.app.state.runtime.engine
        with engine.paused():
            t0 = time.monotonic()
            _assert_error(_post(client, world.pano), 504, "timeout")
            assert 0.95 < time.monotonic() - t0 < 6
        engine.request_timeout_s = 30.0  # the next one must not race the short timeout on a loaded machine
        assert _post(client, world.pano).status_code == 200
        text = client.get("/metrics").text
        # the timed-out job was skipped, not computed: one image localized (the second request)
        assert metric_value(text, "geoloc_dropped_images_total", reason="timeout") == 1
        assert metric_value(text, "geoloc_images_localized_total") == 1


def test_upload_bytes_in_progress_have_a_budget_beyond_which_requests_get_503(world):
    big = jpeg_bytes(600, 150, seed=5, quality=100)  # a panorama; two of them do not fit in the budget
    assert 140_000 < len(big) < 195_000
    settings = settings_for(world, world.artifact_a, max_upload_bytes=200_000, max_batch_images=1,
                            max_inflight_upload_bytes=265_536, retry_after_s=2)  # one body's worth
    with running_client(settings) as client:
        engine, budget = client.app.state.runtime.engine, client.app.state.upload_budget
        results = []
        with engine.paused():  # the first request holds its bytes while it waits
            first = threading.Thread(target=lambda: results.append(_post(client, big)))
            first.start()
            _wait_depth(engine, 1)
            assert budget.used >= len(big)
            refused = _post(client, big)
            _assert_error(refused, 503, "overloaded")
            assert refused.headers["retry-after"] == "2" and "bytes of uploads in progress" in refused.json()["detail"]
        first.join(10)
        assert results[0].status_code == 200 and budget.used == 0  # given back once answered
        assert metric_value(client.get("/metrics").text, "geoloc_rejected_total", reason="upload_budget") == 1
        assert _post(client, big).status_code == 200
    with pytest.raises(ValueError, match="GEOLOC_MAX_INFLIGHT_UPLOAD_BYTES"):
        settings_for(world, world.artifact_a, max_upload_bytes=200_000, max_batch_images=1,
                     max_inflight_upload_bytes=200_000)


def test_head_probes_and_openapi_says_what_each_route_can_answer(world):
    settings = settings_for(world, world.artifact_a, api_keys="k1", admin_token="adm")
    with running_client(settings) as client:
        for path in ("/healthz", "/readyz"):
            assert client.head(path).status_code == 200  # load balancers probe with HEAD
        spec = client.get("/openapi.json").json()
        codes = {(path, method): set(op["responses"]) for path, ops in spec["paths"].items()
                 for method, op in ops.items()}
        assert codes[("/localize", "post")] == {"200", "400", "401", "408", "413", "415", "422", "503", "504"}
        assert codes[("/tiles/{tile_id}", "get")] == {"200", "401", "404", "503"}  # no 422, 413 or 415
        assert codes[("/v1/index", "get")] == {"200", "401", "503"}
        assert codes[("/healthz", "get")] == {"200"}
        reload_op = spec["paths"]["/admin/reload"]["post"]
        assert reload_op["security"] == [{"APIKeyHeader": [], "HTTPBearer": []}]  # both, not either
        _assert_error(client.post("/admin/reload", headers={"X-API-Key": "k1"}), 401, "unauthorized")
        _assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer adm"}), 401, "unauthorized")
        ok = client.post("/admin/reload", headers={"X-API-Key": "k1", "Authorization": "Bearer adm"})
        assert ok.status_code == 200
        assert "HTTPValidationError" not in json.dumps(spec)  # our 422s are ErrorResponse
    with running_client(settings_for(world, world.artifact_a)) as client:
        spec = client.get("/openapi.json").json()
        assert "401" not in spec["paths"]["/localize"]["post"]["responses"]  # no keys: no 401


def test_not_ready_answers_say_why(world):
    with running_client(settings_for(world, world.artifact_a)) as client:
        runtime = client.app.state.runtime
        runtime.engine.stop()  # e.g. shutting down: the encoder threads are gone
        body = client.get("/readyz").json()
        assert body["status"] == "failed" and body["detail"] == "the encoder threads are not running"
        error = _assert_error(_post(client, world.pano), 503, "not_ready")
        assert "service is ready" not in error["detail"]


def test_encoder_plan(world):
    from service.runtime import encoder_plan

    cpus = len(os.sched_getaffinity(0))
    # a forward's threads set by hand: no wide lone image either
    assert encoder_plan(settings_for(world, world.artifact_a, encoder_workers=3, torch_threads=2), False) == (3, 2, None)
    workers, threads, lone = encoder_plan(settings_for(world, world.artifact_a), False)
    assert workers == (2 if cpus >= 2 else 1) and threads == max(1, cpus // workers)
    assert lone == (cpus if cpus >= 2 else None)  # a lone image on every core
    assert encoder_plan(settings_for(world, world.artifact_a, encoder_workers=1), False) == (1, cpus, None)
    assert encoder_plan(settings_for(world, world.artifact_a), True) == (1, None, None)  # a GPU: one thread searches


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


def test_admin_reload_and_broken_artifacts_keep_the_old_index(world, tmp_path):
    link = tmp_path / "current"
    publish_symlink(link, world.artifact_a.resolve())
    settings = settings_for(world, link, admin_token="s3cret", encoder_workers=2, torch_threads=1)
    auth = {"Authorization": "Bearer s3cret"}
    with running_client(settings) as client:
        _assert_error(client.post("/admin/reload"), 401, "unauthorized")
        _assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer x"}),
                      401, "unauthorized")
        same = client.post("/admin/reload", headers=auth)
        assert same.status_code == 200 and same.json()["status"] == "unchanged"

        publish_symlink(link, world.artifact_b.resolve())
        swapped = client.post("/admin/reload", headers=auth).json()
        assert swapped["status"] == "reloaded"
        assert swapped["index"]["count"] == 16 and swapped["previous"]["count"] == 24
        assert swapped["index"]["generation"] == 2
        results = _post_while_held(client, world.pano, 8)
        assert [r.json()["index"]["count"] for r in results] == [16] * 8

        # Built with another model: refused, the old one keeps serving.
        publish_symlink(link, world.artifact_other.resolve())
        body = _assert_error(client.post("/admin/reload", headers=auth), 409, "reload_failed")
        assert "fingerprint" in body["detail"] and str(tmp_path) not in body["detail"]
        assert world.artifact_other.resolve().name in body["detail"]  # named, without its directories
        # Corrupt FAISS file: the reason, without FAISS's C++ function and source file.
        corrupt = tmp_path / "corrupt"
        shutil.copytree(world.artifact_a.resolve(), corrupt)
        (corrupt / "index.faiss").write_bytes(b"garbage")
        publish_symlink(link, corrupt)
        body = _assert_error(client.post("/admin/reload", headers=auth), 409, "reload_failed")
        assert "corrupt/index.faiss: unreadable FAISS index" in body["detail"]  # the artifact's name, not where
        assert ".cpp" not in body["detail"] and "Error in" not in body["detail"] and str(tmp_path) not in body["detail"]
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
        assert str(tmp_path) not in ready["detail"]
        text = client.get("/metrics").text
        assert metric_value(text, "geoloc_index_reloads_total", trigger="admin",
                            result="failure") == 3
        assert metric_value(text, "geoloc_index_reload_failing") == 1


        publish_symlink(link, world.artifact_a.resolve())
        assert client.post("/admin/reload", headers=auth).json()["index"]["count"] == 24
        text = client.get("/metrics").text
        assert metric_value(text, "geoloc_index_reload_failing") == 0
        assert client.get("/readyz").json()["detail"] is None


def test_a_failed_reload_is_no_longer_reported_once_the_served_artifact_is_published_again(world, tmp_path):
    link = tmp_path / "current"
    publish_symlink(link, world.artifact_a.resolve())
    with running_client(settings_for(world, link, reload_poll_s=0.05)) as client:
        publish_symlink(link, world.artifact_other.resolve())  # refused: built for another model

        def detail():
            return client.get("/readyz").json()["detail"]

        deadline = time.monotonic() + 10
        while detail() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload failed" in detail()
        assert metric_value(client.get("/metrics").text, "geoloc_index_reload_failing") == 1
        publish_symlink(link, world.artifact_a.resolve())  # the one still served: nothing to load
        deadline = time.monotonic() + 10
        while detail() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert detail() is None
        assert metric_value(client.get("/metrics").text, "geoloc_index_reload_failing") == 0
        assert client.get("/readyz").json()["index"]["generation"] == 1


def test_an_artifact_published_while_a_broken_one_loads_is_still_picked_up(world, tmp_path, monkeypatch):
    """A failure is remembered as the artifact that failed, not as the one published meanwhile."""
    import service.runtime

    link = tmp_path / "current"
    publish_symlink(link, world.artifact_a.resolve())
    real_load = service.runtime.load_artifact

    def load_then_fail_once(path, **kwargs):
        if kwargs["generation"] == 2 and not list(tmp_path.glob("failed-once")):
            (tmp_path / "failed-once").touch()
            publish_symlink(link, world.artifact_b.resolve())  # the fix arrives while the broken one loads
            raise service.runtime.ArtifactError("broken artifact")
        return real_load(path, **kwargs)

    monkeypatch.setattr(service.runtime, "load_artifact", load_then_fail_once)
    # The watcher alone loads here: an /admin/reload beside it raced it for the first load (which one failed
    # depended on timing; CI saw the watcher's fail and the admin's load the fix).
    with running_client(settings_for(world, link, reload_poll_s=0.05)) as client:
        publish_symlink(link, world.artifact_other.resolve())
        deadline = time.monotonic() + 10
        while client.get("/readyz").json()["index"]["count"] != 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/readyz").json()
        assert ready["index"]["count"] == 16 and ready["detail"] is None
        text = client.get("/metrics").text
        assert [metric_value(text, "geoloc_index_reloads_total", trigger="watch", result=r)
                for r in ("failure", "success")] == [1, 1]


def test_admin_disabled_without_token(client):
    _assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer x"}),
                  403, "forbidden")


# --- limited views: field of view, heading, confidence ------------------------------------------

def _photo(width: int = 160, height: int = 120, *, hfov: float | None = None, heading: float | None = None) -> bytes:
    """A JPEG photo; with EXIF FocalLengthIn35mmFilm / GPSImgDirection as worldgen writes them."""
    from worldgen.dataset import camera_exif, encode_jpeg

    pixels = np.asarray(Image.open(io.BytesIO(jpeg_bytes(width, height, seed=11))).convert("RGB"))
    return encode_jpeg(pixels, exif=camera_exif(hfov, heading, width, height) if hfov is not None else None)


def test_a_perspective_photo_is_encoded_as_a_photo_and_a_panorama_or_crop_is_not(client, world, monkeypatch):
    """Its columns go through the head's photo map where the checkpoint has one (model.orientation --photo-map):
    the encoder is told which views are photos."""
    from model.inference import InferenceEncoder

    flags = []
    real = InferenceEncoder.encode_uint8_with_columns

    def encode(self, images, branch, max_batch=None, columns=True, phases=None, photos=None):
        flags.append(None if photos is None else photos.tolist())
        return real(self, images, branch, max_batch, columns, phases, photos)

    monkeypatch.setattr(InferenceEncoder, "encode_uint8_with_columns", encode)
    assert _post(client, _photo(hfov=65.0, heading=123.0)).status_code == 200
    assert _post(client, world.pano).status_code == 200
    crop = client.post("/localize?fov_deg=90&projection=equirectangular",
                       files={"image": ("c.jpg", jpeg_bytes(160, 120), "image/jpeg")})
    assert crop.status_code == 200
    assert flags == [[True], [False], [False]]


def test_the_field_of_view_and_heading_come_from_parameters_exif_or_the_shape(client, world):
    from model.orientation import HEADING_WITHIN_DEG

    pano = _post(client, world.pano).json()["view"]
    assert pano == {"fov_deg": 360.0, "projection": "equirectangular", "fov_source": "aspect",
                    "heading_deg": None, "heading_source": None, "heading_within_deg": None,  # none given
                    "pitch_deg": 0.0, "roll_deg": 0.0, "tilt_source": None}
    exif = _post(client, _photo(hfov=65.0, heading=123.0)).json()["view"]
    assert exif["tilt_source"] == "estimated" and abs(exif["pitch_deg"]) < 6 and abs(exif["roll_deg"]) < 6
    assert exif["fov_source"] == "exif" and exif["projection"] == "perspective"
    assert exif["fov_deg"] == pytest.approx(65.0, abs=1.0)  # a whole mm of 35 mm focal length
    assert (exif["heading_deg"], exif["heading_source"]) == (123.0, "exif")
    files = {"image": ("p.jpg", _photo(hfov=65.0, heading=123.0), "image/jpeg")}
    given = client.post("/localize?fov_deg=90&heading_deg=10.5", files=files).json()["view"]
    assert (given["fov_deg"], given["fov_source"], given["heading_deg"], given["heading_source"]) == \
        (90.0, "parameter", 10.5, "parameter")  # parameters win over EXIF
    assert given["heading_within_deg"] == HEADING_WITHIN_DEG and exif["heading_within_deg"] == HEADING_WITHIN_DEG
    rough = client.post("/localize?heading_within_deg=40", files=files).json()["view"]  # EXIF's compass, rough
    assert (rough["heading_deg"], rough["heading_source"], rough["heading_within_deg"]) == (123.0, "exif", 40.0)
    crop = client.post("/localize?fov_deg=180&projection=equirectangular",
                       files={"image": ("c.jpg", jpeg_bytes(256, 128), "image/jpeg")})
    assert crop.status_code == 200 and crop.json()["view"]["projection"] == "equirectangular"
    tilted = client.post("/localize?pitch_deg=12.5&roll_deg=-4", files=files).json()["view"]
    assert (tilted["projection"], tilted["pitch_deg"], tilted["roll_deg"], tilted["tilt_source"]) == \
        ("perspective", 12.5, -4.0, "parameter")
    north = client.post("/localize?heading_deg=-0.0&roll_deg=-0", files=files)
    assert '"heading_deg":0.0,' in north.text and '"roll_deg":0.0,' in north.text  # not -0.0
    pitched = client.post("/localize?pitch_deg=3", files=files).json()["view"]  # the roll alone left out: level
    assert (pitched["pitch_deg"], pitched["roll_deg"], pitched["tilt_source"]) == (3.0, 0.0, "parameter")
    for query in ("fov_deg=0", "fov_deg=361", "heading_deg=360", "heading_deg=-1", "projection=fisheye",
                  "pitch_deg=46", "roll_deg=-45.5", "pitch_deg=up", "heading_within_deg=181", "heading_within_deg=-1"):
        _assert_error(client.post(f"/localize?{query}", files=files), 422, "validation_error")
    for query, image in (("pitch_deg=5", world.pano), ("fov_deg=180&projection=equirectangular&roll_deg=3", _photo())):
        body = _assert_error(client.post(f"/localize?{query}", files={"image": ("v.jpg", image, "image/jpeg")}),
                             422, "tilt_not_a_photo")  # a panorama or crop is level: the tilt is not dropped silently
        assert "pitch_deg and roll_deg" in body["detail"] and "projection=perspective" in body["detail"]
    wide_with_lens = ("w.jpg", _photo(256, 64, hfov=65.0, heading=0.0), "image/jpeg")  # 360 by its shape
    _assert_error(client.post("/localize?pitch_deg=5", files={"image": wide_with_lens}), 422, "tilt_not_a_photo")
    level = client.post("/localize?pitch_deg=-0&roll_deg=-0.0", files={"image": ("p.jpg", world.pano, "image/jpeg")})
    assert level.status_code == 200 and str(level.json()["view"]["pitch_deg"]) == "0.0"  # -0 is level, not a tilt
    photos = [("images", (f"{i}.jpg", _photo(hfov=65.0, heading=10.0 * i), "image/jpeg")) for i in range(2)]
    items = client.post("/localize/batch?pitch_deg=-7&roll_deg=2", files=photos).json()["items"]
    assert [(it["view"]["pitch_deg"], it["view"]["roll_deg"]) for it in items] == [(-7.0, 2.0)] * 2
    mixed = [photos[0], ("images", ("pano.jpg", world.pano, "image/jpeg"))]  # one set of parameters for all
    _assert_error(client.post("/localize/batch?pitch_deg=-7", files=mixed), 422, "tilt_not_a_photo")


def test_a_street_view_panorama_s_xmp_heading_is_read_before_exif_after_the_parameter(client, world):
    read = lambda image, query="": client.post(f"/localize{query}", files={"image": ("v.jpg", image, "image/jpeg")})  # noqa: E731
    view = read(with_gpano_heading(world.pano, "123.5")).json()["view"]
    assert (view["fov_source"], view["heading_deg"], view["heading_source"]) == ("aspect", 123.5, "xmp")
    both = read(with_gpano_heading(world.pano, "200", exif_heading=10.0)).json()["view"]
    assert (both["heading_deg"], both["heading_source"]) == (200.0, "xmp")  # the image centre's, by definition
    given = read(with_gpano_heading(world.pano, "200"), "?heading_deg=45").json()["view"]
    assert (given["heading_deg"], given["heading_source"]) == (45.0, "parameter")
    for broken in ("north", "nan", "-1", "361", "1e400"):  # not a heading: read as absent, never a 500
        answer = read(with_gpano_heading(world.pano, broken))
        assert answer.status_code == 200 and answer.json()["view"]["heading_source"] is None, broken


def test_a_photo_of_unknown_field_of_view_is_asked_for_it(client):
    body = _assert_error(_post(client, _photo()), 422, "fov_unknown")
    assert "fov_deg" in body["detail"] and "160x120" in body["detail"]
    assert client.post("/localize?fov_deg=70", files={"image": ("p.jpg", _photo(), "image/jpeg")}).status_code == 200


def test_a_strip_is_not_a_street_level_view(client):
    body = _assert_error(_post(client, image_bytes("PNG", 800, 100)), 400, "bad_dimensions")  # 1:8
    assert "not a street-level view" in body["detail"]
    assert _post(client, image_bytes("PNG", 550, 100)).status_code == 200  # 5.5:1, as CVUSA's panoramas


def test_each_answer_says_how_clearly_its_best_match_wins(world):
    import math

    def far(a, b) -> bool:
        lat = math.radians((a["lat"] + b["lat"]) / 2)
        dy, dx = (a["lat"] - b["lat"]) * 111_195, (a["lon"] - b["lon"]) * 111_195 * math.cos(lat)
        return math.hypot(dx, dy) >= 150

    for margin, ambiguous in ((1.0, True), (0.0, False)):
        with running_client(settings_for(world, world.artifact_a, ambiguity_margin=margin)) as client:
            body = _post(client, world.pano, k=24).json()
            results, confidence = body["results"], body["confidence"]
            competitor = next(r for r in results if far(r, results[0]))  # tiles lie ~1.4 km apart
            assert confidence["competitor_tile_id"] == competitor["tile_id"]
            assert confidence["margin"] == pytest.approx(results[0]["score"] - competitor["score"], abs=1e-4)
            assert confidence["ambiguous"] is ambiguous and confidence["distinct_m"] == 150
            small = _post(client, world.pano, k=1).json()["confidence"]  # looks past the k asked for
            assert small["competitor_tile_id"] == competitor["tile_id"]


@pytest.fixture(scope="module")
def head_world(world, tmp_path_factory):
    """A checkpoint with an orientation head and an index of world A's tiles built with it."""
    from test_service_support import build_artifact, micro_checkpoint

    root = tmp_path_factory.mktemp("head")
    checkpoint = root / "micro_head.safetensors"
    micro_checkpoint(checkpoint, seed=0, orientation_dim=8)
    artifact = build_artifact(world.root / "world_a" / "tiles.csv", checkpoint, root / "index")
    return checkpoint, artifact


def test_with_an_orientation_head_every_match_says_the_view_heading_there(world, head_world):
    checkpoint, artifact = head_world
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["orientation"]["columns"] == 8 and (artifact / "orientation.npy").is_file()
    with running_client(settings_for(world, artifact, checkpoint=checkpoint)) as client:
        body = _post(client, world.pano, k=5).json()
        headings = [m["heading_deg"] for m in body["results"]]
        assert all(h is not None and 0.0 <= h < 360.0 for h in headings)
        assert body["view"]["heading_source"] == "estimated" and body["view"]["heading_deg"] == headings[0]
        # the same as the model computes it against the index's features of those tiles
        from model import load_checkpoint
        from model.inference import InferenceEncoder
        from model.orientation import estimate_headings
        from model.views import place_view

        view, seen = place_view(world.pano, load_checkpoint(checkpoint).config)
        _, columns = InferenceEncoder(load_checkpoint(checkpoint), branches=("ground",)).encode_uint8_with_columns(
            torch.from_numpy(view).permute(2, 0, 1)[None], "ground")
        tile_rows = {r["tile_id"]: i for i, r in enumerate(csv.DictReader(open(artifact / "tiles.csv")))}
        stored = np.load(artifact / "orientation.npy")[[tile_rows[m["tile_id"]] for m in body["results"]]]
        expected = estimate_headings(columns[0], stored.astype(np.float32), seen)
        assert headings == pytest.approx([round(float(h), 1) for h in expected], abs=0.11)
        given = client.post("/localize?heading_deg=30", files={"image": ("p.jpg", world.pano, "image/jpeg")}).json()
        assert (given["view"]["heading_deg"], given["view"]["heading_source"]) == (30.0, "parameter")
        geo = client.post("/localize?k=2", files={"image": ("p.jpg", world.pano, "image/jpeg")},
                          headers={"Accept": "application/geo+json"}).json()
        assert all("heading_deg" in f["properties"] for f in geo["features"] if f["properties"]["kind"] == "match")


def test_an_index_at_tile_phases_meets_each_view_at_as_many_phases(world, head_world):
    """index_build build --tile-phases 2: the service encodes each view at 2 sub-column phases too and its
    headings are the phase-averaged alignment's (model.orientation.view_phase_scores)."""
    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.orientation import estimate_headings
    from model.views import place_view
    from test_service_support import build_artifact

    checkpoint, _ = head_world
    artifact = build_artifact(world.root / "world_a" / "tiles.csv", checkpoint, world.root / "phased_index",
                              "--tile-phases", "2")
    with running_client(settings_for(world, artifact, checkpoint=checkpoint)) as client:
        body = _post(client, world.pano, k=5).json()
    net = load_checkpoint(checkpoint)
    view, seen = place_view(world.pano, net.config)
    vector, columns = InferenceEncoder(net, branches=("ground",)).encode_uint8_with_columns(
        torch.from_numpy(view).permute(2, 0, 1)[None], "ground", phases=2)
    assert columns.shape[:2] == (1, 2)
    tile_rows = {r["tile_id"]: i for i, r in enumerate(csv.DictReader(open(artifact / "tiles.csv")))}
    stored = np.load(artifact / "orientation.npy")[[tile_rows[m["tile_id"]] for m in body["results"]]]
    stored = stored.reshape(len(stored), 2, -1, stored.shape[-1]).astype(np.float32)
    expected = estimate_headings(columns[0], stored, seen)
    assert [m["heading_deg"] for m in body["results"]] == pytest.approx([round(float(h), 1) for h in expected],
                                                                      abs=0.11)
    # GEOLOC_VIEW_PHASES=1: one forward a view, its columns met at the tiles' phases alone
    with running_client(settings_for(world, artifact, checkpoint=checkpoint, view_phases=1)) as client:
        once = _post(client, world.pano, k=5).json()
    _, single = InferenceEncoder(net, branches=("ground",)).encode_uint8_with_columns(
        torch.from_numpy(view).permute(2, 0, 1)[None], "ground")
    stored = np.load(artifact / "orientation.npy")[[tile_rows[m["tile_id"]] for m in once["results"]]]
    expected = estimate_headings(single[0], stored.reshape(len(stored), 2, -1, stored.shape[-1]).astype(np.float32),
                                 seen)
    assert [m["heading_deg"] for m in once["results"]] == pytest.approx([round(float(h), 1) for h in expected],
                                                                      abs=0.11)
    # phases the model's 16-pixel token columns do not split into are refused at start, by name
    with running_client(settings_for(world, artifact, checkpoint=checkpoint, view_phases=3), wait=False) as client:
        assert not client.app.state.runtime.wait_loaded(60)
        assert "GEOLOC_VIEW_PHASES=3" in client.get("/readyz").json()["detail"]


def test_orientation_features_unlike_the_models_are_refused_at_load_not_answered_500(world, head_world, tmp_path):
    """The manifest and orientation.npy agree with each other but not with the model's head."""
    checkpoint, artifact = head_world
    narrow = tmp_path / "narrow"
    shutil.copytree(artifact, narrow)
    np.save(narrow / "orientation.npy", np.load(artifact / "orientation.npy")[:, :4])
    manifest = json.loads((narrow / "manifest.json").read_text())
    manifest["orientation"]["columns"] = 4
    (narrow / "manifest.json").write_text(json.dumps(manifest))
    link = tmp_path / "current"
    publish_symlink(link, artifact)
    with running_client(settings_for(world, link, checkpoint=checkpoint, admin_token="t")) as client:
        publish_symlink(link, narrow)
        body = _assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer t"}),
                             409, "reload_failed")
        assert "orientation features of [4, 8] (columns, dim), the model's orientation head gives [8, 8]" \
            in body["detail"]
        assert _post(client, world.pano).status_code == 200  # the old index still answers
    with running_client(settings_for(world, narrow, checkpoint=checkpoint), wait=False) as client:
        assert client.app.state.runtime.wait_loaded(60) is False
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "orientation head" in ready.json()["detail"]


def test_with_an_orientation_head_the_best_tiles_are_re_ranked_by_their_column_alignment(world, head_world):
    import faiss

    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.orientation import HEADING_WITHIN_DEG, rerank, rerank_candidates
    from model.views import place_view

    checkpoint, artifact = head_world
    net = load_checkpoint(checkpoint)
    encoder = InferenceEncoder(net, branches=("ground",))
    index = faiss.read_index(str(artifact / "index.faiss"))
    tiles = index.reconstruct_n(0, index.ntotal)
    stored = np.load(artifact / "orientation.npy").astype(np.float32)
    ids = [r["tile_id"] for r in csv.DictReader(open(artifact / "tiles.csv"))]
    cases = [(world.pano, "", {}, None), (_photo(), "&fov_deg=90&projection=perspective",
                                           {"fov_deg": 90.0, "projection": "perspective"}, None),
             (_photo(), "&fov_deg=90&pitch_deg=15&roll_deg=-8",  # placed with the phone's tilt
              {"fov_deg": 90.0, "projection": "perspective", "pitch_deg": 15.0, "roll_deg": -8.0}, None),
             # a given heading: aligned within HEADING_WITHIN_DEG of it, or within what the request says
             (_photo(), "&fov_deg=90&heading_deg=30",
              {"fov_deg": 90.0, "projection": "perspective", "heading_deg": 30.0}, HEADING_WITHIN_DEG),
             (world.pano, "&heading_deg=300&heading_within_deg=50", {"heading_deg": 300.0}, 50.0)]
    moved = 0
    with running_client(settings_for(world, artifact, checkpoint=checkpoint)) as client:
        for image, query, placed, within in cases:
            body = client.post(f"/localize?k=8{query}", files={"image": ("v.jpg", image, "image/jpeg")}).json()
            # the same by hand: the best rerank_candidates tiles by descriptor, then model.orientation.rerank
            if placed.get("projection") == "perspective":  # a photo sent without its tilt: the one estimated
                placed = {**placed, "pitch_deg": body["view"]["pitch_deg"], "roll_deg": body["view"]["roll_deg"]}
            view, seen = place_view(image, net.config, **placed)
            vector, columns = encoder.encode_uint8_with_columns(torch.from_numpy(view).permute(2, 0, 1)[None], "ground")
            scores = tiles @ vector[0]
            best = np.argsort(-scores, kind="stable")[:min(rerank_candidates(within), len(ids))]
            expected = rerank(scores[best], columns[0], stored[best], seen, within_deg=within)
            rows = best[expected.order][:8]
            assert [m["tile_id"] for m in body["results"]] == [ids[r] for r in rows]
            assert [m["score"] for m in body["results"]] == pytest.approx(expected.scores[:8].tolist(), abs=1e-4)
            given = placed.get("heading_deg", 0.0)  # a match's heading: the given one, corrected
            assert [m["heading_deg"] for m in body["results"]] == \
                pytest.approx([round(given + float(h), 1) % 360.0 for h in expected.headings[:8]], abs=0.11)
            if within is not None:
                searched = rerank(scores[best], columns[0], stored[best], seen)
                assert not np.array_equal(searched.scores, expected.scores)  # the given heading took part
            moved += int((expected.order[:8] != np.arange(8)).any())
    assert moved  # the re-rank changed an order: the test would see a service that skipped it


def test_a_field_of_view_that_can_not_be_read_is_a_422_and_broken_exif_is_ignored(client, world):
    files = {"image": ("p.jpg", _photo(), "image/jpeg")}
    for query in ("fov_deg=200", "fov_deg=360&projection=perspective", "fov_deg=5"):
        body = _assert_error(client.post(f"/localize?{query}", files=files), 422, "bad_field_of_view")
        assert "field of view" in body["detail"]
    assert client.post("/localize?fov_deg=200&projection=equirectangular", files=files).status_code == 200
    from PIL import Image as PILImage

    out = io.BytesIO()
    exif = PILImage.Exif()
    exif.get_ifd(0x8769)[0xA405] = 0  # FocalLengthIn35mmFilm 0: "unknown" (and 18/0 in the formula)
    PILImage.open(io.BytesIO(_photo())).save(out, format="JPEG", exif=exif)
    body = _assert_error(_post(client, out.getvalue()), 422, "fov_unknown")  # as if no EXIF: asked for it
    assert "fov_deg" in body["detail"]
    pano_with_lens = _photo(256, 64, hfov=65.0, heading=0.0)  # a phone panorama names its lens: 360 by shape
    assert _post(client, pano_with_lens).json()["view"]["fov_source"] == "aspect"


def test_a_portrait_photos_field_of_view_spans_its_upright_width(client):
    from worldgen.dataset import focal_length_35mm

    exif = Image.Exif()
    exif.load(_photo_exif(65.0))
    exif[0x0112] = 6  # stored 160 x 120 on its side: the photo is 120 wide, 160 high
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(160, 120, seed=11))).save(out, format="JPEG", exif=exif)
    view = _post(client, out.getvalue()).json()["view"]
    expected = 2 * np.degrees(np.arctan(18.0 * 120 / 160 / focal_length_35mm(65.0, 160, 120)))
    assert (view["fov_source"], view["fov_deg"]) == ("exif", pytest.approx(expected, abs=0.01))


def _photo_exif(hfov: float) -> bytes:
    from worldgen.dataset import camera_exif

    return camera_exif(hfov, 0.0, 160, 120)  # the stored (sensor) frame: landscape


def test_an_uploads_header_is_opened_once(client, world, monkeypatch):
    import PIL.Image

    photo, opened, real_open = _photo(hfov=65.0, heading=0.0), [], PIL.Image.open

    def counting_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    resp = client.post("/localize?near_from_exif=true", files={"image": ("p.jpg", photo, "image/jpeg")})
    assert resp.status_code == 200 and resp.json()["view"]["fov_source"] == "exif"
    assert len(opened) == 1  # checked, EXIF camera and position read, decoded: one header parse
    files = [("images", (f"{i}.jpg", world.pano, "image/jpeg")) for i in range(2)]
    assert client.post("/localize/batch", files=files).status_code == 200 and len(opened) == 3


@pytest.mark.parametrize("command", [["-m", "service"], ["-m", "uvicorn", "service.app:app"]])
def test_a_bad_environment_value_is_one_line_naming_the_variable(world, command):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_")}
    for name, value, said in (("GEOLOC_QUEUE_SIZE", "lots", "valid integer"),
                              ("GEOLOC_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
                              ("GEOLOC_API_KEYS", "[secret", "")):
        proc = subprocess.run([sys.executable, *command, "--port", "0"], env={**env, name: value},
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and said in lines[0] and "Traceback" not in proc.stderr, lines
        assert "secret" not in proc.stderr  # an API key is never echoed

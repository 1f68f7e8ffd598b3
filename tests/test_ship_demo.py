"""`make demo` (scripts/demo.py) with a random stand-in checkpoint on a tiny region: first run builds
everything, second run reuses it in seconds, the printed curl works, the picture is drawn from a
real query, a new checkpoint triggers a rebuild, and failures say what to do."""
from __future__ import annotations

import json
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ship_support import PY, REPO, clean_env, demo_module, free_port, run, stand_in_checkpoint, stdout_lines

SEED, AREA = 5151, 0.04


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    ckpt = stand_in_checkpoint(base / "stand_in.safetensors")
    return base, ckpt


def demo_cmd(base: Path, ckpt: Path, *extra: str) -> list[str]:
    return [PY, str(REPO / "scripts" / "demo.py"), "--dir", str(base / "demo"), "--checkpoint", str(ckpt),
            "--seed", str(SEED), "--area-km2", str(AREA), "--workers", "1", *extra]


@pytest.fixture(scope="module")
def prepared(demo_setup):
    base, ckpt = demo_setup
    t0 = time.monotonic()
    first = run(demo_cmd(base, ckpt, "--prepare-only"), timeout=300)
    first_s = time.monotonic() - t0
    return base, ckpt, first, first_s


# ------------------------------------------------------------------------------ unit checks

def test_checkpoint_fingerprint_read_from_header_matches_the_model(demo_setup):
    from model import load_checkpoint

    _, ckpt = demo_setup
    assert demo_module().checkpoint_fingerprint(ckpt) == load_checkpoint(ckpt).fingerprint()


def test_checkpoint_fingerprint_of_a_non_safetensors_file(tmp_path):
    junk = tmp_path / "x.safetensors"
    junk.write_bytes(b"\x01")
    assert demo_module().checkpoint_fingerprint(junk) is None


def test_curl_command_is_ready_to_paste(tmp_path, monkeypatch):
    demo = demo_module()
    image = tmp_path / "pano 1.jpg"
    image.write_bytes(b"x")
    q = demo.DemoQuery("000001", image, 47.0, 8.0, "000001")
    line = demo.curl_command(q, "http://127.0.0.1:8000", 5, None)
    argv = shlex.split(line)
    assert argv[:3] == ["curl", "-s", "-F"] and argv[3] == f"image=@{image}"
    assert argv[-1] == "http://127.0.0.1:8000/localize?k=5"
    monkeypatch.setenv("GEOLOC_API_KEYS", "k1,k2")
    assert demo.api_key_from_env() == "k1"
    assert "X-API-Key: k1" in shlex.split(demo.curl_command(q, "http://h", 3, demo.api_key_from_env()))


def test_region_and_index_freshness_checks(tmp_path):
    demo = demo_module()
    world = tmp_path / "world"
    world.mkdir()
    ok, why = demo.region_is_current(world, 1, 2.0)
    assert not ok and "missing" in why
    for name in ("tiles.csv", "queries.csv"):
        (world / name).write_text("tile_id,lat,lon,path\n")
    (world / "world.json").write_text(json.dumps({"seed": 1, "area_km2": 2.0}))
    assert demo.region_is_current(world, 1, 2.0)[0]
    assert "seed" in demo.region_is_current(world, 2, 2.0)[1]
    assert "km²" in demo.region_is_current(world, 1, 3.0)[1]

    index = tmp_path / "index"
    assert demo.index_is_current(index, world / "tiles.csv", "f" * 16) == (False, "none built yet")
    index.mkdir()
    for name in ("index.faiss", "tiles.csv"):
        (index / name).write_text("")
    manifest = {"model_fingerprint": "f" * 16, "catalog_sha256": demo.sha256_file(world / "tiles.csv"),
                "source": f"csv:{world / 'tiles.csv'}", "count": 0}
    (index / "manifest.json").write_text(json.dumps(manifest))
    assert demo.index_is_current(index, world / "tiles.csv", "f" * 16)[0]
    assert "model" in demo.index_is_current(index, world / "tiles.csv", "e" * 16)[1]
    (world / "tiles.csv").write_text("tile_id,lat,lon,path\nx,1,2,a.png\n")
    assert "catalogue changed" in demo.index_is_current(index, world / "tiles.csv", "f" * 16)[1]


def test_makefile_demo_targets():
    text = (REPO / "Makefile").read_text()
    assert re.search(r"^\.PHONY:.*\bdemo\b", text, re.M)
    dry = run(["make", "-n", "demo"], env=clean_env()).stdout
    assert "scripts/demo.py" in dry and "--port 8000" in dry
    dry = run(["make", "-n", "demo", "DEMO_PORT=8123", "DEMO_ARGS=--k 3"], env=clean_env()).stdout
    assert "--port 8123 --k 3" in dry
    assert "--picture docs/demo.png" in run(["make", "-n", "demo-picture"], env=clean_env()).stdout
    # `make test` stays what CI runs
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_missing_checkpoint_says_what_to_do(tmp_path):
    proc = run([PY, str(REPO / "scripts" / "demo.py"), "--dir", str(tmp_path), "--checkpoint",
                str(tmp_path / "nope.safetensors"), "--prepare-only"], check=False, timeout=30)
    assert proc.returncode == 1
    assert "not found" in proc.stderr and "--checkpoint" in proc.stderr


# ------------------------------------------------------------------------------ the real thing

def test_first_run_builds_region_and_index(prepared):
    base, _ckpt, first, _ = prepared
    assert "region: generating" in first.stdout and "index: building" in first.stdout
    assert (base / "demo" / "world" / "queries.csv").is_file()
    assert (base / "demo" / "index" / "manifest.json").is_file()
    assert not list((base / "demo").glob(".world.*")), "no partial region left behind"


def test_second_run_reuses_everything_in_seconds(prepared):
    base, ckpt, _, _ = prepared
    t0 = time.monotonic()
    second = run(demo_cmd(base, ckpt, "--prepare-only"), timeout=60)
    elapsed = time.monotonic() - t0
    assert "region: reusing" in second.stdout and "index: reusing" in second.stdout
    assert "worldgen" not in second.stdout and "index_build" not in second.stdout
    assert elapsed < 5, f"second run took {elapsed:.1f} s"


def test_smoke_and_picture_from_a_real_query(prepared, tmp_path):
    base, ckpt, _, _ = prepared
    png = tmp_path / "demo.png"
    proc = run(demo_cmd(base, ckpt, "--port", str(free_port()), "--smoke", "--picture", str(png), "--k", "3"),
               timeout=180)
    assert "smoke: top-1" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(png).size
    assert w > 800 and h > 500



def test_serve_prints_a_working_curl_and_stops_cleanly_on_ctrl_c(prepared):
    base, ckpt, _, _ = prepared
    port = free_port()
    proc = subprocess.Popen(demo_cmd(base, ckpt, "--port", str(port)), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = stdout_lines(proc)
    seen, curl, web = [], None, None
    try:
        deadline = time.monotonic() + 120
        while curl is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if "web page:" in line:
                web = line.split("web page:")[1].strip()
            if line.strip().startswith("curl "):
                curl = line.strip()
        assert curl, "no curl printed:\n" + "".join(seen[-40:])
        assert web == f"http://127.0.0.1:{port}/"
        assert "/readyz" not in "".join(seen), "our own readiness polls are not shown"
        argv = shlex.split(curl)
        if shutil.which("curl"):
            out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            body = json.loads(out.stdout)
        else:  # the same request without the curl binary
            import httpx

            path = REPO / argv[argv.index("-F") + 1].split("@", 1)[1]
            with open(path, "rb") as f:
                body = httpx.post(argv[-1], files={"image": (path.name, f, "image/jpeg")}, timeout=60).json()
        assert len(body["results"]) == 5
        assert all(-90 <= r["lat"] <= 90 and -180 <= r["lon"] <= 180 for r in body["results"])
        import httpx

        page = httpx.get(web, timeout=10)
        assert page.status_code == 200 and "html" in page.headers["content-type"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code in (0, 130, -signal.SIGINT), code
    with socket.socket() as s:  # the server went with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_port_in_use_is_reported(prepared):
    base, ckpt, _, _ = prepared
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = run(demo_cmd(base, ckpt, "--port", str(port)), check=False, timeout=60)
    assert proc.returncode == 1 and "already in use" in proc.stderr and "DEMO_PORT" in proc.stderr


def test_new_checkpoint_rebuilds_only_the_index(prepared, tmp_path):
    base, _ckpt, _, _ = prepared
    other = stand_in_checkpoint(tmp_path / "other.safetensors", seed=1)
    proc = run(demo_cmd(base, other, "--prepare-only"), timeout=180)
    assert "region: reusing" in proc.stdout
    assert "index: building" in proc.stdout and "it was built with model" in proc.stdout

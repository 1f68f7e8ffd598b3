"""`make demo` (scripts/demo.py) with a random stand-in checkpoint on a tiny region: first run builds
everything (every tile, a few panoramas), second run reuses it after reading only small files and
starts the API without a second start of its own, the printed curl works, the picture is drawn
from a real query, a new checkpoint triggers a rebuild, and failures say what to do."""
from __future__ import annotations

import json
import os
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
PANORAMAS = 3  # of the region's ~20 camera positions: the demo renders panoramas for only a few


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    ckpt = stand_in_checkpoint(base / "stand_in.safetensors")
    return base, ckpt


def demo_cmd(base: Path, ckpt: Path, *extra: str) -> list[str]:
    return [PY, str(REPO / "scripts" / "demo.py"), "--dir", str(base / "demo"), "--checkpoint", str(ckpt),
            "--seed", str(SEED), "--area-km2", str(AREA), "--workers", "1", "--panoramas", str(PANORAMAS), *extra]


@pytest.fixture(scope="module")
def prepared(demo_setup):
    base, ckpt = demo_setup
    first = run(demo_cmd(base, ckpt, "--prepare-only"), timeout=300)
    return base, ckpt, first


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
    # panoramas: a region from before --panoramas has them all; a subset serves as many as it has
    (world / "world.json").write_text(json.dumps({"seed": 1, "area_km2": 2.0, "counts": {"pairs": 50}}))
    assert demo.region_is_current(world, 1, 2.0, None)[0] and demo.region_is_current(world, 1, 2.0, 32)[0]
    (world / "world.json").write_text(json.dumps(
        {"seed": 1, "area_km2": 2.0, "counts": {"pairs": 50, "ground_images": 32}}))
    assert demo.region_is_current(world, 1, 2.0, 32)[0] and demo.region_is_current(world, 1, 2.0, 8)[0]
    ok, why = demo.region_is_current(world, 1, 2.0, 33)
    assert not ok and "panoramas for 32 of its 50" in why
    ok, why = demo.region_is_current(world, 1, 2.0, None)
    assert not ok and "all asked for" in why
    (world / "world.json").write_text(json.dumps(
        {"seed": 1, "area_km2": 2.0, "counts": {"pairs": 20, "ground_images": 20}}))
    assert demo.region_is_current(world, 1, 2.0, 32)[0]  # fewer positions than asked for: all of them

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


def test_panoramas_option():
    parse = demo_module().build_parser().parse_args
    assert parse([]).panoramas == demo_module().DEFAULT_PANORAMAS
    assert parse(["--panoramas", "all"]).panoramas is None and parse(["--panoramas", "5"]).panoramas == 5
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            parse(["--panoramas", bad])


def test_numbers_and_the_query_row_are_checked(tmp_path, capsys):
    demo = demo_module()
    parse = demo.build_parser().parse_args
    assert (parse(["--port", "8001", "--query", "3", "--k", "1"]).port, parse([]).query) == (8001, 0)
    for bad in (["--port", "0"], ["--port", "70000"], ["--query", "-1"], ["--k", "0"]):
        with pytest.raises(SystemExit):
            parse(bad)
    assert "a TCP port is at most 65535" in capsys.readouterr().err
    queries = tmp_path / "queries.csv"
    queries.write_text("query_id,path,lat,lon,tile_id\n000000,a.jpg,47,8,000000\n000001,b.jpg,47,8,000001\n")
    region = demo.Region(tmp_path, tmp_path / "tiles.csv", queries)
    assert demo.demo_query(region, 1).query_id == "000001"
    with pytest.raises(demo.DemoError, match="--query 2: .* lists 2 camera positions \\(rows 0 to 1\\)"):
        demo.demo_query(region, 2)  # not another row, wrapped round


def test_the_picture_script_says_what_is_wrong(tmp_path, capsys):
    from ship_support import script_module

    picture = script_module("scripts/demo_picture.py")
    (tmp_path / "queries.csv").write_text("query_id,path,lat,lon,tile_id\n000000,a.jpg,47,8,000000\n")
    (tmp_path / "a.jpg").write_bytes(b"")
    for world, expected in ((tmp_path / "none", "queries.csv"), (tmp_path, "Connection refused")):
        args = ["--url", f"http://127.0.0.1:{free_port()}", "--world", str(world), "--out", str(tmp_path / "p.png")]
        assert picture.main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("demo_picture: error: ") and expected in err and "Traceback" not in err


def test_stages_start_once_and_do_not_spin(monkeypatch):
    """The service and index_build re-execute themselves unless the glibc settings of
    model.allocator are in their environment: stage_env puts them there (the user's own malloc
    tuning wins), and lets waiting OpenMP threads sleep."""
    import model.allocator as inference

    demo = demo_module()
    env = demo.server_env(Path("ckpt.safetensors"), Path("index"))
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    execs = []
    monkeypatch.setattr(inference.os, "execve", lambda *a: execs.append(a))
    monkeypatch.setattr(inference.os, "environ", env)
    inference.reexec_with_allocator_env("service")
    assert execs == [], "the demo's server would start itself a second time"
    monkeypatch.setattr(inference.os, "environ", {k: v for k, v in env.items() if k not in inference.ALLOCATOR_ENV})
    inference.reexec_with_allocator_env("service")
    assert len(execs) == 1  # without them it would: the check above is not vacuous

    tuned = demo.stage_env({"MALLOC_TOP_PAD_": "65536", "OMP_WAIT_POLICY": "ACTIVE"})
    assert not set(inference.ALLOCATOR_ENV) & set(tuned) and tuned["OMP_WAIT_POLICY"] == "ACTIVE"


def test_makefile_install_says_what_it_does():
    """Each pip step of the install prints a line before it and one after it."""
    dry = run(["make", "-n", "-B", "install"], env=clean_env()).stdout.splitlines()
    pip_steps = [i for i, line in enumerate(dry) if "pip install" in line and not line.startswith("echo ")]
    assert len(pip_steps) == 3, dry
    for n, i in enumerate(pip_steps, 1):
        assert dry[i - 1].startswith(f'echo "install: [{n}/3]'), dry[i - 1]
        assert f'&& echo "install: [{n}/3]' in dry[i], dry[i]


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
    base, _ckpt, first = prepared
    assert "region: generating" in first.stdout and "index: building" in first.stdout
    world = base / "demo" / "world"
    assert (world / "queries.csv").is_file()
    assert (base / "demo" / "index" / "manifest.json").is_file()
    assert not list((base / "demo").glob(".world.*")), "no partial region left behind"
    # every tile is indexed, panoramas exist for the first few positions only
    positions = json.loads((world / "world.json").read_text())["counts"]["pairs"]
    assert positions > PANORAMAS
    assert json.loads((base / "demo" / "index" / "manifest.json").read_text())["count"] == positions
    assert sorted(p.name for p in (world / "streetview").iterdir()) == [f"{i:06d}.jpg" for i in range(PANORAMAS)]
    assert len((world / "queries.csv").read_text().splitlines()) == 1 + PANORAMAS


def test_second_run_reuses_everything(prepared):
    base, ckpt, _ = prepared
    second = run(demo_cmd(base, ckpt, "--prepare-only"), timeout=60)
    # what makes it quick, not a time (a busy box): nothing regenerated, nothing re-encoded; what reuse reads
    # is the next test's
    assert "region: reusing" in second.stdout and "index: reusing" in second.stdout
    assert "worldgen" not in second.stdout and "index_build" not in second.stdout


def test_reuse_checks_read_only_small_files(prepared, monkeypatch):
    """Deciding to reuse the region and the index opens world.json, the catalogue, the manifest and
    the checkpoint (whose header alone is read): no image, no index file, no checkpoint hashing."""
    import builtins

    base, ckpt, _ = prepared
    demo = demo_module()
    opened = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(Path(os.fsdecode(file)).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    demo_dir = base / "demo"
    region = demo.ensure_region(demo_dir, SEED, AREA, None, PANORAMAS, 1, [])
    demo.ensure_index(demo_dir, region, ckpt, [])
    monkeypatch.undo()
    world, index = (demo_dir / "world").resolve(), (demo_dir / "index").resolve()
    assert set(opened) == {world / "world.json", world / "tiles.csv", index / "manifest.json", ckpt.resolve()}
    assert opened.count(ckpt.resolve()) == 1
    assert all(p.stat().st_size < 1 << 20 for p in opened if p != ckpt.resolve())


def test_more_panoramas_regenerate_the_region_but_keep_the_index(demo_setup, tmp_path):
    """The tiles of a region do not depend on how many panoramas it has: asking for all of them
    renders the region again, and its index stays current."""
    _, ckpt = demo_setup
    few = run(demo_cmd(tmp_path, ckpt, "--prepare-only", "--panoramas", "1"), timeout=300)
    assert "region: generating" in few.stdout and "index: building" in few.stdout
    world = tmp_path / "demo" / "world"
    before = {p.name: p.read_bytes() for p in (world / "bingmap").iterdir()}
    first_pano = (world / "streetview" / "000000.jpg").read_bytes()
    every = run(demo_cmd(tmp_path, ckpt, "--prepare-only", "--panoramas", "all"), timeout=300)
    assert "region: regenerating" in every.stdout and "all asked for" in every.stdout
    assert "index: reusing" in every.stdout and "index_build" not in every.stdout
    assert {p.name: p.read_bytes() for p in (world / "bingmap").iterdir()} == before
    assert (world / "streetview" / "000000.jpg").read_bytes() == first_pano
    assert len(list((world / "streetview").iterdir())) == len(before)


def test_smoke_and_picture_from_a_real_query(prepared, tmp_path):
    base, ckpt, _ = prepared
    png = tmp_path / "demo.png"
    proc = run(demo_cmd(base, ckpt, "--port", str(free_port()), "--smoke", "--picture", str(png), "--k", "3"),
               timeout=180)
    assert "smoke: top-1" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(png).size
    assert w > 800 and h > 500



def test_serve_prints_a_working_curl_and_stops_cleanly_on_ctrl_c(prepared):
    base, ckpt, _ = prepared
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
    base, ckpt, _ = prepared
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = run(demo_cmd(base, ckpt, "--port", str(port)), check=False, timeout=60)
    assert proc.returncode == 1 and "already in use" in proc.stderr and "DEMO_PORT" in proc.stderr


def test_new_checkpoint_rebuilds_only_the_index(prepared, tmp_path):
    base, _ckpt, _ = prepared
    other = stand_in_checkpoint(tmp_path / "other.safetensors", seed=1)
    proc = run(demo_cmd(base, other, "--prepare-only"), timeout=180)
    assert "region: reusing" in proc.stdout
    assert "index: building" in proc.stdout and "it was built with model" in proc.stdout

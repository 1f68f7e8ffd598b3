#!/usr/bin/env python3
"""`make demo`: a synthetic region -> its index -> the API on 127.0.0.1:8000, reusing what exists.

    python scripts/demo.py                      # what `make demo` runs (serves until Ctrl-C)
    python scripts/demo.py --prepare-only       # region + index only
    python scripts/demo.py --smoke              # ... then start the API, localise one panorama, stop
    python scripts/demo.py --smoke --picture docs/demo.png   # the README picture (`make demo-picture`)

Steps, each skipped when its result is already there and current:
  1. the region: `python -m worldgen --seed S --area-km2 A --panoramas N --out DIR/world`: every
     aerial tile, but street panoramas for only the first N camera positions (default 32: the demo
     shows one, the web page needs a few to upload; rendering all ~2,000 of them was a third of a
     first run on 2 cores). Generated into a temporary sibling and renamed into place, so an
     interrupted run never leaves half a region; regenerated only when world.json records another
     seed or area, or fewer panoramas than asked for;
  2. the index: `python -m index_build build --catalog DIR/world/tiles.csv --checkpoint CKPT
     --out DIR/index`; rebuilt only when the published manifest names another model fingerprint,
     another catalogue checksum or another catalogue path;
  3. the API: `python -m service` with GEOLOC_CHECKPOINT and GEOLOC_INDEX set; once /readyz
     answers, a ready-to-paste curl and the web page address are printed.

Steps 1 and 2 run the stages' own command lines, exactly as a user would, and the freshness checks
read only small files (world.json, tiles.csv, the checkpoint's safetensors header, manifest.json),
so a second run reaches the server start without importing torch. The stages start with the
environment of `stage_env`, so that they neither start themselves a second time nor spin on a busy
machine.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from model.allocator import allocator_env  # no torch: a second run starts the server without it
from model.arguments import non_negative_int, positive_int

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "weights" / "l2ltr_tiny_demo.safetensors"
# The demo region. The shipped checkpoint was trained on other seeds (weights/README.md), so the
# demo shows the model on a region it has never seen.
DEFAULT_SEED = 4242
DEFAULT_AREA_KM2 = 4.0
# Street panoramas rendered by default: those of the first N camera positions. The demo prints a
# curl for one (--query) and the README suggests uploading others from the web page.
DEFAULT_PANORAMAS = 32


class DemoError(RuntimeError):
    """A step failed; the message says what to do."""


_STDOUT_LOCK = threading.Lock()


def emit(text: str) -> None:
    """Write whole lines at once: the server's log is copied to the same stdout by another thread."""
    with _STDOUT_LOCK:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()


def say(msg: str) -> None:
    emit(f"demo: {msg}")


# ------------------------------------------------------------------------------ small file readers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(path: Path) -> str | None:
    """The `fingerprint` in a .safetensors header (8-byte length + JSON), read without torch.

    model.load_checkpoint verifies it against the weights, so it is the fingerprint the service and
    index_build compute after loading. None when the header does not hold one.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            return None
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            return None
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return None
    meta = header.get("__metadata__") or {}
    return meta.get("fingerprint")


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def relative_to_cwd(path: Path) -> str:
    """A path as short as possible for printing: relative to the working directory when inside it."""
    path = Path(os.path.abspath(path))  # absolute, but symlinks kept (demo/index is one)
    for cwd in {Path(os.path.abspath(Path.cwd())), Path.cwd().resolve()}:
        try:
            return str(path.relative_to(cwd))
        except ValueError:
            pass
    return str(path)


# ------------------------------------------------------------------------------ step 1: the region

@dataclass
class Region:
    world: Path
    tiles_csv: Path
    queries_csv: Path


def region_is_current(world: Path, seed: int, area_km2: float, panoramas: int | None = None) -> tuple[bool, str]:
    """Whether ``world`` is the region asked for, with street panoramas for at least its first
    ``panoramas`` camera positions (None: for every position)."""
    meta_path = world / "world.json"
    for need in (meta_path, world / "tiles.csv", world / "queries.csv"):
        if not need.is_file():
            return False, f"{relative_to_cwd(need)} is missing"
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as exc:
        return False, f"{relative_to_cwd(meta_path)} is unreadable ({exc})"
    if meta.get("seed") != seed:
        return False, f"it was made with seed {meta.get('seed')}, asked for {seed}"
    area = meta.get("area_km2", meta.get("area"))
    if not isinstance(area, (int, float)) or abs(float(area) - area_km2) > 1e-9:
        return False, f"it covers {area} km², asked for {area_km2}"
    counts = meta.get("counts") or {}
    positions = counts.get("pairs")
    rendered = counts.get("ground_images", positions)  # absent: worldgen rendered every panorama
    if isinstance(positions, int) and isinstance(rendered, int):
        wanted = positions if panoramas is None else min(panoramas, positions)
        if rendered < wanted:
            return False, (f"it has panoramas for {rendered} of its {positions} camera positions, "
                           f"{'all' if panoramas is None else wanted} asked for")
    return True, "up to date"


def ensure_region(demo_dir: Path, seed: int, area_km2: float, pairs: int | None, panoramas: int | None,
                  workers: int, extra_args: list[str]) -> Region:
    world = demo_dir / "world"
    current, why = region_is_current(world, seed, area_km2, panoramas)
    if current:
        say(f"region: reusing {relative_to_cwd(world)} (seed {seed}, {area_km2} km²)")
    else:
        which = "every camera position" if panoramas is None else f"the first {panoramas} camera positions"
        if world.exists():
            say(f"region: regenerating {relative_to_cwd(world)}: {why}")
        else:
            say(f"region: generating a {area_km2} km² synthetic region (seed {seed}) into "
                f"{relative_to_cwd(world)}: every aerial tile, street panoramas for {which} (about a minute, once)")
        demo_dir.mkdir(parents=True, exist_ok=True)
        partial = demo_dir / f".world.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [sys.executable, "-m", "worldgen", "--seed", str(seed), "--area-km2", str(area_km2),
               "--out", str(partial), "--workers", str(workers)]
        if pairs is not None:
            cmd += ["--pairs", str(pairs)]
        if panoramas is not None:
            cmd += ["--panoramas", str(panoramas)]
        cmd += extra_args
        try:
            run_step(cmd, "worldgen")
            ok, why = region_is_current(partial, seed, area_km2, panoramas)
            if not ok:
                raise DemoError(f"worldgen finished but its output is not a region: {why}")
            if world.exists():
                old = demo_dir / f".world.old-{os.getpid()}"
                world.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            partial.rename(world)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return Region(world, world / "tiles.csv", world / "queries.csv")


# ------------------------------------------------------------------------------ step 2: the index

def index_is_current(index: Path, catalog: Path, fingerprint: str | None) -> tuple[bool, str]:
    if not index.exists():
        return False, "none built yet"
    manifest_path = index / "manifest.json"
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError) as exc:
        return False, f"{relative_to_cwd(manifest_path)} is unreadable ({exc})"
    if not (index / "index.faiss").is_file() or not (index / "tiles.csv").is_file():
        return False, "the artifact is incomplete"
    if fingerprint is None:
        return False, "the checkpoint header has no fingerprint to compare"
    if manifest.get("model_fingerprint") != fingerprint:
        return False, (f"it was built with model {manifest.get('model_fingerprint')}, the checkpoint is "
                       f"{fingerprint}")
    if manifest.get("catalog_sha256") != sha256_file(catalog):
        return False, "the tile catalogue changed"
    source = manifest.get("source")
    if isinstance(source, str) and source.startswith("csv:") and \
            os.path.realpath(source[4:]) != os.path.realpath(catalog):
        return False, f"it indexes {source[4:]}, not {catalog}"
    return True, f"{manifest.get('count')} tiles, model {fingerprint}"


def ensure_index(demo_dir: Path, region: Region, checkpoint: Path, extra_args: list[str]) -> Path:
    index = demo_dir / "index"
    fingerprint = checkpoint_fingerprint(checkpoint)
    current, why = index_is_current(index, region.tiles_csv, fingerprint)
    if current:
        say(f"index: reusing {relative_to_cwd(index)} ({why})")
        return index
    say(f"index: building {relative_to_cwd(index)} ({why})")
    cmd = [sys.executable, "-m", "index_build", "build", "--catalog", str(region.tiles_csv),
           "--checkpoint", str(checkpoint), "--out", str(index), *extra_args]
    run_step(cmd, "index_build", env=stage_env())
    current, why = index_is_current(index, region.tiles_csv, fingerprint)
    if not current:
        raise DemoError(f"index_build finished but {relative_to_cwd(index)} is not current: {why}")
    return index


def stage_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the stages' programs started here (index_build, the service).

    - model.allocator's glibc settings, unless the user tuned malloc (then theirs wins, and the stages
      do not re-execute either): the program starts once instead of twice.
    - OMP_WAIT_POLICY=PASSIVE unless set: OpenMP threads that wait for each other sleep instead of
      spinning. While the model loads (checkpoint, TorchScript trace, warm-up forwards, with a
      thread per core) a machine busy with other work keeps descheduling one of them, and the
      others spin through their time slices: on this project's shared 2-core box the model set-up
      took 2.4-17 s instead of 0.7-1.4 s (bench/RESULTS.md). On 2 cores the encoding itself runs
      one torch thread per encoder thread, so it has no OpenMP waits to lose.
    """
    env = allocator_env(os.environ if base is None else base)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_step(cmd: list[str], name: str, env: dict[str, str] | None = None) -> None:
    say("$ " + " ".join(shlex.quote(c) for c in display_cmd(cmd)))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise DemoError(f"{name} failed (exit status {proc.returncode}); see its messages above")
    say(f"{name}: done in {time.monotonic() - t0:.0f} s")


def display_cmd(cmd: list[str]) -> list[str]:
    out = ["python" if c == sys.executable else c for c in cmd]
    return [relative_to_cwd(Path(c)) if os.path.isabs(c) and os.path.exists(c) else c for c in out]


# ------------------------------------------------------------------------------ step 3: the API

@dataclass
class DemoQuery:
    query_id: str
    path: Path
    lat: float
    lon: float
    tile_id: str


def demo_query(region: Region, which: int = 0) -> DemoQuery:
    with open(region.queries_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DemoError(f"{region.queries_csv} lists no panoramas")
    if not 0 <= which < len(rows):
        raise DemoError(f"--query {which}: {region.queries_csv} lists {len(rows)} camera positions (rows 0 to "
                        f"{len(rows) - 1})")
    row = rows[which]
    path = Path(row["path"])
    if not path.is_absolute():
        path = region.queries_csv.parent / path
    return DemoQuery(row["query_id"], path, float(row["lat"]), float(row["lon"]), row["tile_id"])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as uvicorn binds: connections of a previous run in TIME_WAIT do not block the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def api_key_from_env() -> str | None:
    """The first GEOLOC_API_KEYS entry, so that the printed curl works when auth is on."""
    raw = os.environ.get("GEOLOC_API_KEYS", "").strip()
    if not raw:
        return None
    if raw.startswith("["):
        keys = json.loads(raw)
    else:
        keys = [k.strip() for k in raw.split(",") if k.strip()]
    return keys[0] if keys else None


def http_get_json(url: str, timeout: float = 2.0) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


def wait_ready(proc: subprocess.Popen, base_url: str, timeout: float,
               server_logged: threading.Event | None = None) -> dict:
    """Poll /readyz every 0.25 s, and at once whenever the server logs a line (`server_logged`, set
    by pump_log): it logs when it becomes ready."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if server_logged is not None:
            server_logged.clear()
        if proc.poll() is not None:
            raise DemoError(f"the API exited with status {proc.returncode} before it was ready"
                            + (f" (last /readyz: {last})" if last else "") + "; see its log above")
        status, body = http_get_json(base_url + "/readyz")
        if status == 200 and body and body.get("status") == "ready":
            return body
        if body:
            last = body.get("detail") or body.get("status")
        if server_logged is not None:
            server_logged.wait(0.25)
        else:
            time.sleep(0.25)
    raise DemoError(f"the API did not become ready within {timeout:.0f} s (last /readyz: {last})")


def curl_command(query: DemoQuery, base_url: str, k: int, api_key: str | None) -> str:
    parts = ["curl", "-s", "-F", f"image=@{relative_to_cwd(query.path)}"]
    if api_key:
        parts += ["-H", f"X-API-Key: {api_key}"]
    parts.append(f"{base_url}/localize?k={k}")
    return " ".join(shlex.quote(p) for p in parts)


def localize(base_url: str, image: Path, k: int, api_key: str | None, timeout: float = 60.0) -> dict:
    """POST one panorama to /localize (multipart field `image`) with the standard library."""
    boundary = "demo-" + hashlib.sha1(str(time.time()).encode()).hexdigest()
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="image"; filename="{image.name}"\r\n'.encode(),
        b"Content-Type: " + (b"image/png" if image.suffix.lower() == ".png" else b"image/jpeg") + b"\r\n\r\n",
        image.read_bytes(), f"\r\n--{boundary}--\r\n".encode(),
    ])
    req = urllib.request.Request(f"{base_url}/localize?k={k}", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    if api_key:
        req.add_header("X-API-Key", api_key)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    import math

    r = 6_371_008.8
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(min(1.0, math.sqrt(a)))


def pump_log(proc: subprocess.Popen, ready: threading.Event, logged: threading.Event | None = None) -> None:
    """Copy the server's log to ours, minus the answers to our own /readyz polls while it loads;
    set `logged` after each line."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if not ready.is_set() and "/readyz" in line:
            continue
        emit(line)
        if logged is not None:
            logged.set()


def server_env(checkpoint: Path, index: Path) -> dict[str, str]:
    env = stage_env()
    env["GEOLOC_CHECKPOINT"] = str(checkpoint.resolve())
    env["GEOLOC_INDEX"] = str(index.absolute())  # the published symlink: rebuilds are picked up live
    env.setdefault("GEOLOC_JSON_LOGS", "false")   # readable logs in a terminal
    return env


def serve(args, checkpoint: Path, index: Path, region: Region) -> int:
    base_url = f"http://{args.host}:{args.port}"
    if not port_is_free(args.host, args.port):
        raise DemoError(f"{args.host}:{args.port} is already in use (another demo still running?). "
                        f"Stop it, or pick another port: make demo DEMO_PORT={args.port + 1}")
    query = demo_query(region, args.query)
    if not query.path.is_file():
        raise DemoError(f"the demo panorama {relative_to_cwd(query.path)} (query row {args.query}) is missing; "
                        f"delete {relative_to_cwd(region.world)} to generate the region again")
    cmd = [sys.executable, "-m", "service", "--host", args.host, "--port", str(args.port)]
    say("api: $ GEOLOC_CHECKPOINT=" + relative_to_cwd(checkpoint) + " GEOLOC_INDEX=" + relative_to_cwd(index)
        + " " + " ".join(display_cmd(cmd)))
    t0 = time.monotonic()
    # Own session: a Ctrl-C in the terminal reaches only this script, which passes it on once
    # (a second SIGINT would make uvicorn skip its graceful shutdown).
    proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(checkpoint, index), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            errors="replace")
    ready_event, logged_event = threading.Event(), threading.Event()
    pump = threading.Thread(target=pump_log, args=(proc, ready_event, logged_event), daemon=True)
    pump.start()

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    old_int = signal.signal(signal.SIGINT, forward)
    old_term = signal.signal(signal.SIGTERM, forward)
    try:
        ready = wait_ready(proc, base_url, args.ready_timeout, logged_event)
        ready_event.set()
        api_key = api_key_from_env()
        idx = ready.get("index") or {}
        lines = [
            "",
            f"Ready in {time.monotonic() - t0:.1f} s: {idx.get('count', '?')} aerial tiles indexed, "
            f"model {(ready.get('model') or {}).get('fingerprint', '?')}.",
            f"  web page:  {base_url}/",
            f"  API docs:  {base_url}/docs",
            f"Localise demo panorama {query.query_id} (taken at {query.lat:.6f}, {query.lon:.6f}; "
            f"true tile {query.tile_id}):",
            f"  {curl_command(query, base_url, args.k, api_key)}",
        ]
        if not (args.smoke or args.picture):
            lines.append("Stop with Ctrl-C.")
        emit("\n".join(lines) + "\n\n")
        if args.smoke or args.picture:
            answer = localize(base_url, query.path, args.k, api_key)
            results = answer.get("results") or []
            if not results:
                raise DemoError(f"/localize answered without results: {answer}")
            top = results[0]
            err = haversine_m(query.lat, query.lon, top["lat"], top["lon"])
            rank = next((r["rank"] for r in results if r["tile_id"] == query.tile_id), None)
            say(f"smoke: top-1 {top['tile_id']} at {top['lat']:.6f}, {top['lon']:.6f} ({err:.0f} m from the "
                f"truth); true tile " + (f"at rank {rank}" if rank else f"not in the top {args.k}"))
            if args.picture:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                from demo_picture import make_picture

                out = make_picture(base_url, region.world, Path(args.picture), query=args.query, k=args.k,
                                   api_key=api_key)
                say(f"picture: wrote {relative_to_cwd(out)}")
            return 0
        code = proc.wait()
        pump.join(timeout=2)
        return code
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


# ------------------------------------------------------------------------------ main

def panorama_count(text: str) -> int | None:
    """--panoramas: a positive count, or 'all' (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of panoramas or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (the demo shows one), got {value}")
    return value


def port_number(text: str) -> int:
    """--port: a TCP port, 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/demo.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every step is skipped when its output exists and is current; delete DIR to start over.")
    p.add_argument("--dir", default=str(REPO / "demo"), help="where the region and the index go (default: demo/)")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="L2LTR checkpoint (default: the shipped weights/l2ltr_tiny_demo.safetensors)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"region seed (default {DEFAULT_SEED})")
    p.add_argument("--area-km2", type=float, default=DEFAULT_AREA_KM2,
                   help=f"region size (default {DEFAULT_AREA_KM2})")
    p.add_argument("--pairs", type=int, default=None, help="passed to worldgen --pairs (default: worldgen's)")
    p.add_argument("--panoramas", type=panorama_count, default=DEFAULT_PANORAMAS, metavar="N|all",
                   help=f"street panoramas to render: those of the first N camera positions, or 'all' "
                        f"(default {DEFAULT_PANORAMAS}; every aerial tile is rendered and indexed either way)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="worldgen render processes (default: up to 4, one per core)")
    p.add_argument("--worldgen-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for worldgen (repeatable), e.g. --worldgen-arg=--tile-px=384")
    p.add_argument("--index-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for index_build build (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address the API listens on (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=port_number, default=8000, help="port of the API (default 8000)")
    p.add_argument("--k", type=positive_int, default=5, help="matches asked for in the printed curl (default 5)")
    p.add_argument("--query", type=non_negative_int, default=0, help="row of queries.csv used as the demo panorama")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    p.add_argument("--prepare-only", action="store_true", help="make the region and the index, do not serve")
    p.add_argument("--smoke", action="store_true",
                   help="start the API, localise the demo panorama once, stop (exit 0 on success)")
    p.add_argument("--picture", metavar="PNG", help="write the README picture from a real query, then stop")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    checkpoint = Path(args.checkpoint)
    demo_dir = Path(args.dir)
    try:
        if not checkpoint.is_file():
            raise DemoError(
                f"checkpoint {checkpoint} not found. The demo model ships in weights/; pass another one "
                "with --checkpoint (e.g. make demo DEMO_ARGS='--checkpoint my.safetensors')")
        # the panorama of the demo query (--query) is one of those rendered
        panoramas = None if args.panoramas is None else max(args.panoramas, args.query + 1)
        region = ensure_region(demo_dir, args.seed, args.area_km2, args.pairs, panoramas, args.workers,
                               args.worldgen_arg)
        demo_query(region, args.query)  # a --query past the region's cameras: said now, before the index
        index = ensure_index(demo_dir, region, checkpoint, args.index_arg)
        if args.prepare_only:
            say(f"prepared: region {relative_to_cwd(region.world)}, index {relative_to_cwd(index)}")
            return 0
        return serve(args, checkpoint, index, region)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

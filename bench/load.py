"""Load benchmark of the service: a bounded load generator against a local uvicorn (loopback only).

Measures, in one run and on the same machine:
  * the raw ground-branch encoder: batch-1 latency and batched throughput (no HTTP, no decode);
  * the service at concurrency 1: p50 / p99 request latency;
  * the service at concurrency 16: throughput, compared with the raw batched encoder (one forward
    at a time; each batch size with its better thread count, measured right before and right after
    the service, the best of them: the target's reference) and, for
    information, with one-thread lanes side by side (how the service's encoder workers split a
    multi-core CPU, without any HTTP, decoding or search).
Targets (issue 18): service throughput >= 0.70 x raw (>= 0.90 x with --config small); p50 at
c=1 <= encoder batch-1 time + 5 ms. Also reported: the server's CPU per request outside the encoder
(its CPU time per request at full load less the raw encoder's CPU time per image in one-thread lanes,
as the service encodes on a CPU; a forward over several threads costs more CPU: their spinning), the
number of requests behind the c=1 percentiles, and the failed requests (not counted in the throughput).
Both sides run with the glibc allocator settings of model.allocator.ALLOCATOR_ENV (this script
starts itself again with them, as `python -m service` does).
The raw and the service measurements alternate for --rounds rounds and medians are reported, so a
change in what else runs on the machine hits both sides; the CPU time other programs took during
each measurement is reported too (/proc/stat minus the server's and this process's own CPU time).

  python bench/load.py                                   # random tiny model + 10k random tiles
  python bench/load.py --checkpoint weights/l2ltr_tiny_demo.safetensors --index demo/index

Without --checkpoint a randomly initialised L2LTRConfig.named("tiny") checkpoint is made; without
--index a 10k-tile artifact of random unit vectors for that checkpoint is written (docs/INTERFACES.md
format, FAISS IndexFlatIP). Everything stays on 127.0.0.1; request counts and durations are bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import csv
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import L2LTR, L2LTRConfig, load_checkpoint, save_checkpoint  # noqa: E402
from model.encode import available_cpus, pick_device  # noqa: E402
from model.allocator import reexec_with_allocator_env  # noqa: E402
from model.inference import InferenceEncoder  # noqa: E402

BOUNDARY = "geolocbenchboundary"
RESPONSE_TIMEOUT_S = 60.0  # a run that has not ended this long after its last request fails
LATENCY_MARGIN_MS = 5.0  # c=1 p50 <= raw batch-1 + this
THROUGHPUT_TARGET = {"small": 0.90}  # x raw at c=16, by config; others: 0.70


# --- inputs ---------------------------------------------------------------------------------------

_COMPLETED: list[bool] = []  # set when main has measured everything


def make_checkpoint(path: Path, config: str, seed: int) -> None:
    torch.manual_seed(seed)
    net = L2LTR(L2LTRConfig.named(config)).eval()
    save_checkpoint(net, path, metadata={"provenance": {"purpose": "bench/load.py, random init"}})


def make_random_artifact(out: Path, checkpoint: Path, tiles: int, seed: int) -> None:
    """An index artifact of random unit vectors (the service's cost does not depend on them)."""
    import faiss

    net = load_checkpoint(checkpoint)
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((tiles, net.embedding_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True)
    thumb = tmp / "tile.png"
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(thumb)
    index = faiss.IndexFlatIP(net.embedding_dim)
    index.add(vectors)
    faiss.write_index(index, str(tmp / "index.faiss"))
    lat = rng.uniform(46.0, 47.0, tiles)
    lon = rng.uniform(7.0, 8.0, tiles)
    with (tmp / "tiles.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["tile_id", "lat", "lon", "source"])
        for i in range(tiles):
            w.writerow([f"{i:06d}", f"{lat[i]:.7f}", f"{lon[i]:.7f}", str(out / "tile.png")])
    manifest = {
        "format_version": 1, "model_fingerprint": net.fingerprint(),
        "model_config": net.config.to_dict(), "embedding_dim": net.embedding_dim,
        "metric": "inner_product", "count": tiles, "index_type": "Flat", "index_params": {},
        "faiss_version": faiss.__version__,
        "catalog_sha256": hashlib.sha256(f"random-{tiles}-{seed}".encode()).hexdigest(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"generator": "bench/load.py random vectors", "seed": seed},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.rename(tmp, out)


def panorama_jpeg(path: Path | None, size: tuple[int, int], seed: int) -> bytes:
    if path is not None:
        return path.read_bytes()
    w, h = size
    rng = np.random.default_rng(seed)
    # Smooth-ish content (not white noise) so the JPEG is a realistic size for its resolution.
    small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def multipart(image: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="pano.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


# --- raw encoder ----------------------------------------------------------------------------------

_RAW_CACHE: dict = {}


def raw_encoder(checkpoint: Path, device: str, batch: int, seconds: float,
                batch1_only: bool = False, threads: tuple[int, ...] = ()) -> dict:
    """The encoder at its best: each torch thread count in `threads` is tried, the best kept."""
    if threads:
        trials = []
        saved = torch.get_num_threads()
        for n in threads:
            torch.set_num_threads(n)
            trial = raw_encoder(checkpoint, device, batch, seconds / len(threads), batch1_only)
            trial["threads"] = n
            trials.append(trial)
        torch.set_num_threads(saved)
        key = (lambda t: -t["batch1_ms_p50"]) if batch1_only else (lambda t: t["batched_img_s"])
        best = dict(max(trials, key=key))
        best["trials"] = trials
        return best
    dev = pick_device(device)
    key = (str(checkpoint), str(dev))
    if key not in _RAW_CACHE:
        _RAW_CACHE[key] = InferenceEncoder(load_checkpoint(checkpoint), dev, branches=("ground",))
    net = _RAW_CACHE[key]
    h, w = net.config.ground_size
    x1 = torch.randn(1, 3, h, w)
    xb = torch.randn(batch, 3, h, w)
    for _ in range(5):
        net.encode(x1, "ground")
    net.encode(xb, "ground")
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(lat) < 20:
        t = time.perf_counter()
        net.encode(x1, "ground")
        lat.append((time.perf_counter() - t) * 1000.0)
    if batch1_only:
        return {"batch1_ms_p50": statistics.median(lat), "n": len(lat)}
    return {"batch1_ms_p50": statistics.median(lat),
            "batched_img_s": _batched_img_s(net, xb, dev, seconds), "batch": batch}


def _batched_img_s(net, xb: torch.Tensor, device, seconds: float) -> float:
    """Images per second encoding the batch `xb` back to back for `seconds` (3 batches at least)."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3 * xb.shape[0]:
        net.encode(xb, "ground")
        n += xb.shape[0]
    return n / (time.perf_counter() - start)


def raw_steady(checkpoint: Path, device: str, batch: int, threads: int, seconds: float) -> tuple[float, float]:
    """(images per second, CPU ms per image) of one raw configuration, batches back to back for
    `seconds`: the reference measured right before and right after each service measurement."""
    net = _RAW_CACHE[(str(checkpoint), str(pick_device(device)))]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xb = torch.randn(batch, 3, *net.config.ground_size)
        net.encode(xb, "ground")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        img_s = _batched_img_s(net, xb, device, seconds)
        images = img_s * (time.perf_counter() - wall0)
        return img_s, 1000.0 * (time.process_time() - cpu0) / max(1.0, images)
    finally:
        torch.set_num_threads(saved)


def raw_lanes(checkpoint: Path, device: str, batch: int, seconds: float, lanes: int) -> dict:
    """`lanes` threads encoding batches side by side, one torch thread each: the encoder's best
    throughput on a multi-core CPU, and what the service's encoder workers do (without HTTP,
    decoding or search)."""
    import threading

    raw_encoder(checkpoint, device, batch, 0.2)  # loads and warms the shared model
    net = _RAW_CACHE[(str(checkpoint), str(pick_device(device)))]
    h, w = net.config.ground_size
    counts = [0] * lanes
    start = threading.Barrier(lanes + 1)
    stop = time.perf_counter() + 1e9

    def lane(i: int) -> None:
        torch.set_num_threads(1)
        x = torch.randn(batch, 3, h, w)
        net.encode(x, "ground")
        start.wait()
        while time.perf_counter() < stop:
            net.encode(x, "ground")
            counts[i] += batch

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
    for t in threads:
        t.start()
    start.wait()
    t0, cpu0 = time.perf_counter(), time.process_time()
    stop = t0 + seconds
    for t in threads:
        t.join()
    cpu_s = time.process_time() - cpu0  # the lanes' (this process does nothing else meanwhile)
    return {"lanes": lanes, "batch": batch, "img_s": sum(counts) / (time.perf_counter() - t0),
            "cpu_ms_per_image": 1000.0 * cpu_s / max(1, sum(counts))}


# --- server ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        full = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_")}
        full.update(env)
        # the repo first, then what the caller had (e.g. wheels installed with pip --target)
        full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full.get("PYTHONPATH")) if p)
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env=full, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the service exited ({self.proc.returncode}); see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"the service is not ready after 120 s; see {log}")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _metric_sum(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- load -----------------------------------------------------------------------------------------

def run_load(port: int, body: bytes, concurrency: int, max_requests: int, max_seconds: float,
             query: str = "k=5") -> dict:
    """Closed loop: `concurrency` clients, each with one keep-alive connection, send requests
    back to back until `max_requests` in total or `max_seconds` have passed.

    The clients are coroutines on one event loop writing pre-built request bytes: on a 2-core box
    the load generator shares the CPUs with the server, so it should cost as little as possible
    (uvloop where installed, as for the server)."""
    coro = _run_load(port, body, concurrency, max_requests, max_seconds, query)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length is None:
        raise RuntimeError(f"response without Content-Length: {lines[0]!r}")
    return status, await reader.readexactly(length)


async def _run_load(port: int, body: bytes, concurrency: int, max_requests: int, max_seconds: float,
                    query: str) -> dict:
    request = (f"POST /localize?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    server_ms: list[dict] = []
    errors: dict[int, int] = {}
    issued = [0]
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    deadline = time.perf_counter() + max_seconds

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while issued[0] < max_requests and time.perf_counter() <= deadline:
            issued[0] += 1
            t = time.perf_counter()
            writer.write(request)
            status, payload = await _read_response(reader)
            elapsed = (time.perf_counter() - t) * 1000.0
            if status == 200:
                latencies.append(elapsed)
                if len(server_ms) < 2000:
                    server_ms.append(json.loads(payload)["timing_ms"])
            else:
                errors[status] = errors.get(status, 0) + 1
        writer.close()

    t0 = time.perf_counter()
    # one timeout for the whole run: wait_for per request would cost a task per request
    await asyncio.wait_for(asyncio.gather(*(client(r, w) for r, w in connections)),
                           max_seconds + RESPONSE_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100.0 * (len(lat) - 1))))] if lat else float("nan")

    def mean_of(key: str) -> float:
        return statistics.fmean(s[key] for s in server_ms) if server_ms else float("nan")

    return {
        "concurrency": concurrency, "ok": len(lat), "errors": errors, "seconds": elapsed,
        "throughput_rps": len(lat) / elapsed, "p50_ms": pct(50), "p90_ms": pct(90),
        "p99_ms": pct(99), "max_ms": lat[-1] if lat else float("nan"),
        "server_mean_ms": {key: mean_of(key) for key in ("decode", "queue", "encode", "search", "total")},
    }


class CpuMeter:
    """CPU seconds used by the whole machine, by the server process (with its encoder processes)
    and by this process, so the report can say how much of the machine other programs took while
    we measured."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> tuple[float, float, float, float]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
        idle = values[3] + values[4]  # idle + iowait
        busy = sum(values[:8]) - idle  # user..steal, without guest (already in user)
        return (time.perf_counter(), busy / self.tick, self._tree_cpu(self.server_pid),
                self._proc_cpu("self")[1])

    def _proc_cpu(self, pid: int | str) -> tuple[int, float]:
        """(parent pid, CPU seconds) of one process."""
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(parts[1]), (int(parts[11]) + int(parts[12])) / self.tick

    def _tree_cpu(self, pid: int) -> float:
        """CPU seconds of the server and of its child processes (the encoder processes)."""
        total = self._proc_cpu(pid)[1]
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != pid:
                try:
                    parent, cpu = self._proc_cpu(entry)
                except (OSError, ValueError, IndexError):
                    continue  # gone meanwhile
                if parent == pid:
                    total += cpu
        return total

    def start(self) -> None:
        self._t0 = self._sample()

    def stop(self) -> dict:
        t1 = self._sample()
        wall = t1[0] - self._t0[0]
        total, server, me = (t1[i] - self._t0[i] for i in (1, 2, 3))
        return {"wall_s": wall, "cpus_busy": total / wall, "server_cpus": server / wall,
                "bench_cpus": me / wall, "other_cpus": max(0.0, total - server - me) / wall,
                "server_cpu_s": server}


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def other_load() -> str:
    try:
        load1, load5, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"load average before the run {load1:.2f} (1 min) / {load5:.2f} (5 min)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="default: a random L2LTRConfig.named(--config) one")
    p.add_argument("--config", default="tiny", help="named config for the random checkpoint")
    p.add_argument("--index", type=Path, help="artifact dir; default: --tiles random vectors")
    p.add_argument("--tiles", type=int, default=10_000)
    p.add_argument("--image", type=Path, help="panorama to send; default: a synthetic JPEG")
    p.add_argument("--image-size", default="512x128", help="WxH of the synthetic panorama")
    p.add_argument("--params", default="", metavar="QUERY",
                   help="more query parameters of each POST /localize (k=5 and these), e.g. for a phone photo "
                   "sent as --image: 'fov_deg=90&projection=perspective' (its tilt then estimated) or with "
                   "'&pitch_deg=0&roll_deg=0' (given)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=8, help="GEOLOC_MAX_BATCH_SIZE")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="GEOLOC_MAX_BATCH_WAIT_MS")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate raw/service measurements this many times; medians reported")
    p.add_argument("--c1-requests", type=int, default=200)
    p.add_argument("--c1-seconds", type=float, default=6.0)
    p.add_argument("--load-requests", type=int, default=3000)
    p.add_argument("--load-seconds", type=float, default=8.0)
    p.add_argument("--raw-seconds", type=float, default=3.0)
    p.add_argument("--log-level", default="INFO", help="GEOLOC_LOG_LEVEL of the server")
    p.add_argument("--raw-threads", default="1,2",
                   help="torch thread counts tried for the raw encoder; the best one is the reference")
    p.add_argument("--raw-batches", default="16",
                   help="batch sizes tried for the raw encoder besides --max-batch-size; best kept")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the server (e.g. GEOLOC_TORCH_THREADS=2)")
    p.add_argument("--workdir", type=Path, help="keep generated files here (default: temp dir)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    reexec_with_allocator_env()  # the raw reference and the server alike

    work = args.workdir or Path(tempfile.mkdtemp(prefix="geoloc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.workdir is None:  # a temporary one goes when the run completes; kept, with the server's log, if it fails
        atexit.register(lambda: _COMPLETED and shutil.rmtree(work, ignore_errors=True))
    note_load = other_load()
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / f"random_{args.config}.safetensors"
        if not checkpoint.exists():
            make_checkpoint(checkpoint, args.config, seed=0)
    index = args.index
    if index is None:
        index = work / f"random_{args.tiles}"
        if not index.exists():
            make_random_artifact(index, checkpoint, args.tiles, seed=0)
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    image = panorama_jpeg(args.image, (w, h), seed=1)
    w, h = Image.open(io.BytesIO(image)).size  # --image's own
    body = multipart(image)
    query = "k=5" + (f"&{args.params.lstrip('&?')}" if args.params else "")

    env = {"GEOLOC_CHECKPOINT": str(checkpoint), "GEOLOC_INDEX": str(index),
           "GEOLOC_DEVICE": args.device, "GEOLOC_MAX_BATCH_SIZE": str(args.max_batch_size),
           "GEOLOC_MAX_BATCH_WAIT_MS": str(args.max_wait_ms),
           "GEOLOC_QUEUE_SIZE": str(max(64, 4 * args.concurrency)),
           "GEOLOC_RELOAD_POLL_S": "0", "GEOLOC_LOG_LEVEL": args.log_level}
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    print(f"checkpoint {checkpoint}\nindex      {index}\nimage      {w}x{h} JPEG, {len(image)} bytes\n"
          f"query      {query}")
    raw_threads = tuple(int(t) for t in args.raw_threads.split(",") if t)
    cpus = available_cpus()
    raw_batches = sorted({args.max_batch_size, *(int(b) for b in args.raw_batches.split(",") if b)})
    server = Server(env, work / "uvicorn.log")
    meter = CpuMeter(server.proc.pid)
    rounds: list[dict] = []
    try:
        warm = run_load(server.port, body, 1, 30, 10, query)  # warm-up of the service
        if warm["errors"] or not warm["ok"]:
            raise SystemExit(f"bench/load.py: the service answered the warm-up requests with {warm['errors']} "
                             f"(query {query!r}; see {work / 'uvicorn.log'})")
        run_load(server.port, body, args.concurrency, 4 * args.concurrency, 10, query)
        for r in range(args.rounds):
            meter.start()
            raw1 = raw_encoder(checkpoint, args.device, 1, args.raw_seconds, batch1_only=True,
                               threads=raw_threads)
            raw1["cpu"] = meter.stop()
            meter.start()
            c1 = run_load(server.port, body, 1, args.c1_requests, args.c1_seconds, query)
            c1["cpu"] = meter.stop()
            c1["server_cpu_ms_per_request"] = 1000 * c1["cpu"]["server_cpu_s"] / max(1, c1["ok"])
            meter.start()
            # short trials: each batch size's best torch thread count, and the best short trial
            # (the reference until session 6, still reported)
            trials = [raw_encoder(checkpoint, args.device, b, args.raw_seconds / len(raw_batches),
                                  threads=raw_threads) for b in raw_batches]
            rawb = dict(max(trials, key=lambda t: t["batched_img_s"]))
            rawb["batch_trials"] = trials
            rawb["best_trial_img_s"] = rawb["batched_img_s"]
            rawb["cpu"] = meter.stop()
            lanes = (raw_lanes(checkpoint, args.device, args.max_batch_size, args.raw_seconds, cpus)
                     if cpus > 1 and args.device == "cpu" else None)
            # The reference: each batch size with its best thread count, measured right before and
            # right after the service (raw_seconds in all), the best mean of the two: a drift of
            # this machine's speed hits both sides alike, the maximum of short noisy trials does not
            # inflate it, and a noisy trial cannot make it pick a slower batch size.
            candidates = [(t["batch"], t["threads"]) for t in trials]
            slice_s = args.raw_seconds / len(candidates)
            before = [raw_steady(checkpoint, args.device, b, n, slice_s)[0] for b, n in candidates]
            metrics_before = server.get("/metrics")
            meter.start()
            load = run_load(server.port, body, args.concurrency, args.load_requests,
                            args.load_seconds, query)
            load["cpu"] = meter.stop()
            metrics_after = server.get("/metrics")
            after_cpu = [raw_steady(checkpoint, args.device, b, n, slice_s) for b, n in candidates]
            after = [img_s for img_s, _ in after_cpu]
            means = [(b0 + b1) / 2 for b0, b1 in zip(before, after)]
            best = max(range(len(candidates)), key=means.__getitem__)
            # the server's CPU per request at full load, less what the encoder alone spends per image
            load["server_cpu_ms_per_request"] = 1000 * load["cpu"]["server_cpu_s"] / max(1, load["ok"])
            # as the service encodes: one-thread lanes (a forward over several threads also counts their spinning)
            load["encoder_cpu_ms_per_image"] = (lanes["cpu_ms_per_image"] if lanes
                                                else min(cpu for _, cpu in after_cpu))
            load["outside_encoder_cpu_ms"] = load["server_cpu_ms_per_request"] - load["encoder_cpu_ms_per_image"]
            rawb["around_load"] = [{"batch": b, "threads": n, "before_img_s": b0, "after_img_s": b1}
                                   for (b, n), b0, b1 in zip(candidates, before, after)]
            rawb["batch"], rawb["threads"] = candidates[best]
            rawb["batched_img_s"] = means[best]
            batches = (_metric_sum(metrics_after, "geoloc_batch_size_count")
                       - _metric_sum(metrics_before, "geoloc_batch_size_count"))
            images = (_metric_sum(metrics_after, "geoloc_batch_size_sum")
                      - _metric_sum(metrics_before, "geoloc_batch_size_sum"))
            load["mean_batch_size"] = images / batches if batches else float("nan")
            entry = {"raw_batch1": raw1, "c1": c1, "raw_batched": rawb, "raw_lanes": lanes, "load": load,
                     "throughput_ratio": load["throughput_rps"] / rawb["batched_img_s"],
                     "ratio_to_best_trial": load["throughput_rps"] / rawb["best_trial_img_s"],
                     "ratio_to_lanes": load["throughput_rps"] / lanes["img_s"] if lanes else None,
                     "latency_margin_ms": raw1["batch1_ms_p50"] + LATENCY_MARGIN_MS - c1["p50_ms"]}
            rounds.append(entry)
            print(f"round {r + 1}: raw b1x{raw1['threads']}t {raw1['batch1_ms_p50']:.2f} ms | c=1 p50 {c1['p50_ms']:.2f} "
                  f"p99 {c1['p99_ms']:.2f} ms | raw b{rawb['batch']}x{rawb['threads']}t "
                  f"{rawb['batched_img_s']:.1f} img/s around the load (best short trial "
                  f"{rawb['best_trial_img_s']:.1f}) | c={args.concurrency} "
                  f"{load['throughput_rps']:.1f} req/s (x{entry['throughput_ratio']:.3f}), "
                  f"batch {load['mean_batch_size']:.2f}, errors {load['errors']} | "
                  + (f"{lanes['lanes']} one-thread lanes {lanes['img_s']:.1f} img/s "
                     f"(x{entry['ratio_to_lanes']:.2f}) | " if lanes else "")
                  + f"other programs "
                  f"used {max(raw1['cpu']['other_cpus'], c1['cpu']['other_cpus'], rawb['cpu']['other_cpus'], load['cpu']['other_cpus']):.2f} CPUs at most",
                  flush=True)
    finally:
        server.stop()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    raw_b1 = med([e["raw_batch1"]["batch1_ms_p50"] for e in rounds])
    raw_img_s = med([e["raw_batched"]["batched_img_s"] for e in rounds])
    lanes_img_s = med([e["raw_lanes"]["img_s"] for e in rounds]) if rounds[0]["raw_lanes"] else None
    ratio_lanes = med([e["ratio_to_lanes"] for e in rounds]) if lanes_img_s else None
    c1_p50 = med([e["c1"]["p50_ms"] for e in rounds])
    c1_p99 = med([e["c1"]["p99_ms"] for e in rounds])
    c1_n = min(e["c1"]["ok"] for e in rounds)
    errors = {}  # failed requests per status over every phase of every round: none counts in the throughput
    for e in rounds:
        for phase in ("c1", "load"):
            for status, n in e[phase]["errors"].items():
                errors[str(status)] = errors.get(str(status), 0) + n
    thr = med([e["load"]["throughput_rps"] for e in rounds])
    ratio = med([e["throughput_ratio"] for e in rounds])
    best_trial_img_s = med([e["raw_batched"]["best_trial_img_s"] for e in rounds])
    ratio_best_trial = med([e["ratio_to_best_trial"] for e in rounds])
    margin = med([e["latency_margin_ms"] for e in rounds])
    batch = med([e["load"]["mean_batch_size"] for e in rounds])
    load_p50 = med([e["load"]["p50_ms"] for e in rounds])
    load_p99 = med([e["load"]["p99_ms"] for e in rounds])
    other = max(e[key]["cpu"]["other_cpus"] for e in rounds
                for key in ("raw_batch1", "c1", "raw_batched", "load"))
    server_ms = med([e["c1"]["server_cpu_ms_per_request"] for e in rounds])
    load_cpu_ms = med([e["load"]["server_cpu_ms_per_request"] for e in rounds])
    encoder_cpu_ms = med([e["load"]["encoder_cpu_ms_per_image"] for e in rounds])
    outside_ms = med([e["load"]["outside_encoder_cpu_ms"] for e in rounds])
    target = THROUGHPUT_TARGET.get(args.config if args.checkpoint is None else "", 0.70)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "other_load": note_load, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint), "index": str(index), "image_bytes": len(image),
        "image_size": [w, h], "query": query, "settings": env, "rounds": rounds,
        "raw_batch1_ms": raw_b1, "raw_batched_img_s": raw_img_s, "raw_lanes_img_s": lanes_img_s,
        "raw_best_trial_img_s": best_trial_img_s, "throughput_ratio_to_best_trial": ratio_best_trial,
        "throughput_ratio_to_lanes": ratio_lanes, "c1_p50_ms": c1_p50,
        "c1_p99_ms": c1_p99, "c1_requests_per_round": c1_n, "errors": errors, "throughput_rps": thr,
        "throughput_ratio": ratio,
        "latency_margin_ms": margin, "other_cpus_max": other,
        "server_cpu_ms_per_request": load_cpu_ms, "encoder_cpu_ms_per_image": encoder_cpu_ms,
        "outside_encoder_cpu_ms": outside_ms, "throughput_target": target,
        "target_throughput_ok": ratio >= target, "target_latency_ok": margin >= 0,
    }
    ok = lambda b: "met" if b else "MISSED"  # noqa: E731
    print()
    print(f"medians of {len(rounds)} rounds; {machine()}; other programs used up to "
          f"{other:.2f} CPUs during the measurements")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| raw encoder, batch 1 (p50) | {raw_b1:.2f} ms | |")
    print(f"| raw encoder, batched (batch {raw_batches}, each with the better of threads {raw_threads} "
          f"in short trials, measured right before and after each c={args.concurrency} load; the best "
          f"mean) | "
          f"{raw_img_s:.1f} img/s (best short trial {best_trial_img_s:.1f}) | |")
    if lanes_img_s:
        print(f"| raw encoder, {cpus} one-thread lanes side by side, batch {args.max_batch_size} "
              f"(the encoder workers' split, no HTTP/decode/search) | {lanes_img_s:.1f} img/s | |")
    rough = " (p99 of fewer than 1,000: rough)" if c1_n < 1000 else ""
    print(f"| service c=1 p50 / p99 | {c1_p50:.2f} / {c1_p99:.2f} ms of {c1_n} requests a round{rough} (server CPU "
          f"{server_ms:.1f} ms/request) | p50 <= raw batch-1 + {LATENCY_MARGIN_MS:g} ms: {ok(margin >= 0)} "
          f"(margin {margin:.2f} ms) |")
    print(f"| service c={args.concurrency} | {thr:.1f} req/s = {ratio:.3f} x raw (mean batch "
          f"{batch:.2f}; p50 {load_p50:.1f} ms, p99 {load_p99:.1f} ms) | >= {target:.2f} x raw: "
          f"{ok(ratio >= target)} |")
    print(f"| server CPU per request at c={args.concurrency} | {load_cpu_ms:.2f} ms, of which outside the "
          f"encoder {outside_ms:.2f} ms (raw encoder {encoder_cpu_ms:.2f} ms CPU per image"
          f"{' in one-thread lanes, as the service' if lanes_img_s else ''}) | |")
    print(f"| failed requests (not in the throughput) | {sum(errors.values())} {errors or ''} | |")
    print(f"| service c={args.concurrency} vs the best short raw trial | {ratio_best_trial:.3f} x | |")
    if ratio_lanes:
        print(f"| service c={args.concurrency} vs the one-thread lanes | {ratio_lanes:.2f} x | |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    _COMPLETED.append(True)
    return 0 if result["target_throughput_ok"] and result["target_latency_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

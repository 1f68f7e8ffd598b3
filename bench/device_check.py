"""The Python parts of bench/device_check.sh: one step per call, and the report.

    python bench/device_check.py STEP --work DIR [--dry-run]
    python bench/device_check.py report --work DIR --out OUT [--dry-run]

Each step writes DIR/STEP.json as it goes (status "running" until it ends), so a step killed by
its time box still leaves what it had measured. Steps:

  env       machine: nvidia-smi, torch / CUDA / cuDNN versions, GPU name, CPUs, packages
  ceilings  the two ceilings the other numbers are read against: a bf16 matrix product (TFLOP/s) and a
            device-to-device copy (GB/s, bytes read + written)
  encode    paper-config encoder throughput per branch and batch size (the product path,
            model.inference.InferenceEncoder: bf16 autocast + channels_last on CUDA), FLOPs of one
            forward (torch.utils.flop_counter), MFU against the datasheet's dense bf16 peak and
            against the measured matrix-product ceiling
  world     a small synthetic region (python -m worldgen) on the machine's CPUs: input of train, index
  train     `small` training steps/s (python -m model.train for a fixed number of steps)
  index     python -m index_build build on the device for the region (tiny demo weights, small
            random weights), tiles/s against the raw encoder on the same tiles
  load      the service under load (bench/load.py --device cuda, short rounds)
  search    exact search on the GPU (matrix product + top-k over N random unit vectors) at query
            batches 1/16/256, faiss-gpu when importable, faiss-cpu on the machine's CPUs

--dry-run runs every step on the CPU at toy sizes (a micro model, a few steps, a few hundred
tiles, a few seconds of load) so that the test suite can check the script and these parts.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

STEPS = ("env", "ceilings", "encode", "world", "train", "index", "load", "search")
CPU_STEPS = ("env", "world")  # these run without a GPU too
# The steps the shell script runs itself (installing carried wheels); the report knows them too.
SHELL_STEPS = ("wheels",)
REPORT_FILES = ("device_check.json", "device_check.md")

# Dense bf16 tensor-core peaks, no sparsity, from the vendors' datasheets (TFLOP/s), matched on
# torch.cuda.get_device_name() in this order, the more specific names first.
PEAK_BF16_TFLOPS = (
    (r"\bH200 NVL\b", 835.0),
    (r"\bGH200\b", 989.4),
    (r"\bH200\b", 989.4),
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100\b", 989.4),   # the SXM part: "NVIDIA H100 80GB HBM3"
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.1),
    (r"\bL4\b", 121.0),
)

# A very small architecture for --dry-run (as tests/conftest.py's micro_config).
MICRO = {"name": "micro", "hidden_size": 32, "num_heads": 2, "mlp_dim": 64, "num_layers": 2,
         "resnet_units": [1, 1, 1], "resnet_width_factor": 0.5, "ground_size": [32, 128],
         "aerial_size": [32, 128]}
# Calls made before a timing at a new input shape: cuDNN's algorithm search on a GPU, TorchScript's
# profiling runs on a CPU (the first calls of a traced branch at a new batch size are far slower).
WARM_UP_CALLS = 4
DEMO_CHECKPOINT = REPO / "weights" / "l2ltr_tiny_demo.safetensors"

# What the service needs beyond torch and numpy (module names), and what index_build needs.
SERVICE_MODULES = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "python_multipart",
                   "fastapi_offline", "httptools", "faiss")
# (the machine's own ones among them are what the carried wheels assume: bench/device_wheels.py)
PACKAGES_REPORTED = ("numpy", "pillow", "safetensors", "faiss-cpu", "faiss-gpu-cu12", "fastapi", "starlette",
                     "uvicorn", "pydantic", "pydantic-core", "pydantic-settings", "python-multipart",
                     "fastapi-offline", "httptools", "opentelemetry-api", "uvloop", "prometheus-client",
                     "typing-extensions", "anyio", "h11", "click", "annotated-doc", "packaging", "triton")


@dataclass(frozen=True)
class Profile:
    """Sizes of every step: the device run, or the toy run of --dry-run."""

    device: str
    matmul_n: int
    matmul_dtype: str
    copy_mib: int
    ceiling_seconds: float
    encode_config: str | dict
    encode_batches: tuple[int, ...]
    encode_seconds: float
    world_args: tuple[str, ...]
    train_config: str | dict
    train_batch: int
    train_steps: int
    train_log_every: int
    train_max_pairs: int
    index_models: tuple[tuple[str, str | dict], ...]  # (label, config); "tiny" gets the demo weights
    index_tiles: int
    index_batch: int
    raw_unique_tiles: int
    raw_tiles: int
    load_config: str | dict
    load_args: tuple[str, ...]
    search_n: int
    search_dims: tuple[int, ...]
    search_batches: tuple[int, ...]
    search_seconds: float


DEVICE_PROFILE = Profile(
    device="cuda", matmul_n=8192, matmul_dtype="bfloat16", copy_mib=2048, ceiling_seconds=2.0,
    encode_config="paper", encode_batches=(1, 16, 64, 256), encode_seconds=1.5,
    world_args=("--seed", "18", "--area-km2", "2.5", "--pairs", "1000"),
    train_config="small", train_batch=32, train_steps=150, train_log_every=25, train_max_pairs=1024,
    index_models=(("tiny", "tiny"), ("small", "small")), index_tiles=8192, index_batch=128,
    raw_unique_tiles=512, raw_tiles=4096,
    load_config="small",
    load_args=("--tiles", "100000", "--rounds", "2", "--concurrency", "32", "--max-batch-size", "32",
               "--c1-requests", "300", "--c1-seconds", "4", "--load-requests", "30000", "--load-seconds", "6",
               "--raw-seconds", "2", "--raw-batches", "32", "--raw-threads", "4"),
    search_n=1_000_000, search_dims=(768, 384), search_batches=(1, 16, 256), search_seconds=1.0,
)

DRY_PROFILE = Profile(
    device="cpu", matmul_n=512, matmul_dtype="float32", copy_mib=32, ceiling_seconds=0.2,
    encode_config=MICRO, encode_batches=(1, 8), encode_seconds=0.2,
    world_args=("--seed", "7", "--area-km2", "0.1", "--pairs", "40", "--tile-px", "128",
                "--pano-height", "64", "--pano-width", "256"),
    train_config=MICRO, train_batch=8, train_steps=4, train_log_every=1, train_max_pairs=32,
    index_models=(("micro", MICRO),), index_tiles=96, index_batch=16, raw_unique_tiles=24, raw_tiles=48,
    load_config=MICRO,
    load_args=("--tiles", "500", "--rounds", "1", "--concurrency", "4", "--max-batch-size", "4",
               "--c1-requests", "20", "--c1-seconds", "0.5", "--load-requests", "200", "--load-seconds", "1",
               "--raw-seconds", "0.3", "--raw-batches", "4", "--raw-threads", "1"),
    search_n=20_000, search_dims=(64, 32), search_batches=(1, 16, 256), search_seconds=0.1,
)


class StepSkipped(Exception):
    """The step cannot run here (a package or an earlier step's output is missing)."""


# ============================================================================ small helpers

def say(step: str, message: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {step}: {message}", flush=True)


def bench_module(name: str):
    """bench/NAME.py as a module (bench/ is no package; its scripts put the repo on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install counts as missing, whatever it raises
        return False
    return True


def need_modules(modules: tuple[str, ...] | list[str]) -> None:
    missing = [m for m in modules if not importable(m)]
    if missing:
        raise StepSkipped(f"not importable: {', '.join(missing)} (carry their wheels in .whl/, see "
                          "bench/device_wheels.sh)")


def model_config(spec: str | dict):
    from model import L2LTRConfig

    return L2LTRConfig.resolve(spec)


def config_label(spec: str | dict) -> str:
    return spec if isinstance(spec, str) else spec.get("name", "custom")


def random_checkpoint(spec: str | dict, path: Path, seed: int = 0) -> Path:
    import torch

    from model import L2LTR, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(L2LTR(model_config(spec)).eval(), path,
                    metadata={"provenance": {"purpose": "bench/device_check.py, random init"}})
    return path


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_times(fn: Callable[[], object], device, seconds: float, min_calls: int = 5, warmup: int = 3) -> list[float]:
    """Seconds per call of `fn`, each call timed alone: CUDA events on a GPU (at most 8 calls queued
    ahead of the device), the host clock on a CPU. For work that stays on the device."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        return host_times(fn, device, seconds, min_calls, warmup=0)
    events, pending = [], deque()
    end = time.perf_counter() + seconds
    while len(events) < min_calls or time.perf_counter() < end:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        events.append((start, stop))
        pending.append(stop)
        if len(pending) > 8:
            pending.popleft().synchronize()
    torch.cuda.synchronize(device)
    return [a.elapsed_time(b) / 1e3 for a, b in events]


def host_times(fn: Callable[[], object], device, seconds: float, min_calls: int = 3, warmup: int = 2) -> list[float]:
    """Seconds per call of `fn` by the host clock, for calls whose results come back to the host
    (the call itself waits for the device)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    end = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (CPU rates of a dry run are tiny, GPU ones large)."""
    return float(f"{x:.{digits}g}")


def peak_bf16_tflops(gpu_name: str | None) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if gpu_name and re.search(pattern, gpu_name):
            return tflops
    return None


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError):
        pass
    return None


def run_command(step: str, cmd: list[str], capture: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run a program of the project from the repository root; its output joins the step's log
    (stdout captured instead where the step parses it)."""
    say(step, "$ " + shlex.join(cmd))
    return subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE if capture else None, **kwargs)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class StepRecord:
    """DIR/STEP.json, rewritten after every measurement."""

    def __init__(self, work: Path, step: str, dry_run: bool) -> None:
        self.path = work / f"{step}.json"
        self.step = step
        self.started = time.perf_counter()
        self.data = {"step": step, "status": "running", "dry_run": dry_run, "results": {}, "errors": []}
        self.save()

    @property
    def results(self) -> dict:
        return self.data["results"]

    def put(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.save()

    def error(self, what: str, exc: BaseException) -> None:
        """A part of the step failed; the rest goes on and the step ends as 'partial'."""
        text = f"{what}: {type(exc).__name__}: {exc}"
        say(self.step, "FAILED " + text)
        traceback.print_exc()
        self.data["errors"].append(text)
        self.save()

    def finish(self, status: str, reason: str | None = None) -> None:
        if status == "ok" and self.data["errors"]:
            status = "partial"
        self.data["status"] = status
        if reason:
            self.data["reason"] = reason
        self.data["seconds"] = round(time.perf_counter() - self.started, 1)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


# ============================================================================ steps

def step_env(rec: StepRecord, prof: Profile, work: Path) -> None:
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpus": os.cpu_count(), "cpu_model": cpu_model(), "memory_gib": memory_gib(),
            "cuda_available": torch.cuda.is_available(), "profile_device": prof.device}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    peak_bf16_tflops=peak_bf16_tflops(props.name))
    info["nvidia_smi"] = None
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit,"
                 "temperature.gpu,utilization.gpu", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
            print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout, flush=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            rec.error("nvidia-smi", exc)
    info["commit"] = None
    if shutil.which("git"):  # the machine's copy of the tree may come without git or .git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        info["commit"] = commit.stdout.strip() or None
    packages = {}
    for dist in PACKAGES_REPORTED:
        try:
            packages[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    info["packages"] = packages
    info["service_modules_missing"] = [m for m in SERVICE_MODULES if not importable(m)]
    if importable("faiss"):
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    rec.data["results"].update(info)
    say("env", f"{info.get('gpu') or 'no GPU'}; torch {info['torch']} (CUDA {info['torch_cuda']}); "
               f"{info['cpus']} CPUs; missing for the service: {info['service_modules_missing'] or 'nothing'}")


def matmul_ceiling(device, n: int, dtype_name: str, seconds: float) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # random data: zeros run faster
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)
    times = kernel_times(lambda: torch.mm(a, b, out=c), device, seconds)
    median = statistics.median(times)
    return {"n": n, "dtype": dtype_name, "median_ms": round(median * 1e3, 3), "calls": len(times),
            "tflops": sig(2 * n ** 3 / median / 1e12)}


def step_ceilings(rec: StepRecord, prof: Profile, work: Path) -> None:
    import torch

    device = torch.device(prof.device)
    try:
        mm = matmul_ceiling(device, prof.matmul_n, prof.matmul_dtype, prof.ceiling_seconds)
        rec.put("matmul", mm)
        say("ceilings", f"{mm['dtype']} {mm['n']}^3 matrix product: {mm['tflops']} TFLOP/s")
    except Exception as exc:  # noqa: BLE001 - the copy can still be measured
        rec.error("matrix product", exc)
    try:
        n = prof.copy_mib * 2 ** 20 // 4
        src = torch.rand(n, device=device)
        dst = torch.empty_like(src)
        times = kernel_times(lambda: dst.copy_(src), device, prof.ceiling_seconds)
        median = statistics.median(times)
        copy = {"mib": prof.copy_mib, "median_ms": round(median * 1e3, 3),
                "gbps": round(2 * n * 4 / median / 1e9, 1)}  # bytes read + bytes written
        rec.put("copy", copy)
        say("ceilings", f"device-to-device copy of {prof.copy_mib} MiB: {copy['gbps']} GB/s (read + write)")
    except Exception as exc:  # noqa: BLE001
        rec.error("copy", exc)


def forward_flops(net, branch: str, size: tuple[int, int], device) -> float:
    """FLOPs of one image's forward through a branch, counted by torch's FlopCounterMode (matrix
    products, convolutions and attention; elementwise work is not counted, as is usual for MFU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model.encode import autocast_context

    batch = 2
    x = torch.randn(batch, 3, *size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    encode = getattr(net, f"encode_{branch}")
    with torch.inference_mode(), autocast_context(device), FlopCounterMode(display=False) as counter:
        encode(x)
    return counter.get_total_flops() / batch


def step_encode(rec: StepRecord, prof: Profile, work: Path) -> None:
    import torch

    from model import L2LTR
    from model.encode import BRANCHES
    from model.inference import InferenceEncoder

    bench_encode = bench_module("encode")
    device = torch.device(prof.device)
    config = model_config(prof.encode_config)
    torch.manual_seed(0)
    encoder = InferenceEncoder(L2LTR(config), device)
    on_cuda = device.type == "cuda"
    peak = peak_bf16_tflops(gpu_name()) if on_cuda else None
    ceilings = read_json(work / "ceilings.json") or {}
    matmul = ceilings.get("results", {}).get("matmul")
    if not matmul:  # the ceilings step did not run or failed: a shorter measurement of our own
        matmul = matmul_ceiling(device, prof.matmul_n, prof.matmul_dtype, prof.ceiling_seconds / 2)
    rec.put("setup", {"config": config_label(prof.encode_config), "device": str(device),
                      "precision": "bf16 autocast, channels_last" if on_cuda else "float32 (CPU: traced branches)",
                      "peak_bf16_tflops": peak, "matmul_ceiling_tflops": matmul["tflops"],
                      "params_m": round(sum(p.numel() for p in encoder.net.ground.parameters()) / 1e6, 2)})
    rows = []
    for branch in BRANCHES:
        size = encoder.input_size(branch)
        flops = forward_flops(encoder.net, branch, size, device)
        try:
            deviation = bench_encode.bf16_deviation(encoder.net, branch, torch.randn(4, 3, *size, device=device),
                                                    device)
        except Exception as exc:  # noqa: BLE001 - a check beside the measurement
            rec.error(f"{branch} bf16 deviation", exc)
            deviation = None
        for batch in prof.encode_batches:
            row = {"branch": branch, "input": f"{size[0]}x{size[1]}", "batch": batch,
                   "gflop_per_image": round(flops / 1e9, 3), "bf16_max_abs_dev": deviation}
            try:
                x = torch.randn(batch, 3, *size, device=device)
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                encode = lambda b, branch=branch: encoder.encode(b, branch)  # noqa: E731
                for _ in range(WARM_UP_CALLS):  # cuDNN's algorithm search; TorchScript's profiling runs
                    encode(x)
                img_s = bench_encode.throughput(encode, x, prof.encode_seconds, device)
                achieved = img_s * flops / 1e12
                row.update(img_s=round(img_s, 1), tflops=sig(achieved),
                           mfu=sig(achieved / peak, 3) if peak else None,
                           of_matmul_ceiling=sig(achieved / matmul["tflops"], 3))
                if on_cuda:
                    row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
                say("encode", f"{branch} batch {batch}: {img_s:.1f} img/s, {achieved:.2f} TFLOP/s"
                              + (f", MFU {achieved / peak:.3f}" if peak else "")
                              + f", {achieved / matmul['tflops']:.3f} of the matmul ceiling")
            except Exception as exc:  # noqa: BLE001 - out of memory at one batch size, say
                rec.error(f"{branch} batch {batch}", exc)
                row["error"] = f"{type(exc).__name__}: {exc}"
                if on_cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            rec.put("rows", rows)


def step_world(rec: StepRecord, prof: Profile, work: Path) -> None:
    out = work / "world"
    if out.exists():
        shutil.rmtree(out)
    workers = min(16, os.cpu_count() or 1) if prof.device == "cuda" else 2
    t0 = time.perf_counter()
    proc = run_command("world", [sys.executable, "-m", "worldgen", *prof.world_args, "--workers", str(workers),
                                 "--out", str(out), "--quiet"])
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"worldgen exited with {proc.returncode}")
    tiles, train = csv_rows(out / "tiles.csv"), csv_rows(out / "splits" / "train.csv")
    rec.data["results"] = {"args": list(prof.world_args), "workers": workers, "seconds": round(seconds, 1),
                           "tiles": tiles, "train_pairs": train, "pairs_per_s": round(tiles / seconds, 1)}
    say("world", f"{tiles} pairs ({train} for training) in {seconds:.1f} s with {workers} workers")


def csv_rows(path: Path) -> int:
    with open(path, newline="") as fh:
        return sum(1 for _ in csv.DictReader(fh))


def need_world(work: Path) -> Path:
    world = work / "world"
    if not (world / "tiles.csv").is_file():
        raise StepSkipped("no generated region: the world step did not finish")
    return world


def step_train(rec: StepRecord, prof: Profile, work: Path) -> None:
    import torch

    from model import L2LTR

    world = need_world(work)
    run_dir = work / "train_run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = prof.train_config if isinstance(prof.train_config, str) else json.dumps(prof.train_config)
    cmd = [sys.executable, "-m", "model.train", "--data", str(world), "--config", config, "--out", str(run_dir),
           "--device", prof.device, "--steps", str(prof.train_steps), "--batch-size", str(prof.train_batch),
           "--max-pairs", str(prof.train_max_pairs), "--eval-every", "0", "--log-every", str(prof.train_log_every),
           "--save-every", str(10 * prof.train_steps), "--warmup", "10", "--workers", str(os.cpu_count() or 1),
           "--quiet"]
    t0 = time.perf_counter()
    proc = run_command("train", cmd)
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "log.jsonl").exists() else []
    windows = [r for r in log if r.get("event") == "train"]
    if proc.returncode:
        raise RuntimeError(f"model.train exited with {proc.returncode} after {len(windows)} logged windows")
    if len(windows) < 2:
        raise RuntimeError(f"model.train logged {len(windows)} training windows; two are needed for a rate")
    # The first window holds the warm-up (cuDNN's algorithm search, allocator growth): the rate is
    # taken between the end of the first window and the end of the last.
    first, last = windows[0], windows[-1]
    steps_per_s = (last["step"] - first["step"]) / (last["time"] - first["time"])
    cfg = model_config(prof.train_config)
    device = torch.device(prof.device)
    net = L2LTR(cfg).to(device).eval()
    forward = sum(forward_flops(net, b, cfg.ground_size if b == "ground" else cfg.aerial_size, device)
                  for b in ("ground", "aerial"))
    # training = forward + backward, about 3x the forward's FLOPs (the usual estimate)
    train_tflops = 3 * forward * prof.train_batch * steps_per_s / 1e12
    peak = peak_bf16_tflops(gpu_name()) if device.type == "cuda" else None
    rec.data["results"] = {
        "config": config_label(prof.train_config), "device": prof.device, "batch": prof.train_batch,
        "steps": last["step"], "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "steps_per_s": round(steps_per_s, 2), "pairs_per_s": round(steps_per_s * prof.train_batch, 1),
        "window_pairs_per_s": [round(w["pairs_per_s"], 1) for w in windows], "final_loss": round(last["loss"], 4),
        "wall_s": round(wall, 1), "forward_gflop_per_pair": round(forward / 1e9, 3),
        "approx_tflops": sig(train_tflops), "approx_mfu": sig(train_tflops / peak, 3) if peak else None}
    say("train", f"{config_label(prof.train_config)}: {steps_per_s:.2f} steps/s at batch {prof.train_batch} "
                 f"({steps_per_s * prof.train_batch:.1f} pairs/s, ~{train_tflops:.2f} TFLOP/s)")


def repeated_catalogue(tiles_csv: Path, out: Path, count: int) -> Path:
    """A catalogue of `count` rows cycling through the region's tiles under new ids: enough tiles for
    a steady rate from a small region (every row is still decoded and encoded)."""
    with open(tiles_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    base = tiles_csv.parent
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["tile_id", "lat", "lon", "path"])
        for i in range(count):
            r = rows[i % len(rows)]
            w.writerow([f"r{i:07d}", r["lat"], r["lon"], str((base / r["path"]).resolve())])
    return out


def step_index(rec: StepRecord, prof: Profile, work: Path) -> None:
    import torch

    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.preprocess import aerial_tensor, load_image

    world = need_world(work)
    bench_index = bench_module("index")
    device = torch.device(prof.device)
    have_faiss = importable("faiss")
    if not have_faiss:
        rec.data["notes"] = ["faiss is not importable: the builds stop after the encode stage (--stop-after encode)"]
    catalogue = repeated_catalogue(world / "tiles.csv", work / "index_catalogue.csv", prof.index_tiles)
    with open(world / "tiles.csv", newline="") as fh:
        unique = [str((world / r["path"]).resolve()) for r in csv.DictReader(fh)][:prof.raw_unique_tiles]
    rows = []
    for label, spec in prof.index_models:
        row = {"model": label, "tiles": prof.index_tiles, "batch": prof.index_batch, "device": prof.device}
        try:
            if label == "tiny" and DEMO_CHECKPOINT.is_file():
                checkpoint, row["weights"] = DEMO_CHECKPOINT, "demo"
            else:
                checkpoint, row["weights"] = random_checkpoint(spec, work / f"index_{label}.safetensors"), "random"
            out = work / f"index_{label}"
            cmd = [sys.executable, "-m", "index_build", "build", "--catalog", str(catalogue),
                   "--checkpoint", str(checkpoint), "--out", str(out), "--device", prof.device,
                   "--batch-size", str(prof.index_batch), "--json", "--quiet"]
            if not have_faiss:
                cmd += ["--stop-after", "encode"]
            proc = run_command("index", cmd, capture=True)
            if proc.returncode:
                raise RuntimeError(f"index_build exited with {proc.returncode}: {proc.stdout[-500:]}")
            result = json.loads(proc.stdout)
            encode = result["encode"]
            row.update(status=result["status"], build_tiles_per_s=encode["tiles_per_second"],
                       encode_s=encode["encode_s"], timings=result.get("timings", {}))
            # the raw encoder on the same tiles, decoded beforehand (bench/index.py's reference)
            net = load_checkpoint(checkpoint)
            model = InferenceEncoder(net, device, branches=("aerial",))
            with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
                tensors = list(pool.map(lambda p: aerial_tensor(load_image(p), net.config), unique))
            tensors = (tensors * (prof.raw_tiles // len(tensors) + 1))[:prof.raw_tiles]
            warm = torch.stack(tensors[:prof.index_batch])
            for _ in range(WARM_UP_CALLS):
                model.encode(warm, "aerial")
            raw_tps, _ = bench_index.raw_encoder_run(model, tensors, prof.index_batch, device)
            row.update(raw_tiles=len(tensors), raw_tiles_per_s=round(raw_tps, 1),
                       ratio=round(encode["tiles_per_second"] / raw_tps, 3))
            del tensors, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            say("index", f"{label}: build {encode['tiles_per_second']:.1f} tiles/s over {prof.index_tiles} tiles, "
                         f"raw encoder {raw_tps:.1f} tiles/s (ratio {row['ratio']:.2f})")
        except Exception as exc:  # noqa: BLE001 - the next model still runs
            rec.error(f"index_build with {label}", exc)
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        rec.put("rows", rows)
    if rows and all("error" in r for r in rows):
        raise RuntimeError("every index_build run failed")


def step_load(rec: StepRecord, prof: Profile, work: Path) -> None:
    need_modules(SERVICE_MODULES)
    load_dir = work / "load"
    load_dir.mkdir(exist_ok=True)
    result_path = work / "load_result.json"
    if isinstance(prof.load_config, str):
        model_args = ["--config", prof.load_config]
    else:
        model_args = ["--checkpoint", str(random_checkpoint(prof.load_config, load_dir / "load_model.safetensors"))]
    cmd = [sys.executable, str(BENCH / "load.py"), "--device", prof.device, *model_args, *prof.load_args,
           "--log-level", "WARNING", "--workdir", str(load_dir), "--json", str(result_path)]
    proc = run_command("load", cmd)
    result = read_json(result_path)
    if result is None:
        raise RuntimeError(f"bench/load.py exited with {proc.returncode} and wrote no results")
    keys = ("c1_p50_ms", "c1_p99_ms", "throughput_rps", "throughput_ratio", "raw_batch1_ms", "raw_batched_img_s",
            "latency_margin_ms", "throughput_target", "target_throughput_ok", "target_latency_ok",
            "server_cpu_ms_per_request", "other_cpus_max")
    out = {k: result.get(k) for k in keys}
    rounds = result.get("rounds") or []
    out.update(config=config_label(prof.load_config), device=prof.device, rounds=len(rounds),
               concurrency=int(prof.load_args[prof.load_args.index("--concurrency") + 1]),
               max_batch_size=int(prof.load_args[prof.load_args.index("--max-batch-size") + 1]),
               tiles=int(prof.load_args[prof.load_args.index("--tiles") + 1]),
               mean_batch=[round(r["load"]["mean_batch_size"], 2) for r in rounds],
               load_p50_ms=[round(r["load"]["p50_ms"], 2) for r in rounds],
               load_p99_ms=[round(r["load"]["p99_ms"], 2) for r in rounds],
               errors=[r["load"]["errors"] for r in rounds], exit_code=proc.returncode)
    rec.data["results"] = out
    say("load", f"c=1 p50 {out['c1_p50_ms']:.2f} ms; c={out['concurrency']} {out['throughput_rps']:.1f} req/s "
                f"= {out['throughput_ratio']:.3f} x the raw encoder")


def unit_rows(n: int, dim: int, device, seed: int, chunk: int = 131072):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty(n, dim, device=device)
    for s in range(0, n, chunk):
        block = torch.randn(min(chunk, n - s), dim, device=device, generator=gen)
        x[s:s + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
    return x


def recall_at_k(found, truth) -> float:
    import numpy as np

    found, truth = np.asarray(found), np.asarray(truth)
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth))
    return hits / truth.size


def step_search(rec: StepRecord, prof: Profile, work: Path) -> None:
    import numpy as np
    import torch

    device = torch.device(prof.device)
    k = 10
    faiss = importlib.import_module("faiss") if importable("faiss") else None
    faiss_gpu = bool(faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
    copy = ((read_json(work / "ceilings.json") or {}).get("results") or {}).get("copy") or {}
    rec.put("setup", {"n": prof.search_n, "k": k, "device": str(device), "faiss": getattr(faiss, "__version__", None),
                      "faiss_gpu": faiss_gpu, "faiss_threads": faiss.omp_get_max_threads() if faiss else None,
                      "copy_gbps": copy.get("gbps")})
    dtypes = (torch.float32, torch.float16) if device.type == "cuda" else (torch.float32,)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        rec.put("rows", rows)
        say("search", f"{row['method']} dim {row['dim']} batch {row['batch']}: {row['qps']:.1f} queries/s"
                      + (f", {row['scan_gbps']} GB/s" if row.get("scan_gbps") else ""))

    for dim in prof.search_dims:
        base = unit_rows(prof.search_n, dim, device, seed=dim)
        queries = unit_rows(max(prof.search_batches), dim, device, seed=dim + 1)
        truth = None
        for dtype in dtypes:
            try:
                db = base if dtype == torch.float32 else base.to(dtype)
                name = f"torch exact ({str(dtype).replace('torch.', '')}, {device.type})"
                for batch in prof.search_batches:
                    q = queries[:batch].to(dtype)
                    # ids come back to the host: what a service needs, and the call waits for the device
                    times = host_times(lambda q=q, db=db: torch.topk(q @ db.T, k, dim=1).indices.cpu(), device,
                                       prof.search_seconds)
                    median = statistics.median(times)
                    add({"method": name, "dim": dim, "batch": batch, "qps": round(batch / median, 1),
                         "ms_per_call": round(median * 1e3, 3),
                         "scan_gbps": round(db.numel() * db.element_size() / median / 1e9, 1)})
                ids = torch.topk(queries @ db.T, k, dim=1).indices.cpu().numpy()
                if dtype == torch.float32:
                    truth = ids
                else:
                    rows[-1]["recall_at_10_vs_float32"] = round(recall_at_k(ids, truth), 4)
                    rec.put("rows", rows)
                del db
            except Exception as exc:  # noqa: BLE001 - the other paths still run
                rec.error(f"torch search {dtype} dim {dim}", exc)
        if faiss is not None:
            xb = base.cpu().numpy()
            xq = queries.cpu().numpy()
            indexes = [("faiss-cpu flat", lambda: faiss.IndexFlatIP(dim))]
            if faiss_gpu:
                resources = faiss.StandardGpuResources()
                indexes.append(("faiss-gpu flat", lambda: faiss.GpuIndexFlatIP(resources, dim)))
            for name, make in indexes:
                try:
                    index = make()
                    t0 = time.perf_counter()
                    index.add(xb)
                    add_s = time.perf_counter() - t0
                    for batch in prof.search_batches:
                        q = np.ascontiguousarray(xq[:batch])
                        times = host_times(lambda q=q: index.search(q, k), torch.device("cpu"), prof.search_seconds,
                                           min_calls=2, warmup=1)
                        median = statistics.median(times)
                        add({"method": name, "dim": dim, "batch": batch, "qps": round(batch / median, 1),
                             "ms_per_call": round(median * 1e3, 3),
                             "scan_gbps": round(xb.nbytes / median / 1e9, 1), "add_s": round(add_s, 2)})
                    if truth is not None:
                        _, ids = index.search(xq, k)
                        rows[-1]["recall_at_10_vs_torch"] = round(recall_at_k(ids, truth), 4)
                        rec.put("rows", rows)
                    del index
                except Exception as exc:  # noqa: BLE001
                    rec.error(f"{name} dim {dim}", exc)
            del xb, xq
        del base, queries
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if faiss is None:
        rec.data["notes"] = ["faiss is not importable: only the torch path was measured"]


STEP_FUNCTIONS = {"env": step_env, "ceilings": step_ceilings, "encode": step_encode, "world": step_world,
                  "train": step_train, "index": step_index, "load": step_load, "search": step_search}


def run_step(step: str, work: Path, dry_run: bool) -> int:
    prof = DRY_PROFILE if dry_run else DEVICE_PROFILE
    rec = StepRecord(work, step, dry_run)
    say(step, "start" + (" (dry run: CPU, toy sizes)" if dry_run else ""))
    try:
        if prof.device == "cuda" and step not in CPU_STEPS:
            import torch

            if not torch.cuda.is_available():
                raise StepSkipped("torch sees no CUDA device (use --dry-run on a machine without one)")
        STEP_FUNCTIONS[step](rec, prof, work)
    except StepSkipped as exc:
        rec.finish("skipped", str(exc))
        say(step, f"skipped: {exc}")
        return 0
    except Exception as exc:  # noqa: BLE001 - recorded, and the shell goes on with the next step
        traceback.print_exc()
        rec.data["errors"].append(f"{type(exc).__name__}: {exc}")
        rec.finish("failed")
        say(step, f"failed: {type(exc).__name__}: {exc}")
        return 1
    rec.finish("ok")
    say(step, f"{rec.data['status']} in {rec.data['seconds']} s")
    return 0


# ============================================================================ report

def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if 0 < abs(value) < 1:  # small rates of a dry run keep their significant digits
            return f"{value:.{max(digits, 2)}g}"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def read_status(work: Path) -> dict[str, dict]:
    """The shell's record of each step: exit code, seconds, time box (or a reason it did not start)."""
    status = {}
    path = work / "status.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, rc, seconds, limit = (line.split("\t") + ["", "", "", ""])[:4]
            status[name] = {"rc": rc, "seconds": int(seconds) if seconds.isdigit() else None,
                            "limit_s": int(limit) if limit.isdigit() else None}
    return status


def log_tail(work: Path, step: str, chars: int = 1500) -> str | None:
    path = work / f"{step}.log"
    if not path.exists():
        return None
    return path.read_text(errors="replace")[-chars:]


def collect(work: Path, dry_run: bool, budget_s: int | None, total_s: int | None) -> dict:
    shell = read_status(work)
    steps = {}
    for name in (*SHELL_STEPS, *STEPS):
        if name not in shell and not (work / f"{name}.json").exists():
            continue  # not asked for (--steps)
        record = read_json(work / f"{name}.json") or {"step": name, "results": {}, "errors": []}
        sh = shell.get(name, {})
        rc = sh.get("rc")
        status = record.get("status", "failed")
        if rc == "not-started":
            status = "skipped"
            record["reason"] = record.get("reason") or "not started: too little of the time budget was left"
        elif rc in ("124", "137"):
            status = "timeout"
        elif rc not in (None, "0") and status in ("ok", "partial", "running"):
            status = "failed"
        elif status == "running":
            status = "failed"
        record.update(status=status, rc=rc, seconds=sh.get("seconds", record.get("seconds")),
                      limit_s=sh.get("limit_s"))
        if status in ("failed", "timeout", "partial"):
            record["log_tail"] = log_tail(work, name)
        steps[name] = record
    for name in shell:  # names the script was asked for that are no step (a typo in --steps)
        if name not in steps:
            steps[name] = {"step": name, "status": "failed", "rc": shell[name]["rc"], "results": {},
                           "errors": [f"no such step; the steps are {', '.join(STEPS)}"],
                           "log_tail": log_tail(work, name)}
    env = steps.get("env", {}).get("results", {})
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": dry_run, "budget_s": budget_s, "total_s": total_s, "machine": env, "steps": steps}


def summary_line(name: str, rec: dict) -> str:
    r = rec.get("results") or {}
    if rec["status"] in ("skipped",):
        return rec.get("reason", "")
    if name == "wheels":
        return f"{r.get('installed', 0)} of {r.get('wheels', 0)} carried wheels installed" + \
            (f"; failed: {r['failed']}" if r.get("failed") else "")
    if name == "env":
        return (f"{r.get('gpu') or 'no GPU'}, torch {r.get('torch')} (CUDA {r.get('torch_cuda')}), "
                f"{r.get('cpus')} CPUs")
    if name == "ceilings":
        mm, cp = r.get("matmul") or {}, r.get("copy") or {}
        return (f"{mm.get('dtype', '?')} {mm.get('n', '?')}^3 matrix product {fmt(mm.get('tflops'))} TFLOP/s; "
                f"copy {fmt(cp.get('gbps'))} GB/s")
    if name == "encode":
        rows = [x for x in r.get("rows", []) if x.get("img_s")]
        parts = []
        for branch in ("ground", "aerial"):
            best = max((x for x in rows if x["branch"] == branch), key=lambda x: x["img_s"], default=None)
            if best:
                mfu = f"MFU {best['mfu']:.3f}, " if best.get("mfu") is not None else ""
                parts.append(f"{branch} {fmt(best['img_s'])} img/s at batch {best['batch']} "
                             f"({mfu}{best['of_matmul_ceiling']:.3f} of the matmul ceiling)")
        return f"{(r.get('setup') or {}).get('config', '')}: " + "; ".join(parts)
    if name == "world":
        return f"{fmt(r.get('tiles'))} pairs in {fmt(r.get('seconds'))} s"
    if name == "train":
        return (f"{r.get('config')}: {fmt(r.get('steps_per_s'), 2)} steps/s at batch {r.get('batch')} "
                f"({fmt(r.get('pairs_per_s'))} pairs/s)")
    if name == "index":
        return "; ".join(f"{x['model']}: {fmt(x.get('build_tiles_per_s'))} tiles/s "
                         f"(raw {fmt(x.get('raw_tiles_per_s'))})"
                         for x in r.get("rows", []) if "error" not in x)
    if name == "load":
        if r.get("throughput_rps") is None:
            return ""
        return (f"{r.get('config')}: c=1 p50 {fmt(r.get('c1_p50_ms'), 2)} ms; c={r.get('concurrency')} "
                f"{fmt(r.get('throughput_rps'))} req/s = {fmt(r.get('throughput_ratio'), 3)} x raw")
    if name == "search":
        rows = r.get("rows", [])
        if not rows:
            return ""
        dim, lo, hi = max(x["dim"] for x in rows), min(x["batch"] for x in rows), max(x["batch"] for x in rows)
        qps = {(x["method"], x["batch"]): x["qps"] for x in rows if x["dim"] == dim}
        methods = dict.fromkeys(m for m, _ in qps)
        return f"dim {dim}, queries/s at batch {lo} / {hi}: " + "; ".join(
            f"{m} {fmt(qps.get((m, lo)), 0)} / {fmt(qps.get((m, hi)), 0)}" for m in methods)
    return ""


def markdown(report: dict) -> str:
    m = report["machine"] or {}
    lines = []
    kind = "dry run (CPU, toy sizes: not a measurement)" if report["dry_run"] else "device run"
    lines.append(f"### Device check, {report['date']}: {kind}")
    lines.append("")
    lines.append(f"Machine: {m.get('gpu') or 'no GPU'}"
                 + (f" ({m.get('gpu_memory_gib')} GiB, capability {m.get('capability')}, {m.get('sms')} SMs)"
                    if m.get("gpu") else "")
                 + f"; nvidia-smi: {m.get('nvidia_smi') or '-'}; {m.get('cpus')} x {m.get('cpu_model')}, "
                   f"{m.get('memory_gib')} GiB; Python {m.get('python')}, torch {m.get('torch')} "
                   f"(CUDA {m.get('torch_cuda')}, cuDNN {m.get('cudnn')}), faiss {m.get('faiss', '-')}; "
                   f"commit {m.get('commit') or '-'}. `bash bench/device_check.sh"
                 + (" --dry-run" if report["dry_run"] else "") + f"`: {fmt(report.get('total_s'))} s of a "
                   f"{fmt(report.get('budget_s'))} s budget.")
    lines += ["", "| step | status | seconds (time box) | result |", "|---|---|---|---|"]
    for name, rec in report["steps"].items():
        box = f" ({rec['limit_s']})" if rec.get("limit_s") else ""
        status = rec["status"] if rec["status"] == "ok" else f"**{rec['status']}**"
        lines.append(f"| {name} | {status} | {fmt(rec.get('seconds'))}{box} | {summary_line(name, rec)} |")
    steps = report["steps"]
    enc = (steps.get("encode") or {}).get("results") or {}
    if enc.get("rows"):
        s = enc.get("setup", {})
        peak = s.get("peak_bf16_tflops")
        lines += ["", f"Encoder ({s.get('config')}, {s.get('params_m')} M parameters per branch, {s.get('precision')}; "
                      f"FLOPs by torch.utils.flop_counter; MFU = achieved / {fmt(peak) if peak else 'unknown'} "
                      f"TFLOP/s dense bf16 peak; ceiling = measured {fmt(s.get('matmul_ceiling_tflops'))} TFLOP/s "
                      "matrix product):", "",
                  "| branch | input | batch | img/s | GFLOP/img | TFLOP/s | MFU | x ceiling | peak mem (GiB) | "
                  "bf16 max abs dev |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in enc["rows"]:
            lines.append(f"| {x['branch']} | {x['input']} | {x['batch']} | {fmt(x.get('img_s'))} | "
                         f"{fmt(x.get('gflop_per_image'), 2)} | {fmt(x.get('tflops'), 2)} | {fmt(x.get('mfu'), 3)} | "
                         f"{fmt(x.get('of_matmul_ceiling'), 3)} | {fmt(x.get('peak_memory_gib'), 2)} | "
                         f"{'-' if x.get('bf16_max_abs_dev') is None else format(x['bf16_max_abs_dev'], '.2e')} |"
                         + (f" {x['error']}" if x.get("error") else ""))
    tr = (steps.get("train") or {}).get("results") or {}
    if tr.get("steps_per_s"):
        lines += ["", "| training config | device | precision | batch | steps/s | pairs/s | forward GFLOP/pair | "
                      "~TFLOP/s (3 x forward) | ~MFU |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {tr['config']} | {tr['device']} | {tr['precision']} | {tr['batch']} | "
                  f"{fmt(tr['steps_per_s'], 2)} | {fmt(tr['pairs_per_s'])} | {fmt(tr['forward_gflop_per_pair'], 2)} | "
                  f"{fmt(tr['approx_tflops'], 2)} | "
                  f"{fmt(tr.get('approx_mfu'), 3)} |"]
    ix = (steps.get("index") or {}).get("results") or {}
    if ix.get("rows"):
        lines += ["", "| index_build model | weights | tiles | batch | build encode stage (tiles/s) | raw encoder "
                      "(tiles/s) | ratio | stage seconds |", "|---|---|---|---|---|---|---|---|"]
        for x in ix["rows"]:
            timings = ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in (x.get("timings") or {}).items())
            lines.append(f"| {x['model']} | {x.get('weights', '-')} | {fmt(x['tiles'])} | {x['batch']} | "
                         f"{fmt(x.get('build_tiles_per_s'))} | {fmt(x.get('raw_tiles_per_s'))} | "
                         f"{fmt(x.get('ratio'), 2)} | {timings or x.get('error', '-')} |")
    ld = (steps.get("load") or {}).get("results") or {}
    if ld.get("throughput_rps") is not None:
        lines += ["", "| service (bench/load.py) | device | tiles | c=1 p50 / p99 (ms) | raw batch-1 (ms) | "
                      f"c={ld['concurrency']} req/s | x raw batched | mean batch | p50 / p99 under load (ms) |",
                  "|---|---|---|---|---|---|---|---|---|",
                  f"| {ld['config']}, max batch {ld['max_batch_size']}, {ld['rounds']} rounds | {ld['device']} | "
                  f"{fmt(ld['tiles'])} | {fmt(ld['c1_p50_ms'], 2)} / {fmt(ld['c1_p99_ms'], 2)} | "
                  f"{fmt(ld['raw_batch1_ms'], 2)} | {fmt(ld['throughput_rps'])} | {fmt(ld['throughput_ratio'], 3)} | "
                  f"{', '.join(map(str, ld['mean_batch']))} | "
                  f"{', '.join(map(str, ld['load_p50_ms']))} / {', '.join(map(str, ld['load_p99_ms']))} |"]
    se = (steps.get("search") or {}).get("results") or {}
    if se.get("rows"):
        s = se.get("setup", {})
        lines += ["", f"Exact top-{s.get('k')} search over {fmt(s.get('n'))} random unit vectors (faiss "
                      f"{s.get('faiss') or 'not importable'}, {s.get('faiss_threads') or '-'} CPU threads; device copy "
                      f"ceiling {fmt(s.get('copy_gbps'))} GB/s):", "",
                  "| method | dim | batch | queries/s | ms per call | database read (GB/s) | recall@10 |",
                  "|---|---|---|---|---|---|---|"]
        for x in se["rows"]:
            recall = x.get("recall_at_10_vs_float32", x.get("recall_at_10_vs_torch"))
            lines.append(f"| {x['method']} | {x['dim']} | {x['batch']} | {fmt(x['qps'])} | "
                         f"{fmt(x['ms_per_call'], 3)} | "
                         f"{fmt(x['scan_gbps'])} | {fmt(recall, 4)} |")
    failed = [(n, r) for n, r in steps.items() if r["status"] in ("failed", "timeout", "partial")]
    if failed:
        lines += ["", "Errors:"]
        for name, rec in failed:
            errors = "; ".join(rec.get("errors") or []) or f"exit code {rec.get('rc')}"
            lines.append(f"- {name} ({rec['status']}): {errors}")
    return "\n".join(lines) + "\n"


def write_report(work: Path, out: Path, dry_run: bool, budget_s: int | None, total_s: int | None) -> int:
    report = collect(work, dry_run, budget_s, total_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (out / "device_check.md").write_text(text)
    print(text, flush=True)
    bad = [n for n, r in report["steps"].items() if r["status"] in ("failed", "timeout")]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=(*STEPS, "report"))
    p.add_argument("--work", type=Path, required=True, help="the run's working directory (steps' JSON and logs)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes")
    p.add_argument("--out", type=Path, help="report: where device_check.json and device_check.md go")
    p.add_argument("--budget", type=int, help="report: the run's time budget in seconds")
    p.add_argument("--total", type=int, help="report: the run's seconds so far")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step == "report":
        if args.out is None:
            p.error("report needs --out")
        return write_report(args.work, args.out, args.dry_run, args.budget, args.total)
    return run_step(args.step, args.work, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())

"""worldgen throughput: aerial + panorama pairs per second, end to end (render, encode, write).

  python bench/worldgen_speed.py                       # 2 workers, 600 pairs, 256 px tiles, 128x512 panos
  python bench/worldgen_speed.py --workers 1 --pairs 300
  python bench/worldgen_speed.py --append              # also append a section to bench/RESULTS.md

Reports the world build time, the end-to-end rendering rate of ``python -m worldgen`` (the
number the acceptance criterion is about: >= 40 pairs/s on a 2-core CPU), a single-process CPU
time breakdown per pair, and the machine load while it ran (the box may be shared).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worldgen.dataset import GenConfig, encode_jpeg, encode_png, generate_dataset, render_pair  # noqa: E402
from worldgen.world import camera_positions, generate_world  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def busy_processes(limit: int = 5) -> str:
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=5).stdout
    except Exception:
        return "n/a"
    rows = []
    for line in out.splitlines()[1:]:
        pc, _, cmd = line.strip().partition(" ")
        if "worldgen_speed" in cmd or float(pc or 0) < 5:
            continue
        rows.append(f"{pc}% {cmd.strip()[:70]}")
        if len(rows) >= limit:
            break
    return "; ".join(rows) or "nothing above 5% CPU"


def breakdown(seed: int, area: float, n: int) -> dict:
    world = generate_world(seed, area)
    cams = camera_positions(world, 25.0, np.random.default_rng(0), limit=n)
    cfg = GenConfig(seed=seed, area_km2=area)
    from worldgen.render import render_aerial, render_pano, sample_aerial_look, sample_pano_look

    t = dict(aerial=0.0, pano=0.0, png=0.0, jpeg=0.0)
    for i, (x, y) in enumerate(cams):
        rng = np.random.default_rng(i)
        al, pl = sample_aerial_look(rng), sample_pano_look(rng)
        t0 = time.process_time()
        a = render_aerial(world, x, y, cfg.tile_px, cfg.footprint_m, al, rng)
        t1 = time.process_time()
        p = render_pano(world, x, y, cfg.pano_height, cfg.pano_width, pl, rng)
        t2 = time.process_time()
        encode_png(a)
        t3 = time.process_time()
        encode_jpeg(p)
        t4 = time.process_time()
        t["aerial"] += t1 - t0
        t["pano"] += t2 - t1
        t["png"] += t3 - t2
        t["jpeg"] += t4 - t3
    return {k: 1000 * v / max(len(cams), 1) for k, v in t.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--area-km2", type=float, default=2.0)
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--breakdown-pairs", type=int, default=60)
    ap.add_argument("--append", action="store_true", help="append the result section to bench/RESULTS.md")
    args = ap.parse_args(argv)

    load0 = os.getloadavg()
    others = busy_processes()
    tmp = tempfile.mkdtemp(prefix="wg-bench-")
    lines: list[str] = []
    try:
        cfg = GenConfig(seed=args.seed, area_km2=args.area_km2, pairs=args.pairs)
        logs: list[str] = []
        import resource

        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        meta = generate_dataset(cfg, os.path.join(tmp, "w"), workers=args.workers, progress=False, log=logs.append)
        total = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds the render workers used (user + sys): pairs per CPU-second, i.e. what the
        # worker count would reach on otherwise idle cores
        worker_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        last = logs[-1]
        # "... (world X s, rendering Y s = Z pairs/s)"
        world_s = float(last.split("(world ")[1].split(" s")[0])
        render_s = float(last.split("rendering ")[1].split(" s")[0])
        rate = args.pairs / render_s
        size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    bd = breakdown(args.seed + 1, 0.3, args.breakdown_pairs)
    per_pair = sum(bd.values())
    lines.append(f"- date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: {cpu_model()}, "
                 f"{os.cpu_count()} logical CPUs, Python {platform.python_version()}, numpy {np.__version__}")
    lines.append(f"- load average before/after: {load0[0]:.2f} / {load1[0]:.2f}; other busy processes at start: {others}")
    lines.append(f"- `python -m worldgen --seed {args.seed} --area-km2 {args.area_km2} --pairs {args.pairs} "
                 f"--workers {args.workers}` (256 px tiles / 100 m, 128x512 panoramas): world build {world_s:.1f} s, "
                 f"rendering+encoding+writing **{rate:.1f} pairs/s** ({render_s:.1f} s), total {total:.1f} s, "
                 f"{size_mb / args.pairs * 1000:.0f} kB per pair on disk; {meta['counts']['buildings']} buildings, "
                 f"{meta['counts']['trees']} trees")
    if args.workers > 1 and worker_cpu > 0:
        cpu_rate = args.pairs / worker_cpu
        lines.append(f"- render workers used {worker_cpu:.1f} CPU-s (user+sys) for {args.pairs} pairs = "
                     f"{cpu_rate:.1f} pairs per CPU-second -> **~{cpu_rate * min(args.workers, os.cpu_count() or 1):.0f} pairs/s "
                     f"on {min(args.workers, os.cpu_count() or 1)} idle cores** (CPU-bound estimate; contention inflates CPU time, "
                     f"so this is conservative)")
    lines.append(f"- single-process CPU time per pair (process_time, {args.breakdown_pairs} pairs): aerial "
                 f"{bd['aerial']:.1f} ms, panorama {bd['pano']:.1f} ms, PNG {bd['png']:.1f} ms, JPEG {bd['jpeg']:.1f} ms "
                 f"= {per_pair:.1f} ms -> {1000 / per_pair:.0f} pairs/s per core of CPU time")
    text = "\n".join(lines)
    print(text)
    if args.append:
        path = Path(__file__).resolve().parent / "RESULTS.md"
        with open(path, "a") as f:
            f.write("\n## worldgen\n\n### generation speed (bench/worldgen_speed.py)\n\n" + text + "\n")
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

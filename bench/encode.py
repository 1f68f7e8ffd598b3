"""Encoder throughput per branch: images/s at batch 1 and at the best batch size, and the
float32 vs bf16 deviation of the descriptors.

  python bench/encode.py --configs tiny paper --seconds 4
  python bench/encode.py --device cuda --configs tiny small paper

Prints a Markdown table (paste into bench/RESULTS.md) and, with --json, the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import L2LTR, L2LTRConfig  # noqa: E402
from model.encode import autocast_context, pick_device  # noqa: E402
from model.inference import InferenceEncoder  # noqa: E402


def throughput(fn, x: torch.Tensor, seconds: float, device: torch.device) -> float:
    fn(x)  # warm-up (also fills the standardised-weight cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bf16_deviation(model: L2LTR, branch: str, x: torch.Tensor, device: torch.device) -> float:
    encode = getattr(model, f"encode_{branch}")
    with torch.inference_mode():
        ref = encode(x).float()
        if device.type == "cuda":
            with autocast_context(device):
                low = encode(x).float()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = encode(x).float()
    return float((torch.nn.functional.normalize(low, dim=-1) - ref).abs().max())


def bench_config(name: str, device: torch.device, batches: list[int], seconds: float) -> list[dict]:
    cfg = L2LTRConfig.named(name)
    encoder = InferenceEncoder(L2LTR(cfg), device)
    model = encoder.net
    rows = []
    for branch in ("ground", "aerial"):
        size = cfg.ground_size if branch == "ground" else cfg.aerial_size

        def run(x, branch=branch):
            return encoder.encode(x, branch)

        results = {}
        for bs in batches:
            x = torch.randn(bs, 3, *size, device=device)
            results[bs] = throughput(run, x, seconds, device)
        best = max((b for b in batches if b > 1), key=lambda b: results[b])
        dev = bf16_deviation(model, branch, torch.randn(4, 3, *size, device=device), device)
        rows.append({"config": name, "branch": branch, "input": f"{size[0]}x{size[1]}",
                     "batch1_img_s": results[1], "best_batch": best, "best_img_s": results[best],
                     "all": results, "bf16_max_abs_dev": dev,
                     "params_m": sum(p.numel() for p in getattr(model, branch).parameters()) / 1e6})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "paper"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 32, 64])
    p.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows = []
    for name in args.configs:
        batches = args.batches if name == "tiny" or device.type == "cuda" else [b for b in args.batches if b <= 16]
        rows += bench_config(name, device, batches, args.seconds)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {device} ({where}); torch {torch.__version__}")
    print("| config | branch | input | params (M) | batch 1 img/s | best batch | best img/s | bf16 max abs dev |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['branch']} | {r['input']} | {r['params_m']:.2f} | {r['batch1_img_s']:.1f} | "
              f"{r['best_batch']} | {r['best_img_s']:.1f} | {r['bf16_max_abs_dev']:.2e} |")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

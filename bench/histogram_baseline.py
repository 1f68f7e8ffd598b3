"""Difficulty check: colour-histogram matching (panorama vs aerial tile) on a held-out region.

  python bench/histogram_baseline.py                    # generates seed 1001, 1,000 pairs, then matches
  python bench/histogram_baseline.py --data DIR         # an existing worldgen directory
  python bench/histogram_baseline.py --append           # also append to bench/RESULTS.md

The acceptance criterion: the best histogram variant stays below 10% R@1 over 1,000 tiles.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worldgen.baseline import histogram_baseline  # noqa: E402
from worldgen.dataset import GenConfig, generate_dataset  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="existing worldgen directory (default: generate one)")
    ap.add_argument("--seed", type=int, default=1001)
    ap.add_argument("--area-km2", type=float, default=3.0)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)
    tmp = None
    try:
        if args.data is None:
            tmp = tempfile.mkdtemp(prefix="wg-hist-")
            root = str(Path(tmp) / "w")
            generate_dataset(GenConfig(seed=args.seed, area_km2=args.area_km2, pairs=args.pairs), root,
                             workers=args.workers, progress=False, log=lambda *a: None)
            src = f"seed {args.seed}, {args.area_km2} km^2, {args.pairs} pairs (generated)"
        else:
            root = args.data
            src = root
        t0 = time.perf_counter()
        res = histogram_baseline(root, limit=args.pairs)
        took = time.perf_counter() - t0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    n = res["n"]
    rows = [f"| {name} | {res[name]['r1'] * 100:.1f} | {res[name]['r5'] * 100:.1f} | {res[name]['r10'] * 100:.1f} |"
            for name in ("full_pano", "ground_half", "ground_half_greyworld")]
    text = "\n".join([
        f"- {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; held-out region: {src}; gallery N = {n} tiles "
        f"(chance R@1 = {100 / max(n, 1):.2f}%); joint RGB 8x8x8 histograms, histogram intersection; {took:.1f} s",
        "",
        "| variant | R@1 % | R@5 % | R@10 % |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Best R@1: **{res['best_r1'] * 100:.1f}%** ({res['best']}); criterion < 10%: "
        f"{'met' if res['best_r1'] < 0.10 else 'NOT met'}.",
    ])
    print(text)
    if args.append:
        path = Path(__file__).resolve().parent / "RESULTS.md"
        with open(path, "a") as f:
            f.write("\n## worldgen\n\n### colour-histogram baseline (bench/histogram_baseline.py)\n\n" + text + "\n")
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tune the refined position (model.metrics.refine_position) on saved similarities.

  .venv/bin/python -m model.evaluate --checkpoint CKPT --data data/grid_train_val --index data/grid_train_index \
      --save-scores data/train_scores.npz
  .venv/bin/python bench/refine_tune.py data/train_scores.npz [--apply data/eval_scores.npz]

Each .npz holds the [Q, N] similarities of Q cameras to N tiles, the tile centres and the cameras' true
positions (model.evaluate --save-scores). For every softmax temperature x consistency radius of the grid
the median / mean refined error and the share within 25 m are printed; the setting with the lowest
median error on the first file is then evaluated on --apply (a region it was not chosen on), beside the
top-1 tile centre and the current defaults.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.metrics import CONSISTENT_TILES, POSITION_TEMPERATURE, position_report  # noqa: E402

TEMPERATURES = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08)
CONSISTENT = (0.75, 1.0, 1.5, 2.0)


def load(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in ("scores", "tile_latlon", "true_latlon")}


def report(data: dict, tile_m: float, temperature: float, consistent: float, candidates: int) -> dict:
    return position_report(data["scores"], data["tile_latlon"], tile_m, candidates, true_latlon=data["true_latlon"],
                           temperature=temperature, consistent_tiles=consistent)


def row(name: str, e: dict) -> str:
    return (f"| {name} | {e['median_error_m']:.1f} | {e['mean_error_m']:.1f} | {e['within_10m'] * 100:.1f} | "
            f"{e['within_25m'] * 100:.1f} | {e['within_50m'] * 100:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scores", type=Path, help="similarities saved by model.evaluate --save-scores (tuning set)")
    p.add_argument("--apply", type=Path, help="a second .npz to evaluate the chosen setting on")
    p.add_argument("--tile-m", type=float, default=100.0, help="tile footprint in metres")
    p.add_argument("--candidates", type=int, default=20, help="top matches per query")
    args = p.parse_args(argv)
    tune = load(args.scores)
    header = "| setting | median m | mean m | <=10 m | <=25 m | <=50 m |\n|---|---|---|---|---|---|"
    print(f"tuning on {args.scores} ({len(tune['scores'])} cameras, {tune['scores'].shape[1]} tiles)")
    print(header)
    best = None
    for t, c in itertools.product(TEMPERATURES, CONSISTENT):
        e = report(tune, args.tile_m, t, c, args.candidates)["refined"]
        print(row(f"T {t:g}, within {c:g} tiles", e))
        if best is None or e["median_error_m"] < best[0]:
            best = (e["median_error_m"], t, c)
    _, t, c = best
    print(f"chosen: temperature {t:g}, consistent within {c:g} tiles")
    if args.apply:
        held = load(args.apply)
        print(f"on {args.apply} ({len(held['scores'])} cameras, {held['scores'].shape[1]} tiles)")
        print(header)
        default = report(held, args.tile_m, POSITION_TEMPERATURE, CONSISTENT_TILES, args.candidates)
        print(row("top-1 tile centre", default["top1"]))
        print(row(f"refined, defaults (T {POSITION_TEMPERATURE:g}, {CONSISTENT_TILES:g} tiles)", default["refined"]))
        print(row(f"refined, chosen (T {t:g}, {c:g} tiles)", report(held, args.tile_m, t, c, args.candidates)["refined"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

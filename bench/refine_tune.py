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

from model.metrics import (CONSISTENT_TILES, POSITION_TEMPERATURE, haversine_m, position_report,  # noqa: E402
                           rows_within)

TEMPERATURES = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08)
CONSISTENT = (0.75, 1.0, 1.5, 2.0)


def load(path: Path, near_radius_m: float, local_m: float) -> dict:
    """The saved similarities, with -inf outside ``near_radius_m`` of each camera (a prior; 0: none), and
    which cameras' top-1 tile centre is within ``local_m`` of them (the place was found)."""
    with np.load(path) as z:
        data = {k: z[k] for k in ("scores", "tile_latlon", "true_latlon")}
        ranking = str(z["ranking"]) if "ranking" in z else "descriptor"
        saved_radius = float(z["near_radius_m"]) if "near_radius_m" in z else None
        if near_radius_m > 0 and saved_radius == near_radius_m:  # ranked among the prior's tiles when saved
            data["scores"] = z["prior_scores"]
            return _found(data, local_m)
    if near_radius_m > 0 and ranking != "descriptor":
        raise SystemExit(f"{path}: its scores are re-ranked over the whole index, which a prior can not be applied to "
                         f"afterwards; save them with model.evaluate --near-radius-m {near_radius_m:g}")
    tiles, truth = data["tile_latlon"], data["true_latlon"]
    if near_radius_m > 0:
        for i, (lat, lon) in enumerate(truth):
            far = np.ones(len(tiles), bool)
            far[rows_within(tiles[:, 0], tiles[:, 1], lat, lon, near_radius_m)] = False
            data["scores"][i, far] = -np.inf
    return _found(data, local_m)


def _found(data: dict, local_m: float) -> dict:
    tiles, truth = data["tile_latlon"], data["true_latlon"]
    top1 = data["scores"].argmax(axis=1)
    data["found"] = haversine_m(truth[:, 0], truth[:, 1], tiles[top1, 0], tiles[top1, 1]) <= local_m
    return data


def report(data: dict, tile_m: float, temperature: float, consistent: float, candidates: int,
           found_only: bool = False) -> dict:
    keep = data["found"] if found_only else np.ones(len(data["scores"]), bool)
    return position_report(data["scores"][keep], data["tile_latlon"], tile_m, candidates,
                           true_latlon=data["true_latlon"][keep], temperature=temperature, consistent_tiles=consistent)


def row(name: str, e: dict, found: dict | None = None) -> str:
    tail = f" {found['median_error_m']:.1f} | {found['mean_error_m']:.1f} |" if found else " | |"
    return (f"| {name} | {e['median_error_m']:.1f} | {e['mean_error_m']:.1f} | {e['within_10m'] * 100:.1f} | "
            f"{e['within_25m'] * 100:.1f} | {e['within_50m'] * 100:.1f} |{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scores", type=Path, help="similarities saved by model.evaluate --save-scores (tuning set)")
    p.add_argument("--apply", type=Path, help="a second .npz to evaluate the chosen setting on")
    p.add_argument("--tile-m", type=float, default=100.0, help="tile footprint in metres")
    p.add_argument("--candidates", type=int, default=20, help="top matches per query")
    p.add_argument("--near-radius-m", type=float, default=0.0,
                   help="search each camera only among the tiles within this radius of its true position (0: all)")
    p.add_argument("--local-m", type=float, default=50.0,
                   help="a camera whose top-1 tile centre is this near counts as found; the setting is chosen by "
                        "the median refined error over the found cameras (where most are not found, the median over "
                        "all is the error of a wrong match and says nothing about the refinement)")
    args = p.parse_args(argv)
    tune = load(args.scores, args.near_radius_m, args.local_m)
    header = ("| setting | median m | mean m | <=10 m | <=25 m | <=50 m | found: median m | found: mean m |\n"
              "|---|---|---|---|---|---|---|---|")
    prior = f", prior {args.near_radius_m:g} m" if args.near_radius_m > 0 else ""
    print(f"tuning on {args.scores} ({len(tune['scores'])} cameras, {tune['scores'].shape[1]} tiles{prior}; "
          f"found: top-1 within {args.local_m:g} m, {tune['found'].sum()} cameras)")
    print(header)
    best = None
    for t, c in itertools.product(TEMPERATURES, CONSISTENT):
        e = report(tune, args.tile_m, t, c, args.candidates)["refined"]
        f = report(tune, args.tile_m, t, c, args.candidates, found_only=True)["refined"]
        print(row(f"T {t:g}, within {c:g} tiles", e, f))
        if best is None or f["median_error_m"] < best[0]:
            best = (f["median_error_m"], t, c)
    _, t, c = best
    print(f"chosen: temperature {t:g}, consistent within {c:g} tiles")
    if args.apply:
        held = load(args.apply, args.near_radius_m, args.local_m)
        print(f"on {args.apply} ({len(held['scores'])} cameras, {held['scores'].shape[1]} tiles{prior}; "
              f"found: {held['found'].sum()} cameras)")
        print(header)
        settings = (("refined, defaults", POSITION_TEMPERATURE, CONSISTENT_TILES), ("refined, chosen", t, c))
        for i, (name, temp, cons) in enumerate(settings):
            every = report(held, args.tile_m, temp, cons, args.candidates)
            found = report(held, args.tile_m, temp, cons, args.candidates, found_only=True)
            if i == 0:
                print(row("top-1 tile centre", every["top1"], found["top1"]))
            print(row(f"{name} (T {temp:g}, {cons:g} tiles)", every["refined"], found["refined"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

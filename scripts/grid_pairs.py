"""Training pairs from a `worldgen --layout grid` region: each camera with the tile whose centre is
nearest to it (cut by `index_build tile`), so that a model learns cameras anywhere in a tile.

  .venv/bin/python scripts/grid_pairs.py --world data/grid_train --tiles data/grid_train/tiles \
      --out data/grid_train_pairs --val 400

OUT is a synthetic data set for `model.train --data OUT`: splits/train.csv and splits/val.csv
(id,aerial,ground,lat,lon,tile_lat,tile_lon; lat/lon are the camera's true position, tile_lat/tile_lon
its tile's centre, for `model.train --semi-positives`) with `streetview` and `tiles`
linked to the world's and the catalogue's directories. `offsets.csv` gives each camera's distance
to its tile's centre and its split.

The --val cameras held out are the easternmost ones, a band along the region's east edge (the cameras'
order is random: the last ones were scattered among the training cameras, half of them on the same
tiles). A training camera whose tile overlaps a held-out camera's tile (centres nearer than the tile
size, --tile-m, in both directions) would train on the ground the validation tests: it is left out
of both splits ("buffer" in offsets.csv).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from model.arguments import non_negative_int, number
from model.metrics import local_xy_m


def _rows(path: Path, columns: tuple[str, ...]) -> tuple[list[dict], np.ndarray]:
    """A CSV's rows (with at least ``columns``, lat and lon among them) and their [N, 2] lat/lon; a
    missing column or a bad coordinate ends the run naming the file and line."""
    if not path.is_file():
        raise SystemExit(f"grid_pairs: error: {path} does not exist")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"grid_pairs: error: {path}: no column {', '.join(missing)} (header: {reader.fieldnames})")
        rows, latlon = [], []
        for row in reader:
            try:
                lat, lon = float(row["lat"]), float(row["lon"])
            except (TypeError, ValueError):
                lat = lon = math.nan
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise SystemExit(f"grid_pairs: error: {path}:{reader.line_num}: lat/lon must be degrees, "
                                 f"got {row['lat']!r}, {row['lon']!r}")
            rows.append(row)
            latlon.append((lat, lon))
    return rows, np.array(latlon, dtype=np.float64).reshape(-1, 2)


def nearest_tiles(cam_ll: np.ndarray, tile_ll: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest tile centre of each camera and its distance in metres (model.metrics.local_xy_m:
    exact enough over a region of a few km)."""
    from scipy.spatial import cKDTree

    origin = cam_ll.mean(axis=0)
    dist, idx = cKDTree(local_xy_m(*tile_ll.T, *origin)).query(local_xy_m(*cam_ll.T, *origin))
    return idx, dist


def split_cameras(cam_ll: np.ndarray, tile_ll: np.ndarray, idx: np.ndarray, val: int, tile_m: float) -> np.ndarray:
    """Each camera's split: "val" for the ``val`` easternmost, "buffer" for the others whose tile overlaps
    a val camera's tile (centres nearer than ``tile_m`` east-west and north-south), else "train"."""
    from scipy.spatial import cKDTree

    split = np.full(len(cam_ll), "train", dtype=object)
    if val == 0:
        return split
    held = np.lexsort((cam_ll[:, 0], cam_ll[:, 1]))[-val:]  # by longitude, then latitude
    split[held] = "val"
    centres = local_xy_m(*tile_ll.T, *cam_ll.mean(axis=0))
    near_val = cKDTree(centres[np.unique(idx[held])]).query(centres[idx], distance_upper_bound=tile_m, p=np.inf)[0]
    # overlapping by more than 1%: touching tiles (centres tile_m apart, give or take this frame's error) are fine
    split[(split == "train") & (near_val < 0.99 * tile_m)] = "buffer"
    return split


def tile_size(tiles: Path, given: float | None) -> float:
    """--tile-m, else the tile_m of the tiling.json that index_build tile wrote beside tiles.csv."""
    if given is not None:
        return given
    try:
        return float(json.loads((tiles / "tiling.json").read_text())["tile_m"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"grid_pairs: error: no tile size: pass --tile-m ({tiles / 'tiling.json'}: {exc})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, type=Path, help="a worldgen --layout grid directory")
    p.add_argument("--tiles", required=True, type=Path, help="its tiles cut by index_build tile (holds tiles.csv)")
    p.add_argument("--out", required=True, type=Path, help="new data set directory (must not exist)")
    p.add_argument("--val", type=non_negative_int, default=400,
                   help="cameras held out as the validation split: the easternmost")
    p.add_argument("--tile-m", type=number(above=0),
                   help="the tiles' side in metres, for the buffer around the held-out cameras' tiles "
                        "(default: from the tiling.json beside --tiles' tiles.csv)")
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"grid_pairs: error: {args.out} exists")
    queries, cam_ll = _rows(args.world / "queries.csv", ("query_id", "path", "lat", "lon"))
    tiles, tile_ll = _rows(args.tiles / "tiles.csv", ("tile_id", "path", "lat", "lon"))
    if not queries or not tiles:
        raise SystemExit("grid_pairs: error: no cameras or no tiles")
    if not 0 <= args.val < len(queries):
        raise SystemExit(f"grid_pairs: error: --val {args.val} must be below the {len(queries)} cameras")
    idx, dist = nearest_tiles(cam_ll, tile_ll)
    split = split_cameras(cam_ll, tile_ll, idx, args.val, tile_size(args.tiles, args.tile_m) if args.val else 0.0)
    if not (split == "train").any():
        raise SystemExit(f"grid_pairs: error: --val {args.val} leaves no training pair (the other "
                         f"{(split == 'buffer').sum()} cameras' tiles overlap the held-out cameras' tiles)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    building = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")  # renamed to OUT once whole
    try:
        _write(building, args, queries, tiles, idx, dist, split)
        os.rename(building, args.out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    print(f"{(split == 'train').sum()} training and {args.val} validation pairs in {args.out} "
          f"({(split == 'buffer').sum()} cameras left out: their tiles overlap validation tiles); camera to its "
          f"tile centre: median {np.median(dist):.1f} m, at most {dist.max():.1f} m")
    return 0


def _write(out: Path, args: argparse.Namespace, queries: list[dict], tiles: list[dict], idx: np.ndarray,
           dist: np.ndarray, split: np.ndarray) -> None:
    (out / "splits").mkdir(parents=True)
    os.symlink(os.path.abspath(args.world / "streetview"), out / "streetview")
    os.symlink(os.path.abspath(args.tiles), out / "tiles")
    for name in ("train", "val"):
        with open(out / "splits" / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "aerial", "ground", "lat", "lon", "tile_lat", "tile_lon"])
            for i in np.flatnonzero(split == name):
                q, t = queries[i], tiles[idx[i]]
                w.writerow([q["query_id"], f"tiles/{t['path']}", q["path"], q["lat"], q["lon"], t["lat"], t["lon"]])
    with open(out / "offsets.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "tile_id", "offset_m", "split"])
        for q, i, d, s in zip(queries, idx, dist, split):
            w.writerow([q["query_id"], tiles[i]["tile_id"], f"{d:.2f}", s])


if __name__ == "__main__":
    sys.exit(main())

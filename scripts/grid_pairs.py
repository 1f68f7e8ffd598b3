"""Training pairs from a `worldgen --layout grid` region: each camera with the tile whose centre is
nearest to it (cut by `index_build tile`), so that a model learns cameras anywhere in a tile.

  .venv/bin/python scripts/grid_pairs.py --world data/grid_train --tiles data/grid_train/tiles \
      --out data/grid_train_pairs --val 400

OUT is a synthetic data set for `model.train --data OUT`: splits/train.csv and splits/val.csv
(id,aerial,ground,lat,lon,tile_lat,tile_lon; lat/lon are the camera's true position, tile_lat/tile_lon
its tile's centre, for `model.train --semi-positives`) with `streetview` and `tiles`
linked to the world's and the catalogue's directories. `offsets.csv` gives each camera's distance
to its tile's centre. The last --val cameras (in camera order) are held out.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import numpy as np

EARTH_RADIUS_M = 6_371_008.8


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"grid_pairs: error: {path} does not exist")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def nearest_tiles(cam_ll: np.ndarray, tile_ll: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest tile centre of each camera and its distance in metres (equirectangular
    frame at the cameras' mean latitude: exact enough over a region of a few km)."""
    k = math.radians(1.0) * EARTH_RADIUS_M
    c = math.cos(math.radians(float(cam_ll[:, 0].mean())))
    cam = np.column_stack([cam_ll[:, 1] * k * c, cam_ll[:, 0] * k])
    tile = np.column_stack([tile_ll[:, 1] * k * c, tile_ll[:, 0] * k])
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(tile).query(cam)
    return idx, dist


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, type=Path, help="a worldgen --layout grid directory")
    p.add_argument("--tiles", required=True, type=Path, help="its tiles cut by index_build tile (holds tiles.csv)")
    p.add_argument("--out", required=True, type=Path, help="new data set directory (must not exist)")
    p.add_argument("--val", type=int, default=400, help="cameras held out as the validation split")
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"grid_pairs: error: {args.out} exists")
    queries = _rows(args.world / "queries.csv")
    tiles = _rows(args.tiles / "tiles.csv")
    if not queries or not tiles:
        raise SystemExit("grid_pairs: error: no cameras or no tiles")
    if not 0 <= args.val < len(queries):
        raise SystemExit(f"grid_pairs: error: --val {args.val} must be below the {len(queries)} cameras")
    cam_ll = np.array([(float(q["lat"]), float(q["lon"])) for q in queries])
    tile_ll = np.array([(float(t["lat"]), float(t["lon"])) for t in tiles])
    idx, dist = nearest_tiles(cam_ll, tile_ll)
    args.out.mkdir(parents=True)
    (args.out / "splits").mkdir()
    os.symlink(os.path.abspath(args.world / "streetview"), args.out / "streetview")
    os.symlink(os.path.abspath(args.tiles), args.out / "tiles")
    n_train = len(queries) - args.val
    for split, rows in (("train", range(n_train)), ("val", range(n_train, len(queries)))):
        with open(args.out / "splits" / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "aerial", "ground", "lat", "lon", "tile_lat", "tile_lon"])
            for i in rows:
                q, t = queries[i], tiles[idx[i]]
                w.writerow([q["query_id"], f"tiles/{t['path']}", q["path"], q["lat"], q["lon"], t["lat"], t["lon"]])
    with open(args.out / "offsets.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "tile_id", "offset_m"])
        for q, i, d in zip(queries, idx, dist):
            w.writerow([q["query_id"], tiles[i]["tile_id"], f"{d:.2f}"])
    print(f"{n_train} training and {args.val} validation pairs in {args.out}; camera to its tile centre: median "
          f"{np.median(dist):.1f} m, at most {dist.max():.1f} m")
    return 0


if __name__ == "__main__":
    sys.exit(main())

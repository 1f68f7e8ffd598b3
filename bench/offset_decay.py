"""How far from its tile's centre can a camera stand and still be found? (issue 17)

For every camera of a `worldgen --layout grid` region, a 100 m tile is cut from the region's orthophoto
centred a given distance from the camera (random direction), and the camera's panorama is ranked
against the tiles centred exactly on the other cameras: R@1 as a function of that distance. A second
table ranks each camera's centred tile against tiles cut at random places of the region (distractors:
roofs, yards, fields; none within 25 m of the camera), which a grid of tiles is mostly made of.

  .venv/bin/python -m worldgen --seed 5150 --area-km2 2 --layout grid --pairs 800 --out data/grid_eval --workers 2
  .venv/bin/python bench/offset_decay.py --grid data/grid_eval --checkpoint weights/l2ltr_tiny_demo.safetensors
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OFFSETS_M = (0.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0)


def main(argv: list[str] | None = None) -> int:
    import rasterio
    import torch
    from PIL import Image

    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.preprocess import aerial_image, load_ground_image

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, type=Path, help="worldgen --layout grid directory (ortho.tif, cameras.csv)")
    p.add_argument("--checkpoint", required=True, type=Path, nargs="+")
    p.add_argument("--tile-m", type=float, default=100.0, help="ground side of a tile (metres)")
    p.add_argument("--distractors", type=int, default=4000, help="tiles cut at random places")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ortho = json.loads((args.grid / "world.json").read_text())["ortho"]
    half, m_per_px = ortho["half_extent_m"], ortho["m_per_px"]
    px = int(round(args.tile_m / m_per_px))
    with rasterio.open(args.grid / "ortho.tif") as ds:
        image = ds.read().transpose(1, 2, 0)
    with open(args.grid / "cameras.csv", newline="") as fh:
        cameras = list(csv.DictReader(fh))
    margin = half - args.tile_m / 2 - max(OFFSETS_M) - 1.0  # every tile of every kept camera inside the ortho
    cameras = [c for c in cameras if max(abs(float(c["x_m"])), abs(float(c["y_m"]))) <= margin]
    if not cameras or args.tile_m <= 0:
        raise SystemExit(f"offset_decay: error: no camera of {args.grid} stands {half - margin:.0f} m inside the "
                         f"orthophoto's edge (needed for --tile-m {args.tile_m:g} and offsets up to {max(OFFSETS_M):g} m)")
    xy = np.array([[float(c["x_m"]), float(c["y_m"])] for c in cameras])
    rng = np.random.default_rng(args.seed)
    angles = {d: rng.uniform(0, 2 * np.pi, len(xy)) for d in OFFSETS_M}
    lim = half - args.tile_m * 0.6
    places = rng.uniform(-lim, lim, (args.distractors, 2))
    near_camera = np.hypot(*(places[None] - xy[:, None]).transpose(2, 0, 1)) < 25.0  # [cameras, places]

    def cut(x: float, y: float) -> Image.Image:
        c0 = int(round((x + half) / m_per_px - px / 2))
        r0 = int(round((half - y) / m_per_px - px / 2))
        if min(c0, r0) < 0 or c0 + px > image.shape[1] or r0 + px > image.shape[0]:
            raise SystemExit(f"offset_decay: error: a tile at ({x:.1f}, {y:.1f}) m leaves the orthophoto")
        return Image.fromarray(image[r0:r0 + px, c0:c0 + px])

    print(f"{len(cameras)} cameras of {args.grid} (those at least {half - margin:.0f} m inside the orthophoto's edge); "
          f"tiles {args.tile_m:g} m ({px} px)")
    rows = {}
    for path in args.checkpoint:
        model = load_checkpoint(path)
        encoder = InferenceEncoder(model, torch.device("cpu"))

        def encode(images, branch):
            batch = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2)
            return encoder.encode_uint8_with_columns(batch, branch, max_batch=128, columns=False)[0]

        ground = encode([load_ground_image(args.grid / "streetview" / f"{c['id']}.jpg", model.config)
                         for c in cameras], "ground")
        aerial = {d: encode([aerial_image(cut(x + d * np.cos(t), y + d * np.sin(t)), model.config)
                             for (x, y), t in zip(xy, angles[d])], "aerial") for d in OFFSETS_M}
        others = ground @ aerial[0.0].T
        np.fill_diagonal(others, -np.inf)
        best_other = others.max(axis=1)
        recall = [float(np.mean((ground * aerial[d]).sum(1) > best_other)) * 100 for d in OFFSETS_M]
        random_tiles = encode([aerial_image(cut(x, y), model.config) for x, y in places], "aerial")
        scores = np.where(near_camera, -np.inf, ground @ random_tiles.T)
        against_random = float(np.mean((ground * aerial[0.0]).sum(1) > scores.max(axis=1))) * 100
        rows[path] = recall, against_random
    print("\nR@1 of a tile cut a given distance from the camera, against the tiles centred on the other cameras")
    print("| checkpoint | " + " | ".join(f"{d:g} m" for d in OFFSETS_M)
          + f" | centred vs {args.distractors} random tiles |")
    print("|---" * (len(OFFSETS_M) + 2) + "|")
    for path, (recall, against_random) in rows.items():
        print(f"| {path} | " + " | ".join(f"{r:.2f}" for r in recall) + f" | {against_random:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

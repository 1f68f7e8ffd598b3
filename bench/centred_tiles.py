"""What the off-centre camera costs: the cameras of a `worldgen --layout pairs` region matched against tiles
cut from the same seed's `--layout grid` orthophoto exactly centred on them (the training condition), and
against the worldgen pair tiles, with the authors' protocol (gallery = one centred tile per camera).

  .venv/bin/python -m worldgen --seed 5150 --area-km2 2 --layout grid --pairs 800 --out data/grid_eval --workers 2
  .venv/bin/python -m worldgen --seed 5150 --area-km2 2 --pairs 800 --out data/pairs_eval --workers 2
  .venv/bin/python bench/centred_tiles.py --grid data/grid_eval --pairs data/pairs_eval \
      --checkpoint weights/l2ltr_tiny_demo.safetensors

The same cameras against the tiles of `index_build tile` (every 50 m, off their centres):
`model.evaluate --data data/pairs_eval --index INDEX` (docs/TRAINING.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import rasterio
    import torch
    from PIL import Image

    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.metrics import count_closer_scores, recall_from_counts
    from model.preprocess import aerial_image, load_ground_image, load_image

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, type=Path, help="worldgen --layout grid directory (ortho.tif)")
    p.add_argument("--pairs", required=True, type=Path, help="worldgen --layout pairs directory, same seed and area")
    p.add_argument("--checkpoint", required=True, type=Path)
    args = p.parse_args(argv)
    ortho = json.loads((args.grid / "world.json").read_text())["ortho"]
    pairs_cfg = json.loads((args.pairs / "world.json").read_text())
    grid_cfg = json.loads((args.grid / "world.json").read_text())
    if (pairs_cfg["seed"], pairs_cfg["area_km2"]) != (grid_cfg["seed"], grid_cfg["area_km2"]):
        raise SystemExit("centred_tiles: error: --grid and --pairs must be the same seed and area")
    px = int(round(pairs_cfg["tile_footprint_m"] / ortho["m_per_px"]))
    with rasterio.open(args.grid / ortho["path"] if "path" in ortho else args.grid / "ortho.tif") as ds:
        image = ds.read().transpose(1, 2, 0)
    with open(args.pairs / "cameras.csv", newline="") as fh:
        cameras = list(csv.DictReader(fh))
    model = load_checkpoint(args.checkpoint)
    import io

    def jpeg(tile: Image.Image) -> Image.Image:  # as index_build tile writes its tiles (JPEG, quality 90)
        buf = io.BytesIO()
        tile.save(buf, format="JPEG", quality=90)
        return load_image(buf.getvalue())

    cut, cut_jpeg, own, ground = [], [], [], []
    for cam in cameras:
        col = (float(cam["x_m"]) + ortho["half_extent_m"]) / ortho["m_per_px"]
        row = (ortho["half_extent_m"] - float(cam["y_m"])) / ortho["m_per_px"]
        c0, r0 = int(round(col - px / 2)), int(round(row - px / 2))
        if min(c0, r0) < 0 or c0 + px > image.shape[1] or r0 + px > image.shape[0]:
            raise SystemExit(f"centred_tiles: error: camera {cam['id']} is too near the ortho's edge")
        tile = Image.fromarray(image[r0:r0 + px, c0:c0 + px])
        cut.append(np.asarray(aerial_image(tile, model.config)))
        cut_jpeg.append(np.asarray(aerial_image(jpeg(tile), model.config)))
        own.append(np.asarray(aerial_image(load_image(args.pairs / "bingmap" / f"{cam['id']}.png"), model.config)))
        ground.append(np.asarray(load_ground_image(args.pairs / "streetview" / f"{cam['id']}.jpg", model.config)))
    encoder = InferenceEncoder(model, torch.device("cpu"))

    def encode(images, branch):
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        return encoder.encode_uint8_with_columns(batch, branch, max_batch=128, columns=False)[0]

    g = encode(ground, "ground")
    print(f"{args.checkpoint} on {len(cameras)} cameras of {args.pairs}, each against one centred tile per camera")
    print("| gallery | R@1 | R@5 | R@10 | R@1% |\n|---|---|---|---|---|")
    for name, tiles in (("tiles cut from the grid ortho, centred on the cameras", cut),
                        ("the same, JPEG quality 90 (as index_build tile writes them)", cut_jpeg),
                        ("the worldgen pair tiles (PNG)", own)):
        r = recall_from_counts(count_closer_scores(g @ encode(tiles, "aerial").T), len(tiles))
        print(f"| {name} | {r['r1'] * 100:.2f} | {r['r5'] * 100:.2f} | {r['r10'] * 100:.2f} | {r['r1pct'] * 100:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m worldgen.preview DIR --out sheet.png``: contact sheet of a generated world.

One row per pair: the aerial tile, its polar transform (SAFA convention, via
``model.preprocess.polar_transform``) and the panorama, the latter two at the same size so that
columns line up (left edge south, centre north).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np
from PIL import Image, ImageDraw


def _read_pairs(root: str):
    rows = []
    for split in ("train", "val"):
        path = os.path.join(root, "splits", f"{split}.csv")
        if os.path.exists(path):
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    r["split"] = split
                    rows.append(r)
    rows.sort(key=lambda r: r["id"])
    return rows


def contact_sheet(root: str, n: int = 6, ids=None, row_h: int = 160) -> Image.Image:
    from model.preprocess import polar_transform

    pairs = _read_pairs(root)
    if not pairs:
        raise SystemExit(f"error: no pairs found under {root}/splits/")
    if ids:
        want = set(ids)
        pairs = [p for p in pairs if p["id"] in want]
        if not pairs:
            raise SystemExit(f"error: none of the ids {sorted(want)} is in {root}")
    else:
        pick = np.linspace(0, len(pairs) - 1, min(n, len(pairs))).round().astype(int)
        pairs = [pairs[i] for i in pick]
    pano_w = row_h * 4
    gap = 6
    width = row_h + gap + pano_w + gap + pano_w
    label_h = 14
    sheet = Image.new("RGB", (width, (row_h + label_h + gap) * len(pairs) + label_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 0), "aerial tile", fill=(220, 220, 220))
    draw.text((row_h + gap + 2, 0), "polar transform of the tile (left = south, centre = north)", fill=(220, 220, 220))
    draw.text((row_h + 2 * gap + pano_w + 2, 0), "street panorama (left = south, centre = north)", fill=(220, 220, 220))
    y = label_h
    for p in pairs:
        aer = Image.open(os.path.join(root, p["aerial"])).convert("RGB")
        pan = Image.open(os.path.join(root, p["ground"])).convert("RGB")
        a = np.asarray(aer)
        pol = polar_transform(a, row_h, pano_w)
        pol = Image.fromarray(np.clip(pol + 0.5, 0, 255).astype(np.uint8))
        sheet.paste(aer.resize((row_h, row_h), Image.BILINEAR), (0, y))
        sheet.paste(pol, (row_h + gap, y))
        is_pano = abs(pan.width / pan.height - pano_w / row_h) < 0.02
        if is_pano:
            sheet.paste(pan.resize((pano_w, row_h), Image.BILINEAR), (row_h + 2 * gap + pano_w, y))
        else:  # a --fov crop or a perspective photo: its own aspect, not stretched
            scale = min(pano_w / pan.width, row_h / pan.height)
            fit = (max(1, round(pan.width * scale)), max(1, round(pan.height * scale)))
            sheet.paste(pan.resize(fit, Image.BILINEAR), (row_h + 2 * gap + pano_w + (pano_w - fit[0]) // 2, y))
        # north tick marks on the polar image and the panorama
        ticks = (row_h + gap + pano_w // 2,) + ((row_h + 2 * gap + pano_w + pano_w // 2,) if is_pano else ())
        for x0 in ticks:
            draw.line([(x0, y + row_h), (x0, y + row_h + 4)], fill=(255, 80, 80))
        draw.text((2, y + row_h + 1), f"{p['id']} ({p['split']})  lat {float(p['lat']):.6f}  lon {float(p['lon']):.6f}",
                  fill=(200, 200, 200))
        y += row_h + label_h + gap
    return sheet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worldgen.preview",
                                 description="Contact sheet of a worldgen data set: aerial tile | polar transform | panorama.")
    ap.add_argument("dir", help="data set directory written by python -m worldgen")
    ap.add_argument("--out", required=True, help="output PNG path")
    ap.add_argument("--n", type=int, default=6, help="number of pairs (evenly spaced over the ids; default 6)")
    ap.add_argument("--ids", nargs="*", default=None, help="explicit pair ids instead of --n")
    ap.add_argument("--row-height", type=int, default=160, help="pixel height of each row (default 160)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    sheet = contact_sheet(args.dir, args.n, args.ids, args.row_height)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

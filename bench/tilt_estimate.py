"""Estimate a phone photo's pitch and roll from its near-vertical edges, and measure what placing the
photos at the estimated tilt is worth to the re-rank (issue 16: photos sent without their tilt).

The estimate is `model.preprocess.estimate_photo_tilt` (the service places a photo sent without its
tilt with it; the method is in its and `tilt_scores`' docstrings): a grid of tilts (+-6 deg, 1 deg steps,
then 0.1 deg steps around the best) scored by how well the photo's strong near-vertical edges follow the
verticals that camera would see; where the best lies on the grid's edge, a +-12 deg grid (level when that
one's best is on its edge too). The window, the spread, the edge rule, the working width (1024 pixels), the
blur and the wide grid were chosen on separate photo worlds (worldgen --seed 909 --area-km2 2 --pairs 600
--camera perspective --fov 90 --heading-jitter 180 --pitch-roll-jitter 5 --panoramas 300, and --seed 919
--area-km2 1 --pairs 300 ... --pitch-roll-jitter 10 --panoramas 150), not on the evaluation region.
Then, with --checkpoint, the photos are placed level, at the estimated tilt and at the true tilt
(`model.views.place_view`, known or unknown heading; errors: the larger of the pitch and roll errors)
and ranked as the service ranks them (the descriptor's top K re-ranked by `model.orientation.rerank`),
R@1 for each.

  python bench/tilt_estimate.py --photos data/eval_photos90 --world data/eval_world \\
      --checkpoint weights/l2ltr_tiny_demo.safetensors --out runs/tilt_estimate.json

(data/eval_world and data/eval_photos90: the unseen region and its photos that bench/limited_views.py
makes.) ~1 min for the estimates of 400 photos on one core (~0.08 s each with the JPEG decode), ~4 min more for the rankings.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.preprocess import estimate_photo_tilt  # noqa: E402


def rerank_r1(checkpoint: Path, world: Path, photos: Path, ids: list[str], tilts: dict[str, dict],
              candidates: int, weight: float) -> dict:
    """R@1 of the photos placed at each of ``tilts``' placements, known and unknown heading."""
    from model.checkpoint import load_checkpoint
    from model.evaluate import _encode_views, _view_columns
    from model.inference import InferenceEncoder
    from model.orientation import rerank
    from model.train import load_pair_arrays, read_records
    from model.views import place_view

    model = load_checkpoint(checkpoint)
    encoder = InferenceEncoder(model, "cpu")
    records = read_records("synthetic", world, "all")
    row = {r.id: i for i, r in enumerate(records)}
    arrays = load_pair_arrays(records, model.config, "preprocess", workers=2)
    aerial, aerial_columns = _encode_views(encoder, "aerial", arrays.aerial, columns=True)
    with open(photos / "cameras.csv", newline="") as fh:
        cameras = {c["id"]: c for c in csv.DictReader(fh)}
    out = {}
    for heading in ("known", "unknown"):
        for name, tilt in tilts.items():
            views = np.stack([place_view(photos / "streetview" / f"{i}.jpg", model.config,
                                         fov_deg=float(cameras[i]["hfov_deg"]), projection="perspective",
                                         heading_deg=float(cameras[i]["heading_deg"]) % 360 if heading == "known"
                                         else None, pitch_deg=tilt[i][0], roll_deg=tilt[i][1])[0] for i in ids])
            queries, columns = _encode_views(encoder, "ground", views, columns=True)
            valid = _view_columns(views, columns.shape[1])
            scores = queries @ aerial.T
            hits = 0
            for q, i in enumerate(ids):
                top = np.argsort(-scores[q], kind="stable")[:candidates]
                if row[i] in top:
                    best = rerank(scores[q, top], columns[q], aerial_columns[top], valid[q], weight).order[0]
                    hits += top[best] == row[i]
            out[f"{heading}_{name}"] = round(100.0 * hits / len(ids), 2)
            print(f"  {heading} heading, {name}: R@1 {out[f'{heading}_{name}']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="a perspective world (worldgen --camera perspective)")
    p.add_argument("--world", type=Path, help="its panorama world, the gallery (with --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="also rank the photos placed level / estimated / true")
    p.add_argument("--limit", type=int, default=400, help="photos used (the first that many rendered)")
    p.add_argument("--span", type=float, default=6.0, help="tilts searched: pitch and roll within +-SPAN degrees")
    p.add_argument("--candidates", type=int, default=200, help="re-ranked tiles (the service's K)")
    p.add_argument("--weight", type=float, default=0.9, help="re-rank weight (the service's w)")
    p.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = p.parse_args(argv)
    if args.checkpoint is not None and args.world is None:
        p.error("--checkpoint needs --world (the gallery)")
    with open(args.photos / "cameras.csv", newline="") as fh:
        cameras = [c for c in csv.DictReader(fh) if (args.photos / "streetview" / f"{c['id']}.jpg").is_file()]
    cameras = cameras[:args.limit]
    if not cameras:
        p.error(f"{args.photos}: no photos")
    t0 = time.perf_counter()
    true = {c["id"]: (float(c["pitch_deg"]), float(c["roll_deg"])) for c in cameras}
    estimated = {c["id"]: estimate_photo_tilt(Image.open(args.photos / "streetview" / f"{c['id']}.jpg"),
                                        float(c["hfov_deg"]), args.span) for c in cameras}
    seconds = (time.perf_counter() - t0) / len(cameras)
    error = np.array([np.max(np.abs(np.subtract(estimated[i], true[i]))) for i in true])
    level = np.array([np.max(np.abs(true[i])) for i in true])
    result = {"photos": len(cameras), "span_deg": args.span, "seconds_per_photo": round(seconds, 3),
              "error_deg_median": round(float(np.median(error)), 2), "error_deg_mean": round(float(error.mean()), 2),
              "share_error_over_1deg": round(float((error > 1).mean()), 3),
              "share_error_over_3deg": round(float((error > 3).mean()), 3),
              "level_error_deg_median": round(float(np.median(level)), 2)}
    print(json.dumps(result))
    if args.checkpoint is not None:
        level_tilt = {i: (0.0, 0.0) for i in true}
        result["r1"] = rerank_r1(args.checkpoint, args.world, args.photos, list(true),
                                 {"level": level_tilt, "estimated": estimated, "true": true},
                                 args.candidates, args.weight)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tune the re-ranking of a search's best tiles by the orientation head's column alignment
(model.orientation.rerank) on a region's held-out pairs, and time it.

Each view (crops of --fov degrees of each panorama around a random heading, placed centred on north for an
unknown heading or at the true heading for a known one) is encoded once with its column features, as are
the aerial tiles; the best --max-candidates tiles by descriptor get their column alignment once, then
every (candidates K, weight) pair of the grid is scored from those numbers: score = (1 - weight) *
descriptor + weight * alignment over the top K, the rest keep their descriptor order below them. The
chosen pair is checked against model.orientation.rerank itself, and the re-rank is timed per query.

  python bench/rerank.py --checkpoint weights/l2ltr_tiny_demo.safetensors --data data/train_world_l --split val \\
      --fov 360 180 90 70 --out runs/rerank/train_val.json

Tune on the training region (its validation blocks were held out of training), report the unseen region.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.evaluate import _encode_views, _view_columns  # noqa: E402
from model.inference import InferenceEncoder  # noqa: E402
from model.metrics import recall_from_counts  # noqa: E402
from model.orientation import alignment_scores, rerank  # noqa: E402
from model.train import load_pair_arrays, read_records  # noqa: E402
from model.views import limit_fov, rotate_view  # noqa: E402


def encode_cases(checkpoint: Path, data: Path, split: str, limit: int, fovs: list[float], modes: list[str],
                 seed: int, cache: Path, workers: int) -> dict:
    """{'aerial': (descriptors, columns), (fov, mode): (descriptors, columns, valid token columns)}, cached."""
    cache.mkdir(parents=True, exist_ok=True)
    model = load_checkpoint(checkpoint)
    if getattr(model, "orientation", None) is None:
        raise SystemExit(f"{checkpoint}: no orientation head")
    tag = f"{model.fingerprint()}_{data.name}_{split}_{limit}_s{seed}"
    records = read_records("synthetic", data, split)[:limit or None]
    arrays = None
    encoder = InferenceEncoder(model, "cpu")
    out = {}

    def cached(name: str, make):
        path = cache / f"{tag}_{name}.npz"
        if not path.exists():
            np.savez(path, *make())
        with np.load(path) as z:
            return tuple(z[f"arr_{i}"] for i in range(len(z.files)))

    def load():
        nonlocal arrays
        if arrays is None:
            arrays = load_pair_arrays(records, model.config, f"preprocess {split}", workers=workers)
        return arrays

    out["aerial"] = cached("aerial", lambda: _encode_views(encoder, "aerial", load().aerial, columns=True))
    headings = np.random.default_rng(seed).uniform(0.0, 360.0, len(records))
    for fov in fovs:
        for mode in modes:
            def make(fov=fov, mode=mode):
                views = np.stack([limit_fov(rotate_view(g, h), fov) for g, h in zip(load().ground, headings)])
                if mode == "known":
                    views = np.stack([rotate_view(v, -h) for v, h in zip(views, headings)])
                rows, cols = _encode_views(encoder, "ground", views, columns=True)
                return rows, cols, _view_columns(views, cols.shape[1])
            out[(fov, mode)] = cached(f"{mode}{fov:g}", make)
    out["headings"] = headings
    return out


def candidate_alignment(queries, query_columns, valid, aerial, aerial_columns, max_k: int):
    """Each query's best ``max_k`` tiles by descriptor (ranked), their descriptor scores, their best
    column alignment, and each query's count of tiles strictly closer than its true one (tile i)."""
    scores = queries @ aerial.T
    truth_score = scores[np.arange(len(scores)), np.arange(len(scores))]
    counts = (scores > truth_score[:, None]).sum(axis=1)
    top = np.argpartition(-scores, max_k - 1, axis=1)[:, :max_k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
    desc = np.take_along_axis(scores, top, 1)
    align = np.stack([alignment_scores(query_columns[i], aerial_columns[top[i]], valid[i]).max(axis=1)
                      for i in range(len(top))])
    return top, desc, align, counts


def reranked_counts(top, desc, align, counts, k: int, weight: float) -> np.ndarray:
    """Tiles strictly ahead of each query's true one after re-ranking its top ``k``."""
    # in float64, as model.orientation.rerank combines them: float32 sums could order near-ties differently
    combined = (1.0 - weight) * desc[:, :k].astype(np.float64) + weight * align[:, :k].astype(np.float64)
    out = counts.copy()
    rows, cols = np.nonzero(top[:, :k] == np.arange(len(top))[:, None])
    out[rows] = (combined[rows] > combined[rows, cols][:, None]).sum(axis=1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/rerank.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=REPO / "weights/l2ltr_tiny_demo.safetensors")
    p.add_argument("--data", type=Path, required=True, help="a worldgen world")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=0, help="the first N pairs only (0: all)")
    p.add_argument("--fov", type=float, nargs="+", default=[360, 180, 90, 70])
    p.add_argument("--modes", nargs="+", default=["unknown", "known"], choices=["unknown", "known"])
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 50, 100, 200], help="candidates re-ranked")
    p.add_argument("--weights", type=float, nargs="+",
                   default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    p.add_argument("--choose", nargs=2, type=float, metavar=("K", "WEIGHT"),
                   help="the pair to check against model.orientation.rerank and time (default: the best mean "
                        "relative R@1 gain over the fields of view of unknown heading)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops' headings")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache", type=Path, default=REPO / "runs/rerank/cache")
    p.add_argument("--out", type=Path, help="write the grid as JSON here")
    args = p.parse_args(argv)
    if 0.0 not in args.weights:  # the gains are relative to R@1 without the re-rank
        args.weights = [0.0, *args.weights]

    t0 = time.perf_counter()
    feats = encode_cases(args.checkpoint, args.data, args.split, args.limit, args.fov, args.modes, args.seed,
                         args.cache, args.workers)
    aerial, aerial_columns = feats["aerial"]
    n = len(aerial)
    print(f"{n} pairs of {args.data} ({args.split}); features in {time.perf_counter() - t0:.0f} s", flush=True)
    max_k = min(max(args.k), n)
    grid, prepared = [], {}
    for fov in args.fov:
        for mode in args.modes:
            queries, columns, valid = feats[(fov, mode)]
            prepared[(fov, mode)] = candidate_alignment(queries, columns, valid, aerial, aerial_columns, max_k)
            top, desc, align, counts = prepared[(fov, mode)]
            for k in args.k:
                for w in args.weights:
                    r = recall_from_counts(reranked_counts(top, desc, align, counts, min(k, n), w), n)
                    grid.append({"fov": fov, "heading": mode, "k": k, "weight": w, **r})
    print("| fov | heading | K | " + " | ".join(f"w={w:g}" for w in args.weights) + " |")
    print("|---|---|---|" + "---|" * len(args.weights))
    for fov in args.fov:
        for mode in args.modes:
            for k in args.k:
                row = [g for g in grid if g["fov"] == fov and g["heading"] == mode and g["k"] == k]
                print(f"| {fov:g} | {mode} | {k} | " + " | ".join(f"{100 * g['r1']:.2f}" for g in row) + " |")
    mode = "unknown" if "unknown" in args.modes else args.modes[0]

    def r1(fov, k, w):
        return next(g["r1"] for g in grid if (g["fov"], g["heading"], g["k"], g["weight"]) == (fov, mode, k, w))

    def gain(k, w):  # each field of view counts alike: the mean of R@1 / R@1 without the re-rank
        return float(np.mean([r1(f, k, w) / max(r1(f, k, 0.0), 1e-9) for f in args.fov]))

    pairs = sorted(((k, w) for k in args.k for w in args.weights), key=lambda kw: -gain(*kw))
    print(f"\nmean relative R@1 gain over the {mode}-heading fields of view {args.fov}, best pairs: " +
          ", ".join(f"K={k} w={w:g}: {gain(k, w):.3f}" for k, w in pairs[:6]))
    k, w = (int(args.choose[0]), float(args.choose[1])) if args.choose else pairs[0]
    print(f"chosen K={k} weight={w:g}: gain {gain(k, w):.3f}")
    # the library function itself on the chosen pair: the same ranks, and its cost per query
    checks, timing = {}, {}
    for (fov, mode), (top, desc, align, counts) in prepared.items():
        queries, columns, valid = feats[(fov, mode)]
        expected = reranked_counts(top, desc, align, counts, min(k, n), w)
        got, spent = counts.copy(), []
        for i in range(n):
            start = time.perf_counter()
            result = rerank(desc[i, :k], columns[i], aerial_columns[top[i, :k]], valid[i], weight=w)
            spent.append(time.perf_counter() - start)
            where = np.flatnonzero(top[i, :k][result.order] == i)
            if len(where):
                got[i] = int((result.scores > result.scores[where[0]]).sum())
        checks[f"{fov:g} {mode}"] = bool(np.array_equal(got, expected))
        timing[f"{fov:g} {mode}"] = 1000 * float(np.median(spent))
    print("model.orientation.rerank gives the same ranks:", checks)
    print("rerank cost per query (median ms, K=%d): %s" % (k, {c: round(t, 3) for c, t in timing.items()}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"data": str(args.data), "split": args.split, "n": n, "grid": grid,
                                        "chosen": {"k": k, "weight": w}, "checks": checks,
                                        "rerank_ms": timing}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a checkpoint on a data set with the authors' retrieval protocol.

  python -m model.evaluate --checkpoint weights/l2ltr_tiny_demo.safetensors --data data/eval_world --split all
  python -m model.evaluate --checkpoint ckpt.safetensors --data DIR --json

Every query panorama of the split is matched against the aerial tiles of the same split
(gallery of N tiles); R@1, R@5, R@10 and R@1% (K = floor(N/100)), plus the top-1 localisation
error in metres when the data set has coordinates.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .encode import pick_device
from .metrics import localization_error, recall_curve, retrieval_recall
from .train import HelpFormatter, TrainingError, encode_arrays, load_pair_arrays, read_records


def evaluate(checkpoint: Path, data: Path, dataset: str = "synthetic", split: str = "val", device: str = "auto",
             limit: int = 0, plot: Path | None = None, workers: int = 2) -> dict:
    model = load_checkpoint(checkpoint)
    dev = pick_device(device)
    model.to(dev)
    records = read_records(dataset, data, split)
    if limit:
        records = records[:limit]
    arrays = load_pair_arrays(records, model.config, f"preprocess {split}", workers=workers)
    ground, aerial = encode_arrays(model, arrays, dev)
    result = {**retrieval_recall(ground, aerial), "n": len(records), "split": split, "data": str(data),
              "checkpoint": str(checkpoint), "fingerprint": model.fingerprint()}
    if arrays.latlon is not None:
        result["localization"] = localization_error(ground, aerial, arrays.latlon, arrays.latlon)
    if plot is not None:
        write_recall_plot(recall_curve(ground, aerial, max_k=min(100, len(records))), plot,
                          title=f"{checkpoint.name} on {data.name}/{split} (N={len(records)})")
        result["plot"] = str(plot)
    return result


def write_recall_plot(curve: np.ndarray, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ks = np.arange(1, len(curve) + 1)
    ax.plot(ks, curve * 100, lw=2)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="our .safetensors checkpoint")
    p.add_argument("--data", required=True, type=Path, help="data set root")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "cvusa", "cvact"], help="layout of --data")
    p.add_argument("--split", default="val", help="val, train or all (synthetic); val or train (CVUSA/CVACT)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N pairs only (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (bf16 autocast on CUDA)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--plot", type=Path, help="write a recall@K curve PNG here")
    p.add_argument("--json", action="store_true", help="print one JSON object (r1, r5, r10, r1pct, n, ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.data, args.dataset, args.split, args.device, args.limit, args.plot,
                          args.workers)
    except (CheckpointError, ConfigError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    print(f"{result['checkpoint']} on {result['data']} ({result['split']}, N={result['n']})")
    print(f"R@1 {result['r1'] * 100:.2f}  R@5 {result['r5'] * 100:.2f}  R@10 {result['r10'] * 100:.2f}  "
          f"R@1% {result['r1pct'] * 100:.2f}")
    if "localization" in result:
        loc = result["localization"]
        print(f"top-1 error: median {loc['median_m']:.1f} m; within 25 m {loc['within_25m'] * 100:.1f}%, "
              f"50 m {loc['within_50m'] * 100:.1f}%, 100 m {loc['within_100m'] * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The heading of a street-level view, found against the aerial tile it matches.

Trained with views turned to every heading, L2LTR's descriptors became nearly invariant to the
heading (a panorama turned by 90 degrees gets almost the same descriptor), which is what lets a
view of unknown heading be matched at all, but which also means a descriptor can not say the
heading. The token grids under the descriptors still can: a small head projects each branch's
final patch tokens, averaged over the rows, to one unit feature per column (an azimuth sector of
360/W degrees), and the heading is the circular shift that best aligns the view's columns with the
tile's (`shift_scores`), refined between columns (`model.views.refine_heading`). Only the columns
a limited field of view saw take part.

    python -m model.orientation --checkpoint weights/l2ltr_tiny_demo.safetensors --data data/train_world_l \\
        --out runs/orientation/tiny_orientation.safetensors

trains the head on the frozen network (minutes on a CPU) and writes the checkpoint with it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .views import fov_columns


class OrientationHead(nn.Module):
    """Per-branch linear maps from final patch tokens to column features."""

    def __init__(self, hidden_size: int, dim: int = 64) -> None:
        super().__init__()
        self.ground = nn.Linear(hidden_size, dim)
        self.aerial = nn.Linear(hidden_size, dim)

    def columns(self, tokens: torch.Tensor, grid: tuple[int, int], branch: str) -> torch.Tensor:
        """Final-layer tokens [B, 1 + Hg*Wg, D] of ``branch`` -> unit column features [B, Wg, C]."""
        return self.project(column_tokens(tokens, grid), branch)

    def project(self, columns: torch.Tensor, branch: str) -> torch.Tensor:
        """Row-averaged tokens [B, Wg, D] -> unit column features [B, Wg, C]."""
        return F.normalize(getattr(self, branch)(columns), dim=-1)


def column_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Final-layer tokens [B, 1 + Hg*Wg, D] -> the patch tokens averaged over the rows [B, Wg, D]."""
    return tokens[:, 1:].reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1]).mean(dim=1)


def shift_scores(ground: torch.Tensor | np.ndarray, aerial: torch.Tensor | np.ndarray,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Column features of views [B, W, C] and of their tiles [B, W, C] (or one tile [W, C] for all)
    -> [B, W]: for each shift s, the mean over the view's valid columns w of <view[w], tile[w + s]>.
    The best shift s is the view's heading, s * 360 / W degrees."""
    g = torch.from_numpy(np.array(ground, dtype=np.float32))  # a copy: broadcast views are read-only
    a = torch.from_numpy(np.array(aerial, dtype=np.float32))
    if a.ndim == 2:
        a = a.expand(g.shape[0], -1, -1)
    w = g.shape[1]
    keep = torch.ones(g.shape[:2]) if valid is None else torch.as_tensor(np.asarray(valid), dtype=torch.float32)
    keep = keep / keep.sum(dim=1, keepdim=True).clamp(min=1)
    per_shift = torch.stack([(g * torch.roll(a, -s, dims=1)).sum(dim=2) for s in range(w)], dim=1)  # [B, S, W]
    return (per_shift * keep[:, None, :]).sum(dim=2).numpy()


def valid_columns(width: int, fov_deg: float) -> np.ndarray:
    """[width] bool: the token columns at least half inside a centred field of view of ``fov_deg``."""
    pixels = fov_columns(width * 16, fov_deg).reshape(width, 16)
    return pixels.mean(axis=1) >= 0.5


def heading_targets(headings_deg: np.ndarray, width: int) -> np.ndarray:
    """The column shift nearest to each heading."""
    return np.round(np.asarray(headings_deg) / 360.0 * width).astype(np.int64) % width


def estimate_headings(view_columns: np.ndarray, tile_columns: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """One view's column features [W, C] against several tiles' [K, W, C] (its seen pixel columns
    ``seen`` [W * 16] or token columns [W], None: all) -> the view's heading at each tile, degrees
    clockwise from north of the view's centre column, as if it stood at that tile."""
    from .views import refine_heading

    width = view_columns.shape[0]
    valid = None
    if seen is not None:
        seen = np.asarray(seen, dtype=bool)
        valid = seen.reshape(width, -1).mean(axis=1) >= 0.5 if seen.size != width else seen
    tiles = np.asarray(tile_columns, dtype=np.float32)
    views = np.broadcast_to(np.asarray(view_columns, dtype=np.float32), tiles.shape)
    scores = shift_scores(views, tiles, None if valid is None else np.broadcast_to(valid, tiles.shape[:2]))
    return np.array([refine_heading(row) for row in scores])


# --------------------------------------------------------------------------- training

def _column_features(model, branch: str, views: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """The frozen branch's final tokens of uint8 views [N, H, W, 3], averaged over rows: [N, Wg, D]."""
    from .preprocess import normalize_uint8_batch

    grid = model.config.grid(branch)
    transformer = getattr(model, branch).transformer
    with torch.inference_mode():
        return torch.cat([column_tokens(transformer(normalize_uint8_batch(views[s:s + batch_size])), grid)
                          for s in range(0, len(views), batch_size)])


def train_orientation(checkpoint: Path, data: Path, out: Path, *, pairs: int = 4000, rotations: int = 4,
                      fov_augment: float = 0.6, fov_range: tuple[float, float] = (60.0, 240.0), dim: int = 64,
                      steps: int = 800, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, workers: int = 2,
                      dataset: str = "synthetic", split: str = "train", holdout: float = 0.1) -> dict:
    """Train an orientation head on the frozen network of ``checkpoint`` with ``pairs`` pairs of
    ``data``, each panorama turned to ``rotations`` random headings (a share ``fov_augment`` of them
    cut to a random field of view); write the network with the head to ``out``."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from .train import load_pair_arrays, read_records
    from .views import angle_difference, limit_fov, refine_heading, rotate_view

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = load_checkpoint(checkpoint).eval()
    records = read_records(dataset, data, split)
    records = [records[i] for i in np.sort(rng.permutation(len(records))[:pairs])]
    arrays = load_pair_arrays(records, net.config, "preprocess", workers=workers)
    n, width = len(records), net.config.grid("ground")[1]
    headings = rng.uniform(0.0, 360.0, (n, rotations))
    fovs = np.where(rng.random((n, rotations)) < fov_augment, rng.uniform(*fov_range, (n, rotations)), 360.0)
    t0 = time.perf_counter()
    aerial = _column_features(net, "aerial", arrays.aerial)
    ground = torch.stack([_column_features(net, "ground", np.stack(
        [limit_fov(rotate_view(arrays.ground[i], headings[i, r]), fovs[i, r]) for i in range(n)]))
        for r in range(rotations)], dim=1)  # [N, R, Wg, D]
    valid = torch.as_tensor(np.stack([[valid_columns(width, f) for f in row] for row in fovs]), dtype=torch.float32)
    features_s = time.perf_counter() - t0
    head = OrientationHead(net.config.hidden_size, dim)
    scale = nn.Parameter(torch.tensor(3.0))  # log of the logits' scale
    optimizer = torch.optim.Adam([*head.parameters(), scale], lr=lr)
    targets = torch.as_tensor(heading_targets(headings, width))
    train_rows = np.arange(n)[: int(n * (1 - holdout))]
    for step in range(steps):
        b = rng.choice(train_rows, batch_size)
        r = rng.integers(0, rotations, batch_size)
        g, a = head.project(ground[b, r], "ground"), head.project(aerial[b], "aerial")
        keep = valid[b, r] / valid[b, r].sum(dim=1, keepdim=True).clamp(min=1)
        logits = torch.stack([((g * torch.roll(a, -s, dims=1)).sum(dim=2) * keep).sum(dim=1)
                              for s in range(width)], dim=1) * scale.exp()
        loss = F.cross_entropy(logits, targets[b, r])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = np.arange(n)[int(n * (1 - holdout)):]
    with torch.no_grad():
        a = head.project(aerial[test], "aerial")
        errors, full = [], []
        for r in range(rotations):
            g = head.project(ground[test, r], "ground")
            scores = shift_scores(g, a, valid[test, r].numpy() > 0)
            estimate = np.array([refine_heading(row) for row in scores])
            errors.append(angle_difference(estimate, headings[test, r]))
            full.append(fovs[test, r] >= 360)
    errors, full = np.concatenate(errors), np.concatenate(full)
    report = {"pairs": n, "held_out": len(test), "features_s": round(features_s, 1), "final_loss": float(loss.detach()),
              "heading_error_median_deg_360": float(np.median(errors[full])) if full.any() else None,
              "heading_error_median_deg_limited": float(np.median(errors[~full])) if (~full).any() else None,
              "within_10deg": float((errors <= 10).mean())}
    model = type(net)(net.config.replace(orientation_dim=dim))
    missing = model.load_state_dict(net.state_dict(), strict=False).missing_keys
    assert all(k.startswith("orientation.") for k in missing), missing
    model.orientation.load_state_dict(head.state_dict())
    provenance = {**(getattr(net, "provenance", None) or {}),
                  "orientation": {"data": str(data), "pairs": n, "rotations": rotations, "fov_augment": fov_augment,
                                  "steps": steps, "seed": seed, "init": checkpoint.name, **report}}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out, metadata=provenance)
    return report


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .train import HelpFormatter, TrainingError

    p = argparse.ArgumentParser(prog="python -m model.orientation", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="the trained network (.safetensors)")
    p.add_argument("--data", required=True, type=Path, help="a training world (worldgen) or data set root")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "cvusa", "cvact"], help="layout of --data")
    p.add_argument("--split", default="train", help="split whose pairs train the head")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write: the network plus the head")
    p.add_argument("--pairs", type=int, default=4000, help="pairs used (a random sample of the split)")
    p.add_argument("--rotations", type=int, default=4, help="random headings per panorama")
    p.add_argument("--fov-augment", type=float, default=0.6,
                   help="share of the views cut to a random field of view of 60-240 degrees")
    p.add_argument("--dim", type=int, default=64, help="width of a column feature")
    p.add_argument("--steps", type=int, default=800, help="optimisation steps of --batch-size views")
    p.add_argument("--batch-size", type=int, default=64, help="views per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample, headings and head initialisation")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    args = p.parse_args(argv)
    try:
        report = train_orientation(args.checkpoint, args.data, args.out, pairs=args.pairs, rotations=args.rotations,
                                   fov_augment=args.fov_augment, dim=args.dim, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, workers=args.workers,
                                   dataset=args.dataset, split=args.split)
    except (CheckpointError, ConfigError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: heading error on {report['held_out']} held-out pairs, median "
          f"{report['heading_error_median_deg_360']} deg (360 degree views), "
          f"{report['heading_error_median_deg_limited']} deg (limited views); within 10 deg "
          f"{report['within_10deg'] * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())


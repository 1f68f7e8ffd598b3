"""Colour-histogram matcher: the trivial baseline the synthetic world must defeat.

Each panorama is compared with every aerial tile by histogram intersection of joint RGB
histograms (``bins`` per channel). Three variants, the best of which is reported: the whole
panorama, only the rows below the horizon (the ground the tile also shows), and the lower half
with grey-world colour normalisation (cancels a global colour cast of either capture).
Recall follows the project's protocol: query i is a hit at K when fewer than K gallery items are
strictly more similar than its true tile.
"""
from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image


def joint_histogram(img: np.ndarray, bins: int = 8, grey_world: bool = False) -> np.ndarray:
    x = img.reshape(-1, 3).astype(np.float32)
    if grey_world:
        x = x * (x.mean() / np.maximum(x.mean(axis=0), 1.0))
    q = np.clip((x * (bins / 256.0)).astype(np.int64), 0, bins - 1)
    idx = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    h = np.bincount(idx, minlength=bins ** 3).astype(np.float32)
    return h / max(h.sum(), 1.0)


def intersection_similarity(q: np.ndarray, g: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(nq, B) x (ng, B) -> (nq, ng) histogram intersection."""
    out = np.empty((len(q), len(g)), np.float32)
    for s in range(0, len(q), chunk):
        out[s:s + chunk] = np.minimum(q[s:s + chunk, None, :], g[None, :, :]).sum(-1)
    return out


def recall(sim: np.ndarray, ks=(1, 5, 10)) -> dict:
    true = np.diag(sim)
    closer = (sim > true[:, None]).sum(axis=1)
    return {f"r{k}": float((closer < k).mean()) for k in ks}


def load_pairs(root: str, limit: int | None = None):
    rows = []
    for split in ("train", "val"):
        p = os.path.join(root, "splits", f"{split}.csv")
        if os.path.exists(p):
            with open(p, newline="") as f:
                rows += list(csv.DictReader(f))
    rows.sort(key=lambda r: r["id"])
    if limit is not None:
        rows = rows[:limit]
    aer = [np.asarray(Image.open(os.path.join(root, r["aerial"])).convert("RGB")) for r in rows]
    pan = [np.asarray(Image.open(os.path.join(root, r["ground"])).convert("RGB")) for r in rows]
    return rows, aer, pan


def histogram_baseline(root: str, limit: int | None = 1000, bins: int = 8) -> dict:
    """R@1/5/10 of the three histogram variants on the first ``limit`` pairs of ``root``."""
    rows, aer, pan = load_pairs(root, limit)
    out = {"n": len(rows)}
    ga = np.stack([joint_histogram(a, bins) for a in aer])
    ga_gw = np.stack([joint_histogram(a, bins, grey_world=True) for a in aer])
    variants = {
        "full_pano": (np.stack([joint_histogram(p, bins) for p in pan]), ga),
        "ground_half": (np.stack([joint_histogram(p[p.shape[0] // 2:], bins) for p in pan]), ga),
        "ground_half_greyworld": (np.stack([joint_histogram(p[p.shape[0] // 2:], bins, True) for p in pan]), ga_gw),
    }
    best = None
    for name, (q, g) in variants.items():
        rec = recall(intersection_similarity(q, g))
        out[name] = rec
        if best is None or rec["r1"] > out[best]["r1"]:
            best = name
    out["best"] = best
    out["best_r1"] = out[best]["r1"]
    return out

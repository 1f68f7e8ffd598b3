"""The world must not be solvable by colour alone (small version of bench/histogram_baseline.py)."""
from __future__ import annotations

import numpy as np

from worldgen.baseline import histogram_baseline, joint_histogram, recall
from worldgen.dataset import GenConfig, generate_dataset


def test_recall_protocol_counts_strictly_closer():
    sim = np.array([[0.9, 0.5, 0.9], [0.8, 0.1, 0.2], [0.1, 0.2, 0.3]], np.float32)
    r = recall(sim, ks=(1, 2))
    assert r["r1"] == 2 / 3 and r["r2"] == 2 / 3  # ties do not count against the query
    h = joint_histogram(np.zeros((4, 4, 3), np.uint8))
    assert h.sum() == 1.0 and h[0] == 1.0


def test_histogram_matcher_fails_on_held_out_region(tmp_path):
    root = tmp_path / "heldout"
    generate_dataset(GenConfig(seed=2024, area_km2=0.2, pairs=100, min_spacing_m=18.0), str(root),
                     workers=1, progress=False, log=lambda *a: None)
    res = histogram_baseline(str(root), limit=100)
    assert res["n"] == 100
    assert res["best_r1"] < 0.10, res

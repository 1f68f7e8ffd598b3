import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.losses import InfoNCELoss, make_loss, soft_margin_triplet_loss
from model.metrics import count_closer_scores, haversine_m, localization_error, recall_from_counts, retrieval_recall


def brute_force_recall(q, g):
    n = len(q)
    sims = q @ g.T
    out = {}
    for name, k in {"r1": 1, "r5": 5, "r10": 10, "r1pct": max(1, int(np.floor(0.01 * n)))}.items():
        hits = 0
        for i in range(n):
            closer = sum(1 for j in range(n) if sims[i, j] > sims[i, i])
            hits += closer < k
        out[name] = hits / n
    return out


@pytest.mark.parametrize("n", [7, 150, 300])
def test_recall_matches_brute_force_with_ties(n):
    rng = np.random.default_rng(n)
    q = rng.normal(size=(n, 8)).astype(np.float32)
    g = rng.normal(size=(n, 8)).astype(np.float32)
    half = n // 2
    g[half:2 * half] = g[:half]   # duplicated gallery rows: ties with the true match
    q = np.round(q, 1)
    g = np.round(g, 1)
    assert retrieval_recall(q, g) == pytest.approx(brute_force_recall(q, g))


def test_recall_perfect_and_validation():
    eye = np.eye(20, dtype=np.float32)
    assert retrieval_recall(eye, eye) == {"r1": 1.0, "r5": 1.0, "r10": 1.0, "r1pct": 1.0}
    with pytest.raises(ValueError, match="row-aligned"):
        retrieval_recall(eye, eye[:5])


def test_recall_at_one_percent_of_each_query_s_own_gallery_and_nan_refused():
    counts = np.array([0, 2, 2, 3])
    assert recall_from_counts(counts, 300)["r1pct"] == 0.75  # 1% of 300: the top 3
    assert recall_from_counts(counts, np.array([300, 300, 100, 50]))["r1pct"] == 0.5  # top 3, 3, 1, 1
    scores = np.array([[0.9, 0.1, 0.2], [np.nan, np.nan, np.nan]], np.float32)  # a NaN descriptor is no hit
    with pytest.raises(ValueError, match="1 queries have a NaN similarity"):
        count_closer_scores(scores)
    with pytest.raises(ValueError, match="NaN similarity"):
        retrieval_recall(np.array([[1.0, 0.0], [np.nan, 0.0]]), np.eye(2))
    assert list(count_closer_scores(np.array([[0.1, 0.5], [0.3, 0.2], [0.0, 0.9]]), truth=[1, 0, 0])) == [0, 0, 1]


def test_triplet_loss_reference_and_direction():
    torch.manual_seed(0)
    g = F.normalize(torch.randn(6, 16), dim=1)
    a = F.normalize(torch.randn(6, 16), dim=1)
    d = 2 - 2 * g @ a.T
    ref = 0.0
    for i in range(6):
        for j in range(6):
            if i != j:
                ref += np.log1p(np.exp(10 * (d[i, i] - d[i, j]).item())) + np.log1p(np.exp(10 * (d[i, i] - d[j, i]).item()))
    ref /= 2 * 30
    assert soft_margin_triplet_loss(g, a).item() == pytest.approx(ref, rel=1e-5)
    assert soft_margin_triplet_loss(g, g).item() < soft_margin_triplet_loss(g, a).item()


def test_infonce_learnable_and_fixed():
    g = F.normalize(torch.randn(8, 16), dim=1)
    learn, fixed = InfoNCELoss(0.07, True), InfoNCELoss(0.07, False)
    assert learn(g, g).item() == pytest.approx(fixed(g, g).item())
    assert len(list(learn.parameters())) == 1 and len(list(fixed.parameters())) == 0


def test_footprint_overlap_of_tiles_around_a_camera():
    from model.losses import footprint_overlap
    from model.metrics import EARTH_RADIUS_M

    metre = math.degrees(1.0 / EARTH_RADIUS_M)  # of latitude
    camera = np.array([[47.0, 8.5]] * 4)
    east = metre / math.cos(math.radians(47.0))
    tiles = np.array([[47.0, 8.5], [47.0, 8.5 + 25 * east], [47.0 + 50 * metre, 8.5 + 50 * east],
                      [47.0 + 120 * metre, 8.5]])
    overlap = footprint_overlap(camera, tiles, 100.0)
    assert overlap.shape == (4, 4)
    assert overlap[0] == pytest.approx([1.0, 0.75, 0.25, 0.0], abs=1e-6)


def test_infonce_semi_positives():
    """An identity overlap is the plain loss. Tiles 0 and 1 overlap: a model that tells them apart
    sharply is what the plain loss wants; with the overlap as semi-positives, one that scores them
    alike costs less."""
    torch.manual_seed(0)
    apart = F.normalize(torch.randn(6, 16), dim=1)
    alike = apart.clone()
    alike[1] = F.normalize(apart[0] + 0.05 * torch.randn(16), dim=0)
    loss = InfoNCELoss(0.1, learnable=False)
    assert loss(alike, apart, torch.eye(6)).item() == pytest.approx(loss(alike, apart).item(), rel=1e-6)
    overlap = torch.eye(6)
    overlap[0, 1] = overlap[1, 0] = 0.5
    assert loss(apart, apart).item() < loss(alike, alike).item()
    assert loss(alike, alike, overlap).item() < loss(apart, apart, overlap).item()
    with pytest.raises(ValueError, match="no semi-positives"):
        make_loss("triplet")(apart, apart, overlap)


def test_haversine_and_localization_error():
    assert haversine_m(0, 0, 0, 1) == pytest.approx(111_195, rel=1e-3)
    q = np.eye(3, dtype=np.float32)
    err = localization_error(q, q, [(0, 0), (0, 0.001), (0, 0.002)], [(0, 0), (0, 0.001), (0, 0.002)])
    assert err["median_m"] == 0 and err["within_25m"] == 1.0

"""model.metrics position refinement, the radius filter and the position error report."""
from __future__ import annotations

import math

import numpy as np
import pytest

from model.metrics import (
    CONSISTENT_TILES, POSITION_TEMPERATURE, TILE_FOOTPRINT_M, UNCERTAINTY_FLOOR_TILES, error_summary, haversine_m,
    local_xy_m, position_report, refine_position, rows_within,
)

LAT0, LON0 = 47.0, 8.0
M_PER_DEG = math.radians(1.0) * 6_371_008.8


def _at(east_m: float, north_m: float) -> tuple[float, float]:
    return LAT0 + north_m / M_PER_DEG, LON0 + east_m / (M_PER_DEG * math.cos(math.radians(LAT0)))


def test_a_consistent_cluster_gives_its_score_weighted_centre():
    offsets = [(0.0, 0.0), (60.0, 0.0), (0.0, 80.0)]
    latlon = np.array([_at(*o) for o in offsets])
    scores = np.array([0.90, 0.89, 0.87])
    lat, lon, uncertainty = refine_position(scores, latlon)
    w = np.exp(scores / POSITION_TEMPERATURE)
    w /= w.sum()
    expected = w @ np.array(offsets)
    got = local_xy_m(lat, lon, LAT0, LON0)[0]
    assert got == pytest.approx(expected, abs=0.01)
    spread = math.sqrt(w @ np.sum((np.array(offsets) - expected) ** 2, axis=1))
    assert uncertainty == pytest.approx(max(spread, UNCERTAINTY_FLOOR_TILES * TILE_FOOTPRINT_M))


def test_an_inconsistent_far_match_is_ignored():
    near = np.array([_at(0, 0), _at(50, 0)])
    far = np.array([_at(0, CONSISTENT_TILES * TILE_FOOTPRINT_M + 20)])
    scores = np.array([0.9, 0.9, 0.9])
    with_far = refine_position(scores, np.vstack([near, far]))
    without = refine_position(scores[:2], near)
    assert with_far == pytest.approx(without)
    assert local_xy_m(with_far[0], with_far[1], LAT0, LON0)[0] == pytest.approx([25.0, 0.0], abs=0.01)


@pytest.mark.parametrize("shift", [0.0, 180.0 - LON0 - 0.0003, -180.0 - LON0 + 0.0003])
def test_the_antimeridian_changes_nothing(shift):
    """Tiles 60 m apart on either side of 180 degrees east are neighbours, as anywhere else."""
    offsets = [(0.0, 0.0), (60.0, 0.0), (0.0, 80.0), (-60.0, 0.0)]
    base = np.array([_at(*o) for o in offsets])
    moved = base + [0.0, shift]
    moved[:, 1] = (moved[:, 1] + 180.0) % 360.0 - 180.0
    scores = [0.90, 0.89, 0.87, 0.86]
    lat, lon, uncertainty = refine_position(scores, moved)
    expected = refine_position(scores, base)
    assert -180.0 <= lon <= 180.0 and (lat, uncertainty) == pytest.approx(expected[::2])
    assert haversine_m(lat, lon, expected[0], (expected[1] + shift + 180.0) % 360.0 - 180.0) < 0.01
    assert local_xy_m(moved[:, 0], moved[:, 1], *moved[0]) == pytest.approx(local_xy_m(base[:, 0], base[:, 1], *base[0]))


def test_uncertainty_grows_with_spread_and_is_floored():
    lone = refine_position([0.9], [_at(0, 0)])
    assert lone[:2] == pytest.approx(_at(0, 0)) and lone[2] == UNCERTAINTY_FLOOR_TILES * TILE_FOOTPRINT_M
    spreads = [refine_position([0.9, 0.9], [_at(-d, 0), _at(d, 0)])[2] for d in (10, 40, 60, 70)]
    assert spreads[0] == UNCERTAINTY_FLOOR_TILES * TILE_FOOTPRINT_M  # 10 m: under the floor
    assert spreads[1:] == pytest.approx([40, 60, 70], abs=0.01) and spreads == sorted(spreads)
    # the footprint scales what counts as consistent and the floor
    assert refine_position([0.9, 0.9], [_at(0, 0), _at(200, 0)], tile_m=200)[2] == pytest.approx(100, abs=0.01)
    with pytest.raises(ValueError):
        refine_position([], np.zeros((0, 2)))


def test_rows_within_is_the_haversine_radius():
    rng = np.random.default_rng(0)
    lat, lon = LAT0 + rng.uniform(-0.05, 0.05, 5000), LON0 + rng.uniform(-0.05, 0.05, 5000)
    rows = rows_within(lat, lon, LAT0, LON0, 1500.0)
    expected = np.flatnonzero(haversine_m(LAT0, LON0, lat, lon) <= 1500.0)
    assert rows.tolist() == expected.tolist() and 0 < len(rows) < 5000
    assert rows_within(lat, lon, 0.0, 0.0, 1000.0).size == 0


def test_position_report_compares_the_refined_position_with_the_top1_centre():
    summary = error_summary([0, 10, 20, 30, 200])
    assert summary == {"median_error_m": 20.0, "mean_error_m": 52.0, "within_10m": 0.4, "within_25m": 0.6,
                       "within_50m": 0.8, "within_100m": 0.8}
    # two tiles 60 m apart, each query scores both equally: the refined position lies between them
    latlon = np.array([_at(0, 0), _at(60, 0)])
    report = position_report(np.full((2, 2), 0.5), latlon)
    assert report["refined"]["median_error_m"] == pytest.approx(30.0, abs=0.01)
    assert report["top1"]["mean_error_m"] == pytest.approx(30.0, abs=0.01)  # one query right, one 60 m off


def test_position_report_against_cameras_anywhere_and_a_prior():
    # tiles every 50 m on a line; a camera 20 m east of the first tile
    latlon = np.array([_at(50 * i, 0) for i in range(4)])
    camera = np.array([_at(20, 0)])
    scores = np.array([[0.80, 0.79, 0.10, 0.95]])  # the far tile 3 scores best
    free = position_report(scores, latlon, true_latlon=camera)
    assert free["top1"]["median_error_m"] == pytest.approx(130.0, abs=0.01)
    # a prior that excludes tile 3 (-inf): tiles 0 and 1 are averaged, e^-1 weighs tile 1 at 0.01 lower
    masked = np.where(np.arange(4) == 3, -np.inf, scores).astype(np.float32)
    prior = position_report(masked, latlon, true_latlon=camera, errors=True)
    w1 = math.exp(-0.01 / POSITION_TEMPERATURE)
    assert prior["top1"]["median_error_m"] == pytest.approx(20.0, abs=0.01)
    assert prior["refined"]["median_error_m"] == pytest.approx(abs(50 * w1 / (1 + w1) - 20), abs=0.05)
    assert prior["errors_m"]["refined"].shape == (1,)
    # a colder softmax follows the best tile; a hotter one tends to the mean of the tiles within 1.5 footprints
    cold = position_report(masked, latlon, true_latlon=camera, temperature=1e-4)["refined"]["median_error_m"]
    hot = position_report(masked, latlon, true_latlon=camera, temperature=10.0)["refined"]["median_error_m"]
    w = np.exp((np.array([0.80, 0.79, 0.10]) - 0.80) / 10.0)
    assert cold == pytest.approx(20.0, abs=0.01) and hot == pytest.approx(w @ [0, 50, 100] / w.sum() - 20, abs=0.05)
    narrow = position_report(masked, latlon, true_latlon=camera, temperature=10.0, consistent_tiles=0.75)
    assert narrow["refined"]["median_error_m"] == pytest.approx(5.0, abs=0.1)  # tile 2 (100 m) left out
    with pytest.raises(ValueError, match="temperature"):
        refine_position([0.9], [_at(0, 0)], temperature=0.0)

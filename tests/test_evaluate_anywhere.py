"""model.evaluate --index: cameras anywhere against an index artifact's stored tile vectors, the true tile being
the one whose centre is nearest; a location prior searches only the tiles within its radius."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from model import evaluate
from test_index_build_support import micro_checkpoint

LAT0, LON0 = 47.0, 8.0
M_PER_DEG = math.radians(1.0) * 6_371_008.8


def _at(east_m: float, north_m: float) -> tuple[float, float]:
    return LAT0 + north_m / M_PER_DEG, LON0 + east_m / (M_PER_DEG * math.cos(math.radians(LAT0)))


def _setup(tmp_path, swap: bool = False, head: bool = False, with_views: bool = False):
    """3 x 3 tiles every 50 m; four cameras 10 m east of tiles 0, 4, 8 and 2. The artifact stores each
    camera's own descriptor as its true tile's vector (``swap``: at another tile, 40 to 110 m from it).
    ``head``: the checkpoint has an orientation head and the artifact each camera's own column features
    as its true tile's (whatever ``swap`` says), random ones for the other tiles. ``with_views``: each tile
    also has views 10 m east and west of its centre (index_build tile --centres-m), and the camera's
    descriptor is its true tile's east view, the one at the camera."""
    import torch

    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.preprocess import load_ground_image

    ckpt = tmp_path / "micro.safetensors"
    fingerprint = micro_checkpoint(ckpt, orientation_dim=8 if head else 0)
    centres = [(50.0 * c, -50.0 * r) for r in range(3) for c in range(3)]
    owners = [0, 4, 8, 2]
    rows = [(f"t{i}", x, y, f"t{i}") for i, (x, y) in enumerate(centres)]
    if with_views:
        rows = [row for i, (x, y) in enumerate(centres)
                for row in ((f"t{i}", x, y, f"t{i}"), (f"t{i}.e10n0", x + 10, y, f"t{i}"),
                            (f"t{i}.e-10n0", x - 10, y, f"t{i}"))]
    data = tmp_path / "queries"
    (data / "streetview").mkdir(parents=True)
    rng = np.random.default_rng(1)
    with open(data / "queries.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query_id", "path", "lat", "lon"])
        for i, t in enumerate(owners):
            Image.fromarray((rng.random((64, 256, 3)) * 255).astype(np.uint8)).save(data / "streetview" / f"{i}.jpg")
            lat, lon = _at(centres[t][0] + 10.0, centres[t][1])
            w.writerow([i, f"streetview/{i}.jpg", repr(lat), repr(lon)])
    model = load_checkpoint(ckpt)
    views = np.stack([np.asarray(load_ground_image(data / "streetview" / f"{i}.jpg", model.config))
                      for i in range(len(owners))])
    queries, columns = evaluate._encode_views(InferenceEncoder(model, torch.device("cpu")), "ground", views,
                                              columns=True)
    vectors = rng.normal(size=(len(rows), queries.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for q, t in enumerate(owners):
        vectors[3 * t + 1 if with_views else {0: 2, 4: 5, 8: 6, 2: 0}[t] if swap else t] = queries[q]
    index = tmp_path / "index"
    (index / "vectors").mkdir(parents=True)
    np.save(index / "vectors" / "shard-00000.npy", vectors[:5])
    np.save(index / "vectors" / "shard-00001.npy", vectors[5:])
    with open(index / "tiles.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["tile_id", "lat", "lon", "source", *(["tile"] if with_views else [])])
        for tile_id, x, y, tile in rows:
            w.writerow([tile_id, *map(repr, _at(x, y)), f"/tiles/{tile_id}.jpg", *([tile] if with_views else [])])
    manifest = {"format_version": 1, "model_fingerprint": fingerprint, "embedding_dim": int(queries.shape[1]),
                "metric": "inner_product", "index_type": "flat", "built_at": "2026-12-03T00:00:00Z",
                "count": len(rows), "tile_m": 100.0, "stride_m": 50.0, **({"centres_m": 10.0} if with_views else {}),
                "shards": [{"file": "vectors/shard-00000.npy", "rows": 5},
                           {"file": "vectors/shard-00001.npy", "rows": len(rows) - 5}]}
    if head:
        tile_columns = rng.normal(size=(len(centres), *columns.shape[1:])).astype(np.float32)
        tile_columns /= np.linalg.norm(tile_columns, axis=2, keepdims=True)
        for q, t in enumerate(owners):
            tile_columns[t] = columns[q]
        np.save(index / "orientation.npy", tile_columns.astype(np.float16))
        manifest["orientation"] = {"file": "orientation.npy", "columns": columns.shape[1], "dim": columns.shape[2]}
    (index / "manifest.json").write_text(json.dumps(manifest))
    return ckpt, data, index


def test_the_nearest_tile_is_the_true_one_and_errors_are_to_the_camera(tmp_path, capsys):
    ckpt, data, index = _setup(tmp_path)
    result = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, near_radius_m=60.0)
    free = result["unrestricted"]
    assert (result["n"], result["tiles"], result["tile_m"], result["stride_m"]) == (4, 9, 100.0, 50.0)
    assert result["offset_median_m"] == pytest.approx(10.0, abs=0.01)
    assert free["r1"] == 1.0 and free["position"]["top1"]["median_error_m"] == pytest.approx(10.0, abs=0.01)
    assert result["prior"]["r1"] == 1.0 and result["prior"]["tiles_within_median"] >= 3
    assert [b["n"] for b in result["by_offset"]] == [4]  # every camera within a quarter stride
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(data), "--index", str(index), "--device", "cpu",
                          "--workers", "1", "--save-scores", str(tmp_path / "scores")]) == 0
    assert "| whole index | 100.0 |" in capsys.readouterr().out
    with np.load(tmp_path / "scores.npz") as saved:  # written whole (atomically), named as numpy names it
        assert saved["scores"].shape == (4, 9) and list(saved["truth"]) == [0, 4, 8, 2]
    assert sorted(p.name for p in tmp_path.iterdir() if "scores" in p.name) == ["scores.npz"]


def test_views_rank_their_tiles_and_place_the_camera(tmp_path, capsys):
    ckpt, data, index = _setup(tmp_path, with_views=True)
    result = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, near_radius_m=60.0)
    assert (result["tiles"], result["views"], result["centres_m"]) == (9, 27, 10.0)
    for block in (result["unrestricted"], result["prior"]):
        assert block["r1"] == 1.0  # each tile ranked by its best view: the one at the camera
        assert block["position"]["top1"]["median_error_m"] == pytest.approx(10.0, abs=0.01)  # the tile's centre
        assert block["position"]["refined"]["median_error_m"] < 1.0  # the view at the camera
    assert result["prior"]["tiles_within_median"] >= 3
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(data), "--index", str(index), "--device", "cpu",
                          "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "every view of each camera's best 200 (27 views every 10 m); each tile ranked by its best view" in out


def test_views_of_fewer_tiles_than_searched_still_count_every_tile_searched(tmp_path, monkeypatch):
    """The first step keeps a camera's best VIEW_TILES tiles; a prior's tile count (and R@1%'s denominator) is
    still of every tile searched (each camera's tiles within 60 m), not of those kept."""
    ckpt, data, index = _setup(tmp_path, with_views=True)
    monkeypatch.setattr(evaluate, "VIEW_TILES", 1)
    result = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, near_radius_m=60.0)
    assert result["prior"]["tiles_within_median"] >= 3  # 1 (the tile kept) when counted after the cut


def test_views_compete_only_once_their_tile_is_found_by_its_own_row():
    """Three tiles with two rows each (own, view): row 5 (tile 2's view) is the best, but tile 2's own row
    the worst: kept among all tiles, it stays; among the best one or two tiles by own rows, it is -inf."""
    from model.index_artifact import TileViews

    scores = np.array([[0.5, 0.4, 0.9, 0.8, 0.1, 1.0], [0.5, 0.4, 0.9, 0.8, -np.inf, 1.0]], np.float32)
    views = TileViews.of(np.array([0, 0, 2, 2, 4, 4]))
    np.testing.assert_array_equal(evaluate.views_of_best_tiles(scores, views, 3)[0], scores[0])
    inf = -np.inf
    kept = lambda *row: np.array(row, np.float32)  # noqa: E731
    np.testing.assert_array_equal(evaluate.views_of_best_tiles(scores, views, 1),
                                  [kept(inf, inf, 0.9, 0.8, inf, inf)] * 2)
    np.testing.assert_array_equal(evaluate.views_of_best_tiles(scores, views, 2)[0], kept(0.5, 0.4, 0.9, 0.8, inf, inf))
    # a tile whose own row a prior left out (-inf) is not found, even when fewer tiles remain than asked for
    np.testing.assert_array_equal(evaluate.views_of_best_tiles(scores, views, 3)[1], kept(0.5, 0.4, 0.9, 0.8, inf, inf))


def test_best_per_tile_takes_each_tiles_best_row():
    scores = np.array([[0.1, 0.9, 0.3, 0.2], [0.5, -np.inf, 0.4, 0.6]], np.float32)
    np.testing.assert_array_equal(evaluate.best_per_tile(scores, np.array([1, 0, 1, 0]), 2),
                                  np.array([[0.9, 0.3], [0.6, 0.5]], np.float32))
    with pytest.raises(ValueError, match="3 tiles expected"):
        evaluate.best_per_tile(scores, np.array([1, 0, 1, 0]), 3)


def test_a_match_elsewhere_is_a_miss_unless_the_prior_excludes_it(tmp_path):
    ckpt, data, index = _setup(tmp_path, swap=True)
    result = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, near_radius_m=60.0)
    assert result["unrestricted"]["r1"] == 0.0
    # the stored tiles are 90, 40, 110 and 110 m from the cameras
    assert result["unrestricted"]["position"]["top1"]["median_error_m"] == pytest.approx(100.0, abs=0.5)
    # within 60 m of the truth three of them are out of reach: every top-1 lies inside the radius
    prior = result["prior"]["position"]["top1"]
    assert prior["mean_error_m"] <= 60.0 and result["prior"]["r1"] < 1.0


def test_an_index_of_another_model_is_refused(tmp_path, capsys):
    ckpt, data, index = _setup(tmp_path)
    other = tmp_path / "other.safetensors"
    micro_checkpoint(other, seed=5)
    assert evaluate.main(["--checkpoint", str(other), "--data", str(data), "--index", str(index),
                          "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rebuild the index with this checkpoint" in err and err.count("\n") == 1


def test_rerank_ranks_as_the_service_does_by_column_alignment(tmp_path, capsys):
    ckpt, data, index = _setup(tmp_path, swap=True, head=True)
    plain = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, near_radius_m=60.0)
    assert plain["unrestricted"]["r1"] == 0.0 and "rerank" not in plain  # by descriptor: another tile each
    # the column alignment alone (weight 1) over every tile: each camera's own columns are its true tile's
    result = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, near_radius_m=60.0,
                                        rerank_k=9, rerank_weight=1.0)
    assert result["rerank"] == {"candidates": 9, "weight": 1.0}
    assert result["unrestricted"]["r1"] == 1.0 and result["prior"]["r1"] == 1.0  # tiles outside the prior stay out
    assert result["unrestricted"]["position"]["top1"]["median_error_m"] == pytest.approx(10.0, abs=0.01)
    # without the weight the re-rank keeps the descriptor's order
    same = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, rerank_k=9, rerank_weight=0.0)
    assert same["unrestricted"]["r1"] == plain["unrestricted"]["r1"]
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(data), "--index", str(index), "--device", "cpu",
                          "--workers", "1", "--method", "rerank", "--rerank-k", "9", "--rerank-weight", "1",
                          "--save-scores", str(tmp_path / "scores.npz")]) == 0
    out = capsys.readouterr().out
    assert "ranked as the service does: the best 9 tiles" in out and "| whole index | 100.0 |" in out
    with np.load(tmp_path / "scores.npz") as saved:  # the scores as ranked: they give the R@1 reported
        assert str(saved["ranking"]) == "rerank"
        assert (saved["scores"].argmax(axis=1) == saved["truth"]).all()


def test_refine_tune_reads_the_ranking_the_report_used(tmp_path):
    from ship_support import script_module

    refine_tune = script_module("bench/refine_tune.py")
    ckpt, data, index = _setup(tmp_path, swap=True, head=True)
    saved = tmp_path / "scores.npz"
    result = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, near_radius_m=60.0,
                                        rerank_k=2, rerank_weight=1.0, scores_out=saved)
    with np.load(saved) as z:
        truth = z["truth"]
        assert z["scores"].dtype == np.float32
    for radius, block in ((0.0, "unrestricted"), (60.0, "prior")):  # re-ranked among the prior's tiles
        tuned = refine_tune.load(saved, radius, 50.0)
        assert (tuned["scores"].argmax(axis=1) == truth).mean() == result[block]["r1"]
    with pytest.raises(SystemExit, match="re-ranked over the whole index"):  # a prior it was not saved with
        refine_tune.load(saved, 100.0, 50.0)


def test_the_prior_s_recall_at_one_percent_is_of_the_tiles_it_searches(tmp_path, monkeypatch):
    import model.metrics

    galleries = []
    real = model.metrics.recall_from_counts
    monkeypatch.setattr(model.metrics, "recall_from_counts", lambda counts, n: galleries.append(n) or real(counts, n))
    ckpt, data, index = _setup(tmp_path)
    result = evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, near_radius_m=60.0)
    whole, prior = galleries
    assert list(whole) == [9] * 4  # every tile, for every camera
    from model.metrics import haversine_m

    with open(data / "queries.csv") as q, open(index / "tiles.csv") as t:
        cameras, tiles = list(csv.DictReader(q)), list(csv.DictReader(t))
    within = [sum(haversine_m(float(c["lat"]), float(c["lon"]), float(t["lat"]), float(t["lon"])) <= 60.0
                  for t in tiles) for c in cameras]
    assert list(prior) == within and 2 <= min(within) and max(within) <= 4  # the tiles within 60 m
    assert result["prior"]["tiles_within_median"] == np.median(within)


def test_rerank_needs_the_tiles_column_features(tmp_path, capsys):
    ckpt, data, index = _setup(tmp_path)  # no head, no orientation.npy
    with pytest.raises(ValueError, match="needs an orientation head"):
        evaluate.evaluate_anywhere(ckpt, data, index, device="cpu", workers=1, rerank_k=5)
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(data), "--index", str(index), "--device", "cpu",
                          "--method", "rerank"]) == 1
    assert "needs an orientation head" in capsys.readouterr().err

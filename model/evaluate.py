"""Evaluate a checkpoint on a data set with the authors' retrieval protocol.

  python -m model.evaluate --checkpoint weights/l2ltr_tiny_demo.safetensors --data data/eval_world --split all
  python -m model.evaluate --checkpoint ckpt.safetensors --data DIR --json

Every query panorama of the split is matched against the aerial tiles of the same split
(gallery of N tiles); R@1, R@5, R@10 and R@1% (K = floor(N/100)), plus the top-1 localisation
error in metres when the data set has coordinates: of the top-1 tile centre and of the refined position
(model.metrics.refine_position: the score-weighted centre of the consistent top matches).

  python -m model.evaluate --checkpoint weights/l2ltr_tiny_demo.safetensors --data data/grid_eval \
      --index data/grid_eval_index --near-radius-m 300

With --index, cameras anywhere (--data/queries.csv, e.g. worldgen --layout grid) are matched against the
stored tile vectors of an index built from the region (index_build tile + build); a camera's true tile
is the one whose centre is nearest to it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np

from .arguments import non_negative_int, number, output_file, positive_int
from .atomic import atomic_write
from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .encode import pick_device
from .index_artifact import (VIEW_TILES, ArtifactError, TileTable, TileViews, check_model, read_manifest,
                             read_orientation, read_tiles, read_vectors)
from .metrics import TILE_FOOTPRINT_M, confidence_report, haversine_m, localization_error, position_report, \
    recall_curve, retrieval_recall
from .plot import figure_file, save_figure
from .train import HelpFormatter, TrainingError, encode_arrays, load_pair_arrays, read_records


HEADING_MODES = ("known", "unknown")
# How the heading of a view is found: the orientation head's column alignment with the matched
# tile (model.orientation), or descriptors of the aerial tiles or of the query at --rotations turns;
# rerank: as head, after re-ranking the best tiles by descriptor and column alignment
# (model.orientation.rerank; with a known heading too).
METHODS = ("head", "aerial", "query", "rerank")
CROPS = ("full", "photo")  # what a limited view keeps: the panorama's full height, or a photo's outline


def evaluate(checkpoint: Path, data: Path, dataset: str = "synthetic", split: str = "val", device: str = "auto",
             limit: int = 0, plot: Path | None = None, workers: int = 2, fov: float = 360.0,
             heading: str = "known", rotations: int = 16, method: str = "head", seed: int = 0,
             photos: Path | None = None, queries: int = 0, ambiguity_margin: float = 0.02,
             tile_m: float = TILE_FOOTPRINT_M, rerank_k: int | None = None, rerank_weight: float | None = None,
             photo_tilt: bool | str = False, tile_phases: int = 1, crop: str = "full",
             heading_within: float | None = None, heading_error: float = 0.0, view_phases: int | None = None,
             paired_with: Path | None = None) -> dict:
    """Retrieval of the split's panoramas (or, with ``photos``, of a perspective world's photos
    of the same places) against its aerial tiles. ``fov`` < 360 keeps that much of each panorama
    around a random heading (``crop="photo"``: cut to the outline a level 4:3 photo of that field of
    view covers, `model.views.limit_photo`, a photo without a perspective world); ``heading="unknown"``
    searches the heading over ``rotations`` turns of the aerial tiles (``method="aerial"``) or of the
    query (``method="query"``) and reports its error; ``method="rerank"`` re-ranks each query's best
    ``rerank_k`` tiles by descriptor and column alignment (model.orientation.rerank, ``rerank_weight``),
    for a known heading too (aligned only within ``heading_within`` degrees of it, default
    model.orientation.HEADING_WITHIN_DEG; 180: all round), placed off it by up to ``heading_error`` degrees
    (uniform, as a phone compass errs). ``queries``: only the first that many pairs
    are queries (against every tile of the split), e.g. for a perspective world rendered with
    `worldgen --panoramas N`; ``photo_tilt``: its photos are placed with their cameras' true pitch and
    roll instead of level ("estimated": with the tilt `model.preprocess.estimate_photo_tilt` finds, as
    the service places a photo sent without one). ``paired_with``: a perspective world of the same places (as
    ``photos``): each crop is cut at the heading of its place's photo, and only the places with a photo are
    queries, so that crops and photos are compared pair by pair. ``tile_phases``: the orientation head meets
    the tiles at that many sub-column phases (model.orientation.phase_columns; a known heading within its
    reach), and each view is encoded at ``view_phases`` of them (default: as many, as the service meets an
    index; the alignments that meet at one heading averaged: model.orientation.view_phase_scores).
    ``tile_m``: the tiles' footprint, for the refined position
    (model.metrics.refine_position)."""
    if heading not in HEADING_MODES or method not in METHODS:
        raise ValueError(f"heading must be one of {HEADING_MODES} and method one of {METHODS}")
    if photo_tilt and photos is None:
        raise ValueError("photo_tilt places the photos of a perspective world: it needs photos (--photos)")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if paired_with is not None and (photos is not None or fov >= 360):
        raise ValueError("paired_with cuts crops at the headings of a perspective world's photos: it needs a field "
                         f"of view under 360 degrees (got {fov:g}) and no photos")
    if crop == "photo" and (photos is not None or not 0 < fov < 180):
        raise ValueError(f"crop 'photo' cuts panoramas to a photo's outline: it needs a field of view under 180 "
                         f"degrees (got {fov:g}) and no photos")
    for option, world in (("--photos", photos), ("--paired-with", paired_with)):
        if world is not None and not (world / "cameras.csv").is_file():
            raise ValueError(f"{option} {world}: no cameras.csv (a world of worldgen --camera perspective has one)")
    model = load_checkpoint(checkpoint)
    if uses_head(method, heading) and getattr(model, "orientation", None) is None:
        raise ValueError(f"{model.config.name}: this checkpoint has no orientation head (python -m model.orientation); "
                         "use --method aerial or query")
    dev = pick_device(device)
    model.to(dev)
    records = read_records(dataset, data, split)
    if limit:
        records = records[:limit]
    arrays = load_pair_arrays(records, model.config, f"preprocess {split}", workers=workers)
    result = {"n": len(records), "split": split, "data": str(data), "checkpoint": str(checkpoint),
              "fingerprint": model.fingerprint(), "fov": fov, "heading": heading}
    plain = fov >= 360 and heading == "known" and photos is None and not queries and method != "rerank"
    if plain:
        ground, aerial = encode_arrays(model, arrays, dev)
        result.update(retrieval_recall(ground, aerial))
        if arrays.latlon is not None:
            scores = ground @ aerial.T
            result["confidence"] = confidence_report(scores, arrays.latlon, ambiguity_margin)
            result["position"] = position_report(scores, arrays.latlon, tile_m)
    else:
        result.update(evaluate_views(model, arrays, records, dev, fov=fov, heading=heading, rotations=rotations,
                                     method=method, seed=seed, photos=photos, queries=queries,
                                     ambiguity_margin=ambiguity_margin, tile_m=tile_m, rerank_k=rerank_k,
                                     rerank_weight=rerank_weight, photo_tilt=photo_tilt,
                                     tile_phases=tile_phases, crop=crop, heading_within=heading_within,
                                     heading_error=heading_error, view_phases=view_phases,
                                     paired_with=paired_with))
    if arrays.latlon is not None and plain:
        result["localization"] = localization_error(ground, aerial, arrays.latlon, arrays.latlon)
    if plot is not None and plain:
        write_recall_plot(recall_curve(ground, aerial, max_k=min(100, len(records))), plot,
                          title=f"{checkpoint.name} on {data.name}/{split} (N={len(records)})")
        result["plot"] = str(plot)
    return result


def uses_head(method: str, heading: str) -> bool:
    """Whether the checkpoint's orientation head finds the heading (or re-ranks) with this method."""
    return method == "rerank" or (heading == "unknown" and method == "head")


def evaluate_views(model, arrays, records, device, *, fov: float, heading: str, rotations: int, method: str,
                   seed: int, photos: Path | None, queries: int = 0, ambiguity_margin: float = 0.02,
                   tile_m: float = TILE_FOOTPRINT_M, rerank_k: int | None = None,
                   rerank_weight: float | None = None, photo_tilt: bool | str = False, tile_phases: int = 1,
                   crop: str = "full", heading_within: float | None = None, heading_error: float = 0.0,
                   view_phases: int | None = None, paired_with: Path | None = None) -> dict:
    """Recalls (and heading errors) of limited-field-of-view or unknown-heading queries: panorama crops
    of ``fov`` degrees around a random heading (``paired_with``: around the heading of the same place's photo in
    that perspective world), or the photos of a perspective world. A known heading
    places the view at it, aligned with the tiles (at ``tile_phases`` sub-column phases) within ``heading_within``
    of it; the view encoded at ``view_phases`` sub-column phases (None: ``tile_phases``)."""
    from .inference import InferenceEncoder
    from .metrics import count_closer_scores, recall_from_counts
    from .orientation import HEADING_WITHIN_DEG, RERANK_WEIGHT, alignment_scores, rerank_candidates
    from .views import (angle_difference, describe_rotations, limit_fov, limit_photo, match_over_rotations,
                        refine_heading, rotate_view)

    encoder = InferenceEncoder(model, device)
    encode_ground = partial(_encode_views, encoder, "ground")
    encode_aerial = partial(_encode_views, encoder, "aerial")
    q = min(queries or len(records), len(records))
    truth = np.arange(q)  # gallery row of each query's true tile
    # where a known heading places each view: off the true one by a compass's error
    placed_off = np.random.default_rng(seed + 1).uniform(-heading_error, heading_error, len(records))[:q]
    if photos is not None:  # the pairs whose photo was rendered (worldgen --panoramas N)
        truth = photographed(photos, records)[:q]
        q = len(truth)
        views, true_heading = photo_views(photos, [records[i] for i in truth], model.config,
                                          centred=heading == "unknown", tilt=photo_tilt, off=placed_off)
    else:
        if paired_with is not None:  # the places and headings of a perspective world's photos
            truth = photographed(paired_with, records)[:q]
            q = len(truth)
            true_heading = camera_headings(perspective_cameras(paired_with, [records[i] for i in truth]))
        else:
            true_heading = np.random.default_rng(seed).uniform(0.0, 360.0, len(records))[:q]
        cut = limit_photo if crop == "photo" else limit_fov
        views = np.stack([cut(rotate_view(g, h), fov) for g, h in zip(arrays.ground[truth], true_heading)])
    by_head = uses_head(method, heading)
    out: dict = {"queries": int(q), "rotations": rotations if heading == "unknown" and not by_head else None,
                 "method": method if heading == "unknown" or method == "rerank" else None}
    if photos is not None:
        out["photo_tilt"] = photo_tilt
    if paired_with is not None:
        out["paired_with"] = str(paired_with)
    if crop != "full":
        out["crop"] = crop
    if heading_error:
        out["heading_error_deg"] = heading_error
    if heading == "known" and photos is None:  # placed at its true heading: compared with the tiles as they are
        views = np.stack([rotate_view(v, -(h + off)) for v, h, off in zip(views, true_heading, placed_off)])
    if heading == "known" and method != "rerank":
        scores = encode_ground(views) @ encode_aerial(arrays.aerial).T
    elif by_head:  # one descriptor each; the heading from the columns of the best tile
        view_phases = tile_phases if view_phases is None else view_phases
        as_photos = (photos is not None or crop == "photo") and model.config.orientation_photo
        queries, query_columns = _encode_views(encoder, "ground", views, columns=True, phases=view_phases,
                                               photos=np.full(len(views), as_photos))
        if as_photos:
            out["photo_map"] = True  # the views' columns through the head's photo map
        aerial, aerial_columns = _encode_views(encoder, "aerial", arrays.aerial, columns=True, phases=tile_phases)
        if tile_phases > 1:  # [N, P * W, C] -> [N, P, W, C]
            aerial_columns = aerial_columns.reshape(len(aerial_columns), tile_phases, -1, aerial_columns.shape[-1])
            out["tile_phases"] = tile_phases
        if view_phases > 1:
            out["view_phases"] = view_phases
        scores = queries @ aerial.T
        valid = _seen_pixels(views)
        per_rotation = lambda i, j: alignment_scores(  # noqa: E731
            query_columns[i], aerial_columns[j:j + 1], valid[i])[0]
        if method == "rerank":
            weight = RERANK_WEIGHT if rerank_weight is None else rerank_weight
            within = None if heading == "unknown" else HEADING_WITHIN_DEG if heading_within is None else heading_within
            k = rerank_candidates(within) if rerank_k is None else rerank_k
            scores = reranked_scores(scores, query_columns, aerial_columns, valid, k, weight, within)
            out["rerank"] = {"candidates": k, "weight": weight, "heading_within_deg": within}
    elif method == "aerial":
        rotated = describe_rotations(encode_aerial, arrays.aerial, rotations)  # [R, N, D]
        queries = encode_ground(views)
        scores, _ = match_over_rotations(queries, rotated)
        per_rotation = lambda i, j: rotated[:, j] @ queries[i]  # noqa: E731
    else:
        turned = np.stack([encode_ground(rotate_view(views, -h)) for h in _headings(rotations)])  # [R, Q, D]
        aerial = encode_aerial(arrays.aerial)
        scores = np.max(np.einsum("rqd,nd->rqn", turned, aerial, optimize=True), axis=0)
        per_rotation = lambda i, j: turned[:, i] @ aerial[j]  # noqa: E731
    counts = count_closer_scores(scores, truth)
    out.update(recall_from_counts(counts, scores.shape[1]))
    if arrays.latlon is not None:
        out["confidence"] = confidence_report(scores, arrays.latlon, ambiguity_margin, truth=truth)
        out["position"] = position_report(scores, arrays.latlon, tile_m, truth=truth)
    if heading == "unknown":
        top1 = scores.argmax(axis=1)
        estimate = np.array([refine_heading(per_rotation(i, j)) for i, j in enumerate(top1)])
        error = angle_difference(estimate, true_heading)
        correct = top1 == truth
        out["heading_error_median_deg"] = float(np.median(error[correct])) if correct.any() else None
        out["heading_within_10deg"] = float((error[correct] <= 10).mean()) if correct.any() else None
    return out


# --------------------------------------------------------------------------- anywhere: queries against an index

def read_query_csv(root: Path) -> tuple[list[Path], np.ndarray]:
    """``root``/queries.csv (query_id,path,lat,lon; path relative to it, as worldgen --layout grid
    writes it): the ground images and their true positions [Q, 2]."""
    import csv

    path = root / "queries.csv"
    if not path.is_file():
        raise ValueError(f"{path}: no queries.csv (python -m worldgen --layout grid writes one)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "lat", "lon"} <= set(rows[0]):
        raise ValueError(f"{path}: needs a header with path,lat,lon and at least one row")
    try:
        latlon = np.array([(float(r["lat"]), float(r["lon"])) for r in rows], np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: a lat or lon is not a number") from None
    return [root / r["path"] for r in rows], latlon


def read_index_gallery(index: Path, fingerprint: str) -> tuple[np.ndarray, TileTable, dict]:
    """An index artifact's stored vectors [N, D] (row i = row i of its tiles.csv), its tile table and
    manifest; the artifact must have been built with the model of ``fingerprint``."""
    index = Path(os.path.realpath(index))
    manifest = read_manifest(index)
    check_model(index, manifest, fingerprint)
    return read_vectors(index, manifest), read_tiles(index, manifest), manifest


def best_per_tile(scores: np.ndarray, tile: np.ndarray, tiles: int) -> np.ndarray:
    """[Q, N] scores of N rows -> [Q, tiles]: each tile's best row (``tile[i]`` the tile of row i)."""
    order = np.argsort(tile, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(tile[order]) != 0])
    if len(starts) != tiles:
        raise ValueError(f"{tiles} tiles expected, rows name {len(starts)}")
    return np.maximum.reduceat(scores[:, order], starts, axis=1)


def evaluate_anywhere(checkpoint: Path, data: Path, index: Path, device: str = "auto", workers: int = 2,
                      limit: int = 0, tile_m: float | None = None, near_radius_m: float = 0.0,
                      candidates: int = 20, temperature: float | None = None, scores_out: Path | None = None,
                      rerank_k: int | None = None, rerank_weight: float | None = None) -> dict:
    """Cameras anywhere (``data``/queries.csv, e.g. a worldgen --layout grid region) against the tiles
    of an index artifact built from that region (e.g. cut by index_build tile): the true tile of a
    query is the one whose centre is nearest to it. R@1/5/10/1%, the error of the top-1 tile centre
    and of the refined position (over the top ``candidates``), and the same per offset of the camera
    from its nearest tile centre. ``near_radius_m`` > 0 adds the same with a prior: each query searched
    exactly among the tiles within that radius of its true position. ``tile_m``: default the
    manifest's (else 100 m). With views (index_build tile --centres-m) each query meets them as the service
    does: its best VIEW_TILES tiles by their own rows (within the prior's radius, with one), then all their
    views. ``scores_out``: save the similarities as ranked and the positions (.npz) for tuning.
    ``rerank_k``: rank as the service does with an orientation head, each query's best ``rerank_k`` tiles
    (of those within the prior's radius, with one) re-ranked by column alignment (`reranked_scores`,
    weight ``rerank_weight``, default model.orientation.RERANK_WEIGHT); the index must hold the tiles'
    column features. None: by descriptor alone."""
    from .inference import InferenceEncoder
    from .metrics import POSITION_TEMPERATURE, count_closer_scores, recall_from_counts
    from .preprocess import load_ground_image

    model = load_checkpoint(checkpoint)
    dev = pick_device(device)
    model.to(dev)
    paths, true_ll = read_query_csv(data)
    if limit:
        paths, true_ll = paths[:limit], true_ll[:limit]
    gallery, table, manifest = read_index_gallery(index, model.fingerprint())
    # rows are tiles, or views of them (index_build tile --centres-m): tiles are ranked by their best view,
    # the refined position comes from the views
    view_ll = table.latlon
    own_rows, tile_of = np.unique(table.tile_of, return_inverse=True)
    tile_ll = view_ll[own_rows]
    tile_views = TileViews.of(table.tile_of) if len(view_ll) > len(tile_ll) else None
    if rerank_k is not None and len(view_ll) > len(tile_ll):  # as many rows as the service re-ranks with views
        rerank_k = max(rerank_k, candidates * table.views_per_tile)
    tile_m = float(tile_m or manifest.get("tile_m") or TILE_FOOTPRINT_M)
    stride_m = float(manifest.get("stride_m") or tile_m / 2)
    temperature = POSITION_TEMPERATURE if temperature is None else temperature
    tile_columns = None  # with rerank_k: the tiles' column features, checked before any query is read
    if rerank_k is not None:
        from .orientation import RERANK_WEIGHT

        weight = RERANK_WEIGHT if rerank_weight is None else rerank_weight
        stored = read_orientation(os.path.realpath(index), manifest)
        if stored is None or getattr(model, "orientation", None) is None:
            raise ValueError(f"re-ranking needs an orientation head in {checkpoint} and column features in {index}")
        tile_columns = np.asarray(stored, np.float32)

    def load(path):
        return np.asarray(load_ground_image(path, model.config))

    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            views = np.stack(list(pool.map(load, paths)))
    else:
        views = np.stack([load(p) for p in paths])
    encoder = InferenceEncoder(model, dev)
    if tile_columns is None:
        queries = _encode_views(encoder, "ground", views)
    else:
        # each view at the tiles' sub-column phases, as the service meets the index
        view_phases = tile_columns.shape[1] if tile_columns.ndim == 4 else 1
        queries, query_columns = _encode_views(encoder, "ground", views, columns=True, phases=view_phases)
    scores = queries @ gallery.T  # [Q, N]

    def ranked(sims):
        """As the service ranks: with views, each query's best VIEW_TILES tiles by their own rows, then only their
        views; by descriptor, then (with rerank_k) its best re-ranked by column alignment."""
        if tile_views is not None:
            sims = views_of_best_tiles(sims, tile_views)
        if tile_columns is None:
            return sims
        seen = np.ones(views.shape[:1] + views.shape[2:3], bool)  # panoramas: every pixel column
        return reranked_scores(sims, query_columns, tile_columns, seen, rerank_k, weight)
    # true tile: the nearest centre (exact haversine over every tile)
    dist = np.stack([haversine_m(lat, lon, tile_ll[:, 0], tile_ll[:, 1]) for lat, lon in true_ll])
    truth = dist.argmin(axis=1)
    offset = dist[np.arange(len(truth)), truth]
    ranked_scores = ranked(scores)
    # the tiles model.metrics.rows_within picks, with all their views
    inside = (dist <= near_radius_m)[:, tile_of] if near_radius_m > 0 else None
    prior_scores = None if inside is None else ranked(np.where(inside, scores, np.float32(-np.inf)))
    if scores_out is not None:  # the scores as ranked (re-ranked too), so the file reproduces the report
        arrays = dict(scores=ranked_scores.astype(np.float32), tile_latlon=view_ll, true_latlon=true_ll,
                      truth=own_rows[truth], tile_of=own_rows[tile_of],
                      ranking=np.array("descriptor" if tile_columns is None else "rerank"))
        if prior_scores is not None:  # a re-rank among the prior's tiles is not the whole index's, masked
            arrays.update(prior_scores=prior_scores.astype(np.float32), near_radius_m=np.float64(near_radius_m))
        save_npz(scores_out, arrays)
    views = {"views": len(view_ll), "centres_m": manifest.get("centres_m")} if len(view_ll) > len(tile_ll) else {}
    result = {"n": len(paths), "tiles": len(tile_ll), **views, "data": str(data), "index": str(index),
              "checkpoint": str(checkpoint), "fingerprint": model.fingerprint(), "tile_m": tile_m,
              "stride_m": stride_m, "offset_median_m": float(np.median(offset)), "offset_max_m": float(offset.max()),
              **({"rerank": {"candidates": rerank_k, "weight": weight}} if rerank_k is not None else {})}

    def block(sims, searched: np.ndarray) -> tuple[dict, dict]:
        """``searched``: per query, the tiles searched (a prior's leave fewer; with views the first step's cut
        to VIEW_TILES does not count: R@1% is of the tiles searched)."""
        per_tile = sims if not views else best_per_tile(sims, tile_of, len(tile_ll))
        counts = count_closer_scores(per_tile, truth)
        out = recall_from_counts(counts, searched)  # R@1%: of the tiles searched
        pos = position_report(per_tile, tile_ll, tile_m, candidates, true_latlon=true_ll, temperature=temperature,
                              errors=True)
        if views:  # the top-1 tile's centre, and the position refined from the best views
            by_view = position_report(sims, view_ll, tile_m, candidates * table.views_per_tile, true_latlon=true_ll,
                                      temperature=temperature, errors=True)
            pos["refined"], pos["errors_m"]["refined"] = by_view["refined"], by_view["errors_m"]["refined"]
        errs = pos.pop("errors_m")
        out["position"] = pos
        return out, {"hit": counts == 0, "searched": searched, **errs}

    result["unrestricted"], detail = block(ranked_scores, np.full(len(truth), len(tile_ll)))
    # per offset of the camera from its true tile's centre: a quarter and a half stride (the farthest a
    # camera can be is stride / sqrt(2))
    edges = (0.0, stride_m / 4, stride_m / 2, np.inf)
    result["by_offset"] = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (offset >= lo) & (offset < hi)
        if sel.any():
            result["by_offset"].append({"from_m": lo, "to_m": None if np.isinf(hi) else hi, "n": int(sel.sum()),
                                        "r1": float(detail["hit"][sel].mean()),
                                        "top1_median_m": float(np.median(detail["top1"][sel])),
                                        "refined_median_m": float(np.median(detail["refined"][sel]))})
    if inside is not None:
        if not (dist[np.arange(len(truth)), truth] <= near_radius_m).all():
            raise ValueError(f"--near-radius-m {near_radius_m:g} leaves some query without its true tile")
        result["prior"], within = block(prior_scores, (dist <= near_radius_m).sum(axis=1))
        result["prior"].update(radius_m=near_radius_m, tiles_within_median=float(np.median(within["searched"])))
    return result


def views_of_best_tiles(scores: np.ndarray, tile_views: TileViews, tiles: int | None = None) -> np.ndarray:
    """Scores [Q, N] of rows that are views of tiles, as the service searches them: each query's best ``tiles``
    (default VIEW_TILES) tiles by their own rows' scores keep all their views' scores, every other row -inf (as
    are rows -inf before)."""
    tiles = VIEW_TILES if tiles is None else tiles
    own = scores[:, tile_views.tile_rows]
    out = np.full_like(scores, -np.inf)
    for i, row in enumerate(own):
        best = np.argsort(-row, kind="stable")[:tiles]
        rows = tile_views.rows(best[np.isfinite(row[best])])
        out[i, rows] = scores[i, rows]
    return out


def print_anywhere(result: dict) -> None:
    print(f"{result['checkpoint']} on {result['data']}: {result['n']} cameras anywhere against {result['tiles']} "
          f"tiles of {result['index']} ({result['tile_m']:g} m every {result['stride_m']:g} m; camera to its nearest "
          f"tile centre: median {result['offset_median_m']:.1f} m, at most {result['offset_max_m']:.1f} m)")
    if "views" in result:
        print(f"the tiles searched by their own rows, then every view of each camera's best {VIEW_TILES} "
              f"({result['views']} views every {result['centres_m']:g} m); each tile ranked by its best view, "
              "the refined position from the views")
    if "rerank" in result:
        print(f"ranked as the service does: the best {result['rerank']['candidates']} {'views' if 'views' in result else 'tiles'} "
              "by descriptor re-ranked by "
              f"column alignment (weight {result['rerank']['weight']:g})")
    else:
        print("ranked by descriptor alone (--method rerank: as the service does with an orientation head)")
    pct = lambda v: f"{v * 100:.1f}"  # noqa: E731
    print("| search | R@1 | R@5 | R@10 | R@1% | position | median m | mean m | <=10 m | <=25 m | <=50 m | <=100 m |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, name in (("unrestricted", "whole index"), ("prior", "prior")):
        if key not in result:
            continue
        r = result[key]
        label = name if key == "unrestricted" else f"within {r['radius_m']:g} m of the truth"
        for pos_name, e in (("top-1 tile centre", r["position"]["top1"]), ("refined", r["position"]["refined"])):
            print(f"| {label} | {pct(r['r1'])} | {pct(r['r5'])} | {pct(r['r10'])} | {pct(r['r1pct'])} | {pos_name} | "
                  f"{e['median_error_m']:.1f} | {e['mean_error_m']:.1f} | {pct(e['within_10m'])} | "
                  f"{pct(e['within_25m'])} | {pct(e['within_50m'])} | {pct(e['within_100m'])} |")
    print("| camera offset from the nearest tile centre | cameras | R@1 | top-1 centre median m | refined median m |")
    print("|---|---|---|---|---|")
    for b in result["by_offset"]:
        span = f"{b['from_m']:g}-{b['to_m']:g} m" if b["to_m"] is not None else f">= {b['from_m']:g} m"
        print(f"| {span} | {b['n']} | {pct(b['r1'])} | {b['top1_median_m']:.1f} | {b['refined_median_m']:.1f} |")


def reranked_scores(scores: np.ndarray, query_columns: np.ndarray, aerial_columns: np.ndarray, valid: np.ndarray,
                    k: int, weight: float, within_deg: float | None = None) -> np.ndarray:
    """Scores [Q, N] whose order is each query's best ``k`` tiles re-ranked by model.orientation.rerank
    (the views placed at their headings, trusted to ``within_deg``, or None: searched),
    above the rest in their descriptor order: the re-ranked get their combined score lifted by one
    constant per query, so the differences among them (the confidence margin, the refined position's
    weights) are those of the combined scores."""
    from .orientation import rerank

    if k < 1:
        raise ValueError(f"rerank candidates must be >= 1, got {k}")
    out = np.array(scores, dtype=np.float64)
    k = min(k, out.shape[1])
    for i, row in enumerate(out):
        top = np.argpartition(-row, k - 1)[:k]
        top = top[np.argsort(-row[top], kind="stable")]
        top = top[np.isfinite(row[top])]  # tiles a prior left out (-inf) stay out
        result = rerank(row[top], query_columns[i], aerial_columns[top], valid[i], weight=weight, within_deg=within_deg)
        rest = np.delete(row, top)
        lift = max(0.0, (rest.max() if len(rest) else 0.0) - result.scores.min()) + 1.0
        row[top[result.order]] = result.scores + lift
    return out


def _headings(rotations: int) -> np.ndarray:
    from .views import rotation_headings

    return rotation_headings(rotations)


def _encode_views(encoder, branch: str, views: np.ndarray, batch_size: int = 128, columns: bool = False,
                  phases: int = 1, photos: np.ndarray | None = None):
    """uint8 [N, H, W, 3] -> unit descriptors [N, D] (and, with ``columns``, the orientation head's
    column features [N, Wg, C], or [N, phases * Wg, C], ``photos`` through its photo map:
    InferenceEncoder.encode_uint8_with_columns)."""
    import torch

    images = torch.from_numpy(np.ascontiguousarray(views)).permute(0, 3, 1, 2)
    rows, cols = encoder.encode_uint8_with_columns(images, branch, max_batch=batch_size, columns=columns,
                                                   phases=phases, photos=photos)
    return (rows, cols) if columns else rows


def _seen_pixels(views: np.ndarray) -> np.ndarray:
    """[N, W] bool: the seen pixel columns of each view [N, H, W, 3] (a pixel column is unseen when all of it
    is the mean colour of model.views)."""
    from .views import MEAN_RGB

    return ~np.all(views == MEAN_RGB, axis=(1, 3))


def _view_columns(views: np.ndarray, width: int) -> np.ndarray:
    """[N, width] bool: the seen token columns of each view (model.orientation.seen_token_columns)."""
    from .orientation import seen_token_columns

    return seen_token_columns(_seen_pixels(views), width)


def photographed(world: Path, records) -> np.ndarray:
    """Rows of ``records`` whose place has a photo in the perspective world ``world`` (worldgen --panoramas N
    renders the first N); a ValueError where none has."""
    rows = np.array([i for i, r in enumerate(records) if (world / "streetview" / f"{r.id}.jpg").is_file()], np.int64)
    if len(rows) == 0:
        raise ValueError(f"{world / 'streetview'}: no photo of any of the {len(records)} places evaluated (a "
                         "perspective world of the same seed and pairs as --data has them)")
    return rows


def perspective_cameras(world: Path, records) -> list[dict]:
    """The cameras.csv rows of ``world`` (a perspective world) for ``records``, by id, in their order."""
    import csv

    with open(world / "cameras.csv", newline="") as fh:
        cameras = {row["id"]: row for row in csv.DictReader(fh)}
    rows = [cameras.get(record.id) for record in records]
    for record, camera in zip(records, rows):
        if camera is None or camera.get("camera") != "perspective":
            raise ValueError(f"{world / 'cameras.csv'}: no perspective camera for id {record.id!r}")
    return rows  # type: ignore[return-value]


def camera_headings(cameras: list[dict]) -> np.ndarray:
    """[N] the headings (degrees clockwise from north, in [0, 360)) of cameras.csv rows."""
    return np.array([float(c["heading_deg"]) % 360.0 for c in cameras])


def photo_views(world: Path, records, config, centred: bool, tilt: bool | str = False,
                off: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The perspective photos of ``world`` (same places as ``records``, by id) mapped into the
    panorama frame at the model's ground size: at their true heading (known) or centred on north
    (``centred``: the heading is then searched); level, as a phone that does not send its tilt, or
    (``tilt``) with their cameras' true pitch and roll, as one that does (the API's pitch_deg,
    roll_deg), or (``tilt="estimated"``) with the tilt `estimate_photo_tilt` finds, as the service places
    a photo sent without one; by `place_photo`, as the service places an upload. A known heading is given off
    the true one by ``off`` [N] degrees (None: none). Returns (views [N, H, W, 3]
    uint8, true headings)."""
    from .views import place_photo

    if tilt not in (False, True, "estimated"):
        raise ValueError(f"tilt must be False, True or 'estimated', got {tilt!r}")
    cameras = perspective_cameras(world, records)
    views = np.empty((len(records), *config.ground_size, 3), np.uint8)
    headings = camera_headings(cameras)
    for i, (record, camera) in enumerate(zip(records, cameras)):
        photo = world / "streetview" / f"{record.id}.jpg"
        known = (float(camera["pitch_deg"]), float(camera["roll_deg"])) if tilt is True else (0.0, 0.0)
        views[i], _, _ = place_photo(photo, config, fov_deg=float(camera["hfov_deg"]),
                                     heading_deg=None if centred else headings[i] + (0.0 if off is None else off[i]),
                                     tilt=None if tilt == "estimated" else known)
    return views, headings


def save_npz(path: Path, arrays: dict) -> None:
    """np.savez_compressed, atomically (``.npz`` added to a name without it, as numpy does)."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic_write(path, write)


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
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="our .safetensors checkpoint")
    p.add_argument("--data", required=True, type=Path, help="data set root")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "cvusa", "cvact"], help="layout of --data")
    p.add_argument("--split", default="val", help="val, train or all (synthetic); val or train (CVUSA/CVACT)")
    p.add_argument("--limit", type=non_negative_int, default=0, help="evaluate the first N pairs only (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (bf16 autocast on CUDA)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="decoding threads")
    p.add_argument("--plot", type=figure_file, help="write a recall@K curve PNG here")
    p.add_argument("--json", action="store_true", help="print one JSON object (r1, r5, r10, r1pct, n, ...)")
    v = p.add_argument_group("limited field of view, unknown heading (synthetic worlds)")
    v.add_argument("--fov", type=number(above=0, high=360), default=360.0,
                   help="keep this many degrees of each panorama around a random heading (360: all)")
    v.add_argument("--crop", choices=CROPS, default="full",
                   help="full: each view keeps the panorama's whole height over --fov; photo: only the outline a "
                        "level 4:3 phone photo of --fov horizontal degrees covers in the panorama frame (about 26 of "
                        "64 rows at 90), as a photo without a perspective world (--photos)")
    v.add_argument("--heading", choices=HEADING_MODES, default="known",
                   help="known: the query is placed at its true heading; unknown: the heading is searched")
    v.add_argument("--rotations", type=positive_int, default=16, help="headings searched with --heading unknown")
    v.add_argument("--method", choices=METHODS, default="head",
                   help="with --heading unknown, how the heading is found: head: the orientation head aligns the "
                        "view's columns with the best tile's (one encoding, the checkpoint needs the head); "
                        "aerial / query: descriptors of the tiles / of the query at --rotations turns; rerank: as "
                        "head, after re-ranking the best --rerank-k tiles by descriptor and column alignment "
                        "(also with --heading known)")
    v.add_argument("--rerank-k", type=positive_int, help="tiles re-ranked by --method rerank (default: "
                                               "model.orientation.rerank_candidates: 200 for a heading searched, "
                                               "800 for a given one, aligned only near it)")
    v.add_argument("--rerank-weight", type=number(0, 1),
                   help="share of the column alignment in --method rerank's score "
                        "(default: model.orientation.RERANK_WEIGHT)")
    v.add_argument("--heading-within", type=number(0, 180), default=None,
                   help="with --heading known and --method rerank: the column alignment is searched only within this "
                        "many degrees of the true heading, as the service trusts a given one (180: all round, as for "
                        "an unknown heading; default: model.orientation.HEADING_WITHIN_DEG)")
    v.add_argument("--heading-error", type=number(0, 180), default=0.0,
                   help="with --heading known: place each view off its true heading by up to this many degrees "
                        "(uniform), as a phone compass's heading errs (0: at the true heading)")
    v.add_argument("--tile-phases", type=positive_int, default=1,
                   help="with the orientation head: meet the tiles' columns at this many sub-column phases (each "
                        "a polar tile encoded again, turned by 1/N of a token column; model.orientation.phase_columns; "
                        "a known heading at those within --heading-within of it), as an index_build build "
                        "--tile-phases N index holds them; 1: as the tiles are")
    v.add_argument("--view-phases", type=positive_int, default=None,
                   help="with the orientation head: encode each view at this many sub-column phases and average "
                        "the alignments that meet at one heading (model.orientation.view_phase_scores; default: "
                        "--tile-phases, as the service meets an index)")
    v.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random headings of the crops")
    v.add_argument("--ambiguity-margin", type=number(0), default=0.02,
                   help="report how answers whose best match beats the best one 150 m away by less are right")
    p.add_argument("--tile-m", type=number(above=0), default=None,
                   help="the aerial tiles' footprint in metres (world.json's tile_footprint_m), for the refined position "
                        f"(default: with --index the manifest's tile_m, else {TILE_FOOTPRINT_M:g})")
    a = p.add_argument_group("cameras anywhere (--index: --data holds queries.csv, e.g. worldgen --layout grid)")
    a.add_argument("--index", type=Path,
                   help="an index artifact built from the region's tiles (index_build tile + build): the gallery; "
                        "a query's true tile is the one whose centre is nearest to it (--split, --dataset and the "
                        "field-of-view options do not apply; --method rerank ranks as the service does, by descriptor "
                        "then the best --rerank-k re-ranked by column alignment; otherwise by descriptor alone)")
    a.add_argument("--near-radius-m", type=number(0), default=0.0,
                   help="also search each query exactly among the tiles within this radius of its true position "
                        "(a location prior, as the API's near/radius_m); 0: not")
    a.add_argument("--candidates", type=positive_int, default=20, help="top matches the refined position is made from")
    a.add_argument("--temperature", type=number(above=0), default=None,
                   help="softmax temperature of the refined position (default model.metrics.POSITION_TEMPERATURE)")
    a.add_argument("--save-scores", type=output_file, help="write the similarities and positions here (.npz)")
    v.add_argument("--queries", type=non_negative_int, default=0,
                   help="only the first N pairs are queries, matched against every tile of the split (0: all)")
    v.add_argument("--photos", type=Path,
                   help="a perspective world (worldgen --camera perspective, same seed and pairs as --data): "
                        "its photos are the queries, mapped into the panorama frame")
    v.add_argument("--paired-with", type=Path, metavar="PHOTOS",
                   help="a perspective world of the same places (as --photos): cut each crop at the heading of its "
                        "place's photo instead of a random one, and query only the places with a photo, so that crops "
                        "and those photos (--photos) are compared pair by pair")
    v.add_argument("--photo-tilt", nargs="?", const="true", choices=["true", "estimated"],
                   help="place each --photos photo with its camera's true pitch and roll (cameras.csv), as a phone "
                        "that sends its tilt (the API's pitch_deg, roll_deg); 'estimated': with the tilt estimated "
                        "from its vertical edges, as the service places a photo sent without it; default: level")
    return p


def _interrupted() -> int:
    print("interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.index is None and (args.near_radius_m or args.save_scores or args.temperature is not None):
        parser.error("--near-radius-m, --temperature and --save-scores need --index")
    if args.tile_phases > 1 and (args.index is not None or not uses_head(args.method, args.heading)):
        parser.error("--tile-phases needs the orientation head: --method rerank, or head with --heading unknown "
                     "(and no --index)")
    if args.view_phases is not None and (args.index is not None or not uses_head(args.method, args.heading)):
        parser.error("--view-phases needs the orientation head: --method rerank, or head with --heading unknown "
                     "(and no --index, whose own --tile-phases it follows)")
    if args.heading_within is not None and (args.index is not None or args.heading != "known"
                                            or args.method != "rerank"):
        parser.error("--heading-within needs --heading known with --method rerank (and no --index)")
    if args.heading_error and (args.index is not None or args.heading != "known"):
        parser.error("--heading-error needs --heading known (and no --index)")
    if args.index is not None:
        from .orientation import RERANK_CANDIDATES

        rerank_k = (args.rerank_k or RERANK_CANDIDATES) if args.method == "rerank" else None
        try:
            result = evaluate_anywhere(args.checkpoint, args.data, args.index, args.device, args.workers, args.limit,
                                       tile_m=args.tile_m, near_radius_m=args.near_radius_m,
                                       candidates=args.candidates, temperature=args.temperature,
                                       scores_out=args.save_scores,
                                       rerank_k=rerank_k, rerank_weight=args.rerank_weight)
        except (ArtifactError, CheckpointError, ConfigError, ValueError, OSError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return _interrupted()
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print_anywhere(result)
        return 0
    try:
        result = evaluate(args.checkpoint, args.data, args.dataset, args.split, args.device, args.limit, args.plot,
                          args.workers, fov=args.fov, heading=args.heading, rotations=args.rotations,
                          method=args.method, seed=args.seed, photos=args.photos, queries=args.queries,
                          ambiguity_margin=args.ambiguity_margin, tile_m=args.tile_m or TILE_FOOTPRINT_M,
                          rerank_k=args.rerank_k, rerank_weight=args.rerank_weight,
                          photo_tilt={None: False, "true": True}.get(args.photo_tilt, args.photo_tilt),
                          tile_phases=args.tile_phases, crop=args.crop, heading_within=args.heading_within,
                          heading_error=args.heading_error, view_phases=args.view_phases,
                          paired_with=args.paired_with)
    except (CheckpointError, ConfigError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted()
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    queries = f", {result['queries']} queries" if result.get("queries", result["n"]) != result["n"] else ""
    fov = f"photos at their own fields of view ({args.photos.name})" if args.photos else f"field of view {result['fov']:g} deg"
    view = f", {fov}, heading {result['heading']}" if "method" in result else ""
    print(f"{result['checkpoint']} on {result['data']} ({result['split']}, N={result['n']}{queries}{view})")
    print(f"R@1 {result['r1'] * 100:.2f}  R@5 {result['r5'] * 100:.2f}  R@10 {result['r10'] * 100:.2f}  "
          f"R@1% {result['r1pct'] * 100:.2f}")
    if "heading_error_median_deg" in result and result["heading_error_median_deg"] is not None:
        how = "orientation head" if result["method"] == "head" else "orientation head after the re-rank" \
            if result["method"] == "rerank" else \
            f"{result['rotations']} rotations, turning the {result['method']}"
        print(f"heading ({how}): median error "
              f"{result['heading_error_median_deg']:.1f} deg over the correctly localised queries, within 10 deg "
              f"{result['heading_within_10deg'] * 100:.1f}%")
    if result.get("confidence"):
        c = result["confidence"]
        pct = lambda v: "-" if v is None else f"{v * 100:.1f}%"  # noqa: E731
        print(f"ambiguous (margin < {c['threshold']:g}): {c['ambiguous_share'] * 100:.1f}% of the answers; "
              f"top-1 right: {pct(c['r1_clear'])} of the clear ones, {pct(c['r1_ambiguous'])} of the ambiguous")
    if "localization" in result:
        loc = result["localization"]
        print(f"top-1 error: median {loc['median_m']:.1f} m; within 25 m {loc['within_25m'] * 100:.1f}%, "
              f"50 m {loc['within_50m'] * 100:.1f}%, 100 m {loc['within_100m'] * 100:.1f}%")
    if result.get("position"):
        refined, top1 = result["position"]["refined"], result["position"]["top1"]
        for name, e in (("refined position", refined), ("top-1 tile centre", top1)):
            print(f"{name}: median {e['median_error_m']:.1f} m, mean {e['mean_error_m']:.1f} m; within 10 m "
                  f"{e['within_10m'] * 100:.1f}%, 25 m {e['within_25m'] * 100:.1f}%, 50 m {e['within_50m'] * 100:.1f}%, "
                  f"100 m {e['within_100m'] * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

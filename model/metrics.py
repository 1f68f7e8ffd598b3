"""Retrieval metrics with the authors' protocol, and localisation error in metres."""
from __future__ import annotations

import math

import numpy as np

EARTH_RADIUS_M = 6_371_008.8


def _as_rows(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {arr.shape}")
    return arr


def count_closer(query, gallery, chunk: int = 2048) -> np.ndarray:
    """For each query i, how many gallery items are strictly more similar than its true match i."""
    q, g = _as_rows(query, "query"), _as_rows(gallery, "gallery")
    if q.shape[0] != g.shape[0] or q.shape[1] != g.shape[1]:
        raise ValueError(f"query {q.shape} and gallery {g.shape} must be row-aligned with the same dim")
    counts = np.empty(q.shape[0], dtype=np.int64)
    for s in range(0, q.shape[0], chunk):
        sims = q[s:s + chunk] @ g.T
        rows = np.arange(sims.shape[0])
        # The true match's similarity is read from the same product, so exact ties stay ties.
        pos = sims[rows, s + rows]
        counts[s:s + chunk] = (sims > _compared(pos)[:, None]).sum(axis=1)
    return counts


def _compared(true_scores: np.ndarray) -> np.ndarray:
    """The true matches' similarities, which must be numbers: nothing is "closer" than NaN (a NaN
    descriptor would count as a hit at every K)."""
    if np.isnan(true_scores).any():
        raise ValueError(f"{int(np.isnan(true_scores).sum())} queries have a NaN similarity to their true match "
                         "(NaN descriptors: a broken checkpoint or input?)")
    return true_scores


def count_closer_scores(scores, truth=None) -> np.ndarray:
    """``count_closer`` for a precomputed similarity matrix [Q, N] (e.g. the best over an aerial
    tile's rotations) whose true match of query i is gallery item ``truth[i]`` (default: i)."""
    sims = np.asarray(scores, dtype=np.float32)
    if sims.ndim != 2 or (truth is None and sims.shape[0] > sims.shape[1]):
        raise ValueError(f"scores must be [Q, N] (with Q <= N unless truth is given), got shape {sims.shape}")
    rows = np.arange(sims.shape[0])
    truth = rows if truth is None else np.asarray(truth)
    return (sims > _compared(sims[rows, truth])[:, None]).sum(axis=1)


def recall_from_counts(counts: np.ndarray, n: int | np.ndarray) -> dict[str, float]:
    """R@1, R@5, R@10, R@1% (fractions) from each query's count of strictly closer gallery items
    in a gallery of ``n`` (or of ``n[i]`` for query i: the tiles a geographic prior leaves it)."""
    if len(counts) == 0:
        raise ValueError("retrieval_recall needs at least one query")
    # The authors' 1% cut-off is floor(0.01 N); for galleries under 100 that is 0, so we use 1.
    one_percent = np.maximum(1, np.floor(0.01 * np.asarray(n)))
    return {name: float((counts < k).mean()) for name, k in (("r1", 1), ("r5", 5), ("r10", 10), ("r1pct", one_percent))}


def retrieval_recall(query, gallery) -> dict[str, float]:
    """R@1, R@5, R@10 and R@1% (fractions) for row-aligned descriptors: query i matches gallery i.

    hit@K when fewer than K gallery items are strictly closer than the true match (so ties count
    in the query's favour, as in the authors' evaluation)."""
    counts = count_closer(query, gallery)
    return recall_from_counts(counts, len(counts))


def recall_curve(query, gallery, max_k: int = 100) -> np.ndarray:
    """recall@K for K = 1..max_k."""
    counts = count_closer(query, gallery)
    ks = np.arange(1, max_k + 1)
    return (counts[None, :] < ks[:, None]).mean(axis=1)


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def localization_error(query, gallery, query_latlon, gallery_latlon) -> dict[str, float]:
    """Top-1 error in metres: median and the share within 25 / 50 / 100 m."""
    q, g = _as_rows(query, "query"), _as_rows(gallery, "gallery")
    top1 = np.concatenate([np.argmax(q[s:s + 2048] @ g.T, axis=1) for s in range(0, len(q), 2048)])
    ql, gl = np.asarray(query_latlon, dtype=np.float64), np.asarray(gallery_latlon, dtype=np.float64)
    err = haversine_m(ql[:, 0], ql[:, 1], gl[top1, 0], gl[top1, 1])
    return {"median_m": float(np.median(err)), "within_25m": float((err <= 25).mean()),
            "within_50m": float((err <= 50).mean()), "within_100m": float((err <= 100).mean())}


def match_margin(scores, latlon, distinct_m: float = 150.0) -> tuple[float | None, int | None]:
    """How much the best of a ranked list of matches (scores [K], best first; their tile centres
    latlon [K, 2]) beats the best one at least ``distinct_m`` away from it: (score margin, index of
    that competitor), or (None, None) when no listed match is that far. A small margin means two
    different places look alike: the answer is ambiguous."""
    s = np.asarray(scores, dtype=np.float64)
    ll = np.asarray(latlon, dtype=np.float64)
    if len(s) < 2:
        return None, None
    far = haversine_m(ll[0, 0], ll[0, 1], ll[1:, 0], ll[1:, 1]) >= distinct_m
    if not far.any():
        return None, None
    j = 1 + int(np.argmax(far))  # ranked: the first far one is the best far one
    return float(s[0] - s[j]), j


def confidence_report(scores, latlon, threshold: float, distinct_m: float = 150.0, candidates: int = 20,
                      truth=None) -> dict:
    """How well the ambiguity flag separates right from wrong answers: scores [Q, N] of Q queries whose
    true tile is gallery item i (latlon [N, 2]); each answer's margin (`match_margin` over its top
    ``candidates``) is compared with ``threshold``. Returns the share flagged ambiguous and the top-1
    accuracy of the flagged and of the clear answers (true tile of query i: ``truth[i]``, default i)."""
    s = np.asarray(scores, dtype=np.float32)
    ll = np.asarray(latlon, dtype=np.float64)
    top = np.argsort(-s, axis=1)[:, :candidates]
    correct = top[:, 0] == (np.arange(len(s)) if truth is None else np.asarray(truth))
    ambiguous = np.zeros(len(s), bool)
    for i, row in enumerate(top):
        margin, _ = match_margin(s[i, row], ll[row], distinct_m)
        ambiguous[i] = margin is not None and margin < threshold

    def share(mask) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    return {"threshold": threshold, "ambiguous_share": float(ambiguous.mean()),
            "r1_clear": share(~ambiguous), "r1_ambiguous": share(ambiguous)}


# Position refinement: from a ranked list of matches to a position in metres.
TILE_FOOTPRINT_M = 100.0  # side of an aerial tile on the ground (worldgen's and index_build's default)
CONSISTENT_TILES = 1.5  # matches within this many footprints of the best one show the same place
POSITION_TEMPERATURE = 0.01  # softmax temperature on cosine scores: 0.01 lower weighs e^-1 as much
UNCERTAINTY_FLOOR_TILES = 0.25  # a position is never claimed more precisely than a quarter tile


def local_xy_m(lat, lon, lat0: float, lon0: float) -> np.ndarray:
    """[N, 2] east/north offsets in metres of (lat, lon) from (lat0, lon0): an equirectangular frame,
    accurate to well under a metre over the few hundred metres it is used for, across the antimeridian too."""
    k = math.radians(1.0) * EARTH_RADIUS_M
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    east = lon - lon0
    east = np.where(east > 180.0, east - 360.0, np.where(east < -180.0, east + 360.0, east))
    return np.column_stack([east * k * math.cos(math.radians(lat0)), (lat - lat0) * k])


def refine_position(scores, latlon, tile_m: float = TILE_FOOTPRINT_M, temperature: float = POSITION_TEMPERATURE,
                    consistent_tiles: float = CONSISTENT_TILES) -> tuple[float, float, float]:
    """(lat, lon, uncertainty in metres) from ranked matches (scores [K], best first; tile centres
    latlon [K, 2]): the softmax(score / ``temperature``)-weighted centre of the best match and
    of the matches within ``consistent_tiles`` footprints of it (the others show another place); the
    uncertainty is the weighted RMS distance of those centres to it, at least a quarter tile."""
    s = np.asarray(scores, dtype=np.float64)
    ll = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    if len(s) == 0 or len(s) != len(ll):
        raise ValueError(f"refine_position needs as many scores as centres, at least one (got {len(s)}, {len(ll)})")
    lat0, lon0 = float(ll[0, 0]), float(ll[0, 1])
    xy = local_xy_m(ll[:, 0], ll[:, 1], lat0, lon0)
    if not (temperature > 0 and consistent_tiles >= 0):
        raise ValueError(f"refine_position: temperature {temperature:g} must be > 0, consistent_tiles "
                         f"{consistent_tiles:g} >= 0")
    near = np.hypot(xy[:, 0], xy[:, 1]) <= consistent_tiles * tile_m
    w = np.exp((s[near] - s[0]) / temperature)  # the best match's weight is 1: no overflow
    w /= w.sum()
    centre = w @ xy[near]
    spread = math.sqrt(float(w @ np.sum((xy[near] - centre) ** 2, axis=1)))
    k = math.radians(1.0) * EARTH_RADIUS_M
    lat = lat0 + centre[1] / k
    lon = lon0 + centre[0] / (k * math.cos(math.radians(lat0)))
    lon = lon - 360.0 if lon > 180.0 else lon + 360.0 if lon < -180.0 else lon
    return lat, lon, max(spread, UNCERTAINTY_FLOOR_TILES * tile_m)


def rows_within(lat, lon, near_lat: float, near_lon: float, radius_m: float) -> np.ndarray:
    """Indices of the points (lat, lon arrays) within ``radius_m`` of (near_lat, near_lon), ascending.
    A latitude band cuts the haversine down to the few candidates (a million tiles in milliseconds)."""
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    band = math.degrees(radius_m / EARTH_RADIUS_M) + 1e-9
    candidates = np.flatnonzero(np.abs(lat - near_lat) <= band)
    d = haversine_m(near_lat, near_lon, lat[candidates], lon[candidates])
    return candidates[d <= radius_m]


ERROR_CUTOFFS_M = (10, 25, 50, 100)


def error_summary(error_m) -> dict[str, float]:
    """median_error_m, mean_error_m and the share within 10 / 25 / 50 / 100 m of errors in metres."""
    e = np.asarray(error_m, dtype=np.float64)
    return {"median_error_m": float(np.median(e)), "mean_error_m": float(np.mean(e)),
            **{f"within_{c}m": float((e <= c).mean()) for c in ERROR_CUTOFFS_M}}


def position_report(scores, latlon, tile_m: float = TILE_FOOTPRINT_M, candidates: int = 20, truth=None,
                    true_latlon=None, temperature: float = POSITION_TEMPERATURE,
                    consistent_tiles: float = CONSISTENT_TILES, errors: bool = False) -> dict:
    """Localisation error of the refined position (`refine_position` over each query's top
    ``candidates``) and of the top-1 tile centre: scores [Q, N] of Q queries whose true place is
    ``true_latlon[i]`` (a camera anywhere, [Q, 2]) or else that of gallery item ``truth[i]``
    (default i; latlon [N, 2]). A score of -inf marks a tile the query may not match (a prior's
    radius): it is never a candidate. ``errors``: also each query's errors in metres (arrays)."""
    s = np.asarray(scores, dtype=np.float32)
    ll = np.asarray(latlon, dtype=np.float64)
    top = np.argsort(-s, axis=1)[:, :candidates]
    if true_latlon is not None:
        truth = np.asarray(true_latlon, dtype=np.float64).reshape(-1, 2)
    else:
        truth = ll[:len(s)] if truth is None else ll[np.asarray(truth)]
    refined = np.array([refine_position(s[i, row][np.isfinite(s[i, row])], ll[row][np.isfinite(s[i, row])], tile_m,
                                        temperature, consistent_tiles)[:2] for i, row in enumerate(top)])
    refined_err = haversine_m(truth[:, 0], truth[:, 1], refined[:, 0], refined[:, 1])
    top1_err = haversine_m(truth[:, 0], truth[:, 1], ll[top[:, 0], 0], ll[top[:, 0], 1])
    out = {"refined": error_summary(refined_err), "top1": error_summary(top1_err), "tile_m": tile_m,
           "candidates": candidates, "temperature": temperature, "consistent_tiles": consistent_tiles}
    if errors:
        out["errors_m"] = {"refined": refined_err, "top1": top1_err}
    return out

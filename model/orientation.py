"""The heading of a street-level view, found against the aerial tile it matches.

Trained with views turned to every heading, L2LTR's descriptors became nearly invariant to the
heading (a panorama turned by 90 degrees gets almost the same descriptor), which is what lets a
view of unknown heading be matched at all, but which also means a descriptor can not say the
heading. The token grids under the descriptors still can: a small head maps each branch's final
patch tokens of one column (averaged over the rows, or with ``orientation_rows`` the rows side by
side: a panorama's rows are elevations, a polar tile's distances from the camera) to one unit
feature per column (an azimuth sector of 360/W degrees), and the heading is the circular shift that
best aligns the view's columns with the tile's (`shift_scores`), refined between columns
(`model.views.refine_heading`). Only the columns a limited field of view saw take part. A phone
photo covers only the middle rows of the panorama frame; a head may have a second ground map for such
photos (`OrientationHead.photo`, trained with ``--photo-map``), which meets the same tile features.

    python -m model.orientation --checkpoint weights/l2ltr_tiny_demo.safetensors --data data/train_world_l \\
        --out runs/orientation/tiny_orientation.safetensors

trains the head on the frozen network (minutes on a CPU) and writes the checkpoint with it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .views import fov_columns


def _column_map(inputs: int, dim: int, hidden: int) -> nn.Module:
    if not hidden:
        return nn.Linear(inputs, dim)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, dim))


class OrientationHead(nn.Module):
    """Per-branch maps (linear, or with ``hidden`` one GELU layer) from a column's final patch
    tokens (their mean over the rows; with ``rows`` = the grids' row counts (ground, aerial), the rows
    side by side) to a unit column feature of width ``dim``; with ``photo``, a second ground map for
    phone photos (``photos`` in `columns`), which meet the same aerial map."""

    def __init__(self, hidden_size: int, dim: int = 64, rows: tuple[int, int] | None = None, hidden: int = 0,
                 photo: bool = False) -> None:
        super().__init__()
        self.rows = rows
        ground_rows, aerial_rows = rows or (1, 1)
        self.ground = _column_map(hidden_size * ground_rows, dim, hidden)
        self.aerial = _column_map(hidden_size * aerial_rows, dim, hidden)
        self.photo = _column_map(hidden_size * ground_rows, dim, hidden) if photo else None

    @classmethod
    def for_config(cls, config) -> "OrientationHead":
        rows = (config.grid("ground")[0], config.grid("aerial")[0]) if config.orientation_rows else None
        return cls(config.hidden_size, config.orientation_dim, rows, config.orientation_hidden,
                   config.orientation_photo)

    def columns(self, tokens: torch.Tensor, grid: tuple[int, int], branch: str,
                photos: np.ndarray | Sequence[bool] | None = None) -> torch.Tensor:
        """Final-layer tokens [B, 1 + Hg*Wg, D] of ``branch`` -> unit column features [B, Wg, C]; the ground
        views flagged in ``photos`` [B] (bool) through the photo map where the head has one."""
        by_column = column_tokens(tokens, grid, self.rows is not None)
        if branch != "ground" or self.photo is None or photos is None or not np.any(photos):
            return self.project(by_column, branch)
        photos = torch.as_tensor(np.asarray(photos, dtype=bool), device=by_column.device)
        if bool(photos.all()):
            return self.project(by_column, "photo")
        photo_columns = self.project(by_column[photos], "photo")
        out = photo_columns.new_empty(len(photos), *photo_columns.shape[1:])
        out[photos], out[~photos] = photo_columns, self.project(by_column[~photos], "ground")
        return out

    def project(self, columns: torch.Tensor, branch: str) -> torch.Tensor:
        """`column_tokens` [B, Wg, D or Hg*D] -> unit column features [B, Wg, C] through ``branch``'s map
        (ground, aerial or photo)."""
        return F.normalize(getattr(self, branch)(columns), dim=-1)


def column_tokens(tokens: torch.Tensor, grid: tuple[int, int], rows: bool = False) -> torch.Tensor:
    """Final-layer tokens [B, 1 + Hg*Wg, D] -> each column's patch tokens averaged over the rows
    [B, Wg, D], or (``rows``) its rows side by side, top row first [B, Wg, Hg*D]."""
    grid_tokens = tokens[:, 1:].reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])
    if not rows:
        return grid_tokens.mean(dim=1)
    return grid_tokens.permute(0, 2, 1, 3).reshape(tokens.shape[0], grid[1], grid[0] * tokens.shape[-1])


def shift_scores(ground: torch.Tensor | np.ndarray, aerial: torch.Tensor | np.ndarray,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Column features of views [B, W, C] and of their tiles [B, W, C] (or one tile [W, C] for all)
    -> [B, W]: for each shift s, the mean over the view's valid columns w of <view[w], tile[w + s]>.
    The best shift s is the view's heading, s * 360 / W degrees."""
    g = np.asarray(ground.detach().cpu() if isinstance(ground, torch.Tensor) else ground, dtype=np.float32)
    a = np.asarray(aerial.detach().cpu() if isinstance(aerial, torch.Tensor) else aerial, dtype=np.float32)
    if a.ndim == 2:
        a = np.broadcast_to(a, g.shape)
    b, w = g.shape[:2]
    keep = np.ones((b, w), np.float32) if valid is None else np.array(np.broadcast_to(valid, (b, w)), np.float32)
    keep /= np.maximum(keep.sum(axis=1, keepdims=True), 1.0)
    gram = np.matmul(g, a.transpose(0, 2, 1))  # [B, W, W]: view column w . tile column v
    shifted = (np.arange(w)[None, :] + np.arange(w)[:, None]) % w  # [S, W]: the tile column w + s
    return np.einsum("bsw,bw->bs", gram[:, np.arange(w)[None, :], shifted], keep)


def seen_token_columns(seen: np.ndarray, width: int) -> np.ndarray:
    """Seen pixel columns [..., width * P] -> [..., width] bool: the token columns at least half seen;
    where none is (a view of about one token column straddling two), its most seen ones."""
    fraction = np.asarray(seen, dtype=np.float32).reshape(*np.shape(seen)[:-1], width, -1).mean(axis=-1)
    most = fraction.max(axis=-1, keepdims=True)
    return np.where((fraction >= 0.5).any(axis=-1, keepdims=True), fraction >= 0.5, (fraction == most) & (most > 0))


def valid_columns(width: int, fov_deg: float) -> np.ndarray:
    """[width] bool: the token columns of a centred field of view of ``fov_deg`` (`seen_token_columns`)."""
    return seen_token_columns(fov_columns(width * 16, fov_deg), width)


def heading_targets(headings_deg: np.ndarray, width: int) -> np.ndarray:
    """The column shift nearest to each heading."""
    return np.round(np.asarray(headings_deg) / 360.0 * width).astype(np.int64) % width


def _seen_token_columns(seen: np.ndarray, width: int) -> np.ndarray:
    """A view's seen pixel columns [W * n] (`seen_token_columns`) or token columns [W] -> [W] bool."""
    seen = np.asarray(seen, dtype=bool)
    if seen.size % width:
        raise ValueError(f"seen has {seen.size} columns, not a multiple of the view's {width}")
    return seen_token_columns(seen, width) if seen.size != width else seen


def _seen_at_phases(seen: np.ndarray, width: int, view_phases: int) -> list[np.ndarray]:
    """A view's seen pixel columns as placed at phase 0 -> as placed at each of its ``view_phases`` sub-column
    phases (phase t: turned by t / T of a token column, as the encoder turns the view)."""
    seen = np.asarray(seen, dtype=bool).reshape(-1)
    step, rest = divmod(seen.size, width * view_phases)
    if rest or step == 0:
        raise ValueError(f"a view at {view_phases} phases needs its seen pixel columns (a multiple of "
                         f"{width * view_phases}), got {seen.size}")
    return [np.roll(seen, t * step) for t in range(view_phases)]


def alignment_scores(view_columns: np.ndarray, tile_columns: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """One view's column features [W, C] against several tiles' [K, W, C] (its seen pixel columns
    ``seen`` [W * 16] or token columns [W], None: all) -> [K, W]: `shift_scores` of the view at each tile.
    Tiles encoded at P sub-column phases (`phase_columns`, [K, P, W, C]) give [K, W * P]: the scores at
    headings 360 / (W * P) degrees apart, the best over the phases and shifts still at the view's heading.
    A view encoded at T sub-column phases too ([T, W, C]: `view_phase_scores`) gives [K, W * lcm(P, T)]."""
    if np.ndim(view_columns) == 3:
        return view_phase_scores(view_columns, tile_columns, seen)
    tiles = np.asarray(tile_columns, dtype=np.float32)
    width = view_columns.shape[0]
    if tiles.ndim == 4:  # phase p is the tile turned by p / P of a column: shift s there is heading s - p / P
        k, phases = tiles.shape[:2]
        if tiles.shape[2:] != np.shape(view_columns):
            raise ValueError(f"tile columns at phases must be [K, P, {width}, {np.shape(view_columns)[-1]}] like "
                             f"the view's {np.shape(view_columns)}, got {tiles.shape}")
        per_phase = alignment_scores(view_columns, tiles.reshape(k * phases, *tiles.shape[2:]), seen)
        return interleave_phases(per_phase.reshape(k, phases, width))
    if tiles.ndim != 3 or tiles.shape[1:] != np.shape(view_columns):
        raise ValueError(f"tile columns must be [K, {width}, {np.shape(view_columns)[-1]}] like the view's "
                         f"{np.shape(view_columns)}, got {tiles.shape}")
    valid = None if seen is None else _seen_token_columns(seen, width)
    views = np.broadcast_to(np.asarray(view_columns, dtype=np.float32), tiles.shape)
    return shift_scores(views, tiles, None if valid is None else np.broadcast_to(valid, tiles.shape[:2]))


def view_phase_scores(view_columns: np.ndarray, tile_columns: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """A view encoded at T sub-column phases ([T, W, C]: phase t is the view turned by t / T of a token
    column, as `InferenceEncoder.encode_uint8_with_columns(..., phases=T)` encodes it; its seen pixel
    columns ``seen`` [W * 16] as placed at phase 0, None: all) against tiles [K, W, C] or at P phases
    [K, P, W, C] -> [K, W * F], F = lcm(P, T): the scores at headings 360 / (W * F) degrees apart, each the mean
    over the (view phase, tile phase) pairs that meet at that heading (P * T / F of them). The token grid
    cuts a view differently at each phase; the mean of several looks at one heading is steadier than any one
    (bench/RESULTS.md, "Views at sub-column phases")."""
    tiles = np.asarray(tile_columns, dtype=np.float32)
    view = np.asarray(view_columns, dtype=np.float32)
    if view.ndim != 3 or tiles.ndim not in (3, 4) or view.shape[1:] != tiles.shape[-2:]:
        raise ValueError(f"a view's column features at phases must be [T, W, C] with the tiles' [W, C], got "
                         f"{view.shape} against tiles {tiles.shape}")
    (view_phases, width, _), k = view.shape, tiles.shape[0]
    tile_phases = tiles.shape[1] if tiles.ndim == 4 else 1
    fine = math.lcm(tile_phases, view_phases)
    seen_at = [None] * view_phases if seen is None else _seen_at_phases(seen, width, view_phases)
    total = np.zeros((k, width * fine))
    count = np.zeros(width * fine)
    for t in range(view_phases):
        at_phase = alignment_scores(view[t], tiles, seen_at[t])  # [K, W * P]
        # tile phase p, shift s: heading s - p / P columns (`interleave_phases`); view phase t adds t / T
        heading = (np.arange(width * tile_phases) * (fine // tile_phases) + t * (fine // view_phases)) % (width * fine)
        total[:, heading] += at_phase
        count[heading] += 1
    return (total / count).astype(np.float32)  # every heading is met: gcd(F / P, F / T) = 1


def heading_count(view_columns: np.ndarray, tile_columns: np.ndarray) -> int:
    """How many headings `alignment_scores` of these shapes scores: W * lcm(P, T) for a view at T phases
    ([T, W, C], or [W, C]: 1) against tiles at P ([K, P, W, C], or [K, W, C]: 1)."""
    view_phases = np.shape(view_columns)[0] if np.ndim(view_columns) == 3 else 1
    tile_phases = np.shape(tile_columns)[1] if np.ndim(tile_columns) == 4 else 1
    return np.shape(view_columns)[-2] * math.lcm(view_phases, tile_phases)


def alignment_at(view_columns: np.ndarray, tile_columns: np.ndarray, seen: np.ndarray | None,
                 headings: np.ndarray) -> np.ndarray:
    """`alignment_scores(view_columns, tile_columns, seen)[:, headings]`, computed at those headings only: each a
    mean over the (view phase, tile phase) pairs that meet there, of one shift each (`view_phase_scores`), not of
    all W of every pair. A view of given heading needs a few of the W * lcm(P, T). Equal to float rounding: BLAS
    sums a matrix's edge rows in another order, so two identical tiles may differ in the last bit here."""
    tiles = np.asarray(tile_columns, dtype=np.float32)
    view = np.asarray(view_columns, dtype=np.float32)
    if tiles.ndim == 3:
        tiles = tiles[:, None]
    phased_view = view.ndim == 3
    if not phased_view:
        view = view[None]
    if view.ndim != 3 or tiles.ndim != 4 or view.shape[1:] != tiles.shape[2:]:
        raise ValueError(f"view columns [T, W, C] or [W, C] and tile columns [K, P, W, C] or [K, W, C] of the same "
                         f"[W, C], got {np.shape(view_columns)} and {np.shape(tile_columns)}")
    (view_phases, width, channels), (k, tile_phases) = view.shape, tiles.shape[:2]
    fine = math.lcm(view_phases, tile_phases)
    headings = np.asarray(headings, dtype=np.int64).reshape(-1)
    if len(headings) and not (0 <= headings.min() and headings.max() < width * fine):
        raise ValueError(f"headings must be in [0, {width * fine}), got {headings.min()}..{headings.max()}")
    keep = np.ones((view_phases, width), np.float32)
    if seen is not None:  # as alignment_scores and view_phase_scores read them
        at_phases = _seen_at_phases(seen, width, view_phases) if phased_view else [seen]
        keep = np.stack([_seen_token_columns(s, width) for s in at_phases]).astype(np.float32)
    keep /= np.maximum(keep.sum(axis=1, keepdims=True), 1.0)
    weighted = view * keep[:, :, None]  # [T, W, C]
    out = np.zeros((k, len(headings)), np.float32)
    for p in range(tile_phases):
        # heading j meets tile phase p and view phase t at shift s where s F = j + p F / P - t F / T (mod W F)
        columns, targets = [], []
        for t in range(view_phases):
            offset = headings + p * (fine // tile_phases) - t * (fine // view_phases)
            for i in np.flatnonzero(offset % fine == 0):
                # <view[w], tile[w + s]> summed over w: the tile's columns against the view rolled by s
                columns.append(np.roll(weighted[t], (offset[i] // fine) % width, axis=0).reshape(-1))
                targets.append(i)
        if columns:
            to_heading = np.zeros((len(columns), len(headings)), np.float32)
            to_heading[np.arange(len(columns)), targets] = 1.0
            out += (tiles[:, p].reshape(k, width * channels) @ np.stack(columns, axis=1)) @ to_heading
    # every heading is met by P * T / F pairs (gcd(F / P, F / T) = 1), as in view_phase_scores
    return out / (tile_phases * view_phases // fine)


def interleave_phases(scores):
    """Scores [..., P, W] at P sub-column phases (phase p: the tile turned by p / P of a column, its shift s
    at heading s - p / P columns) -> [..., W * P] at headings 360 / (W * P) degrees apart, in order.
    numpy or torch alike."""
    phases, width = scores.shape[-2:]
    fine = (np.arange(width)[None, :] * phases - np.arange(phases)[:, None]) % (width * phases)  # [P, W]
    order = np.argsort(fine.reshape(-1), kind="stable")
    return scores.reshape(*scores.shape[:-2], phases * width)[..., order]


def trained_tile_phases(net) -> int:
    """The sub-column phases a checkpoint's orientation head was trained to meet tiles at (`train_orientation`'s
    ``tile_phases``, kept in its provenance): an index for it is built at them. 1 without a head, for a head
    trained on the tiles as they are, and for a provenance that does not say."""
    if not net.config.orientation_dim:
        return 1
    phases = ((getattr(net, "provenance", None) or {}).get("orientation") or {}).get("tile_phases", 1)
    return phases if isinstance(phases, int) and not isinstance(phases, bool) and phases >= 1 else 1


def phase_step(width_px: int, width: int, phases: int) -> int:
    """Pixels a polar tile of ``width_px`` pixel columns and ``width`` token columns is rolled by from one of
    ``phases`` sub-column phases to the next; a ValueError where they do not split evenly."""
    step, rest = divmod(width_px, width * phases)
    if rest or step == 0:
        raise ValueError(f"{phases} phases of {width}-column tiles need their {width_px} pixels to be a "
                         f"multiple of {width * phases}")
    return step


def phase_columns(encode_columns, polar_tiles: torch.Tensor, phases: int,
                  first: np.ndarray | None = None) -> np.ndarray:
    """Column features of polar tiles (uint8 [N, 3, H, W_px]) at ``phases`` sub-column phases -> [N, P, W, C]:
    phase p is the tile turned by p / P of a token column (its polar image rolled by `phase_step` * p
    pixels). A view of unknown heading meets its tile's columns at any fraction of a column; a tile
    seen at a phase near that fraction aligns better (bench/RESULTS.md, "Tiles at sub-column phases").
    ``encode_columns``: tiles -> their column features [N, W, C]; ``first``: phase 0's, if known."""
    first = np.asarray(encode_columns(polar_tiles) if first is None else first)
    if phases == 1:
        return first[:, None]
    step = phase_step(polar_tiles.shape[-1], first.shape[1], phases)
    turned = (np.asarray(encode_columns(torch.roll(polar_tiles, p * step, dims=-1))) for p in range(1, phases))
    return np.stack([first, *turned], axis=1)


def estimate_headings(view_columns: np.ndarray, tile_columns: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """One view's column features [W, C] against several tiles' [K, W, C] or [K, P, W, C] (at sub-column
    phases, `alignment_scores`) (its seen pixel columns
    ``seen`` [W * 16] or token columns [W], None: all) -> the view's heading at each tile, degrees
    clockwise from north of the view's centre column, as if it stood at that tile."""
    from .views import refine_headings

    return refine_headings(alignment_scores(view_columns, tile_columns, seen))


# Re-ranking by column alignment (tuned on the training region's held-out pairs: bench/rerank.py). Both were
# tuned for a head of the shipped kind (rows side by side through a hidden layer, trained with --retrieval;
# a3ae53bc8291dcfd) and kept for the shipped one, retrained with more photo outlines; the linear heads
# before them had K = 50 and w = 0.8, the first one, trained for headings only, w = 0.5.
RERANK_CANDIDATES = 200  # the best this many tiles by descriptor are re-ranked
# A view of given heading is aligned at the few headings near it alone (`alignment_at`: 5 of 64 at 4 phases), so
# four times the candidates cost about what 200 aligned all round did (less at 4 phases, 0.6 ms more at 1); its
# descriptor, one look at a limited view, often ranks its tile below 200 (chosen on the training region's held-out
# blocks: bench/RESULTS.md, "More candidates for a given heading"). A reach wider than GIVEN_REACH_MAX_DEG leaves
# few headings out, so such a view is re-ranked as a searched one.
RERANK_CANDIDATES_GIVEN = 800
GIVEN_REACH_MAX_DEG = 30.0
RERANK_WEIGHT = 0.9  # share of the column alignment in the re-ranking score
# A view placed at a given heading is aligned only at the shifts within this many degrees of it (and always the
# nearest): at 16 columns, 22.5 degrees apart, the given heading's own column; with tiles at 4 sub-column phases,
# 5.6 degrees apart, it and the phases either side, which forgive a compass's error (bench/RESULTS.md, "A given
# heading in the re-rank"). A look-alike that matches when turned away from the given heading no longer competes.
HEADING_WITHIN_DEG = 10.0


def rerank_candidates(within_deg: float | None) -> int:
    """How many of a view's best tiles by descriptor are re-ranked: RERANK_CANDIDATES_GIVEN for a view placed at
    a given heading trusted to ``within_deg`` up to GIVEN_REACH_MAX_DEG, RERANK_CANDIDATES for one whose heading is
    searched (None) or trusted less."""
    narrow = within_deg is not None and within_deg <= GIVEN_REACH_MAX_DEG
    return RERANK_CANDIDATES_GIVEN if narrow else RERANK_CANDIDATES


def shifts_within(shifts: int, within_deg: float) -> np.ndarray:
    """[shifts] bool: the circular shifts (shift s turns a view by s * 360 / shifts degrees) within
    ``within_deg`` of no turn, the nearest (shift 0) always among them; 180: every shift."""
    from .views import angle_difference

    if not 0.0 <= within_deg <= 180.0:
        raise ValueError(f"within_deg must be in [0, 180], got {within_deg}")
    allowed = angle_difference(np.arange(shifts) * 360.0 / shifts, 0.0) <= within_deg + 1e-9
    allowed[0] = True
    return allowed


class Reranked(NamedTuple):
    """Candidates re-ranked by `rerank`; every array is in the new order, best first."""

    order: np.ndarray  # [K] int: position of each in the candidate list given
    scores: np.ndarray  # [K] the combined score (1 - weight) * descriptor score + weight * alignment
    alignment: np.ndarray  # [K] the best column alignment of the view at each (mean cosine over its seen columns)
    headings: np.ndarray  # [K] the view's heading at each, degrees clockwise from north (`estimate_headings`)


def rerank(scores: np.ndarray, view_columns: np.ndarray, tile_columns: np.ndarray, seen: np.ndarray | None = None,
           weight: float = RERANK_WEIGHT, within_deg: float | None = None) -> Reranked:
    """Re-rank a view's candidate tiles (descriptor scores [K], e.g. a search's best K; their column
    features [K, W, C], or [K, P, W, C] at sub-column phases: `alignment_scores`) by how well the view's
    columns [W, C] align with each tile's at the best circular shift: score = (1 - weight) * descriptor
    score + weight * alignment, both cosines, so the score stays in [-1, 1]. A descriptor nearly blind
    to the heading can not tell a place from one that looks alike in another direction; the alignment
    sees where things are around the camera. ``within_deg``: the view was placed at a given heading, trusted
    to that many degrees (`shifts_within`): only those shifts count, and the headings are corrections within
    them; None: the heading is searched all round. Returns the new order with each candidate's score,
    alignment and the view's heading there."""
    from .views import refine_headings

    descriptor = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if len(descriptor) != len(tile_columns):
        raise ValueError(f"{len(descriptor)} scores for {len(tile_columns)} candidates' column features")
    if len(descriptor) == 0:
        empty = np.empty(0)
        return Reranked(np.empty(0, np.int64), empty, empty, empty)
    count = heading_count(view_columns, tile_columns)
    allowed = None if within_deg is None else shifts_within(count, within_deg)
    needed = None if allowed is None else allowed | np.roll(allowed, 1) | np.roll(allowed, -1)  # and to refine
    if needed is None or needed.all():
        shifts = alignment_scores(view_columns, tile_columns, seen)  # [K, headings]
    else:  # a given heading: the few headings near it alone (the others never count)
        shifts = np.full((len(descriptor), count), -np.inf, np.float32)
        shifts[:, needed] = alignment_at(view_columns, tile_columns, seen, np.flatnonzero(needed))
    alignment = (shifts if allowed is None else shifts[:, allowed]).max(axis=1).astype(np.float64)
    combined = (1.0 - weight) * descriptor + weight * alignment
    order = np.argsort(-combined, kind="stable")  # ties keep the descriptor's order
    return Reranked(order, combined[order], alignment[order], refine_headings(shifts[order], allowed))


# --------------------------------------------------------------------------- training

def _column_features(model, branch: str, views: np.ndarray, rows: bool,
                     batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen branch's final tokens of uint8 views [N, H, W, 3] by column (`column_tokens`) and
    the views' descriptors (unit class tokens) [N, D]."""
    from .preprocess import normalize_uint8_batch

    grid = model.config.grid(branch)
    transformer = getattr(model, branch).transformer
    columns, descriptors = [], []
    with torch.inference_mode():
        for s in range(0, len(views), batch_size):
            tokens = transformer(normalize_uint8_batch(views[s:s + batch_size]))
            columns.append(column_tokens(tokens, grid, rows))
            descriptors.append(F.normalize(tokens[:, 0].float(), dim=-1))
    return torch.cat(columns), torch.cat(descriptors)


def _heading_logits(g: torch.Tensor, a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Views' column features [B, W, C] (valid-column weights ``keep`` [B, W], each row summing to 1)
    against their own tiles' at P phases [B, P, W, C] -> [B, W * P]: each view's alignment at each
    heading 360 / (W * P) degrees apart (`interleave_phases`)."""
    views = g[:, None]
    shifts = [((views * torch.roll(a, -s, dims=2)).sum(dim=3) * keep[:, None]).sum(dim=2) for s in range(g.shape[1])]
    return interleave_phases(torch.stack(shifts, dim=2))


def _tile_logits(g: torch.Tensor, a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Views' column features [A, W, C] (valid-column weights ``keep`` [A, W], each row summing to 1)
    against tiles' [T, P, W, C] -> [A, T, P * S]: each view's alignment with each tile at each phase and shift."""
    return torch.stack([(torch.einsum("awc,tpwc->atpw", g, torch.roll(a, -s, dims=2))
                         * keep[:, None, None, :]).sum(dim=3) for s in range(g.shape[1])], dim=3).flatten(2)


def train_orientation(checkpoint: Path, data: Path, out: Path, *, pairs: int = 4000, rotations: int = 4,
                      fov_augment: float = 0.6, fov_range: tuple[float, float] = (60.0, 240.0), dim: int = 64,
                      steps: int = 800, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, workers: int = 2,
                      dataset: str = "synthetic", split: str = "train", holdout: float = 0.1,
                      retrieval: float = 0.0, negatives: int = 3, neighbours: int = 20, photo_share: float = 0.0,
                      photo_fov_range: tuple[float, float] = (60.0, 100.0), photo_tilt: float = 0.0,
                      rows: bool = False, hidden: int = 0, schedule: str = "constant",
                      centre_jitter: float = 0.0, tile_phases: int = 1, photo_map: bool = False) -> dict:
    """Train an orientation head on the frozen network of ``checkpoint`` with ``pairs`` pairs of
    ``data``, each panorama turned to ``rotations`` random headings (a share ``fov_augment`` of them
    cut to a random field of view); write the network with the head to ``out``.

    The loss finds each view's heading at its own tile (cross-entropy over the shifts). With
    ``retrieval`` > 0 it also tells the view's tile from look-alikes, as `rerank` needs: each view's
    best alignment (over the shifts) with its tile against that with ``negatives`` tiles drawn from
    its ``neighbours`` nearest by descriptor (and the batch's other tiles), a cross-entropy weighted
    ``retrieval``. A share ``photo_share`` of the cut views is a level 4:3 photo's outline instead
    (`model.views.limit_photo`, its horizontal field from ``photo_fov_range``), as a phone photo is placed;
    with ``photo_tilt`` > 0 its camera had a pitch and a roll, each uniform in +-photo_tilt degrees, and
    it is placed as if level (`model.views.tilt_view`), as a photo whose tilt is neither sent nor estimated.
    ``rows`` and ``hidden``: the head's kind (`OrientationHead`); ``schedule``: the learning rate stays
    at ``lr`` (constant) or decays to 0 over the steps (cosine). ``centre_jitter`` > 0: each heading of a
    view meets its own polar view of the tile, centred a random distance from the camera (uniform over a
    disc of radius ``centre_jitter`` x the tile's side, `model.train.off_centre_polar`), as a camera
    between the views of an index cut every few metres (index_build tile --centres-m) meets the nearest;
    the held-out numbers are then measured on such off-centre views too. ``tile_phases`` > 1: each tile is
    also met at that many sub-column phases (`phase_columns`), as an index built ``--tile-phases`` holds it,
    and the heading is found among W x P shifts (the held-out numbers too). ``photo_map``: keep the
    checkpoint's head as it is and give it a ground map for phone photos (`OrientationHead.photo`), started
    from its ground map and trained on photo outlines alone (every view one: ``fov_augment`` and
    ``photo_share`` are 1) against its frozen aerial map, so that the tiles' column features, and any
    index built with the checkpoint's head, stay as they are (``rows``, ``hidden`` and ``dim`` are the
    head's); the held-out numbers are then the photo map's, beside the ground map's on the same views."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be constant or cosine, got {schedule!r}")
    if not 0.0 <= photo_tilt <= 30.0:
        raise ValueError(f"photo_tilt must be within 0..30 degrees, got {photo_tilt:g}")
    from tqdm import tqdm

    from .checkpoint import load_checkpoint, save_checkpoint
    from .train import (MAX_CENTRE_JITTER, TrainingError, check_off_centre_inputs, jitter_tile_side, load_pair_arrays,
                        off_centre_polar, read_records)

    if not 0.0 <= centre_jitter <= MAX_CENTRE_JITTER:
        raise ValueError(f"centre_jitter must be within 0..{MAX_CENTRE_JITTER:g} of the tile's side, "
                         f"got {centre_jitter:g}")
    if tile_phases > 1 and centre_jitter:
        raise TrainingError("tile phases and a centre jitter can not be combined (each heading meets its own "
                            "off-centre polar view, at phase 0)")
    from .views import angle_difference, limit_fov, limit_photo, refine_headings, rotate_view, tilt_view

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = load_checkpoint(checkpoint).eval()
    width = net.config.grid("ground")[1]
    try:  # refused before the pairs are read
        phase_step(net.config.aerial_size[1], width, tile_phases)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    if photo_map:
        if not net.config.orientation_dim:
            raise TrainingError(f"{checkpoint} has no orientation head to give a photo map (train one first)")
        dim, rows, hidden = net.config.orientation_dim, net.config.orientation_rows, net.config.orientation_hidden
        fov_augment, photo_share = 1.0, 1.0
        head_phases = trained_tile_phases(net)
        if tile_phases != head_phases:
            raise TrainingError(f"{checkpoint}'s head meets tiles at {head_phases} sub-column phases and its photo "
                                f"map must too (an index built with it holds them): tile phases {head_phases}, "
                                f"not {tile_phases}")
    config = net.config.replace(orientation_dim=dim, orientation_rows=rows, orientation_hidden=hidden,
                                orientation_photo=photo_map)  # a new head's aerial map would leave a photo map behind
    records = read_records(dataset, data, split)
    records = [records[i] for i in np.sort(rng.permutation(len(records))[:pairs])]
    n_train, least = int(len(records) * (1 - holdout)), 2 if retrieval > 0 else 1
    if n_train < least or n_train == len(records):
        raise TrainingError(f"{len(records)} pairs ({split} of {data}) leave {n_train} to train the head on and "
                            f"{len(records) - n_train} to test it on; it needs at least {least} and 1 (more --pairs)")
    if centre_jitter:
        check_off_centre_inputs(net.config, records)
    arrays = load_pair_arrays(records, net.config, "preprocess", workers=workers,
                              tile_side=jitter_tile_side(net.config) if centre_jitter else None)
    n = len(records)
    headings = rng.uniform(0.0, 360.0, (n, rotations))
    fovs = np.where(rng.random((n, rotations)) < fov_augment, rng.uniform(*fov_range, (n, rotations)), 360.0)
    photo = np.zeros((n, rotations), bool)
    if photo_share > 0:  # drawn only then: without photos, a seed draws what it always did
        photo = (fovs < 360.0) & (rng.random((n, rotations)) < photo_share)
        fovs = np.where(photo, rng.uniform(*photo_fov_range, (n, rotations)), fovs)
    tilts = rng.uniform(-photo_tilt, photo_tilt, (n, rotations, 2)) if photo_tilt > 0 else None  # drawn last

    def cut(i: int, r: int) -> np.ndarray:
        view = rotate_view(arrays.ground[i], headings[i, r])
        if not photo[i, r]:
            return limit_fov(view, fovs[i, r])
        return limit_photo(tilt_view(view, *tilts[i, r]) if tilts is not None else view, fovs[i, r])

    def polar_views(shifted: torch.Generator) -> np.ndarray:
        """The tiles' polar views, each centred a random distance from its camera (uint8 [N, H, W, 3])."""
        return np.concatenate([(off_centre_polar(arrays.aerial[s:s + 256], net.config, centre_jitter, shifted)
                                .mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
                               for s in range(0, n, 256)])

    t0 = time.perf_counter()
    if centre_jitter:  # one polar view a heading: aerial [N, R, 1, W, D], descriptors [N, R, D]
        shifted = torch.Generator().manual_seed(seed)
        copies = [_column_features(net, "aerial", polar_views(shifted), rows) for _ in range(rotations)]
        aerial = torch.stack([c[0] for c in copies], dim=1)[:, :, None]
        aerial_descriptors = torch.stack([c[1] for c in copies], dim=1)
        del copies
    else:  # aerial [N, 1, P, W, D]: the tiles at their phases as an index holds them (`phase_columns`)
        aerial, aerial_descriptors = _column_features(net, "aerial", arrays.aerial, rows)
        aerial = torch.as_tensor(phase_columns(
            lambda tiles: _column_features(net, "aerial", tiles.permute(0, 2, 3, 1).numpy(), rows)[0],
            torch.from_numpy(arrays.aerial).permute(0, 3, 1, 2), tile_phases, first=aerial.numpy()))
        aerial, aerial_descriptors = aerial[:, None], aerial_descriptors[:, None]
    turned = [_column_features(net, "ground", np.stack([cut(i, r) for i in range(n)]), rows) for r in range(rotations)]
    ground = torch.stack([t[0] for t in turned], dim=1)  # [N, R, Wg, D]
    ground_descriptors = torch.stack([t[1] for t in turned], dim=1)  # [N, R, D]
    valid = torch.as_tensor(np.stack([[valid_columns(width, f) for f in row] for row in fovs]), dtype=torch.float32)
    features_s = time.perf_counter() - t0
    head = OrientationHead.for_config(config)
    scale = nn.Parameter(torch.tensor(3.0))  # log of the logits' scale
    view_map = "photo" if photo_map else "ground"
    if photo_map:  # the rest of the head frozen; the tiles' features computed once
        head.load_state_dict(net.orientation.state_dict(), strict=False)
        head.photo.load_state_dict(net.orientation.ground.state_dict())
        for name, module in head.named_children():
            module.requires_grad_(name == "photo")
        with torch.no_grad():
            aerial = torch.cat([head.project(aerial[s:s + 512], "aerial") for s in range(0, len(aerial), 512)])
        project_aerial = lambda tiles: tiles  # noqa: E731
    else:
        project_aerial = lambda tiles: head.project(tiles, "aerial")  # noqa: E731
    optimizer = torch.optim.Adam([q for q in head.parameters() if q.requires_grad] + [scale], lr=lr)
    targets = torch.as_tensor(heading_targets(headings, width * tile_phases))
    train_rows = np.arange(n)[: int(n * (1 - holdout))]
    if retrieval > 0:  # each view's nearest training tiles by descriptor (the first polar view's), its own left
        # out: the look-alikes
        sims = ground_descriptors[train_rows] @ aerial_descriptors[train_rows, 0].T  # [n_train, R, n_train]
        sims[np.arange(len(train_rows)), :, np.arange(len(train_rows))] = -np.inf
        hard = train_rows[sims.topk(min(neighbours, len(train_rows) - 1), dim=2).indices.numpy()]  # [n_train, R, M]
        tile_scale = nn.Parameter(torch.tensor(3.0))
        optimizer.add_param_group({"params": [tile_scale]})
    for step in tqdm(range(steps), desc="train head", unit="step", dynamic_ncols=True):
        b = rng.choice(train_rows, batch_size)
        r = rng.integers(0, rotations, batch_size)
        copy = r % aerial.shape[1]
        g, a = head.project(ground[b, r], view_map), project_aerial(aerial[b, copy])
        keep = valid[b, r] / valid[b, r].sum(dim=1, keepdim=True).clamp(min=1)
        logits = _heading_logits(g, a, keep) * scale.exp()
        loss = F.cross_entropy(logits, targets[b, r])
        if retrieval > 0:  # b indexes train_rows' first rows, which are train_rows themselves
            picks = hard[b, r][np.arange(batch_size)[:, None], rng.integers(0, hard.shape[2], (batch_size, negatives))]
            tiles = np.concatenate([b, picks.reshape(-1)])
            tiles_copy = np.concatenate([copy, np.repeat(copy, negatives)])  # each negative as its view's heading
            aligned = (_tile_logits(g, project_aerial(aerial[tiles, tiles_copy]), keep).amax(dim=2)
                       * tile_scale.exp())
            same = torch.as_tensor(tiles[None, :] == b[:, None])  # a tile twice in the batch: not a negative
            same[np.arange(batch_size), np.arange(batch_size)] = False
            loss = loss + retrieval * F.cross_entropy(aligned.masked_fill(same, float("-inf")),
                                                      torch.arange(batch_size))
        optimizer.zero_grad()
        loss.backward()
        if schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        optimizer.step()
    test = np.arange(n)[int(n * (1 - holdout)):]
    with torch.no_grad():
        errors, full = [], []
        for r in range(rotations):
            a = project_aerial(aerial[test, r % aerial.shape[1]])
            g = head.project(ground[test, r], view_map)
            seen = valid[test, r].numpy() > 0
            scores = interleave_phases(np.stack([shift_scores(g, a[:, p], seen) for p in range(a.shape[1])], axis=1))
            estimate = refine_headings(scores)
            errors.append(angle_difference(estimate, headings[test, r]))
            full.append(fovs[test, r] >= 360)
    errors, full = np.concatenate(errors), np.concatenate(full)
    with torch.no_grad():  # among the held-out tiles: the best by descriptor, and after `rerank`
        reranked_by = {"rerank": view_map, **({"rerank_ground_map": "ground"} if photo_map else {})}
        hits = {"descriptor": [], **{how: [] for how in reranked_by}}
        for r in range(rotations):
            a = project_aerial(aerial[test, r % aerial.shape[1]]).numpy()
            maps = {how: head.project(ground[test, r], name).numpy() for how, name in reranked_by.items()}
            sims = (ground_descriptors[test, r] @ aerial_descriptors[test, r % aerial.shape[1]].T).numpy()
            for i, row in enumerate(sims):
                top = np.argsort(-row, kind="stable")[:neighbours]
                hits["descriptor"].append(top[0] == i)
                for how, g in maps.items():
                    hits[how].append(top[rerank(row[top], g[i], a[top], valid[test[i], r].numpy() > 0).order[0]] == i)
    report = {"pairs": n, "held_out": len(test), "features_s": round(features_s, 1), "final_loss": float(loss.detach()),
              "heading_error_median_deg_360": float(np.median(errors[full])) if full.any() else None,
              "heading_error_median_deg_limited": float(np.median(errors[~full])) if (~full).any() else None,
              "within_10deg": float((errors <= 10).mean()),
              **{f"held_out_r1_{how}_{kind}": float(np.mean(np.asarray(h)[mask])) if mask.any() else None
                 for how, h in hits.items() for kind, mask in (("360", full), ("limited", ~full))}}
    model = type(net)(config)
    missing = model.load_state_dict(net.state_dict(), strict=False).missing_keys
    assert all(k.startswith("orientation.") for k in missing), missing
    model.orientation.load_state_dict(head.state_dict())
    inherited = {key: value for key, value in (getattr(net, "provenance", None) or {}).items()
                 if photo_map or key != "orientation_photo"}  # a new head leaves the photo map behind
    provenance = {**inherited,  # a photo map: the head's record kept beside its own
                  ("orientation_photo" if photo_map else "orientation"): {
                                  "data": str(data), "pairs": n, "rotations": rotations, "fov_augment": fov_augment,
                                  "steps": steps, "seed": seed, "init": checkpoint.name, "retrieval": retrieval,
                                  "negatives": negatives, "neighbours": neighbours, "rows": rows, "hidden": hidden,
                                  "schedule": schedule, **({"photo_map": True} if photo_map else {}),
                                  **({"photo_share": photo_share, "photo_fov_range": list(photo_fov_range)}
                                     if photo_share > 0 else {}),
                                  **({"photo_tilt": photo_tilt} if photo_tilt > 0 else {}),
                                  **({"centre_jitter": centre_jitter} if centre_jitter > 0 else {}),
                                  **({"tile_phases": tile_phases} if tile_phases > 1 else {}), **report}}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out, metadata=provenance)
    return report


def main(argv: list[str] | None = None) -> int:
    from .arguments import non_negative_int, number, output_file, positive_int
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .preprocess import ImageDecodeError
    from .train import MAX_CENTRE_JITTER, HelpFormatter, TrainingError

    p = argparse.ArgumentParser(prog="python -m model.orientation", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="the trained network (.safetensors)")
    p.add_argument("--data", required=True, type=Path, help="a training world (worldgen) or data set root")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "cvusa", "cvact"], help="layout of --data")
    p.add_argument("--split", default="train", help="split whose pairs train the head")
    p.add_argument("--out", required=True, type=output_file, help="checkpoint to write: the network plus the head")
    p.add_argument("--pairs", type=positive_int, default=4000, help="pairs used (a random sample of the split)")
    p.add_argument("--rotations", type=positive_int, default=4, help="random headings per panorama")
    p.add_argument("--fov-augment", type=number(0, 1), default=0.6,
                   help="share of the views cut to a random field of view of 60-240 degrees")
    p.add_argument("--photo-share", type=number(0, 1), default=0.0,
                   help="share of the cut views that are a level 4:3 phone photo's outline instead of a crop")
    p.add_argument("--photo-fov", type=number(above=0, below=180), nargs=2, default=(60.0, 100.0),
                   metavar=("MIN", "MAX"),
                   help="a photo's horizontal field of view, degrees (uniform)")
    p.add_argument("--photo-tilt", type=number(0, 30), default=0.0, metavar="DEG",
                   help="a photo's pitch and roll, each uniform in +-DEG, placed as if level (as a photo whose tilt is "
                        "neither sent nor estimated; default 0: level photos)")
    p.add_argument("--centre-jitter", type=number(0, MAX_CENTRE_JITTER), default=0.0, metavar="F",
                   help="each heading meets a polar view of its tile centred up to F x the tile's side from the "
                        "camera (uniform over the disc), as a camera between the views of an index_build tile "
                        "--centres-m index meets the nearest (0.07: views every 10 m of 100 m tiles)")
    p.add_argument("--tile-phases", type=positive_int, default=1, metavar="P",
                   help="each tile is also met at P sub-column phases, as an index_build build --tile-phases P "
                        "index holds it, and the heading is found among 16 x P shifts (1: phase 0 only)")
    p.add_argument("--dim", type=positive_int, default=64, help="width of a column feature")
    p.add_argument("--rows", action="store_true",
                   help="the head reads each column's token rows side by side instead of their mean")
    p.add_argument("--hidden", type=non_negative_int, default=0,
                   help="width of the head's hidden GELU layer (0: linear)")
    p.add_argument("--photo-map", action="store_true",
                   help="keep --checkpoint's head and give it a second ground map for phone photos, started from "
                        "its ground map and trained on photo outlines alone (every view one: --fov-augment and "
                        "--photo-share are 1) against its frozen aerial map, so tiles' column features (and "
                        "indexes built with its head) stay as they are; --rows, --hidden and --dim are the head's, "
                        "--tile-phases must be the head's"),
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate: constant, or decayed to 0 over the steps")
    p.add_argument("--steps", type=positive_int, default=800, help="optimisation steps of --batch-size views")
    p.add_argument("--batch-size", type=positive_int, default=64, help="views per step")
    p.add_argument("--lr", type=number(above=0), default=3e-3, help="Adam learning rate")
    p.add_argument("--retrieval", type=number(0), default=0.0,
                   help="weight of the loss that tells a view's tile from look-alikes by column alignment (0: off)")
    p.add_argument("--negatives", type=positive_int, default=3,
                   help="with --retrieval: look-alike tiles per view in a batch")
    p.add_argument("--neighbours", type=positive_int, default=20,
                   help="look-alikes are drawn from each view's this many nearest tiles by descriptor")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the sample, headings and head initialisation")
    p.add_argument("--workers", type=non_negative_int, default=2, help="decoding threads")
    args = p.parse_args(argv)
    if args.photo_fov[0] > args.photo_fov[1]:
        p.error(f"argument --photo-fov: MIN {args.photo_fov[0]:g} is above MAX {args.photo_fov[1]:g}")
    try:
        report = train_orientation(args.checkpoint, args.data, args.out, pairs=args.pairs, rotations=args.rotations,
                                   fov_augment=args.fov_augment, dim=args.dim, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, workers=args.workers,
                                   dataset=args.dataset, split=args.split, retrieval=args.retrieval,
                                   negatives=args.negatives, neighbours=args.neighbours,
                                   photo_share=args.photo_share, photo_fov_range=tuple(args.photo_fov),
                                   photo_tilt=args.photo_tilt, centre_jitter=args.centre_jitter,
                                   tile_phases=args.tile_phases,
                                   rows=args.rows, hidden=args.hidden, schedule=args.schedule,
                                   photo_map=args.photo_map)
    except (CheckpointError, ConfigError, TrainingError, ImageDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: heading error on {report['held_out']} held-out pairs, median "
          f"{report['heading_error_median_deg_360']} deg (360 degree views), "
          f"{report['heading_error_median_deg_limited']} deg (limited views); within 10 deg "
          f"{report['within_10deg'] * 100:.1f}%")
    pct = lambda v: "-" if v is None else f"{v * 100:.1f}%"  # noqa: E731
    print(f"held-out top-1 among the held-out tiles, by descriptor / after the re-rank: 360 degree views "
          f"{pct(report['held_out_r1_descriptor_360'])} / {pct(report['held_out_r1_rerank_360'])}, limited views "
          f"{pct(report['held_out_r1_descriptor_limited'])} / {pct(report['held_out_r1_rerank_limited'])}")
    if args.photo_map:
        print(f"re-ranked with the ground map instead, on the same photo outlines: "
              f"{pct(report['held_out_r1_rerank_ground_map_limited'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


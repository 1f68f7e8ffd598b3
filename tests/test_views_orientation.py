"""Limited views and headings, model side: turning views, fields of view, rotation search, the
orientation head, match confidence, the training augmentation and model.evaluate's view modes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import L2LTR, save_checkpoint
from model.views import (MEAN_RGB, angle_difference, fov_columns, limit_fov, match_over_rotations, place_view,
                         refine_heading, rotate_view, rotation_headings)


def _panorama(h: int = 8, w: int = 32) -> np.ndarray:
    """[h, w, 3] uint8 whose red channel numbers the columns (column c looks at azimuth 180 + 360 c / w)."""
    view = np.zeros((h, w, 3), np.uint8)
    view[..., 0] = np.arange(w)[None, :]
    view[..., 1] = 100
    return view


def test_a_view_turned_to_a_heading_is_centred_there_and_turns_back():
    north = _panorama()
    east = rotate_view(north, 90.0)
    # the centre column of the turned view is the column of the north-aligned one that looks east
    assert east[0, 16, 0] == north[0, 24, 0]  # 24 = 16 + 90/360 * 32
    assert np.array_equal(rotate_view(east, -90.0), north)
    assert np.array_equal(rotate_view(north, 360.0), north)


def test_a_field_of_view_keeps_its_centre_columns_and_rows():
    assert fov_columns(32, 90.0).sum() == 8 and fov_columns(32, 90.0)[12:20].all()
    cut = limit_fov(_panorama(), 90.0, vfov_deg=90.0)
    kept = ~(cut == MEAN_RGB).all(axis=-1)
    assert kept.sum() == 8 * 4 and kept[2:6, 12:20].all()  # rows within +-45 degrees of the horizon
    assert np.array_equal(limit_fov(_panorama(), 360.0), _panorama())
    with pytest.raises(ValueError, match="fov_deg"):
        limit_fov(_panorama(), 0.0)


def test_rotation_search_finds_the_best_turn_and_headings_refine_between_them():
    rotated = np.zeros((4, 3, 2), np.float32)  # 4 turns of 3 tiles, 2-d descriptors
    rotated[2, 1] = [1.0, 0.0]
    scores, best = match_over_rotations(np.array([[1.0, 0.0]], np.float32), rotated)
    assert scores[0, 1] == 1.0 and best[0, 1] == 2
    assert list(rotation_headings(4)) == [0.0, 90.0, 180.0, 270.0]
    assert refine_heading([0.1, 0.5, 0.9, 0.5]) == pytest.approx(180.0)
    assert 90.0 < refine_heading([0.1, 0.8, 0.9, 0.3]) < 180.0  # between the two best
    assert refine_heading([0.9, 0.1, 0.1, 0.8]) > 315.0 or refine_heading([0.9, 0.1, 0.1, 0.8]) < 1e-6
    assert angle_difference(350.0, 10.0) == 20.0 and angle_difference(90.0, 270.0) == 180.0


def test_shift_scores_and_estimated_headings_follow_the_turn():
    from model.orientation import estimate_headings, shift_scores, valid_columns

    rng = np.random.default_rng(0)
    tile = rng.standard_normal((16, 8)).astype(np.float32)
    tile /= np.linalg.norm(tile, axis=1, keepdims=True)
    for turn in (0, 3, 11):
        view = np.roll(tile, -turn, axis=0)  # the view at heading turn * 22.5 sees tile column w + turn at w
        assert int(np.argmax(shift_scores(view[None], tile[None])[0])) == turn
        assert angle_difference(estimate_headings(view, tile[None])[0], turn * 22.5) <= 5.0  # 359.99 is near 0
    seen = valid_columns(16, 90.0)
    assert seen.sum() == 4 and seen[6:10].all()
    half = np.roll(tile, -5, axis=0) * seen[:, None]  # only the seen columns carry the view
    assert estimate_headings(half, tile[None], seen)[0] == pytest.approx(5 * 22.5, abs=5.0)  # within a column
    # a 20 degree view (the API's narrowest) covers 14 pixels, 7 in each of two token columns: those two
    # carry it (no column half seen left none: every heading scored 0 and the answer was north)
    narrow = valid_columns(16, 20.0)
    assert np.flatnonzero(narrow).tolist() == [7, 8]
    sliver = np.roll(tile, -5, axis=0) * narrow[:, None]
    assert estimate_headings(sliver, tile[None], narrow)[0] == pytest.approx(5 * 22.5, abs=5.0)
    assert not valid_columns(16, 0.0).any()  # nothing seen: no column


def _unit(rng, *shape) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_rerank_lifts_the_candidate_whose_columns_align_and_says_its_heading():
    from model.orientation import rerank, valid_columns

    rng = np.random.default_rng(3)
    tiles = _unit(rng, 6, 16, 64)  # 6 candidates, 16 columns of 64-d features
    descriptor = np.array([0.90, 0.88, 0.86, 0.84, 0.70, 0.82])  # the true tile (4) is fifth by descriptor
    seen = valid_columns(16, 90.0)  # a 90 degree view: 4 token columns
    view = np.roll(tiles[4], -5, axis=0) * seen[:, None]  # seen at heading 5 columns = 112.5 degrees
    result = rerank(descriptor, view, tiles, seen, weight=0.5)
    assert result.order[0] == 4 and sorted(result.order.tolist()) == list(range(6))
    assert result.alignment[0] == pytest.approx(1.0, abs=1e-5)
    assert result.headings[0] == pytest.approx(112.5, abs=1.0)
    assert result.scores[0] == pytest.approx(0.5 * 0.70 + 0.5 * 1.0, abs=1e-5)
    assert np.all(np.diff(result.scores) <= 0) and np.all(np.abs(result.scores) <= 1.0)
    # every candidate keeps its own heading and alignment through the new order
    for rank, j in enumerate(result.order):
        one = rerank(descriptor[j:j + 1], view, tiles[j:j + 1], seen, weight=0.5)
        assert one.headings[0] == pytest.approx(result.headings[rank])
        assert one.alignment[0] == pytest.approx(result.alignment[rank])
    # pixel columns (16 per token column) are read as the token columns they cover
    pixels = np.repeat(seen, 16)
    assert rerank(descriptor, view, tiles, pixels, weight=0.5).order.tolist() == result.order.tolist()
    # weight 0: the descriptor order; a view that matches none of them leaves the best descriptor first
    assert rerank(descriptor, view, tiles, seen, weight=0.0).order.tolist() == [0, 1, 2, 3, 5, 4]
    stranger = np.roll(_unit(rng, 16, 64), -5, axis=0) * seen[:, None]
    assert rerank(descriptor, stranger, tiles, seen, weight=0.5).order[0] == 0


def test_a_given_heading_keeps_the_alignment_to_the_shifts_near_it():
    from model.orientation import rerank, shifts_within, valid_columns

    assert np.flatnonzero(shifts_within(16, 15.0)).tolist() == [0]  # 22.5 degrees apart: its own column only
    assert np.flatnonzero(shifts_within(16, 22.5)).tolist() == [0, 1, 15]
    assert np.flatnonzero(shifts_within(64, 12.0)).tolist() == [0, 1, 2, 62, 63]
    assert shifts_within(16, 0.0).sum() == 1 and shifts_within(16, 180.0).all()
    with pytest.raises(ValueError, match="within_deg"):
        shifts_within(16, 181.0)
    rng = np.random.default_rng(5)
    tiles = _unit(rng, 2, 16, 64)
    seen = valid_columns(16, 90.0)
    near = np.roll(tiles[0], -1, axis=0) * seen[:, None]  # tile 0 seen turned by one column (22.5 degrees)
    view = 0.6 * near + 0.4 * np.roll(tiles[1], -6, axis=0) * seen[:, None]  # tile 1 looks alike six columns away
    descriptor = np.array([0.5, 0.5])
    searched = rerank(descriptor, view, tiles, seen)
    assert searched.order[0] == 0 and searched.headings[0] == pytest.approx(22.5, abs=1.0)
    far = rerank(descriptor, 0.4 * near + 0.6 * np.roll(tiles[1], -6, axis=0) * seen[:, None], tiles, seen)
    assert far.order[0] == 1 and far.headings[0] == pytest.approx(135.0, abs=1.0)  # searched: the look-alike wins
    given = rerank(descriptor, 0.4 * near + 0.6 * np.roll(tiles[1], -6, axis=0) * seen[:, None], tiles, seen,
                   within_deg=30.0)  # the heading given to within 30 degrees: six columns away is out of reach
    assert given.order[0] == 0 and given.headings[0] == pytest.approx(22.5, abs=2.5)
    assert given.headings[1] <= 33.75 or given.headings[1] >= 326.25  # a correction within the reach (+ half a column)
    assert rerank(descriptor, view, tiles, seen, within_deg=180.0).order.tolist() == searched.order.tolist()


def _smooth_columns(rng, width: int, dim: int, at: np.ndarray) -> np.ndarray:
    """Unit features of a smooth signal around the horizon sampled at azimuths ``at`` (in columns of a
    ``width``-column view): a few random harmonics, so a fraction of a column is a small change."""
    a, b = rng.standard_normal((2, 3, dim))
    angle = 2 * np.pi * np.asarray(at, dtype=np.float64)[:, None] / width
    x = sum(a[k][None] * np.cos((k + 1) * angle) + b[k][None] * np.sin((k + 1) * angle) for k in range(3))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_tiles_met_at_sub_column_phases_find_the_heading_between_columns():
    from model.orientation import alignment_scores, phase_columns, rerank

    rng = np.random.default_rng(5)
    width, phases, heading = 16, 4, 3.25  # heading in columns: 73.125 degrees, between columns 3 and 4
    seed = int(rng.integers(0, 2**31))  # one signal: the same harmonics for the tile and the view
    def tile_at(shift):
        return _smooth_columns(np.random.default_rng(seed), width, 8, np.arange(width) - shift)

    # phase p: the tile turned by p / P of a column, so its column w looks at azimuth w - p / P
    tiles = np.stack([tile_at(p / phases) for p in range(phases)])[None]  # [1, P, W, C]
    view = _smooth_columns(np.random.default_rng(seed), width, 8, np.arange(width) + heading)  # north-centred
    fine = alignment_scores(view, tiles)
    assert fine.shape == (1, width * phases)
    assert int(np.argmax(fine[0])) == round(heading * phases)  # 13 quarter columns
    assert fine[0].max() == pytest.approx(1.0, abs=1e-5)  # a phase meets the view exactly
    plain = alignment_scores(view, tiles[:, 0])  # the tile as it is: between two shifts, worse
    assert plain[0].max() < fine[0].max() - 1e-3
    assert np.allclose(fine[0, ::phases], plain[0])  # phase 0's shifts are the plain scores
    with pytest.raises(ValueError, match=r"tile columns at phases must be \[K, P, 16, 8\]"):
        alignment_scores(view, tiles[:, :, :8])
    result = rerank(np.array([0.5]), view, tiles)
    assert result.headings[0] == pytest.approx(heading * 22.5, abs=0.5)
    # phase_columns encodes the tiles turned by 1/P of a column: rolled by 16/P pixels of a 16-pixel column
    polar = torch.zeros((2, 3, 4, width * 16), dtype=torch.uint8)  # as the encoder takes them: [N, 3, H, W_px]
    polar[:, 0] = torch.arange(width * 16, dtype=torch.uint8)[None, None, :]
    seen = []

    def encode(v):  # stands in for the network: each token column's first pixel's red, twice; notes each roll
        seen.append(int(v[0, 0, 0, 0]))
        return np.repeat(v[:, 0, 0, ::16, None].numpy().astype(np.float32), 2, -1)

    out = phase_columns(encode, polar, 4)
    assert out.shape == (2, 4, width, 2) and seen == [0, 252, 248, 244]  # rolled 0, 4, 8, 12 pixels
    assert phase_columns(encode, polar, 1).shape == (2, 1, width, 2)
    with pytest.raises(ValueError, match="multiple of 48"):
        phase_columns(encode, polar, 3)


@pytest.mark.parametrize("tile_phases,view_phases", [(4, 4), (4, 2), (2, 4), (1, 4)])
def test_a_view_at_sub_column_phases_averages_the_looks_that_meet_at_each_heading(tile_phases, view_phases):
    from model.orientation import alignment_scores, rerank, valid_columns, view_phase_scores

    width, heading = 16, 3.25  # heading in columns: 73.125 degrees, on the quarter-column grid
    seed = 11
    def signal(at):
        return _smooth_columns(np.random.default_rng(seed), width, 8, at)

    tiles = np.stack([signal(np.arange(width) - p / tile_phases) for p in range(tile_phases)])[None]  # [1, P, W, C]
    # view phase t: the view rolled by t / T of a column to the right, so its column w looks at w + heading - t / T
    looks = [signal(np.arange(width) + heading - t / view_phases) for t in range(view_phases)]
    view = np.stack(looks)  # [T, W, C], as the encoder gives a view's
    fine = 4  # lcm of the phases of every case here
    scores = alignment_scores(view, tiles if tile_phases > 1 else tiles[:, 0])
    assert scores.shape == (1, width * fine)
    # every (view phase, tile phase) pair that meets at the true heading meets it exactly: their mean is 1
    assert int(np.argmax(scores[0])) == round(heading * fine) and scores[0].max() == pytest.approx(1.0, abs=1e-5)
    if tile_phases == 1:  # nothing to average: view phase t's shifts s land at heading s + t / T
        for t in range(view_phases):
            assert np.allclose(scores[0, t::view_phases], alignment_scores(looks[t], tiles[:, 0])[0], atol=1e-6)
    elif tile_phases == fine:  # each heading the mean of the T pairs meeting there (one tile phase per view phase)
        pairs = [alignment_scores(looks[t], tiles)[0] for t in range(view_phases)]
        step = fine // view_phases
        expected = np.mean([np.roll(pairs[t], t * step) for t in range(view_phases)], axis=0)
        assert np.allclose(scores[0], expected, atol=1e-6)
    assert rerank(np.array([0.5]), view, tiles).headings[0] == pytest.approx(heading * 22.5, abs=0.5)
    # a limited view: its seen pixel columns as placed at phase 0, rolled with it at each phase
    seen = np.repeat(valid_columns(width, 90.0), 16)
    limited = view_phase_scores(view, tiles, seen)
    assert int(np.argmax(limited[0])) == round(heading * fine) and limited[0].max() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="seen pixel columns"):
        view_phase_scores(view, tiles, valid_columns(width, 90.0))  # token columns can not turn by a fraction
    with pytest.raises(ValueError, match=r"must be \[T, W, C\] with the tiles' \[W, C\]"):
        alignment_scores(view[:, :8], tiles)


@pytest.mark.parametrize("tile_phases,view_phases", [(1, 1), (4, 1), (1, 4), (4, 4), (4, 2), (2, 4)])
def test_a_given_heading_is_aligned_at_the_headings_near_it_alone_with_the_same_scores(tile_phases, view_phases):
    """alignment_at computes a few headings of alignment_scores, each from the pairs and shift that meet there;
    rerank with a given heading uses it and answers exactly as from every heading's scores."""
    from model.orientation import (alignment_at, alignment_scores, heading_count, rerank, shifts_within,
                                   valid_columns)
    from model.views import refine_headings

    rng = np.random.default_rng(7)
    tiles = _unit(rng, 40, tile_phases, 16, 8)[:, 0] if tile_phases == 1 else _unit(rng, 40, tile_phases, 16, 8)
    view = _unit(rng, 16, 8) if view_phases == 1 else _unit(rng, view_phases, 16, 8)
    seen = np.repeat(valid_columns(16, 90.0), 16)
    count = heading_count(view, tiles)
    assert count == 16 * max(tile_phases, view_phases)
    for mask in (seen, None):
        full = alignment_scores(view, tiles, mask)
        assert full.shape == (40, count)
        some = np.array([0, 1, count - 1, 7, count // 2, 1])
        assert np.allclose(alignment_at(view, tiles, mask, some), full[:, some], atol=1e-6)
    descriptor = rng.uniform(0.3, 0.6, 40)
    full = alignment_scores(view, tiles, seen)
    for within in (0.0, 10.0, 30.0):
        allowed = shifts_within(count, within)
        combined = 0.1 * descriptor + 0.9 * full[:, allowed].max(axis=1)
        order = np.argsort(-combined, kind="stable")
        result = rerank(descriptor, view, tiles, seen, weight=0.9, within_deg=within)
        assert result.order.tolist() == order.tolist()
        assert np.allclose(result.alignment, full[order][:, allowed].max(axis=1), atol=1e-6)
        assert np.allclose(result.headings, refine_headings(full[order], allowed), atol=1e-4)
    with pytest.raises(ValueError, match="headings must be in"):
        alignment_at(view, tiles, seen, np.array([count]))


def test_rerank_refuses_what_it_can_not_combine():
    from model.orientation import rerank

    rng = np.random.default_rng(0)
    tiles, view = _unit(rng, 3, 16, 8), _unit(rng, 16, 8)
    with pytest.raises(ValueError, match="weight"):
        rerank(np.zeros(3), view, tiles, weight=1.5)
    with pytest.raises(ValueError, match="2 scores for 3"):
        rerank(np.zeros(2), view, tiles)
    with pytest.raises(ValueError, match="tile columns"):
        rerank(np.zeros(3), view, tiles[:, :8])
    assert len(rerank(np.zeros(0), view, tiles[:0]).order) == 0


def test_match_margin_is_over_the_best_match_far_enough_away():
    from model.metrics import match_margin

    latlon = [[47.0, 8.0], [47.0005, 8.0], [47.01, 8.0], [47.02, 8.0]]  # 56 m, 1.1 km, 2.2 km
    assert match_margin([0.9, 0.89, 0.7, 0.6], latlon) == (pytest.approx(0.2), 2)
    assert match_margin([0.9, 0.89], latlon[:2]) == (None, None)  # nothing distinct among them
    assert match_margin([0.9], latlon[:1]) == (None, None)


def test_the_fov_augmentation_cuts_only_the_ground_view_to_the_mean_colour():
    from model.augment import PairAugment
    from model.preprocess import IMAGENET_MEAN

    ground, aerial = torch.rand(64, 3, 16, 64), torch.rand(64, 3, 16, 64)
    g, a = PairAugment(turn=0.0, flip=0.0, color=0.0, fov=0.5)(ground, aerial, True, torch.Generator().manual_seed(0))
    assert torch.equal(a, aerial)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    cut = (g == mean).all(dim=1)  # [B, H, W] pixels set to the mean colour
    limited = cut.flatten(1).any(dim=1)
    assert 16 <= int(limited.sum()) <= 48  # about half
    assert torch.equal(g[~limited], ground[~limited])
    for b in torch.nonzero(limited).flatten().tolist():
        seen_columns = (~cut[b]).any(dim=0).float().mean().item()
        assert 60 / 360 - 0.05 <= seen_columns <= 240 / 360 + 0.05


def test_place_view_puts_a_crop_or_photo_at_its_heading(tmp_path, micro_config):
    from PIL import Image

    config = micro_config  # ground 32 x 128
    pano = np.zeros((64, 256, 3), np.uint8)
    pano[:, 96:160] = (200, 50, 50)  # a red block around north (the centre) over 90 degrees
    path = tmp_path / "pano.png"
    Image.fromarray(pano).save(path)
    full, seen = place_view(path, config)
    assert full.shape == (32, 128, 3) and seen.all()
    assert full[16, 64, 0] > 150  # north in the middle
    turned, _ = place_view(path, config, heading_deg=90.0)  # its centre looked east: north-aligned, east
    assert turned[16, 96, 0] > 150 and turned[16, 64, 0] < 100  # is a quarter turn right of the centre
    crop = tmp_path / "crop.png"
    Image.fromarray(pano[:, 96:160]).save(crop)  # the red 90 degrees alone, looking north
    placed, seen = place_view(crop, config, fov_deg=90.0, projection="equirectangular")
    assert seen.sum() == 32 and seen[48:80].all() and (placed[:, ~seen] == MEAN_RGB).all()
    assert placed[16, 64, 0] > 150
    photo, seen = place_view(crop, config, fov_deg=90.0, heading_deg=180.0, projection="perspective")
    assert seen[:8].any() and seen[-8:].any() and not seen[48:80].any()  # south: the panorama's edges
    with pytest.raises(ValueError, match="projection"):
        place_view(crop, config, fov_deg=90.0, projection="fisheye")
    pitched, _ = place_view(crop, config, fov_deg=90.0, projection="perspective", pitch_deg=20.0)
    level, _ = place_view(crop, config, fov_deg=90.0, projection="perspective")
    rows = lambda view: np.flatnonzero((view[:, 64] != MEAN_RGB).any(axis=-1))  # noqa: E731  seen rows at north
    assert rows(pitched).min() < rows(level).min() and rows(pitched).max() < rows(level).max()  # looks higher up
    with pytest.raises(ValueError, match="pitch_deg and roll_deg"):  # panoramas and their crops are level
        place_view(crop, config, fov_deg=90.0, projection="equirectangular", roll_deg=5.0)


@pytest.fixture(scope="module")
def view_world(tmp_path_factory):
    """A tiny world with panoramas, and a checkpoint with an orientation head trained on it."""
    from ship_support import tiny_world

    from model.orientation import train_orientation

    base = tmp_path_factory.mktemp("views")
    world = tiny_world(base, seed=4, pairs=24)
    torch.manual_seed(0)  # the same network whatever ran before in this process (some draws have no right top-1)
    net = L2LTR(json_config())
    save_checkpoint(net, base / "plain.safetensors")
    report = train_orientation(base / "plain.safetensors", world, base / "head.safetensors", pairs=24, rotations=2,
                               steps=30, batch_size=16, workers=1, split="all")
    return world, base, report


def json_config():
    from model import L2LTRConfig

    return L2LTRConfig(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, resnet_units=(1, 1, 1),
                       resnet_width_factor=0.5, ground_size=(64, 256), aerial_size=(64, 256), name="micro256")


def test_the_orientation_head_is_saved_with_the_network_and_encoded_with_it(view_world):
    from model import load_checkpoint
    from model.inference import InferenceEncoder

    _, base, report = view_world
    plain, head = load_checkpoint(base / "plain.safetensors"), load_checkpoint(base / "head.safetensors")
    assert head.config.orientation_dim == 64 and not hasattr(plain, "orientation")
    assert head.fingerprint() != plain.fingerprint()  # the head's weights take part
    for key, value in plain.state_dict().items():  # the network itself is unchanged
        assert torch.equal(head.state_dict()[key], value)
    assert report["pairs"] == 24 and "orientation" in head.provenance
    images = torch.randint(0, 256, (3, 3, 64, 256), dtype=torch.uint8)
    rows, columns = InferenceEncoder(head).encode_uint8_with_columns(images, "ground")
    assert rows.shape == (3, 32) and columns.shape == (3, 16, 64)
    assert np.allclose(np.linalg.norm(columns, axis=-1), 1.0, atol=1e-5)
    assert InferenceEncoder(plain).encode_uint8_with_columns(images, "ground")[1] is None
    # tiles at 4 sub-column phases: phase by phase, phase p the polar image rolled by 4 p of its 256 pixels
    encoder = InferenceEncoder(head)
    tile_rows, phased = encoder.encode_uint8_with_columns(images, "aerial", phases=4)
    plain_rows, plain_columns = encoder.encode_uint8_with_columns(images, "aerial")
    assert phased.shape == (3, 4 * 16, 64) and np.allclose(tile_rows, plain_rows, atol=1e-6)
    assert np.allclose(phased[:, :16], plain_columns, atol=1e-6)
    rolled = encoder.encode_uint8_with_columns(torch.roll(images, 8, dims=3), "aerial")[1]
    assert np.allclose(phased[:, 32:48], rolled, atol=1e-6) and not np.allclose(rolled, plain_columns, atol=1e-3)
    assert InferenceEncoder(plain).encode_uint8_with_columns(images, "aerial", phases=4)[1] is None
    # a view at 4 phases: its columns the same way, its descriptor the mean over the phases (a tile's: phase 0's)
    view_rows, view_phased = encoder.encode_uint8_with_columns(images, "ground", phases=4)
    looks = [encoder.encode_uint8_with_columns(torch.roll(images, 4 * p, dims=3), "ground") for p in range(4)]
    assert view_phased.shape == (3, 4, 16, 64) and np.allclose(view_phased[:, 3], looks[3][1], atol=1e-6)
    mean = np.mean([r for r, _ in looks], axis=0)
    assert np.allclose(view_rows, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
    assert not np.allclose(view_rows, looks[0][0], atol=1e-4)


def test_the_head_can_also_learn_to_tell_its_tile_from_look_alikes(view_world, tmp_path):
    from model import load_checkpoint
    from model.orientation import train_orientation

    world, base, plain_report = view_world
    common = dict(pairs=24, rotations=2, steps=10, batch_size=8, workers=1, split="all", seed=5)
    without = train_orientation(base / "plain.safetensors", world, tmp_path / "a.safetensors", **common)
    report = train_orientation(base / "plain.safetensors", world, tmp_path / "b.safetensors", retrieval=1.0,
                               negatives=2, neighbours=5, **common)
    for key in ("held_out_r1_descriptor_360", "held_out_r1_rerank_360", "held_out_r1_rerank_limited"):
        assert key in plain_report and key in report
    assert all(0.0 <= v <= 1.0 for k, v in report.items() if k.startswith("held_out_r1") and v is not None)
    assert report["held_out_r1_descriptor_360"] == without["held_out_r1_descriptor_360"]  # the same frozen network
    a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(tmp_path / "b.safetensors")
    assert b.provenance["orientation"]["retrieval"] == 1.0 and a.provenance["orientation"]["retrieval"] == 0.0
    assert not torch.equal(a.orientation.ground.weight, b.orientation.ground.weight)  # the second loss took part


@pytest.mark.parametrize("args", [["--heading", "unknown"], ["--fov", "90", "--heading", "unknown"],
                                  ["--fov", "180"], ["--fov", "90", "--heading", "unknown", "--method", "rerank"],
                                  ["--fov", "180", "--method", "rerank"],
                                  ["--heading", "unknown", "--method", "aerial", "--rotations", "4"],
                                  ["--heading", "unknown", "--method", "query", "--rotations", "4"]])
def test_evaluate_reports_limited_views_and_heading_errors(view_world, capsys, args):
    from model import evaluate

    world, base, _ = view_world
    assert evaluate.main(["--checkpoint", str(base / "head.safetensors"), "--data", str(world), "--split", "all",
                          "--workers", "1", "--queries", "12", "--json", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"] == 12 and result["n"] == 24 and 0.0 <= result["r1"] <= result["r1pct"] <= 1.0
    assert ("heading_error_median_deg" in result) == ("unknown" in args)
    if "unknown" in args and result["heading_error_median_deg"] is not None:
        assert 0.0 <= result["heading_error_median_deg"] <= 180.0


def test_evaluate_rerank_with_no_weight_is_the_head_and_with_weight_moves_answers(view_world, capsys):
    from model import evaluate

    world, base, _ = view_world
    common = ["--checkpoint", str(base / "head.safetensors"), "--data", str(world), "--split", "all", "--workers", "1",
              "--json", "--fov", "90", "--heading", "unknown"]

    def run(*extra):
        assert evaluate.main([*common, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    head = run("--method", "head")
    same = run("--method", "rerank", "--rerank-weight", "0", "--rerank-k", "10")
    assert same["rerank"] == {"candidates": 10, "weight": 0.0, "heading_within_deg": None}  # searched all round
    assert [same[k] for k in ("r1", "r5", "r10", "r1pct", "heading_error_median_deg")] == \
        [head[k] for k in ("r1", "r5", "r10", "r1pct", "heading_error_median_deg")]
    alone = run("--method", "rerank", "--rerank-weight", "1", "--rerank-k", "24")  # alignment alone decides
    assert alone["r1"] != head["r1"] or alone["r5"] != head["r5"] or alone["confidence"] != head["confidence"]
    with pytest.raises(SystemExit):
        evaluate.main([*common, "--method", "rerank", "--rerank-k", "0"])
    assert "argument --rerank-k: must be at least 1, got 0" in capsys.readouterr().err
    phased = run("--method", "rerank", "--tile-phases", "2")  # the tiles' columns at 2 phases: encoded twice
    assert phased["tile_phases"] == 2 and "tile_phases" not in head and phased["heading_error_median_deg"] is not None
    for wrong in (["--method", "aerial"], ["--heading", "known"]):  # no head, or a known heading by descriptor
        with pytest.raises(SystemExit):
            evaluate.main([*common, *wrong, "--tile-phases", "2"])
        assert "--tile-phases needs the orientation head" in capsys.readouterr().err
    known = ["--heading", "known", "--method", "rerank", "--rerank-k", "24"]  # the last --heading counts
    near = run(*known)
    assert near["rerank"]["heading_within_deg"] == 10.0  # model.orientation.HEADING_WITHIN_DEG: its own column
    assert "tile_phases" not in near
    phased_known = run(*known, "--tile-phases", "4")  # and the 5.6 degree phases either side, at 4 phases
    assert phased_known["tile_phases"] == 4 and phased_known["rerank"]["heading_within_deg"] == 10.0
    wide = run(*known, "--heading-within", "180")
    assert wide["rerank"]["heading_within_deg"] == 180.0
    assert (wide["r1"], wide["r5"], wide["confidence"]) != (near["r1"], near["r5"], near["confidence"])
    with pytest.raises(SystemExit):
        evaluate.main([*common, "--method", "rerank", "--heading-within", "30"])  # an unknown heading
    assert "--heading-within needs --heading known" in capsys.readouterr().err
    off = run(*known, "--heading-error", "90")  # placed up to 90 degrees off the true heading, as a bad compass
    assert off["heading_error_deg"] == 90.0 and "heading_error_deg" not in near
    assert (off["r1"], off["r5"], off["confidence"]) != (near["r1"], near["r5"], near["confidence"])
    with pytest.raises(SystemExit):
        evaluate.main([*common, "--heading-error", "10"])  # an unknown heading is not placed at all
    assert "--heading-error needs --heading known" in capsys.readouterr().err


def test_evaluate_can_cut_crops_to_a_photos_outline(view_world, capsys, monkeypatch):
    from model import evaluate, views

    world, base, _ = view_world
    cut = []
    real = views.limit_photo
    monkeypatch.setattr(views, "limit_photo", lambda v, fov: cut.append((v, real(v, fov))) or cut[-1][1])
    common = ["--checkpoint", str(base / "head.safetensors"), "--data", str(world), "--split", "all", "--workers", "1",
              "--queries", "6", "--json", "--heading", "known", "--method", "rerank"]
    assert evaluate.main([*common, "--fov", "90", "--crop", "photo"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["crop"] == "photo" and result["queries"] == 6 and 0.0 <= result["r1"] <= result["r1pct"] <= 1.0
    assert len(cut) == 6
    view, outline = cut[0]
    kept = views.photo_outline(*view.shape[:2], 90.0)
    assert np.array_equal(outline[kept], view[kept]) and not np.array_equal(outline, view)
    assert outline[0, view.shape[1] // 2].tolist() == list(views.MEAN_RGB)  # the top row is above a photo's frame
    assert evaluate.main([*common, "--fov", "90"]) == 0
    assert "crop" not in json.loads(capsys.readouterr().out) and len(cut) == 6  # full height: no outline cut
    assert evaluate.main([*common, "--fov", "180", "--crop", "photo"]) == 1
    err = capsys.readouterr().err
    assert "crop 'photo'" in err and "got 180" in err


def test_evaluate_cuts_crops_at_the_headings_of_a_perspective_worlds_photos(view_world, capsys, monkeypatch, tmp_path):
    """--paired-with: the crops of the places that have a photo, each at its photo's heading, so that crops and photos
    are compared pair by pair (not at headings of their own)."""
    import csv

    from model import evaluate, views
    from model.train import read_records

    world, base, _ = view_world
    ids = [record.id for record in read_records("synthetic", world, "all")]  # the queries' order
    photos = tmp_path / "photos"
    (photos / "streetview").mkdir(parents=True)
    chosen = {ids[1]: -100.0, ids[4]: 30.0, ids[9]: 275.5}  # the perspective world's headings (-180..180 or not)
    with open(photos / "cameras.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["id", "heading_deg", "camera"])
        writer.writeheader()
        for i in ids:
            writer.writerow({"id": i, "heading_deg": chosen.get(i, 0.0), "camera": "perspective"})
    for i in chosen:
        (photos / "streetview" / f"{i}.jpg").write_bytes(b"")  # only whether it is there counts
    turned = []
    real = views.rotate_view
    monkeypatch.setattr(views, "rotate_view", lambda v, h: turned.append(h) or real(v, h))
    common = ["--checkpoint", str(base / "head.safetensors"), "--data", str(world), "--split", "all", "--workers", "1",
              "--json", "--fov", "90", "--method", "rerank"]
    assert evaluate.main([*common, "--heading", "unknown", "--paired-with", str(photos)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"] == 3 and result["n"] == 24 and result["paired_with"] == str(photos)
    assert turned == pytest.approx([260.0, 30.0, 275.5])  # each crop cut around its place's photo's heading
    turned.clear()
    assert evaluate.main([*common, "--heading", "known", "--paired-with", str(photos), "--crop", "photo"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == 3
    assert turned == pytest.approx([260.0, 30.0, 275.5, -260.0, -30.0, -275.5])  # cut there, then placed back
    for wrong, message in ((["--fov", "360"], "a field of view under 360"), (["--photos", str(photos)], "no photos")):
        assert evaluate.main([*common, "--paired-with", str(photos), *wrong]) == 1
        assert message in capsys.readouterr().err
    assert evaluate.main([*common, "--paired-with", str(tmp_path)]) == 1
    assert f"--paired-with {tmp_path}: no cameras.csv" in capsys.readouterr().err
    for photo in (photos / "streetview").iterdir():
        photo.unlink()
    assert evaluate.main([*common, "--paired-with", str(photos)]) == 1  # a world without the photos: named
    assert f"{photos / 'streetview'}: no photo of any of the 24 places" in capsys.readouterr().err


def test_evaluate_needs_the_head_for_the_head_method(view_world, capsys):
    from model import evaluate

    world, base, _ = view_world
    assert evaluate.main(["--checkpoint", str(base / "plain.safetensors"), "--data", str(world), "--split", "all",
                          "--workers", "1", "--heading", "unknown"]) == 1
    assert "no orientation head" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(base / "plain.safetensors"), "--data", str(world), "--split", "all",
                          "--workers", "1", "--method", "rerank"]) == 1  # a known heading is re-ranked by it too
    assert "no orientation head" in capsys.readouterr().err


def test_the_xmp_panorama_heading_is_read_as_attribute_or_element_in_jpeg_webp_and_png():
    import io

    from PIL import Image, PngImagePlugin

    from model.preprocess import xmp_panorama_heading

    def saved(fmt: str, xmp: str | None) -> Image.Image:
        out, kw = io.BytesIO(), {}
        if xmp is not None and fmt == "PNG":
            kw["pnginfo"] = PngImagePlugin.PngInfo()
            kw["pnginfo"].add_itxt("XML:com.adobe.xmp", xmp)
        elif xmp is not None:
            kw["xmp"] = xmp.encode()
        Image.new("RGB", (64, 16)).save(out, fmt, **kw)
        return Image.open(io.BytesIO(out.getvalue()))

    attribute = '<rdf:Description xmlns:GPano="http://ns.google.com/photos/1.0/panorama/" GPano:PoseHeadingDegrees="{}"/>'
    element = "<rdf:Description><GPano:PoseHeadingDegrees> {} </GPano:PoseHeadingDegrees></rdf:Description>"
    for fmt in ("JPEG", "WEBP", "PNG"):
        assert xmp_panorama_heading(saved(fmt, None)) is None
        for form in (attribute, element):
            assert xmp_panorama_heading(saved(fmt, form.format("271.25"))) == 271.25, (fmt, form)
            assert xmp_panorama_heading(saved(fmt, form.format("360"))) == 0.0
            for bad in ("-0.5", "360.5", "nan", "inf", "east", ""):
                assert xmp_panorama_heading(saved(fmt, form.format(bad))) is None, (fmt, form, bad)
    assert xmp_panorama_heading(saved("JPEG", '<x GPano:PosePitchDegrees="5"/>')) is None  # another GPano tag


def test_exif_numbers_that_are_not_finite_single_values_count_as_not_stated():
    from PIL.TiffImagePlugin import IFDRational

    from model.preprocess import _finite

    assert _finite(IFDRational(65, 2)) == 32.5 and _finite(28) == 28.0
    for broken in (IFDRational(1, 0), IFDRational(0, 0), float("inf"), "north", (10.0, 20.0), None):
        assert _finite(broken) is None, broken


@pytest.mark.parametrize("hfov,size", [(60.0, (64, 256)), (100.0, (64, 256)), (75.0, (128, 512)), (90.0, (32, 128))])
def test_photo_outline_is_the_mask_place_view_gives_a_level_photo(hfov, size):
    from model.preprocess import perspective_to_panorama
    from model.views import limit_photo, photo_outline

    _, covered = perspective_to_panorama(np.zeros((300, 400, 3), np.uint8), hfov, 0.0, size)
    outline = photo_outline(*size, hfov)
    # equal but for pixel centres exactly on the frame's edge (90 degrees: columns at +-45 exactly)
    assert (outline != covered).sum() <= size[0] // 2
    rows = outline.sum(axis=0)
    assert rows[size[1] // 2] == rows.max() > rows[outline.any(axis=0)].min()  # tallest at the centre
    views = np.full((2, *size, 3), 7, np.uint8)
    cut = limit_photo(views, hfov)
    assert (cut[:, outline] == 7).all() and (cut[:, ~outline] == MEAN_RGB).all()
    with pytest.raises(ValueError, match="180"):
        photo_outline(*size, 180.0)


def test_the_orientation_head_can_train_on_photo_outlines(view_world, monkeypatch):
    import model.views
    from model import load_checkpoint
    from model.orientation import train_orientation

    world, base, _ = view_world
    calls = []
    real = model.views.limit_photo
    monkeypatch.setattr(model.views, "limit_photo", lambda v, f, *a: calls.append(f) or real(v, f, *a))
    train_orientation(base / "plain.safetensors", world, base / "photo_head.safetensors", pairs=24, rotations=2,
                      steps=5, batch_size=16, workers=1, split="all", fov_augment=1.0, photo_share=1.0,
                      photo_fov_range=(70.0, 80.0))
    assert len(calls) == 48 and all(70.0 <= f <= 80.0 for f in calls)  # every view a photo
    meta = load_checkpoint(base / "photo_head.safetensors").provenance["orientation"]
    assert meta["photo_share"] == 1.0 and meta["photo_fov_range"] == [70.0, 80.0]


def test_the_orientation_head_can_train_on_tilted_photos_placed_level(view_world, monkeypatch, capsys):
    import model.views
    from model import load_checkpoint
    from model.orientation import main, train_orientation

    world, base, _ = view_world
    tilts = []
    real = model.views.tilt_view
    monkeypatch.setattr(model.views, "tilt_view", lambda v, p, r: tilts.append((p, r)) or real(v, p, r))
    train_orientation(base / "plain.safetensors", world, base / "tilt_head.safetensors", pairs=24, rotations=2,
                      steps=5, batch_size=16, workers=1, split="all", fov_augment=1.0, photo_share=0.5,
                      photo_tilt=4.0)
    assert 0 < len(tilts) < 48 and all(abs(p) <= 4.0 and abs(r) <= 4.0 for p, r in tilts)  # the photos only
    assert len({t for t in tilts}) == len(tilts)
    assert load_checkpoint(base / "tilt_head.safetensors").provenance["orientation"]["photo_tilt"] == 4.0
    with pytest.raises(SystemExit):  # before any data is read
        main(["--checkpoint", "x", "--data", "y", "--out", "z", "--photo-tilt", "45"])
    assert "argument --photo-tilt: must be <= 30, got 45" in capsys.readouterr().err


def test_a_head_that_reads_the_rows_through_a_hidden_layer_is_saved_and_encoded_with_its_kind(view_world, tmp_path):
    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.orientation import column_tokens, train_orientation

    world, base, _ = view_world
    train_orientation(base / "plain.safetensors", world, tmp_path / "rows.safetensors", pairs=24, rotations=2, steps=6,
                      batch_size=8, workers=1, split="all", retrieval=1.0, negatives=2, neighbours=5, rows=True,
                      hidden=16, schedule="cosine")
    net = load_checkpoint(tmp_path / "rows.safetensors")
    assert (net.config.orientation_rows, net.config.orientation_hidden) == (True, 16)
    assert net.orientation.ground[0].in_features == 4 * 32  # 4 token rows of the 32-wide micro network
    meta = net.provenance["orientation"]
    assert (meta["rows"], meta["hidden"], meta["schedule"]) == (True, 16, "cosine")
    # the rows side by side, top row first: column w of row r sits at [r * D, (r + 1) * D)
    tokens = torch.arange(2 * (1 + 4 * 16) * 3, dtype=torch.float32).reshape(2, 1 + 4 * 16, 3)
    side_by_side = column_tokens(tokens, (4, 16), rows=True)
    assert side_by_side.shape == (2, 16, 12)
    assert torch.equal(side_by_side[1, 5, 6:9], tokens[1, 1 + 2 * 16 + 5])
    assert torch.allclose(side_by_side.reshape(2, 16, 4, 3).mean(dim=2), column_tokens(tokens, (4, 16)))
    images = torch.randint(0, 256, (2, 3, 64, 256), dtype=torch.uint8)
    _, columns = InferenceEncoder(net).encode_uint8_with_columns(images, "aerial")
    assert columns.shape == (2, 16, 64) and np.allclose(np.linalg.norm(columns, axis=-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        train_orientation(base / "plain.safetensors", world, tmp_path / "x.safetensors", pairs=24, schedule="linear")


def test_the_orientation_head_can_train_on_tiles_at_sub_column_phases(view_world, tmp_path, monkeypatch):
    """Trained as an index built --tile-phases meets it: the tiles at P phases, the heading among W x P shifts,
    scored by the same rule as at inference (`alignment_scores`)."""
    import model.orientation
    from model import load_checkpoint
    from model.orientation import (_heading_logits, _tile_logits, alignment_scores, heading_targets,
                                   train_orientation)
    from model.train import TrainingError

    world, base, _ = view_world
    seen_inputs = []
    real = model.orientation._column_features
    monkeypatch.setattr(model.orientation, "_column_features",
                        lambda net, branch, views, rows: seen_inputs.append((branch, views)) or real(net, branch, views,
                                                                                                   rows))
    common = dict(pairs=24, rotations=2, steps=6, batch_size=8, workers=1, split="all", retrieval=1.0, negatives=2,
                  neighbours=5, seed=3)
    report = train_orientation(base / "plain.safetensors", world, tmp_path / "phased.safetensors", tile_phases=4,
                               **common)
    tiles = [views for branch, views in seen_inputs if branch == "aerial"]
    assert len(tiles) == 4  # phase p: the polar tiles rolled by p * 256 / (16 * 4) pixels
    for p in range(1, 4):
        assert np.array_equal(tiles[p], np.roll(tiles[0], 4 * p, axis=2))
    assert 0.0 <= report["held_out_r1_rerank_limited"] <= 1.0 and report["heading_error_median_deg_360"] is not None
    assert load_checkpoint(tmp_path / "phased.safetensors").provenance["orientation"]["tile_phases"] == 4
    assert list(heading_targets(np.array([0.0, 5.625, 11.0, 359.0]), 16 * 4)) == [0, 1, 2, 0]

    rng = np.random.default_rng(0)
    view = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(16, 8)), dtype=torch.float32), dim=-1)
    phased = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(3, 4, 16, 8)), dtype=torch.float32),
                                           dim=-1)
    seen = np.zeros(16, bool)
    seen[5:9] = True
    keep = torch.as_tensor(seen / seen.sum(), dtype=torch.float32)
    expected = alignment_scores(view.numpy(), phased.numpy(), seen)  # [3, 64], as the service scores
    trained = _heading_logits(view.expand(3, 16, 8), phased, keep.expand(3, 16))
    assert trained.shape == (3, 64) and np.allclose(trained.numpy(), expected, atol=1e-5)
    best = _tile_logits(view[None], phased, keep[None]).amax(dim=2)[0]  # the best over phases and shifts
    assert np.allclose(best.numpy(), expected.max(axis=1), atol=1e-5)

    with pytest.raises(TrainingError, match="3 phases of 16-column tiles need their 256 pixels"):
        train_orientation(base / "plain.safetensors", world, tmp_path / "x.safetensors", tile_phases=3, **common)
    with pytest.raises(TrainingError, match="tile phases and a centre jitter"):
        train_orientation(base / "plain.safetensors", world, tmp_path / "x.safetensors", tile_phases=2,
                          centre_jitter=0.1, **common)
    assert not (tmp_path / "x.safetensors").exists()


def test_a_photo_map_trains_on_photo_outlines_alone_and_leaves_the_head_and_its_tiles_as_they_were(
        view_world, tmp_path, monkeypatch, capsys):
    """--photo-map: the head's maps kept byte for byte (an index built with it stays valid), a third map for
    photos started from the ground map and trained on photo outlines only; photos flagged go through it."""
    import model.views
    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.orientation import main, train_orientation
    from model.train import TrainingError

    world, base, _ = view_world
    outlines = []
    real = model.views.limit_photo
    monkeypatch.setattr(model.views, "limit_photo", lambda v, f, *a: outlines.append(f) or real(v, f, *a))
    report = train_orientation(base / "head.safetensors", world, tmp_path / "photo.safetensors", pairs=24,
                               rotations=2, steps=6, batch_size=8, workers=1, split="all", retrieval=1.0, negatives=2,
                               neighbours=5, photo_map=True, fov_augment=0.0, photo_share=0.0, lr=1e-2)
    assert len(outlines) == 48  # every view a photo outline, whatever fov_augment and photo_share say
    assert 0.0 <= report["held_out_r1_rerank_ground_map_limited"] <= 1.0
    head, photo = load_checkpoint(base / "head.safetensors"), load_checkpoint(tmp_path / "photo.safetensors")
    assert photo.config.orientation_photo and not head.config.orientation_photo
    kept = head.state_dict()
    for key, value in photo.state_dict().items():
        if key.startswith("orientation.photo."):
            assert not torch.equal(value, kept[key.replace(".photo.", ".ground.")])  # trained from there
        else:
            assert torch.equal(value, kept[key]), key
    assert photo.provenance["orientation"] == head.provenance["orientation"]
    assert photo.provenance["orientation_photo"]["photo_map"] is True
    assert photo.fingerprint() != head.fingerprint()

    images = torch.randint(0, 256, (4, 3, 64, 256), dtype=torch.uint8)
    flags = np.array([True, False, True, False])
    encoder, before = InferenceEncoder(photo), InferenceEncoder(head)
    for phases in (1, 2):
        rows, plain = encoder.encode_uint8_with_columns(images, "ground", max_batch=3, phases=phases)
        rows_p, flagged = encoder.encode_uint8_with_columns(images, "ground", max_batch=3, phases=phases, photos=flags)
        old_rows, old = before.encode_uint8_with_columns(images, "ground", max_batch=3, phases=phases, photos=flags)
        _, alone = encoder.encode_uint8_with_columns(images[flags], "ground", phases=phases, photos=np.ones(2, bool))
        assert np.array_equal(rows, rows_p) and np.allclose(rows, old_rows, atol=1e-6)
        assert np.allclose(flagged[~flags], plain[~flags], atol=1e-6) and np.allclose(old, plain, atol=1e-6)
        assert np.allclose(flagged[flags], alone, atol=1e-6)  # every phase through the photo map
        for phase in range(phases):
            assert not np.allclose(flagged[flags][:, phase], plain[flags][:, phase], atol=1e-3)
    tiles = torch.randint(0, 256, (2, 3, 64, 256), dtype=torch.uint8)
    assert np.allclose(encoder.encode_uint8_with_columns(tiles, "aerial", photos=np.ones(2, bool))[1],
                       before.encode_uint8_with_columns(tiles, "aerial")[1], atol=1e-6)  # the tiles as they were
    with pytest.raises(ValueError, match="photos flags 3 views of 4"):
        encoder.encode_uint8_with_columns(images, "ground", photos=flags[:3])

    train_orientation(base / "head.safetensors", world, tmp_path / "start.safetensors", pairs=24, rotations=1,
                      steps=1, batch_size=8, workers=1, split="all", photo_map=True, lr=1e-9)
    start = load_checkpoint(tmp_path / "start.safetensors").state_dict()
    photo_keys = [key for key in start if key.startswith("orientation.photo.")]
    assert photo_keys
    for key in photo_keys:  # one step of 1e-9 from the ground map
        assert torch.allclose(start[key], kept[key.replace(".photo.", ".ground.")], atol=1e-7)

    again = train_orientation(tmp_path / "photo.safetensors", world, tmp_path / "new_head.safetensors", pairs=24,
                              rotations=2, steps=2, batch_size=8, workers=1, split="all")
    new_head = load_checkpoint(tmp_path / "new_head.safetensors")
    assert again and not new_head.config.orientation_photo  # a new head, its aerial map new: no photo map
    assert "orientation_photo" not in new_head.provenance
    with pytest.raises(TrainingError, match="has no orientation head to give a photo map"):
        train_orientation(base / "plain.safetensors", world, tmp_path / "x.safetensors", pairs=24, photo_map=True)
    with pytest.raises(TrainingError, match="meets tiles at 1 sub-column phases and its photo map must too"):
        train_orientation(base / "head.safetensors", world, tmp_path / "x.safetensors", pairs=24, photo_map=True,
                          tile_phases=2)
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["--checkpoint", str(base / "head.safetensors"), "--data", str(world), "--split", "all", "--pairs",
                 "24", "--rotations", "1", "--steps", "2", "--batch-size", "8", "--workers", "1", "--photo-map",
                 "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert "re-ranked with the ground map instead, on the same photo outlines:" in capsys.readouterr().out


def test_the_orientation_head_can_meet_polar_views_centred_off_the_camera(view_world, tmp_path, monkeypatch, capsys):
    import model.train
    from model import load_checkpoint
    from model.orientation import main, train_orientation

    world, base, _ = view_world
    calls, polar = [], []
    real = model.train.off_centre_polar
    monkeypatch.setattr(model.train, "off_centre_polar",
                        lambda t, c, j, g: calls.append((len(t), j)) or polar.append(real(t, c, j, g)) or polar[-1])
    common = dict(pairs=24, rotations=2, steps=6, batch_size=8, workers=1, split="all", retrieval=1.0, negatives=2,
                  neighbours=5, seed=3)
    train_orientation(base / "plain.safetensors", world, tmp_path / "centred.safetensors", **common)
    assert calls == []  # without the jitter the tiles are transformed as before
    report = train_orientation(base / "plain.safetensors", world, tmp_path / "off.safetensors", centre_jitter=0.1,
                               **common)
    assert calls == [(24, 0.1), (24, 0.1)]  # one polar view of each tile a heading, centred elsewhere each time
    assert polar[0].shape == (24, 3, 64, 256) and not torch.equal(polar[0], polar[1])
    assert 0.0 <= report["held_out_r1_rerank_360"] <= 1.0
    centred, off = load_checkpoint(tmp_path / "centred.safetensors"), load_checkpoint(tmp_path / "off.safetensors")
    assert off.provenance["orientation"]["centre_jitter"] == 0.1
    assert "centre_jitter" not in centred.provenance["orientation"]
    assert not torch.equal(centred.orientation.aerial.weight, off.orientation.aerial.weight)
    with pytest.raises(ValueError, match="centre_jitter must be within 0..0.4"):
        train_orientation(base / "plain.safetensors", world, tmp_path / "x.safetensors", centre_jitter=0.5)
    with pytest.raises(SystemExit):  # before any data is read
        main(["--checkpoint", "x", "--data", "y", "--out", "z", "--centre-jitter", "-0.1"])
    assert "argument --centre-jitter: must be >= 0, got -0.1" in capsys.readouterr().err

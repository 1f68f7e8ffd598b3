"""Pair augmentation keeps the ground/aerial correspondence: a turn or mirror of the aerial tile,
seen through the polar transform, is the same column operation as on the panorama."""
import numpy as np
import pytest
import torch

from model.augment import PairAugment, jitter_colour, turn_columns, turn_tile
from model.preprocess import polar_transform

H, W, S = 32, 128, 96


def smooth_tile(seed=0):
    """A random but smooth north-up tile (so one-column sampling offsets stay small)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S] / S
    chans = []
    for _ in range(3):
        f = sum(rng.normal() * np.sin(2 * np.pi * (rng.integers(1, 4) * xx + rng.integers(1, 4) * yy + rng.random()))
                for _ in range(4))
        chans.append((f - f.min()) / (f.max() - f.min()))
    return torch.from_numpy(np.stack(chans)).float()[None]  # [1, 3, S, S]


def polar(tile):
    return polar_transform(tile, H, W)


@pytest.mark.parametrize("quarters,flip", [(1, False), (2, False), (3, False), (0, True), (1, True), (3, True)])
def test_tile_turn_and_mirror_equal_column_ops_after_polar(quarters, flip):
    tile = smooth_tile()
    via_tile = polar(turn_tile(tile, torch.tensor([quarters]), torch.tensor([flip])))
    # of the 8 column operations (4 turns x mirror or not) only the matching one fits; the
    # others (wrong direction, missed mirror) are far off. What is left is the polar grid's
    # half-pixel asymmetry about the tile centre.
    errors = {(q, f): (via_tile - turn_columns(polar(tile), torch.tensor([q / 4]), torch.tensor([f]))).abs().mean().item()
              for q in range(4) for f in (False, True)}
    ranked = sorted(errors, key=errors.get)
    assert ranked[0] == (quarters, flip)
    assert errors[ranked[0]] < 0.08 and errors[ranked[1]] > 2 * errors[ranked[0]]


def test_turn_columns_is_a_roll_and_flip():
    x = torch.arange(2 * 3 * 2 * 8, dtype=torch.float32).view(2, 3, 2, 8)
    out = turn_columns(x, torch.tensor([0.25, 0.5]), torch.tensor([False, True]))
    assert torch.equal(out[0], torch.roll(x[0], 2, dims=2))
    assert torch.equal(out[1], torch.roll(x[1].flip(2), 4, dims=2))


def test_polar_pairs_get_the_same_turn_and_jitter_is_per_image_and_seeded():
    g = torch.rand(6, 3, H, W)
    aug = PairAugment(color=0.0)
    g2, a2 = aug(g, g.clone(), polar=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g2, a2) and not torch.equal(g2, g)
    col = PairAugment()
    one = col(g, g.clone(), polar=True, generator=torch.Generator().manual_seed(4))
    two = col(g, g.clone(), polar=True, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    assert not torch.allclose(one[0], one[1])  # colour drawn independently per view
    j = jitter_colour(g, 0.3, torch.Generator().manual_seed(5))
    assert j.min() >= 0 and j.max() <= 1 and j.shape == g.shape


def test_plain_tile_pairs_turn_by_quarters():
    aug = PairAugment(color=0.0, flip=0.0, turn=1.0)
    tile = smooth_tile().expand(8, 3, S, S).contiguous()
    pano = polar(tile)
    g2, a2 = aug(pano, tile, polar=False, generator=torch.Generator().manual_seed(0))
    assert (polar(a2) - g2).abs().mean() < 0.08


def test_batch_size_mismatch():
    with pytest.raises(ValueError, match="batch sizes differ"):
        PairAugment()(torch.rand(2, 3, H, W), torch.rand(3, 3, H, W), polar=True, generator=torch.Generator())


def _cut(out):
    from model.preprocess import IMAGENET_MEAN

    return (out == torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)).all(dim=1)  # [B, H, W] set to the mean colour


def test_photo_frames_default_to_the_band_and_replay_the_old_draws():
    """Without the new settings a seed cuts what it always did: half of the cut views keep a band of
    rows (the frame's vertical field of view at its centre) at every seen column."""
    from model.augment import limit_fields_of_view

    images = torch.rand(256, 3, 64, 256)
    a = limit_fields_of_view(images, 1.0, (60.0, 240.0), torch.Generator().manual_seed(5))
    b = limit_fields_of_view(images, 1.0, (60.0, 240.0), torch.Generator().manual_seed(5), photo=0.5,
                             photo_fov_range=None, photo_mask="band")
    assert torch.equal(a, b)
    seen = ~_cut(a)
    rows = seen.any(dim=2).sum(dim=1)  # rows seen per image
    banded = rows < 64
    assert 90 <= int(banded.sum()) <= 166  # about half
    for i in torch.nonzero(banded).flatten().tolist():  # a band: every seen column holds the same rows
        cols = seen[i].any(dim=0)
        assert (seen[i][:, cols] == seen[i][:, cols][:, :1]).all()


def test_pinhole_photo_frames_are_cut_as_place_view_masks_a_photo():
    """photo_mask="pinhole": a 90 degree frame keeps the outline a level 4:3 photo covers in the
    panorama frame (model.views.photo_outline, = place_view's mask): 26 rows at its centre, 20 at its
    edges, wherever around the camera it is."""
    from model.augment import PairAugment, limit_fields_of_view
    from model.views import photo_outline

    images = torch.rand(32, 3, 64, 256)
    out = limit_fields_of_view(images, 1.0, (200.0, 240.0), torch.Generator().manual_seed(1), photo=1.0,
                               photo_fov_range=(90.0, 90.0), photo_mask="pinhole")
    outline = photo_outline(64, 256, 90.0)
    for seen in (~_cut(out)).numpy():
        cols = np.nonzero(seen.any(axis=0))[0]
        assert 62 <= seen.any(axis=0).sum() <= 65  # 90 of 360 degrees, not the crops' 200-240
        centre = int(np.argmax(seen.sum(axis=0)))
        assert seen.sum(axis=0).max() == 26 and outline.sum(axis=0).max() == 26
        assert seen[:, cols].sum(axis=0).min() in (19, 20, 21)  # narrower at the edges
        best = min((np.roll(outline, s, axis=1) != seen).sum() for s in range(256))
        assert best <= 2 * 26, best  # the outline, up to where the random centre falls between columns
        assert centre in cols
    with pytest.raises(ValueError, match="photo_mask"):
        PairAugment(photo_mask="fisheye")


def test_the_photo_share_picks_how_many_cut_views_are_photos():
    from model.augment import limit_fields_of_view

    images = torch.rand(400, 3, 32, 128)
    for share, lo, hi in ((0.0, 0, 0), (1.0, 400, 400), (0.7, 240, 320)):
        out = limit_fields_of_view(images, 1.0, (60.0, 160.0), torch.Generator().manual_seed(2), photo=share,
                                   photo_mask="pinhole")
        photos = int((_cut(out).all(dim=2).any(dim=1)).sum())  # a photo leaves whole rows unseen
        assert lo <= photos <= hi, (share, photos)


def test_training_reads_the_photo_settings(capsys):
    from model.train import ADDED_SETTING_DEFAULTS, RESUME_KEYS, build_parser, main

    args = build_parser().parse_args(["--data", "d", "--out", "o", "--fov-augment", "0.5", "--photo-share", "0.6",
                                      "--photo-fov", "60", "100", "--photo-mask", "pinhole", "--photo-tilt", "4"])
    assert (args.photo_share, args.photo_fov, args.photo_mask, args.photo_tilt) == (0.6, [60.0, 100.0], "pinhole", 4)
    defaults = build_parser().parse_args(["--data", "d", "--out", "o"])
    with pytest.raises(SystemExit, match="2"):  # before any data is read
        main(["--data", "d", "--out", "o", "--photo-tilt", "45"])
    assert "argument --photo-tilt: must be <= 30, got 45" in capsys.readouterr().err
    for key in ("photo_share", "photo_fov", "photo_mask", "photo_tilt"):  # a run saved before them resumes as it was
        assert key in RESUME_KEYS and ADDED_SETTING_DEFAULTS[key] == getattr(defaults, key)


def _centre_of_bright_rows(image: torch.Tensor, col: int) -> float:
    weights = image[0, :, col]
    return float((weights * torch.arange(image.shape[1])).sum() / weights.sum())


def test_tilt_turns_the_sphere_about_the_view_axes():
    """A pitch moves the horizon up or down by the same angle in front of and behind the camera (in
    opposite senses) and not at its sides; a roll does so at its sides. 10 degrees = 3.56 of 64 rows."""
    from model.augment import tilt_panoramas

    images = torch.zeros(2, 3, 64, 256)
    images[:, :, 32] = 1.0  # a line along the horizon
    centre = torch.tensor([128.0, 40.0])  # the view looks at column 128 or 40
    zero = torch.zeros(2)
    assert torch.equal(tilt_panoramas(images, centre, zero, zero), images)
    pitched = tilt_panoramas(images, centre, torch.full((2,), 10.0), zero)
    rolled = tilt_panoramas(images, centre, zero, torch.full((2,), 10.0))
    for i, c in enumerate((128, 40)):
        front, right, back, left = c, (c + 64) % 256, (c + 128) % 256, (c - 64) % 256
        shift = {name: _centre_of_bright_rows(out[i], col) - 32
                 for name, out, col in (("pitch front", pitched, front), ("pitch back", pitched, back),
                                        ("pitch side", pitched, right), ("roll right", rolled, right),
                                        ("roll left", rolled, left), ("roll front", rolled, front))}
        assert abs(shift["pitch front"] - 3.56) < 0.1 and abs(shift["pitch back"] + 3.56) < 0.1, shift
        assert abs(shift["roll right"] - 3.56) < 0.1 and abs(shift["roll left"] + 3.56) < 0.1, shift
        assert abs(shift["pitch side"]) < 0.1 and abs(shift["roll front"]) < 0.1, shift


def test_photo_tilt_resamples_only_photos_and_keeps_old_draws():
    """photo_tilt=0 replays a seed exactly; with a tilt only the photo frames change (the crops and the
    untouched views stay), and only by a few rows' worth (a level photo's outline still cuts them)."""
    from model.augment import limit_fields_of_view

    images = torch.rand(64, 3, 64, 256)
    kw = dict(photo=0.5, photo_fov_range=(70.0, 100.0), photo_mask="pinhole")
    level = limit_fields_of_view(images, 0.8, (60.0, 240.0), torch.Generator().manual_seed(7), **kw)
    same = limit_fields_of_view(images, 0.8, (60.0, 240.0), torch.Generator().manual_seed(7), photo_tilt=0.0, **kw)
    tilted = limit_fields_of_view(images, 0.8, (60.0, 240.0), torch.Generator().manual_seed(7), photo_tilt=5.0, **kw)
    assert torch.equal(level, same)
    assert torch.equal(_cut(level), _cut(tilted))  # the same outlines: read as level
    photos = _cut(level).all(dim=2).any(dim=1)  # a photo leaves whole rows unseen
    changed = (level != tilted).flatten(1).any(dim=1)
    assert photos.any() and torch.equal(changed, photos)

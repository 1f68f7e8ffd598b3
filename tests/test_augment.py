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

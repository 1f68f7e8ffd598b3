import io

import numpy as np
import pytest
import torch
from PIL import Image

from model import L2LTRConfig
from model.preprocess import (ImageDecodeError, aerial_tensor, ground_image, ground_tensor, image_uint8,
                              load_ground_image, load_image, normalize_uint8_nchw, polar_transform,
                              polar_sampling_grid, polar_transform_torch, to_normalized_tensor)


def test_north_maps_to_centre_column_and_centre_to_bottom_row():
    size, h, w = 101, 32, 128
    tile = np.zeros((size, size), np.float32)
    tile[:size // 2 - 10, size // 2 - 1:size // 2 + 2] = 1.0   # a line north of the centre
    polar = polar_transform(tile, h, w)
    hot_cols = np.where(polar[: h // 2].max(axis=0) > 0.5)[0]
    assert set(hot_cols) <= {w // 2 - 1, w // 2, w // 2 + 1} and w // 2 in hot_cols
    rows, cols = polar_sampling_grid(size, h, w)
    # bottom row samples the camera (r = S/2 * 0 / H... (H-1-i)=0) i.e. the tile centre
    assert np.allclose(rows[-1], size / 2) and np.allclose(cols[-1], size / 2)
    # top row is far from the camera: radius (S/2)(H-1)/H
    assert np.allclose(np.hypot(rows[0] - size / 2, cols[0] - size / 2), size / 2 * (h - 1) / h)


def test_known_pixels_follow_the_formula():
    size, h, w = 64, 16, 64
    rng = np.random.default_rng(0)
    tile = rng.random((size, size, 3)).astype(np.float32)
    polar = polar_transform(tile, h, w)
    for i, j in [(0, 0), (5, 16), (10, 32), (15, 48), (3, 7)]:
        r = (size / 2) * (h - 1 - i) / h
        t = 2 * np.pi * j / w
        row, col = size / 2 + r * np.cos(t), size / 2 - r * np.sin(t)
        r0, c0 = int(np.floor(row)), int(np.floor(col))
        fr, fc = row - r0, col - c0
        expect = ((1 - fr) * (1 - fc) * tile[r0, c0] + (1 - fr) * fc * tile[r0, c0 + 1]
                  + fr * (1 - fc) * tile[r0 + 1, c0] + fr * fc * tile[r0 + 1, c0 + 1])
        assert np.allclose(polar[i, j], expect, atol=1e-5)
    # south (left edge, j=0) samples below the centre; west (j = W/4) samples left of it
    rows, cols = polar_sampling_grid(size, h, w)
    assert rows[0, 0] > size / 2 and cols[0, w // 4] < size / 2


def test_numpy_equals_torch():
    rng = np.random.default_rng(1)
    tile = (rng.random((96, 96, 3)) * 255).astype(np.float32)
    a = polar_transform(tile, 28, 154)
    b = polar_transform(torch.from_numpy(tile).permute(2, 0, 1)[None], 28, 154)[0].permute(1, 2, 0).numpy()
    assert np.abs(a - b).max() < 0.01


def test_moved_polar_centre_is_the_polar_transform_of_the_moved_tile():
    """centre_shift (rows down, columns right): the polar image of a camera standing off the tile's centre,
    the same as the plain transform of the tile moved under it (zero where the moved tile has no pixels)."""
    rng = np.random.default_rng(3)
    tiles = torch.from_numpy(rng.random((2, 3, 64, 64)).astype(np.float32))
    shift = torch.tensor([[4.0, -6.0], [0.0, 0.0]])
    moved = torch.zeros_like(tiles)
    moved[0, :, :60, 6:] = tiles[0, :, 4:, :58]
    moved[1] = tiles[1]
    got = polar_transform_torch(tiles, 12, 48, centre_shift=shift)
    want = polar_transform_torch(moved, 12, 48)
    # the outer ring reaches the tile's edge, where the moved tile lost its border pixels
    assert torch.allclose(got[:, :, 1:], want[:, :, 1:], atol=1e-5)
    assert torch.equal(got[1], polar_transform_torch(tiles[1], 12, 48))


def test_polar_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        polar_transform(np.zeros((10, 12, 3)), 8, 16)


def test_paper_two_step_and_tensor_shapes():
    tile = Image.fromarray((np.random.default_rng(2).random((750, 750, 3)) * 255).astype(np.uint8))
    paper = L2LTRConfig.named("paper")
    x = aerial_tensor(tile, paper)
    assert x.shape == (3, 128, 512) and x.dtype == torch.float32
    pano = Image.new("RGB", (1232, 224), (128, 128, 128))
    assert ground_tensor(pano, L2LTRConfig.named("tiny")).shape == (3, 64, 256)
    # grey 128 normalises to about (0.502 - mean) / std
    assert abs(ground_tensor(pano, paper)[0].mean().item() - (128 / 255 - 0.485) / 0.229) < 1e-4


def test_load_image_exif_orientation():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    out = load_image(buf.getvalue())
    assert out.size == (20, 40)


def _smooth_jpeg(w: int, h: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(1)
    small = (rng.random((h // 16, w // 16, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_decodes_at_the_smallest_dct_scale_not_below_the_model_size(orientation):
    tiny = L2LTRConfig.named("tiny")  # ground 64 x 256
    stored = (2048, 512) if orientation == 1 else (512, 2048)  # orientation 6 shows it turned
    data = _smooth_jpeg(*stored, orientation=orientation)
    assert load_image(data, reduce_to=(64, 256)).size == (256, 64)  # 1/8 scale, upright
    fast = np.asarray(load_ground_image(data, tiny), np.float32)
    full = np.asarray(ground_image(load_image(data), tiny), np.float32)
    assert fast.shape == full.shape == (64, 256, 3)
    assert np.abs(fast - full).mean() < 5.0  # the same picture, up to the DCT's low-pass
    # the demo's 512 x 128 panoramas: 1/2 scale, straight to the model size
    half = _smooth_jpeg(512, 128)
    assert load_image(half, reduce_to=(64, 256)).size == (256, 64)
    assert np.array_equal(np.asarray(load_ground_image(half, tiny)),
                          np.asarray(load_image(half, reduce_to=(64, 256))))
    # a scale that does not land on the model size: the smallest one above it, then resized
    odd = _smooth_jpeg(600, 150)
    assert load_image(odd, reduce_to=(64, 256)).size == (300, 75)
    assert np.asarray(load_ground_image(odd, tiny)).shape == (64, 256, 3)
    # no DCT in a PNG: decoded in full and resized, exactly as before
    png = io.BytesIO()
    Image.open(io.BytesIO(half)).save(png, "PNG")
    assert np.array_equal(np.asarray(load_ground_image(png.getvalue(), tiny)),
                          np.asarray(ground_image(load_image(png.getvalue()), tiny)))
    # the pixel limit counts the stored size, before any reduced decode
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        load_ground_image(data, tiny, max_pixels=2048 * 512 - 1)


def test_uint8_batches_normalise_like_single_images():
    rng = np.random.default_rng(3)
    imgs = [(rng.random((16, 32, 3)) * 255).astype(np.uint8) for _ in range(3)]
    batch = normalize_uint8_nchw(torch.stack([image_uint8(i) for i in imgs]))
    assert torch.equal(batch, torch.stack([to_normalized_tensor(i) for i in imgs]))


def test_load_image_errors():
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        load_image(b"definitely not an image")
    buf = io.BytesIO()
    noise = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(buf, "JPEG")
    with pytest.raises(ImageDecodeError, match="damaged or truncated"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        load_image(buf.getvalue(), max_pixels=100)
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image("/nonexistent/x.png")

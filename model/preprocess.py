"""Images -> model input: decoding (EXIF-aware), the SAFA polar transform, resize, normalisation.

This module is the single place where pixels become tensors, used by training, index_build and
the service alike, so the three always feed the network the same thing.
"""
from __future__ import annotations

import io
import os
import re
from functools import lru_cache
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import L2LTRConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXIF_ORIENTATION = 0x0112

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the source."""


def load_image(source: ImageSource, name: str | None = None, max_pixels: int | None = None,
               reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode a path, bytes or PIL image to an RGB image with EXIF orientation applied.

    The whole image is decoded here, so truncated files fail now with a clear message instead of
    later inside a worker. `max_pixels` rejects decompression bombs before decoding the pixels
    (it counts the stored size). `reduce_to` (H, W): the image is only needed at that size, so a
    JPEG may be decoded at a 1/2, 1/4 or 1/8 scale directly (DCT scaling), never below (H, W).
    """
    if isinstance(source, Image.Image):
        img = source
        label = name or "image"
    else:
        label = name or (f"{len(source)}-byte upload" if isinstance(source, bytes) else str(source))
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except FileNotFoundError:
            raise ImageDecodeError(f"{label}: file not found") from None
        except (OSError, Image.DecompressionBombError, ValueError) as exc:
            raise ImageDecodeError(f"{label}: not a readable image ({exc})") from None
    try:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageDecodeError(f"{label}: {img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        if reduce_to is not None and img.format == "JPEG":
            h, w = reduce_to
            # The stored pixels are transposed by orientations 5-8: ask for the stored shape.
            img.draft("RGB", (h, w) if orientation in (5, 6, 7, 8) else (w, h))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        return img.convert("RGB") if img.mode != "RGB" else img
    except ImageDecodeError:
        raise
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{label}: image data is damaged or truncated ({exc})") from None


# --------------------------------------------------------------------------- polar transform

@lru_cache(maxsize=32)
def polar_sampling_grid(size: int, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile (row, col) coordinates for every polar pixel (i, j), per DESIGN.md (SAFA):
    r = (S/2) (H-1-i) / H, t = 2 pi j / W, row = S/2 + r cos t, col = S/2 - r sin t."""
    i = np.arange(out_h, dtype=np.float64)[:, None]
    j = np.arange(out_w, dtype=np.float64)[None, :]
    r = (size / 2.0) * (out_h - 1 - i) / out_h
    t = 2.0 * np.pi * j / out_w
    rows = size / 2.0 + r * np.cos(t)
    cols = size / 2.0 - r * np.sin(t)
    return rows, cols


def _square_side(h: int, w: int) -> int:
    if h != w:
        raise ValueError(f"the polar transform needs a square aerial tile, got {h}x{w}")
    return h


@lru_cache(maxsize=32)
def _polar_taps(size: int, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """The bilinear taps of every polar pixel: flat tile indices [4, out_h*out_w] and weights
    [4, out_h*out_w, 1] (zero for taps outside the tile). Computed once per geometry, so a tile
    costs four gathers and a weighted sum."""
    rows, cols = polar_sampling_grid(size, out_h, out_w)
    r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    fr, fc = (rows - r0).astype(np.float32), (cols - c0).astype(np.float32)
    index, weight = [], []
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            rr, cc = r0 + dr, c0 + dc
            inside = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            index.append((np.clip(rr, 0, size - 1) * size + np.clip(cc, 0, size - 1)).ravel())
            weight.append((wr * wc * inside).astype(np.float32).ravel()[:, None])
    return np.stack(index), np.stack(weight)


def polar_transform_numpy(tile: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """tile [S, S, C] (or [S, S]) -> [out_h, out_w, C] float32; bilinear, zero outside the tile."""
    arr = np.asarray(tile)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[:, :, None]
    size = _square_side(arr.shape[0], arr.shape[1])
    index, weight = _polar_taps(size, out_h, out_w)
    flat = arr.reshape(size * size, arr.shape[2])
    out = np.take(flat, index[0], axis=0) * weight[0]  # np.take: several times faster than flat[index]
    for k in range(1, 4):
        out += np.take(flat, index[k], axis=0) * weight[k]
    out = out.astype(np.float32, copy=False).reshape(out_h, out_w, arr.shape[2])
    return out[:, :, 0] if squeeze else out


def polar_transform_torch(tile: torch.Tensor, out_h: int, out_w: int,
                          centre_shift: torch.Tensor | None = None) -> torch.Tensor:
    """tile [..., C, S, S] -> [..., C, out_h, out_w]; the same sampling as the numpy version.
    `centre_shift` [N, 2] (rows down, columns right, pixels; N the flattened lead) moves each
    tile's polar centre: the view of a camera that far from the tile's centre (zero outside the tile)."""
    size = _square_side(tile.shape[-2], tile.shape[-1])
    rows, cols = polar_sampling_grid(size, out_h, out_w)
    # grid_sample with align_corners=True puts -1 and +1 on the centres of the first/last pixels.
    grid = np.stack([cols / (size - 1) * 2 - 1, rows / (size - 1) * 2 - 1], axis=-1)
    lead = tile.shape[:-3]
    x = tile.reshape(-1, *tile.shape[-3:])
    x = x if x.is_floating_point() else x.float()
    grid_t = torch.as_tensor(grid, dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1, -1)
    if centre_shift is not None:
        shift = centre_shift.to(device=x.device, dtype=x.dtype).reshape(-1, 2).flip(1) / (size - 1) * 2
        grid_t = grid_t + shift[:, None, None, :]
    out = F.grid_sample(x, grid_t, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(*lead, tile.shape[-3], out_h, out_w)


def polar_transform(tile, out_h: int, out_w: int):
    """Polar transform of a north-up square tile: numpy [S,S,C] or torch [...,C,S,S]."""
    if isinstance(tile, torch.Tensor):
        return polar_transform_torch(tile, out_h, out_w)
    if isinstance(tile, Image.Image):
        tile = np.asarray(tile)
    return polar_transform_numpy(tile, out_h, out_w)


# --------------------------------------------------------------------------- tensors

def _resize(img: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    h, w = size_hw
    return img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR)


def to_normalized_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 image -> [3, H, W] float32 with the ImageNet mean/std."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


_MEAN_NCHW = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD_NCHW = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def unit_batch(batch: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] uint8 images (as cached by training) -> [N, 3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)


def normalize_unit_batch(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] float in [0, 1] -> ImageNet-normalised network input."""
    return (x - _MEAN_NCHW) / _STD_NCHW


def normalize_uint8_batch(batch: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] uint8 images -> [N, 3, H, W] float32, same values as `to_normalized_tensor`
    applied to each image."""
    return normalize_unit_batch(unit_batch(batch))


def image_uint8(img: Image.Image | np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 image -> [3, H, W] uint8 tensor: the compact form in which model-size images
    travel between threads and processes until a whole batch is normalised at once."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def normalize_uint8_nchw(batch: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] uint8 (stacked `image_uint8`) -> network input, the same values as
    `to_normalized_tensor` applied to each image."""
    return normalize_unit_batch(batch.float().div_(255.0))


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


def ground_image(img: Image.Image, config: L2LTRConfig) -> Image.Image:
    """The panorama as the ground branch sees it (resized to config.ground_size)."""
    return _resize(_rgb(img), config.ground_size)


def load_ground_image(source: ImageSource, config: L2LTRConfig, name: str | None = None,
                      max_pixels: int | None = None) -> Image.Image:
    """A panorama file, bytes or image -> the ground branch's view of it. Training, evaluation and
    the service all read panoramas through here, so they see the same pixels.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that is still at least the model
    size (`load_image(reduce_to=...)`), then resized as any other image. A 512 x 128 panorama thus
    decodes straight to the tiny model's 256 x 64 in a third of the time of a full decode plus
    resize. The pixels differ from a bilinear downscale (a model trained on one and served the
    other loses about a point of R@1), which is why this is the one read path for all three."""
    h, w = config.ground_size
    return ground_image(load_image(source, name, max_pixels, reduce_to=(h, w)), config)


def aerial_image(img: Image.Image, config: L2LTRConfig) -> Image.Image:
    """The tile as the aerial branch sees it: polar-transformed (one- or two-step) or resized."""
    img = _rgb(img)
    if not config.polar:
        return _resize(img, config.aerial_size)
    step = config.polar_intermediate or config.aerial_size
    polar = polar_transform_numpy(np.asarray(img), *step)
    polar_img = Image.fromarray(np.clip(np.rint(polar), 0, 255).astype(np.uint8))
    return _resize(polar_img, config.aerial_size)


def ground_tensor(img: Image.Image, config: L2LTRConfig) -> torch.Tensor:
    return to_normalized_tensor(ground_image(img, config))


def aerial_tensor(img: Image.Image, config: L2LTRConfig) -> torch.Tensor:
    return to_normalized_tensor(aerial_image(img, config))


# --------------------------------------------------------------------------- limited field of view
# A street photo (pinhole, any heading, a tilted hand) or an equirectangular crop placed where it
# belongs in the panorama frame of DESIGN.md: column j of a W-column panorama looks at azimuth
# pi + 2 pi j / W clockwise from north (centre column north, left edge south), row i of an H-row
# panorama at elevation pi/2 - pi (i + 0.5) / H, the whole sphere, as worldgen renders them. What
# the photo does not see stays zero and is False in the returned mask.

def panorama_angles(out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(azimuth of every column [W], elevation of every row [H]) in radians of an (H, W) panorama."""
    h, w = out_size
    az = np.mod(np.pi + 2.0 * np.pi * np.arange(w) / w, 2.0 * np.pi)
    el = np.pi / 2.0 - np.pi * (np.arange(h) + 0.5) / h
    return az, el


def focal_length_px(hfov_deg: float, width: int) -> float:
    """Pinhole focal length in pixels of an image ``width`` pixels wide seeing ``hfov_deg``."""
    if not (0.0 < hfov_deg < 180.0):
        raise ValueError(f"hfov_deg: a pinhole camera sees less than 180 degrees, got {hfov_deg}")
    return (width / 2.0) / np.tan(np.radians(hfov_deg) / 2.0)


def perspective_project(az: np.ndarray, el: np.ndarray, hfov_deg: float, image_size: tuple[int, int],
                        heading_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0):
    """Where rays (azimuth clockwise from north, elevation; radians, any shape) land in a pinhole
    photo of ``image_size`` (H, W): (x, y, in_front) with x, y continuous image coordinates (0 at
    the left / top edge, pixel centres at k + 0.5).

    The camera (the same model as worldgen's ``perspective_angles``): principal point at the image
    centre, square pixels, optical axis at azimuth ``heading_deg`` and elevation ``pitch_deg``;
    ``roll_deg`` turns the camera clockwise about its optical axis as seen from behind it (its
    right side down). The orientation is heading, then pitch, then roll.
    """
    h, w = image_size
    f = focal_length_px(hfov_deg, w)
    east, north, up = np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)
    he, pi_, ro = np.radians(heading_deg), np.radians(pitch_deg), np.radians(roll_deg)
    # undo the heading (about the vertical), the pitch (about the camera's right axis), the roll
    right = east * np.cos(he) - north * np.sin(he)
    fwd = east * np.sin(he) + north * np.cos(he)
    fwd, up = fwd * np.cos(pi_) + up * np.sin(pi_), up * np.cos(pi_) - fwd * np.sin(pi_)
    right, up = right * np.cos(ro) - up * np.sin(ro), right * np.sin(ro) + up * np.cos(ro)
    in_front = fwd > 1e-9
    safe = np.where(in_front, fwd, 1.0)
    return w / 2.0 + f * right / safe, h / 2.0 - f * up / safe, in_front


def strong_edges(photo: Image.Image, hfov_deg: float, pixels: int = 1024 * 768) -> tuple[np.ndarray, ...]:
    """The photo's strong edge pixels: (x, y, angle, weight) [N] each (float32), x and y in
    normalised camera coordinates (right, up, over the focal length), the edge's angle from the
    image's vertical in degrees [-90, 90), its gradient magnitude as the weight.

    The photo is brought to about ``pixels`` pixels, whatever its size and shape, so the cost is
    bounded (1024 x 768 for a 4:3 photo: thin verticals, trunks and poles, vanish at half that
    width: 7.7% of the tuning photos were more than 3 deg off at 512 pixels, 1.3% at 1024), and
    lightly blurred (sigma 1.2 px, in float: blurring the 8-bit image costs precision); a strong
    edge pixel is one of the top 10% of gradient magnitudes. (Leaving out the border, whose
    gradients are one-sided, was tried on the tuning photos: no better.)"""
    from scipy import ndimage

    grey = photo.convert("L")
    scale = float(np.sqrt(pixels / (grey.width * grey.height)))
    grey = grey.resize((max(3, round(grey.width * scale)), max(3, round(grey.height * scale))), Image.BILINEAR)
    a = ndimage.gaussian_filter(np.asarray(grey, np.float32), 1.2)
    h, w = a.shape
    gx, gy = np.zeros_like(a), np.zeros_like(a)
    gx[:, 1:-1], gy[1:-1, :] = a[:, 2:] - a[:, :-2], a[2:, :] - a[:-2, :]
    magnitude = np.hypot(gx, gy)
    ys, xs = np.nonzero(magnitude > np.percentile(magnitude, 90))
    angle = (np.degrees(np.arctan2(-gy[ys, xs], gx[ys, xs])) + 90.0) % 180.0 - 90.0
    f = np.float32(focal_length_px(hfov_deg, w))
    x, y = xs.astype(np.float32) + np.float32(0.5 - w / 2), np.float32(h / 2 - 0.5) - ys.astype(np.float32)
    return x / f, y / f, angle.astype(np.float32), magnitude[ys, xs]


def _off_vertical(edges: tuple[np.ndarray, ...], pitch_deg: np.ndarray, roll_deg: np.ndarray) -> np.ndarray:
    """[M, N] float32: each edge's angle off the world's vertical as a camera of pitch_deg[m] and
    roll_deg[m] sees it at that edge's pixel, degrees in [-90, 90].

    World verticals seen by a pinhole camera of pitch p and roll r run, at a pixel (x, y), along
    the image direction (U_r - x U_f, U_u - y U_f), U = (-cos p sin r, cos p cos r, sin p) being the
    world's up in camera axes (right, up, forward)."""
    x, y, angle, _ = edges
    p = np.radians(np.asarray(pitch_deg, np.float32))[:, None]
    r = np.radians(np.asarray(roll_deg, np.float32))[:, None]
    up_r, up_u, up_f = -np.cos(p) * np.sin(r), np.cos(p) * np.cos(r), np.sin(p)
    # in place and float32, the angle wrapped by rint (a float % is slow): ~2x faster
    off = np.arctan2(x * up_f - up_r, up_u - y * up_f)
    off *= np.float32(-180.0 / np.pi)
    off += angle
    off -= np.float32(180.0) * np.rint(off * np.float32(1.0 / 180.0))
    return off


def near_verticals(edges: tuple[np.ndarray, ...], pitch_deg: float = 0.0, roll_deg: float = 0.0,
                   window_deg: float = 10.0) -> tuple[np.ndarray, ...]:
    """The ``edges`` (`strong_edges`) within ``window_deg`` of the verticals a camera of that pitch
    and roll sees (level: of the image's vertical)."""
    keep = np.abs(_off_vertical(edges, [pitch_deg], [roll_deg])[0]) < window_deg
    return tuple(a[keep] for a in edges)


def tilt_scores(edges: tuple[np.ndarray, ...], pitch_deg: np.ndarray, roll_deg: np.ndarray,
                spread_deg: float = 3.0) -> np.ndarray:
    """How well ``edges`` follow the verticals of a camera pitched by each ``pitch_deg`` and rolled
    by the matching ``roll_deg`` [M]: [M], a share of their total weight. Each edge adds its weight
    x exp(-(its angle off that camera's vertical there (`_off_vertical`) / spread)^2)."""
    weight = edges[3]
    out = np.empty(len(pitch_deg))
    for start in range(0, len(out), 64):  # [64, N] at a time
        off = _off_vertical(edges, pitch_deg[start:start + 64], roll_deg[start:start + 64])
        off *= np.float32(1.0 / spread_deg)
        np.exp(-np.square(off, out=off), out=off)
        # a sum, not `@`: a BLAS product would wake BLAS threads that spin on the encoder threads' cores
        out[start:start + 64] = (off * weight).sum(axis=1)
    return out / max(float(weight.sum()), 1e-9)


def estimate_photo_tilt(photo: Image.Image, hfov_deg: float, span_deg: float = 6.0,
                        wide_span_deg: float = 12.0) -> tuple[float, float]:
    """A pinhole photo's (pitch, roll) in degrees (`perspective_project`'s conventions), from its
    near-vertical edges (`near_verticals` of a level camera): the best of a 1 deg grid within +-span
    (`tilt_scores`), refined in 0.1 deg steps within +-0.5 deg of it; level when no verticals are
    found. Where the grid's best lies on its edge (a phone pointed up or down more), a grid within
    +-wide_span instead, then the edges taken again around the verticals of its best camera (a
    level camera's window cuts off those of a camera rolled by 10 deg) and a grid within +-2 deg of
    it before the refinement; level when even the wide grid's best lies on its edge. Measured in
    bench/tilt_estimate.py."""
    edges = strong_edges(photo, hfov_deg)
    near = near_verticals(edges)
    if not len(near[0]):
        return 0.0, 0.0

    def best(near: tuple[np.ndarray, ...], pitches: np.ndarray, rolls: np.ndarray) -> tuple[float, float]:
        p, r = (g.ravel() for g in np.meshgrid(pitches, rolls, indexing="ij"))
        k = int(np.argmax(tilt_scores(near, p, r)))
        return float(p[k]), float(r[k])

    def on_edge(pitch: float, roll: float, grid: np.ndarray) -> bool:
        return max(abs(pitch), abs(roll)) >= grid[-1]

    grid = np.arange(-span_deg, span_deg + 1e-9, 1.0)
    pitch, roll = best(near, grid, grid)
    if on_edge(pitch, roll, grid):
        grid = np.arange(-wide_span_deg, wide_span_deg + 1e-9, 1.0)
        pitch, roll = best(near, grid, grid)
        if on_edge(pitch, roll, grid):
            return 0.0, 0.0
        near = near_verticals(edges, pitch, roll)
        around = np.arange(-2.0, 2.0 + 1e-9, 1.0)
        pitch, roll = best(near, pitch + around, roll + around)
    fine = np.round(np.arange(-0.5, 0.5 + 1e-9, 0.1), 1)
    pitch, roll = best(near, pitch + fine, roll + fine)
    return round(pitch, 2), round(roll, 2)


def _rgb_array(image, what: str) -> np.ndarray:
    arr = np.asarray(_rgb(image)) if isinstance(image, Image.Image) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{what}: expected an RGB image (PIL, or uint8 H x W x 3), got {arr.dtype} {arr.shape}")
    return arr


def _box_reduced(arr: np.ndarray, max_w: int, max_h: int) -> np.ndarray:
    """Area-average ``arr`` down to at most (max_w, max_h), per axis, never up: a photo is far finer
    than a model-size panorama and would alias if sampled point-wise."""
    h, w = arr.shape[:2]
    nw, nh = min(w, max(2, max_w)), min(h, max(2, max_h))
    if (nw, nh) == (w, h):
        return arr
    return np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BOX))


def _bilinear(arr: np.ndarray, x: np.ndarray, y: np.ndarray, wrap_x: bool = False) -> np.ndarray:
    """Sample ``arr`` [h, w, C] at index coordinates (pixel centres at integers), edges clamped
    (or wrapped along x): float32 [..., C]."""
    h, w = arr.shape[:2]
    y = np.clip(y, 0, h - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 2, 0))
    y1 = np.minimum(y0 + 1, h - 1)
    fy = (y - y0).astype(np.float32)[..., None]
    if wrap_x:
        x0f = np.floor(x)
        fx = (x - x0f).astype(np.float32)[..., None]
        x0 = np.mod(x0f.astype(np.int64), w)
        x1 = np.mod(x0 + 1, w)
    else:
        x = np.clip(x, 0, w - 1)
        x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 2, 0))
        x1 = np.minimum(x0 + 1, w - 1)
        fx = (x - x0).astype(np.float32)[..., None]
    a = arr.astype(np.float32, copy=False)
    top = a[y0, x0] * (1 - fx) + a[y0, x1] * fx
    bottom = a[y1, x0] * (1 - fx) + a[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _masked_uint8(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape + (values.shape[-1],), np.uint8)
    out[mask] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


def perspective_to_panorama(image, hfov_deg: float, heading_deg: float, out_size: tuple[int, int],
                            pitch_deg: float = 0.0, roll_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A pinhole photo -> (panorama [H, W, 3] uint8, covered [H, W] bool) of ``out_size`` (H, W).

    Every panorama pixel whose ray the photo sees (camera: ``perspective_project``; heading in
    degrees clockwise from north of the optical axis) takes the photo's colour there (bilinear,
    after an area-average of the photo down to about the panorama's angular resolution); every
    other pixel is zero and False in the mask. A level photo with horizontal field of view F
    thus fills F/360 of the columns, centred on the heading's column, and the rows of its
    vertical field of view around the horizon, at the elevations the panoramas have there.
    """
    arr = _rgb_array(image, "perspective_to_panorama image")
    h, w = arr.shape[:2]
    out_h, out_w = out_size
    f = focal_length_px(hfov_deg, w)
    # a photo pixel at the centre subtends 1/f rad; a panorama column 2 pi/W, a row pi/H
    small = _box_reduced(arr, int(round(w * out_w / (2 * np.pi * f))), int(round(h * out_h / (np.pi * f))))
    az, el = panorama_angles(out_size)
    x, y, in_front = perspective_project(az[None, :], el[:, None], hfov_deg, (h, w), heading_deg, pitch_deg,
                                         roll_deg)
    covered = in_front & (x >= 0) & (x <= w) & (y >= 0) & (y <= h)
    sh, sw = small.shape[:2]
    values = _bilinear(small, x[covered] * (sw / w) - 0.5, y[covered] * (sh / h) - 0.5)
    return _masked_uint8(values, covered), covered


def crop_panorama_fov(pano, fov_deg: float, heading_deg: float = 0.0) -> np.ndarray:
    """The equirectangular crop of a north-centred panorama [H, W, 3] that sees ``fov_deg``
    around ``heading_deg``: round(W * fov / 360) columns at the panorama's angular step, the
    middle one (index width // 2) looking at the heading, all rows. worldgen's ``--fov`` with
    ``--heading-jitter`` renders exactly this (bilinear along the columns when the heading is not
    a whole number of columns)."""
    arr = _rgb_array(pano, "crop_panorama_fov panorama")
    h, w = arr.shape[:2]
    if not (0.0 < fov_deg <= 360.0):
        raise ValueError(f"fov_deg must be in (0, 360], got {fov_deg}")
    crop_w = max(1, int(round(w * fov_deg / 360.0)))
    cols = w / 2.0 + heading_deg / 360.0 * w + np.arange(crop_w) - crop_w // 2
    rows = np.broadcast_to(np.arange(h, dtype=np.float64)[:, None], (h, crop_w))
    values = _bilinear(arr, np.broadcast_to(cols[None, :], (h, crop_w)), rows, wrap_x=True)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def equirect_crop_to_panorama(crop, fov_deg: float, heading_deg: float,
                              out_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An equirectangular crop -> (panorama [H, W, 3] uint8, covered [H, W] bool) of ``out_size``.

    The crop (as ``crop_panorama_fov`` or worldgen ``--fov`` make it): ``fov_deg`` wide over its
    columns (a step of fov / width; give its true width, e.g. cameras.csv ``hfov_deg``), the
    middle column (index width // 2) looking at ``heading_deg`` clockwise from north, and the
    panoramas' full 180 degrees of elevation over its rows. It lands on fov/360 of the columns at
    its azimuths; the other columns are zero and False in the mask.
    """
    arr = _rgb_array(crop, "equirect_crop_to_panorama crop")
    h, w = arr.shape[:2]
    out_h, out_w = out_size
    if not (0.0 < fov_deg <= 360.0):
        raise ValueError(f"fov_deg must be in (0, 360], got {fov_deg}")
    step = np.radians(fov_deg) / w  # per crop column
    full_circle = fov_deg >= 360.0
    small = _box_reduced(arr, int(round(out_w * fov_deg / 360.0)), out_h)  # to the panorama's angular step
    az, _ = panorama_angles(out_size)
    rel = np.mod(az - np.radians(heading_deg) + np.pi, 2 * np.pi) - np.pi
    col = rel / step + w // 2  # index coordinate in the crop
    col_ok = np.ones(out_w, bool) if full_circle else (col >= -0.5) & (col <= w - 0.5)
    covered = np.broadcast_to(col_ok[None, :], (out_h, out_w))
    sh, sw = small.shape[:2]
    x = np.broadcast_to(((col + 0.5) * (sw / w) - 0.5)[None, :], (out_h, out_w))
    y = np.broadcast_to(((np.arange(out_h) + 0.5) * (sh / out_h) - 0.5)[:, None], (out_h, out_w))
    values = _bilinear(small, x[covered], y[covered], wrap_x=full_circle)
    return _masked_uint8(values, covered), np.array(covered)


EXIF_IFD_POINTER = 0x8769
EXIF_GPS_IFD_POINTER = 0x8825
EXIF_FOCAL_LENGTH_35MM = 0xA405
EXIF_GPS_IMG_DIRECTION_REF = 0x0010
EXIF_GPS_IMG_DIRECTION = 0x0011


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as it is shown: EXIF orientations 5-8 store it on its side."""
    width, height = img.size
    return (height, width) if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def exif_camera(source: ImageSource, name: str | None = None) -> tuple[float | None, float | None]:
    """(horizontal field of view, heading) in degrees from a photo's EXIF; None where not stated.

    The field of view comes from FocalLengthIn35mmFilm read against the 36 mm frame width,
    hfov = 2 atan(18 / f35), the convention worldgen writes (phones often derive that tag from the
    frame diagonal instead, which this reading makes a few percent too wide). The 36 mm are the
    frame's long side: a portrait photo (upright, after its EXIF orientation) spans 36 mm x
    width / height across. The heading is GPSImgDirection when GPSImgDirectionRef says true north
    ('T'); a magnetic one is not used. Only the header is read, not the pixels.
    """
    label = name or (f"{len(source)}-byte upload" if isinstance(source, bytes) else str(source))
    try:
        img = source if isinstance(source, Image.Image) else Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source)
        exif = img.getexif()
        f35 = exif.get_ifd(EXIF_IFD_POINTER).get(EXIF_FOCAL_LENGTH_35MM)
        gps = exif.get_ifd(EXIF_GPS_IFD_POINTER)
        width, height = upright_size(img)
    except FileNotFoundError:
        raise ImageDecodeError(f"{label}: file not found") from None
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{label}: not a readable image ({exc})") from None
    focal = _finite(f35)  # untrusted: a tag may hold text, several values, 0/0
    half_width_mm = 18.0 * min(1.0, width / height)
    hfov = float(np.degrees(2.0 * np.arctan(half_width_mm / focal))) \
        if focal is not None and 1.0 <= focal <= 5000.0 else None
    heading = None
    direction = _finite(gps.get(EXIF_GPS_IMG_DIRECTION))
    if direction is not None and str(gps.get(EXIF_GPS_IMG_DIRECTION_REF, "")).strip().upper() == "T":
        heading = direction % 360.0
    return hfov, heading


def _finite(value) -> float | None:
    """An EXIF number as a finite float, or None (missing, text, a tuple, NaN, infinite)."""
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if np.isfinite(number) else None


_GPANO_HEADING = re.compile(rb"GPano:PoseHeadingDegrees\s*(?:=\s*[\"']([^\"'<>]{1,40})[\"']|>([^<>]{1,40})<)")


def xmp_panorama_heading(image: Image.Image) -> float | None:
    """The heading of an image's centre, degrees clockwise from true north, from its XMP Photo Sphere
    metadata (Google's GPano:PoseHeadingDegrees, as Street View style panoramas carry it; in JPEG,
    WebP or PNG, as an attribute or an element); None when absent or not a number in [0, 360].
    The XMP is searched as text, never parsed as XML (an upload's XML is untrusted)."""
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    if not isinstance(xmp, bytes):
        return None
    found = _GPANO_HEADING.search(xmp[:1 << 20])
    heading = _finite((found.group(1) or found.group(2)).decode("ascii", "replace").strip()) if found else None
    return heading % 360.0 if heading is not None and 0.0 <= heading <= 360.0 else None


EXIF_GPS_LATITUDE_REF, EXIF_GPS_LATITUDE = 0x0001, 0x0002
EXIF_GPS_LONGITUDE_REF, EXIF_GPS_LONGITUDE = 0x0003, 0x0004


def exif_gps(source: ImageSource) -> tuple[float, float] | None:
    """(lat, lon) in degrees from a photo's EXIF GPSLatitude/GPSLongitude (degrees, minutes, seconds
    with their N/S, E/W references); None when absent, incomplete, unreadable or out of range."""
    try:
        img = source if isinstance(source, Image.Image) else Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source)
        gps = img.getexif().get_ifd(EXIF_GPS_IFD_POINTER)
        values = []
        for tag, ref_tag, negative in ((EXIF_GPS_LATITUDE, EXIF_GPS_LATITUDE_REF, "S"),
                                       (EXIF_GPS_LONGITUDE, EXIF_GPS_LONGITUDE_REF, "W")):
            d, m, s = (float(part) for part in gps[tag])
            sign = -1.0 if str(gps.get(ref_tag, "")).strip().upper() == negative else 1.0
            values.append(sign * (d + m / 60.0 + s / 3600.0))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OSError, SyntaxError, Image.DecompressionBombError):
        return None
    lat, lon = values
    return (lat, lon) if np.isfinite(lat) and np.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180 else None

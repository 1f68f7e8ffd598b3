"""Training-time augmentation of (panorama, aerial) pairs that keeps the two views aligned.

A panorama's columns sweep the azimuth clockwise (south, west, north at the centre, east) and
so do the columns of a polar-transformed tile (DESIGN.md). Turning the whole scene about the
camera is therefore the same circular column shift in both images, and mirroring it east-west
is the same column flip, so a pair stays a true match after either. For a plain (not polar)
aerial tile the turn is limited to quarter turns (`rot90`) and the mirror is a left-right flip.
Photometric jitter is drawn independently per view, as the two views were taken under
different light anyway. A limited field of view (`limit_fields_of_view`) is drawn for the ground
view alone: the part of the panorama a phone photo or a crop would have seen, anywhere around the
camera, the rest set to the mean colour (model.views), while the aerial view stays whole.

Every draw comes from a `torch.Generator` the caller seeds, so a resumed training run replays
exactly the augmentation of an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PHOTO_MASKS = ("band", "pinhole")


@dataclass(frozen=True)
class PairAugment:
    """Aligned geometric + independent photometric augmentation on [B, 3, H, W] images in [0, 1]."""

    turn: float = 0.5  # probability of a random turn of the scene about the camera (both views)
    flip: float = 0.5  # probability of the east-west mirror (both views)
    color: float = 0.3  # strength of brightness / contrast / saturation / tint jitter (0: none)
    fov: float = 0.0  # probability of limiting the panorama to a random field of view
    fov_range: tuple[float, float] = (60.0, 240.0)  # its horizontal extent, degrees (uniform)
    photo: float = 0.5  # share of the limited views that are a phone photo's frame (4:3, level)
    photo_fov_range: tuple[float, float] | None = None  # a photo's horizontal extent (None: fov_range)
    photo_mask: str = "band"  # "band": the rows of the frame's vertical fov; "pinhole": its exact outline
    photo_tilt: float = 0.0  # a photo's pitch and roll, each uniform in +-this (degrees), read as level

    def __post_init__(self):
        if self.photo_mask not in PHOTO_MASKS:
            raise ValueError(f"photo_mask must be one of {PHOTO_MASKS}, got {self.photo_mask!r}")

    def __call__(self, ground: torch.Tensor, aerial: torch.Tensor, polar: bool,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if ground.shape[0] != aerial.shape[0]:
            raise ValueError(f"batch sizes differ: ground {ground.shape[0]}, aerial {aerial.shape[0]}")
        b = ground.shape[0]
        flips = torch.rand(b, generator=generator) < self.flip
        turned = torch.rand(b, generator=generator) < self.turn
        if polar:
            turns = torch.rand(b, generator=generator) * turned
            ground = turn_columns(ground, turns, flips)
            aerial = turn_columns(aerial, turns, flips)
        else:
            quarters = torch.randint(0, 4, (b,), generator=generator) * turned
            ground = turn_columns(ground, quarters.float() / 4, flips)
            aerial = turn_tile(aerial, quarters, flips)
        if self.color > 0:
            ground = jitter_colour(ground, self.color, generator)
            aerial = jitter_colour(aerial, self.color, generator)
        if self.fov > 0:
            ground = limit_fields_of_view(ground, self.fov, self.fov_range, generator, photo=self.photo,
                                          photo_fov_range=self.photo_fov_range, photo_mask=self.photo_mask,
                                          photo_tilt=self.photo_tilt)
        return ground, aerial


def turn_columns(images: torch.Tensor, turns: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror (where `flips`) then turn each image clockwise by `turns` (fraction of a full turn)
    as a circular column shift; for panoramas and polar tiles, whose columns are azimuths."""
    b, c, h, w = images.shape
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols)
    shift = torch.round(turns * w).long()[:, None]
    src = torch.gather(cols, 1, (torch.arange(w)[None] - shift) % w)
    return torch.gather(images, 3, src[:, None, None, :].expand(b, c, h, w))


def turn_tile(tiles: torch.Tensor, quarters: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror (where `flips`) then turn each north-up tile clockwise by `quarters` quarter turns."""
    out = torch.where(flips[:, None, None, None], tiles.flip(3), tiles)
    return torch.stack([torch.rot90(t, -int(q), dims=(1, 2)) for t, q in zip(out, quarters)])


def jitter_colour(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation and per-channel tint, one draw per image."""
    b = images.shape[0]

    def factor(*shape):
        return 1.0 + strength * (2.0 * torch.rand(b, *shape, generator=generator) - 1.0)

    x = images * factor(1, 1, 1)
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey.mean(dim=(2, 3), keepdim=True)) * factor(1, 1, 1) + grey.mean(dim=(2, 3), keepdim=True)
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * factor(1, 1, 1)
    x = x * (1.0 + 0.5 * (factor(3, 1, 1) - 1.0))
    return x.clamp_(0.0, 1.0)


def limit_fields_of_view(images: torch.Tensor, probability: float, fov_range: tuple[float, float],
                         generator: torch.Generator, photo: float = 0.5,
                         photo_fov_range: tuple[float, float] | None = None,
                         photo_mask: str = "band", photo_tilt: float = 0.0) -> torch.Tensor:
    """Panoramas [B, 3, H, W] in [0, 1] (rows spanning 180 degrees of elevation), each with
    ``probability`` cut to a random horizontal field of view from ``fov_range`` centred on a random
    column; a share ``photo`` of those is a phone's level 4:3 frame of that width instead (its
    horizontal field from ``photo_fov_range`` when given, below 170 degrees), as `model.views.place_view`
    masks a photo. ``photo_mask`` "band": the frame cuts the rows to its vertical field of view at
    every column (the frame's height at its centre); "pinhole": to the frame's true outline, which
    narrows towards its left and right edges (a ray at azimuth a off the axis and elevation e is in a
    4:3 frame of horizontal field F when |tan e| <= 0.75 tan(F/2) cos a). Outside it: the ImageNet
    mean colour, which the normalised input reads as zero. ``photo_tilt`` > 0: a photo's camera had
    a pitch and a roll, each uniform in +-photo_tilt degrees, and the photo is placed as if level, as
    a photo whose tilt is neither sent nor estimated (`tilt_panoramas`)."""
    from .preprocess import IMAGENET_MEAN

    if photo_mask not in PHOTO_MASKS:
        raise ValueError(f"photo_mask must be one of {PHOTO_MASKS}, got {photo_mask!r}")
    b, _, h, w = images.shape
    limited = torch.rand(b, generator=generator) < probability
    fov = fov_range[0] + (fov_range[1] - fov_range[0]) * torch.rand(b, generator=generator)
    centre = torch.rand(b, generator=generator) * w
    is_photo = torch.rand(b, generator=generator) < photo
    if photo_fov_range is not None:  # drawn after the others: without it, a seed cuts as it always did
        photo_fov = photo_fov_range[0] + (photo_fov_range[1] - photo_fov_range[0]) * torch.rand(b, generator=generator)
        fov = torch.where(is_photo, photo_fov, fov)
    is_photo = is_photo & (fov < 170)
    half = torch.deg2rad(fov.clamp(max=170) / 2)
    offset = (torch.arange(w) + 0.5)[None, :] - centre[:, None]
    offset = (offset + w / 2) % w - w / 2  # circular distance to the centre column
    keep_cols = offset.abs() <= (fov / 360.0 * w / 2)[:, None]
    rows = ((torch.arange(h) + 0.5) - h / 2).abs()[None, :]
    if photo_mask == "band":
        # a pinhole 4:3 frame of horizontal field f sees 2 atan(0.75 tan(f/2)) vertically (f < 180)
        vfov = torch.where(is_photo, 2 * torch.rad2deg(torch.atan(0.75 * torch.tan(half))), torch.full_like(fov, 180.0))
        keep_rows = (rows <= (vfov / 180.0 * h / 2)[:, None])[:, :, None].expand(b, h, w)
    else:
        elevation = rows / h * torch.pi  # [1, H] |elevation| of each row's centre, radians
        azimuth = (offset.abs() / w * 2 * torch.pi).clamp(max=torch.pi / 2)  # [B, W] off the axis
        inside = (torch.tan(elevation.clamp(max=torch.pi / 2 - 1e-6))[:, :, None]
                  <= (0.75 * torch.tan(half))[:, None, None] * torch.cos(azimuth)[:, None, :])  # [B, H, W]
        keep_rows = inside | ~is_photo[:, None, None]
    if photo_tilt > 0:  # drawn last: without it, a seed cuts as it always did
        pitch, roll = photo_tilt * (2 * torch.rand(2, b, generator=generator) - 1)
        tilted = is_photo & limited
        if tilted.any():  # resample only the photos (out of place: the caller's batch stays as it was)
            images = images.index_put((tilted,), tilt_panoramas(images[tilted], centre[tilted], pitch[tilted],
                                                                roll[tilted]))
    keep = (keep_rows & keep_cols[:, None, :]) | ~limited[:, None, None]
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    return torch.where(keep[:, None], images, mean)


def tilt_panoramas(images: torch.Tensor, centre: torch.Tensor, pitch_deg: torch.Tensor,
                   roll_deg: torch.Tensor) -> torch.Tensor:
    """What a camera looking at column ``centre`` [B] (fractional, 0..W) with a pitch and a roll [B]
    (degrees) saw, placed in the frame of a level camera: the sphere of each panorama [B, 3, H, W]
    (rows from +90 to -90 degrees of elevation) turned about the view's right axis (pitch, up
    positive) and its optical axis (roll: positive turns the camera's right side up, the opposite of
    `model.preprocess.perspective_project`'s roll; the training draws are symmetric), resampled
    bilinearly (columns wrap around)."""
    b, c, h, w = images.shape
    elevation = (0.5 - (torch.arange(h) + 0.5) / h) * torch.pi  # [H]
    azimuth = ((torch.arange(w) + 0.5)[None, :] - centre[:, None]) / w * 2 * torch.pi  # [B, W] from the view axis
    e, a = elevation[None, :, None], azimuth[:, None, :]
    x, y, z = torch.cos(e) * torch.cos(a), torch.cos(e) * torch.sin(a), torch.sin(e).expand(b, h, w)
    p, r = torch.deg2rad(pitch_deg)[:, None, None], torch.deg2rad(roll_deg)[:, None, None]
    y, z = y * torch.cos(r) - z * torch.sin(r), y * torch.sin(r) + z * torch.cos(r)  # roll about the axis
    x, z = x * torch.cos(p) - z * torch.sin(p), x * torch.sin(p) + z * torch.cos(p)  # pitch about the right axis
    source_col = (centre[:, None, None] + torch.atan2(y, x) / (2 * torch.pi) * w) % w  # [B, H, W] in 0..W
    source_row = (0.5 - torch.asin(z.clamp(-1, 1)) / torch.pi) * h
    padded = torch.cat([images[..., -1:], images, images[..., :1]], dim=3)  # a column either side: wrap-around
    grid = torch.stack([(source_col + 1) / (w + 2) * 2 - 1, source_row / h * 2 - 1], dim=-1)
    return torch.nn.functional.grid_sample(padded, grid.to(images.dtype), mode="bilinear",
                                           padding_mode="border", align_corners=False)

"""Street-level views that are not a north-aligned, full panorama: any heading, a limited field of view.

Everything happens in the ground branch's panorama frame (DESIGN.md: columns run clockwise, the left
edge looks south, the centre column north; the rows of a synthetic panorama span +90 to -90 degrees
of elevation). A view whose centre column looks at azimuth ``h`` is the north-aligned panorama of the
same place with its columns turned (`rotate_view`), and the polar aerial image of that place turns the
same way, so one descriptor of a view can be compared with an aerial tile seen at any heading: the
tile's descriptors at ``rotations`` evenly spaced headings (`describe_rotations`) are searched, the
best one gives the match and the view's heading (`match_over_rotations`, `refine_heading`).

A limited field of view keeps the columns (and, for a photo, the rows) it saw and fills the rest with
the ImageNet mean colour, which the normalised network input reads as zero (`limit_fov`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .preprocess import IMAGENET_MEAN

MEAN_RGB = np.array([round(255 * m) for m in IMAGENET_MEAN], dtype=np.uint8)


def column_shift(width: int, heading_deg: float) -> int:
    """Columns by which a north-aligned view rolls to look at ``heading_deg`` (clockwise from north)."""
    return -int(round(heading_deg / 360.0 * width))


def rotate_view(views: np.ndarray, heading_deg: float) -> np.ndarray:
    """[..., H, W, C] views whose centre column looks north -> the same views centred on
    ``heading_deg``; a negative heading turns back (a view centred on h, turned by -h, is north-aligned)."""
    return np.roll(views, column_shift(views.shape[-2], heading_deg), axis=-2)


def fov_columns(width: int, fov_deg: float) -> np.ndarray:
    """[W] bool: the columns within +-fov/2 of the centre column."""
    centre_offset = (np.arange(width) + 0.5) - width / 2
    return np.abs(centre_offset) <= fov_deg / 360.0 * width / 2


def fov_rows(height: int, vfov_deg: float) -> np.ndarray:
    """[H] bool: the rows within +-vfov/2 of the horizon (rows span 180 degrees of elevation)."""
    centre_offset = (np.arange(height) + 0.5) - height / 2
    return np.abs(centre_offset) <= vfov_deg / 180.0 * height / 2


def limit_fov(views: np.ndarray, fov_deg: float, vfov_deg: float | None = None) -> np.ndarray:
    """[..., H, W, 3] uint8 views, each centred on its heading -> a copy in which only the centre
    ``fov_deg`` of azimuth (and ``vfov_deg`` of elevation about the horizon) is kept; the rest is
    the mean colour."""
    if not 0 < fov_deg <= 360:
        raise ValueError(f"fov_deg must be in (0, 360], got {fov_deg}")
    h, w = views.shape[-3:-1]
    keep = np.outer(fov_rows(h, vfov_deg) if vfov_deg is not None else np.ones(h, bool), fov_columns(w, fov_deg))
    out = views.copy()
    out[..., ~keep, :] = MEAN_RGB
    return out


def photo_outline(height: int, width: int, hfov_deg: float, aspect: float = 0.75) -> np.ndarray:
    """[H, W] bool: the pixels of a panorama frame that a level pinhole photo of horizontal field
    ``hfov_deg`` and height / width ``aspect``, looking at the centre column (index W // 2), sees
    (as `place_view` masks it): a ray at azimuth a off the axis and elevation e lands in the frame when |a| < fov/2
    and |tan e| <= aspect tan(fov/2) cos a, so the frame spans its vertical field of view at its
    centre and narrows towards its left and right edges."""
    if not 0 < hfov_deg < 180:
        raise ValueError(f"hfov_deg: a pinhole photo sees less than 180 degrees, got {hfov_deg}")
    azimuth = np.abs(np.arange(width) - width / 2) / width * 2 * np.pi  # column j looks at 2 pi (j - W/2) / W
    elevation = np.abs((np.arange(height) + 0.5) - height / 2) / height * np.pi
    half = np.radians(hfov_deg) / 2
    inside = (np.tan(np.minimum(elevation, np.pi / 2 - 1e-6))[:, None]
              <= aspect * np.tan(half) * np.cos(np.minimum(azimuth, np.pi / 2))[None, :])
    return inside & (azimuth <= half)[None, :]


def limit_photo(views: np.ndarray, hfov_deg: float, aspect: float = 0.75) -> np.ndarray:
    """[..., H, W, 3] uint8 views, each centred on its heading -> a copy cut to a level pinhole
    photo's outline (`photo_outline`), the rest the mean colour."""
    h, w = views.shape[-3:-1]
    out = views.copy()
    out[..., ~photo_outline(h, w, hfov_deg, aspect), :] = MEAN_RGB
    return out


def tilt_view(view: np.ndarray, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """A view [H, W, 3] uint8 centred on its heading -> what a camera looking there with that pitch
    and roll saw (`place_view`'s conventions: pitch up positive, roll clockwise seen from behind the
    camera), placed as if level, as `place_view` places a photo whose tilt is not given; cut it with
    `limit_photo`. `model.augment.tilt_panoramas` turns the sphere; its roll turns the other way."""
    import torch

    from .augment import tilt_panoramas

    w = view.shape[1]
    images = torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)[None].float()
    centre = torch.tensor([w / 2 + 0.5])  # the centre of column W // 2, which looks at the heading
    tilted = tilt_panoramas(images, centre, torch.tensor([float(pitch_deg)]), torch.tensor([-float(roll_deg)]))
    return tilted[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def rotation_headings(rotations: int) -> np.ndarray:
    """The headings (degrees) of ``rotations`` evenly spaced turns, starting at north."""
    if rotations < 1:
        raise ValueError(f"rotations must be >= 1, got {rotations}")
    return np.arange(rotations) * (360.0 / rotations)


def describe_rotations(encode: Callable[[np.ndarray], np.ndarray], views: np.ndarray,
                       rotations: int) -> np.ndarray:
    """Descriptors [R, N, D] of north-aligned views [N, H, W, 3] turned to each of the rotation
    headings; ``encode`` maps uint8 views to unit rows. For polar aerial images: the tile as a view
    centred on each heading would see it."""
    return np.stack([encode(rotate_view(views, h)) for h in rotation_headings(rotations)])


def match_over_rotations(queries: np.ndarray, rotated: np.ndarray,
                         chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D], rotated gallery [R, N, D] -> (scores [Q, N]: the best over the rotations,
    best [Q, N]: which rotation)."""
    q = np.asarray(queries, dtype=np.float32)
    scores = np.empty((len(q), rotated.shape[1]), np.float32)
    best = np.empty((len(q), rotated.shape[1]), np.int32)
    for s in range(0, len(q), chunk):
        sims = np.einsum("qd,rnd->rqn", q[s:s + chunk], rotated, optimize=True)
        best[s:s + chunk] = sims.argmax(axis=0)
        scores[s:s + chunk] = sims.max(axis=0)
    return scores, best


def refine_heading(rotation_scores: np.ndarray) -> float:
    """The heading (degrees in [0, 360)) of the best of R evenly spaced rotations, refined by a
    parabola through it and its two circular neighbours: between the rotations' grid points."""
    return float(refine_headings(np.asarray(rotation_scores)[None])[0])


def refine_headings(rotation_scores: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """`refine_heading` of each row of [N, R] scores at once -> [N] degrees; with ``allowed`` [R] bool, the
    best of the allowed rotations only, refined by its neighbours' scores all the same."""
    s = np.asarray(rotation_scores, dtype=np.float64)
    n, r = s.shape
    best = np.argmax(s if allowed is None else np.where(allowed, s, -np.inf), axis=1)
    if r < 3:
        return best * 360.0 / r
    rows = np.arange(n)
    left, mid, right = s[rows, (best - 1) % r], s[rows, best], s[rows, (best + 1) % r]
    curvature = left - 2 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0, np.clip(0.5 * (left - right) / curvature, -0.5, 0.5), 0.0)
    return ((best + offset) * 360.0 / r) % 360.0


def angle_difference(a_deg, b_deg) -> np.ndarray:
    """Absolute circular difference of two headings, in [0, 180] degrees."""
    d = (np.asarray(a_deg, dtype=np.float64) - np.asarray(b_deg, dtype=np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


# --------------------------------------------------------------------------- a query as uploaded

PROJECTIONS = ("equirectangular", "perspective")

PANORAMA_ASPECT = 3.5  # width/height from which an image without a stated field of view is a 360 panorama
MIN_FOV_DEG = 20.0  # narrower views cover less than one 16-pixel token column of a 256-pixel-wide panorama


class UnreadableView(ValueError):
    """An image whose field of view is not known or can not be read; ``reason`` says which:
    fov_unknown, bad_field_of_view or tilt_not_a_photo."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def view_geometry(width: int, height: int, *, fov_deg: float | None = None, projection: str | None = None,
                  exif_fov: float | None = None, tilted: bool = False,
                  name: str = "the image") -> tuple[float, str, str]:
    """How an upright image of ``width`` x ``height`` is read: (horizontal field of view, where it came
    from: parameter, aspect or exif, projection). The field of view given, else 360 for an image at
    least PANORAMA_ASPECT times as wide as high (before EXIF: a phone's panorama still names its lens),
    else its EXIF focal length (`model.preprocess.exif_camera`); the projection given, else
    perspective for a photo: a field of view from EXIF, or under 360 on a narrow image. ``tilted``: a
    camera pitch or roll is given, which only a photo has. UnreadableView says what is missing or wrong
    in terms of this function's parameters (``name``: the image, in its messages)."""
    wide = width >= PANORAMA_ASPECT * height
    if fov_deg is not None:
        fov_source = "parameter"
    elif wide:
        fov_deg, fov_source = 360.0, "aspect"
    elif exif_fov is not None:
        fov_deg, fov_source = exif_fov, "exif"
    else:
        raise UnreadableView(
            "fov_unknown",
            f"{name} is {width}x{height} (aspect {width / height:.2f}): not a 360 degree panorama "
            f"(aspect {PANORAMA_ASPECT:g}:1 or wider) and its EXIF states no focal length; send its horizontal "
            "field of view as the parameter fov_deg (e.g. fov_deg=65 for a phone's main camera)")
    projection = projection or (
        "perspective" if fov_source == "exif" or (fov_deg < 360 and not wide) else "equirectangular")
    if fov_deg < MIN_FOV_DEG or (projection == "perspective" and fov_deg >= 180):
        raise UnreadableView(
            "bad_field_of_view",
            f"{name}: a field of view of {fov_deg:g} degrees ({fov_source}) can not be read: a view must span "
            f"at least {MIN_FOV_DEG:g} degrees, a photo (projection=perspective) less than 180; send fov_deg, or "
            "projection=equirectangular for a wider panorama crop")
    if projection != "perspective" and tilted:
        raise UnreadableView(
            "tilt_not_a_photo",
            f"{name} is read as an equirectangular {'panorama' if fov_deg >= 360 else 'crop'}, which is "
            "level: pitch_deg and roll_deg describe a photo's camera (projection=perspective)")
    return fov_deg, fov_source, projection


def place_view(source, config, *, fov_deg: float = 360.0, heading_deg: float | None = None,
               projection: str = "equirectangular", pitch_deg: float = 0.0, roll_deg: float = 0.0,
               name: str | None = None, max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An uploaded street-level image (path, bytes or PIL image) -> (the ground branch's input
    [H, W, 3] uint8 in the panorama frame, seen [W] bool: its pixel columns that the image covers).

    A full equirectangular panorama is read as training read it (`load_ground_image`); a crop of
    ``fov_deg`` (equirectangular) or a photo of that horizontal field of view (perspective, level
    unless its camera's ``pitch_deg`` (up positive) and ``roll_deg`` (clockwise, seen from behind
    the camera) are given) lands at its azimuths, the rest the mean colour. The view is placed at
    ``heading_deg`` when it is known, else centred on north, in which case its heading is the one
    the orientation head finds against a tile."""
    from .preprocess import equirect_crop_to_panorama, load_ground_image, load_image, perspective_to_panorama

    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if projection != "perspective" and (pitch_deg or roll_deg):
        raise ValueError("pitch_deg and roll_deg describe a photo's camera (projection='perspective'); "
                         "panoramas and their crops are level")
    heading = 0.0 if heading_deg is None else float(heading_deg)
    if projection == "equirectangular" and fov_deg >= 360.0:
        view = np.asarray(load_ground_image(source, config, name=name, max_pixels=max_pixels))
        return rotate_view(view, -heading), np.ones(view.shape[1], bool)
    image = load_image(source, name, max_pixels)
    if projection == "equirectangular":
        view, covered = equirect_crop_to_panorama(image, fov_deg, heading, config.ground_size)
    else:
        view, covered = perspective_to_panorama(image, fov_deg, heading, config.ground_size, pitch_deg, roll_deg)
    view[~covered] = MEAN_RGB
    return view, covered.any(axis=0)


def place_photo(source, config, *, fov_deg: float, heading_deg: float | None = None,
                tilt: tuple[float, float] | None = None, name: str | None = None,
                max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """A photo (perspective) placed by `place_view` with its camera's (pitch, roll) ``tilt``, or where
    that is not known, with the tilt `model.preprocess.estimate_photo_tilt` finds from its vertical
    edges -> (view, seen, the tilt it was placed with)."""
    from .preprocess import estimate_photo_tilt, load_image

    if tilt is None:
        source = load_image(source, name, max_pixels)
        tilt = estimate_photo_tilt(source, fov_deg)
    view, seen = place_view(source, config, fov_deg=fov_deg, heading_deg=heading_deg, projection="perspective",
                            pitch_deg=tilt[0], roll_deg=tilt[1], name=name, max_pixels=max_pixels)
    return view, seen, tilt

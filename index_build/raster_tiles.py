"""Orthophoto -> dense grid of north-up square tiles + a catalogue CSV (`python -m index_build tile`).

    reader   open_raster        a georeferenced raster GDAL can read, in any CRS -> RasterSource
    planner  plan_tile_grid     tile centres every stride_m metres in a local metric frame -> TileGrid
    cutter   TileCutter.cut     one tile: the source pixels under it (a windowed read, the whole raster
                                is never read) warped to a north-up tile_px x tile_px RGB image
    writer   tile_raster        images/ + tiles.csv + tiling.json in a temporary directory, renamed into place

The local metric frame is a transverse Mercator projection centred on the raster (scale 1 on the
meridian through the raster's centre): its metres are ground metres and its y axis points to true
north, whatever the raster's CRS. The raster's own CRS is not used as the frame because neither holds
there in general: UTM grid north is up to ~3 degrees off true north at the edge of a zone, and
Web-Mercator metres are 1/cos(lat) ground metres.

Memory: --memory-budget is split between GDAL's block cache (a quarter), GDAL's warp buffers (a
quarter; GDAL warps a tile in chunks when its source window needs more) and the numpy arrays of the
one tile being cut (half, checked before anything is cut).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as transform_points

from index_build.fsutil import FILE_MODE, atomic_write_json, fsync_dir
from model.atomic import staged_directory, tidy_leftovers

log = logging.getLogger("index_build.raster_tiles")

WGS84 = CRS.from_epsg(4326)
MiB = 2 ** 20
DEFAULT_TILE_M = 100.0           # worldgen's default footprint, the demo model's training tiles
DEFAULT_TILE_PX = 256            # worldgen's default tile size
DEFAULT_MAX_NODATA = 0.5
DEFAULT_MEMORY_BUDGET = 256 * MiB
MIN_MEMORY_BUDGET = 4 * MiB      # below this the budget's quarters are smaller than GDAL's 1 MB warp minimum
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}
RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear, "cubic": Resampling.cubic,
              "lanczos": Resampling.lanczos, "average": Resampling.average}
FOOTPRINT_POINTS = 65            # points per raster edge when the raster's outline is mapped into the frame
VALID_ALPHA = 128                # a warped pixel with alpha below this counts as "no data"
TILING_FORMAT = "index_build-tiling/1"
CATALOGUE_NAME = "tiles.csv"
IMAGE_DIR = "images"
_ID_PREFIX = re.compile(r"^[A-Za-z0-9._-]+$")


class TilingError(ValueError):
    """Bad input or options for `index_build tile`; the message is one line naming the culprit."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------ options

def parse_band_list(text: str) -> tuple[int, ...]:
    """'3,2,1' -> (3, 2, 1); one band (grey) or three (red, green, blue), 1-based."""
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise TilingError(f"--bands {text!r}: expected 1-based band numbers such as 1,2,3 or 1") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise TilingError(f"--bands {text!r}: give three bands (red,green,blue) or one (grey), numbered from 1")
    return bands


def parse_value_range(text: str) -> tuple[float, float]:
    """'0,4095' -> (0.0, 4095.0): raster values mapped linearly to 0..255."""
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise TilingError(f"--value-range {text!r}: expected LO,HI such as 0,4095") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise TilingError(f"--value-range {text!r}: LO must be finite and below HI")
    return lo, hi


@dataclass(frozen=True)
class TileOptions:
    raster: str
    out: str
    tile_m: float = DEFAULT_TILE_M
    stride_m: float | None = None                     # None: half of tile_m
    centres_m: float | None = None                    # None: one view per tile, at its centre
    tile_px: int = DEFAULT_TILE_PX
    image_format: str = "jpg"
    jpeg_quality: int = 90
    max_nodata: float = DEFAULT_MAX_NODATA
    bands: tuple[int, ...] | None = None             # None: chosen from the raster's colour interpretation
    value_range: tuple[float, float] | None = None   # None: 8-bit rasters pass through unchanged
    resampling: str = "bilinear"
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    id_prefix: str | None = None                     # None: the raster's file name without extension
    overwrite: bool = False

    @property
    def stride(self) -> float:
        return self.tile_m / 2 if self.stride_m is None else self.stride_m

    @property
    def views_per_stride(self) -> int:
        """View centres per stride along an axis: 1, or stride / --centres-m."""
        return 1 if self.centres_m is None else round(self.stride / self.centres_m)

    def validate(self) -> None:
        def bad(message: str):
            raise TilingError(message)

        if not (math.isfinite(self.tile_m) and self.tile_m > 0):
            bad(f"--tile-m must be a positive number of metres, got {self.tile_m}")
        if not (math.isfinite(self.stride) and self.stride > 0):
            bad(f"--stride-m must be > 0 metres, got {self.stride}")
        if self.centres_m is not None:
            n = self.stride / self.centres_m if math.isfinite(self.centres_m) and self.centres_m > 0 else 0.0
            if not (n >= 1 and abs(n - round(n)) < 1e-3):  # 16.667 for a third of 50 m; views are stride / n apart
                bad(f"--centres-m must divide the stride ({self.stride:g} m) into a whole number of steps, "
                    f"got {self.centres_m}")
        if not 16 <= self.tile_px <= 4096:
            bad(f"--tile-px must be in [16, 4096], got {self.tile_px}")
        if self.image_format not in IMAGE_FORMATS:
            bad(f"--format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            bad(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        if not 0.0 <= self.max_nodata <= 1.0:
            bad(f"--max-nodata is a fraction in [0, 1], got {self.max_nodata}")
        if self.resampling not in RESAMPLING:
            bad(f"--resampling must be one of {', '.join(RESAMPLING)}, got {self.resampling!r}")
        if self.memory_budget < MIN_MEMORY_BUDGET:
            bad(f"--memory-budget must be at least {format_size(MIN_MEMORY_BUDGET)}, "
                f"got {format_size(self.memory_budget)}")
        if self.id_prefix is not None and not _ID_PREFIX.match(self.id_prefix):
            bad(f"--id-prefix {self.id_prefix!r} may only hold letters, digits, '.', '_' and '-' "
                "(tile ids appear in URLs)")


@dataclass(frozen=True)
class MemoryPlan:
    block_cache: int     # bytes, GDAL_CACHEMAX
    warp_mb: int         # GDAL warp buffers, in the whole MiB WarpedVRT's warp_mem_limit takes
    tile_arrays: int     # bytes of numpy arrays one tile may hold

    @classmethod
    def split(cls, budget: int) -> "MemoryPlan":
        quarter = budget // 4
        return cls(block_cache=quarter, warp_mb=max(1, quarter // MiB), tile_arrays=budget - 2 * quarter)


# ------------------------------------------------------------------------------------------- reader

@dataclass(frozen=True, eq=False)
class RasterSource:
    """What the cutter needs to know about the raster, learnt once when it is opened."""
    path: str
    width: int
    height: int
    crs: CRS
    transform: Affine                     # pixel (col, row) -> raster CRS
    bands: tuple[int, ...]                # 1-based: three (R, G, B) or one (grey, or palette indexes)
    dtype: str
    palette: np.ndarray | None            # 256 x 3 uint8 lookup table when band 1 holds colour-table indexes
    value_range: tuple[float, float] | None
    alpha_band: int | None                # 1-based index of the raster's alpha band, if it has one

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


def open_raster(path: str, bands: tuple[int, ...] | None = None,
                value_range: tuple[float, float] | None = None):
    """Open and validate a raster; returns (open rasterio dataset, RasterSource). The caller closes it."""
    if not os.path.exists(path):
        raise TilingError(f"{path}: no such file")
    if os.path.isdir(path):
        raise TilingError(f"{path}: is a directory, not a raster")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)   # _describe says so, in one line
            dataset = rasterio.open(path)
    except RasterioError as exc:
        raise TilingError(f"{path}: not a raster GDAL can read ({exc})") from None
    try:
        return dataset, _describe(dataset, path, bands, value_range)
    except BaseException:
        dataset.close()
        raise


def _describe(dataset, path: str, bands, value_range) -> RasterSource:
    gcps, _ = dataset.gcps
    if dataset.transform.is_identity or dataset.transform.determinant == 0:
        if gcps:
            raise TilingError(f"{path}: georeferenced by ground control points only; warp it to a "
                              "geotransform first (e.g. gdalwarp)")
        raise TilingError(f"{path}: has no geotransform (pixel -> map coordinates); it is not georeferenced")
    if dataset.crs is None:
        raise TilingError(f"{path}: has no coordinate reference system (CRS); assign one first "
                          "(e.g. gdal_edit.py -a_srs EPSG:...)")
    if dataset.width < 2 or dataset.height < 2:
        raise TilingError(f"{path}: {dataset.width} x {dataset.height} pixels is too small to tile")
    left, right = sorted(dataset.bounds[::2])  # (a raster whose columns run west: left > right)
    if dataset.crs.is_geographic and (left < -180 or right > 180):  # (the warp reads -170, not 190: half lost)
        raise TilingError(f"{path}: longitudes {left:g} to {right:g} in a geographic CRS reach past +-180, which "
                          "tiles can not be read across; reproject it to a projected CRS first (e.g. gdalwarp "
                          "-t_srs with its UTM zone)")
    chosen = _choose_bands(dataset, path, bands)
    dtype = dataset.dtypes[chosen[0] - 1]
    if any(dataset.dtypes[b - 1] != dtype for b in chosen):
        raise TilingError(f"{path}: bands {','.join(map(str, chosen))} have different data types "
                          f"({', '.join(dataset.dtypes[b - 1] for b in chosen)})")
    if np.dtype(dtype).kind == "c":
        raise TilingError(f"{path}: complex {dtype} pixels are not imagery")
    palette = None
    if len(chosen) == 1 and dataset.colorinterp[chosen[0] - 1] == ColorInterp.palette:
        if dtype != "uint8":
            raise TilingError(f"{path}: palette band {chosen[0]} is {dtype}; only 8-bit palettes are supported")
        palette = _palette_lut(dataset.colormap(chosen[0]))
    elif dtype != "uint8" and value_range is None:
        raise TilingError(f"{path}: band data type is {dtype}, not 8-bit; pass --value-range LO,HI "
                          "(the raster values shown as black and as white)")
    return RasterSource(path=os.path.abspath(path), width=dataset.width, height=dataset.height, crs=dataset.crs,
                        transform=dataset.transform, bands=chosen, dtype=dtype, palette=palette,
                        value_range=value_range, alpha_band=_alpha_band(dataset))


def _choose_bands(dataset, path: str, bands) -> tuple[int, ...]:
    if bands is not None:
        missing = [b for b in bands if b > dataset.count]
        if missing:
            raise TilingError(f"{path}: --bands {','.join(map(str, bands))} asks for band(s) "
                              f"{','.join(map(str, missing))}, the raster has {dataset.count}")
        return tuple(bands)
    interp = list(dataset.colorinterp)
    rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in interp for c in rgb):
        return tuple(interp.index(c) + 1 for c in rgb)
    colour = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha]
    if len(colour) >= 3:
        return tuple(colour[:3])
    if len(colour) == 1:
        return (colour[0],)
    raise TilingError(f"{path}: cannot tell which of its {dataset.count} band(s) are red, green and blue; "
                      "pass --bands R,G,B (or --bands N for grey)")


def _alpha_band(dataset) -> int | None:
    interp = list(dataset.colorinterp)
    return interp.index(ColorInterp.alpha) + 1 if ColorInterp.alpha in interp else None


def _palette_lut(colormap: dict) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    for index, rgba in colormap.items():
        if 0 <= index < 256:
            lut[index] = rgba[:3]
    return lut


# ------------------------------------------------------------------------------------------ planner

def _raster_outline(source: RasterSource, points_per_edge: int) -> tuple[np.ndarray, np.ndarray]:
    """Points along the raster's four edges, in the raster's CRS."""
    t = np.linspace(0.0, 1.0, points_per_edge)
    w, h = source.width, source.height
    cols = np.concatenate([t * w, np.full_like(t, w), (1 - t) * w, np.zeros_like(t)])
    rows = np.concatenate([np.zeros_like(t), t * h, np.full_like(t, h), (1 - t) * h])
    return apply_affine(source.transform, cols, rows)


def apply_affine(t: Affine, cols, rows):
    """Map pixel coordinates (scalars or arrays) through an affine transform."""
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def _to_crs(src_crs: CRS, dst_crs: CRS, xs, ys) -> tuple[np.ndarray, np.ndarray]:
    out_x, out_y = transform_points(src_crs, dst_crs, np.asarray(xs, float).ravel(), np.asarray(ys, float).ravel())
    return np.asarray(out_x, float), np.asarray(out_y, float)


def local_metric_frame(source: RasterSource) -> CRS:
    """Transverse Mercator centred on the raster's centre pixel: x east, y true north, ground metres."""
    cx, cy = apply_affine(source.transform, source.width / 2, source.height / 2)
    lon, lat = _to_crs(source.crs, WGS84, [cx], [cy])
    if not (np.isfinite(lon[0]) and np.isfinite(lat[0])):
        raise TilingError(f"{source.path}: the raster's centre has no WGS84 position in its CRS {source.crs}")
    return CRS.from_proj4(f"+proj=tmerc +lat_0={float(lat[0])!r} +lon_0={float(lon[0])!r} +k_0=1 +x_0=0 +y_0=0 "
                          "+datum=WGS84 +units=m +no_defs")


def source_ground_resolution(source: RasterSource, frame: CRS) -> float:
    """Ground metres per raster pixel at the raster's centre (the finer of the two axes)."""
    c, r = source.width / 2, source.height / 2
    xs, ys = apply_affine(source.transform, np.array([c, c + 1, c]), np.array([r, r, r + 1]))
    fx, fy = _to_crs(source.crs, frame, xs, ys)
    return float(min(math.hypot(fx[1] - fx[0], fy[1] - fy[0]), math.hypot(fx[2] - fx[0], fy[2] - fy[0])))


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Square tiles of tile_m metres, centres stride_m apart, rows north to south, columns west to east."""
    frame: CRS
    tile_m: float
    stride_m: float
    tile_px: int
    rows: int
    cols: int
    x0: float                 # frame coordinates of the centre of tile (0, 0), the north-west one
    y0: float

    def __len__(self) -> int:
        return self.rows * self.cols

    @property
    def m_per_px(self) -> float:
        return self.tile_m / self.tile_px

    def centre(self, row: int, col: int) -> tuple[float, float]:
        return self.x0 + col * self.stride_m, self.y0 - row * self.stride_m

    def tile_transform(self, row: int, col: int) -> Affine:
        """Tile pixel (col, row) -> frame metres; north up."""
        x, y = self.centre(row, col)
        half = self.tile_m / 2
        return Affine(self.m_per_px, 0.0, x - half, 0.0, -self.m_per_px, y + half)


def view_grid(grid: TileGrid, per_stride: int) -> TileGrid:
    """The grid of view centres every stride / per_stride metres over ``grid``'s tiles: the tile
    (row, col) is the view (row * per_stride, col * per_stride)."""
    return replace(grid, stride_m=grid.stride_m / per_stride, rows=(grid.rows - 1) * per_stride + 1,
                   cols=(grid.cols - 1) * per_stride + 1)


def tile_views(grid: TileGrid, per_stride: int, row: int, col: int) -> list[tuple[int, int]]:
    """The views of tile (row, col) in ``view_grid(grid, per_stride)``: those nearer its centre than
    any other tile's (ties to the south-east), its own centre first."""
    span = range(-(per_stride // 2), (per_stride - 1) // 2 + 1)
    r0, c0 = row * per_stride, col * per_stride
    last_r, last_c = (grid.rows - 1) * per_stride, (grid.cols - 1) * per_stride
    views = [(r0 + dr, c0 + dc) for dr in span for dc in span
             if (dr, dc) != (0, 0) and 0 <= r0 + dr <= last_r and 0 <= c0 + dc <= last_c]
    return [(r0, c0), *views]


def _axis_count(extent: float, tile_m: float, stride_m: float) -> tuple[int, float]:
    """How many tiles fit along an axis, and the margin left on each side when they are centred."""
    n = int(math.floor((extent - tile_m) / stride_m + 1e-9)) + 1
    return n, (extent - tile_m - (n - 1) * stride_m) / 2


def plan_tile_grid(source: RasterSource, frame: CRS, tile_m: float, stride_m: float, tile_px: int) -> TileGrid:
    """The grid of tiles that fit inside the raster's bounding box in the frame, centred in it."""
    xs, ys = _raster_outline(source, FOOTPRINT_POINTS)
    fx, fy = _to_crs(source.crs, frame, xs, ys)
    if not (np.all(np.isfinite(fx)) and np.all(np.isfinite(fy))):
        raise TilingError(f"{source.path}: parts of the raster have no position in a local metric frame "
                          "(does it cover a pole or the whole globe?)")
    xmin, xmax, ymin, ymax = fx.min(), fx.max(), fy.min(), fy.max()
    width_m, height_m = xmax - xmin, ymax - ymin
    if tile_m > width_m + 1e-6 or tile_m > height_m + 1e-6:
        raise TilingError(f"--tile-m {tile_m:g} is larger than the raster {source.path}, which covers "
                          f"{width_m:.1f} m x {height_m:.1f} m on the ground")
    cols, margin_x = _axis_count(width_m, tile_m, stride_m)
    rows, margin_y = _axis_count(height_m, tile_m, stride_m)
    return TileGrid(frame=frame, tile_m=tile_m, stride_m=stride_m, tile_px=tile_px, rows=rows, cols=cols,
                    x0=xmin + margin_x + tile_m / 2, y0=ymax - margin_y - tile_m / 2)


# ------------------------------------------------------------------------------------------- cutter

class TileCutter:
    """Cuts the tiles of a TileGrid out of an open raster.

    Each tile is a WarpedVRT of the raster onto the tile's own north-up pixel grid in the frame: GDAL
    reads only the source window under the tile (through its block cache), warps it in chunks that fit
    warp_mb, and honours the raster's nodata value, internal mask or alpha band alike, returning them
    as the VRT's alpha band. (rasterio.warp.reproject on numpy arrays would do the same per tile, but
    leaks some memory natively with every call in rasterio 1.4; a VRT per tile does not.)
    """

    def __init__(self, dataset, source: RasterSource, grid: TileGrid, resampling: str, memory: MemoryPlan):
        self.dataset = dataset
        self.source = source
        self.grid = grid
        self.memory = memory
        # Colour-table indexes cannot be interpolated: a palette raster is always sampled nearest.
        self.resampling = RESAMPLING["nearest" if source.palette is not None else resampling]
        # The VRT carries the raster's own alpha band through, or appends one made from its mask/nodata.
        self.alpha_band = source.alpha_band or dataset.count + 1

    def tile_array_bytes(self) -> int:
        """Numpy bytes alive at once while one tile is cut (see cut())."""
        s, px = self.source, self.grid.tile_px ** 2
        warped = (len(s.bands) + 1) * px * s.itemsize
        expanded = 3 * px if s.palette is not None else 0
        scaled = 3 * px * 4 if s.value_range is not None else 0
        return warped + expanded + scaled + 3 * px

    def check_budget(self) -> None:
        need = self.tile_array_bytes()
        if need > self.memory.tile_arrays:
            raise TilingError(
                f"--memory-budget is too small: one {self.grid.tile_px} px tile holds {format_size(need)} of "
                f"raster data and half the budget is {format_size(self.memory.tile_arrays)}; raise it to at "
                f"least {format_size(2 * need)} or lower --tile-px")

    def cut(self, row: int, col: int) -> tuple[np.ndarray | None, float]:
        """(RGB uint8 tile_px x tile_px x 3, fraction of its pixels without data); image None when all is nodata."""
        g, s = self.grid, self.source
        try:
            with WarpedVRT(self.dataset, crs=g.frame, transform=g.tile_transform(row, col), width=g.tile_px,
                           height=g.tile_px, resampling=self.resampling, add_alpha=s.alpha_band is None,
                           warp_mem_limit=self.memory.warp_mb) as vrt:
                warped = vrt.read([*s.bands, self.alpha_band])
        except RasterioError as exc:
            raise TilingError(f"{s.path}: reading the pixels of tile row {row} col {col} failed: {exc}") from None
        valid = warped[-1] >= VALID_ALPHA
        nodata = 1.0 - float(valid.mean())
        if not valid.any():
            return None, nodata
        return self._to_rgb8(warped[:-1], valid), nodata

    def _to_rgb8(self, bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
        s = self.source
        if s.palette is not None:
            bands = np.moveaxis(s.palette[bands[0]], -1, 0)
        elif s.value_range is not None:
            lo, hi = s.value_range
            scaled = (bands.astype(np.float32) - lo) * np.float32(255.0 / (hi - lo))
            bands = np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)
        if bands.shape[0] == 1:
            bands = np.repeat(bands, 3, axis=0)
        rgb = np.ascontiguousarray(np.moveaxis(bands, 0, -1))
        rgb[~valid] = 0
        return rgb


def encode_image(rgb: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(rgb).save(buf, format="JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- writer

@dataclass(frozen=True)
class TilingResult:
    out_dir: str
    catalogue: str
    rows: int
    cols: int
    written: int
    skipped_nodata: int
    tile_m: float
    stride_m: float
    tile_px: int
    max_nodata: float
    seconds: float
    views: int          # catalogue rows: the tiles, or with --centres-m their views
    centres_m: float

    def summary_line(self) -> str:
        views = f" as {self.views} views every {self.centres_m:g} m" if self.views != self.written else ""
        return (f"index_build tile: {self.written} tile(s){views} written to {self.catalogue}, "
                f"{self.skipped_nodata} skipped as nodata (more than {self.max_nodata:.0%} without data); "
                f"grid {self.rows} x {self.cols} of {self.tile_m:g} m tiles every {self.stride_m:g} m at "
                f"{self.tile_px} px ({self.tile_m / self.tile_px:.3g} m/px), {self.seconds:.1f} s")


def tile_ids(prefix: str, grid: TileGrid):
    width = max(3, len(str(grid.rows - 1)), len(str(grid.cols - 1)))
    return lambda row, col: f"{prefix}-r{row:0{width}d}-c{col:0{width}d}"


def default_id_prefix(raster: str) -> str:
    stem = os.path.splitext(os.path.basename(raster))[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_.") or "tile"


def _check_output(options: TileOptions) -> str:
    out_dir = os.path.abspath(options.out)
    parent = os.path.dirname(out_dir)
    if os.path.isdir(parent) and os.access(parent, os.W_OK):
        tidy_leftovers(out_dir, log.warning)  # may put a previous --out back
    if os.path.exists(out_dir) and not options.overwrite:
        raise TilingError(f"--out {options.out}: already exists (pass --overwrite to replace it)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TilingError(f"--out {options.out}: exists and is not a directory")
    if not os.path.isdir(parent):
        raise TilingError(f"--out {options.out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TilingError(f"--out {options.out}: parent directory {parent} is not writable")
    return out_dir


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _cut_all(cutter: TileCutter, options: TileOptions, tmp: str, tiles: TileGrid, tile_id,
             progress: bool) -> tuple[int, int, int]:
    """Cut every tile of ``tiles`` (with --centres-m: each of its views, from ``cutter.grid``) into
    tmp/images/, listing the kept ones in tmp/tiles.csv. A tile whose centre view is mostly nodata is
    skipped whole. Returns (tiles written, tiles skipped, views written)."""
    from tqdm import tqdm

    ext, per, step = options.image_format, options.views_per_stride, cutter.grid.stride_m
    written = skipped = views_written = 0
    bar = tqdm(total=len(tiles), unit="tile", desc="tiling", dynamic_ncols=True, disable=not progress)
    try:
        with open(os.path.join(tmp, CATALOGUE_NAME), "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(["tile_id", "lat", "lon", "path", "grid_row", "grid_col", *(["tile"] if per > 1 else [])])
            for row in range(tiles.rows):
                for col in range(tiles.cols):
                    bar.update(1)
                    views = tile_views(tiles, per, row, col)
                    xs, ys = zip(*(cutter.grid.centre(r, c) for r, c in views))
                    lons, lats = _to_crs(tiles.frame, WGS84, np.array(xs), np.array(ys))
                    tile = tile_id(row, col)
                    kept = 0
                    for i, (r, c) in enumerate(views):
                        rgb, nodata = cutter.cut(r, c)
                        if rgb is None or nodata > options.max_nodata:
                            if i == 0:
                                break  # the tile itself is not there: none of its views either
                            continue
                        vid = tile if i == 0 else f"{tile}.e{(c - col * per) * step:g}n{(row * per - r) * step:g}"
                        rel = f"{IMAGE_DIR}/{vid}.{ext}"
                        _write_file(os.path.join(tmp, rel), encode_image(rgb, ext, options.jpeg_quality))
                        out.writerow([vid, repr(float(lats[i])), repr(float(lons[i])), rel, row, col,
                                      *([tile] if per > 1 else [])])
                        kept += 1
                    written, skipped, views_written = written + (kept > 0), skipped + (kept == 0), views_written + kept
            f.flush()
            os.fsync(f.fileno())
    finally:
        bar.close()
    return written, skipped, views_written


def tile_raster(options: TileOptions, progress: bool = True) -> TilingResult:
    """Cut options.raster into a catalogue directory at options.out (see the module docstring)."""
    started = time.monotonic()
    options.validate()
    out_dir = _check_output(options)
    memory = MemoryPlan.split(options.memory_budget)
    with rasterio.Env(GDAL_CACHEMAX=memory.block_cache):
        dataset, source = open_raster(options.raster, options.bands, options.value_range)
        with dataset:
            frame = local_metric_frame(source)
            grid = plan_tile_grid(source, frame, options.tile_m, options.stride, options.tile_px)
            cutter = TileCutter(dataset, source, view_grid(grid, options.views_per_stride), options.resampling,
                                memory)
            cutter.check_budget()
            log.debug("%s: %d x %d px in %s, %.3g m/px; %d x %d = %d tiles of %g m every %g m at %d px",
                      source.path, source.width, source.height, source.crs.to_string(),
                      source_ground_resolution(source, frame), grid.rows, grid.cols, len(grid), grid.tile_m,
                      grid.stride_m, grid.tile_px)
            prefix = options.id_prefix or default_id_prefix(options.raster)
            with staged_directory(out_dir, lambda message: TilingError(f"--out {options.out}: {message}")) as stage:
                tmp = stage.path
                os.makedirs(os.path.join(tmp, IMAGE_DIR))
                written, skipped, views = _cut_all(cutter, options, tmp, grid, tile_ids(prefix, grid), progress)
                if written == 0:
                    raise TilingError(f"{options.raster}: all {len(grid)} tiles are more than "
                                      f"{options.max_nodata:.0%} nodata; nothing written (see --max-nodata)")
                atomic_write_json(os.path.join(tmp, "tiling.json"), _tiling_record(
                    options, source, grid, prefix, (written, skipped, views)))
                fsync_dir(os.path.join(tmp, IMAGE_DIR))
                stage.publish(replace=options.overwrite)
    return TilingResult(out_dir=out_dir, catalogue=os.path.join(out_dir, CATALOGUE_NAME), rows=grid.rows,
                        cols=grid.cols, written=written, skipped_nodata=skipped, tile_m=grid.tile_m,
                        stride_m=grid.stride_m, tile_px=grid.tile_px, max_nodata=options.max_nodata,
                        seconds=time.monotonic() - started, views=views, centres_m=cutter.grid.stride_m)


def _tiling_record(options: TileOptions, source: RasterSource, g: TileGrid, prefix: str,
                   counts: tuple[int, int, int]) -> dict:
    written, skipped, views = counts
    return {
        "format": TILING_FORMAT,
        "raster": source.path,
        "raster_crs": source.crs.to_string(),
        "raster_size": [source.width, source.height],
        "raster_m_per_px": source_ground_resolution(source, g.frame),
        "bands": list(source.bands),
        "palette": source.palette is not None,
        "value_range": list(source.value_range) if source.value_range else None,
        "frame_wkt": g.frame.to_wkt(),
        "frame_note": "local transverse Mercator centred on the raster: x east, y true north, ground metres",
        "tile_m": g.tile_m, "stride_m": g.stride_m, "tile_px": g.tile_px, "m_per_px": g.m_per_px,
        "grid": {"rows": g.rows, "cols": g.cols, "first_centre_frame_m": [g.x0, g.y0]},
        "tile_id": f"{prefix}-r<row>-c<col>",
        # views every centres_m (stride_m without --centres-m); a view off its tile's centre is <tile_id>.e<m>n<m>
        "centres_m": g.stride_m / options.views_per_stride,
        "image_format": options.image_format, "resampling": options.resampling,
        "memory_budget": options.memory_budget,
        "max_nodata": options.max_nodata,
        "counts": {"tiles": len(g), "written": written, "skipped_nodata": skipped, "views": views},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = ["TileOptions", "TilingError", "TilingResult", "TileGrid", "RasterSource", "TileCutter",
           "open_raster", "local_metric_frame", "plan_tile_grid", "tile_raster", "parse_band_list",
           "parse_value_range"]

"""The whole region's aerial view as one GeoTIFF (``--layout grid``): ``DIR/ortho.tif``.

Pixels: the world's metre grid (x east, y north from the origin), ``footprint_m / tile_px`` metres
each, over the core square plus half a tile footprint on every side, rendered by the aerial tile
renderer (``render_aerial``) in overlapping blocks with one capture look, so the mosaic has no seams
and looks like a tile of the pairs layout at the same ground resolution.

Georeferencing: a transverse Mercator on WGS84 centred on the origin (``ortho_crs``). The world's own
metres are those of an azimuthal equidistant projection on the haversine sphere (worldgen.geo), which
differ from the ellipsoid's transverse Mercator metres by a scale of up to ~0.4 % per axis, but not
in direction (both are north-up along the origin's meridian). The geotransform is therefore the
least-squares diagonal affine map from world metres to the CRS, fitted on a lattice over the raster;
its largest residual is recorded in world.json (about 1 cm for the largest world) and a fit worse than
``MAX_GEOREF_RESIDUAL_M`` is refused.
"""
from __future__ import annotations

import math
import os

import numpy as np

from worldgen.geo import metres_to_latlon
from worldgen.render import render_aerial, sample_aerial_look
from worldgen.world import World

ORTHO_NAME = "ortho.tif"
BLOCK_PX = 512            # rendered and written block size (also the GeoTIFF's internal tile size)
BLOCK_PAD_PX = 16         # rendered around each block and cropped: slope gradients need neighbours
MAX_GEOREF_RESIDUAL_M = 0.05
FIT_POINTS = 33           # lattice points per axis of the georeference fit


class OrthoError(ValueError):
    """The ortho cannot be written (rasterio missing, an unrepresentable georeference)."""


def _rasterio():
    try:
        import rasterio
        from rasterio.crs import CRS
        from rasterio.transform import Affine
        from rasterio.warp import transform as warp_points
    except ImportError:
        raise OrthoError("--layout grid writes a GeoTIFF and needs rasterio: install the 'geo' extra "
                         "(.venv/bin/pip install -e '.[geo]')") from None
    return rasterio, CRS, Affine, warp_points


def ortho_proj4(lat0: float, lon0: float) -> str:
    """Transverse Mercator on WGS84, scale 1 on the origin's meridian, false origin at the region centre."""
    return (f"+proj=tmerc +lat_0={float(lat0)!r} +lon_0={float(lon0)!r} +k_0=1 +x_0=0 +y_0=0 "
            "+datum=WGS84 +units=m +no_defs")


def ortho_crs(lat0: float, lon0: float):
    _, CRS, _, _ = _rasterio()
    return CRS.from_proj4(ortho_proj4(lat0, lon0))


def ortho_half_extent(world: World, footprint_m: float, tile_px: int) -> tuple[float, int]:
    """(half side in world metres, side in pixels) of the ortho: core square + half a footprint each side,
    plus 0.5 % + 1 m, rounded up to whole pixels of footprint_m / tile_px.

    The extra keeps the ortho at least that wide in ground metres on the ellipsoid too (the sphere's
    metres are up to 0.4 % shorter), so a tiling with --tile-m footprint_m still fits its last row."""
    m_per_px = footprint_m / tile_px
    half = (world.half_core + footprint_m / 2) * 1.005 + 1.0
    side_px = int(math.ceil(2 * half / m_per_px - 1e-9))
    return side_px * m_per_px / 2, side_px


def fit_georeference(lat0: float, lon0: float, half_m: float, crs) -> tuple[float, float, float, float, float]:
    """(sx, ox, sy, oy, worst residual in metres) of CRS easting = sx * x + ox, northing = sy * y + oy
    for world metres (x, y) in [-half_m, half_m]^2, the world's lat/lon (worldgen.geo) being the truth."""
    _, _, _, warp_points = _rasterio()
    g = np.linspace(-half_m, half_m, FIT_POINTS)
    x, y = (a.ravel() for a in np.meshgrid(g, g))
    lat, lon = metres_to_latlon(x, y, lat0, lon0)
    east, north = (np.asarray(v, float) for v in warp_points("EPSG:4326", crs, lon, lat))
    ones = np.ones_like(x)
    (sx, ox), *_ = np.linalg.lstsq(np.stack([x, ones], 1), east, rcond=None)
    (sy, oy), *_ = np.linalg.lstsq(np.stack([y, ones], 1), north, rcond=None)
    residual = float(np.hypot(sx * x + ox - east, sy * y + oy - north).max())
    return float(sx), float(ox), float(sy), float(oy), residual


def ortho_look_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 11])


def write_ortho(world: World, seed: int, footprint_m: float, tile_px: int, path: str) -> dict:
    """Render the region's aerial view and write it to ``path`` (a GeoTIFF); returns its world.json record.

    Same seed and arguments give the same pixels: the look comes from (seed, 11), each block's sensor
    noise from (seed, 12, block row, block column)."""
    rasterio, _, Affine, _ = _rasterio()
    m_per_px = footprint_m / tile_px
    half_m, side_px = ortho_half_extent(world, footprint_m, tile_px)
    if half_m > world.half_world:
        raise OrthoError(f"the ortho (core + half a {footprint_m:g} m footprint) reaches beyond the world raster; "
                         "lower --footprint-m")
    crs = ortho_crs(world.lat0, world.lon0)
    sx, ox, sy, oy, residual = fit_georeference(world.lat0, world.lon0, half_m, crs)
    if residual > MAX_GEOREF_RESIDUAL_M:
        raise OrthoError(f"the ortho's geotransform would be {residual:.3f} m off the world's positions somewhere "
                         f"(limit {MAX_GEOREF_RESIDUAL_M} m); lower --area-km2")
    # pixel (col, row) corner -> world (x, y) = (-half + col * res, half - row * res) -> CRS metres
    transform = Affine(sx * m_per_px, 0.0, ox - sx * half_m, 0.0, -sy * m_per_px, oy + sy * half_m)
    look = sample_aerial_look(ortho_look_rng(seed), world.lat0)
    profile = dict(driver="GTiff", width=side_px, height=side_px, count=3, dtype="uint8", crs=crs,
                   transform=transform, tiled=True, blockxsize=BLOCK_PX, blockysize=BLOCK_PX,
                   compress="deflate", predictor=2, zlevel=6, photometric="RGB", interleave="pixel",
                   BIGTIFF="IF_SAFER")
    render_px = BLOCK_PX + 2 * BLOCK_PAD_PX
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, side_px, BLOCK_PX):
            for c0 in range(0, side_px, BLOCK_PX):
                h, w = min(BLOCK_PX, side_px - r0), min(BLOCK_PX, side_px - c0)
                # centre of the padded block; its pixel centres fall on the ortho's pixel centres
                cx = -half_m + (c0 - BLOCK_PAD_PX + render_px / 2) * m_per_px
                cy = half_m - (r0 - BLOCK_PAD_PX + render_px / 2) * m_per_px
                noise_rng = np.random.default_rng([int(seed), 12, r0 // BLOCK_PX, c0 // BLOCK_PX])
                img = render_aerial(world, cx, cy, render_px, render_px * m_per_px, look, noise_rng)
                block = img[BLOCK_PAD_PX:BLOCK_PAD_PX + h, BLOCK_PAD_PX:BLOCK_PAD_PX + w]
                dst.write(np.ascontiguousarray(block.transpose(2, 0, 1)),
                          window=rasterio.windows.Window(c0, r0, w, h))
        dst.update_tags(AREA_OR_POINT="Area", SOFTWARE="worldgen --layout grid")
    return {
        "path": os.path.basename(path), "width": side_px, "height": side_px, "m_per_px": m_per_px,
        "half_extent_m": half_m, "crs": ortho_proj4(world.lat0, world.lon0),
        "transform": [transform.a, transform.b, transform.c, transform.d, transform.e, transform.f],
        "georef_residual_m": residual,
        "layout": "north-up RGB; pixel (col, row) covers world x in [-half + col * m_per_px, ...), "
                  "y in (half - (row + 1) * m_per_px, half - row * m_per_px]; transform = the GDAL "
                  "geotransform (a, b, c, d, e, f) into crs",
    }

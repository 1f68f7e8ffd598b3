"""Slippy-map (Web-Mercator, EPSG:3857) tile maths: tile (z, x, y) <-> WGS84 lat/lon."""
from __future__ import annotations

import math

# Web-Mercator cuts the world at +-85.0511 deg so that the map is square.
MAX_LATITUDE = math.degrees(math.atan(math.sinh(math.pi)))
MAX_ZOOM = 30


def tile_center_latlon(z: int, x: int, y: int) -> tuple[float, float]:
    """Latitude and longitude (degrees) of the centre of slippy tile (z, x, y).

    x grows eastwards from lon -180, y grows southwards from lat +85.05 (the OSM/Google scheme).
    """
    _check_tile(z, x, y)
    n = 2 ** z
    lon = (x + 0.5) / n * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * (y + 0.5) / n))))
    return lat, lon


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """(south, west, north, east) edges of the tile in degrees."""
    _check_tile(z, x, y)
    n = 2 ** z
    west = x / n * 360.0 - 180.0
    east = (x + 1) / n * 360.0 - 180.0
    north = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * y / n))))
    south = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * (y + 1) / n))))
    return south, west, north, east


def latlon_to_tile(lat: float, lon: float, z: int) -> tuple[int, int]:
    """The (x, y) of the zoom-z tile containing (lat, lon); lat is clamped to the Mercator limit."""
    if not 0 <= z <= MAX_ZOOM:
        raise ValueError(f"zoom {z} outside [0, {MAX_ZOOM}]")
    n = 2 ** z
    lat = max(-MAX_LATITUDE, min(MAX_LATITUDE, lat))
    x = int(math.floor((lon + 180.0) / 360.0 * n))
    lat_rad = math.radians(lat)
    y = int(math.floor((1.0 - math.asinh(math.tan(lat_rad)) / math.pi) / 2.0 * n))
    return min(max(x, 0), n - 1), min(max(y, 0), n - 1)


def _check_tile(z: int, x: int, y: int) -> None:
    if not 0 <= z <= MAX_ZOOM:
        raise ValueError(f"zoom {z} outside [0, {MAX_ZOOM}]")
    n = 2 ** z
    if not (0 <= x < n and 0 <= y < n):
        raise ValueError(f"tile x={x} y={y} outside [0, {n}) at zoom {z}")

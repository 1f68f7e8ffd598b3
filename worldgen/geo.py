"""Local metric grid <-> WGS84 latitude/longitude.

The project measures distances with the haversine formula on a sphere of the mean Earth radius
(DESIGN.md), so the world is geo-referenced on that same sphere: north offsets map to latitude
with 1/R, east offsets to longitude with 1/(R cos(lat)) at the point's own latitude (a
sinusoidal projection around the origin meridian). Distances between tile centres computed with
haversine then agree with the metre grid to well below a centimetre over a few kilometres.
"""
from __future__ import annotations

import numpy as np

EARTH_RADIUS_M = 6371008.8  # IUGG mean radius, the one haversine uses


def metres_to_latlon(x, y, lat0: float, lon0: float):
    """x east / y north in metres from (lat0, lon0) -> (lat, lon) in degrees."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    lat = lat0 + np.degrees(y / EARTH_RADIUS_M)
    lon = lon0 + np.degrees(x / (EARTH_RADIUS_M * np.cos(np.radians(lat))))
    return lat, lon


def latlon_to_metres(lat, lon, lat0: float, lon0: float):
    """Inverse of :func:`metres_to_latlon`."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    y = np.radians(lat - lat0) * EARTH_RADIUS_M
    x = np.radians(lon - lon0) * EARTH_RADIUS_M * np.cos(np.radians(lat))
    return x, y


def haversine_m(lat1, lon1, lat2, lon2):
    """Great-circle distance in metres (haversine, mean Earth radius)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp = p2 - p1
    dl = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def metres_per_degree(lat: float):
    """(metres per degree of latitude, metres per degree of longitude) at ``lat``."""
    m_lat = np.radians(1.0) * EARTH_RADIUS_M
    return m_lat, m_lat * float(np.cos(np.radians(lat)))

"""Deterministic hashing and periodic noise textures (all vectorised)."""
from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_G = np.uint64(0x9E3779B97F4A7C15)


def _mix(z):
    z = z + _G
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_u64(*keys, salt: int = 0):
    """splitmix64-style hash of integer arrays (broadcast) -> uint64 array."""
    with np.errstate(over="ignore"):
        h = _mix(np.asarray(np.uint64(salt & 0xFFFFFFFFFFFFFFFF)))
        for k in keys:
            k = np.asarray(k).astype(np.int64).view(np.uint64) if np.ndim(k) else np.uint64(np.int64(k).view(np.uint64))
            h = _mix(h ^ k)
    return h


def hash_u01(*keys, salt: int = 0):
    """Uniform [0, 1) float64 from integer keys (deterministic, order-sensitive)."""
    return (hash_u64(*keys, salt=salt) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def noise_tile(rng: np.random.Generator, size: int = 512, scale_px: float = 8.0) -> np.ndarray:
    """Periodic smooth noise (zero mean, unit std), Gaussian-filtered white noise via FFT."""
    white = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    filt = np.exp(-((fx**2 + fy**2) * (np.pi * scale_px) ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(white) * filt))
    out -= out.mean()
    out /= out.std() + 1e-12
    return out.astype(np.float32)


def sample_nearest(tile: np.ndarray, u, v):
    """Nearest texel (wrapping) at texel coordinates u (cols), v (rows)."""
    n = tile.shape[0]
    return tile[np.floor(v).astype(np.int64) % n, np.floor(u).astype(np.int64) % n]


def sample_bilinear(tile: np.ndarray, u, v):
    """Bilinear sample (wrapping) at texel coordinates u (cols), v (rows)."""
    n = tile.shape[0]
    u = np.asarray(u, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    u0 = np.floor(u)
    v0 = np.floor(v)
    fu = u - u0
    fv = v - v0
    i0 = u0.astype(np.int64) % n
    j0 = v0.astype(np.int64) % n
    i1 = (i0 + 1) % n
    j1 = (j0 + 1) % n
    a = tile[j0, i0] * (1 - fu) + tile[j0, i1] * fu
    b = tile[j1, i0] * (1 - fu) + tile[j1, i1] * fu
    return a * (1 - fv) + b * fv

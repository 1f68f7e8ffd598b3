"""Renderers: north-up orthographic aerial tiles and equirectangular street panoramas.

Both are vectorised numpy; per call work is O(pixels) plus O(trees in view).

Aerial: the world rasters are resampled onto the tile grid, lit with a capture-time sun (slope
shading of roofs and canopies, cast shadows by marching the height field towards the sun at half
resolution), trees drawn as shaded discs, then a capture colour transform and sensor noise.

Panorama (CVUSA convention): column j looks at azimuth pi + 2*pi*j/W clockwise from north, so
the left edge looks south and the centre column north; row i looks at elevation
pi/2 - pi*(i + 0.5)/H. For each column a ray is marched over the height field at geometrically
spaced distances; the running maximum of the elevation of the terrain samples gives, for every
row, the first sample the ray hits (one searchsorted over all columns). Building hits are then
refined by an exact ray/box intersection (facade side, along-facade coordinate for windows).
Trees are sprites depth-tested against that buffer.

Perspective (pinhole) photos are looked up, ray by ray, in a band of a finer panorama drawn by the
same renderer (``render_perspective``), so they show exactly the scene the panoramas show.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from worldgen.noise import hash_u01
from worldgen.world import (C_BUILDING, C_CAR, C_HEDGE, C_WATER, World)

EYE_HEIGHT = 2.5


# --------------------------------------------------------------------------------------------
# illumination / capture conditions
# --------------------------------------------------------------------------------------------
@dataclass
class AerialLook:
    sun_az: float  # radians clockwise from north (direction towards the sun)
    sun_el: float
    gain: np.ndarray  # per-channel white balance
    brightness: float
    gamma: float
    saturation: float
    haze: float
    haze_col: np.ndarray
    shadow: float  # brightness inside shadow
    noise: float


@dataclass
class PanoLook:
    sun_az: float
    sun_el: float
    weather: str  # clear | hazy | overcast
    sky_zenith: np.ndarray
    sky_horizon: np.ndarray
    sun_col: np.ndarray
    ambient: np.ndarray
    gain: np.ndarray
    exposure: float
    gamma: float
    saturation: float
    fog_dist: float
    cloud: float
    noise: float
    cloud_off: float


def sample_aerial_look(rng: np.random.Generator, lat: float = 45.0) -> AerialLook:
    """Capture conditions of one aerial tile. Survey flights fly around midday, so the sun stands
    in the equator-side half of the sky (south of the zenith in the northern hemisphere)."""
    noon = np.pi if lat >= 0 else 0.0
    return AerialLook(
        sun_az=float(noon + rng.uniform(-1.2, 1.2)), sun_el=float(np.radians(rng.uniform(28, 68))),
        gain=rng.uniform(0.86, 1.14, 3).astype(np.float32), brightness=float(rng.uniform(0.8, 1.2)),
        gamma=float(rng.uniform(0.8, 1.25)), saturation=float(rng.uniform(0.6, 1.3)),
        haze=float(rng.uniform(0.0, 0.25)), haze_col=rng.uniform(150, 210, 3).astype(np.float32),
        shadow=float(rng.uniform(0.35, 0.6)), noise=float(rng.uniform(1.5, 6.0)))


def sample_pano_look(rng: np.random.Generator) -> PanoLook:
    w = rng.random()
    weather = "clear" if w < 0.5 else ("hazy" if w < 0.75 else "overcast")
    if weather == "clear":
        zen = np.array([60, 110, 190]) * rng.uniform(0.8, 1.15)
        hor = np.array([170, 200, 230]) * rng.uniform(0.85, 1.1)
        sun = np.array([1.0, 0.96, 0.88]) * rng.uniform(0.8, 1.0)
        amb = np.array([0.42, 0.45, 0.52]) * rng.uniform(0.8, 1.1)
        fog, cloud = rng.uniform(400, 1200), rng.uniform(0.0, 0.5)
    elif weather == "hazy":
        zen = np.array([120, 150, 190]) * rng.uniform(0.85, 1.1)
        hor = np.array([200, 205, 210]) * rng.uniform(0.85, 1.1)
        sun = np.array([0.9, 0.85, 0.75]) * rng.uniform(0.5, 0.8)
        amb = np.array([0.52, 0.53, 0.55]) * rng.uniform(0.85, 1.1)
        fog, cloud = rng.uniform(120, 300), rng.uniform(0.2, 0.6)
    else:
        zen = np.array([150, 152, 158]) * rng.uniform(0.75, 1.1)
        hor = np.array([185, 187, 190]) * rng.uniform(0.8, 1.1)
        sun = np.array([0.2, 0.2, 0.2]) * rng.uniform(0.5, 1.0)
        amb = np.array([0.7, 0.7, 0.72]) * rng.uniform(0.8, 1.1)
        fog, cloud = rng.uniform(200, 600), rng.uniform(0.5, 1.0)
    return PanoLook(
        sun_az=float(rng.uniform(0, 2 * np.pi)), sun_el=float(np.radians(rng.uniform(12, 60))), weather=weather,
        sky_zenith=zen.astype(np.float32), sky_horizon=hor.astype(np.float32), sun_col=sun.astype(np.float32),
        ambient=amb.astype(np.float32), gain=rng.uniform(0.88, 1.12, 3).astype(np.float32),
        exposure=float(rng.uniform(0.8, 1.25)), gamma=float(rng.uniform(0.8, 1.2)),
        saturation=float(rng.uniform(0.7, 1.3)), fog_dist=float(fog), cloud=float(cloud),
        noise=float(rng.uniform(1.0, 4.0)), cloud_off=float(rng.uniform(0, 1000)))


_NOISE_BANK: list = []


def _noise_bank() -> np.ndarray:
    """Per-process bank of standard normal samples (fixed seed, so identical in every worker)."""
    if not _NOISE_BANK:
        _NOISE_BANK.append(np.random.default_rng(20240601).standard_normal(1 << 21, dtype=np.float32))
    return _NOISE_BANK[0]


def _finish(img: np.ndarray, gain, brightness, gamma, saturation, noise, rng, haze: float = 0.0,
            haze_col=None) -> np.ndarray:
    """Capture transform + sensor noise: float 0..255 (.., 3) in -> uint8 out.

    White balance, exposure, saturation and (optional) haze are one affine colour map
    y = x @ A + b; sensor noise (a slice at a random offset of a fixed Gaussian bank) is added
    before the tone curve, which is a 256-entry uint8 table.
    """
    g = np.asarray(gain, np.float64) * float(brightness)
    sat = float(saturation)
    S = sat * np.eye(3) + (1.0 - sat) / 3.0 * np.ones((3, 3))
    A = (1.0 - haze) * (np.diag(g) @ S)
    bvec = np.zeros(3) if not haze else haze * (np.asarray(haze_col, np.float64) @ (np.diag(g) @ S))
    shape = img.shape
    y = img.reshape(-1, 3) @ A.astype(np.float32)
    y += (bvec + 0.5).astype(np.float32)
    if noise > 0:
        bank = _noise_bank()
        n = y.size
        off = int(rng.integers(0, len(bank) - n))
        y += bank[off:off + n].reshape(y.shape) * np.float32(noise)
    np.clip(y, 0, 255, out=y)
    lut = np.clip(np.round(255.0 * np.power(np.arange(256) / 255.0, gamma)), 0, 255).astype(np.uint8)
    return lut[y.astype(np.uint8)].reshape(shape)


# --------------------------------------------------------------------------------------------
# aerial tile
# --------------------------------------------------------------------------------------------
def _tree_disc_raster(world: World, idx, x0, y_top, res, n, out_h=None):
    """Rasterise tree canopies onto an n x n grid whose NW corner is (x0, y_top) with ``res`` m/px.

    Returns (flat pixel index, tree index, canopy height, nx, ny normal parts) of visible canopy
    pixels (tallest wins), or None when no tree covers the grid.
    """
    if len(idx) == 0:
        return None
    t = world.trees
    tx = (t["x"][idx] - x0) / res  # fractional column of the trunk
    ty = (y_top - t["y"][idx]) / res
    rp = t["r"][idx] / res
    half = np.ceil(rp).astype(np.int64)
    size = 2 * half + 1
    cnt = size * size
    tot = int(cnt.sum())
    if tot == 0:
        return None
    ti = np.repeat(np.arange(len(idx)), cnt)
    loc = np.arange(tot) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    sz = size[ti]
    dy = loc // sz - half[ti]
    dx = loc % sz - half[ti]
    pc = np.floor(tx).astype(np.int64)[ti] + dx
    pr = np.floor(ty).astype(np.int64)[ti] + dy
    ex = (pc + 0.5 - tx[ti]) / rp[ti]
    ey = (pr + 0.5 - ty[ti]) / rp[ti]
    rho2 = ex * ex + ey * ey
    ok = (rho2 < 1.0) & (pc >= 0) & (pc < n) & (pr >= 0) & (pr < n)
    if not ok.any():
        return None
    ti, pc, pr, ex, ey, rho2 = ti[ok], pc[ok], pr[ok], ex[ok], ey[ok], rho2[ok]
    top = t["top"][idx][ti]
    depth = np.where(t["conifer"][idx][ti] > 0, np.sqrt(rho2), rho2) * (top - t["base"][idx][ti]) * 0.45
    h = top - depth
    flat = pr * n + pc
    order = np.lexsort((-h, flat))
    flat, ti, h, ex, ey, rho2 = flat[order], ti[order], h[order], ex[order], ey[order], rho2[order]
    first = np.ones(len(flat), dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    return flat[first], idx[ti[first]], h[first], ex[first], ey[first], rho2[first]


def render_aerial(world: World, cx: float, cy: float, size_px: int = 256, footprint_m: float = 100.0,
                  look: AerialLook | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """North-up orthographic tile (size_px x size_px x 3 uint8) centred on (cx, cy)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    look = look if look is not None else sample_aerial_look(rng)
    n = int(size_px)
    res = footprint_m / n
    x0 = cx - footprint_m / 2
    y_top = cy + footprint_m / 2
    xs = x0 + (np.arange(n) + 0.5) * res
    ys = y_top - (np.arange(n) + 0.5) * res
    rr, _ = world.px_index(np.zeros(n), ys)
    _, cc = world.px_index(xs, np.zeros(n))
    alb = world.albedo[rr[:, None], cc[None, :]].astype(np.float32)
    hgt = world.height[rr[:, None], cc[None, :]].astype(np.float32)
    cls = world.cls[rr[:, None], cc[None, :]]
    sx = math.sin(look.sun_az) * math.cos(look.sun_el)  # east component of the sun vector
    sy = math.cos(look.sun_az) * math.cos(look.sun_el)  # north
    sz = math.sin(look.sun_el)
    # slope shading from the height field (gable roofs, forest canopy)
    gy, gx = np.gradient(hgt, res)  # gy along rows = southward
    nxv, nyv = -gx, gy  # normal ~ (-dh/dx, -dh/dy_north, 1)
    steep = (np.abs(gx) > 3) | (np.abs(gy) > 3)  # building edges: not a slope
    nxv[steep] = 0
    nyv[steep] = 0
    lam = (nxv * sx + nyv * sy + sz) / np.sqrt(nxv * nxv + nyv * nyv + 1.0)
    # trees: canopy discs (and their heights, for shadows)
    pad_m = 6.0
    tidx = world.trees_near(x0 - pad_m, y_top - footprint_m - pad_m, x0 + footprint_m + pad_m, y_top + pad_m)
    disc = _tree_disc_raster(world, tidx, x0, y_top, res, n)
    flat_h = hgt.ravel()
    if disc is not None:
        flat, ti, h, ex, ey, rho2 = disc
        canopy_ok = h > flat_h[flat]
        flat, ti, h, ex, ey, rho2 = flat[canopy_ok], ti[canopy_ok], h[canopy_ok], ex[canopy_ok], ey[canopy_ok], rho2[canopy_ok]
        nzc = np.sqrt(np.clip(1 - rho2, 0.05, 1))
        tl = (ex * sx - ey * sy + nzc * sz)  # ey grows southward
        leaf = 0.82 + 0.3 * hash_u01(ti, (xs[flat % n] / 0.6).astype(np.int64), (ys[flat // n] / 0.6).astype(np.int64), salt=91)
        a2 = alb.reshape(-1, 3)
        a2[flat] = world.trees["col"][ti] * leaf[:, None].astype(np.float32)
        lam_f = lam.reshape(-1)
        lam_f[flat] = np.clip(0.55 + 0.6 * tl, 0.2, 1.3) * sz
        hs = flat_h.copy()
        hs[flat] = h
        hs = hs.reshape(n, n)
    else:
        hs = hgt
    # cast shadows at half resolution over a padded window
    shadow = _shadow_mask(world, cx, cy, n, res, hs, look)
    light = look.shadow + (1.0 - look.shadow) * np.clip(lam / max(sz, 1e-3), 0, 1.3) * (1.0 - shadow)
    # shadows are lit by the blue sky: a slight blue tint where shadowed
    light3 = light[..., None] * (1.0 + shadow[..., None] * np.array([-0.08, -0.04, 0.08], dtype=np.float32))
    img = alb * light3
    # water glint
    wat = cls == C_WATER
    if wat.any():
        img[wat] = img[wat] * 0.85 + 20.0 * (1 - shadow[wat, None])
    return _finish(img, look.gain, look.brightness, look.gamma, look.saturation, look.noise, rng,
                   haze=look.haze, haze_col=look.haze_col)


def _shadow_mask(world: World, cx, cy, n, res, hs_full, look: AerialLook):
    """Soft 0..1 shadow mask (n x n) for the sun of ``look``; casters within 70 m outside included."""
    tan_el = math.tan(look.sun_el)
    hmax_in = float(hs_full.max()) if hs_full.size else 0.0
    m = n // 2
    r2 = res * 2
    max_len = min(45.0 / tan_el, 80.0)
    pad = int(math.ceil(max_len / r2)) + 1
    tot = m + 2 * pad
    x0 = cx - m * r2 / 2 - pad * r2
    y_top = cy + m * r2 / 2 + pad * r2
    xs = x0 + (np.arange(tot) + 0.5) * r2
    ys = y_top - (np.arange(tot) + 0.5) * r2
    rr, _ = world.px_index(np.zeros(tot), ys)
    _, cc = world.px_index(xs, np.zeros(tot))
    H = world.height[rr[:, None], cc[None, :]].astype(np.float32)
    # trees in the padded window (coarse discs)
    tidx = world.trees_near(x0, y_top - tot * r2, x0 + tot * r2, y_top)
    disc = _tree_disc_raster(world, tidx, x0, y_top, r2, tot)
    if disc is not None:
        flat, _, h, *_ = disc
        Hf = H.ravel()
        Hf[flat] = np.maximum(Hf[flat], h)
    # receivers: the centre part at half resolution (max-pool of the full-res heights incl. canopies)
    if n % 2 == 0:
        recv = hs_full.reshape(m, 2, m, 2).max(axis=(1, 3))
    else:
        recv = H[pad:pad + m, pad:pad + m]
    hmax = max(float(H.max()), hmax_in)
    if hmax <= 0.3:
        return np.zeros((n, n), dtype=np.float32)
    steps = int(min(math.ceil(hmax / tan_el / r2), pad - 1))
    dc = math.sin(look.sun_az)
    dr = -math.cos(look.sun_az)
    best = np.full((m, m), -1e9, dtype=np.float32)
    # first 8 steps one half-res pixel apart (near edges stay crisp), then every second one
    ks = list(range(1, min(steps, 8) + 1)) + list(range(10, steps + 1, 2))
    for k in ks:
        oc = int(round(k * dc))
        orr = int(round(k * dr))
        win = H[pad + orr:pad + orr + m, pad + oc:pad + oc + m]
        np.maximum(best, win - (k * r2 * tan_el), out=best)
    sh = (best > recv + 0.25).astype(np.float32)
    # upsample x2 and soften
    up = np.repeat(np.repeat(sh, 2, axis=0), 2, axis=1)
    if up.shape[0] != n:
        up = np.pad(up, ((0, n - up.shape[0]), (0, n - up.shape[1])), mode="edge")
    soft = up.copy()
    soft[1:-1] = 0.25 * up[:-2] + 0.5 * up[1:-1] + 0.25 * up[2:]
    out = soft.copy()
    out[:, 1:-1] = 0.25 * soft[:, :-2] + 0.5 * soft[:, 1:-1] + 0.25 * soft[:, 2:]
    return out


# --------------------------------------------------------------------------------------------
# panorama
# --------------------------------------------------------------------------------------------
_DIST_CACHE: dict = {}


def _distances(k: int, dmin: float, dmax: float):
    key = (k, dmin, dmax)
    if key not in _DIST_CACHE:
        _DIST_CACHE[key] = (dmin * (dmax / dmin) ** (np.arange(k) / (k - 1))).astype(np.float32)
    return _DIST_CACHE[key]


def pano_angles(h: int, w: int, heading: float = 0.0):
    """(azimuth per column, elevation per row) in radians for the CVUSA layout."""
    az = np.mod(np.pi + heading + 2 * np.pi * np.arange(w) / w, 2 * np.pi)
    el = np.pi / 2 - np.pi * (np.arange(h) + 0.5) / h
    return az, el


def render_pano(world: World, cx: float, cy: float, height: int = 128, width: int = 512,
                look: PanoLook | None = None, rng: np.random.Generator | None = None,
                heading_deg: float = 0.0, fov_deg: float = 360.0, eye: float = EYE_HEIGHT,
                max_dist: float = 120.0, steps: int = 256, return_depth: bool = False):
    """Equirectangular panorama (height x width x 3 uint8) at (cx, cy), eye ``eye`` m above ground.

    ``heading_deg`` rotates the view clockwise (the centre column then looks at that azimuth);
    ``fov_deg`` < 360 keeps only the columns within +-fov/2 of the centre (the width shrinks in
    proportion, the angular resolution is unchanged).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    look = look if look is not None else sample_pano_look(rng)
    H, W = int(height), int(width)
    heading = math.radians(heading_deg)
    az, el = pano_angles(H, W, heading)
    if fov_deg < 360.0:
        keep_w = max(1, int(round(W * fov_deg / 360.0)))
        c0 = W // 2 - keep_w // 2
        az = az[c0:c0 + keep_w]
    return _render_columns(world, cx, cy, az, el, look, rng, eye, max_dist, steps, return_depth)


def _render_columns(world: World, cx: float, cy: float, az: np.ndarray, el: np.ndarray, look: PanoLook,
                    rng: np.random.Generator, eye: float, max_dist: float, steps: int, return_depth: bool,
                    row0: int = 0, full_rows: int | None = None, col0: int = 0):
    """The panorama renderer proper: one column per azimuth in ``az`` (equally spaced, clockwise), one
    row per elevation in ``el`` (descending). ``el`` may be the band of rows ``row0 ..`` of a
    ``full_rows``-row panorama (rows i at pi/2 - pi (i + 0.5) / full_rows); the tree sprites need to
    know which. ``col0``: this is a block of columns starting there (keys the leaf texture, so
    that blocks put together equal one render). Returns (len(el), len(az), 3) uint8 (and the depth
    buffer when asked)."""
    C = len(az)
    H = len(el)
    d = _distances(steps, 0.3, max_dist)
    K = len(d)
    sa, ca = np.sin(az).astype(np.float32), np.cos(az).astype(np.float32)
    px = cx + sa[:, None] * d[None, :]
    py = cy + ca[:, None] * d[None, :]
    ny, nx = world.cls.shape
    col = np.clip(((px + world.half_world) / world.res).astype(np.int64), 0, nx - 1)
    row = np.clip(((world.half_world - py) / world.res).astype(np.int64), 0, ny - 1)
    fidx = row * nx + col  # (C, K)
    hs = world.height.ravel()[fidx].astype(np.float32)
    tan = (hs - eye) / d[None, :]
    runmax = np.maximum.accumulate(tan, axis=1)
    keys = (np.arctan(runmax).astype(np.float64) + 10.0 * np.arange(C)[:, None]).ravel()
    q = (el[None, :].astype(np.float64) + 10.0 * np.arange(C)[:, None]).ravel()  # (C, H) queries
    hit = np.searchsorted(keys, q, side="left")
    kk = hit - np.repeat(np.arange(C) * K, H)
    miss = kk >= K
    kk = np.minimum(kk, K - 1)
    kk = kk.reshape(C, H)
    miss = miss.reshape(C, H)
    cidx = np.arange(C)[:, None]
    f_hit = fidx[cidx, kk]
    h_hit = hs[cidx, kk]
    d_hit = d[kk]
    d_prev = np.where(kk > 0, d[np.maximum(kk - 1, 0)], 0.0)
    tan_el = np.tan(el)[None, :].astype(np.float32)
    z_prev = eye + d_prev * tan_el
    top = z_prev >= h_hit - 1e-3  # ray came down onto the surface
    obj = world.obj.ravel()[f_hit]
    cls = world.cls.ravel()[f_hit]
    alb = world.albedo.reshape(-1, 3)[f_hit].astype(np.float32)  # (C, H, 3)
    dist = d_hit.astype(np.float32).copy()
    sun_h = math.cos(look.sun_el)
    sunx, suny, sunz = math.sin(look.sun_az) * sun_h, math.cos(look.sun_az) * sun_h, math.sin(look.sun_el)
    amb = look.ambient
    sun = look.sun_col
    light = np.empty((C, H, 3), dtype=np.float32)
    light[:] = amb + sun * sunz  # horizontal surfaces
    color = alb
    # ---- buildings: exact entry into the box
    bmask = (obj > 0) & ~miss
    if bmask.any():
        bi = obj[bmask]
        B = world.buildings
        ci, ri = np.nonzero(bmask)
        dxr, dyr = sa[ci], ca[ci]
        th = B["theta"][bi]
        ct, st = np.cos(th), np.sin(th)
        ox, oy = cx - B["cx"][bi], cy - B["cy"][bi]
        u0 = ct * ox + st * oy
        v0 = -st * ox + ct * oy
        du = ct * dxr + st * dyr
        dv = -st * dxr + ct * dyr
        hu, hv = B["hu"][bi], B["hv"][bi]
        with np.errstate(divide="ignore", invalid="ignore"):
            tu1 = (-hu - u0) / du
            tu2 = (hu - u0) / du
            tv1 = (-hv - v0) / dv
            tv2 = (hv - v0) / dv
        tu_in = np.where(np.isfinite(tu1), np.minimum(tu1, tu2), -np.inf)
        tv_in = np.where(np.isfinite(tv1), np.minimum(tv1, tv2), -np.inf)
        face_u = tu_in > tv_in  # entered through a +-u face (normal along u)
        t_in = np.maximum(tu_in, tv_in)
        dk = d_hit[bmask]
        valid = (t_in > 0) & (t_in <= dk + 0.05) & (t_in >= dk - 3.0)
        t_in = np.where(valid, t_in, dk)
        z_in = eye + t_in * tan_el[0, ri]
        eave = B["eave"][bi]
        facade = (z_in <= eave + 0.05) & ~top[bmask]
        # normal in world (pointing back to the camera side)
        sgn_u = -np.sign(du)
        sgn_v = -np.sign(dv)
        nxw = np.where(face_u, sgn_u * ct, -sgn_v * st)
        nyw = np.where(face_u, sgn_u * st, sgn_v * ct)
        s_coord = np.where(face_u, v0 + t_in * dv + hv, u0 + t_in * du + hu)
        fl = B["floor_h"][bi]
        ws = B["win_sp"][bi]
        fx = np.mod(s_coord, ws) / ws
        fz = np.mod(z_in, fl) / fl
        ww, wh = B["win_w"][bi], B["win_h"][bi]
        win = (np.abs(fx - 0.5) < ww / 2) & (np.abs(fz - 0.55) < wh / 2) & (z_in > 0.6) & (z_in < eave - 0.4)
        style = B["style"][bi]
        glassy = style == 2  # offices: glass facade
        win = win | (glassy & (np.mod(z_in, fl) > 0.35))
        fcol = B["facade_col"][bi].copy()
        trim = B["trim_col"][bi]
        # ground-floor band and cornice, windows dark with a bit of sky reflection
        band = (z_in < 0.5) | (z_in > eave - 0.4)
        fcol[band] = trim[band]
        glass = (0.35 * look.sky_horizon + np.array([10, 14, 20], np.float32)) * (0.5 + 0.5 * hash_u01(bi, (z_in // fl).astype(np.int64), (s_coord // ws).astype(np.int64), salt=7))[:, None]
        fcol = np.where(win[:, None], glass * 0.6, fcol)
        lam = np.maximum(nxw * sunx + nyw * suny, 0.0)
        fl_light = amb * 0.9 + sun * lam[:, None].astype(np.float32)
        sel = np.flatnonzero(bmask.ravel())
        cflat = color.reshape(-1, 3)
        lflat = light.reshape(-1, 3)
        dflat = dist.reshape(-1)
        fsel = sel[facade]
        cflat[fsel] = fcol[facade]
        lflat[fsel] = fl_light[facade]
        dflat[sel] = t_in
        # roof seen from below/side: albedo already holds the roof colour; slopes a bit darker
        rsel = sel[~facade]
        lflat[rsel] = amb + sun * (0.7 * sunz + 0.3)
    # ---- other raised solids (hedges, cars, forest edges): sides darker, textured
    side = ~top & ~miss & (obj == 0) & (h_hit > 0.05)
    if side.any():
        zz = (eye + d_hit * tan_el)[side]
        tex = 0.75 + 0.3 * hash_u01(f_hit[side], (zz * 3).astype(np.int64), salt=13)
        color[side] = color[side] * tex[:, None].astype(np.float32)
        light[side] = amb + sun * 0.35
        car = side & (cls == C_CAR)
        color[car & ((eye + d_hit * tan_el) > 0.9)] *= 0.45  # car windows
    # water reflects the sky
    wat = (cls == C_WATER) & ~miss & top
    if wat.any():
        color[wat] = look.sky_horizon * 0.55 + 10
        light[wat] = 1.0
    img = color * light
    # ---- sky and far ground
    up = int(np.count_nonzero(el >= 0))
    sky = np.zeros((C, H), dtype=bool)
    sky[:, :up] = miss[:, :up]
    far = miss.copy()
    far[:, :up] = False
    if sky.any():
        sk = _sky(look, az, el, C, H)
        img[:, :up] = np.where(sky[:, :up, None], sk, img[:, :up])
    if far.any():
        img[far] = look.sky_horizon * 0.75 * np.array([0.9, 0.95, 0.85], np.float32)
    dist[far] = max_dist * 2
    dist[sky] = np.inf
    # ---- trees (sprites) depth tested against the solid buffer
    _draw_trees(world, img, dist, cx, cy, az, el, eye, look, max_dist * 0.85, row0, full_rows or H, col0)
    # ---- aerial perspective (not on the sky)
    dfin = np.where(np.isfinite(dist), dist, np.float32(0))
    fog = (1.0 - np.exp(dfin * np.float32(-1.0 / look.fog_dist))).astype(np.float32)
    img += (look.sky_horizon - img) * fog[..., None]
    out = _finish(img, look.gain, look.exposure, look.gamma, look.saturation, look.noise, rng)
    out = np.ascontiguousarray(np.transpose(out, (1, 0, 2)))  # (H, C, 3)
    if return_depth:
        return out, np.transpose(dist, (1, 0))
    return out


# --------------------------------------------------------------------------------------------
# perspective (pinhole) view
# --------------------------------------------------------------------------------------------
_PERSPECTIVE_BLOCK_PIXELS = 1 << 18


def perspective_angles(width: int, height: int, hfov_deg: float, heading_deg: float = 0.0,
                       pitch_deg: float = 0.0, roll_deg: float = 0.0):
    """(azimuth, elevation) in radians of the ray through the centre of every pixel of a pinhole
    image, both (height, width); azimuth clockwise from north in (-pi, pi].

    The camera: principal point at the image centre, square pixels, focal length
    f = (width / 2) / tan(hfov / 2) pixels. Its orientation is built as heading, then pitch, then
    roll (intrinsic yaw-pitch-roll): the optical axis looks at azimuth ``heading_deg`` (clockwise
    from north) and elevation ``pitch_deg`` (up positive); ``roll_deg`` turns the camera about its
    optical axis clockwise as seen from behind it (its right side goes down, so the scene turns
    counter-clockwise in the image).
    """
    f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    x = ((np.arange(width) + 0.5 - width / 2.0) / f)[None, :]      # right
    z = ((height / 2.0 - np.arange(height) - 0.5) / f)[:, None]     # up
    ro, pi_, he = math.radians(roll_deg), math.radians(pitch_deg), math.radians(heading_deg)
    x1 = x * math.cos(ro) + z * math.sin(ro)
    z1 = z * math.cos(ro) - x * math.sin(ro)
    y2 = math.cos(pi_) - z1 * math.sin(pi_)                          # forward component, before: 1
    z2 = math.sin(pi_) + z1 * math.cos(pi_)
    east = x1 * math.cos(he) + y2 * math.sin(he)
    north = y2 * math.cos(he) - x1 * math.sin(he)
    az = np.arctan2(east, north)
    el = np.arctan2(z2, np.hypot(east, north))
    return np.broadcast_to(az, (height, width)), np.broadcast_to(el, (height, width))


def render_perspective(world: World, cx: float, cy: float, width: int = 1024, height: int = 768,
                       hfov_deg: float = 65.0, heading_deg: float = 0.0, pitch_deg: float = 0.0,
                       roll_deg: float = 0.0, look: PanoLook | None = None, rng: np.random.Generator | None = None,
                       eye: float = EYE_HEIGHT, oversample: float = 1.25, max_dist: float = 120.0, steps: int = 256,
                       return_depth: bool = False):
    """A pinhole photo (height x width x 3 uint8) at (cx, cy) of the same scene as ``render_pano``
    (camera model: ``perspective_angles``).

    Every pixel's ray is looked up in an equirectangular panorama rendered by the panorama
    renderer itself, only over the band of rows and columns the photo needs, at an angular step
    of 1 / (f * oversample) radians: finer than the photo's pixels, which subtend at most 1/f
    (at the image centre). The lookup is bilinear at the ray's exact azimuth and elevation. The
    sensor noise of ``look`` is added to the photo's own pixels, after the lookup.
    """
    if not (0.0 < hfov_deg < 180.0):
        raise ValueError(f"a pinhole camera needs a horizontal field of view in (0, 180) degrees, got {hfov_deg}")
    if width < 2 or height < 2:
        raise ValueError(f"perspective image size {width}x{height} is too small")
    rng = rng if rng is not None else np.random.default_rng(0)
    look = look if look is not None else sample_pano_look(rng)
    az, el = perspective_angles(width, height, hfov_deg, heading_deg, pitch_deg, roll_deg)
    f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    full_rows = int(math.ceil(math.pi * f * oversample))
    full_w = 2 * full_rows  # same angular step along both axes
    step = 2 * math.pi / full_w
    heading = math.radians(heading_deg)
    rel = np.mod(az - heading + math.pi, 2 * math.pi) - math.pi  # azimuth relative to the heading
    half = int(math.ceil(float(np.abs(rel).max()) / step)) + 2
    wrap = 2 * half + 1 >= full_w  # the photo sees (nearly) all azimuths, e.g. it holds the zenith
    if wrap:
        half = full_w // 2
        cols = np.arange(-half, full_w - half)
    else:
        cols = np.arange(-half, half + 1)
    col_az = np.mod(heading + step * cols, 2 * math.pi)
    row_f = (math.pi / 2 - el) / math.pi * full_rows - 0.5  # fractional row of the full panorama
    row0 = max(0, int(math.floor(float(row_f.min()))) - 1)
    row1 = min(full_rows, int(math.floor(float(row_f.max()))) + 3)
    band_el = math.pi / 2 - math.pi * (np.arange(row0, row1) + 0.5) / full_rows
    # the band in blocks of columns: the renderer's temporaries take ~300 bytes per pixel
    per_block = max(16, _PERSPECTIVE_BLOCK_PIXELS // len(band_el))
    starts = list(range(0, len(col_az), per_block))
    if len(starts) > 1 and len(col_az) - starts[-1] < 2:
        starts.pop()  # the renderer needs two columns to know its angular step
    quiet = replace(look, noise=0.0)
    blocks = [_render_columns(world, cx, cy, col_az[a:b], band_el, quiet, rng, eye, max_dist, steps, True,
                              row0=row0, full_rows=full_rows, col0=a)
              for a, b in zip(starts, starts[1:] + [len(col_az)])]
    band = np.concatenate([img for img, _ in blocks], axis=1)
    depth = np.concatenate([d for _, d in blocks], axis=1)
    del blocks
    y = np.clip(row_f - row0, 0, band.shape[0] - 1)
    x = rel / step + half
    y0 = np.minimum(np.floor(y).astype(np.int64), band.shape[0] - 2)
    x0 = np.floor(x).astype(np.int64)
    fy = (y - y0).astype(np.float32)[..., None]
    fx = (x - x0).astype(np.float32)[..., None]
    if wrap:
        x0, x1 = np.mod(x0, full_w), np.mod(x0 + 1, full_w)
    else:
        x1 = x0 + 1
    b = band.astype(np.float32)
    img = ((b[y0, x0] * (1 - fx) + b[y0, x1] * fx) * (1 - fy)
           + (b[y0 + 1, x0] * (1 - fx) + b[y0 + 1, x1] * fx) * fy)
    if look.noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(look.noise)
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if return_depth:
        near_y = np.clip(np.rint(y).astype(np.int64), 0, band.shape[0] - 1)
        near_x = np.rint(x).astype(np.int64)
        near_x = np.mod(near_x, full_w) if wrap else near_x
        return out, depth[near_y, near_x]
    return out


_CLOUD_TILE: list = []


def _cloud_tile() -> np.ndarray:
    if not _CLOUD_TILE:
        from worldgen.noise import noise_tile
        _CLOUD_TILE.append(noise_tile(np.random.default_rng(777), 512, 5.0))
    return _CLOUD_TILE[0]


def _sky(look: PanoLook, az, el, C, H):
    """Sky colours for the rows at or above the horizon: (C, n_up, 3) float32."""
    up = int(np.count_nonzero(el >= 0))
    e = el[:up]
    t = np.power(np.sin(e), 0.6).astype(np.float32)
    grad = (look.sky_horizon[None, :] * (1 - t[:, None]) + look.sky_zenith[None, :] * t[:, None]).astype(np.float32)
    sky = np.empty((C, up, 3), np.float32)
    sky[:] = grad[None]
    if look.cloud > 0:
        # clouds: periodic noise, v from the elevation, u from the azimuth. Separable bilinear:
        # lerp the needed texture rows, then gather/lerp the columns.
        tile = _cloud_tile()
        n = tile.shape[0]
        v = look.cloud_off * 0.37 + 90.0 * e
        v0 = np.floor(v)
        fv = (v - v0).astype(np.float32)[:, None]
        j0 = v0.astype(np.int64) % n
        rows = (tile[j0] * (1 - fv) + tile[(j0 + 1) % n] * fv).T  # (n, up)
        u = az / (2 * np.pi) * n + look.cloud_off
        u0 = np.floor(u)
        fu = (u - u0).astype(np.float32)[:, None]
        i0 = u0.astype(np.int64) % n
        c = rows[i0] * (1 - fu) + rows[(i0 + 1) % n] * fu  # (C, up)
        cov = np.clip((c + np.float32(2.2 * look.cloud - 1.3)) * np.float32(1 / 0.9), 0, 1)
        cov *= np.clip(e / 0.05, 0, 1).astype(np.float32)[None, :]
        cloud_col = np.array([238, 238, 240], np.float32) if look.weather != "overcast" else look.sky_horizon * 0.85
        sky += (cloud_col[None, None, :] - grad[None]) * cov[..., None]
    if look.weather == "clear":
        # sun glow only near the sun's azimuth
        near = np.cos(az - look.sun_az) > 0.9
        if near.any():
            cosang = (np.cos(e)[None, :] * np.cos(az[near] - look.sun_az)[:, None] * math.cos(look.sun_el)
                      + np.sin(e)[None, :] * math.sin(look.sun_el))
            glow = np.clip((cosang - 0.97) / 0.03, 0, 1) ** 2
            sky[near] += (80 * glow[..., None]).astype(np.float32)
    return sky


# Sprite pixels enumerated at once; more are drawn in several passes (same result: a later pass
# only paints where it is strictly nearer). A panorama of the default size needs one pass, a
# high-resolution band for a perspective view with trees close by would otherwise need GBs.
_TREE_PIXELS_PER_PASS = 1 << 22


def _draw_trees(world: World, img, dist, cx, cy, az, el, eye, look: PanoLook, radius, row0: int = 0,
                full_rows: int | None = None, col0: int = 0):
    C, H = dist.shape
    full_rows = H if full_rows is None else full_rows
    idx = world.trees_near(cx - radius, cy - radius, cx + radius, cy + radius)
    if len(idx) == 0:
        return
    t = world.trees
    dx = t["x"][idx] - cx
    dy = t["y"][idx] - cy
    D = np.hypot(dx, dy)
    r = t["r"][idx]
    ok = (D < radius) & (D > 0.6)
    if not ok.any():
        return
    idx, dx, dy, D, r = idx[ok], dx[ok], dy[ok], D[ok], r[ok]
    D = np.maximum(D, r * 1.1 + 0.3)  # camera never inside a canopy
    top, base, con = t["top"][idx], t["base"][idx], t["conifer"][idx] > 0
    az_t = np.arctan2(dx, dy)
    # column centre (fractional) in this pano's azimuth list; az increases by 2pi/W per column
    Wfull = C if len(az) < 2 else int(round(2 * np.pi / (np.mod(az[1] - az[0], 2 * np.pi))))
    colc = np.mod(az_t - az[0], 2 * np.pi) / (2 * np.pi) * Wfull
    halfw = np.arctan2(r, D) / (2 * np.pi) * Wfull
    row_of = lambda e: (np.pi / 2 - e) / np.pi * full_rows - 0.5 - row0  # row within this band
    r_top = row_of(np.arctan2(top - eye, D))
    r_base = row_of(np.arctan2(base - eye, D))
    r_gnd = row_of(np.arctan2(-eye, D))
    trunk_hw = np.maximum(np.arctan2(0.12 + 0.015 * top, D) / (2 * np.pi) * Wfull, 0.5)
    # bounding boxes in pixels (columns may wrap)
    c_lo = np.floor(colc - halfw).astype(np.int64)
    c_hi = np.ceil(colc + halfw).astype(np.int64)
    rw_lo = np.clip(np.floor(r_top).astype(np.int64), 0, H - 1)
    rw_hi = np.clip(np.ceil(r_gnd).astype(np.int64), 0, H - 1)
    bw = np.minimum(c_hi - c_lo + 1, Wfull)
    tree = np.arange(len(idx))
    if C < Wfull:
        # A crop: only unwrapped columns k*Wfull + [0, C) land in it; enumerate just those parts
        # of each box (a box can meet the crop twice, across the wrap), in tree order.
        pieces = []
        for k in (-1, 0, 1):
            lo = np.maximum(c_lo, k * Wfull)
            hi = np.minimum(c_lo + bw - 1, k * Wfull + C - 1)
            keep = lo <= hi
            pieces.append((tree[keep], lo[keep], hi[keep] - lo[keep] + 1))
        tree, c_lo, bw = (np.concatenate(a) for a in zip(*pieces))
        order = np.argsort(tree, kind="stable")
        tree, c_lo, bw = tree[order], c_lo[order], bw[order]
    bh = rw_hi[tree] - rw_lo[tree] + 1
    cnt = (bw * bh).astype(np.int64)
    if int(cnt.sum()) == 0:
        return
    ends = np.cumsum(cnt)
    lo = 0
    while lo < len(tree):
        hi = max(lo + 1, int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + _TREE_PIXELS_PER_PASS, side="right")))
        _draw_tree_boxes(img, dist, tree[lo:hi], c_lo[lo:hi], bw[lo:hi], rw_lo[tree[lo:hi]], cnt[lo:hi], idx, D,
                         az_t, colc, halfw, r_top, r_base, r_gnd, trunk_hw, con, t["col"], Wfull, look, row0, full_rows,
                         col0)
        lo = hi


def _draw_tree_boxes(img, dist, tree, c_lo, bw, rw_lo, cnt, idx, D, az_t, colc, halfw, r_top, r_base, r_gnd,
                     trunk_hw, con, tree_col, Wfull, look: PanoLook, row0, full_rows, col0):
    """Paint the sprite pixels of the boxes (tree, first unwrapped column, width, first row, pixel
    count) where they are nearer than ``dist``; nearest tree wins, ties to the earlier box."""
    C, H = dist.shape
    t_all = np.repeat(np.arange(len(tree)), cnt)
    tot = len(t_all)
    if tot == 0:
        return
    loc = np.arange(tot) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    bwi = bw[t_all]
    pr = rw_lo[t_all] + loc // bwi
    pcu = c_lo[t_all] + loc % bwi
    ti = tree[t_all]
    pc = np.mod(pcu, Wfull)
    # canopy: ellipse (deciduous) or triangle (conifer) between base and top rows
    u = (pcu + 0.0 - colc[ti]) / np.maximum(halfw[ti], 0.5)
    vmid = 0.5 * (r_top[ti] + r_base[ti])
    vh = np.maximum(0.5 * (r_base[ti] - r_top[ti]), 0.5)
    v = (pr - vmid) / vh
    conf = con[ti]
    in_dec = (u * u + v * v) < 1.0
    frac = np.clip((pr - r_top[ti]) / np.maximum(r_base[ti] - r_top[ti], 0.5), 0, 1)
    in_con = np.abs(u) < frac * 1.0
    canopy = np.where(conf, in_con & (pr >= r_top[ti]) & (pr <= r_base[ti]), in_dec)
    trunk = (~canopy) & (np.abs(pcu - colc[ti]) <= trunk_hw[ti]) & (pr > vmid) & (pr <= r_gnd[ti] + 0.5)
    draw = (canopy | trunk) & (pc < C) & (pc >= 0)
    if not draw.any():
        return
    ti, pr, pc, u, v, canopy = ti[draw], pr[draw], pc[draw], u[draw], v[draw], canopy[draw]
    Dt = D[ti]
    flat = pc * H + pr
    dflat = dist.reshape(-1)
    vis = Dt < dflat[flat]
    if not vis.any():
        return
    ti, pr, pc, u, v, canopy, Dt, flat = ti[vis], pr[vis], pc[vis], u[vis], v[vis], canopy[vis], Dt[vis], flat[vis]
    order = np.lexsort((Dt, flat))
    flat, ti, pr, pc, u, v, canopy, Dt = (flat[order], ti[order], pr[order], pc[order], u[order], v[order],
                                          canopy[order], Dt[order])
    first = np.ones(len(flat), dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    flat, ti, pr, pc, u, v, canopy, Dt = (flat[first], ti[first], pr[first], pc[first], u[first], v[first],
                                          canopy[first], Dt[first])
    tid = idx[ti]
    base_col = tree_col[tid]
    # leaf texture keyed by the pixel's place in the whole render, so bands and blocks match it
    leaf = 0.7 + 0.45 * hash_u01(tid, (pc + col0) * full_rows + pr + row0, salt=3)
    # light: sun side brighter (u > 0 is clockwise of the trunk direction)
    sun_rel = np.sin(look.sun_az - az_t[ti])
    shade = np.clip(0.75 + 0.35 * (u * sun_rel) * (look.sun_col.mean() > 0.3) - 0.15 * v, 0.35, 1.2)
    ccol = base_col * (leaf * shade)[:, None]
    tcol = np.array([70, 58, 46], np.float32) * (0.8 + 0.3 * leaf[:, None])
    colr = np.where(canopy[:, None], ccol, tcol)
    light = look.ambient * 0.9 + look.sun_col * 0.6
    img.reshape(-1, 3)[flat] = colr * light
    dflat[flat] = Dt

"""Procedural 2.5-D region: districts, roads, blocks, buildings, trees, water, fields.

Coordinates: local metres, x east, y north, origin (0, 0) at the region centre, which sits at
(lat0, lon0). The world is a set of rasters at ``res`` metres per pixel (row 0 = north edge):

* ``albedo``  uint8 (ny, nx, 3): top-down surface colour (roofs, roads, grass, ...)
* ``height``  float16 (ny, nx): solid height above ground in metres (buildings, hedges, cars,
  forest canopy); 0 for flat ground and water
* ``obj``     int32 (ny, nx): building id (1..n) or 0
* ``cls``     uint8 (ny, nx): surface class (see ``C_*``)

plus vector tables for buildings (oriented boxes, needed for exact facades) and free-standing
trees (rendered as sprites so that the ground under a canopy stays visible). Camera positions
lie on road pixels inside the core square of ``area_km2``; the rasters extend ``margin`` metres
beyond it so every view is complete.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from worldgen.geo import metres_to_latlon
from worldgen.noise import hash_u01, noise_tile, sample_bilinear, sample_nearest

# surface classes
C_GRASS, C_ROAD, C_SIDEWALK, C_MARKING, C_BUILDING, C_WATER, C_FIELD, C_FOREST = range(8)
C_PARKING, C_PAVED, C_HEDGE, C_CAR, C_DIRT = range(8, 13)
CLASS_NAMES = ["grass", "road", "sidewalk", "marking", "building", "water", "field", "forest",
               "parking", "paved", "hedge", "car", "dirt"]
ROADLIKE = (C_ROAD, C_MARKING)
NO_BUILD = np.zeros(16, dtype=bool)
NO_BUILD[[C_ROAD, C_SIDEWALK, C_MARKING, C_BUILDING, C_WATER, C_HEDGE, C_CAR]] = True

# district types
URBAN, SUBURBAN, RURAL = 0, 1, 2
AREA_NAMES = ["urban", "suburban", "rural"]

# land uses of a block
LU_BUILDINGS, LU_PARK, LU_PARKING, LU_PLAZA, LU_HOUSES, LU_FIELD, LU_FOREST, LU_MEADOW, LU_FARM = range(9)

DISTRICT_CELL = 430.0  # metres between district seeds (jittered)
BIG = 1.0e5  # offset that makes per-district line tables one sorted array


def _rgb(*c):
    return np.array(c, dtype=np.float32)


# base colours, sRGB 0..255
COL_ASPHALT = _rgb(78, 78, 82)
COL_SIDEWALK = _rgb(168, 164, 156)
COL_MARK = _rgb(232, 232, 222)
COL_GRASS = _rgb(92, 128, 62)
COL_MEADOW = _rgb(128, 140, 76)
COL_FOREST = _rgb(44, 70, 38)
COL_WATER = _rgb(46, 72, 84)
COL_PAVED = _rgb(150, 140, 128)
COL_PLAZA = _rgb(186, 174, 156)
COL_DIRT = _rgb(128, 104, 78)
COL_HEDGE = _rgb(48, 82, 40)
CROPS = np.array([[196, 170, 96], [112, 150, 62], [122, 96, 70], [150, 160, 80], [172, 150, 110],
                  [90, 124, 56], [204, 190, 120]], dtype=np.float32)
CAR_COLS = np.array([[225, 225, 225], [30, 30, 34], [150, 152, 158], [160, 30, 30], [40, 60, 130],
                     [90, 90, 95], [200, 190, 160], [30, 90, 60]], dtype=np.float32)


@dataclass
class District:
    kind: int
    seed_xy: tuple
    theta: float
    warp_amp: float
    warp_len: float
    warp_phase: float
    half_w: float  # road half width
    sidewalk: float
    keep_prob: float
    parcel: float


@dataclass
class World:
    seed: int
    area_km2: float
    lat0: float
    lon0: float
    res: float
    half_core: float  # cameras lie in [-half_core, half_core]^2
    half_world: float
    albedo: np.ndarray
    height: np.ndarray
    obj: np.ndarray
    cls: np.ndarray
    buildings: dict
    trees: dict
    districts: list
    district_map_res: float
    district_map: np.ndarray  # coarse district index map (for area-type lookups)
    tree_grid: dict = field(default_factory=dict)

    @property
    def shape(self):
        return self.cls.shape

    # metres -> fractional pixel (row, col); pixel (0, 0) is the north-west corner cell
    def to_px(self, x, y):
        col = (np.asarray(x) + self.half_world) / self.res
        row = (self.half_world - np.asarray(y)) / self.res
        return row, col

    def px_index(self, x, y):
        row, col = self.to_px(x, y)
        ny, nx = self.cls.shape
        r = np.clip(np.floor(row).astype(np.int64), 0, ny - 1)
        c = np.clip(np.floor(col).astype(np.int64), 0, nx - 1)
        return r, c

    def latlon(self, x, y):
        return metres_to_latlon(x, y, self.lat0, self.lon0)

    def area_type(self, x, y):
        """District type (0 urban, 1 suburban, 2 rural) at metre coordinates."""
        n = self.district_map.shape[0]
        c = np.clip(((np.asarray(x) + self.half_world) / self.district_map_res).astype(np.int64), 0, n - 1)
        r = np.clip(((self.half_world - np.asarray(y)) / self.district_map_res).astype(np.int64), 0, n - 1)
        kinds = np.array([d.kind for d in self.districts])
        return kinds[self.district_map[r, c]]

    def trees_near(self, x0, y0, x1, y1):
        """Indices of trees whose centre lies in the box [x0, x1] x [y0, y1] (cell-coarse superset)."""
        g = self.tree_grid
        cs, n = g["cell"], g["n"]
        c0 = max(int((x0 + self.half_world) // cs), 0)
        c1 = min(int((x1 + self.half_world) // cs), n - 1)
        r0 = max(int((self.half_world - y1) // cs), 0)
        r1 = min(int((self.half_world - y0) // cs), n - 1)
        if c1 < c0 or r1 < r0:
            return np.zeros(0, dtype=np.int64)
        starts, order = g["starts"], g["order"]
        parts = []
        for r in range(r0, r1 + 1):
            a = starts[r * n + c0]
            b = starts[r * n + c1 + 1]
            if b > a:
                parts.append(order[a:b])
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# layout: districts and street grids, evaluated vectorised at arbitrary points
# --------------------------------------------------------------------------------------------
class Layout:
    def __init__(self, seed: int, half_world: float, rng: np.random.Generator):
        self.seed = seed
        g = DISTRICT_CELL
        n = int(math.ceil(2 * half_world / g)) + 2
        ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        base = -half_world - g / 2 + (np.stack([jj, ii], -1) + 0.5) * g
        jit = rng.uniform(-0.33, 0.33, size=base.shape) * g
        seeds = (base + jit).reshape(-1, 2)
        self.seeds = seeds
        nd = len(seeds)
        # smooth "urbanness" field -> district kinds by rank, so urban districts cluster
        cx, cy = rng.uniform(-0.5, 0.5, 2) * half_world
        dist_c = np.hypot(seeds[:, 0] - cx, seeds[:, 1] - cy) / max(half_world, 1.0)
        u = -dist_c + rng.normal(0, 0.35, nd)
        ranks = np.argsort(np.argsort(-u))
        frac = ranks / max(nd - 1, 1)
        kinds = np.where(frac < 0.3, URBAN, np.where(frac < 0.68, SUBURBAN, RURAL))
        self.districts = []
        lines_a, lines_b, keeps_a, keeps_b = [], [], [], []
        L = 0
        reach = 1.35 * g  # a district's pixels lie within 1.17 g of its seed (jitter 0.33 g)
        per = []
        for k in range(nd):
            kind = int(kinds[k])
            r = np.random.default_rng([seed, 101, k])
            if kind == URBAN:
                theta = r.uniform(0, np.pi / 2) if r.random() < 0.7 else 0.0
                curved = r.random() < 0.2
                amp = r.uniform(8, 25) if curved else 0.0
                wl = r.uniform(250, 500)
                half_w = r.uniform(4.5, 7.0)
                sidewalk = r.uniform(2.5, 4.0)
                keep = 0.9
                ba, bb = (55, 130), (70, 190)
            elif kind == SUBURBAN:
                theta = r.uniform(0, np.pi / 2)
                curved = r.random() < 0.65
                amp = r.uniform(12, 45) if curved else 0.0
                wl = r.uniform(180, 420)
                half_w = r.uniform(3.3, 4.5)
                sidewalk = r.uniform(1.5, 2.4)
                keep = 0.78
                ba, bb = (60, 110), (90, 260)
            else:
                theta = r.uniform(0, np.pi / 2)
                amp = r.uniform(0, 70)
                wl = r.uniform(350, 900)
                half_w = r.uniform(2.7, 3.4)
                sidewalk = 0.0
                keep = 0.5
                ba, bb = (180, 420), (200, 500)
            d = District(kind, tuple(seeds[k]), float(theta), float(amp), float(wl),
                         float(r.uniform(0, 2 * np.pi)), float(half_w), float(sidewalk), keep,
                         float(r.uniform(45, 120)))
            self.districts.append(d)
            la = self._lines(r, ba, reach)
            lb = self._lines(r, bb, reach)
            per.append((la, lb, r))
            L = max(L, len(la), len(lb))
        self.L = L
        for k, (la, lb, r) in enumerate(per):
            pad_a = np.concatenate([la, reach + 10 + np.arange(L - len(la)) * 1000.0])
            pad_b = np.concatenate([lb, reach + 10 + np.arange(L - len(lb)) * 1000.0])
            lines_a.append(pad_a)
            lines_b.append(pad_b)
            keep = self.districts[k].keep_prob
            keeps_a.append(r.random((L, L)) < keep)
            keeps_b.append(r.random((L, L)) < keep)
        self.lines_a = np.stack(lines_a)  # (nd, L)
        self.lines_b = np.stack(lines_b)
        self.lines_a32 = self.lines_a.astype(np.float32)
        self.lines_b32 = self.lines_b.astype(np.float32)
        self.flat_a = (self.lines_a + np.arange(nd)[:, None] * BIG).ravel()
        self.flat_b = (self.lines_b + np.arange(nd)[:, None] * BIG).ravel()
        self.keep_a = np.stack(keeps_a)  # [k, line_a i, segment j (b interval)]
        self.keep_b = np.stack(keeps_b)  # [k, line_b j, segment i (a interval)]
        P = lambda name: np.array([getattr(d, name) for d in self.districts], dtype=np.float64)
        self.kind = np.array([d.kind for d in self.districts], dtype=np.int64)
        self.theta = P("theta")
        self.cos_t, self.sin_t = np.cos(self.theta), np.sin(self.theta)
        self.amp, self.wl, self.phase = P("warp_amp"), P("warp_len"), P("warp_phase")
        self.half_w, self.sidewalk, self.parcel = P("half_w"), P("sidewalk"), P("parcel")
        self.f32 = dict(sx=seeds[:, 0].astype(np.float32), sy=seeds[:, 1].astype(np.float32),
                        cos=self.cos_t.astype(np.float32), sin=self.sin_t.astype(np.float32),
                        w=(2 * np.pi / self.wl).astype(np.float32), ph=self.phase.astype(np.float32),
                        amp=self.amp.astype(np.float32))
        # arterials along district boundaries: wider than the districts' own streets
        self.art_half_w = np.maximum(self.half_w, 4.0) + 1.0
        # coarse nearest-3 seed map for fast exact queries
        self.cres = 8.0
        self.half_world = half_world
        m = int(math.ceil(2 * half_world / self.cres))
        xs = -half_world + (np.arange(m) + 0.5) * self.cres
        X, Y = np.meshgrid(xs, -xs)
        d2 = (X[..., None] - seeds[:, 0]) ** 2 + (Y[..., None] - seeds[:, 1]) ** 2
        self.near3 = np.argsort(d2, axis=-1)[..., :3].astype(np.int32)
        self.seeds32 = seeds.astype(np.float32)
        self.sep = np.hypot(seeds[:, None, 0] - seeds[None, :, 0], seeds[:, None, 1] - seeds[None, :, 1]).astype(np.float32)
        # block land-use table [k, a-interval, b-interval]
        kk, ii, jj = np.meshgrid(np.arange(nd), np.arange(L), np.arange(L), indexing="ij")
        self.lu_table = self._landuse(kk, ii, jj)
        self.tint_table = (hash_u01(kk, ii, jj, salt=17) - 0.5).astype(np.float32)
        self.paved_table = hash_u01(kk, ii, jj, salt=5) < 0.55
        self.cmap = self.near3[..., 0].copy()
        # coarse cells whose every point is > 40 m from the nearest bisector: exact test not needed
        dd = np.sort(d2, axis=-1)
        i0, i1 = self.near3[..., 0], self.near3[..., 1]
        sepc = np.hypot(seeds[i0, 0] - seeds[i1, 0], seeds[i0, 1] - seeds[i1, 1])
        bis_c = (dd[..., 1] - dd[..., 0]) / (2 * np.maximum(sepc, 1e-3))
        self.interior = bis_c > 40.0 + self.cres

    @staticmethod
    def _lines(r, rng_len, reach):
        out = [r.uniform(-rng_len[1], 0) - 0.0]
        # start at a random phase then extend both ways
        pos = out[0]
        while pos < reach:
            pos += r.uniform(*rng_len)
            out.append(pos)
        pos = out[0]
        neg = []
        while pos > -reach:
            pos -= r.uniform(*rng_len)
            neg.append(pos)
        return np.array(sorted(neg) + out, dtype=np.float64)

    def district(self, x, y):
        """(nearest seed k1, second k2, distance to the k1|k2 bisector >= 0), vectorised.

        Pixels of coarse cells that lie wholly inside one district, far from any boundary road,
        take the coarse answer; only the others get the exact three-candidate test."""
        m = self.near3.shape[0]
        c = np.clip(((x + self.half_world) * (1.0 / self.cres)).astype(np.int32), 0, m - 1)
        r = np.clip(((self.half_world - y) * (1.0 / self.cres)).astype(np.int32), 0, m - 1)
        if x.ndim == 1 and x.size > 1000:
            inner = self.interior[r, c]
            k1 = self.near3[r, c, 0].astype(np.int64)
            k2 = self.near3[r, c, 1].astype(np.int64)
            bis = np.full(x.shape, 1e4, np.float32)
            edge = ~inner
            if edge.any():
                a1, a2, ab = self._district_exact(x[edge], y[edge], r[edge], c[edge])
                k1[edge], k2[edge], bis[edge] = a1, a2, ab
            return k1, k2, bis
        return self._district_exact(x, y, r, c)

    def _district_exact(self, x, y, r, c):
        cand = self.near3[r, c]  # (..., 3)
        sx = self.seeds32[cand]
        dx = x[..., None] - sx[..., 0]
        dy = y[..., None] - sx[..., 1]
        d2 = dx * dx + dy * dy
        c0, c1, c2 = cand[..., 0], cand[..., 1], cand[..., 2]
        e0, e1, e2 = d2[..., 0], d2[..., 1], d2[..., 2]
        sw = e1 < e0
        k1 = np.where(sw, c1, c0)
        k2 = np.where(sw, c0, c1)
        f1 = np.minimum(e0, e1)
        f2 = np.maximum(e0, e1)
        lt1 = e2 < f1
        lt2 = ~lt1 & (e2 < f2)
        k2 = np.where(lt1, k1, np.where(lt2, c2, k2))
        f2 = np.where(lt1, f1, np.where(lt2, e2, f2))
        k1 = np.where(lt1, c2, k1)
        f1 = np.where(lt1, e2, f1)
        bis = (f2 - f1) / (2 * np.maximum(self.sep[k1, k2], 1e-3))
        return k1.astype(np.int64), k2.astype(np.int64), bis

    def district_scalar(self, x: float, y: float):
        m = self.near3.shape[0]
        c = min(max(int((x + self.half_world) / self.cres), 0), m - 1)
        r = min(max(int((self.half_world - y) / self.cres), 0), m - 1)
        best = sorted(((x - self.seeds[k, 0]) ** 2 + (y - self.seeds[k, 1]) ** 2, int(k)) for k in self.near3[r, c])
        (f1, k1), (f2, k2) = best[0], best[1]
        return k1, k2, (f2 - f1) / (2 * max(self.sep[k1, k2], 1e-3))

    def frame(self, x, y, k):
        """District street frame: (a' warped across-street coordinate, b along, slope factor)."""
        if isinstance(x, np.ndarray) and x.dtype == np.float32:
            return self._frame32(x, y, k)
        dx = x - self.seeds[k, 0]
        dy = y - self.seeds[k, 1]
        c, s = self.cos_t[k], self.sin_t[k]
        a = c * dx + s * dy
        b = -s * dx + c * dy
        ph = 2 * np.pi * b / self.wl[k] + self.phase[k]
        ap = a + self.amp[k] * np.sin(ph)
        slope = self.amp[k] * 2 * np.pi / self.wl[k] * np.cos(ph)
        return ap, b, 1.0 / np.sqrt(1.0 + slope**2)

    def _frame32(self, x, y, k):
        f = self.f32
        dx = x - f["sx"][k]
        dy = y - f["sy"][k]
        c, s = f["cos"][k], f["sin"][k]
        a = c * dx + s * dy
        b = c * dy - s * dx
        ph = b * f["w"][k] + f["ph"][k]
        amp = f["amp"][k]
        ap = a + amp * np.sin(ph)
        slope = amp * f["w"][k] * np.cos(ph)
        return ap, b, 1.0 / np.sqrt(1.0 + slope * slope)

    def frame_inverse(self, ap, b, k):
        a = ap - self.amp[k] * np.sin(2 * np.pi * b / self.wl[k] + self.phase[k])
        c, s = self.cos_t[k], self.sin_t[k]
        x = self.seeds[k, 0] + c * a - s * b
        y = self.seeds[k, 1] + s * a + c * b
        return x, y

    def street_tangent_angle(self, b, k):
        """Angle (radians, from +x) of the a'-lines' tangent (direction of increasing b)."""
        slope = self.amp[k] * 2 * np.pi / self.wl[k] * np.cos(2 * np.pi * b / self.wl[k] + self.phase[k])
        # tangent in (a, b) frame: (-slope, 1); rotate into world
        ta, tb = -slope, 1.0
        c, s = self.cos_t[k], self.sin_t[k]
        tx = c * ta - s * tb
        ty = s * ta + c * tb
        return np.arctan2(ty, tx)

    def streets(self, x, y, k):
        """Per point street geometry within district k (arrays)."""
        ap, b, fac = self.frame(x, y, k)
        L = self.L
        kb = k * BIG
        ia = np.searchsorted(self.flat_a, ap + kb) - 1 - k * L  # interval index (line ia .. ia+1)
        jb = np.searchsorted(self.flat_b, b + kb) - 1 - k * L
        ia = np.clip(ia, 0, L - 2)
        jb = np.clip(jb, 0, L - 2)
        la0 = self.lines_a32[k, ia]
        la1 = self.lines_a32[k, ia + 1]
        lb0 = self.lines_b32[k, jb]
        lb1 = self.lines_b32[k, jb + 1]
        near_a_hi = (la1 - ap) < (ap - la0)
        ia_line = np.where(near_a_hi, ia + 1, ia)
        da = np.where(near_a_hi, la1 - ap, ap - la0) * fac  # distance to nearest a-line (street)
        near_b_hi = (lb1 - b) < (b - lb0)
        jb_line = np.where(near_b_hi, jb + 1, jb)
        db = np.where(near_b_hi, lb1 - b, b - lb0)
        keep_a = self.keep_a[k, ia_line, jb]
        keep_b = self.keep_b[k, jb_line, ia]
        da_eff = np.where(keep_a, da, np.inf)
        db_eff = np.where(keep_b, db, np.inf)
        return dict(ap=ap, b=b, ia=ia, jb=jb, da=da_eff, db=db_eff, da_raw=da, db_raw=db,
                    signed_a=(ap - self.lines_a32[k, ia_line]) * fac)

    def block_landuse(self, k, ia, jb):
        """Land use of block (district k, a-interval ia, b-interval jb)."""
        L = self.L
        ia = np.clip(ia, 0, L - 1)
        jb = np.clip(jb, 0, L - 1)
        return self.lu_table[k, ia, jb]

    def _landuse(self, k, ia, jb):
        h = hash_u01(k, ia, jb, salt=self.seed * 7919 + 11)
        kind = self.kind[k]
        urban = np.select([h < 0.78, h < 0.88, h < 0.93], [LU_BUILDINGS, LU_PARK, LU_PARKING], LU_PLAZA)
        sub = np.select([h < 0.82, h < 0.92, h < 0.95], [LU_HOUSES, LU_PARK, LU_PARKING], LU_MEADOW)
        rur = np.select([h < 0.62, h < 0.77, h < 0.91], [LU_FIELD, LU_FOREST, LU_MEADOW], LU_FARM)
        return np.select([kind == URBAN, kind == SUBURBAN], [urban, sub], rur).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# building the rasters
# --------------------------------------------------------------------------------------------
def _river(rng, half_world):
    if rng.random() > 0.7:
        return None
    return dict(vertical=bool(rng.random() < 0.5), off=float(rng.uniform(-0.6, 0.6) * half_world),
                amp=float(rng.uniform(20, 120)), wl=float(rng.uniform(500, 1400)),
                ph=float(rng.uniform(0, 2 * np.pi)), half=float(rng.uniform(9, 22)))


def _ground_pass(world: World, lay: Layout, river, tex, landuse_out, threads: int = 1):
    """Per-pixel pass over row chunks: districts, roads, sidewalks, markings, land use, water.

    Chunks are independent, so they may run on threads (numpy releases the GIL); the result does
    not depend on the thread count."""
    ny, nx = world.cls.shape
    chunk = max(1, 400_000 // nx)
    spans = [(r0, min(ny, r0 + chunk)) for r0 in range(0, ny, chunk)]
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda sp: _ground_rows(world, lay, river, tex, landuse_out, *sp), spans))
    else:
        for sp in spans:
            _ground_rows(world, lay, river, tex, landuse_out, *sp)


def _ground_rows(world: World, lay: Layout, river, tex, landuse_out, r0: int, r1: int):
    ny, nx = world.cls.shape
    res = world.res
    xs = (-world.half_world + (np.arange(nx) + 0.5) * res).astype(np.float32)
    fine, blob = tex["fine"], tex["blob"]
    if True:
        ys = (world.half_world - (np.arange(r0, r1) + 0.5) * res).astype(np.float32)
        X = np.broadcast_to(xs[None, :], (r1 - r0, nx)).ravel()
        Y = np.broadcast_to(ys[:, None], (r1 - r0, nx)).ravel()
        k1, k2, bis = lay.district(X, Y)
        st = lay.streets(X, Y, k1)
        hw = lay.half_w[k1]
        sw = lay.sidewalk[k1]
        dmin = np.minimum(st["da"], st["db"])
        art = np.minimum(lay.art_half_w[k1], lay.art_half_w[k2])
        art_sw = np.maximum(np.minimum(lay.sidewalk[k1], lay.sidewalk[k2]), 0.0)
        on_art = bis < art
        on_road = (dmin < hw) | on_art
        on_walk = ~on_road & (((dmin < hw + sw) & (sw > 0)) | ((bis < art + art_sw) & (art_sw > 0)))
        # markings: dashed centre lines on streets wider than 3.4 m half width, arterial centre
        sa = st["signed_a"]
        mark_a = (np.abs(sa) < 0.12) & (np.mod(st["b"], 9.0) < 4.5) & (hw > 3.4) & (st["db"] > hw + 1)
        mark_b = (st["db"] < 0.12) & (np.mod(st["ap"], 9.0) < 4.5) & (hw > 3.4) & (st["da"] > hw + 1)
        # crossings: zebra stripes next to junctions in urban districts
        kind = lay.kind[k1]
        zeb_a = (st["da"] < hw) & (st["db"] > hw + 0.8) & (st["db"] < hw + 3.8) & (np.mod(sa, 1.2) < 0.6)
        zeb_b = (st["db"] < hw) & (st["da"] > hw + 0.8) & (st["da"] < hw + 3.8) & (np.mod(st["b"], 1.2) < 0.6)
        zebra = (zeb_a | zeb_b) & (kind == URBAN)
        mark_art = on_art & (bis < 0.12) & (np.mod(X + Y, 10.0) < 5.0)
        marking = on_road & (((mark_a | mark_b) & ~on_art) | zebra | mark_art)
        lu = lay.block_landuse(k1, st["ia"], st["jb"])
        # water: river band (roads cross it on bridges) and ponds in parks / meadows / fields
        water = np.zeros(X.shape, dtype=bool)
        if river is not None:
            along, across = (Y, X) if river["vertical"] else (X, Y)
            centre = river["off"] + river["amp"] * np.sin(2 * np.pi * along / river["wl"] + river["ph"])
            water |= np.abs(across - centre) < river["half"]
        pond_lu = (lu == LU_PARK) | (lu == LU_MEADOW) | (lu == LU_FIELD) | (lu == LU_FARM)
        bl = np.zeros(X.shape, np.float32)
        if pond_lu.any():
            bl[pond_lu] = sample_bilinear(blob, X[pond_lu] / 9.0, Y[pond_lu] / 9.0)
        water |= pond_lu & (lu != LU_FARM) & (bl > 1.9)
        fn = sample_nearest(fine, X / res, Y / res)
        nz = sample_nearest(blob, X * np.float32(0.5) + 97.0, Y * np.float32(0.5) + 31.0)
        # ---- classes
        cls = np.full(X.shape, C_GRASS, dtype=np.uint8)
        is_field = lu == LU_FIELD
        cls[is_field] = C_FIELD
        cls[lu == LU_FOREST] = C_FOREST
        cls[lu == LU_PARKING] = C_PARKING
        cls[lu == LU_PLAZA] = C_PAVED
        courtyard_paved = (lu == LU_BUILDINGS) & lay.paved_table[k1, st["ia"], st["jb"]]
        cls[courtyard_paved] = C_PAVED
        farmyard = (lu == LU_FARM) & (bl > 0.6)
        cls[farmyard] = C_DIRT
        cls[water] = C_WATER
        cls[on_walk] = C_SIDEWALK
        cls[on_road] = C_ROAD
        cls[marking] = C_MARKING
        # ---- albedo
        alb = np.empty(X.shape + (3,), dtype=np.float32)
        blk_tint = lay.tint_table[k1, st["ia"], st["jb"]]
        grass = COL_GRASS * (1 + 0.10 * fn[:, None] + 0.10 * nz[:, None]) + blk_tint[:, None] * _rgb(30, 22, 8)
        alb[:] = grass
        meadow = lu == LU_MEADOW
        alb[meadow] = (COL_MEADOW * (1 + 0.12 * fn[meadow, None] + 0.12 * nz[meadow, None]))
        # fields: parcels along b with crop colour and furrow stripes
        if is_field.any():
            f = is_field & (cls == C_FIELD)
            pk = k1[f]
            pj = np.floor(st["b"][f] / lay.parcel[pk]).astype(np.int64)
            hid = hash_u01(pk, st["ia"][f], pj, salt=23)
            crop = CROPS[(hid * len(CROPS)).astype(np.int64)]
            period = 1.5 + 3.0 * hash_u01(pk, st["ia"][f], pj, salt=29)
            coord = np.where(hid < 0.5, st["ap"][f], st["b"][f])
            stripe = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period)
            alb[f] = crop * (0.9 + 0.14 * stripe[:, None] + 0.05 * fn[f, None])
            # parcel boundaries: thin grass strips
            edge = np.mod(st["b"][f], lay.parcel[pk]) < 1.2
            ff = np.flatnonzero(f)[edge]
            alb[ff] = COL_MEADOW
        fo = cls == C_FOREST
        alb[fo] = COL_FOREST * (0.8 + 0.15 * nz[fo, None] + 0.15 * fn[fo, None])
        pa = cls == C_PARKING
        if pa.any():
            # stall lines: rows along a', stalls every 2.6 m along b
            u = np.mod(st["ap"][pa], 16.0)
            stall_line = ((u < 5.2) | (u > 10.8)) & (np.mod(st["b"][pa], 2.6) < 0.14)
            row_line = (np.abs(u - 5.2) < 0.1) | (np.abs(u - 10.8) < 0.1)
            c = np.where((stall_line | row_line)[:, None], COL_MARK * 0.9, COL_ASPHALT * 1.15 * (1 + 0.05 * fn[pa, None]))
            alb[pa] = c
        pv = cls == C_PAVED
        if pv.any():
            tile_line = (np.mod(st["ap"][pv], 3.0) < 0.12) | (np.mod(st["b"][pv], 3.0) < 0.12)
            base = np.where((lu[pv] == LU_PLAZA)[:, None], COL_PLAZA, COL_PAVED)
            alb[pv] = base * (1 + 0.06 * fn[pv, None]) * np.where(tile_line, 0.85, 1.0)[:, None]
        dt = cls == C_DIRT
        alb[dt] = COL_DIRT * (1 + 0.1 * fn[dt, None] + 0.1 * nz[dt, None])
        wa = cls == C_WATER
        alb[wa] = COL_WATER * (1 + 0.05 * nz[wa, None])
        wk = cls == C_SIDEWALK
        if wk.any():
            joint = (np.mod(st["b"][wk], 1.8) < 0.08) | (np.mod(st["ap"][wk], 1.8) < 0.08)
            alb[wk] = COL_SIDEWALK * (1 + 0.05 * fn[wk, None]) * np.where(joint, 0.88, 1.0)[:, None]
        rd = cls == C_ROAD
        wear = 1 + 0.06 * fn[rd, None] + 0.05 * nz[rd, None]
        rural_road = (lay.kind[k1[rd]] == RURAL)[:, None]
        alb[rd] = np.where(rural_road, COL_ASPHALT * 1.12, COL_ASPHALT) * wear
        mk = cls == C_MARKING
        alb[mk] = COL_MARK * (1 + 0.04 * fn[mk, None])
        # ---- heights: forest canopy is a solid bumpy block
        hgt = np.zeros(X.shape, dtype=np.float32)
        hgt[fo] = 11.0 + 3.0 * nz[fo] + 1.2 * fn[fo]
        sl = slice(r0, r1)
        world.cls[sl] = cls.reshape(r1 - r0, nx)
        world.albedo[sl] = np.clip(alb, 0, 255).astype(np.uint8).reshape(r1 - r0, nx, 3)
        world.height[sl] = hgt.reshape(r1 - r0, nx)
        landuse_out[sl] = lu.reshape(r1 - r0, nx)


class _BuildingTable:
    FIELDS = ["cx", "cy", "theta", "hu", "hv", "eave", "rise", "roof_type", "style", "floor_h",
              "win_sp", "win_w", "win_h"]

    def __init__(self):
        self.rows = {f: [0.0] for f in self.FIELDS}  # index 0 = "no building"
        self.roof = [[0, 0, 0]]
        self.facade = [[0, 0, 0]]
        self.trim = [[0, 0, 0]]

    def __len__(self):
        return len(self.rows["cx"])

    def add(self, **kw):
        for f in self.FIELDS:
            self.rows[f].append(float(kw[f]))
        self.roof.append(kw["roof_col"])
        self.facade.append(kw["facade_col"])
        self.trim.append(kw["trim_col"])
        return len(self) - 1

    def arrays(self):
        out = {f: np.array(v, dtype=np.float32) for f, v in self.rows.items()}
        out["roof_type"] = out["roof_type"].astype(np.int32)
        out["style"] = out["style"].astype(np.int32)
        out["roof_col"] = np.array(self.roof, dtype=np.float32).reshape(-1, 3)
        out["facade_col"] = np.array(self.facade, dtype=np.float32).reshape(-1, 3)
        out["trim_col"] = np.array(self.trim, dtype=np.float32).reshape(-1, 3)
        return out


def _rect_pixels(world: World, cx, cy, theta, hu, hv, pad=0.0):
    """Pixels of an oriented rectangle: (r0, c0, u, v, mask) with local coordinates u, v (metres)."""
    ext = abs(hu * math.cos(theta)) + abs(hv * math.sin(theta)) + pad, abs(hu * math.sin(theta)) + abs(hv * math.cos(theta)) + pad
    res = world.res
    ny, nx = world.cls.shape
    c0 = int(math.floor((cx - ext[0] + world.half_world) / res))
    c1 = int(math.ceil((cx + ext[0] + world.half_world) / res))
    r0 = int(math.floor((world.half_world - (cy + ext[1])) / res))
    r1 = int(math.ceil((world.half_world - (cy - ext[1])) / res))
    if c0 < 0 or r0 < 0 or c1 > nx or r1 > ny or c1 <= c0 or r1 <= r0:
        return None
    xs = -world.half_world + (np.arange(c0, c1) + 0.5) * res - cx
    ys = world.half_world - (np.arange(r0, r1) + 0.5) * res - cy
    ct, st = math.cos(theta), math.sin(theta)
    u = ct * xs[None, :] + st * ys[:, None]
    v = -st * xs[None, :] + ct * ys[:, None]
    mask = (np.abs(u) <= hu + pad) & (np.abs(v) <= hv + pad)
    return r0, c0, u, v, mask


STYLE_HOUSE, STYLE_URBAN, STYLE_OFFICE, STYLE_INDUSTRIAL, STYLE_FARM = range(5)


def _building_look(r: np.random.Generator, style: int):
    """Roof colour, facade colour, trim colour: related per style, individually jittered."""
    def j(c, s=14):
        # brightness jitter plus a small per-channel tint
        c = np.asarray(c, dtype=np.float32) * r.uniform(1 - s / 120.0, 1 + s / 120.0)
        return np.clip(c + r.normal(0, s / 3.0, 3), 0, 255)
    if style == STYLE_HOUSE:
        roof_opts = [(150, 70, 50), (110, 60, 48), (70, 70, 76), (92, 84, 80), (120, 96, 70), (64, 66, 70)]
        i = r.integers(len(roof_opts))
        roof = j(roof_opts[i], 10)
        fac_opts = [(226, 218, 196), (236, 230, 214), (200, 170, 130), (165, 90, 70), (190, 196, 200), (214, 196, 150)]
        # warm roofs go with warm facades more often: related, not identical
        fi = (i + r.integers(0, 3)) % len(fac_opts)
        facade = j(fac_opts[fi], 10)
        trim = j((240, 240, 236), 8)
    elif style == STYLE_URBAN:
        roof_opts = [(120, 118, 112), (96, 92, 88), (150, 144, 134), (80, 80, 84), (140, 120, 104)]
        i = r.integers(len(roof_opts))
        roof = j(roof_opts[i], 12)
        fac_opts = [(196, 182, 160), (170, 110, 86), (206, 200, 190), (150, 146, 140), (220, 206, 172), (180, 160, 140)]
        facade = j(fac_opts[(i * 2 + r.integers(0, 2)) % len(fac_opts)], 12)
        trim = j(facade * 0.8, 6)
    elif style == STYLE_OFFICE:
        roof = j((172, 174, 176), 14)
        facade = j([(96, 120, 140), (120, 136, 150), (80, 96, 110), (160, 160, 160)][r.integers(4)], 10)
        trim = j((200, 200, 204), 6)
    elif style == STYLE_INDUSTRIAL:
        roof = j([(190, 192, 194), (150, 156, 160), (120, 130, 140), (170, 120, 100)][r.integers(4)], 10)
        facade = j([(180, 186, 190), (110, 130, 160), (200, 200, 196), (150, 110, 90)][r.integers(4)], 10)
        trim = j(facade * 0.7, 6)
    else:  # farm
        roof = j([(150, 60, 46), (110, 110, 114), (90, 80, 70)][r.integers(3)], 10)
        facade = j([(150, 60, 46), (200, 190, 170), (120, 90, 60)][r.integers(3)], 10)
        trim = j((230, 226, 216), 8)
    return roof, facade, trim


def _place_building(world, table, tex, r, cx, cy, theta, hu, hv, eave, rise, roof_type, style):
    pix = _rect_pixels(world, cx, cy, theta, hu, hv)
    if pix is None:
        return 0
    r0, c0, u, v, mask = pix
    h, w = mask.shape
    cls_win = world.cls[r0:r0 + h, c0:c0 + w]
    if not mask.any() or NO_BUILD[cls_win[mask]].any():
        return 0
    roof, facade, trim = _building_look(r, style)
    floor_h = r.uniform(2.9, 3.6) if style != STYLE_INDUSTRIAL else r.uniform(4.5, 6.0)
    bid = table.add(cx=cx, cy=cy, theta=theta, hu=hu, hv=hv, eave=eave, rise=rise, roof_type=roof_type,
                    style=style, floor_h=floor_h, win_sp=r.uniform(2.4, 4.2), win_w=r.uniform(0.35, 0.7),
                    win_h=r.uniform(0.4, 0.65), roof_col=roof, facade_col=facade, trim_col=trim)
    # roof height profile
    if roof_type == 1:  # gable, ridge along u
        hgt = eave + rise * (1 - np.abs(v) / hv)
        shade = np.where(v > 0, 1.0, 0.9)
        tex_line = 0.92 + 0.08 * (np.mod(np.abs(v), 0.45) > 0.12)
    elif roof_type == 2:  # hip
        hgt = eave + rise * np.minimum(1 - np.abs(v) / hv, (hu - np.abs(u)) / hv)
        hgt = np.maximum(hgt, eave)
        shade = np.ones_like(u)
        tex_line = 0.92 + 0.08 * (np.mod(np.abs(v), 0.45) > 0.12)
    else:  # flat with parapet
        hgt = np.full(u.shape, eave, dtype=np.float64)
        edge = (np.abs(u) > hu - 0.5) | (np.abs(v) > hv - 0.5)
        hgt = hgt + 0.6 * edge
        shade = np.where(edge, 0.85, 1.0)
        tex_line = np.ones_like(u)
    ys = world.half_world - (np.arange(r0, r0 + h) + 0.5) * world.res
    xs = -world.half_world + (np.arange(c0, c0 + w) + 0.5) * world.res
    fn = sample_nearest(tex["fine"], xs[None, :] / world.res, ys[:, None] / world.res)
    col = roof[None, None, :] * (shade * tex_line * (1 + 0.05 * fn))[..., None]
    world.obj[r0:r0 + h, c0:c0 + w][mask] = bid
    world.height[r0:r0 + h, c0:c0 + w][mask] = hgt[mask]
    world.cls[r0:r0 + h, c0:c0 + w][mask] = C_BUILDING
    world.albedo[r0:r0 + h, c0:c0 + w][mask] = np.clip(col[mask], 0, 255).astype(np.uint8)
    # roof-top units on flat roofs
    if roof_type == 0 and hu > 5 and hv > 5:
        for _ in range(int(r.integers(0, 4))):
            uu = r.uniform(-hu + 3, hu - 3)
            vv = r.uniform(-hv + 3, hv - 3)
            a, b = r.uniform(0.8, 2.5), r.uniform(0.8, 2.5)
            m2 = mask & (np.abs(u - uu) < a) & (np.abs(v - vv) < b)
            world.height[r0:r0 + h, c0:c0 + w][m2] = eave + r.uniform(1.2, 3.0)
            world.albedo[r0:r0 + h, c0:c0 + w][m2] = np.clip(roof * 1.25 + 10, 0, 255).astype(np.uint8)
    return bid


def _paint_rect(world, cx, cy, theta, hu, hv, allowed, cls_val, col, height):
    pix = _rect_pixels(world, cx, cy, theta, hu, hv)
    if pix is None:
        return False
    r0, c0, u, v, mask = pix
    h, w = mask.shape
    win = world.cls[r0:r0 + h, c0:c0 + w]
    m = mask & allowed[win]
    if not m.any():
        return False
    win[m] = cls_val
    world.albedo[r0:r0 + h, c0:c0 + w][m] = np.clip(col, 0, 255).astype(np.uint8)
    world.height[r0:r0 + h, c0:c0 + w][m] = height
    return True


def _place_along_streets(world: World, lay: Layout, table, tex, trees, rng_seed):
    """Walk every kept street segment of every district and place buildings/trees/hedges/cars."""
    hwld = world.half_world
    allowed_hedge = np.zeros(16, dtype=bool)
    allowed_hedge[[C_GRASS, C_FIELD, C_DIRT, C_PAVED]] = True
    allowed_car = np.zeros(16, dtype=bool)
    allowed_car[[C_PARKING]] = True
    for k, d in enumerate(lay.districts):
        r = np.random.default_rng([rng_seed, 303, k])
        sx, sy = d.seed_xy
        if abs(sx) > hwld + DISTRICT_CELL or abs(sy) > hwld + DISTRICT_CELL:
            continue
        reach = DISTRICT_CELL * 1.2
        la = lay.lines_a[k]
        lb = lay.lines_b[k]
        ia_range = np.flatnonzero(np.abs(la) < reach)
        jb_range = np.flatnonzero(np.abs(lb) < reach)
        ia_range = ia_range[(ia_range > 0) & (ia_range < lay.L - 1)]
        jb_range = jb_range[(jb_range > 0) & (jb_range < lay.L - 1)]
        for orient in (0, 1):  # 0: along a'-lines (streets curving with the warp), 1: along b-lines
            lines, cross = (la, lb) if orient == 0 else (lb, la)
            lrange = ia_range if orient == 0 else jb_range
            for i in lrange:
                for j in range(len(cross) - 1):
                    s0, s1 = cross[j], cross[j + 1]
                    if s1 < -reach or s0 > reach:
                        continue
                    keep = lay.keep_a[k, i, j] if orient == 0 else lay.keep_b[k, i, j]
                    if not keep:
                        continue
                    for side in (-1, 1):
                        blk_i = (i if side > 0 else i - 1)
                        if orient == 0:
                            lu = int(lay.block_landuse(k, blk_i, j))
                            width = (la[i + 1] - la[i]) if side > 0 else (la[i] - la[i - 1])
                        else:
                            lu = int(lay.block_landuse(k, j, blk_i))
                            width = (lb[i + 1] - lb[i]) if side > 0 else (lb[i] - lb[i - 1])
                        _fill_frontage(world, lay, table, tex, trees, r, k, d, orient, lines[i], s0, s1,
                                       side, lu, width, allowed_hedge, allowed_car)


def _to_world(lay, k, orient, line, s, off):
    """Point at distance ``off`` from street ``line`` at along-position ``s`` -> (x, y, angle)."""
    if orient == 0:
        ap, b = line + off, s
        x, y = lay.frame_inverse(np.float64(ap), np.float64(b), k)
        ang = float(lay.street_tangent_angle(b, k))
    else:
        ap, b = s, line + off
        x, y = lay.frame_inverse(np.float64(ap), np.float64(b), k)
        ang = float(lay.theta[k])  # b-lines run along the a axis
    return float(x), float(y), ang


def _in_district(lay, k, x, y):
    if abs(x) > lay.half_world - 4 or abs(y) > lay.half_world - 4:
        return False
    k1, _, bis = lay.district_scalar(x, y)
    return k1 == k and bis > lay.art_half_w[k] + 2.0


def _fill_frontage(world, lay, table, tex, trees, r, k, d, orient, line, s0, s1, side, lu, width,
                   allowed_hedge, allowed_car):
    hw, sw = d.half_w, d.sidewalk
    edge = hw + sw  # distance from street centre to the lot line
    corner = hw + sw + 1.5
    a, b = s0 + corner, s1 - corner
    if b - a < 8:
        return
    # street trees along the segment side
    if lu in (LU_BUILDINGS, LU_HOUSES, LU_PARK, LU_PLAZA, LU_PARKING) and r.random() < 0.55:
        spacing = r.uniform(7, 13)
        rad = r.uniform(2.0, 3.8)
        top = r.uniform(7, 13)
        off = hw + (sw * 0.55 if sw > 1.6 else sw + 1.2)
        species = r.integers(0, 4)
        for s in np.arange(a + r.uniform(0, spacing), b, spacing):
            x, y, _ = _to_world(lay, k, orient, line, s, side * off)
            if not _in_district(lay, k, x, y):
                continue
            trees.append((x, y, rad * r.uniform(0.85, 1.15), top * r.uniform(0.9, 1.1), r.uniform(2.2, 3.2), 0, species))
    if d.kind == RURAL and lu in (LU_FIELD, LU_MEADOW) and r.random() < 0.25:
        spacing = r.uniform(9, 16)
        for s in np.arange(a + r.uniform(0, spacing), b, spacing):
            if r.random() < 0.8:
                x, y, _ = _to_world(lay, k, orient, line, s, side * (hw + r.uniform(2.5, 4.0)))
                trees.append((x, y, r.uniform(2.5, 4.5), r.uniform(8, 15), r.uniform(2.0, 3.0), 0, 4))
    if lu == LU_BUILDINGS:
        depth_max = max(width / 2 - edge - 1.0, 6.0)
        s = a
        tall = r.random() < 0.35
        while s < b - 6:
            front = r.uniform(10, 34)
            if s + front > b:
                front = b - s
            if front < 7:
                break
            depth = min(r.uniform(13, 30), depth_max)
            setback = 0.4 + (r.uniform(0, 1.0) if r.random() < 0.75 else r.uniform(3, 8))
            off = edge + setback + depth / 2
            x, y, ang = _to_world(lay, k, orient, line, s + front / 2, side * off)
            if not _in_district(lay, k, x, y):
                s += front
                continue
            style = STYLE_OFFICE if r.random() < (0.45 if tall else 0.12) else STYLE_URBAN
            floors = int(r.integers(3, 13 if tall else 7))
            if r.random() < 0.08:
                floors = int(r.integers(8, 13))
            eave = min(3.3 * floors + r.uniform(-0.5, 0.5), 40.0)
            roof_type = 0 if (style == STYLE_OFFICE or r.random() < 0.75) else 1
            rise = r.uniform(2, 4) if roof_type else 0.0
            if eave + rise > 40.0:
                eave = 40.0 - rise
            _place_building(world, table, tex, r, x, y, ang, front / 2 - 0.2, depth / 2, eave, rise, roof_type, style)
            s += front + (r.uniform(0, 1.2) if r.random() < 0.7 else r.uniform(3, 9))
    elif lu == LU_HOUSES:
        s = a + r.uniform(0, 5)
        lot = r.uniform(15, 24)
        hedge_p = r.uniform(0.0, 0.8)
        while s + 10 < b:
            front = min(r.uniform(8, 13), lot - 3)
            depth = r.uniform(8, 12)
            setback = r.uniform(4, 9)
            off = edge + setback + depth / 2
            if off + depth / 2 > width - edge - 1:
                break
            x, y, ang = _to_world(lay, k, orient, line, s + lot / 2, side * off)
            if not _in_district(lay, k, x, y):
                s += lot
                continue
            roof_type = 1 if r.random() < 0.65 else 2
            if r.random() < 0.12:
                roof_type = 0
            eave = r.uniform(3.0, 6.5) if roof_type else r.uniform(3.5, 7.0)
            rise = r.uniform(2.0, 4.0) if roof_type else 0.0
            rot = r.random() < 0.25  # ridge perpendicular to the street
            hu, hv = (front / 2, depth / 2) if not rot else (depth / 2, front / 2)
            ang2 = ang if not rot else ang + np.pi / 2
            bid = _place_building(world, table, tex, r, x, y, ang2, hu, hv, eave, rise, roof_type, STYLE_HOUSE)
            if bid:
                # driveway from the sidewalk to the house side
                dx, dy, _ = _to_world(lay, k, orient, line, s + lot / 2 + front / 2 + 1.8, side * (edge + setback / 2))
                _paint_rect(world, dx, dy, ang + np.pi / 2, setback / 2 + 0.3, 1.4, allowed_hedge, C_PAVED,
                            COL_PAVED * r.uniform(0.85, 1.1), 0.0)
                if r.random() < hedge_p:
                    hx, hy, _ = _to_world(lay, k, orient, line, s + lot / 2 - 1.5, side * (edge + 0.8))
                    _paint_rect(world, hx, hy, ang, lot / 2 - 2.2, 0.45, allowed_hedge, C_HEDGE,
                                COL_HEDGE * r.uniform(0.85, 1.15), r.uniform(1.0, 1.8))
                # garden trees behind the house
                for _ in range(int(r.integers(0, 3))):
                    tx, ty, _ = _to_world(lay, k, orient, line, s + r.uniform(0, lot),
                                          side * (off + depth / 2 + r.uniform(3, 9)))
                    trees.append((tx, ty, r.uniform(1.8, 3.8), r.uniform(5, 12), r.uniform(1.5, 2.6),
                                  int(r.random() < 0.25), int(r.integers(0, 6))))
            s += lot
    elif lu == LU_FARM and r.random() < 0.5:
        s = a + r.uniform(0, max(b - a - 60, 1))
        for n in range(int(r.integers(1, 4))):
            big = n > 0
            front = r.uniform(14, 30) if big else r.uniform(9, 13)
            depth = r.uniform(10, 18) if big else r.uniform(8, 11)
            off = edge + r.uniform(8, 20) + depth / 2
            x, y, ang = _to_world(lay, k, orient, line, s + front / 2, side * off)
            if not _in_district(lay, k, x, y):
                break
            _place_building(world, table, tex, r, x, y, ang, front / 2, depth / 2,
                            r.uniform(4, 7) if big else r.uniform(3.5, 6), r.uniform(2.5, 5), 1,
                            STYLE_FARM if big else STYLE_HOUSE)
            s += front + r.uniform(4, 12)
            if s > b:
                break
    elif lu == LU_PARKING and orient == 0:
        # cars in stalls: rows at 0..5.2 and 10.8..16 of the 16 m period along a'
        if r.random() < 0.7:
            occ = r.uniform(0.15, 0.75)
            lo = line + side * edge
            for row_a in np.arange(np.ceil(min(lo, lo + side * width) / 16.0) * 16.0,
                                   max(lo, lo + side * (width - edge)), 16.0):
                for centre in (row_a + 2.6, row_a + 13.4):
                    for s in np.arange(np.floor(a / 2.6) * 2.6 + 1.3, b, 2.6):
                        if r.random() < occ:
                            x, y = lay.frame_inverse(np.float64(centre), np.float64(s), k)
                            ang = float(lay.street_tangent_angle(s, k)) + np.pi / 2
                            _paint_rect(world, float(x), float(y), ang, 2.2, 0.9, allowed_car, C_CAR,
                                        CAR_COLS[r.integers(len(CAR_COLS))] * r.uniform(0.9, 1.05),
                                        r.uniform(1.4, 1.6))
    elif lu == LU_PLAZA and orient == 0 and r.random() < 0.5:
        # a landmark: an isolated tower or hall on the plaza
        off = edge + r.uniform(8, 14)
        hu, hv = r.uniform(6, 14), r.uniform(6, 14)
        x, y, ang = _to_world(lay, k, orient, line, (a + b) / 2, side * (off + hv))
        if _in_district(lay, k, x, y):
            _place_building(world, table, tex, r, x, y, ang, hu, hv, r.uniform(15, 40), 0.0, 0, STYLE_OFFICE)


def _scatter_trees(world: World, lay_landuse, rng, trees):
    """Free-standing trees in parks, gardens, courtyards and meadows (density by land use)."""
    hw = world.half_world
    area = (2 * hw) ** 2
    n = int(area / 90.0)
    x = rng.uniform(-hw, hw, n)
    y = rng.uniform(-hw, hw, n)
    r_, c_ = world.px_index(x, y)
    lu = lay_landuse[r_, c_]
    cls = world.cls[r_, c_]
    u = rng.random(n)
    p = np.zeros(n)
    p[lu == LU_PARK] = 0.9
    p[lu == LU_HOUSES] = 0.18
    p[lu == LU_BUILDINGS] = 0.12
    p[lu == LU_MEADOW] = 0.03
    p[lu == LU_FARM] = 0.06
    p[lu == LU_PLAZA] = 0.1
    ok = (u < p) & np.isin(cls, [C_GRASS, C_PAVED, C_DIRT])
    idx = np.flatnonzero(ok)
    rad = rng.uniform(1.8, 5.0, len(idx))
    # clearance: no building, road or water within the canopy radius (checked at 8 points)
    for ang in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        rr, cc = world.px_index(x[idx] + 0.8 * rad * np.cos(ang), y[idx] + 0.8 * rad * np.sin(ang))
        c2 = world.cls[rr, cc]
        good = ~np.isin(c2, [C_BUILDING, C_ROAD, C_MARKING, C_WATER])
        idx, rad = idx[good], rad[good]
    for i, rd in zip(idx, rad):
        conifer = int(rng.random() < 0.2)
        top = rng.uniform(6, 17) if not conifer else rng.uniform(8, 20)
        trees.append((x[i], y[i], rd if not conifer else rd * 0.7, top,
                      rng.uniform(1.8, 3.5) if not conifer else rng.uniform(0.6, 1.5), conifer, int(rng.integers(0, 6))))


TREE_COLS = np.array([[62, 94, 44], [78, 108, 50], [52, 80, 44], [96, 118, 56], [70, 96, 60],
                      [88, 100, 48], [58, 86, 52]], dtype=np.float32)


def _tree_table(world: World, trees: list, rng):
    if trees:
        t = np.array(trees, dtype=np.float64)
    else:
        t = np.zeros((0, 7))
    # drop trees whose trunk stands on a road, building or water, or too close to another tree
    r_, c_ = world.px_index(t[:, 0], t[:, 1])
    ok = ~np.isin(world.cls[r_, c_], [C_BUILDING, C_ROAD, C_MARKING, C_WATER, C_CAR])
    t = t[ok]
    # thin clusters: grid-hash at 2.5 m keeps one tree per cell
    key = np.floor(t[:, 0] / 2.5).astype(np.int64) * 1_000_003 + np.floor(t[:, 1] / 2.5).astype(np.int64)
    _, first = np.unique(key, return_index=True)
    t = t[np.sort(first)]
    species = t[:, 6].astype(np.int64)
    jitter = rng.normal(0, 6, (len(t), 3)).astype(np.float32)
    col = TREE_COLS[species % len(TREE_COLS)] + jitter
    out = dict(x=t[:, 0].astype(np.float32), y=t[:, 1].astype(np.float32), r=t[:, 2].astype(np.float32),
               top=t[:, 3].astype(np.float32), base=np.minimum(t[:, 4], t[:, 3] * 0.5).astype(np.float32),
               conifer=t[:, 5].astype(np.int8), col=np.clip(col, 0, 255).astype(np.float32))
    # uniform grid index (CSR) for range queries
    cell = 16.0
    n = int(math.ceil(2 * world.half_world / cell))
    cc = np.clip(((out["x"] + world.half_world) // cell).astype(np.int64), 0, n - 1)
    rr = np.clip(((world.half_world - out["y"]) // cell).astype(np.int64), 0, n - 1)
    cid = rr * n + cc
    order = np.argsort(cid, kind="stable")
    starts = np.searchsorted(cid[order], np.arange(n * n + 1))
    world.tree_grid = dict(cell=cell, n=n, order=order, starts=starts)
    return out


def generate_world(seed: int, area_km2: float, lat0: float = 47.3769, lon0: float = 8.5417,
                   res: float = 0.4, margin: float = 130.0, threads: int = 1) -> World:
    """Build the world for ``seed``. ``area_km2`` is the core square in which cameras lie."""
    if area_km2 <= 0:
        raise ValueError("area_km2 must be > 0")
    if not (-80.0 <= lat0 <= 80.0):
        raise ValueError("origin latitude must lie within [-80, 80] degrees")
    half_core = 500.0 * math.sqrt(area_km2)
    half_world = half_core + margin
    n = int(math.ceil(2 * half_world / res))
    half_world = n * res / 2
    rng = np.random.default_rng([seed, 1])
    world = World(seed=seed, area_km2=area_km2, lat0=lat0, lon0=lon0, res=res, half_core=half_core,
                  half_world=half_world, albedo=np.zeros((n, n, 3), np.uint8), height=np.zeros((n, n), np.float16),
                  obj=np.zeros((n, n), np.int32), cls=np.zeros((n, n), np.uint8), buildings={}, trees={},
                  districts=[], district_map_res=0.0, district_map=np.zeros((1, 1), np.int32))
    tex = dict(fine=noise_tile(np.random.default_rng([seed, 2]), 512, 0.8),
               blob=noise_tile(np.random.default_rng([seed, 3]), 512, 6.0))
    lay = Layout(seed, half_world, rng)
    world.districts = lay.districts
    world.district_map = lay.cmap
    world.district_map_res = lay.cres
    river = _river(rng, half_world)
    landuse = np.zeros((n, n), np.uint8)
    _ground_pass(world, lay, river, tex, landuse, threads)
    table = _BuildingTable()
    trees: list = []
    _place_along_streets(world, lay, table, tex, trees, seed)
    _scatter_trees(world, landuse, np.random.default_rng([seed, 4]), trees)
    world.buildings = table.arrays()
    world.trees = _tree_table(world, trees, np.random.default_rng([seed, 5]))
    world.river = river
    return world


def camera_positions(world: World, min_spacing: float, rng: np.random.Generator, limit: int | None = None,
                     continuous: bool = False):
    """Poisson-disc sample of road positions inside the core square (greedy, grid-hashed).

    ``continuous``: each lattice candidate moves to a uniform random point of its lattice cell (kept
    only if that point is on a road), so positions are not quantised to the lattice; the spacing
    still holds exactly. Off (the default) the positions are what they always were."""
    res = world.res
    # candidates on a lattice of ~spacing/8 (enough for an even Poisson-disc cover, far fewer
    # candidates for the greedy loop than every road pixel)
    stride = max(1, int(round(max(1.5, min_spacing / 8.0) / res)))
    cls = world.cls[::stride, ::stride]
    rows, cols = np.nonzero(np.isin(cls, ROADLIKE))
    x = -world.half_world + (cols * stride + 0.5) * res
    y = world.half_world - (rows * stride + 0.5) * res
    if continuous:
        x = x + rng.uniform(-0.5, 0.5, len(x)) * stride * res
        y = y + rng.uniform(-0.5, 0.5, len(y)) * stride * res
        r_, c_ = world.px_index(x, y)
        on_road = np.isin(world.cls[r_, c_], ROADLIKE)
        x, y = x[on_road], y[on_road]
    inside = (np.abs(x) <= world.half_core) & (np.abs(y) <= world.half_core)
    x, y = x[inside], y[inside]
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    cell = min_spacing / math.sqrt(2)
    grid: dict = {}
    acc = []
    s2 = min_spacing * min_spacing
    for xi, yi in zip(x.tolist(), y.tolist()):
        gi, gj = int(math.floor(xi / cell)), int(math.floor(yi / cell))
        ok = True
        for di in (-2, -1, 0, 1, 2):
            for dj in (-2, -1, 0, 1, 2):
                q = grid.get((gi + di, gj + dj))
                if q is not None and (q[0] - xi) ** 2 + (q[1] - yi) ** 2 < s2:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            grid[(gi, gj)] = (xi, yi)
            acc.append((xi, yi))
            if limit is not None and len(acc) >= limit:
                break
    return np.array(acc, dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# hand-built scenes (tests, demos): a flat empty world plus explicit boxes and trees
# --------------------------------------------------------------------------------------------
def blank_world(half_world: float = 200.0, res: float = 0.4, lat0: float = 47.3769, lon0: float = 8.5417,
                ground_rgb=(120, 120, 120)) -> World:
    """Flat road-grey world with no objects; add boxes with :func:`add_box_building`."""
    n = int(math.ceil(2 * half_world / res))
    half_world = n * res / 2
    w = World(seed=0, area_km2=(2 * half_world / 1000.0) ** 2, lat0=lat0, lon0=lon0, res=res,
              half_core=half_world, half_world=half_world,
              albedo=np.empty((n, n, 3), np.uint8), height=np.zeros((n, n), np.float16),
              obj=np.zeros((n, n), np.int32), cls=np.full((n, n), C_ROAD, np.uint8), buildings={}, trees={},
              districts=[District(URBAN, (0.0, 0.0), 0.0, 0.0, 1.0, 0.0, 5.0, 2.0, 1.0, 50.0)],
              district_map_res=2 * half_world, district_map=np.zeros((1, 1), np.int32))
    w.albedo[:] = np.asarray(ground_rgb, np.uint8)
    w._table = _BuildingTable()
    w.buildings = w._table.arrays()
    w.trees = dict(x=np.zeros(0, np.float32), y=np.zeros(0, np.float32), r=np.zeros(0, np.float32),
                   top=np.zeros(0, np.float32), base=np.zeros(0, np.float32), conifer=np.zeros(0, np.int8),
                   col=np.zeros((0, 3), np.float32))
    _tree_table(w, [], np.random.default_rng(0))
    return w


def add_box_building(world: World, cx: float, cy: float, hu: float, hv: float, height: float,
                     theta: float = 0.0, roof_rgb=(200, 40, 40), facade_rgb=(200, 200, 190)) -> int:
    """Flat-roofed box (half sizes hu along theta, hv across) of ``height`` m; returns its id."""
    table = world._table
    r = np.random.default_rng(len(table))
    pix = _rect_pixels(world, cx, cy, theta, hu, hv)
    if pix is None:
        raise ValueError("box outside the world")
    r0, c0, u, v, mask = pix
    h, w = mask.shape
    bid = table.add(cx=cx, cy=cy, theta=theta, hu=hu, hv=hv, eave=height, rise=0.0, roof_type=0, style=STYLE_URBAN,
                    floor_h=3.0, win_sp=3.0, win_w=0.5, win_h=0.5, roof_col=np.asarray(roof_rgb, np.float32),
                    facade_col=np.asarray(facade_rgb, np.float32), trim_col=np.asarray(facade_rgb, np.float32))
    world.obj[r0:r0 + h, c0:c0 + w][mask] = bid
    world.height[r0:r0 + h, c0:c0 + w][mask] = height
    world.cls[r0:r0 + h, c0:c0 + w][mask] = C_BUILDING
    world.albedo[r0:r0 + h, c0:c0 + w][mask] = np.asarray(roof_rgb, np.uint8)
    world.buildings = table.arrays()
    return bid

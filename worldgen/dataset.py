"""Write a synthetic world as a data set directory (layout: docs/INTERFACES.md).

Everything is derived from (seed, arguments): per pair a generator seeded with (seed, pair index)
draws the capture conditions, so the output is byte-identical for any worker count. The
directory is assembled under a sibling temporary name and renamed into place at the end; a
crash never leaves a half-written DIR behind.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import struct
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
from PIL import ExifTags, Image, TiffImagePlugin

from model.atomic import staged_directory, tidy_leftovers
from worldgen import FORMAT_VERSION
from worldgen.noise import hash_u01
from worldgen.render import (EYE_HEIGHT, render_aerial, render_pano, render_perspective, sample_aerial_look,
                             sample_pano_look)
from worldgen.world import AREA_NAMES, World, camera_positions, generate_world


class WorldgenError(ValueError):
    """Bad arguments or an output location that cannot be written."""


CAMERAS = ("panorama", "perspective")
# GenConfig fields added after format version 1 shipped. A panorama world leaves them out of
# world.json, so its bytes stay what they were before these fields existed.
_PERSPECTIVE_FIELDS = ("camera", "pitch_roll_jitter_deg", "photo_width", "photo_height", "exif")
# Likewise left out while unset (every pair gets its ground image, as before the field existed).
_UNSET_OMITTED_FIELDS = ("panoramas",)
# "pairs": an aerial tile centred on every camera (the original layout, world.json without the field);
# "grid": one GeoTIFF of the whole region (ortho.tif) and ground images anywhere on the roads.
LAYOUTS = ("pairs", "grid")


@dataclass
class GenConfig:
    seed: int
    area_km2: float
    pairs: int | None = None
    tile_px: int = 256
    footprint_m: float = 100.0
    pano_height: int = 128
    pano_width: int = 512
    val_fraction: float = 0.1
    min_spacing_m: float = 25.0
    lat: float = 47.3769
    lon: float = 8.5417
    world_res_m: float = 0.4
    fov_deg: float = 360.0
    heading_jitter_deg: float = 0.0
    jpeg_quality: int = 90
    png_compress: int = 1
    val_block_m: float = 250.0
    camera: str = "panorama"  # "perspective": pinhole photos instead of panoramas
    pitch_roll_jitter_deg: float = 0.0  # perspective only: pitch and roll uniform in +-this
    photo_width: int = 1024
    photo_height: int = 768
    exif: bool = False  # perspective only: FocalLengthIn35mmFilm and GPSImgDirection in the JPEGs
    # Ground images (panoramas or photos) for only the first N pairs; None: for every pair. Every
    # aerial tile is rendered either way, and each rendered file is the one a full run writes.
    panoramas: int | None = None
    layout: str = "pairs"

    def world_json_config(self) -> dict:
        d = asdict(self)
        if self.camera == "panorama":
            for k in _PERSPECTIVE_FIELDS:
                del d[k]
        for k in _UNSET_OMITTED_FIELDS:
            if d[k] is None:
                del d[k]
        if self.layout == "pairs":
            del d["layout"]
        else:
            del d["val_fraction"], d["val_block_m"], d["png_compress"]  # no splits, no PNG tiles
        return d

    def ground_count(self, pairs: int) -> int:
        """How many of ``pairs`` camera positions get a ground image: the first ones."""
        return pairs if self.panoramas is None else min(pairs, self.panoramas)

    def validate(self):
        def bad(msg):
            raise WorldgenError(msg)
        if not (0.0 < self.area_km2 <= 64.0):
            bad(f"--area-km2 must be in (0, 64], got {self.area_km2}")
        if self.pairs is not None and self.pairs < 1:
            bad(f"--pairs must be >= 1, got {self.pairs}")
        if self.panoramas is not None and self.panoramas < 0:
            bad(f"--panoramas must be >= 0, got {self.panoramas}")
        if not (16 <= self.tile_px <= 2048):
            bad(f"--tile-px must be in [16, 2048], got {self.tile_px}")
        if self.tile_px % 2:
            bad(f"--tile-px must be even, got {self.tile_px}")
        if not (10.0 <= self.footprint_m <= 400.0):
            bad(f"--footprint-m must be in [10, 400], got {self.footprint_m}")
        if not (8 <= self.pano_height <= 2048 and 16 <= self.pano_width <= 4096):
            bad(f"panorama size {self.pano_height}x{self.pano_width} out of range")
        if not (0.0 <= self.val_fraction < 1.0):
            bad(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not (2.0 <= self.min_spacing_m <= 1000.0):
            bad(f"--min-spacing must be in [2, 1000] m, got {self.min_spacing_m}")
        if not (-80.0 <= self.lat <= 80.0) or not (-180.0 <= self.lon <= 180.0):
            bad(f"origin ({self.lat}, {self.lon}) out of range (lat within +-80, lon within +-180)")
        if not (0.1 <= self.world_res_m <= 2.0):
            bad(f"--world-res must be in [0.1, 2] m, got {self.world_res_m}")
        if self.layout not in LAYOUTS:
            bad(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "grid":
            if self.panoramas is not None:
                bad("--panoramas applies to --layout pairs (tiles for all, ground images for some); with "
                    "--layout grid every camera has a ground image: set their number with --pairs")
            if self.footprint_m > 200.0:
                bad(f"--footprint-m {self.footprint_m:g} is too large for --layout grid: the ortho reaches half a "
                    "footprint beyond the core square and the world only 130 m; use at most 200")
        if self.camera not in CAMERAS:
            bad(f"--camera must be one of {', '.join(CAMERAS)}, got {self.camera!r}")
        if self.camera == "perspective":
            if not (1.0 <= self.fov_deg <= 170.0):
                bad(f"--fov must be in [1, 170] degrees with --camera perspective (the horizontal field of "
                    f"view of a pinhole camera), got {self.fov_deg}")
            if not (0.0 <= self.pitch_roll_jitter_deg <= 30.0):
                bad(f"--pitch-roll-jitter must be in [0, 30] degrees, got {self.pitch_roll_jitter_deg}")
            if not (16 <= self.photo_width <= 4096 and 16 <= self.photo_height <= 4096):
                bad(f"--photo-size {self.photo_width}x{self.photo_height} out of range (each side in [16, 4096])")
        else:
            if not (1.0 <= self.fov_deg <= 360.0):
                bad(f"--fov must be in [1, 360] degrees, got {self.fov_deg}")
            if self.pitch_roll_jitter_deg != 0.0:
                bad("--pitch-roll-jitter needs --camera perspective (panoramas are always level)")
            if self.exif:
                bad("--exif needs --camera perspective")
        if not (0.0 <= self.heading_jitter_deg <= 180.0):
            bad(f"--heading-jitter must be in [0, 180] degrees, got {self.heading_jitter_deg}")
        if not (1 <= self.jpeg_quality <= 100):
            bad(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        side = 2 * (500.0 * math.sqrt(self.area_km2) + 130.0) / self.world_res_m
        if side * side > 4.5e8:
            bad(f"world raster {side:.0f}^2 px is too large; raise --world-res or lower --area-km2")


def _id_width(n: int) -> int:
    return max(6, len(str(max(n - 1, 0))))


def pair_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 7, int(i)])


@dataclass(frozen=True)
class GroundPose:
    """Orientation of a pair's ground camera, degrees: heading clockwise from north (of the
    panorama's centre column / the photo's optical axis), pitch up positive, roll clockwise as
    seen from behind the camera (see ``worldgen.render.perspective_angles``)."""
    heading_deg: float
    pitch_deg: float = 0.0
    roll_deg: float = 0.0


def render_pair(world: World, cfg: GenConfig, i: int, x: float, y: float, ground: bool = True,
                aerial: bool = True):
    """(aerial uint8 HxWx3, ground image uint8 (panorama or photo), GroundPose) for pair ``i`` at (x, y).

    ``ground=False`` skips the ground image, ``aerial=False`` the tile (None in its place); the
    other image and the pose are the same."""
    rng = pair_rng(cfg.seed, i)
    alook = sample_aerial_look(rng, cfg.lat)
    plook = sample_pano_look(rng)
    heading = float(rng.uniform(-cfg.heading_jitter_deg, cfg.heading_jitter_deg)) if cfg.heading_jitter_deg > 0 else 0.0
    r_a = np.random.default_rng([int(cfg.seed), 8, int(i)])
    r_p = np.random.default_rng([int(cfg.seed), 9, int(i)])
    aerial = render_aerial(world, x, y, cfg.tile_px, cfg.footprint_m, alook, r_a) if aerial else None
    if cfg.camera == "perspective":
        # own stream, so that position, look and heading are those of the panorama world of the same seed
        jit = cfg.pitch_roll_jitter_deg
        pitch, roll = ((float(v) for v in np.random.default_rng([int(cfg.seed), 10, int(i)]).uniform(-jit, jit, 2))
                       if jit > 0 else (0.0, 0.0))
        photo = render_perspective(world, x, y, cfg.photo_width, cfg.photo_height, cfg.fov_deg, heading,
                                   pitch, roll, plook, r_p) if ground else None
        return aerial, photo, GroundPose(heading, pitch, roll)
    pano = render_pano(world, x, y, cfg.pano_height, cfg.pano_width, plook, r_p, heading_deg=heading,
                       fov_deg=cfg.fov_deg) if ground else None
    return aerial, pano, GroundPose(heading)


def encode_png(img: np.ndarray, level: int = 1) -> bytes:
    """RGB uint8 -> PNG bytes. Own minimal encoder: 'Sub' filter on every row (vectorised) and
    Huffman-only deflate; ~3x faster than PIL's adaptive filtering on noisy tiles at the same size."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w, c = img.shape
    a = img.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = 1  # filter type Sub
    raw[:, 1:c + 1] = a[:, :c]
    np.subtract(a[:, c:], a[:, :-c], out=raw[:, c + 1:])
    co = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = co.compress(raw.tobytes()) + co.flush()

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + tag + payload
                + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF))
    color_type = {3: 2, 4: 6}[c]
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def encode_jpeg(img: np.ndarray, quality: int = 90, exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    extra = {"exif": exif} if exif is not None else {}
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False, **extra)
    return buf.getvalue()


def focal_length_35mm(hfov_deg: float, width: int, height: int) -> int:
    """EXIF FocalLengthIn35mmFilm of a ``width`` x ``height`` photo's horizontal field of view: the focal
    length that gives it on a 36 x 24 mm frame, whose 36 mm side is the photo's long side (as readers,
    model.preprocess.exif_camera among them, take it): f = 18 * min(1, w / h) / tan(hfov / 2), in whole
    millimetres (the tag is an integer)."""
    half_width_mm = 18.0 * min(1.0, width / height)
    return max(1, int(round(half_width_mm / math.tan(math.radians(hfov_deg) / 2.0))))


def camera_exif(hfov_deg: float, heading_deg: float, width: int, height: int) -> bytes:
    """EXIF block of a perspective photo: FocalLengthIn35mmFilm and GPSImgDirection (true north,
    GPSImgDirectionRef 'T', in [0, 360) with 0.01 degree steps). No GPS position: the position is
    what the service has to find."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.FocalLengthIn35mmFilm] = focal_length_35mm(hfov_deg, width, height)
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSImgDirectionRef] = "T"
    centi = int(round((heading_deg % 360.0) * 100)) % 36000
    gps[ExifTags.GPS.GPSImgDirection] = TiffImagePlugin.IFDRational(centi, 100)
    return exif.tobytes()


# ---- worker state (fork: the world is shared copy-on-write) ---------------------------------
_STATE: dict = {}


def _work(task):
    lo, hi = task
    world, cfg, cams, ids, root, n_ground = (_STATE[k] for k in ("world", "cfg", "cams", "ids", "root", "n_ground"))
    poses = []
    for i in range(lo, hi):
        a, g, pose = render_pair(world, cfg, i, cams[i, 0], cams[i, 1], ground=i < n_ground,
                                 aerial=cfg.layout == "pairs")
        if a is not None:
            with open(os.path.join(root, "bingmap", ids[i] + ".png"), "wb") as f:
                f.write(encode_png(a, cfg.png_compress))
        if g is not None:
            exif = camera_exif(cfg.fov_deg, pose.heading_deg, cfg.photo_width, cfg.photo_height) if cfg.exif else None
            with open(os.path.join(root, "streetview", ids[i] + ".jpg"), "wb") as f:
                f.write(encode_jpeg(g, cfg.jpeg_quality, exif))
        poses.append(pose)
    return lo, poses


def choose_cameras(world: World, cfg: GenConfig) -> np.ndarray:
    if cfg.layout == "grid":
        # anywhere on the roads, not on the candidate lattice; a stream of its own
        cams = camera_positions(world, cfg.min_spacing_m, np.random.default_rng([cfg.seed, 13]), limit=cfg.pairs,
                                continuous=True)
    else:
        cams = camera_positions(world, cfg.min_spacing_m, np.random.default_rng([cfg.seed, 6]), limit=cfg.pairs)
    if cfg.pairs is not None and len(cams) < cfg.pairs:
        raise WorldgenError(
            f"only {len(cams)} camera positions fit on the roads of {cfg.area_km2} km^2 with "
            f"--min-spacing {cfg.min_spacing_m} m, but --pairs {cfg.pairs} was asked; raise --area-km2 "
            f"(about {_area_text(cfg.area_km2 * cfg.pairs / max(len(cams), 1) * 1.1)} km^2) or lower --min-spacing")
    if len(cams) == 0:
        raise WorldgenError("no road inside the area; raise --area-km2")
    return cams


def split_val(cams: np.ndarray, cfg: GenConfig) -> np.ndarray:
    """Boolean val mask: whole spatial blocks of val_block_m go to val, blocks chosen in a seeded order
    until val_fraction is reached. No buffer: tiles of val cameras near a block's edge overlap training
    tiles next door (worldgen/README.md)."""
    n = len(cams)
    want = int(round(cfg.val_fraction * n))
    val = np.zeros(n, dtype=bool)
    if want == 0:
        return val
    bx = np.floor(cams[:, 0] / cfg.val_block_m).astype(np.int64)
    by = np.floor(cams[:, 1] / cfg.val_block_m).astype(np.int64)
    keys, inv = np.unique(bx * 100003 + by, return_inverse=True)
    prio = hash_u01(keys, salt=cfg.seed * 31 + 5)
    count = 0
    for b in np.argsort(prio, kind="stable"):
        if count >= want:
            break
        m = inv == b
        val |= m
        count += int(m.sum())
    return val


def _area_text(km2: float) -> str:
    """An area in km^2 to about three significant digits, never in scientific notation."""
    return f"{km2:.3g}" if km2 < 100 else f"{km2:,.0f}"


def generate_dataset(cfg: GenConfig, out_dir: str, workers: int = 1, overwrite: bool = False,
                     progress: bool = True, log=print) -> dict:
    cfg.validate()
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir) or "."
    if not os.path.isdir(parent):
        raise WorldgenError(f"parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise WorldgenError(f"parent directory {parent} is not writable")
    tidy_leftovers(out_dir, lambda message: log(f"worldgen: {message}"))  # may put a previous OUT back
    if os.path.exists(out_dir) and not overwrite:
        raise WorldgenError(f"output directory {out_dir} already exists (pass --overwrite to replace it)")
    t0 = time.time()
    with staged_directory(out_dir, lambda message: WorldgenError(f"output directory {out_dir}: {message}")) as stage:
        tmp = stage.path
        grid = cfg.layout == "grid"
        os.makedirs(os.path.join(tmp, "streetview"))
        if not grid:
            os.makedirs(os.path.join(tmp, "bingmap"))
            os.makedirs(os.path.join(tmp, "splits"))
        log(f"worldgen: building world seed={cfg.seed} area={cfg.area_km2} km^2 ...")
        world = generate_world(cfg.seed, cfg.area_km2, cfg.lat, cfg.lon, res=cfg.world_res_m, threads=min(workers, 4))
        t_world = time.time() - t0
        cams = choose_cameras(world, cfg)
        n = len(cams)
        n_ground = cfg.ground_count(n)
        what = (f"{n} ground images" if grid else f"{n} pairs" if n_ground == n else
                f"{n} aerial tiles and the ground images of the first {n_ground} of them")
        log(f"worldgen: world built in {t_world:.1f} s ({len(world.buildings['cx']) - 1} buildings, "
            f"{len(world.trees['x'])} trees)")
        ortho = None
        if grid:
            from worldgen.ortho import ORTHO_NAME, OrthoError, write_ortho
            t_ortho = time.time()
            try:
                ortho = write_ortho(world, cfg.seed, cfg.footprint_m, cfg.tile_px, os.path.join(tmp, ORTHO_NAME))
            except OrthoError as e:
                raise WorldgenError(str(e)) from None
            log(f"worldgen: wrote {ORTHO_NAME} ({ortho['width']} x {ortho['height']} px at "
                f"{ortho['m_per_px']:.4f} m/px) in {time.time() - t_ortho:.1f} s")
        log(f"worldgen: rendering {what} with {workers} worker(s)")
        w = _id_width(n)
        ids = [str(i).zfill(w) for i in range(n)]
        val = np.zeros(n, dtype=bool) if grid else split_val(cams, cfg)
        poses = [None] * n
        chunk = 4 if cfg.camera == "perspective" else 16  # a photo takes ~20x a panorama; the bar moves per chunk
        tasks = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
        _STATE.update(world=world, cfg=cfg, cams=cams, ids=ids, root=tmp, n_ground=n_ground)
        bar = None
        if progress:
            from tqdm import tqdm
            bar_unit = "camera" if grid else "pair" if n_ground == n else "tile"
            bar = tqdm(total=n, unit=bar_unit, desc="rendering", dynamic_ncols=True)
        t1 = time.time()
        try:
            if workers > 1 and n > chunk:
                import multiprocessing as mp
                ctx = mp.get_context("fork")
                with ctx.Pool(workers) as pool:
                    for lo, ps in pool.imap_unordered(_work, tasks):
                        poses[lo:lo + len(ps)] = ps
                        if bar is not None:
                            bar.update(len(ps))
            else:
                for t in tasks:
                    lo, ps = _work(t)
                    poses[lo:lo + len(ps)] = ps
                    if bar is not None:
                        bar.update(len(ps))
        finally:
            if bar is not None:
                bar.close()
            _STATE.clear()
        t_render = time.time() - t1
        lat, lon = world.latlon(cams[:, 0], cams[:, 1])
        area = world.area_type(cams[:, 0], cams[:, 1])
        if grid:
            _write_grid_csvs(tmp, ids, cams, lat, lon, poses, area, ground_camera(cfg))
        else:
            _write_csvs(tmp, ids, cams, lat, lon, val, poses, area, ground_camera(cfg), n_ground)
        meta = {
            "format": "worldgen", "version": FORMAT_VERSION, "seed": cfg.seed,
            "origin": {"lat": cfg.lat, "lon": cfg.lon},
            "area_km2": cfg.area_km2, "core_half_m": world.half_core,
            "tile_footprint_m": cfg.footprint_m, "tile_px": cfg.tile_px,
            "tile_m_per_px": cfg.footprint_m / cfg.tile_px,
            "pano": {"height": cfg.pano_height, "width": cfg.pano_width, "eye_height_m": EYE_HEIGHT,
                     "fov_deg": cfg.fov_deg, "heading_jitter_deg": cfg.heading_jitter_deg,
                     "layout": "equirectangular; columns clockwise; left edge south, centre north"},
            "counts": {"pairs": n, "train": int((~val).sum()), "val": int(val.sum()),
                       "buildings": int(len(world.buildings["cx"]) - 1), "trees": int(len(world.trees["x"])),
                       "area_types": {AREA_NAMES[k]: int((area == k).sum()) for k in range(3)}},
            "min_spacing_m": cfg.min_spacing_m, "world_res_m": cfg.world_res_m,
            "geodesy": "local x east / y north metres from the origin; azimuthal equidistant projection on the haversine sphere, R = 6371008.8 m",
            "config": cfg.world_json_config(),
        }
        if cfg.panoramas is not None:
            meta["counts"]["ground_images"] = n_ground
        if grid:
            meta["layout"] = "grid"
            meta["ortho"] = ortho
            counts = meta["counts"]
            del counts["pairs"], counts["train"], counts["val"]
            counts["cameras"] = n
        if cfg.camera == "perspective":
            cam = ground_camera(cfg)
            meta["camera"] = {
                "type": "perspective", "width": cfg.photo_width, "height": cfg.photo_height,
                "hfov_deg": cam["hfov_deg"], "vfov_deg": cam["vfov_deg"],
                "focal_length_35mm": focal_length_35mm(cfg.fov_deg, cfg.photo_width, cfg.photo_height),
                "heading_jitter_deg": cfg.heading_jitter_deg, "pitch_roll_jitter_deg": cfg.pitch_roll_jitter_deg,
                "exif": cfg.exif, "eye_height_m": EYE_HEIGHT,
                "layout": "pinhole, principal point at the centre, square pixels; streetview/<id>.jpg holds the "
                          "photos; per-photo heading, pitch and roll in cameras.csv",
            }
        with open(os.path.join(tmp, "world.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        stage.publish(replace=overwrite)
    written, unit = ((f"{ortho['path']} and {n} ground images", "cameras") if grid else
                     (f"{n} pairs", "pairs") if n_ground == n else
                     (f"{n} aerial tiles and {n_ground} ground images", "positions"))
    log(f"worldgen: wrote {written} to {out_dir} in {time.time() - t0:.1f} s "
        f"(world {t_world:.1f} s, rendering {t_render:.1f} s = {n / max(t_render, 1e-9):.1f} {unit}/s)")
    return meta


def _fmt(v: float) -> str:
    return f"{v:.8f}"


def ground_camera(cfg: GenConfig) -> dict:
    """What every ground image of the world sees: camera type, fields of view, image size."""
    if cfg.camera == "perspective":
        w, h = cfg.photo_width, cfg.photo_height
        vfov = 2 * math.degrees(math.atan(math.tan(math.radians(cfg.fov_deg) / 2) * h / w))
        return {"camera": "perspective", "hfov_deg": cfg.fov_deg, "vfov_deg": vfov, "width": w, "height": h}
    w = cfg.pano_width
    if cfg.fov_deg < 360.0:
        w = max(1, int(round(cfg.pano_width * cfg.fov_deg / 360.0)))  # as render_pano crops
    return {"camera": "equirectangular", "hfov_deg": 360.0 * w / cfg.pano_width, "vfov_deg": 180.0,
            "width": w, "height": cfg.pano_height}


def _write_csv(root, path, header, rows):
    with open(os.path.join(root, path), "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(header)
        wr.writerows(rows)


def _write_grid_csvs(root, ids, cams, lat, lon, poses, area, camera):
    """--layout grid: queries.csv without a tile_id (the true tiles depend on how ortho.tif is cut) and
    cameras.csv without a split (no splits/ yet)."""
    n = len(ids)
    _write_csv(root, "queries.csv", ["query_id", "path", "lat", "lon"],
               [[ids[i], f"streetview/{ids[i]}.jpg", _fmt(lat[i]), _fmt(lon[i])] for i in range(n)])
    header = ["id", "x_m", "y_m", "lat", "lon", "heading_deg", "area_type"]
    rows = [[ids[i], f"{cams[i, 0]:.3f}", f"{cams[i, 1]:.3f}", _fmt(lat[i]), _fmt(lon[i]),
             f"{poses[i].heading_deg:.3f}", AREA_NAMES[int(area[i])]] for i in range(n)]
    _add_camera_columns(header, rows, poses, camera)
    _write_csv(root, "cameras.csv", header, rows)


def _write_csvs(root, ids, cams, lat, lon, val, poses, area, camera, n_ground):
    """tiles.csv and cameras.csv cover every camera position; the pair lists (splits/, queries.csv)
    only the first ``n_ground``, the positions with a ground image."""
    n = len(ids)
    pair_rows = [[ids[i], f"bingmap/{ids[i]}.png", f"streetview/{ids[i]}.jpg", _fmt(lat[i]), _fmt(lon[i])]
                 for i in range(n_ground)]
    header = ["id", "aerial", "ground", "lat", "lon"]
    _write_csv(root, "splits/train.csv", header, [r for r, v in zip(pair_rows, val) if not v])
    _write_csv(root, "splits/val.csv", header, [r for r, v in zip(pair_rows, val) if v])
    _write_csv(root, "tiles.csv", ["tile_id", "lat", "lon", "path"],
               [[ids[i], _fmt(lat[i]), _fmt(lon[i]), f"bingmap/{ids[i]}.png"] for i in range(n)])
    _write_csv(root, "queries.csv", ["query_id", "path", "lat", "lon", "tile_id"],
               [[ids[i], f"streetview/{ids[i]}.jpg", _fmt(lat[i]), _fmt(lon[i]), ids[i]] for i in range(n_ground)])
    header = ["id", "x_m", "y_m", "lat", "lon", "heading_deg", "area_type", "split"]
    rows = [[ids[i], f"{cams[i, 0]:.3f}", f"{cams[i, 1]:.3f}", _fmt(lat[i]), _fmt(lon[i]),
             f"{poses[i].heading_deg:.3f}", AREA_NAMES[int(area[i])], "val" if val[i] else "train"] for i in range(n)]
    _add_camera_columns(header, rows, poses, camera)
    _write_csv(root, "cameras.csv", header, rows)


def _add_camera_columns(header, rows, poses, camera):
    """Limited field of view: the whole camera per query in cameras.csv (full panoramas keep the old columns)."""
    if camera["camera"] == "perspective" or camera["hfov_deg"] < 360.0:
        header += ["camera", "hfov_deg", "vfov_deg", "pitch_deg", "roll_deg", "width", "height"]
        for r, p in zip(rows, poses):
            r += [camera["camera"], f"{camera['hfov_deg']:.3f}", f"{camera['vfov_deg']:.3f}", f"{p.pitch_deg:.3f}",
                  f"{p.roll_deg:.3f}", camera["width"], camera["height"]]

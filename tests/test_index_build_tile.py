"""index_build tile: a georeferenced raster (any CRS) -> north-up tiles + a catalogue `build` accepts.

The rasters are made here from numpy arrays, so the truth is known: compass markers (a red square
with a green square to its north and a blue one to its east) are drawn at known pixels, and their
WGS84 positions follow from the geotransform and the CRS alone (rasterio.warp), never from the
code under test. A tile's centre is right when every marker in it sits where the tile's catalogue
lat/lon, its ground size and north-up say it should.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import warnings

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from PIL import Image  # noqa: E402
from rasterio.crs import CRS  # noqa: E402
from rasterio.errors import NotGeoreferencedWarning  # noqa: E402
from rasterio.transform import Affine, from_origin  # noqa: E402
from rasterio.warp import transform as warp_points  # noqa: E402
from scipy import ndimage  # noqa: E402

from index_build import cli  # noqa: E402
from index_build.raster_tiles import TileOptions  # noqa: E402
from test_index_build_support import PYTHON, REPO, micro_checkpoint, subprocess_env  # noqa: E402

WGS84 = "EPSG:4326"
MARKER_SPACING_PX, MARKER_FIRST_PX = 60, 30
RED_HALF_PX, ARM_PX, ARM_HALF_PX = 5, 12, 3      # red 10 px square; green/blue 6 px squares 12 px away
ARM_M = 6.0                                       # 12 px at the ~0.5 m/px of the marker rasters


# ------------------------------------------------------------------------------------------- rasters

def write_raster(path, data: np.ndarray, crs, transform, nodata=None, **profile) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)      # some of the bad inputs are on purpose
        return _write_raster(path, data, crs, transform, nodata, **profile)


def _write_raster(path, data, crs, transform, nodata, **profile) -> str:
    count, height, width = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype=data.dtype,
                       crs=crs, transform=transform, nodata=nodata, **profile) as dst:
        dst.write(data)
    return str(path)


def marker_image(height: int, width: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """RGB (3, H, W) uint8 on a dull gradient, and the (col, row) pixel-corner centres of its markers."""
    rows, cols = np.mgrid[0:height, 0:width]
    img = np.stack([60 + 40 * cols // width, np.full_like(rows, 110), 70 + 40 * rows // height]).astype(np.uint8)
    centres = []
    for r in range(MARKER_FIRST_PX, height - MARKER_FIRST_PX + 1, MARKER_SPACING_PX):
        for c in range(MARKER_FIRST_PX, width - MARKER_FIRST_PX + 1, MARKER_SPACING_PX):
            img[:, r - RED_HALF_PX:r + RED_HALF_PX, c - RED_HALF_PX:c + RED_HALF_PX] = np.array([255, 0, 0])[:, None, None]
            g_r, b_c = r - ARM_PX, c + ARM_PX
            img[:, g_r - ARM_HALF_PX:g_r + ARM_HALF_PX, c - ARM_HALF_PX:c + ARM_HALF_PX] = np.array([0, 255, 0])[:, None, None]
            img[:, r - ARM_HALF_PX:r + ARM_HALF_PX, b_c - ARM_HALF_PX:b_c + ARM_HALF_PX] = np.array([0, 0, 255])[:, None, None]
            centres.append((c, r))
    return img, centres


# Three ways of saying "about 0.5 m pixels over 400 m x 300 m": UTM far from its central meridian
# (grid north is ~2 degrees off true north there), plain degrees, and Web-Mercator metres (~1.48 of them
# per ground metre at this latitude).
MARKER_RASTERS = {
    "utm32n": ("EPSG:32632", from_origin(300_000.0, 5_240_000.0, 0.5, 0.5)),
    "wgs84-degrees": ("EPSG:4326", from_origin(8.50, 47.40, 6.6e-6, 4.5e-6)),
    "web-mercator": ("EPSG:3857", from_origin(946_000.0, 6_005_000.0, 0.7388, 0.7388)),
}


def marker_raster(path, name: str, height: int = 600, width: int = 800):
    crs, transform = MARKER_RASTERS[name]
    img, centres = marker_image(height, width)
    write_raster(path, img, crs, transform)
    cols, rows = np.array(centres, float).T
    xs, ys = transform.c + transform.a * cols + transform.b * rows, transform.f + transform.d * cols + transform.e * rows
    lon, lat = warp_points(crs, WGS84, xs, ys)
    return str(path), np.array(lat), np.array(lon)


def run_tile(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["tile", "--quiet", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_catalogue(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "tiles.csv"), newline="") as f:
        return list(csv.DictReader(f))


def load_tile(out_dir, row: dict) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(out_dir, row["path"])).convert("RGB"))


# ------------------------------------------------------------------------------------------- geometry

def local_en(lat0: float, lon0: float, lat, lon) -> tuple[np.ndarray, np.ndarray]:
    """East/north metres of points from (lat0, lon0): azimuthal equidistant on WGS84 (exact near its centre)."""
    aeqd = CRS.from_proj4(f"+proj=aeqd +lat_0={lat0!r} +lon_0={lon0!r} +datum=WGS84 +units=m")
    e, n = warp_points(WGS84, aeqd, np.atleast_1d(lon), np.atleast_1d(lat))
    return np.array(e), np.array(n)


def colour_blobs(img: np.ndarray, channel: int) -> list[tuple[float, float]]:
    """Centroids (u = x, v = y, pixel-corner coordinates) of pure-colour blobs not touching the border."""
    strong = img[..., channel] > 150
    weak = np.delete(img, channel, axis=2).max(axis=2) < 90
    labels, n = ndimage.label(strong & weak)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == img.shape[0] or sl[1].stop == img.shape[1]:
            continue
        v, u = ndimage.center_of_mass(labels == i)
        out.append((u + 0.5, v + 0.5))
    return out


def check_markers(out_dir, rows, tile_m, tile_px, marker_lat, marker_lon, margin_m: float = 6.0) -> dict:
    """Every marker more than ``margin_m`` inside a tile is found where the tile's lat/lon says, north-up;
    returns the errors (m)."""
    mpp = tile_m / tile_px
    marker_errors, centre_errors, seen = [], [], 0
    for row in rows:
        img = load_tile(out_dir, row)
        assert img.shape == (tile_px, tile_px, 3)
        e, n = local_en(float(row["lat"]), float(row["lon"]), marker_lat, marker_lon)
        u, v = tile_px / 2 + e / mpp, tile_px / 2 - n / mpp
        inside = (np.abs(e) < tile_m / 2 - margin_m) & (np.abs(n) < tile_m / 2 - margin_m)
        reds = np.array(colour_blobs(img, 0)).reshape(-1, 2)
        offsets = []
        for ue, ve in zip(u[inside], v[inside]):
            assert len(reds), f"tile {row['tile_id']}: no marker found, expected one at pixel ({ue:.1f}, {ve:.1f})"
            d = np.hypot(reds[:, 0] - ue, reds[:, 1] - ve)
            k = int(d.argmin())
            assert d[k] * mpp < 3.0, f"tile {row['tile_id']}: marker expected at ({ue:.1f}, {ve:.1f}), nearest {reds[k]}"
            um, vm = reds[k]
            offsets.append(((um - ue) * mpp, (vm - ve) * mpp))
            # North-up: the green arm is above (north of) the red square, the blue arm right of it (east).
            green = img[int(vm - ARM_M / mpp), int(um)]
            blue = img[int(vm), int(um + ARM_M / mpp)]
            assert green[1] > 200 and green[0] < 60 and green[2] < 60, f"{row['tile_id']}: no green arm north"
            assert blue[2] > 200 and blue[0] < 60 and blue[1] < 60, f"{row['tile_id']}: no blue arm east"
        # Nothing else: every red blob well inside the tile is one of the expected markers.
        for um, vm in reds:
            if min(um, vm, tile_px - um, tile_px - vm) * mpp > margin_m + 2.0:
                assert np.hypot(u - um, v - vm).min() * mpp < 3.0, f"{row['tile_id']}: stray marker at ({um}, {vm})"
        if offsets:
            offsets = np.array(offsets)
            marker_errors += list(np.hypot(offsets[:, 0], offsets[:, 1]))
            centre_errors.append(float(np.hypot(*offsets.mean(axis=0))))
            seen += len(offsets)
    return {"markers": seen, "max_marker_error_m": max(marker_errors), "max_centre_error_m": max(centre_errors)}


# ------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", sorted(MARKER_RASTERS))
def test_tile_centres_and_content_match_the_truth(tmp_path, capsys, name):
    raster, marker_lat, marker_lon = marker_raster(tmp_path / f"{name}.tif", name)
    out = tmp_path / "tiles"
    rc, stdout, err = run_tile(capsys, "--raster", raster, "--out", out, "--tile-m", 100, "--stride-m", 50,
                               "--tile-px", 128, "--format", "png")
    assert rc == 0, err
    rows = read_catalogue(out)
    record = json.loads((out / "tiling.json").read_text())
    assert record["counts"]["written"] == len(rows) >= 20
    assert f"{len(rows)} tile(s) written" in stdout and "skipped as nodata" in stdout
    assert stdout.count("\n") == 1

    result = check_markers(out, rows, 100.0, 128, marker_lat, marker_lon)
    print(f"{name}: {len(rows)} tiles, {result}")
    assert result["markers"] >= 4 * len(rows)
    assert result["max_centre_error_m"] < 1.0 and result["max_marker_error_m"] < 1.0

    # The grid itself: neighbours stride_m apart, along rows due east, down columns due south.
    by_cell = {(int(r["grid_row"]), int(r["grid_col"])): (float(r["lat"]), float(r["lon"])) for r in rows}
    for (r, c), (lat, lon) in by_cell.items():
        for (dr, dc), (want_e, want_n) in {(0, 1): (50.0, 0.0), (1, 0): (0.0, -50.0)}.items():
            if (r + dr, c + dc) in by_cell:
                e, n = local_en(lat, lon, *by_cell[(r + dr, c + dc)])
                assert abs(e[0] - want_e) < 0.05 and abs(n[0] - want_n) < 0.05, (r, c, dr, dc, e, n)
    ids = [r["tile_id"] for r in rows]
    assert len(set(ids)) == len(ids) and all(i.startswith(f"{name}-r") for i in ids)


def test_views_between_tile_centres_belong_to_the_nearest_tile(tmp_path, capsys):
    raster, marker_lat, marker_lon = marker_raster(tmp_path / "utm.tif", "utm32n")
    plain, out = tmp_path / "plain", tmp_path / "views"
    assert run_tile(capsys, "--raster", raster, "--out", plain, "--tile-m", 100, "--stride-m", 50,
                    "--tile-px", 128, "--format", "png")[0] == 0
    rc, stdout, err = run_tile(capsys, "--raster", raster, "--out", out, "--tile-m", 100, "--stride-m", 50,
                               "--centres-m", 12.5, "--tile-px", 128, "--format", "png")
    assert rc == 0, err
    tiles, rows = read_catalogue(plain), read_catalogue(out)
    record = json.loads((out / "tiling.json").read_text())
    n_rows, n_cols = record["grid"]["rows"], record["grid"]["cols"]
    assert record["centres_m"] == 12.5 and record["counts"]["views"] == len(rows) == (4 * (n_rows - 1) + 1) * (
        4 * (n_cols - 1) + 1)
    assert f"{len(tiles)} tile(s) as {len(rows)} views every 12.5 m written" in stdout
    # the tiles themselves are rows of their own, first of their views, where the plain grid has them
    own = {r["tile_id"]: r for r in rows if r["tile"] == r["tile_id"]}
    assert [(t["tile_id"], t["lat"], t["lon"]) for t in tiles] == [(i, r["lat"], r["lon"]) for i, r in own.items()]
    assert [r["tile"] for r in rows] == sorted((r["tile"] for r in rows), key=list(own).index)
    assert all(rows[i - 1]["tile"] != r["tile"] for i, r in enumerate(rows) if r["tile_id"] == r["tile"] and i)
    # each view is nearer its own tile's centre than any other's, at the offset its id names, and its image
    # shows the raster there (the markers land where their coordinates say)
    centre = {i: (float(r["lat"]), float(r["lon"])) for i, r in own.items()}
    names = list(centre)
    for r in rows:
        e, n = local_en(float(r["lat"]), float(r["lon"]), *np.array([centre[i] for i in names]).T)
        d = np.hypot(e, n)
        assert d[names.index(r["tile"])] <= d.min() + 1e-6, r
        if r["tile_id"] != r["tile"]:
            want_e, want_n = map(float, r["tile_id"].split(".e")[1].split("n"))
            got_e, got_n = local_en(*centre[r["tile"]], float(r["lat"]), float(r["lon"]))
            assert abs(got_e[0] - want_e) < 0.05 and abs(got_n[0] - want_n) < 0.05, r
            assert max(abs(want_e), abs(want_n)) <= 25.0 and (want_e, want_n) != (0.0, 0.0)
    result = check_markers(out, rows[::7], 100.0, 128, marker_lat, marker_lon, margin_m=2 * ARM_M)
    assert result["max_centre_error_m"] < 1.0 and result["max_marker_error_m"] < 1.0


def nodata_raster(path, kind: str) -> str:
    """410 m x 210 m in UTM 32N on the zone's central meridian; the western 140 m hold no data."""
    height, width, gap_px = 420, 820, 280
    rgb = np.empty((3, height, width), np.uint8)
    rgb[:] = np.array([120, 130, 140])[:, None, None]
    transform = from_origin(500_000.0, 5_240_000.0, 0.5, 0.5)
    if kind == "nodata-value":
        rgb[:, :, :gap_px] = 0
        return write_raster(path, rgb, "EPSG:32632", transform, nodata=0)
    alpha = np.full((1, height, width), 255, np.uint8)
    alpha[:, :, :gap_px] = 0
    rgb[:, :, :gap_px] = np.array([250, 5, 5])[:, None, None]   # garbage under alpha 0 must not show
    return write_raster(path, np.concatenate([rgb, alpha]), "EPSG:32632", transform, photometric="RGB", alpha="YES")


@pytest.mark.parametrize("kind", ["nodata-value", "alpha-band"])
@pytest.mark.parametrize("max_nodata, written, skipped", [(None, 15, 6), ("0.3", 12, 9)])
def test_mostly_nodata_tiles_are_skipped_and_counted(tmp_path, capsys, kind, max_nodata, written, skipped):
    # Ground width 410 m x 0.9996 (UTM scale on the central meridian) = 409.84 m: 7 columns of 100 m
    # tiles every 50 m, centred, so the columns start 4.92 m in and hold 100%, 85%, 35%, 0%... nodata;
    # 3 rows. Skipped above 50%: 2 columns; above 30%: 3 columns.
    raster = nodata_raster(tmp_path / "gap.tif", kind)
    out = tmp_path / "tiles"
    extra = ["--max-nodata", max_nodata] if max_nodata else []
    rc, stdout, err = run_tile(capsys, "--raster", raster, "--out", out, "--tile-m", 100, "--stride-m", 50,
                               "--tile-px", 64, "--format", "png", *extra)
    assert rc == 0, err
    rows = read_catalogue(out)
    record = json.loads((out / "tiling.json").read_text())
    assert (len(rows), record["counts"]["skipped_nodata"], record["counts"]["tiles"]) == (written, skipped, 21)
    assert f"{written} tile(s) written" in stdout and f"{skipped} skipped as nodata" in stdout
    limit = float(max_nodata or 0.5)
    for row in rows:
        img = load_tile(out, row).astype(int)
        black = (img.sum(axis=2) == 0)
        assert black.mean() <= limit
        # Data pixels carry the raster's colour only: nothing of the garbage under the mask leaks in.
        assert np.abs(img[~black] - [120, 130, 140]).max() <= 2
        if black.any():
            assert black[:, 0].all() and not black[:, -1].any()        # the gap is on the west side


def centre_colour(tmp_path, capsys, data, *args, **profile) -> tuple[int, int, int]:
    tmp_path.mkdir()
    raster = write_raster(tmp_path / "r.tif", data, "EPSG:32632", from_origin(500_000, 5_240_000, 1.0, 1.0), **profile)
    out = tmp_path / "tiles"
    rc, _, err = run_tile(capsys, "--raster", raster, "--out", out, "--tile-m", 50, "--tile-px", 32,
                          "--format", "png", *args)
    assert rc == 0, err
    rows = read_catalogue(out)
    return tuple(int(v) for v in load_tile(out, rows[len(rows) // 2])[16, 16])


def test_band_choice_palettes_and_value_ranges(tmp_path, capsys):
    plain = np.empty((4, 100, 100), np.uint8)     # four bands, none marked red/green/blue/alpha
    plain[:] = np.array([10, 120, 230, 77])[:, None, None]
    assert centre_colour(tmp_path / "a", capsys, plain, photometric="MINISBLACK") == (10, 120, 230)
    assert centre_colour(tmp_path / "b", capsys, plain, "--bands", "3,2,1", photometric="MINISBLACK") == (230, 120, 10)
    assert centre_colour(tmp_path / "c", capsys, plain, "--bands", "4", photometric="MINISBLACK") == (77, 77, 77)
    assert centre_colour(tmp_path / "d", capsys, plain[:1]) == (10, 10, 10)            # a single band is grey
    twelve_bit = np.full((3, 100, 100), 2048, np.uint16)
    assert centre_colour(tmp_path / "e", capsys, twelve_bit, "--value-range", "0,4095") == (128, 128, 128)

    index = np.full((1, 100, 100), 7, np.uint8)
    (tmp_path / "f").mkdir()
    raster = write_raster(tmp_path / "f" / "p.tif", index, "EPSG:32632", from_origin(500_000, 5_240_000, 1.0, 1.0),
                          photometric="palette")
    with rasterio.open(raster, "r+") as dst:
        dst.write_colormap(1, {i: (i * 30 % 256, 200, 255 - i, 255) for i in range(256)})
    out = tmp_path / "f" / "tiles"
    rc, _, err = run_tile(capsys, "--raster", raster, "--out", out, "--tile-m", 50, "--tile-px", 32, "--format", "png")
    assert rc == 0, err
    assert tuple(int(v) for v in load_tile(out, read_catalogue(out)[0])[16, 16]) == (210, 200, 248)


def big_raster(path, side: int = 2400) -> str:
    """side x side RGB at 0.25 m (600 m square for 2400): ~17 MB uncompressed, tiled blocks."""
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, (3, side // 8, side // 8), dtype=np.uint8)
    data = np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2)
    return write_raster(path, data, "EPSG:32632", from_origin(465_000.0, 5_240_000.0, 0.25, 0.25),
                        tiled=True, blockxsize=256, blockysize=256)


MEASURE_PEAK = r"""
import json, sys
from index_build.cli import main

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

warm, big, warm_out, big_out, budget = sys.argv[1:6]
args = ["--tile-m", "100", "--stride-m", "100", "--tile-px", "128", "--memory-budget", budget, "--quiet"]
# A first, small run loads GDAL's drivers, PROJ's database and PIL's encoders: code, not raster data.
assert main(["tile", "--raster", warm, "--out", warm_out, *args]) == 0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                   # resets the peak resident size (VmHWM) to the current one
before = status("VmRSS")
rc = main(["tile", "--raster", big, "--out", big_out, *args])
print(json.dumps({"rc": rc, "growth": status("VmHWM") - before}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_raster_larger_than_the_memory_budget_still_tiles(tmp_path):
    budget = 4 * 2 ** 20
    big = big_raster(tmp_path / "big.tif")
    warm = big_raster(tmp_path / "warm.tif", side=480)
    assert os.path.getsize(big) >= 4 * budget
    proc = subprocess.run([PYTHON, "-c", MEASURE_PEAK, warm, big, str(tmp_path / "w"), str(tmp_path / "b"), "4MiB"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"raster {os.path.getsize(big) / 2 ** 20:.1f} MiB, budget 4 MiB, peak growth "
          f"{measured['growth'] / 2 ** 20:.2f} MiB")
    assert measured["rc"] == 0
    assert len(read_catalogue(tmp_path / "b")) == 36
    assert measured["growth"] <= budget


def test_a_budget_too_small_for_one_tile_fails_before_writing(tmp_path, capsys):
    raster, _, _ = marker_raster(tmp_path / "m.tif", "utm32n")
    rc, _, err = run_tile(capsys, "--raster", raster, "--out", tmp_path / "tiles", "--tile-px", 1024,
                          "--memory-budget", "4MiB")
    assert rc == 2 and err.count("\n") == 1 and "--memory-budget is too small" in err, err
    assert sorted(os.listdir(tmp_path)) == ["m.tif"]


def _bad_inputs(tmp_path) -> dict:
    rgb, _ = marker_image(200, 200)
    (tmp_path / "text.tif").write_text("this is not a raster\n")
    return {
        "not a raster": (["--raster", tmp_path / "text.tif"], "not a raster GDAL can read"),
        "missing": (["--raster", tmp_path / "nowhere.tif"], "no such file"),
        "no crs": (["--raster", write_raster(tmp_path / "nocrs.tif", rgb, None, from_origin(0, 0, 0.5, 0.5))],
                   "has no coordinate reference system"),
        "no geotransform": (["--raster", write_raster(tmp_path / "nogt.tif", rgb, "EPSG:32632", None)],
                            "has no geotransform"),
        # 200 px at 0.4 m = 80 m on the ground
        "tile larger": (["--raster", write_raster(tmp_path / "small.tif", rgb, "EPSG:32632",
                                                  from_origin(500_000, 5_240_000, 0.4, 0.4)), "--tile-m", "100"],
                        "--tile-m 100 is larger than the raster"),
        # 200 px of 1e-5 degrees from 179.999 E: the east half lies past the antimeridian, written as 180-181
        "past 180": (["--raster", write_raster(tmp_path / "pacific.tif", rgb, "EPSG:4326",
                                               from_origin(179.999, 0.001, 1e-5, 1e-5))],
                     "longitudes 179.999 to 180.001 in a geographic CRS reach past +-180"),
        "past 180, columns running west": (["--raster", write_raster(tmp_path / "west.tif", rgb, "EPSG:4326",
                                                                     Affine(-1e-5, 0, 180.001, 0, -1e-5, 0.001))],
                                           "longitudes 179.999 to 180.001 in a geographic CRS"),
        "stride 0": (["--stride-m", "0"], "--stride-m must be > 0"),
        "stride negative": (["--stride-m", "-5"], "--stride-m must be > 0"),
        "bad bands": (["--bands", "1,2"], "--bands '1,2': give three bands"),
        "band out of range": (["--bands", "4,2,1"], "asks for band(s) 4, the raster has 3"),
        "16-bit without range": (["--raster", write_raster(tmp_path / "u16.tif", rgb.astype(np.uint16), "EPSG:32632",
                                                           from_origin(500_000, 5_240_000, 1, 1))],
                                 "pass --value-range LO,HI"),
        "bad prefix": (["--id-prefix", "a/b"], "--id-prefix 'a/b' may only hold"),
        "centres not a fraction of the stride": (["--stride-m", "25", "--centres-m", "10"],
                                                 "--centres-m must divide the stride (25 m)"),
        "centres 0": (["--centres-m", "0"], "--centres-m must divide the stride"),
        "nodata everywhere": (["--raster", write_raster(tmp_path / "empty.tif", np.zeros_like(rgb), "EPSG:32632",
                                                        from_origin(500_000, 5_240_000, 1, 1), nodata=0)],
                              "are more than 50% nodata; nothing written"),
    }


def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys):
    good, _, _ = marker_raster(tmp_path / "good.tif", "utm32n", height=200, width=400)
    for label, (args, phrase) in _bad_inputs(tmp_path).items():
        out = tmp_path / "tiles"
        argv = ["--raster", good, "--out", out, "--tile-m", "50", *args] if "--raster" not in args else \
            ["--out", out, "--tile-m", "50", *args]
        rc, stdout, err = run_tile(capsys, *argv)
        assert rc == 2, (label, rc, err)
        assert err.startswith("index_build tile: error: ") and err.count("\n") == 1, (label, err)
        assert phrase in err, (label, err)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tiles")], label

    (tmp_path / "tiles").mkdir()
    rc, _, err = run_tile(capsys, "--raster", good, "--out", tmp_path / "tiles", "--tile-m", 50)
    assert rc == 2 and "already exists (pass --overwrite" in err and err.count("\n") == 1
    rc, _, err = run_tile(capsys, "--raster", good, "--out", tmp_path / "tiles", "--tile-m", 50, "--overwrite")
    assert rc == 0 and len(read_catalogue(tmp_path / "tiles")) > 0


def test_output_that_can_not_be_written_is_one_line(tmp_path, capsys):
    raster, _, _ = marker_raster(tmp_path / "good.tif", "utm32n", height=200, width=400)
    too_long = tmp_path / ("t" * 300)
    rc, stdout, err = run_tile(capsys, "--raster", raster, "--out", too_long, "--tile-m", 50)
    assert rc == 2 and stdout == ""
    assert err.startswith(f"index_build tile: error: --out {too_long}: can not write ") and err.count("\n") == 1
    assert "File name too long" in err
    assert sorted(os.listdir(tmp_path)) == ["good.tif"]


def test_a_failed_write_midway_is_one_line(tmp_path, capsys, monkeypatch):
    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("index_build.raster_tiles.tile_raster", full_disk)
    rc, _, err = run_tile(capsys, "--raster", tmp_path / "ortho.tif", "--out", tmp_path / "tiles")
    assert (rc, err) == (1, "index_build tile: error: [Errno 28] No space left on device\n")


def test_the_real_command_line_prints_one_error_line(tmp_path):
    (tmp_path / "ortho.tif").write_bytes(b"II*\x00garbage")
    proc = subprocess.run([PYTHON, "-m", "index_build", "tile", "--raster", str(tmp_path / "ortho.tif"),
                           "--out", str(tmp_path / "tiles")], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "ortho.tif: not a raster GDAL can read" in proc.stderr, proc.stderr


def test_help_explains_every_option_and_defaults_agree():
    tile = cli.build_parser()._subparsers._group_actions[0].choices["tile"]
    options = [a for a in tile._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[0] for a in options} >= {"--raster", "--out", "--tile-m", "--stride-m", "--tile-px",
                                                        "--max-nodata", "--memory-budget", "--format"}
    assert all(a.help and len(a.help) > 10 for a in options), [a.option_strings for a in options if not a.help]
    defaults = TileOptions(raster="r", out="o")
    assert cli.TILE_DEFAULTS == {"tile_m": defaults.tile_m, "tile_px": defaults.tile_px,
                                 "max_nodata": defaults.max_nodata, "memory_budget": defaults.memory_budget}


def test_the_catalogue_builds_an_index(tmp_path, capsys):
    raster, _, _ = marker_raster(tmp_path / "ortho.tif", "utm32n", height=400, width=400)
    out = tmp_path / "tiles"
    rc, _, err = run_tile(capsys, "--raster", raster, "--out", out, "--tile-m", 100, "--stride-m", 50,
                          "--tile-px", 64)
    assert rc == 0, err
    rows = read_catalogue(out)
    assert all(r["path"].endswith(".jpg") for r in rows)
    ckpt = tmp_path / "micro.safetensors"
    micro_checkpoint(ckpt)
    index = tmp_path / "index"
    proc = subprocess.run([PYTHON, "-m", "index_build", "build", "--catalog", str(out / "tiles.csv"),
                           "--checkpoint", str(ckpt), "--out", str(index), "--workers", "0", "--batch-size", "8",
                           "--device", "cpu", "--quiet", "--json"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)["manifest"]
    assert manifest["count"] == len(rows)
    # the footprint and stride from tiling.json: the service refines positions with them
    assert (manifest["tile_m"], manifest["stride_m"]) == (100.0, 50.0)
    with open(index / "tiles.csv", newline="") as f:
        built = list(csv.DictReader(f))
    assert [(b["tile_id"], float(b["lat"]), float(b["lon"]), b["grid_row"], b["grid_col"]) for b in built] == \
        [(r["tile_id"], float(r["lat"]), float(r["lon"]), r["grid_row"], r["grid_col"]) for r in rows]
    assert all(os.path.samefile(b["source"], out / r["path"]) for b, r in zip(built, rows))


def test_tiling_record_is_read_only_beside_a_catalogue_of_index_build_tile(tmp_path):
    from index_build.build import BuildError, catalogue_tiling

    csv_path = tmp_path / "tiles.csv"
    csv_path.write_text("tile_id,lat,lon,path\n")
    assert catalogue_tiling(str(csv_path)) is None  # a hand-made catalogue: no footprint recorded
    (tmp_path / "tiling.json").write_text(json.dumps({"format": "index_build-tiling/1", "tile_m": 80, "stride_m": 30}))
    assert catalogue_tiling(str(csv_path)) == {"tile_m": 80.0, "stride_m": 30.0}
    (tmp_path / "tiling.json").write_text(json.dumps({"format": "something else", "tile_m": 80}))
    assert catalogue_tiling(str(csv_path)) is None
    for bad in ('{"format": "index_build-tiling/1", "tile_m": -5, "stride_m": 30}',
                '{"format": "index_build-tiling/1", "stride_m": 30}', "not json"):
        (tmp_path / "tiling.json").write_text(bad)
        with pytest.raises(BuildError, match="tiling.json") as exc:
            catalogue_tiling(str(csv_path))
        assert "\n" not in str(exc.value)


def _build_then_add(tmp_path, capsys, first: list, second: list) -> tuple[dict, str, str]:
    """Tiles of one raster cut twice (``first``/``second``: extra `tile` arguments), an index built from the
    first, then `add` of the second, which must fail: the manifest after, build's and add's stderr."""
    raster, _, _ = marker_raster(tmp_path / "ortho.tif", "utm32n", height=400, width=400)
    for name, extra in (("a", first), ("b", second)):
        rc, _, err = run_tile(capsys, "--raster", raster, "--out", tmp_path / name, "--tile-px", 32,
                              "--id-prefix", name, *extra)
        assert rc == 0, err
    ckpt = tmp_path / "micro.safetensors"
    micro_checkpoint(ckpt)
    common = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "index"), "--workers", "0", "--batch-size", "8",
              "--device", "cpu", "--quiet"]
    assert cli.main(["build", "--catalog", str(tmp_path / "a" / "tiles.csv"), *common]) == 0
    build_err = capsys.readouterr().err
    assert cli.main(["add", "--catalog", str(tmp_path / "b" / "tiles.csv"), *common]) != 0
    return json.loads((tmp_path / "index" / "manifest.json").read_text()), build_err, capsys.readouterr().err


def test_add_refuses_tiles_of_another_footprint(tmp_path, capsys):
    manifest, build_err, err = _build_then_add(tmp_path, capsys, ["--tile-m", 100], ["--tile-m", 80])
    assert "tiles of 80 m" in err and "100 m tiles" in err, err
    assert "views" not in build_err  # plain tiles: no word on the checkpoint
    assert manifest["count"] == len(read_catalogue(tmp_path / "a"))


def test_add_refuses_views_of_another_spacing(tmp_path, capsys):
    manifest, build_err, err = _build_then_add(tmp_path, capsys,
                                               ["--tile-m", 100, "--stride-m", 50, "--centres-m", 25],
                                               ["--tile-m", 100, "--stride-m", 50, "--centres-m", 12.5])
    # views indexed with a checkpoint without an orientation head: the build says what places them better
    assert "views every 25 m and this checkpoint has no orientation head" in build_err, build_err
    assert "weights/l2ltr_tiny_grid.safetensors" in build_err
    assert (manifest["stride_m"], manifest["centres_m"]) == (50.0, 25.0)
    assert "views every 12.5 m" in err and "the artifact views every 25 m" in err, err


def test_views_get_a_word_on_a_head_not_trained_off_centre():
    from types import SimpleNamespace

    from index_build.build import views_checkpoint_note

    views, plain = {"tile_m": 100.0, "stride_m": 50.0, "centres_m": 10.0}, {"tile_m": 100.0, "stride_m": 50.0}
    head = object()
    centred = SimpleNamespace(orientation=head, provenance={"orientation": {"retrieval": 1.0}})
    moved = SimpleNamespace(orientation=head, provenance={"orientation": {"centre_jitter": 0.07}})
    bare = SimpleNamespace(orientation=None, provenance={"orientation": {"centre_jitter": 0.07}})
    assert "trained on tiles centred on their cameras" in views_checkpoint_note(centred, views)
    assert "has no orientation head" in views_checkpoint_note(bare, views)
    assert views_checkpoint_note(moved, views) is None
    assert all(views_checkpoint_note(net, tiling) is None for net in (centred, bare) for tiling in (plain, None))


def test_an_index_of_views_holds_each_tile_once_and_keeps_every_view(tmp_path, capsys):
    """Views (--centres-m) are indexed as tiles: index.faiss holds each tile's own row (manifest
    index_rows), tiles.csv and the vectors every view; verify passes; add appends the new tiles' own rows
    only, and the service's reader agrees."""
    import faiss

    from index_build.verify import run_verify
    from model.index_artifact import read_manifest, read_tiles, read_vectors

    raster, _, _ = marker_raster(tmp_path / "ortho.tif", "utm32n", height=400, width=400)
    for name in ("a", "b"):
        rc, _, err = run_tile(capsys, "--raster", raster, "--out", tmp_path / name, "--tile-px", 32,
                              "--id-prefix", name, "--tile-m", 100, "--stride-m", 50, "--centres-m", 25)
        assert rc == 0, err
    ckpt = tmp_path / "micro.safetensors"
    micro_checkpoint(ckpt)
    common = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "index"), "--workers", "0", "--batch-size", "8",
              "--device", "cpu", "--quiet"]
    index_dir = tmp_path / "index"
    tiles_a = [r for r in read_catalogue(tmp_path / "a") if r["tile"] == r["tile_id"]]
    assert cli.main(["build", "--catalog", str(tmp_path / "a" / "tiles.csv"), *common]) == 0, capsys.readouterr().err
    manifest = read_manifest(index_dir)
    rows = read_catalogue(tmp_path / "a")
    assert len(rows) > len(tiles_a) and (manifest["count"], manifest["index_rows"]) == (len(rows), len(tiles_a))
    index = faiss.read_index(str(index_dir / "index.faiss"))
    table, vectors = read_tiles(index_dir, manifest), read_vectors(index_dir, manifest)
    assert index.ntotal == len(tiles_a) and len(vectors) == len(rows)
    held = table.searched_rows
    assert [table.tile_ids[r] for r in held] == [t["tile_id"] for t in tiles_a]
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), vectors[held])
    report = run_verify(str(index_dir), str(ckpt), sample=len(rows), device="cpu")
    assert report["ok"], report["problems"]
    assert report["self_retrieval"]["sampled"] == len(tiles_a)
    assert cli.main(["add", "--catalog", str(tmp_path / "b" / "tiles.csv"), *common]) == 0, capsys.readouterr().err
    manifest = read_manifest(index_dir)
    assert (manifest["count"], manifest["index_rows"]) == (2 * len(rows), 2 * len(tiles_a))
    index = faiss.read_index(str(index_dir / "index.faiss"))
    table, vectors = read_tiles(index_dir, manifest), read_vectors(index_dir, manifest)
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), vectors[table.searched_rows])
    assert run_verify(str(index_dir), str(ckpt), sample=50, device="cpu")["ok"]


def test_views_build_checks_and_add_refusals_come_before_encoding(tmp_path, capsys):
    """With views: --nlist is checked against the tiles index.faiss will hold, before encoding; a catalogue of
    views without its `tile` column (every row its own tile) still loads; verify searches for sampled tiles
    even when the row sample holds none, and catches an index.faiss whose ids are not the tiles' rows; add to
    an artifact of views built when index.faiss held every view is refused before encoding."""
    import faiss

    from index_build.verify import run_verify
    from model.index_artifact import read_faiss_index, read_manifest

    raster, _, _ = marker_raster(tmp_path / "ortho.tif", "utm32n", height=400, width=400)
    rc, _, err = run_tile(capsys, "--raster", raster, "--out", tmp_path / "a", "--tile-px", 32, "--id-prefix", "a",
                          "--tile-m", 100, "--stride-m", 50, "--centres-m", 25)
    assert rc == 0, err
    rows = read_catalogue(tmp_path / "a")
    tiles = [r for r in rows if r["tile"] == r["tile_id"]]
    ckpt = tmp_path / "micro.safetensors"
    micro_checkpoint(ckpt)

    def build(catalog, out, *extra, command="build"):
        args = [command, "--catalog", str(catalog), "--checkpoint", str(ckpt), "--out", str(out), "--workers", "0",
                "--batch-size", "8", "--device", "cpu", "--quiet", *extra]
        return cli.main(args), capsys.readouterr().err

    rc, err = build(tmp_path / "a" / "tiles.csv", tmp_path / "ivf", "--index", "ivf-flat", "--nlist",
                    str(len(tiles) + 1))
    assert rc != 0 and f"there are {len(tiles)}" in err, err
    assert not (tmp_path / "ivf.versions").exists() or not list((tmp_path / "ivf.versions").rglob("shard-*.npy"))
    # the same catalogue without its tile column: every row a tile of its own
    plain = tmp_path / "untied"
    plain.mkdir()
    (plain / "tiling.json").write_text((tmp_path / "a" / "tiling.json").read_text())
    with open(tmp_path / "a" / "tiles.csv", newline="") as fh, open(plain / "tiles.csv", "w", newline="") as out:
        writer = csv.writer(out)
        for line in csv.reader(fh):
            writer.writerow(line[:-1])
    (plain / "images").symlink_to(tmp_path / "a" / "images")
    assert build(plain / "tiles.csv", tmp_path / "untied_index")[0] == 0
    manifest = read_manifest(tmp_path / "untied_index")
    assert manifest["index_rows"] == manifest["count"] == len(rows)
    assert read_faiss_index(tmp_path / "untied_index", manifest).ntotal == len(rows)
    # verify: one sampled row (a view, most likely) and still a tile searched for
    index_dir = tmp_path / "index"
    assert build(tmp_path / "a" / "tiles.csv", index_dir)[0] == 0
    report = run_verify(str(index_dir), str(ckpt), sample=1, seed=5, device="cpu")
    assert report["ok"] and report["self_retrieval"]["sampled"] >= 1, report
    live = index_dir.resolve()
    index = faiss.read_index(str(live / "index.faiss"))
    stored = index.reconstruct_n(0, index.ntotal)
    shuffled = faiss.IndexFlatIP(index.d)
    shuffled.add(np.ascontiguousarray(stored[::-1]))
    faiss.write_index(shuffled, str(live / "index.faiss"))
    report = run_verify(str(index_dir), str(ckpt), sample=1, seed=5, device="cpu", check_checksums=False)
    assert not report["ok"] and any("self-retrieval" in p for p in report["problems"]), report
    faiss.write_index(index, str(live / "index.faiss"))
    # an artifact of views from before index_rows: add refuses it before encoding
    manifest = json.loads((live / "manifest.json").read_text())
    del manifest["index_rows"]
    (live / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = run_tile(capsys, "--raster", raster, "--out", tmp_path / "b", "--tile-px", 32, "--id-prefix", "b",
                          "--tile-m", 100, "--stride-m", 50, "--centres-m", 25)
    assert rc == 0, err
    rc, err = build(tmp_path / "b" / "tiles.csv", index_dir, command="add")
    assert rc != 0 and "no index_rows" in err and "rebuild it" in err, err
    assert not list(index_dir.parent.glob("index.versions/*/vectors/shard-00001*"))

"""worldgen --layout grid: one GeoTIFF of the region + cameras anywhere on the roads, tiled by the real
`python -m index_build tile` in a subprocess.

The georeference is checked against rasterio alone (the file's CRS and geotransform, rasterio.warp):
a camera's true lat/lon from cameras.csv must land on the ortho pixel under its world metres.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from rasterio.warp import transform as warp_points  # noqa: E402

from test_index_build_support import PYTHON, REPO, subprocess_env  # noqa: E402
from worldgen import cli  # noqa: E402
from worldgen.dataset import GenConfig, WorldgenError, generate_dataset  # noqa: E402
from worldgen.geo import haversine_m, latlon_to_metres  # noqa: E402
from worldgen.world import C_MARKING, C_ROAD, generate_world  # noqa: E402

TILE_M, STRIDE_M = 100.0, 50.0
GRID_CFG = dict(seed=3, area_km2=0.04, pairs=12, min_spacing_m=20.0, layout="grid")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid") / "world"
    cfg = GenConfig(**GRID_CFG)
    meta = generate_dataset(cfg, str(root), workers=1, progress=False, log=lambda *a: None)
    return root, cfg, meta


@pytest.fixture(scope="module")
def tiling(grid_world, tmp_path_factory):
    root, _, _ = grid_world
    out = tmp_path_factory.mktemp("grid-tiles") / "tiles"
    proc = subprocess.run([PYTHON, "-m", "index_build", "tile", "--raster", str(root / "ortho.tif"),
                           "--tile-m", str(TILE_M), "--stride-m", str(STRIDE_M), "--out", str(out), "--quiet"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def test_grid_layout_files(grid_world):
    root, cfg, meta = grid_world
    assert sorted(os.listdir(root)) == ["cameras.csv", "ortho.tif", "queries.csv", "streetview", "world.json"]
    queries, cameras = _rows(root / "queries.csv"), _rows(root / "cameras.csv")
    assert list(queries[0]) == ["query_id", "path", "lat", "lon"]
    assert list(cameras[0]) == ["id", "x_m", "y_m", "lat", "lon", "heading_deg", "area_type"]
    assert len(queries) == len(cameras) == cfg.pairs
    assert all((root / q["path"]).is_file() for q in queries)
    on_disk = json.loads((root / "world.json").read_text())
    assert on_disk["layout"] == "grid" and on_disk["config"]["layout"] == "grid"
    assert on_disk["counts"]["cameras"] == cfg.pairs and "pairs" not in on_disk["counts"]
    assert on_disk["ortho"]["georef_residual_m"] < 0.01


def test_cameras_anywhere_on_the_roads(grid_world):
    root, cfg, _ = grid_world
    cams = np.array([[float(r["x_m"]), float(r["y_m"])] for r in _rows(root / "cameras.csv")])
    world = generate_world(cfg.seed, cfg.area_km2, cfg.lat, cfg.lon, res=cfg.world_res_m)
    r, c = world.px_index(cams[:, 0], cams[:, 1])
    assert np.isin(world.cls[r, c], [C_ROAD, C_MARKING]).all()
    d = np.hypot(*(cams[:, None] - cams[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= cfg.min_spacing_m - 0.01  # csv rounding
    assert (np.abs(cams) <= world.half_core + 1e-6).all()
    # not quantised to the candidate lattice (pixel centres every few world pixels)
    frac = np.abs(((cams + world.half_world) / world.res) % 1.0 - 0.5)
    assert (frac > 0.01).any()


def test_ortho_georeference_puts_cameras_on_their_pixels(grid_world):
    root, cfg, _ = grid_world
    cameras = _rows(root / "cameras.csv")
    m_per_px = cfg.footprint_m / cfg.tile_px
    with rasterio.open(root / "ortho.tif") as ds:
        assert ds.count == 3 and ds.dtypes == ("uint8",) * 3 and ds.crs.is_projected
        assert ds.transform.b == 0 and ds.transform.d == 0 and ds.transform.e < 0  # north-up
        assert ds.width == ds.height
        half = ds.width * m_per_px / 2  # centred on the origin: the world's metre grid, m_per_px per pixel
        assert half >= 500 * math.sqrt(cfg.area_km2) + cfg.footprint_m / 2
        lat = np.array([cfg.lat] + [float(r["lat"]) for r in cameras])
        lon = np.array([cfg.lon] + [float(r["lon"]) for r in cameras])
        x = np.array([0.0] + [float(r["x_m"]) for r in cameras])
        y = np.array([0.0] + [float(r["y_m"]) for r in cameras])
        east, north = warp_points("EPSG:4326", ds.crs, lon, lat)
        inv = ~ds.transform
        east, north = np.array(east), np.array(north)
        cols, rows = inv.a * east + inv.b * north + inv.c, inv.d * east + inv.e * north + inv.f
    err_m = np.hypot(cols - (x + half) / m_per_px, rows - (half - y) / m_per_px) * m_per_px
    assert err_m.max() < 1.0, err_m
    assert abs(cols[0] - ds.width / 2) * m_per_px < 1.0 and abs(rows[0] - ds.height / 2) * m_per_px < 1.0


def test_index_build_tiles_cover_the_region(grid_world, tiling):
    root, cfg, _ = grid_world
    tiles = _rows(tiling / "tiles.csv")
    assert all((tiling / t["path"]).is_file() for t in tiles)
    tlat = np.array([float(t["lat"]) for t in tiles])
    tlon = np.array([float(t["lon"]) for t in tiles])
    tx, ty = latlon_to_metres(tlat, tlon, cfg.lat, cfg.lon)
    half_core = 500 * math.sqrt(cfg.area_km2)
    # the tiles' union covers the core square, where the cameras are
    assert tx.min() - TILE_M / 2 <= -half_core and tx.max() + TILE_M / 2 >= half_core
    assert ty.min() - TILE_M / 2 <= -half_core and ty.max() + TILE_M / 2 >= half_core
    assert len(tiles) == len({(t["grid_row"], t["grid_col"]) for t in tiles}) >= 25
    for cam in _rows(root / "cameras.csv"):
        d = haversine_m(float(cam["lat"]), float(cam["lon"]), tlat, tlon)
        assert d.min() <= STRIDE_M / math.sqrt(2) + 1.0, (cam["id"], d.min())


def test_grid_output_is_the_same_for_any_worker_count(grid_world, tmp_path):
    root, _, _ = grid_world
    other = tmp_path / "w2"
    generate_dataset(GenConfig(**GRID_CFG), str(other), workers=2, progress=False, log=lambda *a: None)
    for rel in ("ortho.tif", "queries.csv", "cameras.csv", "world.json", "streetview/000000.jpg",
                "streetview/000011.jpg"):
        assert (root / rel).read_bytes() == (other / rel).read_bytes(), rel


def test_grid_argument_errors(tmp_path, capsys):
    with pytest.raises(WorldgenError, match="--panoramas"):
        generate_dataset(GenConfig(**GRID_CFG, panoramas=3), str(tmp_path / "a"), progress=False, log=lambda *a: None)
    with pytest.raises(WorldgenError, match="--footprint-m"):
        generate_dataset(GenConfig(**{**GRID_CFG, "footprint_m": 300.0}), str(tmp_path / "b"), progress=False,
                         log=lambda *a: None)
    with pytest.raises(SystemExit):
        cli.main(["--seed", "1", "--area-km2", "0.04", "--layout", "diagonal", "--out", str(tmp_path / "c")])
    assert "--layout" in capsys.readouterr().err
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_offset_decay_bench_reads_a_grid_region(grid_world, capsys):
    """bench/offset_decay.py (issue 17's diagnosis) on this region: one row of R@1 per checkpoint, one value per
    offset and one against the random tiles; refused with a clear error where no camera has room."""
    import importlib.util

    root, cfg, _ = grid_world
    spec = importlib.util.spec_from_file_location("offset_decay", REPO / "bench" / "offset_decay.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    demo = str(REPO / "weights" / "l2ltr_tiny_demo.safetensors")
    assert bench.main(["--grid", str(root), "--checkpoint", demo, "--tile-m", "40", "--distractors", "20"]) == 0
    out = capsys.readouterr().out
    assert f"{cfg.pairs} cameras of" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {demo} |"))
    values = [float(v) for v in row.strip("| ").split(" | ")[1:]]
    assert len(values) == len(bench.OFFSETS_M) + 1 and all(0.0 <= v <= 100.0 for v in values)
    with pytest.raises(SystemExit, match="no camera of .* stands"):
        bench.main(["--grid", str(root), "--checkpoint", demo, "--tile-m", "400"])

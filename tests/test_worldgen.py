"""worldgen: geometry of the renderers, geo-referencing, output layout, determinism, CLI."""
from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

from worldgen.dataset import GenConfig, WorldgenError, generate_dataset
from worldgen.geo import haversine_m, latlon_to_metres, metres_to_latlon
from worldgen.render import EYE_HEIGHT, AerialLook, render_aerial, render_pano, sample_pano_look
from worldgen.world import C_ROAD, C_MARKING, add_box_building, blank_world, camera_positions, generate_world

H, W = 128, 512


def _neutral_aerial_look():
    return AerialLook(sun_az=math.pi, sun_el=math.radians(60), gain=np.ones(3, np.float32), brightness=1.0,
                      gamma=1.0, saturation=1.0, haze=0.0, haze_col=np.zeros(3, np.float32), shadow=0.5, noise=0.0)


@pytest.fixture(scope="module")
def north_box():
    """Flat world, camera at the origin, a 30 m box whose south face is 20 m north of it."""
    w = blank_world(half_world=160.0)
    add_box_building(w, 0.0, 25.0, hu=15.0, hv=5.0, height=30.0)
    return w


def _row_of(e):
    return (math.pi / 2 - e) / math.pi * H - 0.5


def test_pano_building_north_in_centre_columns_and_angular_height(north_box):
    img, depth = render_pano(north_box, 0.0, 0.0, H, W, rng=np.random.default_rng(0), return_depth=True)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    horizon_up = H // 2 - 2  # a row just above the horizon
    hit = np.isfinite(depth[horizon_up]) & (depth[horizon_up] < 60)
    cols = np.flatnonzero(hit)
    # centre column looks north; the box spans +-atan(15/20) = +-36.9 deg = +-52.4 columns
    assert hit[W // 2] and hit[W // 2 - 45] and hit[W // 2 + 45]
    assert not hit[: W // 2 - 60].any() and not hit[W // 2 + 60:].any()
    assert abs(cols.mean() - W / 2) < 2
    assert abs((cols.max() - cols.min() + 1) - 2 * math.degrees(math.atan(15 / 20)) / 360 * W) <= 3
    # angular height: the top edge of the facade in the centre column at atan((h - eye)/d)
    c = depth[:, W // 2]
    top_row = int(np.flatnonzero(np.isfinite(c))[0])
    e_top = math.atan((30.0 - EYE_HEIGHT) / 20.0)
    assert abs(top_row - math.ceil(_row_of(e_top))) <= 1
    facade_rows = np.flatnonzero(np.abs(c - 20.0) < 0.6)
    e_bot = math.atan(-EYE_HEIGHT / 20.0)
    assert abs(len(facade_rows) - (e_top - e_bot) / math.pi * H) <= 2
    # off-centre column: distance along the ray is d / cos(azimuth offset)
    j = W // 2 + 30
    off = 2 * math.pi * 30 / W
    assert depth[H // 2 - 2, j] == pytest.approx(20.0 / math.cos(off), abs=0.3)


def test_pano_heading_and_fov(north_box):
    look = sample_pano_look(np.random.default_rng(1))
    _, d90 = render_pano(north_box, 0.0, 0.0, H, W, look=look, heading_deg=90.0, return_depth=True)
    row = np.isfinite(d90[H // 2 - 2]) & (d90[H // 2 - 2] < 60)
    # centre now looks east, so north sits a quarter turn to the left
    assert abs(np.flatnonzero(row).mean() - W / 4) < 2
    img, dfov = render_pano(north_box, 0.0, 0.0, H, W, look=look, fov_deg=90.0, return_depth=True)
    assert img.shape == (H, W // 4, 3)
    assert (np.isfinite(dfov[H // 2 - 2]) & (dfov[H // 2 - 2] < 60)).mean() > 0.7


def test_polar_transform_of_tile_has_building_in_centre_columns(north_box):
    from model.preprocess import polar_transform

    tile = render_aerial(north_box, 0.0, 0.0, 256, 100.0, look=_neutral_aerial_look(), rng=np.random.default_rng(0))
    assert tile.shape == (256, 256, 3)
    # north-up: the red roof (20..30 m north = rows 51..77 above the centre) is above the centre
    red = (tile[..., 0].astype(int) - tile[..., 1]) > 60
    rows, cols = np.nonzero(red)
    assert rows.max() < 128 - 45 and rows.min() > 128 - 82 and abs(cols.mean() - 127.5) < 2
    pol = polar_transform(tile, H, W)
    pred = (pol[..., 0] - pol[..., 1]) > 60
    pcols = np.flatnonzero(pred.any(axis=0))
    assert pred[:, W // 2].any() and abs(pcols.mean() - W / 2) < 2
    assert not pred[:, : W // 2 - 60].any() and not pred[:, W // 2 + 60:].any()
    # the roof spans radii 20..30 m: polar rows H-1-r*H/(S/2) with r in px
    prow = np.flatnonzero(pred[:, W // 2])
    r_px = lambda m: m / 100.0 * 256
    assert abs(prow.min() - (H - 1 - r_px(30) * H / 128)) <= 2
    assert abs(prow.max() - (H - 1 - r_px(20) * H / 128)) <= 2
    # the same azimuth range as in the panorama
    _, depth = render_pano(north_box, 0.0, 0.0, H, W, rng=np.random.default_rng(0), return_depth=True)
    pano_cols = set(np.flatnonzero(np.isfinite(depth[H // 2 - 2]) & (depth[H // 2 - 2] < 60)).tolist())
    iou = len(pano_cols & set(pcols.tolist())) / len(pano_cols | set(pcols.tolist()))
    assert iou > 0.9


def test_geo_roundtrip_and_haversine():
    for lat0 in (0.0, 47.3769, -35.28, 70.0):
        x = np.array([0.0, 1000.0, -2500.0, 1234.5])
        y = np.array([0.0, -800.0, 2500.0, 3000.0])
        lat, lon = metres_to_latlon(x, y, lat0, 8.5)
        x2, y2 = latlon_to_metres(lat, lon, lat0, 8.5)
        np.testing.assert_allclose(x2, x, atol=1e-6)
        np.testing.assert_allclose(y2, y, atol=1e-6)
        d_grid = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
        d_hav = haversine_m(lat[:, None], lon[:, None], lat[None], lon[None])
        np.testing.assert_allclose(d_hav, d_grid, atol=0.01)


@pytest.fixture(scope="module")
def small_world():
    return generate_world(11, 0.08)


def test_cameras_on_roads_with_spacing(small_world):
    cams = camera_positions(small_world, 20.0, np.random.default_rng(0))
    assert len(cams) > 20
    r, c = small_world.px_index(cams[:, 0], cams[:, 1])
    assert np.isin(small_world.cls[r, c], [C_ROAD, C_MARKING]).all()
    d = np.hypot(cams[:, None, 0] - cams[None, :, 0], cams[:, None, 1] - cams[None, :, 1])
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 20.0
    assert (np.abs(cams) <= small_world.half_core + 1e-6).all()


def test_world_has_varied_content(small_world):
    w = small_world
    assert len(w.buildings["cx"]) > 10 and len(w.trees["x"]) > 10
    h = w.buildings["eave"][1:] + w.buildings["rise"][1:]
    assert h.min() >= 3.0 and h.max() <= 40.0 + 1e-3
    # roof and facade colours are related but never identical
    assert not np.allclose(w.buildings["roof_col"][1:], w.buildings["facade_col"][1:])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("wg") / "world"
    cfg = GenConfig(seed=5, area_km2=0.05, pairs=24, val_fraction=0.25, min_spacing_m=15.0)
    meta = generate_dataset(cfg, str(root), workers=1, progress=False, log=lambda *a: None)
    return root, cfg, meta


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_output_layout(dataset):
    root, cfg, meta = dataset
    assert sorted(os.listdir(root)) == ["bingmap", "cameras.csv", "queries.csv", "splits", "streetview", "tiles.csv", "world.json"]
    tr, va = _csv(root / "splits/train.csv"), _csv(root / "splits/val.csv")
    assert tr[0] == va[0] == ["id", "aerial", "ground", "lat", "lon"]
    ids = sorted(r[0] for r in tr[1:] + va[1:])
    assert ids == [f"{i:06d}" for i in range(24)]
    assert 3 <= len(va) - 1 <= 12
    for r in tr[1:3]:
        assert r[1] == f"bingmap/{r[0]}.png" and r[2] == f"streetview/{r[0]}.jpg"
        assert Image.open(root / r[1]).size == (256, 256) and Image.open(root / r[1]).format == "PNG"
        assert Image.open(root / r[2]).size == (512, 128) and Image.open(root / r[2]).format == "JPEG"
    tiles = _csv(root / "tiles.csv")
    assert tiles[0] == ["tile_id", "lat", "lon", "path"] and len(tiles) == 25
    assert all((root / t[3]).is_file() for t in tiles[1:])
    q = _csv(root / "queries.csv")
    assert q[0] == ["query_id", "path", "lat", "lon", "tile_id"]
    assert all(r[0] == r[4] and (root / r[1]).is_file() for r in q[1:])
    m = json.loads((root / "world.json").read_text())
    assert m["seed"] == 5 and m["tile_px"] == 256 and m["tile_footprint_m"] == 100.0
    assert m["pano"]["height"] == 128 and m["pano"]["width"] == 512 and m["counts"]["pairs"] == 24
    assert m["origin"] == {"lat": cfg.lat, "lon": cfg.lon} and m["version"] >= 1
    assert not [p for p in os.listdir(root.parent) if ".tmp-" in p]


def test_tile_centres_match_metre_grid(dataset):
    root, cfg, _ = dataset
    rows = _csv(root / "cameras.csv")[1:]
    x = np.array([float(r[1]) for r in rows])
    y = np.array([float(r[2]) for r in rows])
    lat = np.array([float(r[3]) for r in rows])
    lon = np.array([float(r[4]) for r in rows])
    d_grid = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    d_hav = haversine_m(lat[:, None], lon[:, None], lat[None], lon[None])
    assert np.abs(d_hav - d_grid).max() < 0.05  # 8 decimals of a degree ~ 1 mm
    # and against the origin
    d0 = haversine_m(cfg.lat, cfg.lon, lat, lon)
    np.testing.assert_allclose(d0, np.hypot(x, y), atol=0.05)
    # tiles.csv and the split files carry the same coordinates
    tiles = {r[0]: (float(r[1]), float(r[2])) for r in _csv(root / "tiles.csv")[1:]}
    for r in rows:
        assert tiles[r[0]] == (float(r[3]), float(r[4]))


def test_dataset_reader_reads_worldgen_output(dataset):
    from model.datasets import read_synthetic

    root, _, _ = dataset
    recs = read_synthetic(root, "all")
    assert len(recs) == 24 and all(r.lat is not None for r in recs)


def _tree_bytes(root):
    out = {}
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_byte_identical_output_for_any_worker_count(dataset, tmp_path):
    root, cfg, _ = dataset
    again = tmp_path / "again"
    generate_dataset(GenConfig(**{**cfg.__dict__}), str(again), workers=2, progress=False, log=lambda *a: None)
    a, b = _tree_bytes(root), _tree_bytes(again)
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a)


def test_panorama_subset_writes_the_files_of_the_full_run(dataset, tmp_path):
    """--panoramas N: the same world, every tile and the first N panoramas byte for byte; the pair
    lists name only pairs whose panorama exists."""
    from worldgen.cli import main

    root, cfg, _ = dataset
    sub = tmp_path / "sub"
    assert main(["--seed", str(cfg.seed), "--area-km2", str(cfg.area_km2), "--pairs", str(cfg.pairs),
                 "--val-fraction", str(cfg.val_fraction), "--min-spacing", str(cfg.min_spacing_m),
                 "--panoramas", "5", "--workers", "2", "--out", str(sub), "--quiet"]) == 0
    full, part = _tree_bytes(root), _tree_bytes(sub)
    kept = [f"streetview/{i:06d}.jpg" for i in range(5)]
    assert sorted(k for k in part if k.startswith("streetview/")) == kept
    assert sorted(k for k in part if k.startswith("bingmap/")) == sorted(k for k in full if k.startswith("bingmap/"))
    for rel in [k for k in part if k.startswith(("bingmap/", "streetview/"))] + ["tiles.csv", "cameras.csv"]:
        assert part[rel] == full[rel], f"{rel} differs from the full run's"

    def rows(tree, rel):
        return tree[rel].decode().splitlines()

    assert rows(part, "queries.csv") == rows(full, "queries.csv")[:6]  # header + the first 5
    for rel in ("splits/train.csv", "splits/val.csv"):
        with_pano = [r for r in rows(full, rel)[1:] if int(r.split(",")[0]) < 5]
        assert rows(part, rel) == rows(full, rel)[:1] + with_pano
    meta_full, meta_part = json.loads(full["world.json"]), json.loads(part["world.json"])
    assert meta_part["config"].pop("panoramas") == 5 and meta_part["counts"].pop("ground_images") == 5
    assert "panoramas" not in meta_full["config"] and "ground_images" not in meta_full["counts"]
    assert meta_part == meta_full

    # more panoramas than positions: every one, and the lists are complete
    assert main(["--seed", str(cfg.seed), "--area-km2", str(cfg.area_km2), "--pairs", str(cfg.pairs),
                 "--val-fraction", str(cfg.val_fraction), "--min-spacing", str(cfg.min_spacing_m),
                 "--panoramas", "1000", "--out", str(tmp_path / "all"), "--quiet"]) == 0
    every = _tree_bytes(tmp_path / "all")
    assert {k: v for k, v in every.items() if k != "world.json"} == {k: v for k, v in full.items() if k != "world.json"}
    assert json.loads(every["world.json"])["counts"]["ground_images"] == cfg.pairs


# sha256 of the text files of the `dataset` world as worldgen wrote them before --camera existed
# (main at f0fa1a6; all 54 files were then identical, images included). Image bytes are not pinned
# here, as numpy's vectorised sin/exp may differ by an ulp between CPUs; the recipe that renders a
# pair is pinned below instead.
DEFAULT_WORLD_TEXT_SHA256 = {
    "cameras.csv": "19a3a63e9d3afe19394a99ee96067a3a3ccfb3dc85118e6c9a5f61564ce6f4cf",
    "queries.csv": "0d4dcfde4d976b91e80151f17dea84c475f85ba12c28719e942ce81fd6e0e94e",
    "tiles.csv": "816fcd09b12dace8e8b6894b3ed4084fcede1fbcb8acc013e4c21e22d72ed895",
    "world.json": "c501d08ab871eac807a12e89544d8944563ffec2eeccca1bbea826b71704963d",
    "splits/train.csv": "5fe9882cb2536a54b546e4ab74f0026572957152e9dba848fbe46a5af555abe6",
    "splits/val.csv": "5f0d3dcd02510d3bf84b96d4f38ef5db682a7ced599936909f21074470eb2acb",
}


def test_default_output_is_what_it_was(dataset):
    import hashlib

    from worldgen.dataset import choose_cameras, encode_jpeg, encode_png, pair_rng
    from worldgen.render import sample_aerial_look

    root, cfg, _ = dataset
    for rel, digest in DEFAULT_WORLD_TEXT_SHA256.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, f"{rel} changed for an old seed"
    world = generate_world(cfg.seed, cfg.area_km2, cfg.lat, cfg.lon, res=cfg.world_res_m)
    cams = choose_cameras(world, cfg)
    for i in (0, 17):
        rng = pair_rng(cfg.seed, i)
        alook = sample_aerial_look(rng, cfg.lat)
        plook = sample_pano_look(rng)
        tile = render_aerial(world, *cams[i], cfg.tile_px, cfg.footprint_m, alook,
                             np.random.default_rng([cfg.seed, 8, i]))
        pano = render_pano(world, *cams[i], cfg.pano_height, cfg.pano_width, plook,
                           np.random.default_rng([cfg.seed, 9, i]))
        assert (root / f"bingmap/{i:06d}.png").read_bytes() == encode_png(tile, cfg.png_compress)
        assert (root / f"streetview/{i:06d}.jpg").read_bytes() == encode_jpeg(pano, cfg.jpeg_quality)


def test_cli_errors_and_help(tmp_path, capsys):
    from worldgen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--area-km2" in capsys.readouterr().out
    assert main(["--seed", "1", "--area-km2", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "--area-km2 must be" in capsys.readouterr().err
    assert main(["--seed", "1", "--area-km2", "0.05", "--out", str(tmp_path / "x"), "--tile-px", "7"]) == 2
    assert "--tile-px" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["--seed", "1", "--area-km2", "0.05", "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--seed", "1", "--area-km2", "0.05", "--out", str(tmp_path / "nope" / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--seed", "1", "--area-km2", "0.03", "--pairs", "5000", "--out", str(tmp_path / "y"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "camera positions" in err
    fit = int(re.search(r"only (\d+) camera positions", err).group(1))
    assert main(["--seed", "1", "--area-km2", "0.03", "--pairs", str(fit + 1), "--out", str(tmp_path / "y"), "--quiet"]) == 2
    suggested = float(re.search(r"raise --area-km2 \(about ([0-9.e+-]+) km\^2\)", capsys.readouterr().err).group(1))
    assert suggested > 0.03  # one camera short: a larger area, not the one given again
    assert main(["--seed", "1", "--area-km2", "0.03", "--panoramas", "-1", "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "--panoramas must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_output_that_can_not_be_written_is_one_line(tmp_path, capsys):
    from worldgen.cli import main

    too_long = tmp_path / ("w" * 300)
    assert main(["--seed", "1", "--area-km2", "0.03", "--pairs", "4", "--out", str(too_long), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output directory {too_long}: can not write ") and err.count("\n") == 1
    assert "File name too long" in err
    assert os.listdir(tmp_path) == []


def test_a_failed_write_midway_is_one_line(tmp_path, capsys, monkeypatch):
    import worldgen.dataset as D
    from worldgen.cli import main

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(D, "generate_dataset", full_disk)
    assert main(["--seed", "1", "--area-km2", "0.03", "--out", str(tmp_path / "w"), "--quiet"]) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    import worldgen.dataset as D

    calls = {"n": 0}
    real = D.render_pair

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(D, "render_pair", boom)
    with pytest.raises(RuntimeError):
        generate_dataset(GenConfig(seed=2, area_km2=0.03, pairs=8), str(tmp_path / "out"), progress=False,
                         log=lambda *a: None)
    assert os.listdir(tmp_path) == []


def _pid_of_a_finished_process() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_leftovers_of_killed_runs_are_removed_and_a_running_one_kept(tmp_path):
    """A run holds .OUT.run-PID.lock while it writes (model.atomic.staged_directory); what runs that are
    gone left is removed, whatever their pid is now on this host (another container's or host's run)."""
    import fcntl

    from worldgen.cli import main

    out = tmp_path / "w"
    out.mkdir()  # the data set a killed --overwrite run was replacing: still there
    dead = _pid_of_a_finished_process()
    (tmp_path / f".w.tmp-{dead}" / "streetview").mkdir(parents=True)
    (tmp_path / f".w.old-{dead}").write_text("the file an --overwrite run replaced before it was killed")
    (tmp_path / f".w.run-{dead}.lock").touch()
    running = tmp_path / f".w.tmp-{os.getpid()}0"  # a live run's, whatever its pid: it holds its lock
    running.mkdir()
    (tmp_path / f".other.tmp-{dead}").mkdir()  # another output's: not ours to judge
    with open(tmp_path / f".w.run-{os.getpid()}0.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert main(["--seed", "3", "--area-km2", "0.03", "--pairs", "4", "--out", str(out), "--quiet",
                     "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([f".other.tmp-{dead}", running.name, lock.name.split("/")[-1], "w"])
    assert (out / "tiles.csv").is_file()


def test_a_run_killed_while_it_replaced_the_output_has_the_previous_one_put_back(tmp_path, capsys):
    from worldgen.cli import main

    dead = _pid_of_a_finished_process()
    previous = tmp_path / f".w.old-{dead}"  # renamed away; the new one never renamed into place
    previous.mkdir()
    (previous / "tiles.csv").write_text("tile_id\n")
    (tmp_path / f".w.tmp-{dead}").mkdir()
    assert main(["--seed", "3", "--area-km2", "0.03", "--pairs", "4", "--out", str(tmp_path / "w"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err  # the previous data set, back: not replaced unasked
    assert sorted(os.listdir(tmp_path)) == ["w"] and (tmp_path / "w" / "tiles.csv").read_text() == "tile_id\n"


def test_overwrite_replaces_a_file_and_leaves_nothing_beside_it(tmp_path):
    from worldgen.cli import main

    out = tmp_path / "w"
    out.write_text("a file where the data set goes")
    assert main(["--seed", "3", "--area-km2", "0.03", "--pairs", "4", "--out", str(out), "--quiet",
                 "--overwrite"]) == 0
    assert os.listdir(tmp_path) == ["w"] and (out / "tiles.csv").is_file()


def test_cli_overwrite_and_preview(tmp_path):
    from worldgen.cli import main
    from worldgen.preview import main as preview

    out = tmp_path / "w"
    args = ["--seed", "3", "--area-km2", "0.03", "--pairs", "6", "--out", str(out), "--quiet"]
    assert main(args) == 0
    first = (out / "tiles.csv").read_bytes()
    assert main(args + ["--overwrite"]) == 0
    assert (out / "tiles.csv").read_bytes() == first
    sheet = tmp_path / "sheet.png"
    assert preview([str(out), "--out", str(sheet), "--n", "3"]) == 0
    im = Image.open(sheet)
    assert im.size[0] > 600 and im.size[1] > 300

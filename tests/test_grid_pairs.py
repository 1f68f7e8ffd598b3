"""scripts/grid_pairs.py: training pairs of a grid region, each camera with its nearest tile."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ship_support import script_module

DEGREE = 111_195.0  # metres per degree of latitude


def _region(root: Path, camera_lats: list[str] | None = None, camera_header: str = "query_id,path,lat,lon"):
    """A world with 4 tiles every 50 m north and 4 cameras: (world, tiles) directories."""
    world, tiles = root / "world", root / "world" / "tiles"
    (world / "streetview").mkdir(parents=True)
    (tiles / "images").mkdir(parents=True)
    tile_rows = [(f"t{i}", f"images/t{i}.jpg", 47.0 + 50 * i / DEGREE, 8.5) for i in range(4)]
    lats = camera_lats or [str(47.0 + north / DEGREE) for north in (10, 40, 140, 70)]
    camera_rows = [(f"{i:06d}", f"streetview/{i:06d}.jpg", lat, 8.5) for i, lat in enumerate(lats)]
    for name, rows, header in (("tiles/tiles.csv", tile_rows, "tile_id,path,lat,lon"),
                               ("queries.csv", camera_rows, camera_header)):
        (world / name).write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
        for row in rows:
            Image.new("RGB", (8, 8)).save((tiles if name.startswith("tiles") else world) / row[1])
    return world, tiles


def test_each_camera_is_paired_with_its_nearest_tile(tmp_path):
    """A data set model.train reads, with each tile's centre for --semi-positives."""
    from model.datasets import read_synthetic

    world, tiles = _region(tmp_path)
    grid_pairs = script_module("scripts/grid_pairs.py")
    assert grid_pairs.main(["--world", str(world), "--tiles", str(tiles), "--out", str(tmp_path / "pairs"),
                            "--val", "0"]) == 0
    train_records = read_synthetic(tmp_path / "pairs", "train")
    assert [Path(r.aerial_path).name for r in train_records] == ["t0.jpg", "t1.jpg", "t3.jpg", "t1.jpg"]
    assert [round((r.tile_lat - r.lat) * DEGREE) for r in train_records] == [-10, 10, 10, -20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs", "world"]  # no temporary directory left


def test_the_held_out_cameras_are_a_band_whose_tiles_no_training_camera_shares(tmp_path):
    """The easternmost cameras are held out; a training camera whose tile overlaps one of theirs is left out
    (the cameras' order is random: the last ones were interleaved with the training ones, on the same tiles)."""
    from model.datasets import read_synthetic

    world, tiles = _region(tmp_path)  # tiles every 50 m north; cameras 10, 40, 140, 70 m north
    lines = (world / "queries.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",8.5", ",8.5004")  # the camera 140 m north, 30 m east of the others
    (world / "queries.csv").write_text("\n".join(lines) + "\n")
    (tiles / "tiling.json").write_text('{"format": "index_build-tiling/1", "tile_m": 100, "stride_m": 50}')
    grid_pairs = script_module("scripts/grid_pairs.py")
    assert grid_pairs.main(["--world", str(world), "--tiles", str(tiles), "--out", str(tmp_path / "pairs"),
                            "--val", "1"]) == 0
    assert [Path(r.aerial_path).name for r in read_synthetic(tmp_path / "pairs", "val")] == ["t3.jpg"]
    # t3 (150 m north) overlaps t2 (100 m), which no camera is on; t0 and t1 are 100 m and more from it
    assert [Path(r.aerial_path).name for r in read_synthetic(tmp_path / "pairs", "train")] == \
        ["t0.jpg", "t1.jpg", "t1.jpg"]
    assert grid_pairs.main(["--world", str(world), "--tiles", str(tiles), "--out", str(tmp_path / "wide"),
                            "--val", "1", "--tile-m", "120"]) == 0  # tiles of 120 m: t3 overlaps t1 too
    assert [Path(r.aerial_path).name for r in read_synthetic(tmp_path / "wide", "train")] == ["t0.jpg"]
    splits = [line.split(",")[-1] for line in (tmp_path / "wide" / "offsets.csv").read_text().splitlines()[1:]]
    assert splits == ["train", "buffer", "val", "buffer"]


@pytest.mark.parametrize("lats,header,message", [
    (["47.0", "47.0001", "north", "47.0"], "query_id,path,lat,lon", "queries.csv:4: lat/lon must be degrees"),
    (["47.0", "nan", "47.0", "47.0"], "query_id,path,lat,lon", "queries.csv:3: lat/lon must be degrees"),
    (None, "query_id,path,latitude,lon", "queries.csv: no column lat"),
])
def test_a_bad_catalogue_is_named_by_file_and_line_and_nothing_is_written(tmp_path, lats, header, message):
    world, tiles = _region(tmp_path, lats, header)
    grid_pairs = script_module("scripts/grid_pairs.py")
    with pytest.raises(SystemExit, match=message):
        grid_pairs.main(["--world", str(world), "--tiles", str(tiles), "--out", str(tmp_path / "pairs"), "--val", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_a_hold_out_that_leaves_no_training_pair_is_refused(tmp_path):
    world, tiles = _region(tmp_path)
    grid_pairs = script_module("scripts/grid_pairs.py")
    with pytest.raises(SystemExit, match="--val 1 leaves no training pair \\(the other 3 cameras' tiles overlap"):
        grid_pairs.main(["--world", str(world), "--tiles", str(tiles), "--out", str(tmp_path / "pairs"),
                         "--val", "1", "--tile-m", "500"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]

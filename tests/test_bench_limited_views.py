"""bench/limited_views.py: the model card's limited-view tables from one folder of model.evaluate results."""
from __future__ import annotations

import json

import pytest

from ship_support import script_module


def _module():
    return script_module("bench/limited_views.py")


def test_every_cell_has_its_evaluate_arguments():
    lv = _module()
    cells = dict(lv.cells())
    assert len(cells) == 4 * 4 + 5 * 4
    assert cells["360_known_descriptor"] == ["--fov", "360", "--heading", "known"]
    assert cells["70_unknown_head"] == ["--fov", "70", "--heading", "unknown", "--method", "head"]
    assert cells["photos_unknown_rerank"] == ["--fov", "90", "--heading", "unknown", "--queries", "400",
                                              "--method", "rerank", "--photos", "{photos}"]
    assert cells["photos_tilt_known_descriptor"] == ["--fov", "90", "--heading", "known", "--queries", "400",
                                                     "--photos", "{photos}", "--photo-tilt"]
    assert "--photos" not in cells["crops_known_rerank"] and "--photo-tilt" not in cells["photos_known_rerank"]
    assert cells["photos_est_unknown_rerank"][-4:] == ["--photos", "{photos}", "--photo-tilt", "estimated"]
    assert cells["crops_paired_known_rerank"] == cells["crops_known_rerank"] + ["--paired-with", "{photos}"]
    assert not any("--tile-phases" in args for args in cells.values())
    phased = dict(lv.cells(4))  # the head meets the tiles at 4 phases (a known heading too); descriptors do not
    assert phased["90_unknown_rerank"] == cells["90_unknown_rerank"] + ["--tile-phases", "4"]
    assert phased["photos_unknown_head"][-2:] == ["--tile-phases", "4"]
    assert phased["90_known_rerank"] == cells["90_known_rerank"] + ["--tile-phases", "4"]
    assert phased["90_known_descriptor"] == cells["90_known_descriptor"]


def test_tables_ratios_and_gaps(tmp_path, capsys):
    lv = _module()
    names = [name for name, _ in lv.cells()]
    for i, name in enumerate(names):
        r1 = {"360_known_descriptor": 0.5, "360_known_rerank": 0.75, "180_unknown_rerank": 0.3,
              "90_unknown_rerank": 0.22475,  # 0.29967 of the re-ranked 0.75: short of 0.30
              "photos_known_rerank": 0.06,
              "photos_tilt_known_rerank": 0.1, "crops_known_rerank": 0.125,
              "crops_paired_known_rerank": 0.0875}.get(name, 0.01 * (i + 1))
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"r1": r1, "r5": 0.2, "r10": 0.3, "r1pct": 0.4,
             "heading_error_median_deg": 4.5 if "unknown" in name else None}))
    (tmp_path / "360_unknown_rerank.json").unlink()
    assert lv.main(["ckpt", "--out", str(tmp_path), "--tables-only"]) == 1  # a cell missing: named, no table
    assert "360_unknown_rerank" in capsys.readouterr().err
    (tmp_path / "360_unknown_rerank.json").write_text(json.dumps({"r1": 0.6, "r5": 0.8, "r10": 0.9, "r1pct": 0.9,
                                                                  "heading_error_median_deg": 2.0}))
    assert lv.main(["ckpt", "--out", str(tmp_path), "--tables-only"]) == 0
    text = (tmp_path / "tables.md").read_text()
    # each R@1 over the known 360 R@1 of its own ranking: re-ranked rows over the re-ranked one (75.00)
    assert "| 180 | unknown | rerank | 30.00 | 20.00 | 30.00 | 40.00 | 0.40 | 4.50 deg |" in text
    head = lv.json.loads((tmp_path / "180_unknown_head.json").read_text())["r1"]
    assert f"| 180 | unknown | head | {100 * head:.2f} | 20.00 | 30.00 | 40.00 | {head / 0.5:.2f} | 4.50 deg |" in text
    assert "| 360 | known | descriptor | 50.00 |" in text
    assert "x known 360 re-ranked R@1 (75.00): 360 0.800, 180 0.400, 90 0.299;" in text  # cut, not rounded to 0.300
    assert "| 90 | unknown | rerank | 22.48 | 20.00 | 30.00 | 40.00 | 0.29 | 4.50 deg |" in text
    assert "x known 360 descriptor R@1 (50.00): 360 1.200, 180 0.600" in text
    assert "photos trail crops by (points): placed level known 6.50 / unknown" in text
    assert "; tilt given known 2.50 / unknown" in text and "| photos, tilt given | known | rerank | 10.00 |" in text
    assert "pair by pair, by: placed level known 2.75 / unknown" in text and "tilt given known -1.25 / unknown" in text
    assert "| crops at the photos' headings | known | rerank | 8.75 |" in text


def test_cells_of_another_checkpoint_or_region_are_not_reused(tmp_path):
    from test_index_build_support import micro_checkpoint

    lv = _module()
    ckpt = tmp_path / "micro.safetensors"
    fingerprint = micro_checkpoint(ckpt)
    world = tmp_path / "world"
    cell = {"checkpoint": str(ckpt), "fingerprint": fingerprint, "data": str(world), "r1": 0.5}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "360_known_descriptor.json").write_text(json.dumps(cell))
    lv.check_reused_cells(ckpt, world, tmp_path / "out")  # this checkpoint's, this region's: reused
    for other in ({"fingerprint": "0123456789abcdef"}, {"data": str(tmp_path / "elsewhere")}):
        (tmp_path / "out" / "360_known_descriptor.json").write_text(json.dumps({**cell, **other}))
        with pytest.raises(SystemExit, match="360_known_descriptor.json holds .*: use another --out"):
            lv.check_reused_cells(ckpt, world, tmp_path / "out")
    unknown = {**cell, "heading": "unknown", "tile_phases": 4, "view_phases": 4}  # nor those of other tile phases
    (tmp_path / "out" / "360_known_descriptor.json").unlink()
    (tmp_path / "out" / "90_unknown_rerank.json").write_text(json.dumps(unknown))
    lv.check_reused_cells(ckpt, world, tmp_path / "out", tile_phases=4)
    with pytest.raises(SystemExit, match="met the tiles at 4 phase"):
        lv.check_reused_cells(ckpt, world, tmp_path / "out")
    del unknown["view_phases"]  # measured before the views met the tiles at their phases
    (tmp_path / "out" / "90_unknown_rerank.json").write_text(json.dumps(unknown))
    with pytest.raises(SystemExit, match="encoded each view at 1 phase"):
        lv.check_reused_cells(ckpt, world, tmp_path / "out", tile_phases=4)
    (tmp_path / "out" / "90_unknown_rerank.json").unlink()
    known = {**cell, "heading": "known", "rerank": {"candidates": 200, "weight": 0.9, "heading_within_deg": 10.0}}
    (tmp_path / "out" / "90_known_rerank.json").write_text(json.dumps(known))
    with pytest.raises(SystemExit, match="90_known_rerank.json re-ranked 200 candidates, not the 800"):
        lv.check_reused_cells(ckpt, world, tmp_path / "out")  # measured before a given heading took 800
    known["rerank"]["candidates"] = 800
    (tmp_path / "out" / "90_known_rerank.json").write_text(json.dumps(known))
    lv.check_reused_cells(ckpt, world, tmp_path / "out")  # aligned within HEADING_WITHIN_DEG, as now
    for before, said in ((None, "all round"), (180.0, "within 180 degrees")):  # measured before the heading took part
        known["rerank"].update(heading_within_deg=before, candidates=800 if before else 200)
        (tmp_path / "out" / "90_known_rerank.json").write_text(json.dumps(known))
        with pytest.raises(SystemExit, match=f"90_known_rerank.json aligned views of known heading {said}"):
            lv.check_reused_cells(ckpt, world, tmp_path / "out")
    known["rerank"]["heading_within_deg"] = 10.0  # a known heading re-ranked at 1 phase is not reused at 4
    (tmp_path / "out" / "90_known_rerank.json").write_text(json.dumps(known))
    with pytest.raises(SystemExit, match="met the tiles at 1 phase"):
        lv.check_reused_cells(ckpt, world, tmp_path / "out", tile_phases=4)


def test_a_missing_region_is_made_beside_folders_that_do_not_exist_yet(tmp_path, monkeypatch):
    """A fresh clone has no data/: the region's parent is made, worldgen is given the absolute path (it
    runs in the repository, not in the caller's folder), and its failure is one line, not a traceback."""
    lv = _module()
    ran = []

    class Done:
        returncode = 0

    def run(command, cwd):
        ran.append(command)
        return Done()

    monkeypatch.setattr(lv.subprocess, "run", run)
    monkeypatch.chdir(tmp_path)
    lv.ensure_world(lv.Path("data/eval_world"), ["--seed", "202"])
    assert (tmp_path / "data").is_dir()
    assert ran[0][ran[0].index("--out") + 1] == str(tmp_path / "data" / "eval_world")
    Done.returncode = 2
    with pytest.raises(SystemExit, match="worldgen failed making data/other"):
        lv.ensure_world(lv.Path("data/other"), ["--seed", "202"])
    (tmp_path / "data" / "made").mkdir()
    (tmp_path / "data" / "made" / "world.json").write_text("{}")
    lv.ensure_world(lv.Path("data/made"), ["--seed", "202"])  # there already: not made again
    assert len(ran) == 2

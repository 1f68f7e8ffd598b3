"""index_build as a newcomer meets it: one-line errors for bad inputs, no lock left behind, one
numbering of catalogue rows, what --quiet and --json print, --help for every option."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

pytest.importorskip("faiss")

from index_build import artifact as artifact_module  # noqa: E402
from index_build.artifact import ArtifactError, ArtifactLayout  # noqa: E402
from index_build.build import BuildOptions, run_build  # noqa: E402
from index_build.cli import main  # noqa: E402
from index_build.encode_common import BadImagesError  # noqa: E402
from index_build.sources import CatalogueError, CatalogueLines, read_catalogue_csv  # noqa: E402
from test_index_build_support import (PYTHON, REPO, make_catalogue, make_tile, micro_checkpoint,  # noqa: E402
                                      single_threaded, subprocess_env)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "micro.safetensors"
    micro_checkpoint(path, seed=0)
    return str(path)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_catalogue(tmp_path_factory.mktemp("world"), 6, prefix="c")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *names: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("index_build: error: ")
    for name in names:
        assert name in lines[0], (name, lines[0])


def nothing_left_beside(out) -> bool:
    return not os.path.lexists(out) and not os.path.lexists(f"{out}.versions")


# ----------------------------------------------------------------------------- bad inputs: one line each

def test_missing_catalogue_is_one_line_from_the_command_line(tmp_path, ckpt):
    out = tmp_path / "x" / "idx"
    proc = subprocess.run([PYTHON, "-m", "index_build", "build", "--catalog", str(tmp_path / "nonexistent.csv"),
                           "--checkpoint", ckpt, "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "nonexistent.csv", "does not exist")
    assert proc.stdout == ""
    assert not (tmp_path / "x").exists()  # failed before the lock: not even the parent of --out was made


def test_garbage_safetensors_names_what_is_wrong(tmp_path, capsys, catalogue):
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(bytes(range(256)) * 20)
    out = tmp_path / "idx"
    code, _, err = run_cli(capsys, "build", "--catalog", str(catalogue), "--checkpoint", str(garbage),
                           "--out", str(out))
    assert_one_line_error(code, err, str(garbage), "not a valid .safetensors file")
    assert "unknown checkpoint format" not in err
    assert nothing_left_beside(out)


def test_directory_as_checkpoint_says_so(tmp_path, capsys, catalogue, ckpt):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "best.safetensors").write_bytes(open(ckpt, "rb").read())
    out = tmp_path / "idx"
    code, _, err = run_cli(capsys, "build", "--catalog", str(catalogue), "--checkpoint", str(run_dir),
                           "--out", str(out))
    assert_one_line_error(code, err, str(run_dir), "is a directory", "best.safetensors")
    assert "does not exist" not in err
    assert nothing_left_beside(out)


def test_pth_without_model_config_asks_for_it(tmp_path, capsys, catalogue):
    import torch

    pth = tmp_path / "model_checkpoint.pth"
    torch.save({"model_grd": {}, "model_sat": {}}, pth)
    out = tmp_path / "idx"
    code, _, err = run_cli(capsys, "add", "--catalog", str(catalogue), "--checkpoint", str(pth), "--out", str(out))
    assert_one_line_error(code, err, str(pth), "--model-config")
    code, _, err = run_cli(capsys, "build", "--catalog", str(catalogue), "--checkpoint", str(pth),
                           "--model-config", "no-such-config", "--out", str(out))
    assert_one_line_error(code, err, "no-such-config")
    assert nothing_left_beside(out)


def test_catalogue_that_is_not_text(tmp_path, capsys, ckpt):
    binary = tmp_path / "tiles.xlsx"
    binary.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb1\xe3\xff\x9c" * 64)
    out = tmp_path / "idx"
    code, _, err = run_cli(capsys, "build", "--catalog", str(binary), "--checkpoint", ckpt, "--out", str(out))
    assert code == 2 and "Traceback" not in err
    assert "line 1: not UTF-8 text" in err


# ----------------------------------------------------------------------------- the lock

def test_failed_builds_leave_no_lock(tmp_path, capsys, ckpt, catalogue):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("tile_id,lat,lon,path\n")
    out = tmp_path / "idx"
    code, _, err = run_cli(capsys, "build", "--catalog", str(header_only), "--checkpoint", ckpt, "--out", str(out))
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"index_build: error: catalogue csv:{header_only} has no tiles; nothing to index"
    assert nothing_left_beside(out)  # the lock and the versions directory it made are gone

    invalid = tmp_path / "invalid.csv"
    invalid.write_text("tile_id,lat,lon,path\na,95,8,nope.png\n")
    code, _, err = run_cli(capsys, "build", "--catalog", str(invalid), "--checkpoint", ckpt, "--out", str(out))
    assert code == 2 and "line 2" in err
    assert sorted(os.listdir(f"{out}.versions")) == ["validation-report.txt"]

    code, _, _ = run_cli(capsys, "build", "--catalog", str(catalogue), "--checkpoint", ckpt, "--out", str(out),
                         "--quiet", "--workers", "0", "--device", "cpu")
    assert code == 0
    assert not os.path.exists(os.path.join(f"{out}.versions", ".lock"))


def test_lock_stays_exclusive_when_its_file_goes_away(tmp_path, monkeypatch):
    """A writer that opened the lock file just before the holder removed it must not believe it
    holds the lock: it takes a fresh one, and a third writer is then refused."""
    first, second, third = (ArtifactLayout(str(tmp_path / "idx")) for _ in range(3))
    with contextlib.ExitStack() as holder:
        holder.enter_context(first.lock())
        real_flock = artifact_module.fcntl.flock
        calls = []

        def flock_after_the_holder_left(fd, op):
            if not calls:  # between the second writer's open() and its flock(): the first one finishes
                holder.close()
            calls.append(fd)
            return real_flock(fd, op)

        monkeypatch.setattr(artifact_module.fcntl, "flock", flock_after_the_holder_left)
        with second.lock():
            assert len(calls) == 2  # the orphaned file's lock was given up, a new file locked
            monkeypatch.setattr(artifact_module.fcntl, "flock", real_flock)
            with pytest.raises(ArtifactError, match=rf"another index_build is writing .*pid {os.getpid()}"):
                with third.lock():
                    pass
    assert not os.path.exists(first.lock_path)


# ----------------------------------------------------------------------------- one numbering

def _catalogue_with_a_gap(root, third_row_lat="47.3"):
    """Rows on lines 2, 4, 5 (line 3 is blank); the row on line 5 points at a broken image."""
    for name, seed in (("a.png", 1), ("b.png", 2)):
        make_tile(root / name, seed)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = root / "tiles.csv"
    path.write_text("tile_id,lat,lon,path\n"
                    "a,47.3,8.5,a.png\n"
                    "\n"
                    "b,47.3,8.5,b.png\n"
                    f"broken,{third_row_lat},8.5,broken.png\n")
    return path


def test_bad_image_is_named_by_the_line_validation_uses(tmp_path, ckpt):
    invalid = _catalogue_with_a_gap(tmp_path / "v", third_row_lat="95")
    with pytest.raises(CatalogueError) as validation:
        read_catalogue_csv(str(invalid))
    assert [i.where for i in validation.value.issues] == ["line 5"]

    cat = _catalogue_with_a_gap(tmp_path / "w")
    out = tmp_path / "idx"
    options = dict(catalog=str(cat), checkpoint=ckpt, out=str(out), batch_size=2, workers=0, shard_size=2,
                   progress=False, device="cpu")
    with pytest.raises(BadImagesError) as err:
        run_build(BuildOptions(**options))
    text = str(err.value)
    broken = str(tmp_path / "w" / "broken.png")
    assert "  line 5 tile_id='broken' " in text
    assert "row" not in text.replace("--skip-bad", "")
    assert text.count(broken) == 1 and "broken.png'" not in text
    assert f"catalogue csv:{cat}" in text

    run_build(BuildOptions(**options, skip_bad=True, resume=True))
    with open(out / "manifest.json") as f:
        skipped = json.load(f)["skipped"]["tiles"]
    assert [(s["tile_id"], s["line"]) for s in skipped] == [("broken", 5)]


def test_catalogue_lines_runs():
    from index_build.sources import TileRecord

    lines = [2, 3, 5, 6, 7, 10]  # a blank line after line 3, a quoted line break on line 7-8, ...
    records = [TileRecord(str(i), 0.0, 0.0, "x", line=line) for i, line in enumerate(lines)]
    table = CatalogueLines.of_records(records)
    assert table.to_json() == [[0, 2], [2, 5], [5, 10]]
    assert [CatalogueLines(table.to_json()).line(r) for r in range(6)] == lines
    assert CatalogueLines.of_records([TileRecord("z-x-y", 0.0, 0.0, "x", where="1/2/3.png")]).line(0) is None

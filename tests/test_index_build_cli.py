"""index_build as a newcomer meets it: one-line errors for bad inputs, no lock left behind, one
numbering of catalogue rows, what --quiet and --json print, --help for every option."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess

import numpy as np
import pytest

pytest.importorskip("faiss")

from index_build import artifact as artifact_module  # noqa: E402
from index_build.artifact import ArtifactError, ArtifactLayout  # noqa: E402
from index_build.build import BuildError, BuildOptions, run_build  # noqa: E402
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


def test_out_that_cannot_be_made(tmp_path, capsys, ckpt, catalogue):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "build", "--catalog", str(catalogue), "--checkpoint", ckpt,
                           "--out", str(blocker / "idx"))
    assert_one_line_error(code, err, str(blocker), "Not a directory")


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
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "  line 2: no rows after the header: the catalogue lists no tiles"
    assert sorted(os.listdir(f"{out}.versions")) == ["validation-report.txt"]  # the lock is gone
    os.unlink(f"{out}.versions/validation-report.txt")
    os.rmdir(f"{out}.versions")

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


# ----------------------------------------------------------------------------- what a build prints

def _build_args(catalogue, ckpt, out, *extra):
    return ("build", "--catalog", str(catalogue), "--checkpoint", ckpt, "--out", str(out), "--workers", "0",
            "--batch-size", "4", "--device", "cpu", *extra)


def test_quiet_prints_one_result_line_and_no_log(tmp_path, capsys, ckpt, catalogue):
    code, out, err = run_cli(capsys, *_build_args(catalogue, ckpt, tmp_path / "idx", "--quiet"))
    assert code == 0
    assert err == ""
    assert out.count("\n") == 1 and out.startswith(f"published {tmp_path / 'idx'} -> idx.versions/")
    assert "6 tile(s), flat index" in out


def test_text_summary_says_where_the_time_went(tmp_path, capsys, ckpt, catalogue):
    code, out, err = run_cli(capsys, *_build_args(catalogue, ckpt, tmp_path / "idx"))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("published ")
    assert lines[2].startswith("  time: validate ") and "set up encoder" in lines[2] and "tiles/s)" in lines[2]
    assert "warming up the encoder on cpu: 2 blank batch(es) of 4 tile(s)" in err  # what the pause before the bar is
    assert "encoded 6 tile(s) in " in err
    assert "\r" not in err  # stderr is not a terminal here: no bar redraws

    more = make_catalogue(tmp_path / "more", 3, prefix="m")
    code, out, _ = run_cli(capsys, "add", *_build_args(more, ckpt, tmp_path / "idx", "--quiet")[1:])
    assert code == 0
    assert out.startswith(f"added 3 tile(s) to {tmp_path / 'idx'} -> idx.versions/") and ": 9 in all" in out


def test_json_summary_timings_add_up(tmp_path, capsys, ckpt, catalogue):
    code, out, _ = run_cli(capsys, *_build_args(catalogue, ckpt, tmp_path / "idx", "--json", "--quiet"))
    assert code == 0
    summary = json.loads(out)
    timings, encode = summary["timings"], summary["encode"]
    assert set(timings) == {"validate_s", "model_load_s", "encode_setup_s", "encode_s", "index_s", "publish_s",
                            "total_s"}
    assert "seconds" not in encode and encode["encode_s"] == timings["encode_s"] > 0
    tiles, seconds = encode["tiles_encoded"], encode["encode_s"]  # seconds rounded to the millisecond
    assert tiles / (seconds + 0.0005) - 0.01 <= encode["tiles_per_second"] <= tiles / (seconds - 0.0005) + 0.01
    parts = sum(v for k, v in timings.items() if k != "total_s")
    assert parts <= timings["total_s"] + 0.01 and parts >= 0.5 * timings["total_s"]
    assert summary["manifest"]["count"] == 6


class _Terminal:
    """A stderr stand-in that says it is a terminal, and keeps what was written to it."""

    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_bar_counts_whole_tiles_and_ends_once(monkeypatch):
    import time

    from index_build.progress import TileProgress

    terminal = _Terminal()
    monkeypatch.setenv("COLUMNS", "100")
    progress = TileProgress(10, "encode", stream=terminal)
    progress.update(4)
    time.sleep(0.15)  # past tqdm's redraw interval: the last update is drawn
    progress.update(6)
    progress.close()
    drawn = [part for part in terminal.text.split("\r") if part.strip()]
    assert any("10/10" in part for part in drawn)
    assert not any(".0/" in part or "/10.0" in part for part in drawn)  # no fractional counts
    assert sum("100%" in part for part in drawn) == 1  # closing clears the bar instead of drawing it again


def test_progress_in_a_log_is_lines_not_redraws(caplog):
    import logging

    from index_build.progress import TileProgress

    log_file = _Terminal()
    log_file.isatty = lambda: False
    with caplog.at_level(logging.INFO, logger="index_build"):
        progress = TileProgress(10, "encode", stream=log_file, every_s=0.0)
        for _ in range(5):
            progress.update(2)
        progress.close()
    assert log_file.text == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "encode: 2/10 tiles (20%)", "encode: 4/10 tiles (40%)", "encode: 6/10 tiles (60%)", "encode: 8/10 tiles (80%)"]


# ----------------------------------------------------------------------------- --help

def _options(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {opt}", a, f) for opt, a, f in _options(sub))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield action.option_strings[-1], action, parser._get_formatter()


def _help_problems(parser, require_defaults: bool) -> list[str]:
    import argparse

    problems = []
    for name, action, formatter in _options(parser):
        if not action.help:
            problems.append(f"{name}: no help text")
            continue
        shown = formatter._expand_help(action)
        has_default = action.nargs != 0 and action.default is not None and action.default is not argparse.SUPPRESS
        if require_defaults and has_default and "default" not in shown:
            problems.append(f"{name}: default {action.default!r} not shown")
    return problems


def test_every_option_has_help_and_shows_its_default():
    from index_build.cli import build_parser as index_build_parser
    from model.evaluate import build_parser as evaluate_parser
    from model.train import build_parser as train_parser
    from worldgen.cli import build_parser as worldgen_parser

    for parser in (index_build_parser(), train_parser(), evaluate_parser(), worldgen_parser()):
        assert _help_problems(parser, require_defaults=True) == [], parser.prog


def test_train_help_shows_defaults(capsys):
    from model.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak AdamW learning rate, reached after --warmup (default: 0.0001)" in text
    assert "--batch-size BATCH_SIZE pairs per step" in text and "(default: 32)" in text
    assert "(default: False)" not in text


def test_docs_and_help_agree_on_the_cpu_workers_default():
    from index_build.cli import build_parser

    workers = next(a for name, a, _ in _options(build_parser()) if name == "build --workers")
    docs = (REPO / "docs" / "INDEX_BUILD.md").read_text()
    assert "on a CPU cores/4, which is 0 below 4 cores" in workers.help
    assert "On a\n   CPU it defaults to a quarter of the cores, which is 0 below 4 cores" in docs
    assert "(`--workers 0`, the default there)" not in docs


def test_verbose_flag_on_either_side_of_the_subcommand():
    from index_build.cli import build_parser

    parser = build_parser()
    required = ["--catalog", "c.csv", "--checkpoint", "m.safetensors", "--out", "idx"]
    assert parser.parse_args(["-v", "build", *required]).verbose
    assert parser.parse_args(["build", *required, "-v"]).verbose
    assert not parser.parse_args(["build", *required]).verbose


# ----------------------------------------------------------------------------- index options

@pytest.mark.parametrize("options, names", [
    (("--index", "ivf-flat", "--nlist", "50"), ("--nlist 50", "at least 50 tiles", "there are 6")),
    (("--index", "ivf-pq", "--nlist", "2", "--pq-m", "7"), ("--pq-m 7", "embedding size 32")),
    (("--index", "ivf-pq", "--nlist", "2"), ("--index ivf-pq", "at least 256 tiles")),
])
def test_index_options_that_can_not_work_stop_before_encoding(tmp_path, capsys, ckpt, catalogue, options, names):
    out = tmp_path / "idx"
    code, _, err = run_cli(capsys, *_build_args(catalogue, ckpt, out, "--quiet", *options))
    assert_one_line_error(code, err, *names)
    assert code == 1
    assert nothing_left_beside(out)  # refused before the work directory, let alone a shard, was written


def test_too_few_tiles_left_after_skip_bad_is_a_build_error(tmp_path, ckpt):
    cat = _catalogue_with_a_gap(tmp_path / "w")  # three tiles, one of them unreadable
    options = BuildOptions(catalog=str(cat), checkpoint=ckpt, out=str(tmp_path / "idx"), index_type="ivf-flat",
                           nlist=3, workers=0, progress=False, device="cpu", skip_bad=True)
    with pytest.raises(BuildError, match="--nlist 3: .* at least 3 tiles, there are 2"):
        run_build(options)


def test_a_value_error_is_one_line_without_verbose(tmp_path, capsys, monkeypatch, ckpt, catalogue):
    from index_build import build

    def refuse(_options):
        raise ValueError("something the checks before it missed")

    monkeypatch.setattr(build, "run_build", refuse)
    code, _, err = run_cli(capsys, *_build_args(catalogue, ckpt, tmp_path / "idx"))
    assert_one_line_error(code, err, "something the checks before it missed", "-v shows where")
    with pytest.raises(ValueError):
        main(["-v", *_build_args(catalogue, ckpt, tmp_path / "idx")])


# ----------------------------------------------------------------------------- verify reads as the service does

def _nan_latitude(root):
    path = root / "tiles.csv"
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[4].split(",")
    fields[1] = "nan"
    lines[4] = ",".join(fields)
    os.chmod(path, 0o644)
    path.write_text("".join(lines))


def _truncated_index(root):
    path = root / "index.faiss"
    data = path.read_bytes()
    os.chmod(path, 0o644)
    path.write_bytes(data[:len(data) // 2])


def _deleted_shard(root):
    os.unlink(root / "vectors" / "shard-00000.npy")


def _narrow_shard(root):
    path = root / "vectors" / "shard-00000.npy"
    stored = np.load(path)
    os.chmod(path, 0o644)
    np.save(path, stored[:, :-1])


def _moved_tile(root):
    path = root / "tiles.csv"
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[4].split(",")
    fields[1] = f"{float(fields[1]) + 0.01:.6f}"  # 1.1 km north: still a valid position
    lines[4] = ",".join(fields)
    os.chmod(path, 0o644)
    path.write_text("".join(lines))


def _index_of_other_rows(root):
    """index.faiss rewritten with its vectors in reverse order, the manifest's checksum with it: only the
    self-retrieval check can see that id i is no longer tiles.csv's row i."""
    import faiss

    path = root / "index.faiss"
    index = faiss.read_index(str(path))
    reversed_index = faiss.IndexFlatIP(index.d)
    reversed_index.add(index.reconstruct_n(0, index.ntotal)[::-1].copy())
    os.chmod(path, 0o644)
    faiss.write_index(reversed_index, str(path))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["checksums"]["index.faiss"] = hashlib.sha256(path.read_bytes()).hexdigest()
    os.chmod(root / "manifest.json", 0o644)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, problem", [
    (_nan_latitude, "tiles.csv:5: lat/lon out of range"),
    (_moved_tile, "tiles.csv: checksum differs from the manifest"),
    (_index_of_other_rows, "self-retrieval rank-1 0.0000 below 0.99"),
    (_truncated_index, "index.faiss: unreadable FAISS index"),
    (_deleted_shard, "unreadable embedding shard"),
    (_narrow_shard, "vectors/shard-00000.npy: shape ["),
])
def test_verify_refuses_what_the_service_refuses(tmp_path, capsys, ckpt, catalogue, damage, problem):
    out = tmp_path / "idx"
    assert run_cli(capsys, *_build_args(catalogue, ckpt, out, "--quiet"))[0] == 0
    damage(out.resolve())
    code, printed, err = run_cli(capsys, "verify", str(out), "--checkpoint", ckpt, "--device", "cpu")
    assert code == 1 and "Traceback" not in err
    report = json.loads(printed)
    assert not report["ok"]
    assert any(problem in p for p in report["problems"]), report["problems"]
    assert not any(str(out.resolve()) in p for p in report["problems"])  # paths relative to the artifact


def test_verify_takes_a_tile_among_many_copies_of_its_image_for_itself(tmp_path, capsys, ckpt):
    """More copies of one image than verify first searches (64): the tile's own id is further down."""
    root = make_catalogue(tmp_path / "sea", 10, prefix="s")
    rows = (root.read_text().splitlines() + [f"copy{i:03d},47.4,8.6,bingmap/s00000.png,zurich" for i in range(90)])
    root.write_text("\n".join(rows) + "\n")
    out = tmp_path / "idx"
    assert run_cli(capsys, "build", "--catalog", str(root), "--checkpoint", ckpt, "--out", str(out), "--workers", "0",
                   "--quiet", "--device", "cpu")[0] == 0
    code, printed, _ = run_cli(capsys, "verify", str(out), "--checkpoint", ckpt, "--device", "cpu", "--sample", "100")
    report = json.loads(printed)
    assert code == 0 and report["ok"] and report["self_retrieval"]["rank1_with_ties"] == 1.0, report


@pytest.mark.parametrize("command, function, line", [
    ("add", "index_build.build.run_add", "index_build: interrupted; rerun with --resume to continue"),
    ("verify", "index_build.verify.run_verify", "index_build: interrupted"),
    ("tile", "index_build.raster_tiles.tile_raster", "index_build tile: interrupted; nothing written"),
])
def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch, ckpt, catalogue, command, function, line):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(function, interrupted)
    if command == "add":
        argv = _build_args(catalogue, ckpt, tmp_path / "idx")[1:]
    elif command == "tile":
        pytest.importorskip("rasterio")
        argv = ("--raster", str(tmp_path / "ortho.tif"), "--out", str(tmp_path / "tiles"))
    else:
        argv = (str(tmp_path / "idx"), "--checkpoint", ckpt)
    code, out, err = run_cli(capsys, command, *argv)
    assert (code, out, err) == (130, "", line + "\n")


def test_unwritable_report_prints_every_problem_instead(tmp_path, capsys, ckpt):
    invalid = tmp_path / "invalid.csv"
    invalid.write_text("tile_id,lat,lon,path\n" + "".join(f"t{i},95,8,t{i}.png\n" for i in range(120)))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    report = blocker / "report.txt"
    code, _, err = run_cli(capsys, "build", "--catalog", str(invalid), "--checkpoint", ckpt,
                           "--out", str(tmp_path / "idx"), "--report", str(report), "--no-check-files")
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"index_build: warning: could not write the validation report {report}: ")
    assert lines[1].startswith(f"catalogue csv:{invalid}: 120 problem(s) in 120 row(s)")
    assert lines[2:] == [f"  line {i + 2} tile_id='t{i}': lat 95.0 outside [-90, 90]" for i in range(120)]
    assert nothing_left_beside(tmp_path / "idx")


# ----------------------------------------------------------------------------- option ranges, catalogue errors

@pytest.mark.parametrize("option, value, message", [
    ("--target-recall", "nan", "must be a finite number"),
    ("--target-recall", "-1", "must be > 0"),
    ("--target-recall", "1.5", "must be <= 1"),
    ("--memory-budget", "0", "must be at least 1 byte"),
    ("--workers", "-3", "must be at least 0"),
    ("--ray-cpus-per-actor", "0", "must be > 0"),
    ("--ray-gpus-per-actor", "-1", "must be >= 0"),
])
def test_numbers_out_of_range_are_refused_while_parsing(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--catalog", "c.csv", "--checkpoint", "m.safetensors", "--out", str(tmp_path / "idx"),
              option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--min-rank1", "1.01"), ("--min-rank1", "nan"), ("--tolerance", "-1")])
def test_verify_numbers_out_of_range_are_refused_while_parsing(capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "idx", "--checkpoint", "m.safetensors", option, value])
    assert exit_.value.code == 2 and f"argument {option}: " in capsys.readouterr().err


@pytest.mark.parametrize("stop_after", [(), ("--stop-after", "validate")])
def test_an_empty_catalogue_is_a_catalogue_error(tmp_path, capsys, ckpt, stop_after):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("tile_id,lat,lon,path\n")
    empty_dir = tmp_path / "slippy"
    empty_dir.mkdir()
    for catalog in (header_only, empty_dir):
        code, _, err = run_cli(capsys, "build", "--catalog", str(catalog), "--checkpoint", ckpt,
                               "--out", str(tmp_path / "idx"), *stop_after)
        assert code == 2 and "Traceback" not in err
        assert "no tiles" in err.strip().splitlines()[-1]


def test_a_binary_catalogue_is_quoted_short(tmp_path, capsys, ckpt):
    binary = tmp_path / "archive.tar"
    binary.write_bytes(b"tiles.csv" + b"\0" * 3000 + b"0000644,0000000" * 200 + b"\n")
    code, _, err = run_cli(capsys, "build", "--catalog", str(binary), "--checkpoint", ckpt, "--out",
                           str(tmp_path / "idx"))
    assert code == 2 and "header lacks column(s) tile_id, lat, lon, path" in err
    assert len(err) < 600, err
    assert "(6009 characters)" in err

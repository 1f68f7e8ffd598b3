"""model.atomic: whole-or-nothing output directories and the tidying of killed runs' leftovers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.atomic import staged_directory, tidy_leftovers

REPO = Path(__file__).resolve().parents[1]


def _tidy_from_another_process(out: Path) -> None:
    code = f"from model.atomic import tidy_leftovers; tidy_leftovers({str(out)!r}, print)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_published_directory_replaces_the_old_one_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_directory(str(out)) as stage:
        Path(stage.path, "new.txt").write_text("new")
        _tidy_from_another_process(out)  # a run that starts meanwhile: ours is alive, left alone
        assert os.path.isdir(stage.path) and (out / "old.txt").is_file()
        stage.publish()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["new.txt"]


def test_a_run_that_fails_leaves_the_old_output_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with staged_directory(str(out)) as stage:
            Path(stage.path, "new.txt").write_text("new")
            raise RuntimeError("half-way")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]


def test_a_killed_runs_leftovers_are_tidied_from_another_process(tmp_path):
    out = tmp_path / "out"
    code = ("import os, pathlib, sys; from model.atomic import staged_directory\n"
            f"with staged_directory({str(out)!r}) as stage:\n"
            "    pathlib.Path(stage.path, 'half.txt').write_text('half')\n"
            "    os._exit(9)  # killed: no cleanup runs\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 9
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and left[0].startswith(".out.run-") and left[1].startswith(".out.tmp-")
    said = []
    tidy_leftovers(str(out), said.append)
    assert os.listdir(tmp_path) == [] and said == [f"removing {tmp_path / left[1]}, left by a run that was killed"]


def test_a_place_where_nothing_can_be_written_raises_the_tools_error(tmp_path):
    class ToolError(Exception):
        pass

    with pytest.raises(ToolError, match="can not write .*File name too long"):
        with staged_directory(str(tmp_path / ("x" * 300)), ToolError):
            pass
    assert os.listdir(tmp_path) == []


def test_a_killed_earlier_run_with_our_own_pid_is_tidied_too(tmp_path):
    """In a container every run can be pid 1: a killed run's names are then ours."""
    out = tmp_path / "out"
    (tmp_path / f".out.tmp-{os.getpid()}").mkdir()
    (tmp_path / f".out.run-{os.getpid()}.lock").touch()
    previous = tmp_path / f".out.old-{os.getpid()}"  # killed between its two renames
    previous.mkdir()
    with staged_directory(str(out)) as stage:
        Path(stage.path, "new.txt").write_text("new")
        stage.publish()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["new.txt"]


def test_interrupted_between_its_two_renames_a_run_puts_the_old_output_back(tmp_path, monkeypatch):
    import model.atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename, calls = os.rename, []

    def rename_then_ctrl_c(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # out -> .out.old-PID done; .out.tmp-PID -> out interrupted
            raise KeyboardInterrupt
        real_rename(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with staged_directory(str(out)) as stage:
            Path(stage.path, "new.txt").write_text("new")
            monkeypatch.setattr(model.atomic.os, "rename", rename_then_ctrl_c)
            stage.publish()
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]


def test_a_run_that_found_no_output_does_not_replace_one_that_appeared_meanwhile(tmp_path):
    class ToolError(Exception):
        pass

    out = tmp_path / "out"
    with pytest.raises(ToolError, match="appeared while this run wrote it"):
        with staged_directory(str(out), ToolError) as stage:
            Path(stage.path, "mine.txt").write_text("mine")
            out.mkdir()  # another run published first
            (out / "theirs.txt").write_text("theirs")
            stage.publish(replace=False)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["theirs.txt"]

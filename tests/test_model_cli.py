"""The model package's command-line tools refuse bad input with one clear line, before any work and
without leaving half an output: numbers out of range, output paths that can not be written, damaged
files of a run, Ctrl-C."""
from __future__ import annotations

import argparse

import pytest

from model.arguments import output_dir, output_file
from model.atomic import atomic_write


def _refused(main, argv, capsys) -> str:
    """``main(argv)`` stops while its options are parsed (exit 2); returns what it printed."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_output_paths_are_checked_as_options(tmp_path):
    (tmp_path / "file").write_text("x")
    assert output_file(str(tmp_path / "new" / "deeper" / "a.png")) == tmp_path / "new" / "deeper" / "a.png"
    assert output_file(str(tmp_path / "file")) == tmp_path / "file"  # replaced
    assert output_dir(str(tmp_path / "run")) == str(tmp_path / "run")
    assert output_dir(str(tmp_path)) == str(tmp_path)
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory; give a file name"):
        output_file(str(tmp_path))
    for make in (output_file, output_dir):
        with pytest.raises(argparse.ArgumentTypeError, match=f"{tmp_path / 'file'} is not a directory"):
            make(str(tmp_path / "file" / "under" / "x"))
    with pytest.raises(argparse.ArgumentTypeError, match="exists and is not a directory"):
        output_dir(str(tmp_path / "file"))


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic_write(tmp_path / "sub" / "new.bin", lambda tmp: open(tmp, "w").write("new"))
    assert (tmp_path / "sub" / "new.bin").read_text() == "new"


def test_convert_refuses_an_out_it_can_not_write_before_reading_the_input(tmp_path, capsys):
    from model import convert

    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    base = ["--from", "ours", "--in", str(tmp_path / "missing.safetensors"), "--out"]
    err = _refused(convert.main, [*base, str(tmp_path / "dir.safetensors")], capsys)
    assert "argument --out: " in err and "is a directory" in err
    err = _refused(convert.main, [*base, str(tmp_path / "file" / "x.safetensors")], capsys)
    assert "argument --out: " in err and "is not a directory" in err


def test_evaluate_refuses_output_paths_before_evaluating(tmp_path, capsys):
    from model import evaluate

    (tmp_path / "file").write_text("x")
    base = ["--checkpoint", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path)]
    err = _refused(evaluate.main, [*base, "--plot", str(tmp_path / "file" / "curve.png")], capsys)
    assert "argument --plot: " in err and "is not a directory" in err
    err = _refused(evaluate.main, [*base, "--plot", str(tmp_path / "curve.xyz")], capsys)
    assert "argument --plot: " in err and "does not write .xyz files" in err
    err = _refused(evaluate.main, [*base, "--index", str(tmp_path), "--save-scores", str(tmp_path)], capsys)
    assert "argument --save-scores: " in err and "is a directory" in err


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    from model.train import main

    (tmp_path / "file").write_text("x")
    err = _refused(main, ["--data", str(tmp_path), "--out", str(tmp_path / "file")], capsys)
    assert "argument --out: " in err and "exists and is not a directory" in err


def test_plot_refuses_an_out_under_a_file(tmp_path, capsys):
    from model import plot

    (tmp_path / "log.jsonl").write_text('{"event": "train", "step": 1, "loss": 1.0}\n')
    err = _refused(plot.main, [str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "log.jsonl" / "c.png")], capsys)
    assert "argument --out: " in err and "is not a directory" in err

"""The model package's command-line tools refuse bad input with one clear line, before any work and
without leaving half an output: numbers out of range, output paths that can not be written, damaged
files of a run, Ctrl-C."""
from __future__ import annotations

import argparse
import importlib
import json

import pytest

from model.arguments import output_dir, output_file
from model.atomic import atomic_write


def _refused(main, argv, capsys) -> str:
    """``main(argv)`` stops while its options are parsed (exit 2); returns what it printed."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


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


def test_a_figure_without_a_suffix_is_a_png_and_needs_matplotlib(tmp_path, monkeypatch):
    import argparse
    import sys

    import matplotlib.pyplot as plt

    from model.plot import figure_file, save_figure

    assert figure_file(str(tmp_path / "recall")) == tmp_path / "recall.png"
    assert save_figure(plt.figure(), tmp_path / "curves") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "curves").exists()
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)  # not installed (the service image)
    with pytest.raises(argparse.ArgumentTypeError, match=r"needs matplotlib: pip install '\.\[plot\]'"):
        figure_file(str(tmp_path / "recall.png"))


def test_plot_refuses_an_out_under_a_file(tmp_path, capsys):
    from model import plot

    (tmp_path / "log.jsonl").write_text('{"event": "train", "step": 1, "loss": 1.0}\n')
    err = _refused(plot.main, [str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "log.jsonl" / "c.png")], capsys)
    assert "argument --out: " in err and "is not a directory" in err


def _required(tool: str, tmp_path) -> list[str]:
    """A tool's required options, for a command line refused before they are used."""
    return {"train": ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
            "orientation": ["--checkpoint", "x", "--data", "y", "--out", str(tmp_path / "o.safetensors")],
            "evaluate": ["--checkpoint", "x", "--data", "y"]}[tool]


# each tool's options out of range, and why (argparse names the option: "argument --lr: ...")
REFUSED = {
    "train": [
        ("--batch-size -4", "must be at least 1, got -4"), ("--batch-size 0", "must be at least 1, got 0"),
        ("--batch-size 1", "must be at least 2"), ("--epochs 0", "must be at least 1, got 0"),
        ("--steps -5", "must be at least 0, got -5"), ("--max-pairs -30", "must be at least 0, got -30"),
        ("--save-every 0", "must be at least 1, got 0"), ("--log-every 0", "must be at least 1, got 0"),
        ("--threads -2", "must be at least 0, got -2"), ("--seed -1", "must be at least 0, got -1"),
        ("--lr nan", "must be a finite number, got 'nan'"), ("--lr 0", "must be > 0, got 0"),
        ("--clip -1", "must be > 0, got -1"), ("--dropout 1", "must be < 1, got 1"),
        ("--fov-augment 5", "must be <= 1, got 5"), ("--photo-share -3", "must be >= 0, got -3"),
        ("--photo-fov 200 -10", "must be > 0, got -10"), ("--photo-fov 200 400", "must be <= 360, got 400"),
        ("--photo-fov 100 60", "MIN 100 is above MAX 60"), ("--hard-negatives 1.5", "must be <= 1, got 1.5"),
        ("--max-minutes inf", "must be a finite number")],
    "orientation": [
        ("--batch-size 0", "must be at least 1, got 0"), ("--steps 0", "must be at least 1, got 0"),
        ("--dim 0", "must be at least 1, got 0"), ("--pairs 0", "must be at least 1, got 0"),
        ("--rotations 0", "must be at least 1, got 0"), ("--neighbours 0", "must be at least 1, got 0"),
        ("--hidden -1", "must be at least 0, got -1"), ("--lr nan", "must be a finite number, got 'nan'"),
        ("--fov-augment 2", "must be <= 1, got 2"), ("--photo-fov 190 100", "must be < 180, got 190"),
        ("--photo-fov 100 60", "MIN 100 is above MAX 60")],
    "evaluate": [
        ("--fov 500", "must be <= 360, got 500"), ("--fov 0", "must be > 0, got 0"),
        ("--tile-m -100", "must be > 0, got -100"), ("--near-radius-m -5", "must be >= 0, got -5"),
        ("--queries -5", "must be at least 0, got -5"), ("--limit -3", "must be at least 0, got -3"),
        ("--rotations 0", "must be at least 1, got 0"), ("--rerank-k 0", "must be at least 1, got 0"),
        ("--rerank-weight 2", "must be <= 1, got 2"), ("--candidates 0", "must be at least 1, got 0"),
        ("--temperature 0", "must be > 0, got 0"), ("--seed -1", "must be at least 0, got -1")],
}


@pytest.mark.parametrize("tool,option,reason", [(tool, *row) for tool, rows in REFUSED.items() for row in rows])
def test_numbers_out_of_range_are_refused_before_any_work(tmp_path, capsys, tool, option, reason):
    main = importlib.import_module(f"model.{tool}").main
    err = _refused(main, [*_required(tool, tmp_path), *option.split()], capsys)
    assert f"argument {option.split()[0]}: {reason}" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_epoch_batches_refuses_a_batch_size_that_makes_no_batches():
    from model.train import epoch_batches

    with pytest.raises(ValueError, match="batch_size must be at least 1, got -4"):
        epoch_batches(24, -4, seed=0, epoch=0)


def test_train_refuses_fewer_pairs_than_a_batch_before_preprocessing(tmp_path, monkeypatch):
    import model.train
    from test_training import make_world, run_args

    world = make_world(tmp_path / "world")  # 16 training pairs
    monkeypatch.setattr(model.train, "load_pair_arrays", lambda *a, **k: pytest.fail("preprocessed"))
    with pytest.raises(model.train.TrainingError, match="16 training pairs are fewer than one batch of 32"):
        model.train.train(run_args(world, tmp_path / "run", "--batch-size", "32"))
    assert not (tmp_path / "run").exists()


def _train_cli(world, out, *extra) -> list[str]:
    """model.train's command line of the test runs (test_training.run_args)."""
    from test_training import MICRO

    return ["--data", str(world), "--config", MICRO, "--out", str(out), "--batch-size", "4", "--warmup", "2",
            "--lr", "1e-3", "--eval-every", "0", "--save-every", "2", "--workers", "0", "--quiet", *extra]


def test_train_names_a_damaged_image_without_a_traceback_or_a_run_directory(tmp_path, capfd):
    from model.train import main
    from test_training import make_world

    world = make_world(tmp_path / "world")
    (world / "streetview" / "000003.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(_train_cli(world, tmp_path / "run", "--steps", "2")) == 1
    err = capfd.readouterr().err
    assert "error: " in err and "000003.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_training_says_how_to_go_on_and_resume_does(tmp_path, capfd, monkeypatch):
    import model.train
    from model.losses import TripletLoss
    from test_training import make_world

    world = make_world(tmp_path / "world")
    real_forward, calls = TripletLoss.forward, []

    def interrupted_at_step_3(self, g, a, overlap=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_forward(self, g, a, overlap)

    monkeypatch.setattr(TripletLoss, "forward", interrupted_at_step_3)
    assert model.train.main(_train_cli(world, tmp_path / "run", "--steps", "4")) == 130
    err = capfd.readouterr().err
    assert "interrupted; rerun the same command with --resume" in err and "Traceback" not in err
    assert model.train.main(_train_cli(world, tmp_path / "run", "--steps", "4", "--resume")) == 0
    assert "resumed" in capfd.readouterr().err and (tmp_path / "run" / "last.safetensors").exists()


def _stopped_run(world, out):
    """A run of 4 steps stopped (resumably) after its first."""
    from test_training import run_args

    from model.train import train

    args = run_args(world, out, "--steps", "4", "--eval-every", "0")
    args.max_minutes = 1e-9
    assert train(args)["step"] == 1
    return run_args(world, out, "--steps", "4", "--eval-every", "0", "--resume")


def test_resume_tolerates_a_torn_last_log_line_and_names_any_other(tmp_path):
    from model.plot import read_log
    from model.train import TrainingError, train
    from test_training import make_world

    world = make_world(tmp_path / "world")
    resume = _stopped_run(world, tmp_path / "run")
    log = tmp_path / "run" / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"event": "train", "lo')  # a crash while writing a line
    assert read_log(log) == [json.loads(line) for line in good.splitlines()]  # model.plot of a live run too
    assert train(resume)["finished"]
    assert all(json.loads(line) for line in log.read_text().splitlines())
    resume = _stopped_run(world, tmp_path / "again")
    log = tmp_path / "again" / "log.jsonl"
    first, *rest = log.read_text().splitlines(keepends=True)
    log.write_text(first + "garbage\n" + "".join(rest))
    with pytest.raises(TrainingError, match=r"log.jsonl:2: not JSON .*repair or delete that line"):
        train(resume)


def test_resume_names_a_damaged_state_file_and_what_to_do(tmp_path, capfd):
    from model.train import main
    from test_training import make_world

    world = make_world(tmp_path / "world")
    _stopped_run(world, tmp_path / "run")
    state = tmp_path / "run" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    assert main(_train_cli(world, tmp_path / "run", "--steps", "4", "--resume")) == 1
    err = capfd.readouterr().err
    assert f"error: {state} is damaged and can not be resumed" in err and "delete it" in err
    assert "Traceback" not in err


def test_orientation_refuses_an_out_it_can_not_write_before_training(tmp_path, capsys):
    from model.orientation import main

    err = _refused(main, ["--checkpoint", "x", "--data", "y", "--out", str(tmp_path)], capsys)
    assert "argument --out: " in err and "is a directory; give a file name" in err


@pytest.fixture
def micro_net(tmp_path, micro_config):
    from model import L2LTR, save_checkpoint

    save_checkpoint(L2LTR(micro_config), tmp_path / "net.safetensors")
    return tmp_path / "net.safetensors"


def test_orientation_names_too_few_pairs_and_a_damaged_image_and_writes_nothing(tmp_path, micro_net, capfd,
                                                                                   monkeypatch):
    import model.orientation
    from test_training import make_world

    world = make_world(tmp_path / "world")
    out = tmp_path / "head.safetensors"
    base = ["--checkpoint", str(micro_net), "--data", str(world), "--out", str(out), "--workers", "0",
            "--steps", "2", "--batch-size", "4", "--rotations", "1"]
    assert model.orientation.main([*base, "--pairs", "1"]) == 1
    assert "error: 1 pairs (train of" in capfd.readouterr().err
    assert model.orientation.main([*base, "--pairs", "2", "--retrieval", "1"]) == 1
    assert "leave 1 to train the head on and 1 to test it on; it needs at least 2" in capfd.readouterr().err
    (world / "bingmap" / "000005.png").write_bytes(b"not a png")
    assert model.orientation.main(base) == 1
    err = capfd.readouterr().err
    assert "error: " in err and "000005.png" in err and "Traceback" not in err
    monkeypatch.setattr(model.orientation, "train_orientation", _ctrl_c)
    assert model.orientation.main(base) == 130
    assert capfd.readouterr().err == "interrupted; nothing written\n"
    assert not out.exists()


def test_evaluate_checks_the_head_and_the_photos_before_preprocessing(tmp_path, micro_net, capsys, monkeypatch):
    from model import evaluate
    from test_training import make_world

    world = make_world(tmp_path / "world")
    monkeypatch.setattr(evaluate, "load_pair_arrays", lambda *a, **k: pytest.fail("preprocessed"))
    base = ["--checkpoint", str(micro_net), "--data", str(world), "--workers", "0"]
    assert evaluate.main([*base, "--heading", "unknown"]) == 1
    assert "this checkpoint has no orientation head" in capsys.readouterr().err
    assert evaluate.main([*base, "--photos", str(tmp_path)]) == 1
    assert f"--photos {tmp_path}: no cameras.csv" in capsys.readouterr().err


def test_info_names_its_config_option_for_a_checkpoint_without_an_architecture(tmp_path, capsys):
    import torch

    from model import info

    pth = tmp_path / "x.pth"
    torch.save({"model_grd": {}, "model_sat": {}}, pth)
    assert info.main([str(pth)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {pth}: a PyTorch (.pth) checkpoint holds no architecture; pass --config (paper, small, " \
                  "tiny, a JSON config or a JSON file)\n"


def test_ctrl_c_in_evaluate_and_convert_is_one_line(tmp_path, capsys, monkeypatch):
    from model import convert, evaluate

    monkeypatch.setattr(evaluate, "evaluate", _ctrl_c)
    monkeypatch.setattr(evaluate, "evaluate_anywhere", _ctrl_c)
    assert evaluate.main(["--checkpoint", "x", "--data", "y"]) == 130
    assert evaluate.main(["--checkpoint", "x", "--data", "y", "--index", "z"]) == 130
    assert capsys.readouterr().err == "interrupted\ninterrupted\n"
    src = tmp_path / "in.safetensors"
    src.write_bytes(b"\0" * 8 + b"{}")  # detect_format reads it as one of ours
    monkeypatch.setattr(convert, "load_checkpoint", _ctrl_c)
    assert convert.main(["--from", "ours", "--in", str(src), "--out", str(tmp_path / "out.safetensors")]) == 130
    assert capsys.readouterr().err == "interrupted; nothing written\n"


def test_info_saves_the_config_that_model_train_takes_back(tmp_path, capsys):
    """docs/TRAINING.md fine-tunes the demo checkpoint with --config of its own config: --save-config writes it
    (the parent made), and it resolves to the checkpoint's config, orientation head included."""
    from pathlib import Path

    from model import info, load_checkpoint
    from model.config import L2LTRConfig

    checkpoint = Path(__file__).resolve().parents[1] / "weights" / "l2ltr_tiny_demo.safetensors"
    saved = tmp_path / "new" / "shipped_config.json"
    assert info.main([str(checkpoint), "--save-config", str(saved)]) == 0
    assert L2LTRConfig.resolve(str(saved)) == load_checkpoint(checkpoint).config
    assert "fingerprint" in capsys.readouterr().out
    (tmp_path / "file").write_text("")
    assert info.main([str(checkpoint), "--save-config", str(tmp_path / "file" / "x.json")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --save-config {tmp_path / 'file' / 'x.json'}: ")


def test_evaluate_names_photos_by_their_own_fields_of_view(tmp_path, monkeypatch, capsys):
    """With --photos the queries are the photos at the fields of view they were taken with: the summary line
    does not claim --fov's default (360) for them."""
    from model import evaluate

    result = {"checkpoint": "c.safetensors", "data": "world", "split": "all", "n": 4, "r1": 0.25, "r5": 0.5,
              "r10": 0.75, "r1pct": 0.25, "fov": 360.0, "heading": "unknown", "method": "rerank",
              "heading_error_median_deg": None}
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: dict(result))
    base = ["--checkpoint", "c.safetensors", "--data", "world", "--split", "all", "--heading", "unknown",
            "--method", "rerank"]
    assert evaluate.main([*base, "--photos", str(tmp_path / "eval_photos")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "photos at their own fields of view (eval_photos), heading unknown" in line and "360" not in line
    assert evaluate.main([*base, "--fov", "90"]) == 0
    assert "field of view 360 deg" in capsys.readouterr().out  # (the stand-in's result says 360 whatever --fov)

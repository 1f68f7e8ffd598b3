"""Training and evaluation CLIs: one step lowers the loss, exact resume, end-to-end evaluation, bad input."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import L2LTR, load_checkpoint, save_checkpoint
from model.losses import soft_margin_triplet_loss
from model.train import TrainingError, build_parser, epoch_batches, train

MICRO = json.dumps({"hidden_size": 32, "num_heads": 2, "mlp_dim": 64, "num_layers": 2, "resnet_units": [1, 1, 1],
                    "resnet_width_factor": 0.5, "ground_size": [32, 128], "aerial_size": [32, 128], "name": "micro"})


def make_world(root, n=24, n_val=8, seed=0):
    """A tiny data set in the synthetic-world layout: each pair shares a random pattern."""
    rng = np.random.default_rng(seed)
    for sub in ("bingmap", "streetview", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = rng.integers(0, 255, size=3)
        tile = np.zeros((64, 64, 3), np.uint8) + colour.astype(np.uint8)
        tile[rng.integers(0, 64, 200), rng.integers(0, 64, 200)] = 255 - colour
        pano = np.zeros((32, 128, 3), np.uint8) + colour.astype(np.uint8)[::-1]
        pano[:, rng.integers(0, 128, 20)] = 255 - colour
        sid = f"{i:06d}"
        Image.fromarray(tile).save(root / "bingmap" / f"{sid}.png")
        Image.fromarray(pano).save(root / "streetview" / f"{sid}.jpg", quality=95)
        rows.append(f"{sid},bingmap/{sid}.png,streetview/{sid}.jpg,{40 + i * 1e-4:.7f},{-70 + i * 1e-4:.7f}")
    header = "id,aerial,ground,lat,lon\n"
    (root / "splits" / "train.csv").write_text(header + "\n".join(rows[: n - n_val]) + "\n")
    (root / "splits" / "val.csv").write_text(header + "\n".join(rows[n - n_val:]) + "\n")
    return root


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path / "world")


def run_args(world, out, *extra):
    return build_parser().parse_args(["--data", str(world), "--config", MICRO, "--out", str(out), "--batch-size", "4",
                                      "--warmup", "2", "--lr", "1e-3", "--eval-every", "4", "--save-every", "2",
                                      "--workers", "0", "--quiet", *extra])


def test_one_step_decreases_loss_on_fixed_batch(micro_config):
    torch.manual_seed(0)
    model = L2LTR(micro_config.replace(dropout=0.0)).train()
    g = torch.randn(8, 3, 32, 128)
    a = torch.randn(8, 3, 32, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = soft_margin_triplet_loss(*model(g, a))
    opt.zero_grad()
    before.backward()
    opt.step()
    after = soft_margin_triplet_loss(*model(g, a))
    assert after.item() < before.item()


def test_resume_after_interruption_matches_uninterrupted(world, tmp_path):
    full = train(run_args(world, tmp_path / "full", "--steps", "8", "--hard-negatives", "0.5", "--augment"))
    assert full["finished"] and full["step"] == 8
    # "interrupt" after 3 steps, keeping only the state saved at step 2 (as a crash would)
    part = run_args(world, tmp_path / "part", "--steps", "8", "--hard-negatives", "0.5", "--augment")
    part.max_minutes = 1e-9  # stops right after the first step, saving its state there
    first = train(part)
    assert not first["finished"] and first["step"] == 1
    resumed = train(run_args(world, tmp_path / "part", "--steps", "8", "--hard-negatives", "0.5", "--augment",
                             "--resume"))
    assert resumed["finished"]
    a = load_checkpoint(tmp_path / "full" / "last.safetensors").state_dict()
    b = load_checkpoint(tmp_path / "part" / "last.safetensors").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    log = [json.loads(x) for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "eval"] == [4, 8]
    # the log reads as one run: one "end" line, and the step-2 loss averages steps 1 and 2 across the stop
    assert [r["finished"] for r in log if r["event"] == "end"] == [True]
    full_log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    losses = [[(r["step"], round(r["loss"], 5)) for r in run if r["event"] == "train"] for run in (log, full_log)]
    assert losses[0] == losses[1]


def test_resume_refuses_another_config_data_or_subset(world, tmp_path, monkeypatch):
    config = tmp_path / "micro.json"
    config.write_text(MICRO)

    def args(*extra):
        return build_parser().parse_args(["--data", str(world), "--config", str(config), "--out", str(tmp_path / "r"),
                                          "--batch-size", "4", "--eval-every", "0", "--workers", "0", "--quiet",
                                          "--steps", "4", *extra])

    first = args("--eval-every", "2")
    first.max_minutes = 1e-9  # stops after one step
    assert train(first)["step"] == 1
    config.write_text(MICRO.replace('"num_layers": 2', '"num_layers": 1'))
    with pytest.raises(TrainingError, match=r"config\.num_layers.*\(2, 1\)"):  # the same --config, edited
        train(args("--resume", "--eval-every", "2"))
    config.write_text(MICRO)
    with pytest.raises(TrainingError, match="max_pairs"):
        train(args("--resume", "--eval-every", "2", "--max-pairs", "8"))
    make_world(world, n=28)  # the data set regenerated at the same path, with more pairs
    with pytest.raises(TrainingError, match="the training pairs under .* are not the ones this run used"):
        train(args("--resume", "--eval-every", "2"))
    make_world(world, seed=0)
    # a state saved before a config field existed: the field had its default
    state = torch.load(tmp_path / "r" / "train_state.pt", weights_only=False)
    del state["config"]["orientation_hidden"]
    first_minutes = state["minutes"]
    torch.save(state, tmp_path / "r" / "train_state.pt")
    monkeypatch.chdir(world.parent)  # the same data and --config by relative paths are the same run
    second = args("--resume")  # a step more without evaluating
    second.data, second.config, second.max_minutes = world.name, os.path.relpath(config), 1e-9
    assert train(second)["step"] == 2
    state = torch.load(tmp_path / "r" / "train_state.pt", weights_only=False)
    assert state["eval_digest"] is not None and state["minutes"] > first_minutes  # kept; summed over sessions
    head, *rows = (world / "splits" / "val.csv").read_text().splitlines()
    (world / "splits" / "val.csv").write_text("\n".join([head, *rows[::-1]]) + "\n")  # the val pairs reordered
    with pytest.raises(TrainingError, match="the val pairs under .* are not the ones this run used"):
        train(args("--resume", "--eval-every", "2"))
    make_world(world, seed=0)
    # a state of the version that kept one digest of both splits (data_digest): not compared
    state["data_digest"] = state.pop("train_digest")
    del state["eval_digest"]
    torch.save(state, tmp_path / "r" / "train_state.pt")
    assert train(args("--resume"))["finished"]


def test_a_nan_in_a_training_evaluation_stops_with_a_clear_error(world, tmp_path, monkeypatch):
    import model.train

    def nan_descriptors(*_args):
        raise ValueError("8 queries have a NaN similarity to their true match")

    monkeypatch.setattr(model.train, "evaluate_arrays", nan_descriptors)
    with pytest.raises(TrainingError, match="evaluation at step 4 failed: 8 queries have a NaN similarity"):
        train(run_args(world, tmp_path / "n", "--steps", "4"))


def test_resume_refuses_changed_settings_and_existing_run(world, tmp_path):
    train(run_args(world, tmp_path / "r", "--steps", "2", "--eval-every", "0"))
    with pytest.raises(TrainingError, match="different settings"):
        train(run_args(world, tmp_path / "r", "--steps", "2", "--eval-every", "0", "--lr", "5e-4", "--resume"))
    with pytest.raises(TrainingError, match="already holds a run"):
        train(run_args(world, tmp_path / "r", "--steps", "2", "--eval-every", "0"))


def test_dropout_override_reaches_the_checkpoint_and_is_validated(world, tmp_path):
    from model.config import ConfigError

    train(run_args(world, tmp_path / "d", "--steps", "1", "--eval-every", "0", "--dropout", "0"))
    assert load_checkpoint(tmp_path / "d" / "last.safetensors").config.dropout == 0.0
    with pytest.raises(SystemExit):  # the command line refuses it as it reads the options
        run_args(world, tmp_path / "e", "--steps", "1", "--dropout", "1.5")
    args = run_args(world, tmp_path / "e", "--steps", "1")
    args.dropout = 1.5
    with pytest.raises(ConfigError, match=r"dropout must be in \[0, 1\)"):
        train(args)
    assert not (tmp_path / "e").exists()  # refused before anything was written


def _with_tile_centres(world, north_m: float):
    """The pairs' split files with tile_lat,tile_lon: each tile's centre north_m north of its camera."""
    for split in ("train", "val"):
        path = world / "splits" / f"{split}.csv"
        head, *rows = path.read_text().splitlines()
        rows = [f"{r},{float(r.split(',')[3]) + north_m / 111_195.0:.7f},{r.split(',')[4]}" for r in rows]
        path.write_text("\n".join([head + ",tile_lat,tile_lon", *rows]) + "\n")


def test_semi_positive_training_with_tile_centres(world, tmp_path, capfd):
    """--semi-positives: the tiles of neighbouring cameras (11 m apart here) share the positive of each;
    refused before any work without tile centres, with the triplet loss, or with tiles off their cameras."""
    args = ("--steps", "2", "--eval-every", "0", "--loss", "infonce", "--hard-negatives", "1",
            "--semi-positives", "100")
    with pytest.raises(TrainingError, match=r"pair 000000 of .* has no tile centre .*tile_lat,tile_lon"):
        train(run_args(world, tmp_path / "none", *args))
    _with_tile_centres(world, 30.0)
    capfd.readouterr()
    summary = train(run_args(world, tmp_path / "semi", *args))
    assert summary["finished"]
    assert "preprocess" not in capfd.readouterr().err  # --quiet (run_args): no progress bars at all
    trained = load_checkpoint(tmp_path / "semi" / "last.safetensors")
    assert trained.provenance["semi_positives_m"] == 100.0
    log = [json.loads(x) for x in (tmp_path / "semi" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if r["event"] == "train")
    with pytest.raises(TrainingError, match="needs --loss infonce"):
        train(run_args(world, tmp_path / "triplet", *args[:-6], "--semi-positives", "100"))
    with pytest.raises(TrainingError, match="pair 000000's tile does not cover its camera"):
        train(run_args(world, tmp_path / "far", *args[:-1], "25"))
    assert not any((tmp_path / name).exists() for name in ("none", "triplet", "far"))


def test_off_centre_polar_moves_the_camera_within_the_jitter_and_is_plain_polar_at_zero():
    from model.config import L2LTRConfig
    from model.preprocess import aerial_image
    from model.train import off_centre_polar

    config = L2LTRConfig.named("tiny")
    rng = np.random.default_rng(4)
    tiles = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    plain = off_centre_polar(tiles, config, 0.0, torch.Generator().manual_seed(0))
    cached = np.stack([np.asarray(aerial_image(Image.fromarray(t), config)) for t in tiles])
    assert plain.shape == (3, 3, 64, 256)
    assert np.abs(plain.permute(0, 2, 3, 1).numpy() * 255 - cached).max() <= 0.51  # the cache rounds to uint8
    # a white dot 20 px east of a black tile's centre; polar row i lies 2 (63 - i) px from the camera, so
    # the dot's row tells how far each view's camera stands from it: as far as a camera uniform over the
    # disc of 0.1 x 256 px around the centre stands, on average
    dot = np.zeros((2000, 256, 256, 3), np.uint8)
    dot[:, 126:131, 146:151] = 255
    views = off_centre_polar(dot, config, 0.1, torch.Generator().manual_seed(1))
    dot_px = 2.0 * (63 - views.amax(dim=(1, 3)).argmax(dim=1).float()).numpy()
    radius, angle = 25.6 * np.sqrt(rng.random(10 ** 6)), 2 * np.pi * rng.random(10 ** 6)
    expected = np.hypot(20 - radius * np.cos(angle), radius * np.sin(angle))
    assert abs(dot_px.mean() - expected.mean()) < 1.5 and dot_px.std() > 0.8 * expected.std()
    assert dot_px.max() <= 20 + 25.6 + 3
    again = [off_centre_polar(dot[:8], config, 0.1, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*again)  # seeded per step: a resumed run sees the same views


def test_centre_jitter_training_keeps_tiles_and_refuses_what_it_cannot_do(world, tmp_path):
    summary = train(run_args(world, tmp_path / "jit", "--steps", "2", "--eval-every", "2", "--centre-jitter", "0.2",
                             "--augment"))
    assert summary["finished"]
    assert load_checkpoint(tmp_path / "jit" / "last.safetensors").provenance["centre_jitter"] == 0.2
    with pytest.raises(TrainingError, match="no polar transform"):
        train(run_args(world, tmp_path / "flat", "--steps", "1", "--centre-jitter", "0.2", "--no-polar"))
    assert not (tmp_path / "flat").exists()
    from model.train import main

    with pytest.raises(SystemExit, match="2"):
        main(["--data", str(world), "--out", str(tmp_path / "big"), "--centre-jitter", "0.6"])
    assert not (tmp_path / "big").exists()


def test_nan_loss_stops_with_step(world, tmp_path, monkeypatch):
    import model.train as train_module
    from model.losses import TripletLoss

    class NanAfterTwo(TripletLoss):
        calls = 0

        def forward(self, g, a, overlap=None):
            NanAfterTwo.calls += 1
            loss = super().forward(g, a, overlap)
            return loss * float("nan") if NanAfterTwo.calls > 2 else loss

    monkeypatch.setattr(train_module, "make_loss", lambda name: NanAfterTwo())
    with pytest.raises(TrainingError, match=r"loss is nan at step 2 .*Last good state"):
        train(run_args(world, tmp_path / "nan", "--steps", "4", "--eval-every", "0"))


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        train(run_args(tmp_path / "nope", tmp_path / "o", "--steps", "1"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="is empty"):
        train(run_args(tmp_path / "empty", tmp_path / "o", "--steps", "1"))


def test_init_config_mismatch(world, tmp_path, micro_config):
    other = tmp_path / "other.safetensors"
    save_checkpoint(L2LTR(micro_config.replace(num_layers=1)), other)
    with pytest.raises(TrainingError, match="differs from the training config"):
        train(run_args(world, tmp_path / "o", "--steps", "1", "--init", str(other)))
    same = tmp_path / "same.safetensors"  # the same network trained with another dropout: fine-tuned with ours
    save_checkpoint(L2LTR(micro_config.replace(dropout=0.3)), same)
    assert train(run_args(world, tmp_path / "p", "--steps", "1", "--eval-every", "0", "--init", str(same)))["finished"]


def test_hard_negative_batches_are_neighbours():
    rng = np.random.default_rng(0)
    latlon = rng.uniform(0, 1, size=(256, 2))
    hard = epoch_batches(256, 16, seed=1, epoch=0, latlon=latlon, hard_fraction=1.0)
    rand = epoch_batches(256, 16, seed=1, epoch=0, latlon=latlon, hard_fraction=0.0)
    spread = lambda bs: np.mean([np.ptp(latlon[b], axis=0).sum() for b in bs])  # noqa: E731
    assert spread(hard) < 0.5 * spread(rand)
    assert sorted(np.concatenate(hard)) == list(range(256))
    assert all(np.array_equal(x, y) for x, y in zip(rand, epoch_batches(256, 16, 1, 0, latlon, 0.0)))


def test_evaluate_cli_end_to_end(world, tmp_path, capsys):
    from model import evaluate, plot

    train(run_args(world, tmp_path / "run", "--steps", "4"))
    ckpt = tmp_path / "run" / "last.safetensors"
    png = tmp_path / "curve.png"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(world), "--split", "val", "--json",
                          "--plot", str(png), "--workers", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 8 and set(out) >= {"r1", "r5", "r10", "r1pct", "localization"}
    assert 0 <= out["r1"] <= out["r5"] <= out["r10"] <= 1 and png.stat().st_size > 1000
    for where in ("refined", "top1"):  # the refined position's error beside the top-1 tile centre's
        e = out["position"][where]
        assert set(e) == {"median_error_m", "mean_error_m", "within_10m", "within_25m", "within_50m", "within_100m"}
        assert 0 <= e["within_10m"] <= e["within_25m"] <= e["within_50m"] <= e["within_100m"] <= 1
    assert plot.main([str(tmp_path / "run" / "log.jsonl")]) == 0
    assert (tmp_path / "run" / "curves.png").exists()
    assert evaluate.main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--data", str(world)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not math.isnan(out["r1"])

"""bench/ablation.py: kept results are reused only for the settings they were made with."""
from __future__ import annotations

import json

import pytest

from ship_support import script_module


@pytest.fixture
def ablation(monkeypatch):
    """The script with its commands answered at once: training does nothing, evaluation gives fixed numbers."""
    module = script_module("bench/ablation.py")
    calls = []

    def fake_run(cmd, env=None):
        calls.append(cmd)
        return json.dumps({"r1": 0.5, "r5": 0.6, "r10": 0.7, "r1pct": 0.8, "n": 10}) if "model.evaluate" in cmd else ""

    monkeypatch.setattr(module, "run", fake_run)
    return module, calls


def test_a_kept_training_run_is_reused_only_with_its_settings(tmp_path, ablation):
    module, calls = ablation
    argv = ["--train", str(tmp_path / "train"), "--eval", str(tmp_path / "eval"), "--variants", "vanilla + polar",
            "--seeds", "0", "--out", str(tmp_path / "out"), "--steps", "5"]
    assert module.main(argv) == 0 and len(calls) == 2  # trained, evaluated
    assert module.main(argv) == 0 and len(calls) == 2  # the same: reused
    with pytest.raises(SystemExit, match="holds a run made with other settings"):  # was reused as a 6-step run
        module.main([*argv[:-1], "6"])


def test_views_cells_are_kept_per_checkpoint_region_and_query_count(tmp_path, ablation):
    module, calls = ablation
    argv = ["views", "--eval", str(tmp_path / "eval"), "--checkpoint", f"c={tmp_path / 'a.safetensors'}",
            "--fov", "90", "--methods", "rerank", "--out", str(tmp_path / "out")]
    assert module.main(argv) == 0
    first = len(calls)
    assert module.main(argv) == 0 and len(calls) == first  # the same: reused
    assert module.main([*argv, "--queries", "400"]) == 0 and len(calls) == 2 * first  # another query count
    assert module.main([*argv[:4], f"c={tmp_path / 'b.safetensors'}", *argv[5:]]) == 0 and len(calls) == 3 * first


def test_a_run_kept_without_its_settings_is_not_reused(tmp_path, ablation):
    module, calls = ablation
    run_dir = tmp_path / "out" / "vanilla_polar-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps({"r1": 0.9, "r5": 0.9, "r10": 0.9, "r1pct": 0.9, "n": 1}))
    with pytest.raises(SystemExit, match="made before its settings were recorded"):
        module.main(["--train", str(tmp_path / "train"), "--eval", str(tmp_path / "eval"), "--variants",
                     "vanilla + polar", "--seeds", "0", "--out", str(tmp_path / "out"), "--steps", "5000"])
    assert calls == []

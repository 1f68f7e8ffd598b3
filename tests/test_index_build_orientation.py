"""index_build with a checkpoint that has an orientation head: every indexed tile's aerial column
features land in the artifact's orientation.npy, row-aligned with tiles.csv and the FAISS index,
through resume, skipped tiles and `add`; a head-less checkpoint writes none."""
from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from index_build import workdir  # noqa: E402
from model.index_artifact import read_manifest  # noqa: E402
from index_build.build import AddOptions, BuildError, BuildOptions, run_add, run_build  # noqa: E402
from index_build.cli import main as cli_main  # noqa: E402
from index_build.verify import run_verify  # noqa: E402
from test_index_build_support import (encode_columns_directly, make_catalogue, micro_checkpoint,  # noqa: E402
                                      single_threaded)

COLUMNS, DIM = 8, 8          # the micro model's aerial grid is 2 x 8; the head is 8 wide
FLOAT16_ATOL = 1e-3          # unit components rounded to float16: at most 2^-11 of each off


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def headed(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "micro_orientation.safetensors"
    micro_checkpoint(path, seed=0, orientation_dim=DIM)
    return str(path)


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "micro.safetensors"
    micro_checkpoint(path, seed=0)
    return str(path)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_catalogue(tmp_path_factory.mktemp("world"), 24, prefix="t")


def opts(catalog, ckpt, out, cls=BuildOptions, **kw):
    base = dict(catalog=str(catalog), checkpoint=ckpt, out=str(out), batch_size=4, workers=0, shard_size=10,
                progress=False, device="cpu")
    base.update(kw)
    return cls(**base)


def sources(artifact) -> list[str]:
    with open(os.path.join(artifact, "tiles.csv"), newline="") as f:
        return [r["source"] for r in csv.DictReader(f)]


def assert_columns_match_tiles(artifact, ckpt):
    """orientation.npy row i == the columns of tiles.csv row i, which FAISS id i also is."""
    m = read_manifest(str(artifact))
    stored = np.load(os.path.join(artifact, "orientation.npy"))
    assert stored.dtype == np.float16 and stored.shape == (m["count"], COLUMNS, DIM)
    vectors, columns = encode_columns_directly(ckpt, sources(artifact))
    np.testing.assert_allclose(stored.astype(np.float32), columns, atol=FLOAT16_ATOL)
    _, ids = faiss.read_index(os.path.join(artifact, "index.faiss")).search(vectors, 1)
    assert np.array_equal(ids[:, 0], np.arange(m["count"]))
    return stored


def test_build_writes_orientation_columns_row_aligned(tmp_path, headed, catalogue, capsys):
    out = tmp_path / "idx"
    result = run_build(opts(catalogue, headed, out))
    assert result.status == "published" and result.count == 24
    root = os.path.realpath(out)
    assert sorted(os.listdir(root)) == ["index.faiss", "manifest.json", "orientation.npy", "tiles.csv", "vectors"]
    m = read_manifest(root)
    entry = m["orientation"]
    assert {k: entry[k] for k in ("file", "columns", "dim", "dtype")} == {
        "file": "orientation.npy", "columns": COLUMNS, "dim": DIM, "dtype": "float16"}
    lanes = assert_columns_match_tiles(out, headed)
    assert entry["sha256"] == hashlib.sha256(lanes.tobytes()).hexdigest()
    # The shards' column files were folded into orientation.npy and are not published.
    assert not [f for f in os.listdir(os.path.join(root, "vectors")) if f.endswith(".columns.npy")]
    sidecars = [json.loads((out / "vectors" / f"shard-0000{i}.json").read_text()) for i in range(3)]
    assert [s["orientation"]["columns"] for s in sidecars] == [COLUMNS] * 3

    # The DataLoader path (a decoding worker process) stores the same columns as the encoder lanes.
    run_build(opts(catalogue, headed, tmp_path / "loader", workers=1))
    np.testing.assert_allclose(np.load(tmp_path / "loader" / "orientation.npy").astype(np.float32),
                               lanes.astype(np.float32), atol=FLOAT16_ATOL)

    assert cli_main(["info", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["orientation"]["columns"] == COLUMNS and shown["orientation"]["file"] == "orientation.npy"


def test_headless_checkpoint_writes_no_orientation(tmp_path, headless, catalogue, capsys):
    out = tmp_path / "idx"
    run_build(opts(catalogue, headless, out, stop_after="encode"))
    vdir = tmp_path / "idx.versions" / ".build" / "vectors"
    assert sorted(p.name for p in vdir.iterdir()) == [f"shard-0000{i}{ext}" for i in range(3)
                                                      for ext in (".json", ".npy")]
    run_build(opts(catalogue, headless, out, resume=True))
    root = os.path.realpath(out)
    assert sorted(os.listdir(root)) == ["index.faiss", "manifest.json", "tiles.csv", "vectors"]
    assert "orientation" not in read_manifest(root)
    # the shard sidecars have exactly the keys they had before orientation columns existed
    meta = json.loads((out / "vectors" / "shard-00000.json").read_text())
    assert sorted(meta) == sorted(["shard", "start", "stop", "rows", "dim", "skipped", "sha256",
                                   "model_fingerprint", "engine", "seconds", "written_at"])
    assert cli_main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["orientation"] is None
    report = run_verify(str(out), headless, sample=8, device="cpu")
    assert report["ok"] and report["orientation"] == {"stored": False, "model_head": False}


class Killed(BaseException):
    """Stands in for a kill: no `except Exception` in the build stops it."""


def test_resume_keeps_columns_right(tmp_path, headed, catalogue, monkeypatch):
    out = tmp_path / "idx"
    vdir = tmp_path / "idx.versions" / ".build" / "vectors"

    # A build dying after shard 1's columns were written but before its vectors and sidecar.
    real_save = workdir.atomic_save_npy

    def dying_save(path, array):
        if path.endswith("shard-00001.npy"):
            raise Killed(path)
        real_save(path, array)

    monkeypatch.setattr(workdir, "atomic_save_npy", dying_save)
    with pytest.raises(Killed):
        run_build(opts(catalogue, headed, out))
    monkeypatch.undo()
    assert (vdir / "shard-00001.columns.npy").is_file() and not (vdir / "shard-00001.json").exists()
    assert not os.path.lexists(out)

    # Then: encode the rest and stop; lose shard 2's column file (its sidecar names it).
    run_build(opts(catalogue, headed, out, resume=True, stop_after="encode"))
    (vdir / "shard-00002.columns.npy").unlink()
    finished = {p.name: p.stat().st_mtime_ns for p in vdir.glob("shard-00000*")}

    written = []
    result = run_build(opts(catalogue, headed, out, resume=True, on_shard_written=written.append))
    assert result.status == "published"
    assert result.encode.shards_reused == 2 and [w["shard"] for w in written] == [2]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "vectors").glob("shard-00000*")} == {
        k: v for k, v in finished.items() if not k.endswith(".columns.npy")}
    resumed = assert_columns_match_tiles(out, headed)
    # ... and equal to what an uninterrupted build stores
    run_build(opts(catalogue, headed, tmp_path / "ref"))
    assert np.array_equal(resumed, np.load(tmp_path / "ref" / "orientation.npy"))


def test_skip_bad_keeps_columns_aligned(tmp_path, headed):
    cat = make_catalogue(tmp_path / "w", 20, prefix="s")
    (tmp_path / "w" / "bingmap" / "s00003.png").write_bytes(b"not an image")
    for i in range(16, 20):  # the whole last shard: it holds no rows, and no columns either
        (tmp_path / "w" / "bingmap" / f"s{i:05d}.png").write_bytes(b"")
    out = tmp_path / "idx"
    result = run_build(opts(cat, headed, out, shard_size=4, skip_bad=True))
    assert result.count == 15 and result.skipped == 5
    assert assert_columns_match_tiles(out, headed).shape == (15, COLUMNS, DIM)
    assert json.loads((out / "vectors" / "shard-00004.json").read_text())["orientation"]["columns"] == COLUMNS


def test_add_appends_columns_and_refuses_a_mismatch(tmp_path, headed, headless, catalogue):
    out = tmp_path / "idx"
    run_build(opts(catalogue, headed, out))
    base = np.load(out / "orientation.npy")
    extra = make_catalogue(tmp_path / "more", 9, prefix="m", seed=7)
    result = run_add(opts(extra, headed, out, cls=AddOptions, shard_size=4))
    assert result.status == "published" and result.count == 33
    stored = assert_columns_match_tiles(out, headed)
    assert np.array_equal(stored[:24], base)
    m = read_manifest(str(out))
    assert m["orientation"]["sha256"] == hashlib.sha256(stored.tobytes()).hexdigest()
    assert not [f for f in os.listdir(out / "vectors") if f.endswith(".columns.npy")]
    assert run_verify(str(out), headed, sample=33, device="cpu")["ok"]

    # An artifact of the headed model without columns (published before index_build wrote them):
    # `add` would leave its old tiles without columns, so it refuses before encoding anything.
    more = make_catalogue(tmp_path / "more2", 3, prefix="x", seed=8)
    root = os.path.realpath(out)
    manifest = dict(m)
    del manifest["orientation"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    os.unlink(out / "orientation.npy")
    with pytest.raises(BuildError, match="no orientation columns .* has an orientation head"):
        run_add(opts(more, headed, out, cls=AddOptions))
    assert os.path.realpath(out) == root
    # The reverse (a hand-made orientation entry on a head-less artifact) is refused as well.
    plain = tmp_path / "plain"
    run_build(opts(catalogue, headless, plain))
    manifest = read_manifest(str(plain))
    manifest["orientation"] = dict(m["orientation"])
    (plain / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="has no orientation head"):
        run_add(opts(more, headless, plain, cls=AddOptions))


def test_verify_checks_the_stored_columns(tmp_path, headed, catalogue):
    out = tmp_path / "idx"
    run_build(opts(catalogue, headed, out))
    good = run_verify(str(out), headed, sample=24, device="cpu")
    assert good["ok"], good["problems"]
    assert good["orientation"]["sampled"] == 24 and good["orientation"]["min_cosine"] > 1 - 1e-4

    path = out / "orientation.npy"
    original = np.load(path)
    damaged = original.copy()
    damaged[[5, 6]] = damaged[[6, 5]]      # two tiles' columns swapped: shape and norms unchanged
    np.save(path, damaged)
    bad = run_verify(str(out), headed, sample=24, device="cpu")
    assert not bad["ok"]
    assert any("orientation.npy: checksum" in p for p in bad["problems"])
    assert any("orientation.npy: 2 of 24" in p for p in bad["problems"])
    unchecked = run_verify(str(out), headed, sample=24, device="cpu", check_checksums=False)
    assert [p for p in unchecked["problems"] if "orientation" in p] and not unchecked["ok"]

    np.save(path, original[:-1])            # one row short of the manifest's count
    short = run_verify(str(out), headed, sample=4, device="cpu")
    assert any("orientation.npy: shape [23, 8, 8], manifest.json says [24, 8, 8]" in p for p in short["problems"])
    os.unlink(path)
    missing = run_verify(str(out), headed, sample=4, device="cpu")
    assert any("orientation.npy: missing" in p for p in missing["problems"])


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_engine_writes_the_same_columns(tmp_path, headed, catalogue):
    ray = pytest.importorskip("ray", reason="ray not installed (pip install -e '.[ray]')")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             configure_logging=False)
    try:
        run_build(opts(catalogue, headed, tmp_path / "ray", engine="ray", ray_actors=1))
    finally:
        ray.shutdown()
    stored = assert_columns_match_tiles(tmp_path / "ray", headed)
    run_build(opts(catalogue, headed, tmp_path / "local"))
    np.testing.assert_allclose(stored.astype(np.float32),
                               np.load(tmp_path / "local" / "orientation.npy").astype(np.float32),
                               atol=FLOAT16_ATOL)


def test_tile_phases_store_every_phase_and_add_resume_and_verify_keep_them(tmp_path, headed, headless, catalogue,
                                                                          capsys):
    import torch

    from model import load_checkpoint
    from model.index_artifact import read_orientation
    from model.inference import InferenceEncoder
    from model.preprocess import aerial_image, image_uint8, load_image

    out = tmp_path / "idx"
    assert cli_main(["build", "--catalog", str(catalogue), "--checkpoint", headed, "--out", str(out), "--workers", "0",
                     "--batch-size", "4", "--shard-size", "10", "--device", "cpu", "--tile-phases", "4"]) == 0
    assert f"{COLUMNS} x {DIM} orientation columns per tile at 4 phases" in capsys.readouterr().out
    m = read_manifest(str(out))
    assert {k: m["orientation"][k] for k in ("columns", "dim", "phases")} == {"columns": 4 * COLUMNS, "dim": DIM,
                                                                              "phases": 4}
    stored = np.load(out / "orientation.npy").astype(np.float32)
    assert stored.shape == (24, 4 * COLUMNS, DIM)
    # phase p: the polar tile rolled by p / 4 of a column (16 pixels of the micro model's 128: 4 p pixels)
    net = load_checkpoint(headed)
    encoder = InferenceEncoder(net, "cpu", branches=("aerial",), warm_up=0)
    images = torch.stack([image_uint8(aerial_image(load_image(p), net.config)) for p in sources(out)])
    for p in range(4):
        expected = encoder.encode_uint8_with_columns(torch.roll(images, 4 * p, dims=3), "aerial")[1]
        np.testing.assert_allclose(stored[:, p * COLUMNS:(p + 1) * COLUMNS], expected, atol=FLOAT16_ATOL)
    assert read_orientation(os.path.realpath(out), m, (COLUMNS, DIM)).shape == (24, 4, COLUMNS, DIM)
    assert run_verify(str(out), headed, sample=24, device="cpu")["ok"]

    extra = make_catalogue(tmp_path / "more", 5, prefix="m", seed=7)  # `add` encodes at the artifact's phases
    assert run_add(opts(extra, headed, out, cls=AddOptions)).count == 29
    added = read_manifest(str(out))["orientation"]
    assert (added["columns"], added["phases"]) == (4 * COLUMNS, 4)
    assert np.load(out / "orientation.npy").shape == (29, 4 * COLUMNS, DIM)
    assert run_verify(str(out), headed, sample=29, device="cpu")["ok"]

    half = tmp_path / "half"  # a build stopped after encoding resumes only at the phases it began with
    run_build(opts(catalogue, headed, half, tile_phases=2, stop_after="encode"))
    with pytest.raises(BuildError, match="tile_phases: 2 -> 4"):
        run_build(opts(catalogue, headed, half, tile_phases=4, resume=True))
    with pytest.raises(BuildError, match="has no orientation head"):
        run_build(opts(catalogue, headless, tmp_path / "plain", tile_phases=2))
    with pytest.raises(BuildError, match="do not split into 3 phases"):
        run_build(opts(catalogue, headed, tmp_path / "thirds", tile_phases=3))

    # a manifest whose phases were edited: `add` refuses it before encoding, `verify` reports it
    for phases in (0, 3, "4"):
        edited = dict(read_manifest(str(out)))
        edited["orientation"] = {**edited["orientation"], "phases": phases}
        (out / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(BuildError, match="orientation phases must be a positive integer dividing its 32"):
            run_add(opts(make_catalogue(tmp_path / f"m{phases}", 2, prefix="z", seed=9), headed, out, cls=AddOptions))
        report = run_verify(str(out), headed, sample=4, device="cpu")
        assert not report["ok"] and any("orientation phases must be" in p for p in report["problems"])


def test_tile_phases_default_to_those_the_head_was_trained_at(tmp_path, headed, headless, catalogue, caplog):
    from model import load_checkpoint
    from model.orientation import trained_tile_phases

    phased = str(tmp_path / "phased.safetensors")  # as model.orientation --tile-phases 2 records it
    micro_checkpoint(phased, seed=0, orientation_dim=DIM, provenance={"orientation": {"tile_phases": 2}})
    assert [trained_tile_phases(load_checkpoint(c)) for c in (phased, headed, headless)] == [2, 1, 1]
    odd = load_checkpoint(headed)
    for said in ("2", 0, True, None):
        odd.provenance = {"orientation": {"tile_phases": said}}
        assert trained_tile_phases(odd) == 1

    with caplog.at_level("INFO", logger="index_build"):
        run_build(opts(catalogue, phased, tmp_path / "auto"))
    assert read_manifest(str(tmp_path / "auto"))["orientation"]["phases"] == 2
    assert "tile phases: 2, as the checkpoint's orientation head was trained" in caplog.text
    assert np.load(tmp_path / "auto" / "orientation.npy").shape == (24, 2 * COLUMNS, DIM)
    run_build(opts(catalogue, phased, tmp_path / "one", tile_phases=1))  # said: as the tiles are
    assert read_manifest(str(tmp_path / "one"))["orientation"].get("phases", 1) == 1
    run_build(opts(catalogue, headed, tmp_path / "plain"))
    assert read_manifest(str(tmp_path / "plain"))["orientation"].get("phases", 1) == 1


def test_the_shipped_phases_checkpoint_builds_its_tiles_at_4_phases(tmp_path):
    """weights/l2ltr_tiny_phases.safetensors: the demo checkpoint's network with a head trained at 4 tile
    phases and a ground map for phone photos (weights/README.md); an index built with it, unless told
    otherwise, holds its tiles at them."""
    from pathlib import Path

    from model import load_checkpoint
    from model.orientation import trained_tile_phases

    phases = Path(__file__).resolve().parents[1] / "weights" / "l2ltr_tiny_phases.safetensors"
    net, demo = load_checkpoint(phases), load_checkpoint(phases.with_name("l2ltr_tiny_demo.safetensors"))
    assert net.fingerprint() == "f3dd199b3dcf7a3c" and (trained_tile_phases(net), trained_tile_phases(demo)) == (4, 1)
    assert net.config.orientation_photo and demo.config.orientation_photo  # both with a photo map (session 31)
    assert demo.fingerprint() == "19266d44cc53d42c"
    ours, theirs = net.state_dict(), demo.state_dict()
    assert ours.keys() == theirs.keys()
    assert sorted(k for k in ours if k.startswith("orientation.photo.")) == [
        f"orientation.photo.{k}" for k in ("0.bias", "0.weight", "2.bias", "2.weight")]
    network = [k for k in ours if not k.startswith("orientation.")]
    assert network and all(ours[k].equal(theirs[k]) for k in network)  # only the heads differ
    assert not all(ours[k].equal(theirs[k]) for k in theirs if k.startswith("orientation."))
    for checkpoint in (ours, theirs):
        assert not checkpoint["orientation.photo.2.weight"].equal(checkpoint["orientation.ground.2.weight"])

    run_build(opts(make_catalogue(tmp_path / "world", 6, prefix="p", seed=5), str(phases), tmp_path / "idx"))
    m = read_manifest(str(tmp_path / "idx"))
    assert (m["orientation"]["phases"], m["model_fingerprint"]) == (4, "f3dd199b3dcf7a3c")
    assert np.load(tmp_path / "idx" / "orientation.npy").shape == (6, 4 * 16, 64)

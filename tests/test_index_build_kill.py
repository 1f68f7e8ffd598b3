"""Crash safety: a SIGKILL'd build never damages the published artifact, and --resume finishes it
without re-encoding finished shards, giving exactly what an uninterrupted build gives."""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from model.index_artifact import read_manifest  # noqa: E402
from index_build.build import BuildOptions, run_build  # noqa: E402
from test_index_build_support import (PYTHON, REPO, make_catalogue, micro_checkpoint, shard_files,  # noqa: E402
                                      single_threaded, subprocess_env, torch_threads)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_threaded():
        yield


N_TILES, SHARD = 48, 8   # six shards

# Runs the real CLI in a child process; the patch only slows shard writing down so that the test
# can kill the child from outside while it is encoding, or kills it at a chosen publish step.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    # Ctrl-C as in a terminal: a test run started as a background job hands its children SIGINT ignored,
    # and Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "slow-shards":
        import index_build.encode_local as encode_local
        real_write = encode_local.write_shard
        written = []
        def slow_write(*args, **kwargs):
            meta = real_write(*args, **kwargs)
            written.append(meta)
            time.sleep(0.4 if len(written) < 3 else 60)  # from the third on, it waits to be killed (a slow box)
            return meta
        encode_local.write_shard = slow_write
    elif mode == "die-before-link-swap":
        from index_build.artifact import ArtifactLayout
        ArtifactLayout.swap_link = lambda self, version: os.kill(os.getpid(), signal.SIGKILL)
    from index_build.cli import main
    sys.exit(main(argv))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    ckpt = root / "micro.safetensors"
    micro_checkpoint(ckpt, seed=0)
    old_cat = make_catalogue(root / "old", 10, prefix="o", seed=1)
    new_cat = make_catalogue(root / "new", N_TILES, prefix="n", seed=2)
    child = root / "child.py"
    child.write_text(CHILD)
    return root, str(ckpt), old_cat, new_cat, child


def _opts(catalog, ckpt, out, **kw):
    base = dict(catalog=str(catalog), checkpoint=ckpt, out=str(out), batch_size=4, workers=0,
                shard_size=SHARD, progress=False, device="cpu")
    base.update(kw)
    return BuildOptions(**base)


def _cli_args(catalog, ckpt, out):
    return ["build", "--catalog", str(catalog), "--checkpoint", ckpt, "--out", str(out), "--batch-size", "4",
            "--workers", "0", "--shard-size", str(SHARD), "--quiet", "--device", "cpu"]


def _assert_old_artifact_intact(out, old_version):
    assert os.path.realpath(out) == old_version
    m = read_manifest(str(out))
    index = faiss.read_index(str(out / "index.faiss"))
    assert m["count"] == 10 and index.ntotal == 10
    with open(out / "tiles.csv") as f:
        assert sum(1 for _ in f) == 11
    stored = np.concatenate([np.load(out / s["file"]) for s in m["shards"]])
    _, found = index.search(stored, 1)
    assert np.array_equal(found[:, 0], np.arange(10))


def test_sigkill_mid_encode_then_resume_equals_uninterrupted(setup, tmp_path):
    root, ckpt, old_cat, new_cat, child = setup
    out = tmp_path / "idx"
    with torch_threads(1):
        run_build(_opts(old_cat, ckpt, out))
    old_version = os.path.realpath(out)

    proc = subprocess.Popen([PYTHON, str(child), "slow-shards", *_cli_args(new_cat, ckpt, out)],
                            env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    vectors = tmp_path / "idx.versions" / ".build" / "vectors"
    deadline = time.time() + 90
    while time.time() < deadline and len(list(vectors.glob("shard-*.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    # The live artifact is the old one, complete and loadable.
    _assert_old_artifact_intact(out, old_version)
    finished = sorted(p.stem for p in vectors.glob("shard-*.json"))
    assert 3 <= len(finished) < N_TILES // SHARD, finished
    before = shard_files(vectors)

    written = []
    with torch_threads(1):
        result = run_build(_opts(new_cat, ckpt, out, resume=True, on_shard_written=written.append))
    # Counting: only the unfinished shards went through the model.
    assert result.encode.shards_reused == len(finished)
    assert result.encode.shards_encoded == N_TILES // SHARD - len(finished)
    assert result.encode.tiles_encoded == N_TILES - SHARD * len(finished)
    assert sorted(f"shard-{w['shard']:05d}" for w in written) == sorted(
        f"shard-{i:05d}" for i in range(N_TILES // SHARD) if f"shard-{i:05d}" not in finished)
    resumed = os.path.realpath(out)
    after = shard_files(tmp_path / "idx.versions" / os.path.basename(resumed) / "vectors")
    for name in finished:  # finished shards were not rewritten: same inode, same mtime
        for suffix in (".npy", ".json"):
            assert after[name + suffix] == before[name + suffix]

    # An uninterrupted build of the same catalogue gives the same artifact.
    ref_out = tmp_path / "ref"
    with torch_threads(1):
        run_build(_opts(new_cat, ckpt, ref_out))
    a, b = read_manifest(str(out)), read_manifest(str(ref_out))
    for key in ("count", "model_fingerprint", "catalog_sha256", "index_type", "embedding_dim"):
        assert a[key] == b[key]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert (out / "tiles.csv").read_bytes() == (ref_out / "tiles.csv").read_bytes()
    va = np.concatenate([np.load(out / s["file"]) for s in a["shards"]])
    vb = np.concatenate([np.load(ref_out / s["file"]) for s in b["shards"]])
    assert np.array_equal(va, vb)
    assert (out / "index.faiss").read_bytes() == (ref_out / "index.faiss").read_bytes()
    # and the old version is still there for readers that resolved the link before the swap
    assert os.path.isdir(old_version)


def test_ctrl_c_mid_encode_is_one_line_and_resumable(setup, tmp_path):
    root, ckpt, old_cat, new_cat, child = setup
    out = tmp_path / "idx"
    proc = subprocess.Popen([PYTHON, str(child), "slow-shards", *_cli_args(new_cat, ckpt, out)],
                            env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    vectors = tmp_path / "idx.versions" / ".build" / "vectors"
    deadline = time.time() + 90
    while time.time() < deadline and len(list(vectors.glob("shard-*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr == "index_build: interrupted; rerun with --resume to continue\n"
    assert stdout == "" and not os.path.lexists(out)
    assert not (tmp_path / "idx.versions" / ".lock").exists()
    finished = len(list(vectors.glob("shard-*.json")))
    # what a run killed in the middle of atomic writes leaves: their temporary files, a temporary link
    leftovers = [vectors.parent / ".index.faiss.k1ll3d.tmp", vectors / ".shard-00005.npy.k1ll3d.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a file")
    os.symlink("idx.versions/nowhere", tmp_path / ".idx.link-99999.tmp")
    with torch_threads(1):
        result = run_build(_opts(new_cat, ckpt, out, resume=True))
    assert result.status == "published" and result.encode.shards_reused == finished >= 2
    published = os.path.realpath(out)  # they are not published inside the artifact, nor left beside it
    assert not [f for _, _, files in os.walk(published) for f in files if f.endswith(".tmp")]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def _killed_before_link_swap(setup, out) -> str:
    """The old catalogue published at ``out``, then a build of the new one killed after promoting its
    version, before the link swap; the old version's directory."""
    root, ckpt, old_cat, new_cat, child = setup
    with torch_threads(1):
        run_build(_opts(old_cat, ckpt, out))
    proc = subprocess.run([PYTHON, str(child), "die-before-link-swap", *_cli_args(new_cat, ckpt, out)],
                          env=subprocess_env(), cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    return os.path.realpath(out)


def test_sigkill_between_promote_and_link_swap(setup, tmp_path):
    root, ckpt, old_cat, new_cat, child = setup
    out = tmp_path / "idx"
    old_version = _killed_before_link_swap(setup, out)
    _assert_old_artifact_intact(out, old_version)
    versions = sorted(p.name for p in (tmp_path / "idx.versions").iterdir() if not p.name.startswith("."))
    assert len(versions) == 2  # the finished new version exists, unpublished
    # --resume publishes it without encoding anything again
    with torch_threads(1):
        result = run_build(_opts(new_cat, ckpt, out, resume=True))
    assert result.status == "published" and result.encode.tiles_encoded == 0
    assert os.path.realpath(out) != old_version
    m = read_manifest(str(out))
    assert m["count"] == N_TILES
    assert sorted(os.listdir(out)) == ["index.faiss", "manifest.json", "tiles.csv", "vectors"]


def test_a_version_never_published_is_pruned_before_the_previous_one(setup, tmp_path):
    root, ckpt, old_cat, new_cat, child = setup
    out = tmp_path / "idx"
    old_version = _killed_before_link_swap(setup, out)
    with torch_threads(1):
        run_build(_opts(new_cat, ckpt, out))  # built again without --resume: the killed run's version is garbage
    versions = sorted(str(p) for p in (tmp_path / "idx.versions").iterdir() if not p.name.startswith("."))
    assert versions == sorted([old_version, os.path.realpath(out)])  # --keep-versions 2: live + the rollback

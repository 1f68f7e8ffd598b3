"""index_build: sources and validation, shards, FAISS index choice, artifact, add/info/verify."""
from __future__ import annotations

import csv
import json
import shutil
import os
import subprocess

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from index_build import webmercator  # noqa: E402
from index_build.artifact import ArtifactError, ArtifactLayout  # noqa: E402
from model.index_artifact import read_manifest  # noqa: E402
from index_build.build import AddOptions, BuildError, BuildOptions, run_add, run_build  # noqa: E402
from index_build.encode_common import BadImagesError  # noqa: E402
from index_build.faiss_index import (build_index, choose_index, exact_topk, nlist_for, recall_at_k,  # noqa: E402
                                     tune_search)
from index_build.sources import CatalogueError, read_catalogue_csv, read_slippy_dir  # noqa: E402
from index_build.workdir import plan_shards  # noqa: E402
from test_index_build_support import (PYTHON, REPO, encode_tiles_directly, make_catalogue, make_tile,  # noqa: E402
                                      micro_checkpoint, single_threaded, subprocess_env)


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
    return make_catalogue(tmp_path_factory.mktemp("world"), 40, prefix="t")


def opts(catalog, ckpt, out, **kw) -> BuildOptions:
    base = dict(catalog=str(catalog), checkpoint=ckpt, out=str(out), batch_size=8, workers=0, shard_size=16,
                progress=False, device="cpu")
    base.update(kw)
    return BuildOptions(**base)


# ----------------------------------------------------------------------------- web mercator

def test_slippy_tile_centres():
    assert webmercator.tile_center_latlon(0, 0, 0) == pytest.approx((0.0, 0.0), abs=1e-12)
    lat, lon = webmercator.tile_center_latlon(1, 0, 0)  # north-west quarter of the world
    assert lon == pytest.approx(-90.0) and 0 < lat < webmercator.MAX_LATITUDE
    s, w, n, e = webmercator.tile_bounds(1, 0, 0)
    assert (s, w, n, e) == pytest.approx((0.0, -180.0, webmercator.MAX_LATITUDE, 0.0))
    # Zurich main station at z=16, then back: the tile's centre lies inside the tile's bounds.
    x, y = webmercator.latlon_to_tile(47.3779, 8.5403, 16)
    assert (x, y) == (34322, 22949)  # by the OSM wiki formula with ln(tan + sec)
    lat, lon = webmercator.tile_center_latlon(16, x, y)
    s, w, n, e = webmercator.tile_bounds(16, x, y)
    assert s < lat < n and w < lon < e and abs(lat - 47.3779) < 0.01 and abs(lon - 8.5403) < 0.01
    with pytest.raises(ValueError):
        webmercator.tile_center_latlon(2, 4, 0)


# ----------------------------------------------------------------------------- validation

def test_catalogue_validation_lists_every_bad_row_and_encodes_nothing(tmp_path, ckpt):
    make_tile(tmp_path / "a.png", 1)
    make_tile(tmp_path / "b.png", 2)
    rows = [
        "tile_id,lat,lon,path,note",
        "a,10,20,a.png,ok",                 # line 2: fine
        "b,95,20,b.png,x",                  # line 3: lat out of range
        "c,10,-200,b.png,x",                # line 4: lon out of range
        "a,10,20,b.png,x",                  # line 5: duplicate id
        "d,10,20,nope.png,x",               # line 6: missing file
        "e,10,20",                          # line 7: malformed row
        ",10,20,a.png,x",                   # line 8: empty id
        "f,north,20,a.png,x",               # line 9: not a number
        "",                                 # line 10: blank, ignored
        "g,nan,20,a.png,x",                 # line 11: not finite
    ]
    (tmp_path / "cat.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(CatalogueError) as err:
        read_catalogue_csv(str(tmp_path / "cat.csv"))
    by_line = {}
    for issue in err.value.issues:
        by_line.setdefault(issue.where, []).append(issue.problem)
    assert sorted(by_line, key=lambda w: int(w.split()[1])) == [
        "line 3", "line 4", "line 5", "line 6", "line 7", "line 8", "line 9", "line 11"]
    assert "lat 95.0 outside" in by_line["line 3"][0]
    assert "lon -200.0 outside" in by_line["line 4"][0]
    assert "duplicate tile_id (first seen on line 2)" in by_line["line 5"][0]
    assert "missing file" in by_line["line 6"][0]
    assert "malformed row" in by_line["line 7"][0]
    assert "empty tile_id" in by_line["line 8"][0]
    assert "not a number" in by_line["line 9"][0]
    assert "not finite" in by_line["line 11"][0]

    # The CLI prints the same report, exits 2, and leaves no artifact and no encoded shard behind.
    out = tmp_path / "idx"
    proc = subprocess.run([PYTHON, "-m", "index_build", "build", "--catalog", str(tmp_path / "cat.csv"),
                           "--checkpoint", ckpt, "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "8 problem(s)" in proc.stderr and "line 6" in proc.stderr and "missing file" in proc.stderr
    assert not os.path.lexists(out)
    assert not (tmp_path / "idx.versions" / ".build").exists()
    report = (tmp_path / "idx.versions" / "validation-report.txt").read_text()
    assert report.count("\n  line ") == 8


def test_catalogue_header_problems(tmp_path):
    (tmp_path / "c.csv").write_text("id,lat,lon,path\n")
    with pytest.raises(CatalogueError, match="lacks column"):
        read_catalogue_csv(str(tmp_path / "c.csv"))
    (tmp_path / "d.csv").write_text("tile_id,lat,lon,path,source\n")
    with pytest.raises(CatalogueError, match="reserved"):
        read_catalogue_csv(str(tmp_path / "d.csv"))


def test_slippy_directory_source(tmp_path):
    root = tmp_path / "tiles"
    x, y = webmercator.latlon_to_tile(47.3779, 8.5403, 15)
    make_tile(root / "15" / str(x) / f"{y}.png", 1)
    make_tile(root / "15" / str(x) / f"{y + 1}.jpg", 2)
    make_tile(root / "15" / str(x + 1) / f"{y}.png", 3)
    (root / "README.txt").write_text("not a tile")
    cat = read_slippy_dir(str(root))
    assert [r.tile_id for r in cat.records] == [f"15-{x}-{y}", f"15-{x}-{y + 1}", f"15-{x + 1}-{y}"]
    assert cat.extra_columns == ["z", "x", "y"]
    first = cat.records[0]
    assert (first.lat, first.lon) == pytest.approx(webmercator.tile_center_latlon(15, x, y))
    assert any("ignored 1 non-image" in n for n in cat.notes)
    # A tile present as .png and .jpg and a name that is not z/x/y are both reported.
    make_tile(root / "15" / str(x) / f"{y}.jpg", 4)
    make_tile(root / "15" / "foo" / "1.png", 5)
    with pytest.raises(CatalogueError) as err:
        read_slippy_dir(str(root))
    problems = " | ".join(str(i) for i in err.value.issues)
    assert "duplicate tile" in problems and "not a {z}/{x}/{y} tile path" in problems


# ----------------------------------------------------------------------------- index choice

def test_auto_index_choice_follows_size_and_memory_budget():
    assert choose_index("auto", 1_000, 192).index_type == "flat"
    mid = choose_index("auto", 1_000_000, 192)
    assert mid.index_type == "ivf-flat"
    assert 4 * 1000 <= mid.params["nlist"] <= 16 * 1000
    assert choose_index("auto", 50_000_000, 768).index_type == "ivf-pq"
    # A small memory budget forces compression even for a mid-size gallery.
    tight = choose_index("auto", 2_000_000, 768, memory_budget=512 * 2 ** 20)
    assert tight.index_type == "ivf-pq" and tight.params["estimated_bytes"] <= 512 * 2 ** 20
    for n in (300_000, 5_000_000, 100_000_000):
        nl = nlist_for(n)  # a power of two within the 4..16 sqrt(N) guideline, give or take the rounding
        assert 4 * np.sqrt(n) / 1.5 <= nl <= 16 * np.sqrt(n) * 1.5 and nl & (nl - 1) == 0
    assert nlist_for(10_000) <= 10_000 // 39  # small galleries: >= 39 training points per list
    assert choose_index("hnsw", 10, 32).factory == "HNSW32"
    with pytest.raises(ValueError):
        choose_index("lsh", 10, 32)


def _clustered(n, dim, seed=0, clusters=64, noise=0.35):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind,extra", [("ivf-flat", {}), ("hnsw", {}), ("ivf-pq", {"pq_m": 8, "opq": False})])
def test_index_types_train_add_tune(kind, extra):
    x = _clustered(4000, 32)
    blocks = lambda: (x[i:i + 1000] for i in range(0, len(x), 1000))  # noqa: E731
    spec = choose_index(kind, len(x), 32, nlist=32 if kind != "hnsw" else None, **extra)
    index, info = build_index(spec, 32, len(x), blocks, use_gpu=False)
    assert index.ntotal == len(x) and index.metric_type == faiss.METRIC_INNER_PRODUCT
    tuning = tune_search(index, spec, len(x), blocks, target_recall=0.9)
    q = x[:100]
    truth = exact_topk(q, blocks, 10)
    _, found = index.search(q, 10)
    r = recall_at_k(found, truth, 10)
    if kind == "ivf-pq":
        assert r > 0.3  # 8-byte codes of 32-d vectors: compressed, only sanity here
    else:
        assert r >= 0.9 and tuning["tuned_recall_at_10"] >= 0.9
    # The tuned search parameter survives serialisation (the service reads index.faiss as written).
    clone = faiss.deserialize_index(faiss.serialize_index(index))
    _, found2 = clone.search(q, 10)
    assert np.array_equal(found, found2)


def test_shard_plan():
    spans = plan_shards(40, 16)
    assert [(s.start, s.stop) for s in spans] == [(0, 16), (16, 32), (32, 40)]
    assert [s.name for s in plan_shards(5, 2, first_index=3)] == ["shard-00003", "shard-00004", "shard-00005"]


# ----------------------------------------------------------------------------- build end to end

@pytest.mark.cross_cpu
def test_build_writes_the_documented_artifact(tmp_path, ckpt, catalogue):
    out = tmp_path / "idx"
    result = run_build(opts(catalogue, ckpt, out, workers=1))  # one DataLoader worker process
    assert result.status == "published" and result.count == 40
    assert os.path.islink(out)
    root = os.path.realpath(out)
    assert os.path.dirname(root) == str(tmp_path / "idx.versions")
    assert sorted(os.listdir(root)) == ["index.faiss", "manifest.json", "tiles.csv", "vectors"]
    m = read_manifest(root)
    for key in ("format_version", "model_fingerprint", "model_config", "embedding_dim", "metric", "count",
                "index_type", "index_params", "faiss_version", "catalog_sha256", "built_at", "source"):
        assert key in m
    assert m["format_version"] == 1 and m["metric"] == "inner_product" and m["count"] == 40
    assert m["embedding_dim"] == 32 and m["index_type"] == "flat"
    assert m["faiss_version"] == faiss.__version__
    assert m["built_at"].endswith("Z")
    import hashlib
    assert m["catalog_sha256"] == hashlib.sha256(catalogue.read_bytes()).hexdigest()
    assert m["skipped"]["count"] == 0 and len(m["shards"]) == 3
    with open(os.path.join(root, "tiles.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["tile_id", "lat", "lon", "source", "region"]
    assert [r[0] for r in rows[1:]] == [f"t{i:05d}" for i in range(40)]
    assert all(os.path.isabs(r[3]) and os.path.isfile(r[3]) for r in rows[1:])
    assert float(rows[2][1]) == 47.3 + 1e-3 and rows[1][4] == "zurich"
    # faiss id i == row i, vectors equal the model applied directly, self-retrieval is perfect.
    direct = encode_tiles_directly(ckpt, [r[3] for r in rows[1:]])
    stored = np.concatenate([np.load(os.path.join(root, s["file"])) for s in m["shards"]])
    np.testing.assert_allclose(stored, direct, atol=1e-5)
    index = faiss.read_index(os.path.join(root, "index.faiss"))
    _, ids = index.search(direct, 1)
    assert np.mean(ids[:, 0] == np.arange(40)) >= 0.99
    # files are readable by other users (the service may run as another user)
    assert os.stat(os.path.join(root, "index.faiss")).st_mode & 0o044


def test_build_ivf_and_cli_info_verify(tmp_path, ckpt, catalogue):
    out = tmp_path / "idx"
    env = subprocess_env()
    proc = subprocess.run([PYTHON, "-m", "index_build", "build", "--catalog", str(catalogue), "--checkpoint", ckpt,
                           "--out", str(out), "--index", "ivf-flat", "--nlist", "4", "--workers", "0",
                           "--batch-size", "16", "--quiet", "--json", "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["manifest"]["index_type"] == "ivf-flat"
    assert summary["manifest"]["index_params"]["nlist"] == 4
    assert "nprobe" in summary["manifest"]["index_params"]
    info = subprocess.run([PYTHON, "-m", "index_build", "info", str(out)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
    assert info.returncode == 0
    shown = json.loads(info.stdout)
    assert shown["count"] == 40 and shown["resolved"] == os.path.realpath(out)
    ver = subprocess.run([PYTHON, "-m", "index_build", "verify", str(out), "--checkpoint", ckpt, "--sample", "40",
                          "--device", "cpu"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    report = json.loads(ver.stdout)
    assert report["ok"] and report["self_retrieval"]["rank1"] >= 0.99
    assert report["vectors"]["min_cosine"] > 1 - 1e-4

    # verify catches a damaged shard and a model that is not the artifact's
    from index_build.verify import run_verify
    shard = os.path.join(os.path.realpath(out), "vectors", "shard-00000.npy")
    arr = np.load(shard)
    arr[3] = -arr[3]
    os.chmod(shard, 0o644)
    np.save(shard, arr)
    bad = run_verify(str(out), ckpt, sample=40, device="cpu")
    assert not bad["ok"] and any("checksum" in p for p in bad["problems"])
    assert any("differ from the stored" in p for p in bad["problems"])
    other = tmp_path / "other.safetensors"
    micro_checkpoint(other, seed=1)
    wrong = run_verify(str(out), str(other), sample=4, device="cpu")
    assert not wrong["ok"] and "fingerprint" in wrong["problems"][-1]


@pytest.mark.cross_cpu
def test_encoder_lanes_keep_row_order_and_values(tmp_path, ckpt, catalogue):
    """Lanes finish their batches in any order; the shards must still hold row i at position i,
    with the values a single lane (and the model applied directly) gives."""
    stored = {}
    for lanes in (1, 3):
        out = tmp_path / f"idx{lanes}"
        result = run_build(opts(catalogue, ckpt, out, batch_size=4, lanes=lanes))
        m = read_manifest(str(out))
        assert result.count == 40 and m["build"]["lanes"] == lanes and m["build"]["workers"] == 0
        stored[lanes] = np.concatenate([np.load(os.path.join(out, s["file"])) for s in m["shards"]])
    with open(tmp_path / "idx1" / "tiles.csv", newline="") as f:
        sources = [r["source"] for r in csv.DictReader(f)]
    np.testing.assert_allclose(stored[3], stored[1], atol=1e-6)
    np.testing.assert_allclose(stored[1], encode_tiles_directly(ckpt, sources), atol=1e-5)


def test_a_bad_tile_without_skip_bad_encodes_nothing_of_its_batch(ckpt):
    import torch

    from index_build import encode_local
    from model import load_checkpoint

    calls = []

    class CountingEncoder:  # stands in for model.inference.InferenceEncoder
        config = load_checkpoint(ckpt).config
        embedding_dim = 32
        column_shape = None  # no orientation head

        def encode_uint8_with_columns(self, images, branch):
            calls.append(images)
            return np.zeros((len(images), 32), np.float32), None

    model = CountingEncoder()
    tiles = torch.zeros(2, 3, *model.config.aerial_size, dtype=torch.uint8)
    stopped = encode_local._encode_good(model, [0, 1], tiles, ["", "broken"], "cpu", skip_bad=False)
    assert stopped.vectors.shape == (0, 32) and stopped.errors == ["", "broken"] and not calls
    skipped = encode_local._encode_good(model, [0, 1], tiles, ["", "broken"], "cpu", skip_bad=True)
    assert skipped.vectors.shape == (1, 32) and len(calls) == 1


def test_skip_bad_counts_and_lists_unreadable_images(tmp_path, ckpt):
    cat = make_catalogue(tmp_path / "w", 20, prefix="s")
    (tmp_path / "w" / "bingmap" / "s00005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "w" / "bingmap" / "s00017.png").write_bytes(b"")
    out = tmp_path / "idx"
    written = []
    with pytest.raises(BadImagesError) as err:
        run_build(opts(cat, ckpt, out, shard_size=8, on_shard_written=written.append))
    assert "s00005" in str(err.value) and "--skip-bad" in str(err.value)
    assert [w["shard"] for w in written] == []          # the bad tile is in the first shard
    assert not os.path.lexists(out)
    result = run_build(opts(cat, ckpt, out, shard_size=8, skip_bad=True, resume=True))
    assert result.count == 18 and result.skipped == 2 and result.encode.tiles_skipped == 2
    m = read_manifest(str(out))
    assert m["count"] == 18 and m["catalogue_rows"] == 20
    assert m["skipped"]["count"] == 2
    assert [s["tile_id"] for s in m["skipped"]["tiles"]] == ["s00005", "s00017"]
    assert all(s["error"] for s in m["skipped"]["tiles"])
    with open(out / "tiles.csv") as f:
        ids = [r["tile_id"] for r in csv.DictReader(f)]
    assert "s00005" not in ids and "s00017" not in ids and len(ids) == 18
    # faiss row i is still tiles.csv row i after the skips
    index = faiss.read_index(str(out / "index.faiss"))
    sources = []
    with open(out / "tiles.csv") as f:
        sources = [r["source"] for r in csv.DictReader(f)]
    direct = encode_tiles_directly(ckpt, sources)
    _, found = index.search(direct, 1)
    assert np.array_equal(found[:, 0], np.arange(18))


def test_add_appends_and_enforces_fingerprint(tmp_path, ckpt, catalogue):
    out = tmp_path / "idx"
    run_build(opts(catalogue, ckpt, out))
    first = os.path.realpath(out)
    extra = make_catalogue(tmp_path / "more", 12, prefix="m", seed=7)
    # another model -> refused, artifact unchanged
    other = tmp_path / "other.safetensors"
    micro_checkpoint(other, seed=3)
    with pytest.raises(BuildError, match="fingerprint"):
        run_add(AddOptions(**{**opts(extra, str(other), out).__dict__}))
    assert os.path.realpath(out) == first
    # ids already present -> refused with the offending lines
    with pytest.raises(CatalogueError, match="already in the artifact"):
        run_add(AddOptions(**{**opts(catalogue, ckpt, out).__dict__}))
    # a published tiles.csv edited since its build -> refused (the new checksums would hide the edit)
    tiles_csv = os.path.join(first, "tiles.csv")
    original = open(tiles_csv, "rb").read()
    os.chmod(tiles_csv, 0o644)
    open(tiles_csv, "wb").write(original.replace(b"47.30", b"47.31", 1))
    with pytest.raises(BuildError, match="tiles.csv differs from its checksum in manifest.json"):
        run_add(AddOptions(**{**opts(extra, ckpt, out).__dict__}))
    open(tiles_csv, "wb").write(original)
    index_file = os.path.join(first, "index.faiss")  # so is an index.faiss replaced since
    original = open(index_file, "rb").read()
    os.chmod(index_file, 0o644)
    faiss.write_index(faiss.IndexFlatIP(faiss.read_index(index_file).d), index_file)
    with pytest.raises(BuildError, match="index.faiss differs from its checksum"):
        run_add(AddOptions(**{**opts(extra, ckpt, out).__dict__}))
    open(index_file, "wb").write(original)
    result = run_add(AddOptions(**{**opts(extra, ckpt, out, shard_size=5).__dict__}))
    assert result.status == "published" and result.count == 52
    root = os.path.realpath(out)
    assert root != first and os.path.isdir(first)       # old version kept (--keep-versions 2)
    m = read_manifest(root)
    assert m["count"] == 52 and len(m["shards"]) == 3 + 3
    assert m["additions"][0]["count"] == 12 and m["catalog_sha256"] == read_manifest(first)["catalog_sha256"]
    assert [s["file"] for s in m["shards"]][-3:] == [f"vectors/shard-0000{i}.npy" for i in (3, 4, 5)]
    with open(out / "tiles.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 52 and rows[40]["tile_id"] == "m00000"
    direct = encode_tiles_directly(ckpt, [r["source"] for r in rows])
    _, found = faiss.read_index(str(out / "index.faiss")).search(direct, 1)
    assert np.array_equal(found[:, 0], np.arange(52))
    # a third publish prunes the oldest version, never the live one
    run_build(opts(catalogue, ckpt, out))
    assert not os.path.exists(first) and len(ArtifactLayout(str(out)).list_versions()) == 2
    # out linked by hand to a directory of someone else's: publishing leaves its files alone and keeps two versions
    foreign = tmp_path / "restored-by-hand"
    shutil.copytree(os.path.realpath(out), foreign)
    (foreign / "plan.json").write_text("{}")
    os.unlink(out)
    os.symlink(foreign, out)
    run_build(opts(catalogue, ckpt, out))
    assert (foreign / "plan.json").exists() and len(ArtifactLayout(str(out)).list_versions()) == 2


def test_out_must_be_a_link_and_one_writer_at_a_time(tmp_path, ckpt, catalogue):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ArtifactError, match="not a symlink"):
        run_build(opts(catalogue, ckpt, plain))
    layout = ArtifactLayout(str(tmp_path / "idx"))
    with layout.lock():
        with pytest.raises(ArtifactError, match="another index_build"):
            run_build(opts(catalogue, ckpt, tmp_path / "idx"))


def test_resume_refuses_a_different_plan(tmp_path, ckpt, catalogue):
    out = tmp_path / "idx"
    run_build(opts(catalogue, ckpt, out, stop_after="encode"))
    with pytest.raises(BuildError, match="shard_size"):
        run_build(opts(catalogue, ckpt, out, shard_size=8, resume=True))
    # a raster cut again into the same grid: the same tiles.csv over other images, a new tiling.json
    tiling = catalogue.parent / "tiling.json"
    try:
        tiling.write_text(json.dumps({"format": "index_build-tiling/1", "tile_m": 100, "stride_m": 50}))
        with pytest.raises(BuildError, match="tiling_sha256"):
            run_build(opts(catalogue, ckpt, out, resume=True))
        plan_file = tmp_path / "idx.versions" / ".build" / "plan.json"  # a plan from before tiling_sha256
        plan = json.loads(plan_file.read_text())
        del plan["tiling_sha256"]
        plan_file.write_text(json.dumps(plan))
        assert run_build(opts(catalogue, ckpt, out, resume=True, stop_after="encode")).encode.tiles_encoded == 0
    finally:
        tiling.unlink()
    result = run_build(opts(catalogue, ckpt, out, resume=True))  # same plan: nothing re-encoded
    assert result.encode.tiles_encoded == 0 and result.encode.shards_reused == 3
    assert result.status == "published"

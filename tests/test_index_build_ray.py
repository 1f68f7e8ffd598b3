"""--engine ray: Ray Data map_batches over an actor pool writes the same shard files as the local engine."""
from __future__ import annotations

import os

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray not installed (pip install -e '.[ray]')")
pytest.importorskip("ray.data")
faiss = pytest.importorskip("faiss")

from model.index_artifact import read_manifest  # noqa: E402
from index_build.build import BuildOptions, run_build  # noqa: E402
from test_index_build_support import make_catalogue, micro_checkpoint, single_threaded, torch_threads  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_threaded():
        yield


pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_ray_engine_matches_local_and_resumes_local_shards(tmp_path, local_ray):
    ckpt = tmp_path / "micro.safetensors"
    micro_checkpoint(ckpt, seed=0)
    cat = make_catalogue(tmp_path / "w", 30, prefix="r")
    # one bad image: the Ray engine reports/skips it exactly like the local one
    (tmp_path / "w" / "bingmap" / "r00011.png").write_bytes(b"garbage")
    common = dict(catalog=str(cat), checkpoint=str(ckpt), batch_size=4, shard_size=8, progress=False,
                  device="cpu", skip_bad=True)
    with torch_threads(1):
        local = run_build(BuildOptions(out=str(tmp_path / "local"), workers=0, **common))
    # two actors on the local Ray, one model each
    remote = run_build(BuildOptions(out=str(tmp_path / "ray"), engine="ray", ray_actors=2,
                                    ray_cpus_per_actor=1, **common))
    assert remote.status == "published" and remote.count == local.count == 29
    assert remote.encode.shards_encoded == 4 and remote.encode.tiles_skipped == 1
    ml, mr = read_manifest(str(tmp_path / "local")), read_manifest(str(tmp_path / "ray"))
    assert [s["tile_id"] for s in mr["skipped"]["tiles"]] == ["r00011"]
    assert mr["shards"] and [s["rows"] for s in mr["shards"]] == [s["rows"] for s in ml["shards"]]
    assert (tmp_path / "ray" / "tiles.csv").read_bytes() == (tmp_path / "local" / "tiles.csv").read_bytes()
    vl = np.concatenate([np.load(tmp_path / "local" / s["file"]) for s in ml["shards"]])
    vr = np.concatenate([np.load(tmp_path / "ray" / s["file"]) for s in mr["shards"]])
    np.testing.assert_allclose(vr, vl, atol=1e-5)  # torch thread counts may differ: last-bit noise only

    # Shards are engine-neutral: a local build killed after two shards is finished by Ray.
    out = tmp_path / "mixed"
    with torch_threads(1):
        run_build(BuildOptions(out=str(out), workers=0, stop_after="encode", **common))
    vdir = tmp_path / "mixed.versions" / ".build" / "vectors"
    for name in ("shard-00002", "shard-00003"):
        os.unlink(vdir / f"{name}.json")   # as if the build had died before finishing them
    mixed = run_build(BuildOptions(out=str(out), engine="ray", ray_actors=1, resume=True, **common))
    assert mixed.encode.shards_reused == 2 and mixed.encode.shards_encoded == 2
    assert mixed.encode.tiles_encoded == 8 + 6
    mm = read_manifest(str(out))
    vm = np.concatenate([np.load(out / s["file"]) for s in mm["shards"]])
    np.testing.assert_allclose(vm, vl, atol=1e-5)


def test_ray_engine_reports_unreadable_images(tmp_path, local_ray):
    from index_build.encode_common import BadImagesError

    ckpt = tmp_path / "micro.safetensors"
    micro_checkpoint(ckpt, seed=0)
    cat = make_catalogue(tmp_path / "w", 16, prefix="b")
    (tmp_path / "w" / "bingmap" / "b00012.png").write_bytes(b"not an image")
    out = tmp_path / "idx"
    with pytest.raises(BadImagesError, match="b00012"):
        run_build(BuildOptions(catalog=str(cat), checkpoint=str(ckpt), out=str(out), batch_size=4, shard_size=8,
                               progress=False, device="cpu", engine="ray"))
    assert not os.path.lexists(out)
    vdir = tmp_path / "idx.versions" / ".build" / "vectors"
    assert (vdir / "shard-00000.json").is_file() and not (vdir / "shard-00001.json").exists()


def test_an_encoder_error_is_one_line_naming_its_cause(tmp_path, local_ray):
    """A failure inside a Ray actor (here: its shard's file can not be written) is an EncoderFailed naming the
    cause, not Ray's 80-150 lines of wrapped traceback; the shards finished are kept."""
    from index_build.encode_common import EncoderFailed

    ckpt = tmp_path / "micro.safetensors"
    micro_checkpoint(ckpt, seed=0)
    cat = make_catalogue(tmp_path / "w", 16, prefix="c")
    opts = dict(catalog=str(cat), checkpoint=str(ckpt), out=str(tmp_path / "idx"), batch_size=4, shard_size=8,
                progress=False, device="cpu", engine="ray")
    run_build(BuildOptions(**opts, stop_after="encode"))
    vdir = tmp_path / "idx.versions" / ".build" / "vectors"
    for name in ("shard-00001.npy", "shard-00001.json"):
        (vdir / name).unlink()
    (vdir / "shard-00001.npy").mkdir()  # where the second shard goes
    with pytest.raises(EncoderFailed, match=r"^a Ray encoder failed: IsADirectoryError: .*shard-00001\.npy'; the "
                                            r"shards finished are kept for --resume$"):
        run_build(BuildOptions(**opts, resume=True))
    assert (vdir / "shard-00000.json").is_file()

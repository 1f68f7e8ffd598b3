"""model.index_artifact: the one reader of index artifacts (service, evaluation, index_build verify).
Every refusal names the file (and line or key) at fault."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from model import index_artifact as ia


def _artifact(root, count: int = 3, dim: int = 4):
    root.mkdir()
    vectors = np.eye(count, dim, dtype=np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    faiss.write_index(index, str(root / ia.INDEX_FILE))
    (root / "vectors").mkdir()
    np.save(root / "vectors" / "shard-00000.npy", vectors)
    np.save(root / ia.ORIENTATION_FILE, np.zeros((count, 8, 2), np.float16))
    rows = [f"t{i},{47 + i / 1000},{8 + i / 1000},tiles/{i}.png" for i in range(count)]
    (root / ia.TILES_FILE).write_text("tile_id,lat,lon,source\n" + "\n".join(rows) + "\n")
    manifest = {"format_version": 1, "model_fingerprint": "f" * 16, "embedding_dim": dim, "metric": "inner_product",
                "count": count, "index_type": "flat", "built_at": "2026-12-03T00:00:00Z",
                "shards": [{"file": "vectors/shard-00000.npy", "rows": count}],
                "orientation": {"file": ia.ORIENTATION_FILE, "columns": 8, "dim": 2}}
    (root / ia.MANIFEST_FILE).write_text(json.dumps(manifest))
    return manifest


def test_a_whole_artifact_reads_back(tmp_path):
    root = tmp_path / "a"
    _artifact(root)
    manifest = ia.read_manifest(root)
    ia.check_model(root, manifest, "f" * 16, 4)
    tiles = ia.read_tiles(root, manifest)
    assert tiles.tile_ids == ["t0", "t1", "t2"] and tiles.latlon.shape == (3, 2) and tiles.sources[2] == "tiles/2.png"
    assert ia.read_faiss_index(root, manifest).ntotal == 3
    assert ia.read_orientation(root, manifest).shape == (3, 8, 2)
    np.testing.assert_array_equal(ia.read_vectors(root, manifest), np.eye(3, 4, dtype=np.float32))


@pytest.mark.parametrize("damage, expected", [
    (lambda root, m: m.pop("built_at"), "manifest.json: manifest lacks built_at"),
    (lambda root, m: m.update(format_version=2), "format_version 2 is not supported"),
    (lambda root, m: m.update(metric="l2"), "metric 'l2', expected 'inner_product'"),
    (lambda root, m: m.update(count="3"), "count/embedding_dim are not integers"),
    (lambda root, m: (root / ia.TILES_FILE).write_text("tile_id,lat,lon,source\nt0,47,8,a\nt1,north,8,b\nt2,47,8,c\n"),
     "tiles.csv:3: lat/lon are not numbers"),
    (lambda root, m: (root / ia.TILES_FILE).write_text("tile_id,lat,lon,source\nt0,47,8,a\nt0,47,8,b\nt2,47,8,c\n"),
     "tiles.csv: tile_id values are not unique"),
    (lambda root, m: (root / ia.TILES_FILE).write_text("tile_id,lat,source\nt0,47,a\n"), "missing column(s) lon"),
    (lambda root, m: m.update(count=4), "index.faiss: 3 vectors, manifest count is 4"),
    (lambda root, m: np.save(root / ia.ORIENTATION_FILE, np.zeros((2, 8, 2), np.float16)),
     "orientation.npy: shape [2, 8, 2], manifest.json says [3, 8, 2]"),
    (lambda root, m: m["shards"].append({"file": "vectors/shard-00000.npy", "rows": 3}),
     "6 stored vectors, manifest count is 3"),
])
def test_a_damaged_artifact_is_refused_naming_what_is_wrong(tmp_path, damage, expected):
    root = tmp_path / "a"
    manifest = _artifact(root)
    damage(root, manifest)
    (root / ia.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ia.ArtifactError) as err:
        manifest = ia.read_manifest(root)
        ia.read_faiss_index(root, manifest)
        ia.read_tiles(root, manifest)
        ia.read_orientation(root, manifest)
        ia.read_vectors(root, manifest)
    assert expected in str(err.value)


def test_an_artifact_of_another_model_is_refused(tmp_path):
    root = tmp_path / "a"
    manifest = _artifact(root)
    with pytest.raises(ia.FingerprintMismatch, match="built for model fingerprint f{16}, but the loaded"):
        ia.check_model(root, manifest, "0" * 16)
    with pytest.raises(ia.ArtifactError, match="embedding_dim 4 differs from the model's 8"):
        ia.check_model(root, manifest, "f" * 16, 8)
    with pytest.raises(ia.ArtifactError, match="no manifest.json"):
        ia.read_manifest(tmp_path)


def test_views_are_grouped_by_their_tile_only_in_an_artifact_with_views(tmp_path):
    """A `tile` column makes rows views of tiles only with the manifest's centres_m (index_build tile
    --centres-m); elsewhere it is catalogue metadata. A tile whose own row was skipped at build (an
    unreadable image) is named by its first view, so the artifact still loads."""
    from model.index_artifact import read_tiles

    (tmp_path / "tiles.csv").write_text("tile_id,lat,lon,source,tile\n"
                                        "a,47.0,8.0,,a\na.e10n0,47.0,8.0001,,a\n"
                                        "b.e-10n0,47.001,8.0,,b\nb.e10n0,47.001,8.0002,,b\nc,47.002,8.0,,x\n")
    plain = read_tiles(tmp_path, {"count": 5})
    assert plain.tile_of.tolist() == [0, 1, 2, 3, 4] and plain.views_per_tile == 1
    views = read_tiles(tmp_path, {"count": 5, "centres_m": 10.0})
    assert views.tile_of.tolist() == [0, 0, 2, 2, 4] and views.views_per_tile == 2
    # index.faiss holds each tile's own row (the first view of b, whose own row was skipped): rows 0, 2, 4
    assert views.searched_rows.tolist() == [0, 2, 4] and plain.searched_rows.tolist() == [0, 1, 2, 3, 4]
    grouped = ia.TileViews.of(views.tile_of)
    assert grouped.rows([2, 0]).tolist() == [4, 0, 1] and grouped.rows([1]).tolist() == [2, 3]
    assert read_tiles(tmp_path, {"count": 5, "centres_m": 10.0, "index_rows": 3}).searched_rows.tolist() == [0, 2, 4]
    with pytest.raises(ia.ArtifactError, match=r"tiles.csv: 3 tiles, manifest index_rows is 4"):
        read_tiles(tmp_path, {"count": 5, "centres_m": 10.0, "index_rows": 4})


def test_an_index_of_views_holds_its_tiles_and_one_built_when_it_held_every_view_is_refused(tmp_path):
    """With views the manifest's index_rows says how many rows index.faiss holds (one a tile); an artifact of
    views without it was built when index.faiss held every view, and is refused with the fix."""
    manifest = _artifact(tmp_path / "a")
    with_views = {**manifest, "centres_m": 10.0}
    with pytest.raises(ia.ArtifactError, match=r"manifest.json: views every 10.0 m but no index_rows: .*rebuild it"):
        ia.read_faiss_index(tmp_path / "a", with_views)
    assert ia.read_faiss_index(tmp_path / "a", {**with_views, "index_rows": 3}).ntotal == 3
    with pytest.raises(ia.ArtifactError, match=r"index.faiss: 3 vectors, manifest index_rows \(its tiles\) is 2"):
        ia.read_faiss_index(tmp_path / "a", {**with_views, "index_rows": 2})
    for bad in (0, 4, "3", 2.5):
        with pytest.raises(ia.ArtifactError, match=r"index_rows must be an integer from 1 to the count 3"):
            ia.read_faiss_index(tmp_path / "a", {**with_views, "index_rows": bad})


def test_stored_vectors_are_read_a_few_rows_at_a_time_across_shards(tmp_path):
    """StoredVectors (the service's view vectors, memory-mapped) gives the rows asked for, in their order, from
    any shard; a shard of another dtype or shape, or shards that do not add up to the count, are refused."""
    manifest = _artifact(tmp_path / "a", count=3, dim=4)
    vectors = np.arange(28, dtype=np.float32).reshape(7, 4)
    np.save(tmp_path / "a" / "vectors" / "shard-00000.npy", vectors[:3])
    np.save(tmp_path / "a" / "vectors" / "shard-00001.npy", vectors[3:])
    manifest.update(count=7, shards=[{"file": "vectors/shard-00000.npy", "rows": 3},
                                     {"file": "vectors/shard-00001.npy", "rows": 4}])
    stored = ia.StoredVectors(tmp_path / "a", manifest)
    for rows in ([6, 0, 4, 2], [1, 2], [5, 3], []):
        np.testing.assert_array_equal(stored.take(np.array(rows, np.int64)), vectors[rows].reshape(-1, 4))
    np.testing.assert_array_equal(ia.read_vectors(tmp_path / "a", manifest), vectors)
    np.save(tmp_path / "a" / "vectors" / "extra.npy", vectors[:1])
    one_more = [*manifest["shards"], {"file": "vectors/extra.npy", "rows": 1}]
    with pytest.raises(ia.ArtifactError, match="8 stored vectors, manifest count is 7"):
        ia.StoredVectors(tmp_path / "a", {**manifest, "shards": one_more})
    np.save(tmp_path / "a" / "vectors" / "shard-00001.npy", vectors[3:].astype(np.float16))
    with pytest.raises(ia.ArtifactError, match=r"shard-00001.npy: float16 \[4, 4\], manifest.json says float32"):
        ia.StoredVectors(tmp_path / "a", manifest)

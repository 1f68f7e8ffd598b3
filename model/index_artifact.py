"""Reading an index artifact directory (docs/INTERFACES.md, "Index artifact directory").

index_build writes artifacts; the service, ``model.evaluate --index`` and ``index_build verify``
read them, all through this one reader so that they agree on what a valid artifact is. Callers
resolve the published symlink once and pass the resolved directory, so that every file comes from
the same version. FAISS is imported only where an index file is read (it is an optional extra).
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
TILES_FILE = "tiles.csv"
ORIENTATION_FILE = "orientation.npy"  # only for a checkpoint with an orientation head
# What a reader needs; index_build writes more (model_config, index_params, shards, catalog_sha256, ...)
REQUIRED_MANIFEST_KEYS = ("format_version", "model_fingerprint", "embedding_dim", "metric", "count",
                          "index_type", "built_at")
REQUIRED_TILE_COLUMNS = ("tile_id", "lat", "lon", "source")


class ArtifactError(RuntimeError):
    """The artifact can not be used: missing/corrupt files or inconsistent with itself."""


class FingerprintMismatch(ArtifactError):
    """The artifact was built with another model than the one loaded."""


def read_manifest(directory: str | Path) -> dict:
    """``directory``/manifest.json, checked for the keys, format version and metric readers rely on."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: no {MANIFEST_FILE} (not an index artifact?)") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: manifest is not a JSON object")
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest['format_version']!r} is not supported "
                            f"(this code reads {FORMAT_VERSION})")
    if manifest["metric"] != "inner_product":
        raise ArtifactError(f"{path}: metric {manifest['metric']!r}, expected 'inner_product'")
    if not all(type(manifest[key]) is int for key in ("count", "embedding_dim")):
        raise ArtifactError(f"{path}: manifest count/embedding_dim are not integers")
    return manifest


def check_model(directory: str | Path, manifest: dict, fingerprint: str, embedding_dim: int | None = None) -> None:
    """FingerprintMismatch unless the artifact was built with the model of ``fingerprint``."""
    if manifest["model_fingerprint"] != fingerprint:
        raise FingerprintMismatch(
            f"index artifact {directory} was built for model fingerprint {manifest['model_fingerprint']}, "
            f"but the loaded checkpoint has fingerprint {fingerprint}; rebuild the index with this "
            "checkpoint (python -m index_build build ...) or use the checkpoint it was built with")
    if embedding_dim is not None and manifest["embedding_dim"] != embedding_dim:
        raise ArtifactError(f"{directory}: embedding_dim {manifest['embedding_dim']} differs from the model's "
                            f"{embedding_dim}")


@dataclass(frozen=True)
class TileTable:
    """tiles.csv: row i describes vector i of the index."""

    tile_ids: list[str]
    lat: np.ndarray  # float64 degrees
    lon: np.ndarray
    sources: list[str]
    # row of the tile each row belongs to: itself, or with views between tile centres (index_build tile
    # --centres-m: a `tile` column and the manifest's centres_m) the row of its tile's own centre
    tile_of: np.ndarray

    @property
    def views_per_tile(self) -> int:
        return int(np.bincount(self.tile_of).max())

    @property
    def searched_rows(self) -> np.ndarray:
        """The rows index.faiss holds, in its order (faiss id i is row ``searched_rows[i]``): every row, or with
        views each tile's own row only (`TileViews`)."""
        return np.unique(self.tile_of)

    @property
    def latlon(self) -> np.ndarray:
        return np.column_stack([self.lat, self.lon])


def read_tiles(directory: str | Path, manifest: dict) -> TileTable:
    """The artifact's tiles.csv: as many rows as the manifest counts, unique ids, valid coordinates."""
    path = Path(directory) / TILES_FILE
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_TILE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ArtifactError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = [(row["tile_id"], *_lat_lon(row, f"{path}:{line}"), row["source"] or "", row.get("tile") or "")
                    for line, row in enumerate(reader, start=2)]
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ArtifactError(f"{path}: unreadable: {exc}") from None
    if len(rows) != manifest["count"]:
        raise ArtifactError(f"{path}: {len(rows)} rows, manifest count is {manifest['count']}")
    if not rows:
        raise ArtifactError(f"{directory}: the index is empty")
    tile_ids, lat, lon, sources, tiles = zip(*rows)
    row_of = {tid: i for i, tid in enumerate(tile_ids)}
    if len(row_of) != len(tile_ids):
        raise ArtifactError(f"{path}: tile_id values are not unique")
    tile_of = np.arange(len(rows))
    if manifest.get("centres_m") is not None:  # views of tiles (a `tile` column elsewhere is plain metadata)
        tile_of = tile_rows_of(tile_ids, tiles)
        tiles_found = len(np.unique(tile_of))
        if manifest.get("index_rows") not in (None, tiles_found):
            raise ArtifactError(f"{path}: {tiles_found} tiles, manifest index_rows is {manifest['index_rows']}")
    return TileTable(list(tile_ids), np.asarray(lat, np.float64), np.asarray(lon, np.float64), list(sources), tile_of)


def tile_rows_of(tile_ids: list[str] | tuple[str, ...], tiles: list[str] | tuple[str, ...]) -> np.ndarray:
    """The row of each row's tile, from the rows' ids and their `tile` column (views: the row whose tile_id
    it names; a tile whose own row was skipped as unreadable is named by its first view; empty: itself)."""
    row_of = {tile_id: i for i, tile_id in enumerate(tile_ids)}
    first: dict[str, int] = {}
    return np.array([first.setdefault(t, row_of.get(t, i)) if t else i for i, t in enumerate(tiles)], np.int64)


VIEW_TILES = 200  # with views: the tiles found by their own row whose every view is then scored


@dataclass(frozen=True)
class TileViews:
    """Rows grouped by tile, for an artifact whose rows are views of tiles (index_build tile --centres-m):
    index.faiss holds each tile's own row (`TileTable.searched_rows`), and once a search has found a tile by
    it, all of the tile's views are scored. Tile ``t`` is faiss id ``t``; its rows are ``order[starts[t]:
    starts[t + 1]]``."""

    tile_rows: np.ndarray  # [tiles] ascending: faiss id -> row
    order: np.ndarray  # [rows] the rows grouped by tile, tiles in faiss id order
    starts: np.ndarray  # [tiles + 1]

    @classmethod
    def of(cls, tile_of: np.ndarray) -> "TileViews":
        order = np.argsort(tile_of, kind="stable")
        tile_rows, counts = np.unique(tile_of, return_counts=True)
        return cls(tile_rows, order, np.concatenate([[0], np.cumsum(counts)]))

    def rows(self, tiles: np.ndarray) -> np.ndarray:
        """Every row (view) of the tiles with these faiss ids, tile by tile."""
        tiles = np.asarray(tiles, np.int64)
        if not len(tiles):
            return np.empty(0, np.int64)
        return np.concatenate([self.order[self.starts[t]:self.starts[t + 1]] for t in tiles])


def _lat_lon(row: dict, where: str) -> tuple[float, float]:
    try:
        lat, lon = float(row["lat"]), float(row["lon"])
    except (TypeError, ValueError):
        raise ArtifactError(f"{where}: lat/lon are not numbers") from None
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        raise ArtifactError(f"{where}: lat/lon out of range ({lat}, {lon})")
    return lat, lon


_FAISS_LOCATION = re.compile(r"^Error in .*? at \S+:\d+:", re.S)


def read_faiss_index(directory: str | Path, manifest: dict):
    """The artifact's FAISS index, consistent with its manifest, with the query-time parameters the
    manifest names (nprobe, efSearch) set."""
    import faiss

    count, dim = searched_count(directory, manifest), manifest["embedding_dim"]
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        index = faiss.read_index(str(path))
    except Exception as exc:  # FAISS prefixes its C++ function and source location: not for users
        raise ArtifactError(f"{path}: unreadable FAISS index: {_FAISS_LOCATION.sub('', str(exc)).strip()}") from None
    if index.d != dim:
        raise ArtifactError(f"{path}: dimension {index.d}, manifest says {dim}")
    if index.ntotal != count:
        held = "index_rows (its tiles)" if "index_rows" in manifest else "count"
        raise ArtifactError(f"{path}: {index.ntotal} vectors, manifest {held} is {count}")
    if count == 0:
        raise ArtifactError(f"{directory}: the index is empty")
    space = faiss.ParameterSpace()
    for name, value in (manifest.get("index_params") or {}).items():
        if name in ("nprobe", "efSearch"):
            try:
                space.set_index_parameter(index, name, float(value))
            except Exception:  # the index type has no such parameter; harmless
                pass
    return index


def searched_count(directory: str | Path, manifest: dict) -> int:
    """How many rows index.faiss holds: the manifest's count, or with views its ``index_rows`` (one a tile).
    An artifact with views and no index_rows was built when index.faiss held every view: refused."""
    if manifest.get("centres_m") is None:
        return manifest["count"]
    rows = manifest.get("index_rows")
    if rows is None:
        raise ArtifactError(f"{Path(directory) / MANIFEST_FILE}: views every {manifest['centres_m']} m but no "
                            "index_rows: built before index.faiss held one row a tile; rebuild it (python -m "
                            "index_build build ...)")
    if type(rows) is not int or not 0 < rows <= manifest["count"]:
        raise ArtifactError(f"{Path(directory) / MANIFEST_FILE}: index_rows must be an integer from 1 to the "
                            f"count {manifest['count']}, got {rows!r}")
    return rows


def check_orientation_phases(directory: str | Path, entry: dict) -> int:
    """The manifest's orientation "phases" (1 when absent): a positive integer dividing its "columns"; an
    ArtifactError naming the manifest otherwise."""
    phases, columns = entry.get("phases", 1), entry.get("columns")
    if type(phases) is not int or phases < 1 or (isinstance(columns, int) and columns % phases):
        raise ArtifactError(f"{Path(directory) / MANIFEST_FILE}: orientation phases must be a positive integer "
                            f"dividing its {columns!r} columns, got {phases!r}")
    return phases


def read_orientation(directory: str | Path, manifest: dict,
                     column_shape: tuple[int, int] | None = None) -> np.ndarray | None:
    """The tiles' orientation features (memory-mapped), when the manifest lists them: [count, columns, dim],
    or [count, phases, columns / phases, dim] for tiles encoded at sub-column phases (index_build build
    --tile-phases; model.orientation.phase_columns); with ``column_shape``, the (columns, dim) of the model's
    own column features, which each phase must match."""
    entry = manifest.get("orientation")
    if not entry:
        return None
    path = Path(directory) / str(entry.get("file", ORIENTATION_FILE))
    phases = check_orientation_phases(directory, entry)
    try:
        columns = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing, manifest.json lists orientation columns") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable orientation features: {exc}") from None
    expected = [manifest["count"], entry.get("columns"), entry.get("dim")]
    if list(columns.shape) != expected:
        raise ArtifactError(f"{path}: shape {list(columns.shape)}, manifest.json says {expected} "
                            "(count, orientation columns, dim)")
    per_phase = (columns.shape[1] // phases, columns.shape[2])
    if column_shape is not None and per_phase != tuple(column_shape):
        raise ArtifactError(f"{path}: orientation features of {list(per_phase)} (columns, dim)"
                            f"{f' at each of {phases} phases' if phases > 1 else ''}, the "
                            f"model's orientation head gives {list(column_shape)}; rebuild the index with this "
                            "checkpoint (python -m index_build build ...)")
    return columns if phases == 1 else columns.reshape(len(columns), phases, *per_phase)


def iter_vector_shards(directory: str | Path, manifest: dict,
                       mmap: bool = False) -> Iterator[tuple[dict, np.ndarray]]:
    """Each embedding shard's manifest entry and its tile descriptors [rows, dim] float32, in tiles.csv
    order, one shard in memory at a time (``mmap``: memory-mapped as stored, which must then be float32); an
    ArtifactError for a shard that can not be read, and at the end where the shards' rows do not add up to the
    manifest's count."""
    rows = 0
    for entry in manifest.get("shards") or []:
        try:
            vectors = np.load(Path(directory) / entry["file"], mmap_mode="r" if mmap else None)
        except (KeyError, OSError, ValueError) as exc:
            raise ArtifactError(f"{directory}: unreadable embedding shard: {exc}") from None
        expected = [entry.get("rows", len(vectors)), manifest["embedding_dim"]]
        if mmap and vectors.dtype != np.float32:
            raise ArtifactError(f"{Path(directory) / entry['file']}: {vectors.dtype} {list(vectors.shape)}, "
                                f"manifest.json says float32 {expected} (rows, embedding_dim)")
        # memory-mapped: the mapped pages as a plain array, without np.memmap's slower indexing
        vectors = np.asarray(vectors) if mmap else vectors.astype(np.float32, copy=False)
        if list(vectors.shape) != expected:
            raise ArtifactError(f"{Path(directory) / entry['file']}: shape {list(vectors.shape)}, manifest.json says "
                                f"{expected} (rows, embedding_dim)")
        rows += len(vectors)
        yield entry, vectors
    if rows != manifest["count"]:
        raise ArtifactError(f"{directory}: {rows} stored vectors, manifest count is {manifest['count']}")


class StoredVectors:
    """The artifact's embedding shards memory-mapped, read a few rows at a time (`take`): with views the service
    scores the views of the tiles a search found without holding every view's vector in memory."""

    def __init__(self, directory: str | Path, manifest: dict):
        self.shards = [vectors for _, vectors in iter_vector_shards(directory, manifest, mmap=True)]
        self.starts = np.cumsum([0, *(len(shard) for shard in self.shards)])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (tiles.csv order), float32 [len(rows), dim], in that order."""
        rows = np.asarray(rows, np.int64)
        shard_of = np.searchsorted(self.starts[1:-1], rows, side="right")
        if len(rows) and (shard_of == shard_of[0]).all():  # a tile's views are neighbouring rows: often one shard
            return np.take(self.shards[shard_of[0]], rows - self.starts[shard_of[0]], axis=0)
        out = np.empty((len(rows), self.shards[0].shape[1]), np.float32)
        for s, shard in enumerate(self.shards):
            picked = np.flatnonzero(shard_of == s)
            out[picked] = np.take(shard, rows[picked] - self.starts[s], axis=0)
        return out


def read_vectors(directory: str | Path, manifest: dict) -> np.ndarray:
    """The stored tile descriptors [count, dim] float32 from the embedding shards, in tiles.csv order."""
    return np.concatenate([vectors for _, vectors in iter_vector_shards(directory, manifest)])

"""Reading an index artifact directory (docs/INTERFACES.md, "Index artifact directory").

The service only reads files here; it never imports index_build. Everything is read from the
*resolved* directory (symlinks followed once, up front), so a publish that swaps the symlink or the
directory while we read can not hand us files from two different artifacts; the manifest is
re-checked at the end to catch a swap that happened underneath us.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from model.metrics import TILE_FOOTPRINT_M, match_margin, refine_position, rows_within
from model.orientation import RERANK_CANDIDATES, rerank

from .schemas import IndexInfo, TileMatch

SUPPORTED_FORMAT_VERSIONS = {1}
REQUIRED_MANIFEST_KEYS = (
    "format_version", "model_fingerprint", "embedding_dim", "metric", "count", "index_type",
    "built_at",
)
REQUIRED_TILE_COLUMNS = ("tile_id", "lat", "lon", "source")

log = logging.getLogger("service.artifact")


class ArtifactError(Exception):
    """The artifact can not be served: missing/corrupt files or inconsistent with itself."""


class FingerprintMismatch(ArtifactError):
    """The artifact was built with another model than the one loaded."""


class ArtifactChanged(ArtifactError):
    """The artifact was replaced while we read it; try again."""


@dataclass(frozen=True)
class Signature:
    """Identity of a published artifact as seen on disk (cheap to compute, for the watcher)."""

    resolved: str
    manifest_inode: int
    manifest_mtime_ns: int
    manifest_size: int

    @classmethod
    def of(cls, path: Path) -> "Signature":
        resolved = Path(os.path.realpath(path))
        st = os.stat(resolved / "manifest.json")
        return cls(str(resolved), st.st_ino, st.st_mtime_ns, st.st_size)


CANDIDATES = 20  # matches searched per image at least: the confidence looks past the k asked for
DISTINCT_M = 150.0  # a competing match this far from the best one is another place


@dataclass(frozen=True)
class Answer:
    """One image's answer: its ranked matches and how clearly the best one wins."""

    matches: list[TileMatch]
    margin: float | None  # model.metrics.match_margin
    competitor: str | None  # tile id of the best match at least DISTINCT_M from the best
    position: tuple[float, float, float] | None = None  # model.metrics.refine_position: lat, lon, uncertainty_m
    within: int | None = None  # with a geographic prior: how many tiles lie within its radius


@dataclass(frozen=True)
class Near:
    """A geographic prior: only tiles within ``radius_m`` of (lat, lon) are searched."""

    lat: float
    lon: float
    radius_m: float
    source: str  # parameter | exif


@dataclass(frozen=True, eq=False)
class ServedIndex:
    """One artifact held in memory: the FAISS index, its tile table and the descriptions the
    answers carry, all made at load. Immutable: a reload makes a new one."""

    path: Path  # the resolved artifact directory
    signature: Signature
    public_manifest: dict  # what GET /v1/index shows: no host name, no directories
    info: IndexInfo
    index: "faiss.Index"
    tile_ids: list[str]
    lat: np.ndarray
    lon: np.ndarray
    sources: list[str]
    row_of: dict[str, int] = field(repr=False)
    orientation: np.ndarray | None = field(default=None, repr=False)  # [count, columns, dim] float16
    gpu_resources: object = field(default=None, repr=False)  # must outlive a GPU index
    # FAISS GPU indexes must not be searched from several threads at once; CPU ones may be
    search_lock: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext, repr=False)
    tile_m: float = TILE_FOOTPRINT_M  # the tiles' footprint (manifest tile_m), for the refined position

    @property
    def count(self) -> int:
        return len(self.tile_ids)

    @property
    def generation(self) -> int:
        return self.info.generation

    def answer(self, vectors: np.ndarray, columns: np.ndarray | None, seen: np.ndarray, k: int,
               near: list[Near | None] | None = None) -> list[Answer | Exception]:
        """Each query row's top ``k`` tiles, best first, with the view's heading at each tile where
        both the model (``columns``: the view's column features [n, W, C]; ``seen`` [n, pixel
        columns] what each view covers) and this index have orientation features. A row with a
        prior in ``near`` is searched exactly among the tiles within its radius only. With both column
        features, the best RERANK_CANDIDATES (or k) tiles are re-ranked by descriptor and column alignment
        (model.orientation.rerank): their scores are then the combined ones. A row whose answer fails
        gets its exception in its place; the other rows are answered."""
        oriented = columns is not None and self.orientation is not None
        n = min(max(k, CANDIDATES, RERANK_CANDIDATES if oriented else 0), self.count)
        near = near or [None] * len(vectors)
        free = [i for i, prior in enumerate(near) if prior is None]
        hits = {}
        if free:
            with self.search_lock:
                hits.update(zip(free, zip(*self.index.search(np.ascontiguousarray(vectors[free]), n))))
        answers: list[Answer | Exception] = []
        for i, prior in enumerate(near):
            try:
                answers.append(self._answer_one(vectors[i], None if columns is None else columns[i], seen[i],
                                                hits.get(i), prior, k, n))
            except Exception as exc:
                answers.append(exc)
        return answers

    def _answer_one(self, vector: np.ndarray, columns: np.ndarray | None, seen: np.ndarray,
                    hit: tuple[np.ndarray, np.ndarray] | None, prior: Near | None, k: int, n: int) -> Answer:
        within = None
        if prior is not None:
            rows = rows_within(self.lat, self.lon, prior.lat, prior.lon, prior.radius_m)
            within = len(rows)
            with self.search_lock:
                hit = self._search_among(vector, rows, n)
        scores, rows = hit  # type: ignore[misc]
        found = rows >= 0
        scores, rows = scores[found], rows[found]
        if columns is not None and self.orientation is not None and len(rows):
            ranked = rerank(scores, columns, self.orientation[rows].astype(np.float32), seen)
            scores, rows = ranked.scores.astype(np.float32), rows[ranked.order]
            headings = [float(h) for h in ranked.headings[:k]]
        else:
            headings = [None] * min(k, len(rows))
        top = rows[:k]
        latlon = np.column_stack([self.lat[rows], self.lon[rows]])
        margin, j = match_margin(scores, latlon, DISTINCT_M)
        position = refine_position(scores, latlon, self.tile_m) if len(rows) else None
        matches = [TileMatch.model_construct(rank=rank, tile_id=self.tile_ids[r], lat=float(self.lat[r]),
                                             lon=float(self.lon[r]), score=float(sc), heading_deg=h)
                   for rank, (sc, r, h) in enumerate(zip(scores.tolist(), top.tolist(), headings), start=1)]
        return Answer(matches, margin, None if j is None else self.tile_ids[rows[j]], position, within)

    def _search_among(self, vector: np.ndarray, rows: np.ndarray, n: int,
                      chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """The top ``n`` of ``rows`` for one query vector, exactly: an IVF index scans all its lists
        with only these ids allowed; any other reads their vectors back (exact for flat and HNSW)."""
        if len(rows) == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            selector = faiss.IDSelectorBatch(rows.astype(np.int64))
            params = faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nlist)
            scores, found = self.index.search(vector[None], min(n, len(rows)), params=params)
            return scores[0], found[0]
        best_scores, best_rows = np.empty(0, np.float32), np.empty(0, np.int64)
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            scores = np.concatenate([best_scores, self.index.reconstruct_batch(part) @ vector])
            candidates = np.concatenate([best_rows, part])
            order = np.argsort(-scores, kind="stable")[:n]
            best_scores, best_rows = scores[order], candidates[order]
        return best_scores, best_rows


def _read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: no manifest.json (not an index artifact?)") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: manifest is not a JSON object")
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactError(
            f"{path}: format_version {manifest['format_version']!r} is not supported "
            f"(this service reads {sorted(SUPPORTED_FORMAT_VERSIONS)})"
        )
    if manifest["metric"] != "inner_product":
        raise ArtifactError(f"{path}: metric {manifest['metric']!r}, expected 'inner_product'")
    if not all(type(manifest[key]) is int for key in ("count", "embedding_dim")):
        raise ArtifactError(f"{path}: manifest count/embedding_dim are not integers")
    return manifest


def _read_tiles(path: Path, expected: int) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """tiles.csv: (tile ids, latitudes, longitudes, sources), ``expected`` rows of them."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_TILE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ArtifactError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = [(row["tile_id"], *_lat_lon(row, f"{path}:{line}"), row["source"] or "")
                    for line, row in enumerate(reader, start=2)]
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ArtifactError(f"{path}: unreadable: {exc}") from None
    if len(rows) != expected:
        raise ArtifactError(f"{path}: {len(rows)} rows, manifest count is {expected}")
    tile_ids, lat, lon, sources = zip(*rows)  # (the manifest's count is above 0)
    return list(tile_ids), np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64), list(sources)


def _lat_lon(row: dict, where: str) -> tuple[float, float]:
    try:
        lat, lon = float(row["lat"]), float(row["lon"])
    except (TypeError, ValueError):
        raise ArtifactError(f"{where}: lat/lon are not numbers") from None
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        raise ArtifactError(f"{where}: lat/lon out of range ({lat}, {lon})")
    return lat, lon


def _apply_search_params(index: "faiss.Index", params: dict) -> None:
    """Carry query-time parameters named in the manifest (nprobe, efSearch) onto the index."""
    space = faiss.ParameterSpace()
    for name in ("nprobe", "efSearch"):
        if name in params:
            try:
                space.set_index_parameter(index, name, float(params[name]))
            except Exception:  # the index type has no such parameter; harmless
                pass


_FAISS_LOCATION = re.compile(r"^Error in .*? at \S+:\d+:", re.S)


def _read_index(directory: Path, manifest: dict) -> "faiss.Index":
    """The artifact's FAISS index, consistent with its manifest, with its query-time parameters."""
    count, dim = manifest["count"], manifest["embedding_dim"]
    index_file = directory / "index.faiss"
    if not index_file.is_file():
        raise ArtifactError(f"{index_file}: missing")
    try:
        index = faiss.read_index(str(index_file))
    except Exception as exc:  # FAISS prefixes its C++ function and source location: not for users
        reason = _FAISS_LOCATION.sub("", str(exc)).strip()
        raise ArtifactError(f"{index_file}: unreadable FAISS index: {reason}") from None
    if index.d != dim:
        raise ArtifactError(f"{index_file}: dimension {index.d}, manifest says {dim}")
    if index.ntotal != count:
        raise ArtifactError(f"{index_file}: {index.ntotal} vectors, manifest count is {count}")
    if count == 0:
        raise ArtifactError(f"{directory}: the index is empty")
    _apply_search_params(index, manifest.get("index_params") or {})
    return index


def load_artifact(path: Path, *, expected_fingerprint: str, embedding_dim: int, generation: int,
                  gpu: int | None = None) -> ServedIndex:
    """Load and validate the artifact at ``path`` for a model with the given fingerprint; with
    ``gpu`` (a CUDA device number) its FAISS index is moved there where this FAISS build can."""
    path = Path(path)
    try:
        signature = Signature.of(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no index artifact there (missing manifest.json)") from None
    directory = Path(signature.resolved)
    manifest = _read_manifest(directory)
    if manifest["model_fingerprint"] != expected_fingerprint:
        raise FingerprintMismatch(
            f"index artifact {directory} was built for model fingerprint {manifest['model_fingerprint']}, "
            f"but the loaded checkpoint has fingerprint {expected_fingerprint}; rebuild the index with this "
            "checkpoint (python -m index_build build ...) or serve the checkpoint it was built with")
    if manifest["embedding_dim"] != embedding_dim:
        raise ArtifactError(f"{directory}: embedding_dim {manifest['embedding_dim']} differs from the model's "
                            f"{embedding_dim}")
    index = _read_index(directory, manifest)
    count = manifest["count"]
    tile_ids, lat, lon, sources = _read_tiles(directory / "tiles.csv", count)
    row_of = {tile_id: row for row, tile_id in enumerate(tile_ids)}
    if len(row_of) != count:
        raise ArtifactError(f"{directory / 'tiles.csv'}: tile_id values are not unique")
    try:  # a publish that swapped the artifact underneath us: read the new one
        if Signature.of(path) != signature:
            raise ArtifactChanged(f"{path}: artifact replaced while loading")
    except FileNotFoundError:
        raise ArtifactChanged(f"{path}: artifact moved away while loading") from None
    orientation = _read_orientation(directory, manifest, count)
    resources = None
    if gpu is not None:
        index, resources = _to_gpu(index, gpu)
    info = IndexInfo(
        model_fingerprint=manifest["model_fingerprint"], count=count, embedding_dim=embedding_dim,
        metric=manifest["metric"], index_type=str(manifest["index_type"]), built_at=str(manifest["built_at"]),
        catalog_sha256=manifest.get("catalog_sha256"), generation=generation)
    lock = threading.Lock() if resources is not None else contextlib.nullcontext()
    return ServedIndex(path=directory, signature=signature, public_manifest=public_manifest(manifest), info=info,
                       index=index, tile_ids=tile_ids, lat=lat, lon=lon, sources=sources, row_of=row_of,
                       orientation=orientation, gpu_resources=resources, search_lock=lock,
                       tile_m=float(manifest.get("tile_m") or TILE_FOOTPRINT_M))


def _read_orientation(directory: Path, manifest: dict, count: int) -> np.ndarray | None:
    """The tiles' orientation features (memory-mapped), when the artifact has them."""
    entry = manifest.get("orientation")
    if not entry:
        return None
    path = directory / str(entry.get("file", "orientation.npy"))
    try:
        columns = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable orientation features: {exc}") from None
    expected = (count, entry.get("columns"), entry.get("dim"))
    if columns.ndim != 3 or tuple(columns.shape) != expected:
        raise ArtifactError(f"{path}: shape {columns.shape}, the manifest says {list(expected)}")
    return columns


def _to_gpu(index: "faiss.Index", device: int):
    """The index on GPU ``device`` when this FAISS build has GPU support, else unchanged."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index, None
    try:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, device, index), resources
    except Exception:  # an index type without a GPU implementation: searched on the CPU
        log.warning("FAISS index stays on the CPU (no GPU version of %s)", type(index).__name__)
        return index, None


# An absolute POSIX path up to its last component: "/srv/data/index/tiles.csv" -> "tiles.csv".
_DIRECTORIES = re.compile(r"(?<![\w.~/-])/(?:[^/\s:'\",;()\[\]]+/)+")


def public_text(text: str) -> str:
    """``text`` without the directories of any absolute path in it: for answers that anyone who
    can reach the service reads (/readyz, 409s), where the log keeps the full text."""
    return _DIRECTORIES.sub("", text)


def public_manifest(manifest: dict) -> dict:
    """The manifest as GET /v1/index shows it: no host names, paths reduced to their file names."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in ("host", "hostname")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return public_text(value) if isinstance(value, str) else value

    return clean(manifest)

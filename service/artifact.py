"""The index being served: an artifact (docs/INTERFACES.md, read by model.index_artifact) held in
memory, and the answers it gives (search, re-rank, confidence, refined position).

Everything is read from the *resolved* directory (symlinks followed once, up front), so a publish
that swaps the symlink or the directory while we read can not hand us files from two different
artifacts; the manifest is re-checked at the end to catch a swap that happened underneath us.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
# torch before faiss: torch's OpenMP runtime, loaded first, then serves faiss too; loaded after faiss's,
# each keeps its own threads and a search's spinning ones slow the next forward (a 2-thread batch-1
# forward 6.5 -> 10.5 ms with a search after each; bench/RESULTS.md, "Service load")
import torch
import faiss

from model.index_artifact import (
    VIEW_TILES, ArtifactError, StoredVectors, TileViews, check_model, read_faiss_index, read_manifest,
    read_orientation, read_tiles,
)
from model.metrics import TILE_FOOTPRINT_M, match_margin, refine_position, rows_within
from model.orientation import rerank, rerank_candidates

from .schemas import IndexInfo, TileMatch

log = logging.getLogger("service.artifact")


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
GPU_MAX_K = 2048  # the most results one FAISS GPU search returns
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
    # [count, columns, dim] float16, or [count, phases, columns, dim] (index_build build --tile-phases)
    orientation: np.ndarray | None = field(default=None, repr=False)
    gpu_resources: object = field(default=None, repr=False)  # must outlive a GPU index
    # FAISS GPU indexes must not be searched from several threads at once; CPU ones may be
    search_lock: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext, repr=False)
    tile_m: float = TILE_FOOTPRINT_M  # the tiles' footprint (manifest tile_m), for the refined position
    # with views between tile centres (index_build tile --centres-m): the row of each row's tile, the rows
    # grouped by tile (the FAISS index holds each tile's own row) and every row's vector (memory-mapped), else None
    tile_of: np.ndarray | None = field(default=None, repr=False)
    views_per_tile: int = 1
    views: TileViews | None = field(default=None, repr=False)
    vectors: StoredVectors | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return len(self.tile_ids)

    @property
    def tile_phases(self) -> int:
        """The sub-column phases its tiles' column features were stored at (1 without them)."""
        return self.orientation.shape[1] if self.orientation is not None and self.orientation.ndim == 4 else 1

    @property
    def generation(self) -> int:
        return self.info.generation

    def answer(self, vectors: np.ndarray, columns: np.ndarray | None, seen: np.ndarray, ks: list[int],
               near: list[Near | None] | None = None,
               heading_within: list[float | None] | None = None) -> list[Answer | Exception]:
        """Each query row's top ``ks[i]`` tiles, best first, with the view's heading at each tile where
        both the model (``columns``: the view's column features [n, W, C], or [n, T, W, C] encoded at T
        sub-column phases, `model.orientation.view_phase_scores`; ``seen`` [n, pixel
        columns] what each view covers) and this index have orientation features. A row with a
        prior in ``near`` is searched exactly among the tiles within its radius only. A view placed at a
        given heading, trusted to ``heading_within[i]`` degrees (None: the heading is searched), aligns with
        the tiles only at the shifts (and the sub-column phases, where the index stores them) within that many
        degrees of it; one whose heading is searched, at every phase and shift. With both column
        features, the best `rerank_candidates` (or k) tiles are re-ranked by descriptor and column alignment
        (model.orientation.rerank): their scores are then the combined ones. Each row looks at as many
        candidates as it would alone, whatever its batch-mates ask for. With views the FAISS index finds
        the best VIEW_TILES (or k) tiles by their own rows and those tiles' best views are the candidates. A
        row whose answer fails gets its exception in its place; the other rows are answered."""
        oriented = columns is not None and self.orientation is not None
        near = near or [None] * len(vectors)
        heading_within = heading_within or [None] * len(vectors)
        # with views, as many tiles' worth of rows: the answer for k <= CANDIDATES does not depend on k
        looked_at = [min(max(max(k, CANDIDATES) * self.views_per_tile, rerank_candidates(within) if oriented else 0),
                         self.count) for k, within in zip(ks, heading_within)]
        # what the FAISS index is asked for: those rows, or with views the tiles; a GPU index returns <= GPU_MAX_K
        most = self.index.ntotal if self.gpu_resources is None else min(self.index.ntotal, GPU_MAX_K)
        searched = [min(n if self.views is None else max(VIEW_TILES, k), most) for n, k in zip(looked_at, ks)]
        free = [i for i, prior in enumerate(near) if prior is None]
        hits = {}
        if free:
            with self.search_lock:
                found = self.index.search(np.ascontiguousarray(vectors[free]), max(searched[i] for i in free))
            hits = {i: (scores[:searched[i]], ids[:searched[i]]) for i, scores, ids in zip(free, *found)}
        answers: list[Answer | Exception] = []
        for i, prior in enumerate(near):
            try:
                answers.append(self._answer_one(vectors[i], columns[i] if oriented else None, seen[i], hits.get(i),
                                                prior, ks[i], searched[i], looked_at[i], heading_within[i]))
            except Exception as exc:
                answers.append(exc)
        return answers

    def _answer_one(self, vector: np.ndarray, columns: np.ndarray | None, seen: np.ndarray,
                    hit: tuple[np.ndarray, np.ndarray] | None, prior: Near | None, k: int, searched: int, n: int,
                    heading_within: float | None = None) -> Answer:
        within = None
        if prior is not None:
            held = slice(None) if self.views is None else self.views.tile_rows  # the rows FAISS ids stand for
            ids = rows_within(self.lat[held], self.lon[held], prior.lat, prior.lon, prior.radius_m)
            within = len(ids)
            with self.search_lock:
                hit = self._search_among(vector, ids, searched)
        scores, ids = hit  # type: ignore[misc]
        found = ids >= 0
        scores, rows = self._candidates(vector, scores[found], ids[found], n)
        headings = None
        if columns is not None and len(rows):  # columns: given where the index has orientation features too
            ranked = rerank(scores, columns, rows_as_float32(self.orientation, rows), seen, within_deg=heading_within)
            scores, rows, headings = ranked.scores.astype(np.float32), rows[ranked.order], ranked.headings
        best = np.arange(min(k, len(rows)))  # the ranked rows the matches show
        tiles = rows
        if self.tile_of is not None:  # views: each tile once, at its best view, named and placed as the tile
            tiles = self.tile_of[rows]
            best = np.sort(np.unique(tiles, return_index=True)[1])[:k]
        latlon = np.column_stack([self.lat[rows], self.lon[rows]])
        margin, j = match_margin(scores, latlon, DISTINCT_M)
        position = refine_position(scores, latlon, self.tile_m) if len(rows) else None
        matches = [TileMatch.model_construct(rank=rank, tile_id=self.tile_ids[tiles[b]], lat=float(self.lat[tiles[b]]),
                                             lon=float(self.lon[tiles[b]]), score=float(scores[b]),
                                             heading_deg=None if headings is None else float(headings[b]))
                   for rank, b in enumerate(best.tolist(), start=1)]
        return Answer(matches, margin, None if j is None else self.tile_ids[tiles[j]], position, within)

    def _candidates(self, vector: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows a search's FAISS ids found, best first by descriptor: the ids themselves, or with views the
        best ``n`` views of the tiles found, each scored exactly."""
        if self.views is None:
            return scores, ids
        rows = self.views.rows(ids)
        view_scores = self.vectors.take(rows) @ vector
        best = np.argsort(-view_scores, kind="stable")[:n]
        return view_scores[best], rows[best]

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


def rows_as_float32(store: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``store[rows]`` of a float16 store (a read-only memory map), as float32: converted by torch, several times
    faster than numpy (800 rows of 4 phases' columns: about 2 ms against 9 on the 2-vCPU VM; bench/RESULTS.md,
    "More candidates for a given heading")."""
    picked = np.ascontiguousarray(store[rows])  # a copy: writable
    if not picked.dtype.isnative:  # torch takes native byte order only
        picked = picked.astype(picked.dtype.newbyteorder("="))
    return torch.from_numpy(picked).to(torch.float32).numpy()


def load_artifact(path: Path, *, expected_fingerprint: str, embedding_dim: int, generation: int,
                  column_shape: tuple[int, int] | None = None, gpu: int | None = None) -> ServedIndex:
    """Load and validate the artifact at ``path`` for a model with the given fingerprint (and column
    features of ``column_shape``: model.config.L2LTRConfig.column_shape); with ``gpu`` (a CUDA device
    number) its FAISS index is moved there where this FAISS build can."""
    path = Path(path)
    try:
        signature = Signature.of(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no index artifact there (missing manifest.json)") from None
    directory = Path(signature.resolved)
    manifest = read_manifest(directory)
    check_model(directory, manifest, expected_fingerprint, embedding_dim)
    index = read_faiss_index(directory, manifest)
    tiles = read_tiles(directory, manifest)
    try:  # a publish that swapped the artifact underneath us: read the new one
        if Signature.of(path) != signature:
            raise ArtifactChanged(f"{path}: artifact replaced while loading")
    except FileNotFoundError:
        raise ArtifactChanged(f"{path}: artifact moved away while loading") from None
    orientation = read_orientation(directory, manifest, column_shape)
    resources = None
    if gpu is not None:
        index, resources = _to_gpu(index, gpu)
    info = IndexInfo(
        model_fingerprint=manifest["model_fingerprint"], count=manifest["count"], embedding_dim=embedding_dim,
        metric=manifest["metric"], index_type=str(manifest["index_type"]), built_at=str(manifest["built_at"]),
        catalog_sha256=manifest.get("catalog_sha256"), generation=generation)
    lock = threading.Lock() if resources is not None else contextlib.nullcontext()
    return ServedIndex(path=directory, signature=signature, public_manifest=public_manifest(manifest), info=info,
                       index=index, tile_ids=tiles.tile_ids, lat=tiles.lat, lon=tiles.lon, sources=tiles.sources,
                       row_of={tile_id: row for row, tile_id in enumerate(tiles.tile_ids)},
                       orientation=orientation, gpu_resources=resources, search_lock=lock,
                       tile_m=float(manifest.get("tile_m") or TILE_FOOTPRINT_M), **_views(directory, manifest, tiles))


def _views(directory: Path, manifest: dict, tiles) -> dict:
    """ServedIndex's tile_of, views_per_tile, views and vectors: the defaults unless rows are views of tiles."""
    if tiles.views_per_tile == 1:
        return {}
    return {"tile_of": tiles.tile_of, "views_per_tile": tiles.views_per_tile, "views": TileViews.of(tiles.tile_of),
            "vectors": StoredVectors(directory, manifest)}


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


def public_text(text: str, directories: Iterable[str | Path] = ()) -> str:
    """``text`` without the directories of any absolute path in it: for answers that anyone who
    can reach the service reads (/readyz, 409s), where the log keeps the full text. ``directories``
    are taken out first, whole: the pattern stops at a space, colon or bracket in a name."""
    for directory in sorted({os.path.join(os.path.abspath(d), "") for d in directories}, key=len, reverse=True):
        if directory != os.sep:
            text = text.replace(directory, "")
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

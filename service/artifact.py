"""Reading an index artifact directory (docs/INTERFACES.md, "Index artifact directory").

The service only reads files here; it never imports index_build. Everything is read from the
*resolved* directory (symlinks followed once, up front), so a publish that swaps the symlink or the
directory while we read can not hand us files from two different artifacts; the manifest is
re-checked at the end to catch a swap that happened underneath us.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

SUPPORTED_FORMAT_VERSIONS = {1}
REQUIRED_MANIFEST_KEYS = (
    "format_version", "model_fingerprint", "embedding_dim", "metric", "count", "index_type",
    "built_at",
)
REQUIRED_TILE_COLUMNS = ("tile_id", "lat", "lon", "source")


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


@dataclass
class LoadedIndex:
    """One artifact held in memory: the FAISS index plus tile metadata, immutable once built."""

    path: Path
    signature: Signature
    manifest: dict
    index: "faiss.Index"
    tile_ids: list[str]
    lat: np.ndarray
    lon: np.ndarray
    sources: list[str]
    row_of: dict[str, int] = field(repr=False)
    generation: int = 0
    gpu_resources: object = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return len(self.tile_ids)

    def info(self) -> dict:
        m = self.manifest
        return {
            "model_fingerprint": m["model_fingerprint"],
            "count": self.count,
            "embedding_dim": int(m["embedding_dim"]),
            "metric": m["metric"],
            "index_type": str(m["index_type"]),
            "built_at": str(m["built_at"]),
            "catalog_sha256": m.get("catalog_sha256"),
            "generation": self.generation,
        }


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
    return manifest


def _read_tiles(path: Path, expected: int) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    tile_ids: list[str] = []
    lats: list[float] = []
    lons: list[float] = []
    sources: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_TILE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ArtifactError(f"{path}: missing column(s) {', '.join(missing)}")
            for line, row in enumerate(reader, start=2):
                try:
                    lat, lon = float(row["lat"]), float(row["lon"])
                except (TypeError, ValueError):
                    raise ArtifactError(f"{path}:{line}: lat/lon are not numbers") from None
                if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
                    raise ArtifactError(f"{path}:{line}: lat/lon out of range ({lat}, {lon})")
                tile_ids.append(row["tile_id"])
                lats.append(lat)
                lons.append(lon)
                sources.append(row["source"] or "")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ArtifactError(f"{path}: unreadable: {exc}") from None
    if len(tile_ids) != expected:
        raise ArtifactError(f"{path}: {len(tile_ids)} rows, manifest count is {expected}")
    return tile_ids, np.asarray(lats, dtype=np.float64), np.asarray(lons, dtype=np.float64), sources


def _apply_search_params(index: "faiss.Index", params: dict) -> None:
    """Carry query-time parameters named in the manifest (nprobe, efSearch) onto the index."""
    space = faiss.ParameterSpace()
    for name in ("nprobe", "efSearch"):
        if name in params:
            try:
                space.set_index_parameter(index, name, float(params[name]))
            except Exception:  # the index type has no such parameter; harmless
                pass


def _open(path: Path, expected_fingerprint: str, embedding_dim: int) -> tuple[Signature, Path, dict]:
    """Signature, resolved directory and manifest of the artifact at ``path``, checked against
    the model (fingerprint, dimension)."""
    try:
        signature = Signature.of(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no index artifact there (missing manifest.json)") from None
    directory = Path(signature.resolved)
    manifest = _read_manifest(directory)
    if manifest["model_fingerprint"] != expected_fingerprint:
        raise FingerprintMismatch(
            f"index artifact {directory} was built for model fingerprint "
            f"{manifest['model_fingerprint']}, but the loaded checkpoint has fingerprint "
            f"{expected_fingerprint}; rebuild the index with this checkpoint "
            "(python -m index_build build ...) or serve the checkpoint it was built with"
        )
    try:
        int(manifest["count"])
        dim = int(manifest["embedding_dim"])
    except (TypeError, ValueError):
        raise ArtifactError(f"{directory}: manifest count/embedding_dim are not integers") from None
    if dim != embedding_dim:
        raise ArtifactError(
            f"{directory}: embedding_dim {dim} differs from the model's {embedding_dim}"
        )
    return signature, directory, manifest


def _read_index(directory: Path, manifest: dict) -> "faiss.Index":
    """The artifact's FAISS index, consistent with its manifest, with its query-time parameters."""
    count, dim = int(manifest["count"]), int(manifest["embedding_dim"])
    index_file = directory / "index.faiss"
    if not index_file.is_file():
        raise ArtifactError(f"{index_file}: missing")
    try:
        index = faiss.read_index(str(index_file))
    except Exception as exc:
        raise ArtifactError(f"{index_file}: unreadable FAISS index: {exc}") from None
    if index.d != dim:
        raise ArtifactError(f"{index_file}: dimension {index.d}, manifest says {dim}")
    if index.ntotal != count:
        raise ArtifactError(f"{index_file}: {index.ntotal} vectors, manifest count is {count}")
    if count == 0:
        raise ArtifactError(f"{directory}: the index is empty")
    _apply_search_params(index, manifest.get("index_params") or {})
    return index


def _check_unchanged(path: Path, signature: Signature) -> None:
    """The manifest re-checked at the end: a publish that swapped the artifact underneath us."""
    try:
        if Signature.of(path) != signature:
            raise ArtifactChanged(f"{path}: artifact replaced while loading")
    except FileNotFoundError:
        raise ArtifactChanged(f"{path}: artifact moved away while loading") from None


def load_artifact(path: Path, *, expected_fingerprint: str, embedding_dim: int) -> LoadedIndex:
    """Load and validate the artifact at ``path`` for a model with the given fingerprint."""
    path = Path(path)
    signature, directory, manifest = _open(path, expected_fingerprint, embedding_dim)
    index = _read_index(directory, manifest)
    count = int(manifest["count"])
    tile_ids, lat, lon, sources = _read_tiles(directory / "tiles.csv", count)
    row_of = {tile_id: row for row, tile_id in enumerate(tile_ids)}
    if len(row_of) != count:
        raise ArtifactError(f"{directory / 'tiles.csv'}: tile_id values are not unique")
    _check_unchanged(path, signature)
    return LoadedIndex(
        path=directory, signature=signature, manifest=manifest, index=index, tile_ids=tile_ids,
        lat=lat, lon=lon, sources=sources, row_of=row_of,
    )


def load_search_index(path: Path, *, expected_signature: Signature, expected_fingerprint: str,
                      embedding_dim: int) -> "faiss.Index":
    """Only the FAISS index of an artifact that ``load_artifact`` has already read whole (an
    encoder process's copy: the tile table stays with the service), provided it is still the very
    same artifact."""
    path = Path(path)
    signature, directory, manifest = _open(path, expected_fingerprint, embedding_dim)
    if signature != expected_signature:
        raise ArtifactChanged(f"{path}: artifact replaced since the service loaded it")
    index = _read_index(directory, manifest)
    _check_unchanged(path, signature)
    return index

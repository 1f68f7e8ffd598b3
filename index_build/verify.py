"""`verify`: re-encode a random sample of the artifact's tiles and check them against the stored
vectors, orientation columns (where the artifact has them) and the index (self-retrieval), plus the
artifact's internal consistency."""
from __future__ import annotations

import hashlib
import os
from functools import partial

import numpy as np

from index_build.artifact import read_built_manifest, resolve_artifact
from index_build.encode_common import decode_tile
from index_build.sources import sha256_file
from index_build.workdir import COLUMNS_DTYPE
from model.index_artifact import (ORIENTATION_FILE, ArtifactError, check_orientation_phases, iter_vector_shards,
                                  read_faiss_index, read_orientation, read_tiles)

# Columns are stored as float16: rounding moves each component by at most 2^-11 of itself (less
# than 2^-25 in absolute terms below float16's normal range), so a unit column of C <= 1024
# components, renormalised, loses well under 1e-6 of cosine to it. Added to the tolerance.
FLOAT16_COSINE_LOSS = 1e-6
TIE_DEPTH = 64  # results searched per sampled tile first; deeper where its copies fill them all


def _search_own(index, vectors: np.ndarray, rows: np.ndarray, n: int):
    """index.search of each sampled tile's vector: (scores, ids, own [k, TIE_DEPTH] bool: the result is the
    tile's own id). A tile whose copies fill every result and push its own id further down is searched
    again, alone and deeper, until its own id or a lower score shows: own[i, 0] then says whether its
    own id ties with the first."""
    scores, ids = index.search(vectors, min(TIE_DEPTH, n))
    own = ids == rows[:, None]
    for i in np.flatnonzero(~own.any(axis=1) & (scores[:, -1] >= scores[:, 0] - 1e-6)):
        depth = min(2 * TIE_DEPTH, n)
        while True:
            deep_scores, deep_ids = index.search(vectors[i:i + 1], depth)
            found = np.flatnonzero(deep_ids[0] == rows[i])
            if found.size or depth == n or deep_scores[0, -1] < deep_scores[0, 0] - 1e-6:
                break
            depth = min(2 * depth, n)
        if found.size and deep_scores[0, found[0]] >= deep_scores[0, 0] - 1e-6:
            own[i, -1] = True  # found as high as the first, where the first results could not show it
            scores[i, -1] = deep_scores[0, found[0]]
    return scores, ids, own


def _check_files(root: str, manifest: dict, problems: list[str], report: dict) -> None:
    """tiles.csv and index.faiss against the manifest's checksums (artifacts built since they are recorded)."""
    recorded = manifest.get("checksums")
    if recorded is None:
        report["checksums"] = "not recorded (built before index_build recorded them): tiles.csv and index.faiss unchecked"
        return
    for name, expected in sorted(recorded.items()):
        try:
            actual = sha256_file(os.path.join(root, name))
        except OSError:
            continue  # unreadable: the reader's problem names it
        if actual != expected:
            problems.append(f"{name}: checksum differs from the manifest (edited or replaced since the build)")


def _problem(root: str, exc: ArtifactError) -> str:
    """An ArtifactError of the shared reader as a problem, its paths relative to the artifact."""
    text = str(exc).replace(os.path.join(root, ""), "")
    return text.removeprefix(f"{root}: ")


def _read(root: str, reader, manifest: dict, problems: list[str]):
    """reader(root, manifest) of model.index_artifact; None, with its refusal added to `problems`, when
    it refuses the artifact."""
    try:
        return reader(root, manifest)
    except ArtifactError as exc:
        problems.append(_problem(root, exc))
        return None


def _check_orientation(stored: np.ndarray, entry: dict, problems: list[str], check_checksum: bool) -> bool:
    """Whether the orientation columns read by read_orientation have the manifest's dtype and checksum;
    the reasons they do not are added to `problems`."""
    name = entry.get("file", ORIENTATION_FILE)
    if stored.dtype != COLUMNS_DTYPE or entry.get("dtype") != stored.dtype.name:
        problems.append(f"{name}: dtype {stored.dtype}, manifest.json says {entry.get('dtype')}")
        return False
    if check_checksum and "sha256" in entry:
        digest = hashlib.sha256()
        for start in range(0, stored.shape[0], 16_384):
            digest.update(np.ascontiguousarray(stored[start:start + 16_384]).tobytes())
        if digest.hexdigest() != entry["sha256"]:
            problems.append(f"{name}: checksum differs from the manifest")
    return True


def _stored_rows(root: str, manifest: dict, *, rows: np.ndarray, problems: list[str],
                 check_checksums: bool) -> tuple[np.ndarray, int]:
    """The stored descriptors of `rows` (ascending) and how many rows the shards hold, read one shard at a
    time (a country's shards need not fit in memory together), each checked against its manifest checksum
    (a mismatch added to `problems`); ArtifactError where the shared reader refuses a shard."""
    picked, start = [], 0
    for entry, vectors in iter_vector_shards(root, manifest):
        digest = hashlib.sha256(np.ascontiguousarray(vectors).data).hexdigest() if check_checksums else None
        if digest not in (None, entry.get("sha256")):
            problems.append(f"{entry['file']}: checksum differs from the manifest")
        picked.append(vectors[rows[(rows >= start) & (rows < start + len(vectors))] - start])
        start += len(vectors)
    return np.concatenate(picked) if picked else np.zeros((0, manifest["embedding_dim"]), np.float32), start


def run_verify(artifact: str, checkpoint: str, *, sample: int = 64, seed: int = 0, device: str = "auto",
               batch_size: int = 64, model_config: str | None = None, min_rank1: float = 0.99,
               tolerance: float | None = None, check_checksums: bool = True) -> dict:
    """The artifact read through model.index_artifact, as the service reads it: whatever that reader
    refuses is a problem, and the sample is re-encoded only when it reads every file."""
    import torch

    from model import load_checkpoint
    from model.encode import pick_device
    from model.inference import InferenceEncoder

    root = resolve_artifact(artifact)  # resolve once: every file below comes from the same version
    problems: list[str] = []
    report: dict = {"artifact": root}
    try:
        manifest = read_built_manifest(root)
    except ArtifactError as exc:
        return {**report, "ok": False, "problems": [_problem(root, exc)]}
    report.update(count=manifest["count"], index_type=manifest["index_type"])

    if check_checksums:
        _check_files(root, manifest, problems, report)
    tiles = _read(root, read_tiles, manifest, problems)
    index = _read(root, read_faiss_index, manifest, problems)
    n = manifest["count"] if tiles is None else len(tiles.tile_ids)
    k = min(sample, n)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, int)
    # faiss id i is row searched[i]: every row, or with views each tile's own
    searched = None if tiles is None else tiles.searched_rows
    if k and searched is not None and len(searched) < n:  # views: as many tiles again for self-retrieval
        rows = np.union1d(rows, rng.choice(searched, size=min(k, len(searched)), replace=False))
        k = len(rows)
    stored = _read(root, partial(_stored_rows, rows=rows, problems=problems, check_checksums=check_checksums),
                   manifest, problems)
    orientation = _read(root, read_orientation, manifest, problems)
    if orientation is not None and not _check_orientation(orientation, manifest["orientation"], problems,
                                                          check_checksums):
        orientation = None
    if tiles is None or index is None or stored is None:
        report.update(ok=False, problems=problems)
        return report
    stored, shard_rows = stored
    report["counts"] = {"manifest": manifest["count"], "tiles.csv": n, "index": int(index.ntotal),
                        "shards": shard_rows}

    dev = pick_device(device)
    model = load_checkpoint(checkpoint, config=model_config)
    fingerprint = model.fingerprint()
    report["model_fingerprint"] = fingerprint
    if fingerprint != manifest["model_fingerprint"]:
        problems.append(f"model fingerprint {fingerprint} != artifact's {manifest['model_fingerprint']}")
        report.update(ok=False, problems=problems)
        return report
    entry = manifest.get("orientation")
    try:  # re-encoded at the artifact's own tile phases
        phases = check_orientation_phases(root, entry) if entry else 1
    except ArtifactError:
        phases = 1  # reported above with orientation.npy's problems
    model = InferenceEncoder(model, dev, branches=("aerial",), tile_phases=phases)
    columns = model.column_shape
    if entry is not None and (entry.get("columns"), entry.get("dim")) != (columns or (None, None)):
        has = f"{columns[0]} x {columns[1]} columns" if columns else "no orientation head"
        problems.append(f"manifest.json: orientation columns {entry.get('columns')} x {entry.get('dim')}, "
                        f"the checkpoint has {has}")
        orientation = None
    report["orientation"] = {"stored": entry is not None, "model_head": columns is not None}
    if entry is None and columns is not None:
        report["orientation"]["note"] = ("the checkpoint has an orientation head but the artifact stores no "
                                         "orientation columns (built before index_build wrote them?): "
                                         "rebuild it to give the service headings")


    fresh, fresh_columns, decode_failures = [], [], []
    for b in range(0, k, batch_size):
        tensors = []
        for row in rows[b:b + batch_size]:
            tensor, error = decode_tile(tiles.sources[row], model.config)
            if tensor is None:
                decode_failures.append(f"row {row} {tiles.tile_ids[row]}: {error}")
                tensor = torch.zeros(3, *model.config.aerial_size, dtype=torch.uint8)
            tensors.append(tensor)
        if tensors:
            encoded, cols = model.encode_uint8_with_columns(torch.stack(tensors), "aerial")
            fresh.append(encoded)
            if cols is not None:
                fresh_columns.append(cols)
    fresh = np.concatenate(fresh) if fresh else np.zeros((0, manifest["embedding_dim"]), np.float32)
    if decode_failures:
        problems.append(f"{len(decode_failures)} sampled image(s) no longer decode: {decode_failures[:5]}")

    tol = tolerance if tolerance is not None else (2e-2 if dev.type == "cuda" else 1e-4)
    cosine = np.sum(fresh * stored, axis=1) if k else np.zeros(0)
    report["vectors"] = {"sampled": int(k), "min_cosine": float(cosine.min()) if k else None,
                         "max_abs_diff": float(np.abs(fresh - stored).max()) if k else None, "tolerance": tol}
    mismatched = int(np.sum(cosine < 1.0 - tol))
    if mismatched:
        problems.append(f"{mismatched} of {k} re-encoded vector(s) differ from the stored ones (cosine < 1 - {tol})")

    if orientation is not None and k and fresh_columns:
        report["orientation"].update(_compare_columns(np.concatenate(fresh_columns), orientation, rows, tol,
                                                      problems))

    held = np.isin(rows, searched)
    if held.any():
        ids_of_rows = np.searchsorted(searched, rows[held])
        scores, ids, own = _search_own(index, fresh[held], ids_of_rows, len(searched))
        hit1 = own[:, 0]
        # A tie: another tile comes first, but the tile's own id is returned as high (identical images).
        # An index whose ids are not tiles.csv's rows returns the tile's vector under another id: a miss.
        tie = (~hit1) & np.any(own & (scores >= scores[:, :1] - 1e-6), axis=1)
        rank1 = float(np.mean(hit1))
        report["self_retrieval"] = {"sampled": int(held.sum()), "rank1": rank1,
                                    "rank1_with_ties": float(np.mean(hit1 | tie)),
                                    "top10": float(np.mean(np.any(own[:, :10], axis=1))), "ties": int(tie.sum())}
        if float(np.mean(hit1 | tie)) < min_rank1:
            problems.append(f"self-retrieval rank-1 {rank1:.4f} below {min_rank1}")
    report["ok"] = not problems
    report["problems"] = problems
    return report


def _compare_columns(fresh: np.ndarray, stored_all: np.ndarray, rows: np.ndarray, tol: float,
                     problems: list[str]) -> dict:
    """Per column, the cosine between re-encoded columns [k, Wg, C] and the stored float16 ones of
    the same tiles; every column of every sampled tile must reach 1 - tol - FLOAT16_COSINE_LOSS."""
    stored = np.asarray(stored_all[rows], dtype=np.float32)
    stored = stored.reshape(len(stored), -1, stored.shape[-1])  # tile phases side by side, as re-encoded
    norms = np.linalg.norm(stored, axis=2)
    cosine = np.sum(fresh * stored, axis=2) / np.maximum(norms, np.finfo(np.float32).tiny)
    limit = tol + FLOAT16_COSINE_LOSS
    mismatched = int(np.sum(np.any(cosine < 1.0 - limit, axis=1)))
    if mismatched:
        problems.append(f"{ORIENTATION_FILE}: {mismatched} of {len(rows)} re-encoded tile(s) have orientation "
                        f"columns that differ from the stored ones (a column's cosine < 1 - {limit:g})")
    return {"sampled": int(len(rows)), "min_cosine": float(cosine.min()), "tolerance": limit}

"""`verify`: re-encode a random sample of the artifact's tiles and check them against the stored
vectors and against the index (self-retrieval), plus the artifact's internal consistency."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from index_build.artifact import INDEX_FILE, TILES_FILE, ArtifactError, read_manifest, resolve_artifact
from index_build.encode_common import decode_tile
from index_build.sources import read_tiles_csv


def run_verify(artifact: str, checkpoint: str, *, sample: int = 64, seed: int = 0, device: str = "auto",
               batch_size: int = 64, model_config: str | None = None, min_rank1: float = 0.99,
               tolerance: float | None = None, check_checksums: bool = True) -> dict:
    import faiss
    import torch

    from model import load_checkpoint
    from model.encode import pick_device
    from model.inference import InferenceEncoder

    root = resolve_artifact(artifact)  # resolve once: every file below comes from the same version
    manifest = read_manifest(root)
    problems: list[str] = []
    report: dict = {"artifact": root, "count": manifest["count"], "index_type": manifest["index_type"]}

    records, _extra = read_tiles_csv(os.path.join(root, TILES_FILE))
    index = faiss.read_index(os.path.join(root, INDEX_FILE))
    shard_rows = [e["rows"] for e in manifest["shards"]]
    counts = {"manifest": manifest["count"], "tiles.csv": len(records), "index": int(index.ntotal),
              "shards": int(sum(shard_rows))}
    report["counts"] = counts
    if len(set(counts.values())) != 1:
        problems.append(f"row counts disagree: {counts}")
    if index.d != manifest["embedding_dim"]:
        problems.append(f"index dim {index.d} != manifest embedding_dim {manifest['embedding_dim']}")
    if check_checksums:
        for entry in manifest["shards"]:
            arr = np.load(os.path.join(root, entry["file"]))
            if hashlib.sha256(np.ascontiguousarray(arr, np.float32).tobytes()).hexdigest() != entry["sha256"]:
                problems.append(f"{entry['file']}: checksum differs from the manifest")

    dev = pick_device(device)
    model = load_checkpoint(checkpoint, config=model_config)
    fingerprint = model.fingerprint()
    report["model_fingerprint"] = fingerprint
    if fingerprint != manifest["model_fingerprint"]:
        problems.append(f"model fingerprint {fingerprint} != artifact's {manifest['model_fingerprint']}")
        report.update(ok=False, problems=problems)
        return report
    model = InferenceEncoder(model, dev, branches=("aerial",))

    n = len(records)
    k = min(sample, n)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)) if k else np.zeros(0, int)
    starts = np.concatenate([[0], np.cumsum(shard_rows)])
    stored = np.zeros((k, manifest["embedding_dim"]), np.float32)
    cache: dict[int, np.ndarray] = {}
    for j, row in enumerate(rows):
        s = int(np.searchsorted(starts, row, side="right") - 1)
        if s not in cache:
            cache[s] = np.load(os.path.join(root, manifest["shards"][s]["file"]), mmap_mode="r")
        stored[j] = cache[s][row - starts[s]]

    fresh, decode_failures = [], []
    for b in range(0, k, batch_size):
        tensors = []
        for row in rows[b:b + batch_size]:
            tensor, error = decode_tile(records[row].source, model.config)
            if tensor is None:
                decode_failures.append(f"row {row} {records[row].tile_id}: {error}")
                tensor = torch.zeros(3, *model.config.aerial_size, dtype=torch.uint8)
            tensors.append(tensor)
        if tensors:
            fresh.append(model.encode_uint8(torch.stack(tensors), "aerial"))
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

    if k:
        topk = min(10, n)
        scores, ids = index.search(fresh, topk)
        own = rows[:, None]
        hit1 = ids[:, 0] == rows
        # A different tile whose vector scores as high as the tile itself (identical images) is a tie.
        own_score = np.sum(fresh * stored, axis=1)  # what the tile's own stored vector scores
        tie = (~hit1) & (scores[:, 0] <= own_score + 1e-6)
        rank1 = float(np.mean(hit1))
        report["self_retrieval"] = {"rank1": rank1, "rank1_with_ties": float(np.mean(hit1 | tie)),
                                    "top10": float(np.mean(np.any(ids == own, axis=1))), "ties": int(tie.sum())}
        if float(np.mean(hit1 | tie)) < min_rank1:
            problems.append(f"self-retrieval rank-1 {rank1:.4f} below {min_rank1}")
    report["ok"] = not problems
    report["problems"] = problems
    return report

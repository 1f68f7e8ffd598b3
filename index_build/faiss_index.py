"""Writer stage, part 1: choose, train, fill and tune the FAISS index.

All index types use inner product on unit vectors (= cosine). They are built with
faiss.index_factory from a factory string recorded in the manifest, so the exact structure of
every artifact can be rebuilt. With faiss-gpu and a visible GPU, training and adding run on the
GPU (same code, the index is cloned over and back); the index is always written as a CPU index.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger("index_build")

INDEX_TYPES = ("auto", "flat", "ivf-flat", "ivf-pq", "hnsw")
FLAT_MAX_TILES = 250_000            # exact search up to here: ~40 ms/query at 768-d on one CPU core
IVF_FLAT_MAX_TILES = 20_000_000     # beyond this (or beyond the memory budget) vectors get compressed
DEFAULT_MEMORY_BUDGET = 16 * 2 ** 30
HNSW_QUANTIZER_FROM_NLIST = 16_384  # coarse quantizer becomes an HNSW graph above this many lists (CPU)
PQ_CODE_SIZES = (8, 16, 24, 32, 48, 64, 96, 128)  # bytes per vector that CPU and GPU IVF-PQ both support


@dataclass
class IndexSpec:
    index_type: str
    factory: str
    params: dict = field(default_factory=dict)
    reason: str = ""

    def to_json(self) -> dict:
        return {"factory": self.factory, **self.params, "reason": self.reason}


def nlist_for(n: int) -> int:
    """IVF list count: a power of two in the FAISS guideline range 4*sqrt(N)..16*sqrt(N).

    The factor grows with N (4 below 1 M, 8 below 10 M, 16 above), and every list keeps at least
    39 training points so that k-means is well posed on small galleries.
    """
    if n <= 0:
        return 1
    factor = 4 if n < 1_000_000 else 8 if n < 10_000_000 else 16
    target = factor * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    return int(max(1, min(nlist, n // 39)))


def pq_code_size_for(dim: int, n: int, memory_budget: int, nlist: int) -> int:
    """Bytes per vector for IVF-PQ: one byte per 8 dims when the memory budget allows, fewer if not."""
    per_vector = (memory_budget - nlist * dim * 4 - dim * dim * 4) // max(n, 1) - 8  # 8: the stored id
    candidates = [m for m in PQ_CODE_SIZES if dim % m == 0 and m <= dim // 2]
    if not candidates:
        candidates = [m for m in range(1, dim + 1) if dim % m == 0 and m <= max(1, dim // 2)]
    fitting = [m for m in candidates if m <= min(max(1, dim // 8), per_vector)]
    return max(fitting) if fitting else min(candidates)


def choose_index(index_type: str, n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 nlist: int | None = None, pq_m: int | None = None, hnsw_m: int = 32,
                 use_gpu: bool = False, opq: bool = True) -> IndexSpec:
    """Resolve `index_type` (may be "auto") into a concrete IndexSpec for n vectors of dim."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    raw_bytes = n * dim * 4
    reason = f"requested {index_type}"
    if index_type == "auto":
        if n <= FLAT_MAX_TILES and raw_bytes <= memory_budget:
            index_type, reason = "flat", f"auto: N={n} <= {FLAT_MAX_TILES}, exact search"
        elif n <= IVF_FLAT_MAX_TILES and raw_bytes * 1.05 <= memory_budget:
            index_type, reason = "ivf-flat", (f"auto: N={n}, raw vectors {raw_bytes / 2**30:.2f} GiB fit the "
                                              f"{memory_budget / 2**30:.1f} GiB budget")
        else:
            index_type, reason = "ivf-pq", (f"auto: N={n}, raw vectors {raw_bytes / 2**30:.2f} GiB; compressed "
                                            f"to fit the {memory_budget / 2**30:.1f} GiB budget")
    if index_type == "flat":
        return IndexSpec("flat", "Flat", {"estimated_bytes": raw_bytes}, reason)
    if index_type == "hnsw":
        return IndexSpec("hnsw", f"HNSW{hnsw_m}", {"hnsw_m": hnsw_m, "ef_construction": 80,
                                                   "estimated_bytes": raw_bytes + n * hnsw_m * 2 * 4}, reason)
    lists = int(nlist) if nlist else nlist_for(n)
    quantizer = f"IVF{lists}"
    if lists > HNSW_QUANTIZER_FROM_NLIST and not use_gpu:
        quantizer = f"IVF{lists}_HNSW32"
    if index_type == "ivf-flat":
        return IndexSpec("ivf-flat", f"{quantizer},Flat",
                         {"nlist": lists, "estimated_bytes": raw_bytes + n * 8 + lists * dim * 4}, reason)
    m = int(pq_m) if pq_m else pq_code_size_for(dim, n, memory_budget, lists)
    if dim % m:
        divisors = ", ".join(str(d) for d in range(1, dim + 1) if dim % d == 0)
        raise ValueError(f"--pq-m {m}: the PQ code size must divide the model's embedding size {dim} "
                         f"(one of {divisors})")
    rotation = f"OPQ{m}," if opq else ""
    return IndexSpec("ivf-pq", f"{rotation}{quantizer},PQ{m}x8",
                     {"nlist": lists, "pq_m": m, "pq_bits": 8, "opq": bool(opq),
                      "estimated_bytes": n * (m + 8) + lists * dim * 4 + dim * dim * 4}, reason)


def check_trainable(spec: IndexSpec, n: int) -> None:
    """ValueError unless n vectors can train the index of ``spec``: k-means needs a vector for each
    IVF list, and PQ one for each of the 2^8 centroids of every sub-quantizer."""
    nlist = spec.params.get("nlist")
    if nlist and n < nlist:
        raise ValueError(f"--nlist {nlist}: an {spec.index_type} index with {nlist} lists needs at least "
                         f"{nlist} tiles, there are {n}")
    centroids = 2 ** spec.params.get("pq_bits", 0)
    if spec.index_type == "ivf-pq" and n < centroids:
        raise ValueError(f"--index ivf-pq needs at least {centroids} tiles to train its codebooks, there are "
                         f"{n}; use --index flat or ivf-flat")


# ---------------------------------------------------------------------------------------------

def _faiss():
    import faiss  # imported lazily: `info` and validation do not need it
    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class _Device:
    """Moves an index to the GPU for training/adding when one is usable, and back for writing."""

    def __init__(self, want_gpu: bool | None):
        self.use_gpu = gpu_available() if want_gpu is None else (want_gpu and gpu_available())
        self._res = None

    def place(self, index, spec: IndexSpec):
        if not self.use_gpu or spec.index_type not in ("ivf-flat", "ivf-pq"):
            return index, False  # flat gains nothing from a round trip; HNSW has no GPU version here
        faiss = _faiss()
        try:
            if self._res is None:
                self._res = faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            options.useFloat16LookupTables = spec.params.get("pq_m", 0) > 48
            return faiss.index_cpu_to_gpu(self._res, 0, index, options), True
        except Exception as exc:  # an index type/size the GPU build does not support: stay on CPU
            log.warning("faiss GPU clone failed (%s); training and adding on CPU", exc)
            return index, False

    @staticmethod
    def to_cpu(index, on_gpu: bool):
        return _faiss().index_gpu_to_cpu(index) if on_gpu else index


def sample_rows(blocks: Callable[[], Iterable[np.ndarray]], n: int, k: int, seed: int) -> np.ndarray:
    """k rows drawn uniformly without replacement from the n rows the block iterator yields."""
    k = min(k, n)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=k, replace=False))
    out, offset, j = [], 0, 0
    for block in blocks():
        hi = offset + block.shape[0]
        stop = np.searchsorted(chosen, hi, side="left")
        if stop > j:
            out.append(block[chosen[j:stop] - offset])
            j = stop
        offset = hi
        if j >= k:
            break
    return np.ascontiguousarray(np.concatenate(out) if out else np.zeros((0, 0), np.float32), dtype=np.float32)


def _ivf(index):
    faiss = _faiss()
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def build_index(spec: IndexSpec, dim: int, n: int, blocks: Callable[[], Iterable[np.ndarray]],
                use_gpu: bool | None = None, seed: int = 1234, kmeans_iters: int = 20,
                train_points_per_list: int = 64, progress: Callable[[int], None] | None = None):
    """Create, train (on a sample) and fill the index from `blocks()` (float32 unit rows, in order).

    Returns (cpu_index, info) where info holds timings and the training sample size.
    """
    faiss = _faiss()
    info: dict = {}
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _ivf(index)
    if ivf is not None:
        ivf.cp.spherical = True        # centroids on the unit sphere: right for cosine
        ivf.cp.niter = kmeans_iters
        ivf.cp.seed = seed
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # only for polysemous search, which we do not use; slow
    if spec.index_type == "hnsw":
        index.hnsw.efConstruction = spec.params.get("ef_construction", 80)
    device = _Device(use_gpu)
    index, on_gpu = device.place(index, spec)
    info["gpu"] = on_gpu
    t0 = time.perf_counter()
    if not index.is_trained:
        nlist = spec.params.get("nlist", 1)
        want = max(train_points_per_list * nlist, 256 * 40 if spec.index_type == "ivf-pq" else 0, 10_000)
        train = sample_rows(blocks, n, want, seed)
        if train.shape[0] < nlist:
            raise ValueError(f"{spec.index_type} with {nlist} lists needs at least {nlist} vectors, got {n}")
        if ivf is not None:
            ivf.cp.max_points_per_centroid = max(1, math.ceil(train.shape[0] / max(nlist, 1)))
        index.train(train)
        info["train_size"] = int(train.shape[0])
        del train
    info["train_seconds"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    added = 0
    for block in blocks():
        index.add(block)
        added += block.shape[0]
        if progress:
            progress(block.shape[0])
    if added != n:
        raise RuntimeError(f"added {added} vectors, expected {n}")
    info["add_seconds"] = round(time.perf_counter() - t0, 3)
    return device.to_cpu(index, on_gpu), info


def set_search_param(index, spec_type: str, value: int) -> None:
    faiss = _faiss()
    if spec_type in ("ivf-flat", "ivf-pq"):
        faiss.extract_index_ivf(index).nprobe = int(value)
    elif spec_type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(value)


def exact_topk(queries: np.ndarray, blocks: Callable[[], Iterable[np.ndarray]], k: int) -> np.ndarray:
    """Exact inner-product top-k ids of queries over all rows of blocks (streamed, bounded memory)."""
    nq = queries.shape[0]
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    offset = 0
    for block in blocks():
        scores = queries @ block.T
        kk = min(k, block.shape[0])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        s = np.take_along_axis(scores, part, axis=1)
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, part + offset], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_i = np.take_along_axis(cand_i, order, axis=1)
        offset += block.shape[0]
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / float(truth.shape[0] * k)


def tune_search(index, spec: IndexSpec, n: int, blocks: Callable[[], Iterable[np.ndarray]],
                target_recall: float = 0.95, k: int = 10, num_queries: int = 200, seed: int = 99) -> dict:
    """Smallest nprobe (IVF) / efSearch (HNSW) reaching target recall@k against exact search.

    Queries are a random sample of the indexed vectors themselves (the only queries an index
    build has); recall@k counts how many of the exact top-k the index returns. The chosen value is
    stored in the index file (FAISS serialises nprobe / efSearch) and in the manifest.
    """
    if spec.index_type == "flat" or n == 0:
        return {}
    k = min(k, n)
    # The exact ground truth costs queries x N x dim; keep it near 2e11 flops (a few CPU minutes).
    dim = next(iter(blocks())).shape[1]
    num_queries = int(max(20, min(num_queries, 2e11 // max(1, n * dim))))
    queries = sample_rows(blocks, n, num_queries, seed)
    truth = exact_topk(queries, blocks, k)
    if spec.index_type == "hnsw":
        candidates = [16, 32, 64, 128, 256, 512, 1024, 2048]
        name = "efSearch"  # the FAISS ParameterSpace name, as the service applies it
    else:
        nlist = spec.params["nlist"]
        candidates = sorted({min(nlist, 2 ** i) for i in range(0, int(math.log2(nlist)) + 2)})
        name = "nprobe"
    chosen, achieved, curve = candidates[-1], 0.0, []
    for value in candidates:
        set_search_param(index, spec.index_type, value)
        _, found = index.search(queries, k)
        r = recall_at_k(found, truth, k)
        curve.append([value, round(r, 4)])
        if r >= target_recall:
            chosen, achieved = value, r
            break
        chosen, achieved = value, r
    set_search_param(index, spec.index_type, chosen)
    result = {name: chosen, "tuned_recall_at_10" if k == 10 else f"tuned_recall_at_{k}": round(achieved, 4),
              "tuning_queries": int(queries.shape[0]), "tuning_query_source": "sample of the indexed vectors",
              "target_recall": target_recall, "tuning_curve": curve}
    if achieved < target_recall:
        log.warning("%s: recall@%d %.3f at the largest %s=%d, below the %.2f target",
                    spec.index_type, k, achieved, name, chosen, target_recall)
    return result

"""index_build benchmarks.

(a) encode: tiles/s of the build's encoding stage (catalogue -> decode + polar transform ->
    batched encode_aerial -> shard files; --workers 0: encoder lanes, >0: DataLoader workers)
    against the raw encoder alone (the same tiles already decoded into tensors, encode_aerial in
    the same batches), in the same process. The raw encoder runs two ways, one forward at a time
    with every thread and (CPU) one-thread lanes side by side; the ratio is to the faster one.

    python bench/index.py encode --configs tiny --tiles 512 --workers 0 1 2
    python bench/index.py encode --configs tiny small --device cuda --tiles 4096 --workers 4 8

(b) faiss: every index type on N random unit vectors: build time, memory, search QPS and
    recall@10 against exact search, with an nprobe / efSearch sweep. QPS twice: all queries in one
    call (best case for exact search, which BLAS then batches) and --search-batch at a time (what
    the service's micro-batches do).

    python bench/index.py faiss --n 1000000 --dim 192 --data random
    python bench/index.py faiss --n 1000000 --dim 768 --data clustered --nlist 1024

Prints Markdown tables (for bench/RESULTS.md); --json FILE also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine() -> str:
    import torch

    try:
        import faiss

        fv = faiss.__version__
        threads = faiss.omp_get_max_threads()
    except ImportError:
        fv, threads = "-", "-"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, GPU {gpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), faiss {fv} ({threads} OpenMP threads), "
            f"load average at start {load:.1f}")


# ============================================================================ (a) encoding

def make_tiles(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """n textured north-up tiles (blocky fields + smooth noise, PNG) and their catalogue CSV."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    csv_path = root / "tiles.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile_id", "lat", "lon", "path"])
        for i in range(n):
            blocks = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
            img = Image.fromarray(blocks).resize((size, size), Image.NEAREST).filter(ImageFilter.GaussianBlur(2))
            arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (size, size, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / "tiles" / f"{i:06d}.png")
            w.writerow([f"{i:06d}", 47.0 + i * 1e-4, 8.0 + i * 1e-4, f"tiles/{i:06d}.png"])
    return csv_path


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (DataLoader workers exit after a build)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def raw_encoder_run(model, tensors, batch_size: int, device, lanes: int = 1) -> tuple[float, float]:
    """(tiles/s wall, CPU ms per tile) of encode_aerial alone on already-decoded tensors.

    lanes=1: one forward at a time with every torch thread. lanes>1: that many threads encode the
    batches side by side with cores/lanes torch threads each (the encoder's best use of a CPU,
    the same split as index_build's encoder lanes, but without any decoding)."""
    import threading

    import torch

    from model.encode import available_cpus

    batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]

    def lane(mine) -> None:
        if lanes > 1:  # a thread of its own: the main thread's setting stays as it was
            torch.set_num_threads(max(1, available_cpus() // lanes))
        for b in mine:
            model.encode(b, "aerial")

    model.encode(batches[0], "aerial")  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), cpu_seconds()
    if lanes == 1:
        lane(batches)
    else:
        threads = [threading.Thread(target=lane, args=(batches[i::lanes],)) for i in range(lanes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(tensors) / (time.perf_counter() - t0), (cpu_seconds() - c0) * 1e3 / len(tensors)


def bench_encode(args) -> list[dict]:
    import torch

    from index_build.build import BuildOptions, run_build
    from model import L2LTR, L2LTRConfig, load_checkpoint, save_checkpoint
    from model.encode import available_cpus, pick_device
    from model.inference import InferenceEncoder
    from model.preprocess import aerial_tensor, load_image

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        tmp = Path(tmp)
        if args.catalog:
            catalog = Path(args.catalog)
        else:
            t0 = time.perf_counter()
            catalog = make_tiles(tmp / "world", args.tiles, args.tile_px)
            print(f"made {args.tiles} tiles of {args.tile_px}px in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        with open(catalog) as f:
            sources = [str((catalog.parent / r["path"]).resolve()) for r in csv.DictReader(f)]
        for name in args.configs:
            torch.manual_seed(0)
            ckpt = tmp / f"{name}.safetensors"
            save_checkpoint(L2LTR(L2LTRConfig.named(name)), ckpt)
            model = InferenceEncoder(load_checkpoint(ckpt), device, branches=("aerial",))
            cfg = model.config
            c0 = time.process_time()
            tensors = [aerial_tensor(load_image(p), cfg) for p in sources]
            decode_cpu_ms = (time.process_time() - c0) * 1e3 / len(tensors)
            # Best of --rounds for each, raw and build interleaved: on a shared machine the other
            # tenants' load comes and goes, and the best run is the least disturbed one.
            # Raw references: one forward at a time with every thread, and (CPU) one-thread lanes
            # side by side, the encoder's best on this machine; the ratio is against the better one.
            raw_lanes = available_cpus() if device.type == "cpu" and available_cpus() > 1 else 1
            for workers in args.workers:
                raws, raws_lanes, builds, raw_cpu, build_cpu = [], [], [], [], []

                def measure_raw() -> None:
                    tps, cpu_ms = raw_encoder_run(model, tensors, args.batch_size, device)
                    raws.append(tps)
                    raw_cpu.append(cpu_ms)
                    if raw_lanes > 1:
                        raws_lanes.append(raw_encoder_run(model, tensors, args.batch_size, device, raw_lanes)[0])

                for rnd in range(args.rounds):
                    measure_raw()
                    out = tmp / f"idx_{name}_{workers}_{rnd}"
                    c0 = cpu_seconds()
                    result = run_build(BuildOptions(
                        catalog=str(catalog), checkpoint=str(ckpt), out=str(out), batch_size=args.batch_size,
                        workers=workers, shard_size=args.shard_size, progress=False, device=str(device),
                        stop_after="encode"))
                    build_cpu.append((cpu_seconds() - c0) * 1e3 / len(sources))
                    builds.append(result.encode.tiles_per_second)
                measure_raw()
                raw, build = max(raws + raws_lanes), max(builds)
                rows.append({"config": name, "device": str(device), "tiles": len(sources), "workers": workers,
                             "batch_size": args.batch_size, "decode_cpu_ms": round(decode_cpu_ms, 2),
                             "raw_encoder_tps": round(max(raws), 1), "raw_runs": [round(r, 1) for r in raws],
                             "raw_lanes": raw_lanes,
                             "raw_lanes_tps": round(max(raws_lanes), 1) if raws_lanes else None,
                             "raw_lanes_runs": [round(r, 1) for r in raws_lanes],
                             "raw_cpu_ms": round(min(raw_cpu), 2),
                             "build_encode_tps": round(build, 1), "build_runs": [round(b, 1) for b in builds],
                             "build_cpu_ms": round(min(build_cpu), 2), "ratio": round(build / raw, 3),
                             "ratio_vs_one_forward": round(build / max(raws), 3)})
                print(json.dumps(rows[-1]), file=sys.stderr)
            del tensors, model
    print("\n| model | device | tiles | workers | batch | raw encoder, one forward at a time (tiles/s) | raw encoder, "
          "lanes side by side (tiles/s) | build encode stage (tiles/s) | ratio to the best raw | CPU ms/tile: "
          "decode+polar / raw encoder / whole build stage |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lanes = f"{r['raw_lanes_tps']} ({r['raw_lanes']} lanes)" if r["raw_lanes_tps"] else "-"
        print(f"| {r['config']} | {r['device']} | {r['tiles']} | {r['workers']} | {r['batch_size']} | "
              f"{r['raw_encoder_tps']} | {lanes} | {r['build_encode_tps']} | **{r['ratio']:.2f}** "
              f"({r['ratio_vs_one_forward']:.2f} to one forward) | "
              f"{r['decode_cpu_ms']} / {r['raw_cpu_ms']} / {r['build_cpu_ms']} |")
    return rows


# ============================================================================ (b) faiss

def unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_vectors(n: int, dim: int, kind: str, seed: int, clusters: int, chunk: int = 100_000,
                 centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """n unit vectors of one of three kinds:
      random     uniform on the sphere (the hardest case for any partitioning index);
      clustered  a mixture around `clusters` random centres, cos(point, centre) ~ 0.7;
      lowdim     a 16-dimensional Gaussian embedded by a random orthonormal map, plus isotropic
                 noise of 1/4 its norm (learned embeddings have a low intrinsic dimension).
    `centres` (the mixture centres, or the embedding map) is returned so that queries can be drawn
    from the same distribution."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    if centres is None and kind == "clustered":
        centres = unit_rows(rng.standard_normal((clusters, dim), dtype=np.float32))
    if centres is None and kind == "lowdim":
        centres = np.linalg.qr(rng.standard_normal((dim, 16)))[0].astype(np.float32).T  # [16, dim]
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        block = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            block /= np.sqrt(dim)
            block += centres[rng.integers(0, len(centres), m)]
        elif kind == "lowdim":
            block *= 0.25 * np.sqrt(16 / dim)
            block += rng.standard_normal((m, 16), dtype=np.float32) @ centres
        out[s:s + m] = unit_rows(block)
    return out, centres


def index_file_bytes(index) -> int:
    """Size of the index as written (what the service loads into memory)."""
    import faiss

    fd, path = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, path)
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def timed_search(index, queries: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    """(wall QPS, CPU-time QPS, ids). On a machine shared with other jobs the wall clock measures
    the neighbours as much as the index; the CPU time this process spent does not (single-threaded
    runs: CPU time = the time one uncontended core would take)."""
    t0, c0 = time.perf_counter(), time.process_time()
    _, ids = index.search(queries, k)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return queries.shape[0] / wall, queries.shape[0] / max(cpu, 1e-9), ids


def batched_qps(index, queries: np.ndarray, k: int, batch: int) -> float:
    """CPU-time QPS when the queries come `batch` at a time, as the service's micro-batches do.
    All queries in one call flatter exact search: BLAS then reads each database vector once for
    every query, which a service answering a few panoramas at a time never gets."""
    c0 = time.process_time()
    for s in range(0, queries.shape[0], batch):
        index.search(queries[s:s + batch], k)
    return queries.shape[0] / max(time.process_time() - c0, 1e-9)


def bench_faiss(args) -> list[dict]:
    import faiss

    from index_build.faiss_index import build_index, choose_index, recall_at_k, set_search_param

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    k = 10
    rows: list[dict] = []
    t0 = time.perf_counter()
    base, centres = make_vectors(args.n, args.dim, args.data, args.seed, args.clusters)
    queries, _ = make_vectors(args.queries, args.dim, args.data, args.seed + 1, args.clusters, centres=centres)
    print(f"data: {args.n} x {args.dim} {args.data} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def blocks_of(x):
        return lambda: (x[s:s + 65536] for s in range(0, x.shape[0], 65536))

    # exact search = flat index; its results are the ground truth and its QPS the baseline
    truth_cache: dict[int, tuple[np.ndarray, float]] = {}

    def exact(n_sub: int):
        if n_sub not in truth_cache:
            c0 = time.process_time()
            flat = faiss.IndexFlatIP(args.dim)
            flat.add(base[:n_sub])
            build_cpu = time.process_time() - c0
            mem = n_sub * args.dim * 4
            wall_qps, qps, ids = timed_search(flat, queries, k)
            qps_b = batched_qps(flat, queries, k, args.search_batch)
            truth_cache[n_sub] = (ids, qps, qps_b)
            rows.append({"index": "flat", "n": n_sub, "params": "exact", "build_cpu_s": round(build_cpu, 2),
                         "memory_mb": round(mem / 2 ** 20), "qps": round(qps, 1), "wall_qps": round(wall_qps, 1),
                         "recall@10": 1.0, "speedup": 1.0, "qps_batched": round(qps_b, 1), "speedup_batched": 1.0})
            print(json.dumps(rows[-1]), file=sys.stderr)
            del flat
        return truth_cache[n_sub]

    for kind in args.types:
        if kind == "flat":
            exact(args.n)
            continue
        n_sub = min(args.n, args.hnsw_n) if kind == "hnsw" else args.n
        truth, flat_qps, flat_qps_b = exact(n_sub)
        spec = choose_index(kind, n_sub, args.dim, nlist=args.nlist, pq_m=args.pq_m, opq=not args.no_opq)
        if kind == "hnsw":
            spec.params["ef_construction"] = args.ef_construction
        t0, c0 = time.perf_counter(), time.process_time()
        index, info = build_index(spec, args.dim, n_sub, blocks_of(base[:n_sub]), use_gpu=None,
                                  kmeans_iters=args.kmeans_iters, train_points_per_list=args.train_per_list)
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        mem = index_file_bytes(index)
        if kind == "hnsw":
            sweep, name = [16, 32, 64, 128, 256, 512], "efSearch"
        else:
            nl = spec.params["nlist"]
            sweep, name = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= nl // 2], "nprobe"
        best, previous = None, -1.0
        for value in sweep:
            set_search_param(index, kind, value)
            wall_qps, qps, ids = timed_search(index, queries, k)
            qps_b = batched_qps(index, queries, k, args.search_batch)
            r = recall_at_k(ids, truth, k)
            row = {"index": kind, "n": n_sub, "params": f"{spec.factory} {name}={value}",
                   "build_cpu_s": round(build_cpu, 2), "build_wall_s": round(build_s, 2),
                   "train_wall_s": info.get("train_seconds"), "memory_mb": round(mem / 2 ** 20),
                   "qps": round(qps, 1), "wall_qps": round(wall_qps, 1), "recall@10": round(r, 4),
                   "speedup": round(qps / flat_qps, 2), "qps_batched": round(qps_b, 1),
                   "speedup_batched": round(qps_b / flat_qps_b, 2)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            if kind == "ivf-pq" and args.rerank:
                # PQ codes alone lose the fine ranking; re-rank the top candidates exactly from the
                # raw vectors (the artifact keeps them in vectors/, so a reader can mmap them).
                c0 = time.process_time()
                _, cand = index.search(queries, args.rerank)
                exact_scores = np.einsum("qd,qrd->qr", queries, base[np.maximum(cand, 0)])
                exact_scores[cand < 0] = -np.inf
                top = np.take_along_axis(cand, np.argsort(-exact_scores, axis=1)[:, :k], axis=1)
                qps_rr = queries.shape[0] / max(time.process_time() - c0, 1e-9)
                r_rr = recall_at_k(top, truth, k)
                rows.append({**row, "index": "ivf-pq+rerank", "params": f"{row['params']} rerank={args.rerank}",
                             "qps": round(qps_rr, 1), "wall_qps": None, "recall@10": round(r_rr, 4),
                             "speedup": round(qps_rr / flat_qps, 2), "qps_batched": None,
                             "speedup_batched": None})
                print(json.dumps(rows[-1]), file=sys.stderr)
                r = max(r, r_rr)
            if r >= args.target and best is None:
                best = row
            slower = qps < flat_qps and qps_b < flat_qps_b
            if r >= 0.995 or slower or (r >= 0.9 and r - previous < 0.002):  # done, too slow, or a plateau
                break
            previous = r
        del index
    print(f"\n{args.n:,} x {args.dim} {args.data} unit vectors, {args.queries} queries, k=10, recall@10 "
          f"against exact search; {faiss.omp_get_max_threads()} thread(s); QPS and build from CPU time")
    print(f"QPS: all {args.queries} queries in one call | in calls of {args.search_batch} (--search-batch, the "
          f"service's micro-batches)")
    print("\n| index | N | parameters | build (CPU s) | index size (MB) | QPS | recall@10 | x flat QPS | "
          f"QPS, {args.search_batch} at a time | x flat, {args.search_batch} at a time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['index']} | {r['n']:,} | {r['params']} | {r['build_cpu_s']} | {r['memory_mb']} | {r['qps']} | "
              f"{r['recall@10']:.3f} | {r['speedup']} | {r['qps_batched'] or '-'} | {r['speedup_batched'] or '-'} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("encode")
    e.add_argument("--configs", nargs="+", default=["tiny"], help="named model configs (random weights)")
    e.add_argument("--catalog", default=None, help="an existing tiles.csv (e.g. a worldgen region)")
    e.add_argument("--tiles", type=int, default=512)
    e.add_argument("--tile-px", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--shard-size", type=int, default=10_000)
    e.add_argument("--workers", type=int, nargs="+", default=[1])
    e.add_argument("--device", default="auto")
    e.add_argument("--rounds", type=int, default=3, help="best of N runs each (shared machines)")
    e.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default); 1 gives CPU "
                   "times that do not depend on other tenants of a shared machine")
    f = sub.add_parser("faiss")
    f.add_argument("--n", type=int, default=1_000_000)
    f.add_argument("--dim", type=int, default=192)
    f.add_argument("--data", choices=("random", "clustered", "lowdim"), default="random")
    f.add_argument("--clusters", type=int, default=10_000)
    f.add_argument("--queries", type=int, default=300)
    f.add_argument("--types", nargs="+", default=["flat", "ivf-flat", "ivf-pq", "hnsw"])
    f.add_argument("--nlist", type=int, default=None, help="default: what --index auto would use")
    f.add_argument("--pq-m", type=int, default=None)
    f.add_argument("--no-opq", action="store_true")
    f.add_argument("--rerank", type=int, default=0, help="ivf-pq: also re-rank this many candidates exactly")
    f.add_argument("--hnsw-n", type=int, default=200_000, help="HNSW on the first N vectors only (build cost)")
    f.add_argument("--ef-construction", type=int, default=40)
    f.add_argument("--kmeans-iters", type=int, default=10)
    f.add_argument("--train-per-list", type=int, default=39)
    f.add_argument("--target", type=float, default=0.95)
    f.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (0: FAISS default)")
    f.add_argument("--search-batch", type=int, default=8,
                   help="also time the queries this many per call (the service's GEOLOC_MAX_BATCH_SIZE)")
    f.add_argument("--seed", type=int, default=0)
    for q in (e, f):
        q.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    print(f"machine: {machine()}", file=sys.stderr)
    rows = bench_encode(args) if args.what == "encode" else bench_faiss(args)
    print(f"\nmachine: {machine()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Orchestration of `build` and `add`: reader -> mapper -> writer, resumable, published atomically."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from index_build.artifact import ArtifactLayout, make_manifest, read_built_manifest, write_manifest
from index_build.encode_common import BadImagesError, EncodeStats
from index_build.faiss_index import (DEFAULT_MEMORY_BUDGET, IndexSpec, build_index, check_trainable, choose_index,
                                     tune_search)
from index_build.fsutil import atomic_save_npy_blocks, atomic_write_bytes
from index_build.sources import (Catalogue, CatalogueError, CatalogueLines, Issue, TileRecord, read_source,
                                 read_tiles_csv, sha256_file, write_tiles_csv)
from index_build.workdir import (CATALOG_FILE, COLUMNS_DTYPE, COLUMNS_SUFFIX, PLAN_FILE, VECTORS_DIR, ShardSpan,
                                 iter_vector_blocks, load_shard_columns, read_finished_shard, read_plan,
                                 spans_from_plan, utc_now_iso, vectors_dir, write_plan)
from model.index_artifact import (INDEX_FILE, ORIENTATION_FILE, TILES_FILE, ArtifactError, check_orientation_phases,
                                  read_orientation, searched_count, tile_rows_of)

log = logging.getLogger("index_build")

# Plan keys that must match for --resume to reuse a work dir. tiling_sha256: a raster cut again into the
# same grid writes the same tiles.csv over other images, and a new tiling.json.
PLAN_IDENTITY = ("kind", "catalog_sha256", "source", "count", "shard_size", "model_fingerprint",
                 "extra_columns", "base_version", "first_shard_index", "tiling_sha256", "tile_phases")
ADDED_PLAN_KEYS = ("tiling_sha256",)  # a plan written before them lacks them: not a difference


class BuildError(RuntimeError):
    pass


def default_workers(device_type: str) -> int:
    """Decode workers when --workers is not given.

    With a GPU the CPU does nothing but decode: up to 8 workers, one core left for the main process.
    On a CPU device decoding takes cores from the model (CPU ms per tile measured on the tiny model:
    decode + polar ~2, encoder ~8-12, bench/RESULTS.md), so a quarter of the cores decode and the
    model keeps the rest; on a 2-core box that is 0: encoder lanes that each decode their own
    batch (encode_local) were the fastest.
    """
    from model.encode import available_cpus

    cpus = available_cpus()
    if device_type == "cuda":
        return max(0, min(8, cpus - 1))
    return cpus // 4


@dataclass
class BuildOptions:
    catalog: str
    checkpoint: str
    out: str
    index_type: str = "auto"
    batch_size: int = 64
    workers: int | None = None             # None: default_workers(device)
    lanes: int | None = None               # encoder lanes when workers == 0 (None: one per core, up to 8)
    shard_size: int = 10_000
    resume: bool = False
    skip_bad: bool = False
    engine: str = "local"
    device: str = "auto"
    model_config: str | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    nlist: int | None = None
    pq_m: int | None = None
    opq: bool = True
    target_recall: float = 0.95
    keep_versions: int = 2
    progress: bool = True
    stop_after: str | None = None          # None | "validate" | "encode"
    check_files: bool = True
    faiss_gpu: bool | None = None          # None: use a GPU when faiss-gpu sees one
    ray_address: str | None = None
    ray_actors: int = 1
    ray_cpus_per_actor: float = 1.0
    ray_gpus_per_actor: float | None = None
    ray_decode_threads: int = 2
    report_path: str | None = None         # where the full validation report goes (default: beside --out)
    tile_phases: int | None = None         # orientation columns at this many sub-column phases; None: those the
                                           # checkpoint's head was trained at (model.orientation.trained_tile_phases)
    # test/bench hook: called with each finished shard's sidecar (never used by the CLI)
    on_shard_written: Callable[[dict], None] | None = None


@dataclass
class BuildResult:
    status: str                       # "validated" | "encoded" | "published"
    out: str
    version_dir: str | None = None
    count: int = 0
    skipped: int = 0
    encode: EncodeStats = field(default_factory=EncodeStats)
    manifest: dict | None = None
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"status": self.status, "out": self.out, "version_dir": self.version_dir, "count": self.count,
                "skipped": self.skipped, "encode": self.encode.to_json(), "timings": self.timings}


# ------------------------------------------------------------------------------------- reader

def check_inputs(opts: BuildOptions) -> None:
    """The checks of the command line's files that take a moment, made before the lock is taken or
    anything is written: the catalogue is there, the checkpoint is a file of a loadable kind (its
    first bytes and header), a .pth/.npz checkpoint comes with a valid --model-config."""
    from model.checkpoint import check_checkpoint_file
    from model.config import L2LTRConfig

    if not os.path.exists(opts.catalog):
        raise BuildError(f"catalogue {opts.catalog} does not exist")
    if not (os.path.isfile(opts.catalog) or os.path.isdir(opts.catalog)):
        raise BuildError(f"catalogue {opts.catalog} is neither a CSV file nor a slippy-map directory")
    checkpoint_format = check_checkpoint_file(opts.checkpoint)
    if opts.model_config is not None:
        L2LTRConfig.resolve(opts.model_config)  # a ConfigError names what is wrong with it
    elif checkpoint_format != "safetensors":
        kind = {"official": "PyTorch (.pth)", "npz": ".npz"}[checkpoint_format]
        raise BuildError(f"{opts.checkpoint}: a {kind} checkpoint holds no architecture; "
                         f"pass --model-config (paper, small, tiny or a JSON config)")


def write_report(exc: CatalogueError, report_path: str) -> None:
    """Every problem of `exc` into `report_path` (written atomically). Where it can not be written the
    error says why (exc.report_unwritten) and keeps no report_path: the CLI then prints every problem."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        atomic_write_bytes(report_path, (exc.report() + "\n").encode("utf-8"))
    except OSError as err:
        exc.report_unwritten = f"could not write the validation report {report_path}: {err.strerror or err}"
        return
    exc.report_path = report_path


def load_catalogue(path: str, check_files: bool, report_path: str | None) -> Catalogue:
    try:
        catalogue = read_source(path, check_files=check_files)
    except CatalogueError as exc:
        if report_path:
            write_report(exc, report_path)
        raise
    for note in catalogue.notes:
        log.warning("%s", note)
    return catalogue


TILING_FILE = "tiling.json"  # written beside tiles.csv by `index_build tile`


def _tiling_file(catalog: str) -> str | None:
    """The tiling.json beside a catalogue CSV (`index_build tile` writes one), if there is one."""
    path = os.path.join(os.path.dirname(os.path.abspath(catalog)), TILING_FILE)
    return path if os.path.isfile(catalog) and os.path.isfile(path) else None


def tiling_sha256(catalog: str) -> str | None:
    """The checksum of the tiling.json beside a catalogue cut by `index_build tile`, else None."""
    path = _tiling_file(catalog)
    return sha256_file(path) if path else None


def catalogue_tiling(catalog: str) -> dict | None:
    """{"tile_m", "stride_m"} (and "centres_m" when it cut views between the tile centres) of a catalogue
    cut by `index_build tile` (its tiling.json beside the CSV), None for any other catalogue. The manifest
    records them, and the service refines positions with them."""
    path = _tiling_file(catalog)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tiling = json.load(f)
        if not str(tiling.get("format", "")).startswith("index_build-tiling/"):
            return None
        tile_m, stride_m = float(tiling["tile_m"]), float(tiling["stride_m"])
        centres_m = float(tiling.get("centres_m") or stride_m)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BuildError(f"{path}: not a readable tiling record ({exc})") from None
    if not (math.isfinite(tile_m) and math.isfinite(stride_m) and tile_m > 0 and stride_m > 0):
        raise BuildError(f"{path}: tile_m {tile_m:g} and stride_m {stride_m:g} must be positive")
    return {"tile_m": tile_m, "stride_m": stride_m, **({"centres_m": centres_m} if centres_m < stride_m else {})}


def views_checkpoint_note(net, tiling: dict | None) -> str | None:
    """A warning for a catalogue cut with views (index_build tile --centres-m) indexed with a checkpoint
    whose orientation head, which re-ranks the views and so places the camera, is missing or was not trained
    with moved polar centres (`model.orientation --centre-jitter`); None otherwise."""
    if not tiling or "centres_m" not in tiling:
        return None
    if getattr(net, "orientation", None) is None:
        head = "has no orientation head"
    elif ((getattr(net, "provenance", None) or {}).get("orientation") or {}).get("centre_jitter"):
        return None
    else:
        head = "has an orientation head trained on tiles centred on their cameras"
    return (f"the catalogue holds views every {tiling['centres_m']:g} m and this checkpoint {head}: it places "
            "cameras between the views far worse than weights/l2ltr_tiny_grid.safetensors (unseen grid region: "
            "a median 415 m against 5 m; docs/INDEX_BUILD.md)")


def _load_model(opts, tile_phases: int | None = 1):
    """The aerial encoder, its device and fingerprint; ``tile_phases`` None: the phases its head was trained at."""
    from model import load_checkpoint
    from model.encode import pick_device
    from model.inference import InferenceEncoder
    from model.orientation import trained_tile_phases

    log.info("loading the model from %s", opts.checkpoint)
    device = pick_device(opts.device)
    model = load_checkpoint(opts.checkpoint, config=opts.model_config)
    fingerprint = model.fingerprint()
    log.info("model %r: %d-d embeddings, fingerprint %s", model.config.name, model.embedding_dim, fingerprint)
    if tile_phases is None:
        tile_phases = trained_tile_phases(model)
        if tile_phases > 1:
            log.info("tile phases: %d, as the checkpoint's orientation head was trained (--tile-phases 1: none)",
                     tile_phases)
    return InferenceEncoder(model, device, branches=("aerial",), tile_phases=tile_phases), device, fingerprint


def _check_tile_phases(model, checkpoint: str) -> None:
    """The encoder's tile phases (--tile-phases, or its head's) need an orientation head, and tiles whose pixel
    columns split into that many phases of each token column (model.orientation.phase_columns); checked
    before anything is encoded."""
    phases = model.tile_phases
    if phases == 1:
        return
    if model.column_shape is None:
        raise BuildError(f"--tile-phases {phases}: {checkpoint} has no orientation head to give the tiles "
                         "columns at phases (python -m model.orientation)")
    from model.orientation import phase_step

    width_px, width = model.config.aerial_size[1], model.config.column_shape()[0]
    try:
        phase_step(width_px, width, phases)
    except ValueError:
        raise BuildError(f"--tile-phases {phases}: the model's {width_px}-pixel polar tiles do not split into "
                         f"{phases} phases of each of its {width} columns (try a divisor of {width_px // width})"
                         ) from None


def index_spec(opts: BuildOptions, count: int, dim: int) -> IndexSpec:
    """The index --index, --nlist and --pq-m ask for, for `count` tiles of `dim`-d embeddings; a BuildError
    naming the option when they can not make one. Checked before encoding, and again on the tiles left
    after --skip-bad."""
    try:
        spec = choose_index(opts.index_type, count, dim, opts.memory_budget, opts.nlist, opts.pq_m, opq=opts.opq)
        check_trainable(spec, count)
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    return spec


def _plan_differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in PLAN_IDENTITY
            if old.get(k) != new.get(k) and (k in old or k not in ADDED_PLAN_KEYS)]


def _prepare_work_dir(layout: ArtifactLayout, plan: dict, records: list[TileRecord], extra_columns: list[str],
                      resume: bool) -> bool:
    """Make layout.work hold `plan`. Returns True when an unfinished build was resumed."""
    work = layout.work
    existing = read_plan(work) if os.path.isdir(work) else None
    if existing is not None and resume:
        diffs = _plan_differences(existing, plan)
        if diffs:
            raise BuildError("--resume: the unfinished build in " + work + " was for something else:\n  "
                             + "\n  ".join(diffs) + "\nRun without --resume to discard it and start over.")
        return True
    if os.path.isdir(work):
        log.warning("discarding the unfinished build in %s%s", work,
                    "" if resume else " (pass --resume to continue it instead)")
        shutil.rmtree(work)
    elif resume:
        log.warning("--resume: no unfinished build in %s; starting from the beginning", work)
    os.makedirs(vectors_dir(work))
    write_tiles_csv(os.path.join(work, CATALOG_FILE), records, extra_columns)
    write_plan(work, plan)  # written last: a work dir without plan.json is discarded, never resumed
    return False


def _encode_pending(opts, layout: ArtifactLayout, plan: dict, model, device, fingerprint: str) -> EncodeStats:
    work = layout.work
    vdir = vectors_dir(work)
    spans = spans_from_plan(plan)
    columns = model.column_shape
    todo = [s for s in spans if read_finished_shard(vdir, s, fingerprint, columns) is None]
    records, _extra = read_tiles_csv(os.path.join(work, CATALOG_FILE))
    if len(records) != plan["count"]:
        raise BuildError(f"{work}/{CATALOG_FILE} has {len(records)} rows, plan.json says {plan['count']}")
    reused = len(spans) - len(todo)
    if reused:
        log.info("resuming: %d of %d shard(s) already encoded, %d to go", reused, len(spans), len(todo))
    try:
        stats = _run_encoder(opts, work, vdir, todo, records, model, device, fingerprint)
    except BadImagesError as exc:
        exc.locate(CatalogueLines(plan.get("catalog_lines", [])).line, plan["source"])
        raise
    stats.shards_total = len(spans)
    stats.shards_reused = reused
    missing = [s.name for s in spans if read_finished_shard(vdir, s, fingerprint, columns) is None]
    if missing:
        raise BuildError(f"shard(s) {', '.join(missing[:10])} missing after encoding")
    return stats


def _run_encoder(opts, work: str, vdir: str, todo: list[ShardSpan], records: list[TileRecord], model, device,
                 fingerprint: str) -> EncodeStats:
    if opts.engine == "ray":
        from index_build.encode_ray import encode_shards_ray

        return encode_shards_ray(
            checkpoint=opts.checkpoint, model_config=opts.model_config, fingerprint=fingerprint, work=work,
            spans=todo, total_rows=sum(len(s) for s in todo), batch_size=opts.batch_size,
            skip_bad=opts.skip_bad, device=opts.device, actors=opts.ray_actors,
            cpus_per_actor=opts.ray_cpus_per_actor, gpus_per_actor=opts.ray_gpus_per_actor,
            decode_threads=opts.ray_decode_threads, address=opts.ray_address, progress=opts.progress,
            tile_phases=model.tile_phases)
    if opts.engine == "local":
        from index_build.encode_local import encode_shards_local

        if opts.workers is None:
            opts.workers = default_workers(device.type)
        if opts.workers == 0:
            from index_build.encode_local import lane_plan
            opts.lanes = lane_plan(opts.lanes)[0]
        return encode_shards_local(
            model, [r.source for r in records], [r.tile_id for r in records], todo, vdir,
            batch_size=opts.batch_size, workers=opts.workers, device=device, skip_bad=opts.skip_bad,
            fingerprint=fingerprint, progress=opts.progress, lanes=opts.lanes,
            on_shard_written=opts.on_shard_written)
    raise BuildError(f"unknown engine {opts.engine!r} (local | ray)")


# ------------------------------------------------------------------------------------- writer

def _shard_entries(vdir: str, spans: list[ShardSpan], fingerprint: str, plan: dict,
                   columns: tuple[int, int] | None) -> tuple[list[dict], list[dict]]:
    """The manifest's shard list and the tiles skipped as unreadable (with their catalogue line)."""
    lines = CatalogueLines(plan.get("catalog_lines", []))
    entries, skipped = [], []
    for span in spans:
        meta = read_finished_shard(vdir, span, fingerprint, columns)
        if meta is None:
            raise BuildError(f"{span.name} is not finished")
        entries.append({"file": f"vectors/{span.name}.npy", "rows": meta["rows"], "sha256": meta["sha256"]})
        for tile in meta["skipped"]:
            line = lines.line(tile["row"])
            skipped.append(tile if line is None else {**tile, "line": line})
    return entries, skipped


def _write_index(index, path: str) -> str:
    """Write a FAISS index atomically; its sha256."""
    import faiss

    data = faiss.serialize_index(index).tobytes()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _check_published_files(live: str, manifest: dict) -> None:
    """`add` builds on the published tiles.csv and index.faiss: not on ones edited since their build,
    whose new checksums would hide the edit."""
    for name, expected in (manifest.get("checksums") or {}).items():
        if sha256_file(os.path.join(live, name)) != expected:
            raise BuildError(f"{os.path.join(live, name)} differs from its checksum in manifest.json (edited or "
                             "replaced since it was built); `verify` it, and build the artifact again")


def _checksums(work: str, index_sha256: str) -> dict:
    """The manifest's "checksums" of the files no shard checksum covers (verify checks them)."""
    return {"checksums": {TILES_FILE: sha256_file(os.path.join(work, TILES_FILE)), INDEX_FILE: index_sha256}}


# Rows of orientation columns copied per block from a published orientation.npy (~2 KiB a row at
# the paper size): the copy streams through a memory map, never the whole array in memory.
ORIENTATION_BLOCK_ROWS = 16_384


def _write_orientation(directory: str, count: int, columns: tuple[int, int], blocks, phases: int = 1) -> dict:
    """Write `directory`/orientation.npy (float16 [count, phases * Wg, C]) from `blocks` of rows in tile order;
    returns the manifest's "orientation" entry."""
    path = os.path.join(directory, ORIENTATION_FILE)
    try:
        sha256 = atomic_save_npy_blocks(path, (count, *columns), COLUMNS_DTYPE, blocks)
    except ValueError as exc:
        raise BuildError(f"orientation columns do not line up with the tiles: {exc}") from None
    return {"file": ORIENTATION_FILE, "columns": int(columns[0]), "dim": int(columns[1]),
            "dtype": np.dtype(COLUMNS_DTYPE).name, "sha256": sha256, **({"phases": phases} if phases > 1 else {})}


def _shard_column_blocks(vdir: str, spans: list[ShardSpan]):
    for span in spans:
        yield load_shard_columns(vdir, span)


def _open_published_columns(live: str, base: dict) -> np.ndarray:
    """A published artifact's orientation.npy [count, columns, dim] as stored (the phases side by side),
    memory-mapped, checked against its manifest."""
    try:
        stored = read_orientation(live, base)
    except ArtifactError as exc:
        raise BuildError(str(exc)) from None
    stored = stored.reshape(len(stored), -1, stored.shape[-1])
    if stored.dtype != COLUMNS_DTYPE:
        raise BuildError(f"{os.path.join(live, base['orientation'].get('file', ORIENTATION_FILE))}: holds "
                         f"{stored.dtype}, manifest.json says {np.dtype(COLUMNS_DTYPE).name}")
    return stored


def _row_blocks(array: np.ndarray):
    for start in range(0, array.shape[0], ORIENTATION_BLOCK_ROWS):
        yield array[start:start + ORIENTATION_BLOCK_ROWS]


def _check_add_orientation(base: dict, live: str, columns: tuple[int, int] | None, checkpoint: str) -> None:
    """`add` joins the new tiles' columns to the artifact's: both must have them, of one shape.
    Equal fingerprints make a mismatch rare (the fingerprint covers the head), but an artifact
    published before index_build wrote columns, or edited by hand, can still disagree."""
    stored = base.get("orientation")
    manifest = os.path.join(live, "manifest.json")
    if stored is None and columns is not None:
        raise BuildError(f"{manifest}: the artifact has no orientation columns ({ORIENTATION_FILE}) but "
                         f"{checkpoint} has an orientation head; rebuild the whole artifact with `build` "
                         f"so that every tile gets its columns")
    if stored is not None and columns is None:
        raise BuildError(f"{manifest}: the artifact has orientation columns ({stored.get('file')}) but "
                         f"{checkpoint} has no orientation head to give the new tiles theirs")
    if stored is not None and (stored.get("columns"), stored.get("dim")) != tuple(columns):
        raise BuildError(f"{manifest}: orientation columns {stored.get('columns')} x {stored.get('dim')} "
                         f"differ from the {columns[0]} x {columns[1]} of {checkpoint}'s orientation head")
    if stored is not None:
        _open_published_columns(live, base)  # a damaged file stops `add` before anything is encoded


def _drop_stage_files(version_dir: str) -> None:
    """Remove what only the build needed from a published version: the plan, the catalogue copy,
    the shards' orientation columns (orientation.npy holds them now) and the temporary files of
    writes a killed run left (a resumed run wrote its own). The live dir is never read for them."""
    stage_files = [PLAN_FILE, CATALOG_FILE] + [f for f in os.listdir(version_dir) if f.endswith(".tmp")]
    vdir = os.path.join(version_dir, VECTORS_DIR)
    if os.path.isdir(vdir):
        stage_files += [os.path.join(VECTORS_DIR, f) for f in os.listdir(vdir)
                        if f.endswith(COLUMNS_SUFFIX) or f.endswith(".tmp")]
    for stage_file in stage_files:
        try:
            os.unlink(os.path.join(version_dir, stage_file))
        except FileNotFoundError:
            pass


def _publish(layout: ArtifactLayout, fingerprint: str, keep_versions: int) -> str:
    previous = layout.live_version_dir() if layout.live_is_ours() else None  # (not a directory linked by hand)
    version = layout.new_version_name(fingerprint)
    version_dir = layout.promote_work_dir(version)
    layout.swap_link(version)
    for published in (version_dir, previous):  # the previous one's too, if a run was killed before dropping them
        if published and os.path.isdir(published):
            _drop_stage_files(published)
    removed = layout.prune(keep_versions)  # (a version with stage files left is one never published)
    if removed:
        log.info("removed old version(s): %s", ", ".join(removed))
    return version_dir


def _recover_promoted(layout: ArtifactLayout, plan: dict, keep_versions: int) -> str | None:
    """A build killed between promoting its work dir and swapping the link: publish that version now."""
    live = layout.live_version_dir()
    for name in reversed(layout.list_versions()):
        path = os.path.join(layout.versions, name)
        if live and os.path.realpath(path) == live:
            continue
        old_plan = read_plan(path)
        if old_plan and not _plan_differences(old_plan, plan) and os.path.isfile(os.path.join(path, "manifest.json")):
            layout.swap_link(name)
            _drop_stage_files(path)
            layout.prune(keep_versions)
            return path
    return None


def _recover_if_resumed(opts, layout: ArtifactLayout, plan: dict, result: BuildResult) -> bool:
    """--resume after a crash between promote and link swap: publish that finished version. True if done."""
    if not opts.resume or os.path.isdir(layout.work):
        return False
    recovered = _recover_promoted(layout, plan, opts.keep_versions)
    if not recovered:
        return False
    log.info("published the finished but unpublished version %s", recovered)
    result.status, result.version_dir = "published", recovered
    result.manifest = read_built_manifest(recovered)
    return True


def _encode_step(opts, layout: ArtifactLayout, plan: dict, model, device, fingerprint: str, result: BuildResult,
                 stage_started: float) -> bool:
    """Encode the missing shards (shared by `build` and `add`). True when the run stops here (--stop-after encode).

    Timings: `encode_s` is the encoding itself (the time tiles_per_second is measured over);
    `encode_setup_s` the rest of the stage since `stage_started`: the work directory's files, and
    the warm-up batches that trace the model on a CPU."""
    result.encode = stats = _encode_pending(opts, layout, plan, model, device, fingerprint)
    stage_s = time.perf_counter() - stage_started
    result.timings["encode_setup_s"] = round(max(0.0, stage_s - stats.encode_s), 3)
    result.timings["encode_s"] = round(stats.encode_s, 3)
    result.status = "encoded"
    reused = f"; {stats.shards_reused} of {stats.shards_total} shard(s) were done before" if stats.shards_reused else ""
    skipped = f"; {stats.tiles_skipped} unreadable tile(s) skipped" if stats.tiles_skipped else ""
    log.info("encoded %d tile(s) in %.1f s (%.1f tiles/s)%s%s", stats.tiles_encoded, stats.encode_s,
             stats.tiles_per_second, reused, skipped)
    return opts.stop_after == "encode"


def _host_info(device) -> dict:
    import faiss
    import torch

    return {"host": socket.gethostname(), "python": sys.version.split()[0], "torch": torch.__version__,
            "faiss": faiss.__version__, "device": str(device), "cpu_count": os.cpu_count()}


def run_build(opts: BuildOptions) -> BuildResult:
    layout = ArtifactLayout(opts.out)
    layout.check_publishable()
    check_inputs(opts)
    result = BuildResult(status="validated", out=layout.out)
    t_start = time.perf_counter()
    with layout.lock():
        report_path = opts.report_path or os.path.join(layout.versions, "validation-report.txt")
        catalogue = load_catalogue(opts.catalog, opts.check_files, report_path)
        result.count = len(catalogue)
        result.timings["validate_s"] = round(time.perf_counter() - t_start, 3)
        log.info("catalogue %s: %d tile(s) valid", catalogue.source, len(catalogue))
        if opts.stop_after == "validate":
            return result

        t0 = time.perf_counter()
        model, device, fingerprint = _load_model(opts, opts.tile_phases)
        result.timings["model_load_s"] = round(time.perf_counter() - t0, 3)
        _check_tile_phases(model, opts.checkpoint)
        tiling = catalogue_tiling(opts.catalog)
        searched = _tile_rows_mask({"tiling": tiling}, catalogue.records, catalogue.extra_columns)
        # a bad --nlist or --pq-m stops before encoding (for the rows index.faiss will hold: with views, the tiles)
        index_spec(opts, len(catalogue) if searched is None else int(searched.sum()), model.embedding_dim)
        t_encode_stage = time.perf_counter()
        plan = {
            "kind": "build", "catalog_sha256": catalogue.sha256, "source": catalogue.source,
            "count": len(catalogue), "shard_size": int(opts.shard_size), "model_fingerprint": fingerprint,
            "extra_columns": catalogue.extra_columns, "base_version": None, "first_shard_index": 0,
            "checkpoint": os.path.abspath(opts.checkpoint), "created_at": utc_now_iso(),
            "catalog_lines": CatalogueLines.of_records(catalogue.records).to_json(),
            "tiling": tiling, "tiling_sha256": tiling_sha256(opts.catalog),
            **({"tile_phases": model.tile_phases} if model.tile_phases > 1 else {}),  # checked: with a head
        }
        note = views_checkpoint_note(model.net, plan["tiling"])
        if note:
            log.warning("%s", note)
        if _recover_if_resumed(opts, layout, plan, result):
            return result
        _prepare_work_dir(layout, plan, catalogue.records, catalogue.extra_columns, opts.resume)
        del catalogue  # the work directory holds the tiles now; free the catalogue before encoding
        if _encode_step(opts, layout, plan, model, device, fingerprint, result, t_encode_stage):
            return result

        t0 = time.perf_counter()
        manifest = _finish_build(opts, layout, plan, model, fingerprint, result)
        result.timings["index_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        manifest["build"]["timings"] = dict(result.timings)
        write_manifest(layout.work, manifest)
        result.version_dir = _publish(layout, fingerprint, opts.keep_versions)
        result.timings["publish_s"] = round(time.perf_counter() - t0, 3)
        result.status = "published"
        result.manifest = manifest
        result.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        return result


def _finish_build(opts: BuildOptions, layout: ArtifactLayout, plan: dict, model, fingerprint: str,
                  result: BuildResult) -> dict:
    import faiss

    work = layout.work
    vdir = vectors_dir(work)
    spans = spans_from_plan(plan)
    columns = model.column_shape
    shard_entries, skipped = _shard_entries(vdir, spans, fingerprint, plan, columns)
    records, extra = read_tiles_csv(os.path.join(work, CATALOG_FILE))
    skipped_rows = {s["row"] for s in skipped}
    good = [r for i, r in enumerate(records) if i not in skipped_rows]
    n = len(good)
    if n == 0:
        raise BuildError("every tile was skipped as unreadable; nothing to index")
    write_tiles_csv(os.path.join(work, TILES_FILE), good, extra)
    dim = model.embedding_dim
    searched = _tile_rows_mask(plan, good, extra)
    held = n if searched is None else int(searched.sum())
    spec = index_spec(opts, held, dim)
    log.info("index: %s (%s) - %s%s", spec.index_type, spec.factory, spec.reason,
             "" if searched is None else f"; {held} tiles searched, their {n} views scored once found")
    blocks = lambda: _searched_blocks(iter_vector_blocks(vdir, spans), searched)  # noqa: E731
    index, info = build_index(spec, dim, held, blocks, use_gpu=opts.faiss_gpu)
    tuning = tune_search(index, spec, held, blocks, target_recall=opts.target_recall)
    if index.ntotal != held:
        raise BuildError(f"index holds {index.ntotal} vectors, expected {held}")
    checksums = _checksums(work, _write_index(index, os.path.join(work, INDEX_FILE)))
    orientation = {}
    if columns is not None:
        orientation["orientation"] = _write_orientation(work, n, columns, _shard_column_blocks(vdir, spans),
                                                        plan.get("tile_phases", 1))
    result.count, result.skipped = n, len(skipped)
    if skipped:
        log.warning("%d unreadable tile image(s) skipped (listed in manifest.json under 'skipped')", len(skipped))
    return make_manifest(
        fingerprint=fingerprint, model_config=model.config.to_dict(), dim=dim, count=n,
        index_type=spec.index_type, index_params={**spec.to_json(), **info, **tuning},
        faiss_version=faiss.__version__, catalog_sha256=plan["catalog_sha256"], source=plan["source"],
        checkpoint=plan["checkpoint"], catalogue_rows=plan["count"],
        skipped={"count": len(skipped), "tiles": skipped}, **({} if searched is None else {"index_rows": held}),
        shards=shard_entries, **orientation, **checksums, additions=[], **(plan.get("tiling") or {}),
        build={"engine": opts.engine, "batch_size": opts.batch_size, "shard_size": plan["shard_size"],
               "workers": opts.workers, "lanes": opts.lanes, "encode": result.encode.to_json(), **_host_info(opts.device)},
    )


def _tile_rows_mask(plan: dict, records: list[TileRecord], extra: list[str]) -> np.ndarray | None:
    """With views (a catalogue cut by index_build tile --centres-m): which of the rows index.faiss holds, the
    rows that are a tile's (model.index_artifact.tile_rows_of, as TileTable.searched_rows reads them; without a
    `tile` column every row); None without views (every row, and no index_rows in the manifest)."""
    if not (plan.get("tiling") or {}).get("centres_m"):
        return None
    column = extra.index("tile") if "tile" in extra else None
    tile_of = tile_rows_of([r.tile_id for r in records], ["" if column is None else r.extra[column] for r in records])
    return np.isin(np.arange(len(records)), tile_of)


def _check_add_tiles(live: str, base: dict, base_records: list[TileRecord], catalogue: Catalogue,
                     catalog: str) -> None:
    """Before encoding: an artifact of views to add to must say which rows its index holds (index_rows), and the
    new rows must not make other base rows its tiles' own (checked again after, without the unreadable)."""
    try:
        searched_count(live, base)
    except ArtifactError as exc:
        raise BuildError(str(exc)) from None
    _added_tile_rows(base, base_records, catalogue.records, catalogue.extra_columns, catalog)


def _added_tile_rows(base: dict, base_records: list[TileRecord], records: list[TileRecord], extra: list[str],
                     catalog: str) -> np.ndarray | None:
    """`_tile_rows_mask` of the base's rows followed by ``records`` (None without views); a BuildError where the
    new rows would change which of the base's rows are its tiles' own (its index.faiss holds those)."""
    searched = _tile_rows_mask({"tiling": {"centres_m": base.get("centres_m")}}, [*base_records, *records], extra)
    if searched is not None and searched[:len(base_records)].sum() != base["index_rows"]:
        raise BuildError(f"{catalog} names tiles that change which of the artifact's rows are its tiles' own; "
                         "rebuild the whole artifact with `build` instead")
    return searched


def _searched_blocks(blocks, searched: np.ndarray | None):
    """The vector blocks (in row order) cut to the rows of the ``searched`` mask (None: all)."""
    start = 0
    for block in blocks:
        keep = None if searched is None else searched[start:start + len(block)]
        start += len(block)
        yield block if keep is None else np.ascontiguousarray(block[keep])


# ------------------------------------------------------------------------------------- add

@dataclass
class AddOptions(BuildOptions):
    """`add`: encode a further catalogue and append it to the published artifact at `out`."""


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # shards are immutable, so versions can share them
    except OSError:
        shutil.copy2(src, dst)


def run_add(opts: AddOptions) -> BuildResult:
    import faiss

    layout = ArtifactLayout(opts.out)
    layout.check_publishable()
    check_inputs(opts)
    result = BuildResult(status="validated", out=layout.out)
    t_start = time.perf_counter()
    with layout.lock():
        live = layout.live_version_dir()
        if live is None:
            raise ArtifactError(f"{layout.out}: no published artifact to add to; run `build` first")
        base = read_built_manifest(live)
        _check_published_files(live, base)
        report_path = opts.report_path or os.path.join(layout.versions, "validation-report.txt")
        catalogue = load_catalogue(opts.catalog, opts.check_files, report_path)
        base_records, base_extra = read_tiles_csv(os.path.join(live, TILES_FILE))
        issues = []
        if catalogue.extra_columns != base_extra:
            issues.append(Issue("header", "", f"extra columns {catalogue.extra_columns} differ from the "
                                               f"artifact's {base_extra}"))
        base_ids = {r.tile_id for r in base_records}
        issues += [Issue(r.where, r.tile_id, "tile_id already in the artifact") for r in catalogue.records
                   if r.tile_id in base_ids]
        if issues:
            exc = CatalogueError(catalogue.source, issues, len(catalogue))
            write_report(exc, report_path)
            raise exc
        result.count = len(catalogue)
        result.timings["validate_s"] = round(time.perf_counter() - t_start, 3)
        log.info("catalogue %s: %d tile(s) valid", catalogue.source, len(catalogue))
        if opts.stop_after == "validate":
            return result
        t0 = time.perf_counter()
        try:  # the new tiles' columns at the base's phases
            phases = check_orientation_phases(live, base["orientation"]) if base.get("orientation") else 1
        except ArtifactError as exc:
            raise BuildError(str(exc)) from None
        model, device, fingerprint = _load_model(opts, phases)
        result.timings["model_load_s"] = round(time.perf_counter() - t0, 3)
        t_encode_stage = time.perf_counter()
        if fingerprint != base["model_fingerprint"]:
            raise BuildError(f"model fingerprint {fingerprint} ({opts.checkpoint}) differs from the artifact's "
                             f"{base['model_fingerprint']}; vectors from different models cannot share an index. "
                             f"Rebuild the whole artifact with `build` instead.")
        columns = model.column_shape
        _check_add_orientation(base, live, columns, opts.checkpoint)
        tiling = catalogue_tiling(opts.catalog)
        if tiling and base.get("tile_m") is not None and tiling["tile_m"] != base["tile_m"]:
            raise BuildError(f"tiles of {tiling['tile_m']:g} m ({opts.catalog}) cannot join an artifact of "
                             f"{base['tile_m']:g} m tiles: positions are refined with one footprint per index")
        if tiling and tiling.get("centres_m") != base.get("centres_m"):
            views = lambda m: f"views every {m:g} m" if m else "no views"  # noqa: E731
            raise BuildError(f"{opts.catalog} has {views(tiling.get('centres_m'))} and the artifact "
                             f"{views(base.get('centres_m'))}: an index holds one kind (index_build tile --centres-m)")
        _check_add_tiles(live, base, base_records, catalogue, opts.catalog)
        base_version = os.path.basename(live)
        plan = {
            "kind": "add", "catalog_sha256": catalogue.sha256, "source": catalogue.source,
            "count": len(catalogue), "shard_size": int(opts.shard_size), "model_fingerprint": fingerprint,
            "extra_columns": catalogue.extra_columns, "base_version": base_version,
            "first_shard_index": _next_shard_index(base), "checkpoint": os.path.abspath(opts.checkpoint),
            "created_at": utc_now_iso(), "catalog_lines": CatalogueLines.of_records(catalogue.records).to_json(),
            "tiling_sha256": tiling_sha256(opts.catalog),
        }
        if _recover_if_resumed(opts, layout, plan, result):
            return result
        _prepare_work_dir(layout, plan, catalogue.records, catalogue.extra_columns, opts.resume)
        del catalogue  # the work directory holds the tiles now; free the catalogue before encoding
        if _encode_step(opts, layout, plan, model, device, fingerprint, result, t_encode_stage):
            return result

        t0 = time.perf_counter()
        work, vdir = layout.work, vectors_dir(layout.work)
        spans = spans_from_plan(plan)
        new_entries, skipped = _shard_entries(vdir, spans, fingerprint, plan, columns)
        records, extra = read_tiles_csv(os.path.join(work, CATALOG_FILE))
        skipped_rows = {s["row"] for s in skipped}
        good = [r for i, r in enumerate(records) if i not in skipped_rows]
        for entry in base["shards"]:
            for suffix in (".npy", ".json"):
                src = os.path.join(live, entry["file"][:-4] + suffix)
                dst = os.path.join(work, entry["file"][:-4] + suffix)
                if os.path.exists(src) and not os.path.exists(dst):
                    _link_or_copy(src, dst)
        write_tiles_csv(os.path.join(work, TILES_FILE), [*base_records, *good], extra)
        index = faiss.read_index(os.path.join(live, INDEX_FILE))
        searched = _added_tile_rows(base, base_records, good, extra, opts.catalog)
        for block in _searched_blocks(iter_vector_blocks(vdir, spans), None if searched is None
                                      else searched[len(base_records):]):
            index.add(block)
        added = len(good)
        count = base["count"] + added
        held = count if searched is None else int(searched.sum())
        if index.ntotal != held:
            raise BuildError(f"index holds {index.ntotal} vectors, expected {held}")
        checksums = _checksums(work, _write_index(index, os.path.join(work, INDEX_FILE)))
        orientation = {}
        if columns is not None:
            base_rows = _row_blocks(_open_published_columns(live, base))
            orientation["orientation"] = _write_orientation(
                work, count, columns, itertools.chain(base_rows, _shard_column_blocks(vdir, spans)), phases)
        trained_on = base.get("index_rows", base["count"])
        if base["index_type"] != "flat" and held - trained_on > trained_on:
            log.warning("added %d tiles to an index trained on %d; recall may drop - consider a full `build`",
                        held - trained_on, trained_on)
        manifest = dict(base)
        manifest.update(
            count=count, **({} if searched is None else {"index_rows": held}), built_at=utc_now_iso(),
            faiss_version=faiss.__version__,
            shards=[*base["shards"], *new_entries], **orientation, **checksums,
            skipped={"count": base.get("skipped", {}).get("count", 0) + len(skipped),
                     "tiles": [*base.get("skipped", {}).get("tiles", []),
                               *({**s, "catalog": plan["source"]} for s in skipped)]},
            additions=[*base.get("additions", []),
                       {"source": plan["source"], "catalog_sha256": plan["catalog_sha256"], "count": added,
                        "skipped": len(skipped), "added_at": utc_now_iso(), "base_version": base_version,
                        "encode": result.encode.to_json()}],
        )
        result.timings["index_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()  # publish, as in build: the manifest, then the version and the link
        write_manifest(work, manifest)
        result.version_dir = _publish(layout, fingerprint, opts.keep_versions)
        result.timings["publish_s"] = round(time.perf_counter() - t0, 3)
        result.status, result.count, result.skipped, result.manifest = "published", count, len(skipped), manifest
        result.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        return result


def _next_shard_index(manifest: dict) -> int:
    indices = [int(os.path.basename(e["file"])[len("shard-"):-len(".npy")]) for e in manifest["shards"]]
    return max(indices) + 1 if indices else 0

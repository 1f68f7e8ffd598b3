"""Command line: `python -m index_build {build,add,info,verify,tile}` (console script `index-build`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from index_build.faiss_index import DEFAULT_MEMORY_BUDGET, INDEX_TYPES
from model.arguments import non_negative_int, number, positive_int

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it

# What the one line printed on Ctrl-C adds for a command
_INTERRUPTED = {"build": "; rerun with --resume to continue", "add": "; rerun with --resume to continue",
                "tile": "; nothing written"}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'16GiB', '500MB', '2g', '1048576' -> bytes (binary multiples for k/m/g/t)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16GiB, 500MB)")
    scale = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}[m.group(2).lower()]
    size = int(float(m.group(1)) * scale)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return size


def _add_encode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", required=True,
                   help="catalogue CSV (tile_id,lat,lon,path[,extra...]) or a slippy-map dir {z}/{x}/{y}.png|jpg")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.safetensors; .pth/.npz need --model-config)")
    p.add_argument("--model-config", default=None,
                   help="architecture of a .pth/.npz checkpoint: paper, small, tiny, a JSON string or a JSON file")
    p.add_argument("--out", required=True, help="artifact path (a symlink to a versioned directory beside it)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="tiles per forward pass of the model (default: 64)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="local engine: DataLoader processes decoding tiles ahead of the model; 0 = no such "
                        "processes, encoder lanes decode and encode instead (see --lanes). Default: with a GPU "
                        "cores-1, at most 8; on a CPU cores/4, which is 0 below 4 cores")
    p.add_argument("--lanes", type=positive_int, default=None,
                   help="with --workers 0: encoder lanes, threads that each decode a batch and then encode it "
                        "with cores/lanes torch threads, side by side (default: one per core, up to 8)")
    p.add_argument("--shard-size", type=positive_int, default=10_000,
                   help="tiles per embedding shard, the unit --resume keeps (default: 10000)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run; finished shards are kept")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images (counted, listed, recorded in the manifest) instead of failing")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: encode in this process; ray: encoder actors on a Ray cluster, see 'ray engine' "
                        "below (default: local)")
    p.add_argument("--device", default="auto",
                   help="torch device for the model: auto (a GPU if there is one), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--keep-versions", type=positive_int, default=2,
                   help="published versions kept on disk, the live one included (default: 2)")
    p.add_argument("--no-check-files", dest="check_files", action="store_false",
                   help="do not stat every image during validation (slow network storage)")
    p.add_argument("--report", dest="report_path", default=None,
                   help="write the full validation report here (default: <out>.versions/validation-report.txt)")
    p.add_argument("--stop-after", choices=("validate", "encode"), default=None,
                   help="run only the first stage(s); `--resume` continues later")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no log lines: only warnings, errors and a one-line result")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object (status, counts, timings, manifest summary)")
    g = p.add_argument_group("ray engine")
    g.add_argument("--ray-address", default=None, help="cluster address (default: start a local Ray)")
    g.add_argument("--ray-actors", type=positive_int, default=1,
                   help="encoder actors, each with its own copy of the model (default: 1)")
    g.add_argument("--ray-cpus-per-actor", type=number(above=0), default=1.0,
                   help="CPUs Ray reserves per actor; its torch threads are the whole number of them (default: 1)")
    g.add_argument("--ray-gpus-per-actor", type=number(low=0), default=None,
                   help="GPUs Ray reserves per actor (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--ray-decode-threads", type=positive_int, default=2,
                   help="threads per actor decoding the next batch while the model runs (default: 2)")


def _verbose_flag(default) -> argparse.ArgumentParser:
    """-v/--verbose, as a parent parser: on the main parser with default False, and on every
    subcommand with no default (SUPPRESS), so that it works on either side of the subcommand's name
    and the subcommand's copy does not reset a -v given before it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug log lines as well")
    return p


TILE_EPILOG = """\
output (docs/INTERFACES.md, "Tiles cut from a georeferenced raster"):
  OUT/tiles.csv          tile_id,lat,lon,path,grid_row,grid_col: the catalogue `build --catalog` reads
                         (lat/lon: WGS84 tile centre; path: relative to the CSV); with --centres-m one row
                         per view and a last column `tile`, the tile_id of the tile the view belongs to
  OUT/images/<id>.jpg    north-up square tile, --tile-m metres on the ground, --tile-px pixels
  OUT/tiling.json        the raster, the grid, the options and the counts
Tiles are laid out in a local transverse Mercator frame centred on the raster (ground metres, true
north up), whatever the raster's CRS, and cut with one windowed read each: the raster is never read
whole, so it may be larger than memory. OUT is written to a temporary directory and renamed into place.

example:
  python -m index_build tile --raster ortho.tif --tile-m 100 --stride-m 50 --out data/ortho_tiles
  python -m index_build build --catalog data/ortho_tiles/tiles.csv --checkpoint weights/l2ltr_tiny_demo.safetensors --out data/ortho_index
"""


# Kept here so that `--help` works without rasterio; raster_tiles holds the same values.
TILE_DEFAULTS = {"tile_m": 100.0, "tile_px": 256, "max_nodata": 0.5, "memory_budget": 256 * 2 ** 20}


def _add_tile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raster", required=True,
                   help="georeferenced raster GDAL can read (GeoTIFF, JPEG 2000, VRT, ...), in any CRS")
    p.add_argument("--out", required=True,
                   help="output directory for tiles.csv, images/ and tiling.json (must not exist unless --overwrite)")
    p.add_argument("--tile-m", type=float, default=TILE_DEFAULTS["tile_m"],
                   help="side of a tile on the ground, metres (default %(default)g: worldgen's footprint, "
                        "what the demo model was trained on)")
    p.add_argument("--stride-m", type=float, default=None,
                   help="distance between neighbouring tile centres, metres (default: half of --tile-m)")
    p.add_argument("--centres-m", type=float, default=None,
                   help="also cut each tile's views centred every this many metres around its centre (a whole "
                        "fraction of --stride-m, e.g. 10 for 50): the index still searches the tiles, then "
                        "scores every view of the best it finds, answers with the tiles and places the camera "
                        "at its best view. A camera between tile centres "
                        "is found far more often (docs/INDEX_BUILD.md); costs (stride/centres)^2 times the "
                        "images, vectors and encoding time (default: one view per tile, at its centre)")
    p.add_argument("--tile-px", type=int, default=TILE_DEFAULTS["tile_px"],
                   help="side of a tile image, pixels (default %(default)d, as worldgen writes; the model "
                        "resizes tiles to its aerial input size)")
    p.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg",
                   help="tile image format (default %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default %(default)d)")
    p.add_argument("--max-nodata", type=float, default=TILE_DEFAULTS["max_nodata"],
                   help="skip (and count) tiles whose share of pixels without data is above this fraction "
                        "(default %(default)g); nodata comes from the raster's nodata value, mask or alpha band, "
                        "and from tile parts outside the raster")
    p.add_argument("--bands", default=None,
                   help="1-based bands to use: R,G,B or one grey band N (default: the bands marked red, green "
                        "and blue, else the first three non-alpha bands, else the single band; palettes expand)")
    p.add_argument("--value-range", default=None, metavar="LO,HI",
                   help="map raster values LO..HI linearly to 0..255 (required for rasters that are not 8-bit, "
                        "e.g. 0,4095 for 12-bit data)")
    p.add_argument("--resampling", choices=("nearest", "bilinear", "cubic", "lanczos", "average"),
                   default="bilinear", help="warp resampling (default %(default)s)")
    p.add_argument("--memory-budget", type=parse_size, default=TILE_DEFAULTS["memory_budget"],
                   help="raster data held at once: a quarter for GDAL's block cache, a quarter for warp "
                        "buffers, half for the arrays of the tile being cut (default 256MiB, at least 4MiB)")
    p.add_argument("--id-prefix", default=None,
                   help="tile ids are PREFIX-rROW-cCOL (default: the raster's file name without extension)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (at the very end)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="index-build", parents=[_verbose_flag(False)],
                                     description="Geo-tagged aerial tiles -> L2LTR embeddings -> FAISS index artifact")
    sub = parser.add_subparsers(dest="command", required=True)
    verbose = _verbose_flag(argparse.SUPPRESS)

    b = sub.add_parser("build", parents=[verbose], help="encode a catalogue and publish a new artifact at --out")
    _add_encode_args(b)
    b.add_argument("--index", dest="index_type", choices=INDEX_TYPES, default="auto",
                   help="FAISS index type; auto: flat (exact) up to 250k tiles, then ivf-flat while the vectors "
                        "fit --memory-budget, then ivf-pq (default: auto)")
    b.add_argument("--memory-budget", type=parse_size, default=DEFAULT_MEMORY_BUDGET,
                   help="RAM the index may use at serving time, drives --index auto (default: 16GiB)")
    b.add_argument("--nlist", type=positive_int, default=None,
                   help="IVF lists (default: a power of two near 4-16 x sqrt(N))")
    b.add_argument("--pq-m", type=positive_int, default=None, help="PQ bytes per vector (default: dim/8 within budget)")
    b.add_argument("--no-opq", dest="opq", action="store_false", help="ivf-pq without the OPQ rotation")
    b.add_argument("--target-recall", type=number(above=0, high=1), default=0.95,
                   help="recall@10 that nprobe/efSearch are tuned for (default: 0.95)")
    b.add_argument("--tile-phases", type=positive_int, default=None,
                   help="store each tile's orientation columns at this many sub-column phases (each one more "
                        "forward of the tile, and as many column features stored): views of unknown heading are "
                        "re-ranked against the phase nearest theirs (the demo checkpoint at 4: panoramas and crops "
                        "lifted, phone photos not; docs/INDEX_BUILD.md; needs an orientation head; `add` keeps the "
                        "artifact's) (default: "
                        "the phases the checkpoint's head was trained at, model.orientation --tile-phases: 4 for "
                        "weights/l2ltr_tiny_phases.safetensors, 1 for the demo and grid checkpoints)")
    b.add_argument("--faiss-gpu", choices=("auto", "yes", "no"), default="auto",
                   help="train IVF indexes on a GPU with faiss-gpu: auto and yes use it when faiss-gpu sees a GPU, "
                        "no never does (default: auto)")

    a = sub.add_parser("add", parents=[verbose], help="append the tiles of another catalogue to the artifact at --out")
    _add_encode_args(a)

    i = sub.add_parser("info", parents=[verbose],
                       help="print the manifest of an artifact (\"orientation\": null when it stores no "
                            "orientation columns)")
    i.add_argument("artifact", help="artifact path (the published symlink or a version directory)")
    i.add_argument("--full", action="store_true", help="include the per-shard and skipped-tile lists")

    v = sub.add_parser("verify", parents=[verbose],
                       help="re-encode a random sample and check vectors, orientation columns + self-retrieval")
    v.add_argument("artifact", help="artifact path (the published symlink or a version directory)")
    v.add_argument("--checkpoint", required=True, help="the checkpoint the artifact was built with")
    v.add_argument("--model-config", default=None,
                   help="architecture of a .pth/.npz checkpoint: paper, small, tiny, a JSON string or a JSON file")
    v.add_argument("--sample", type=positive_int, default=64,
                   help="tiles re-encoded and searched for (default: 64; with views: rows re-encoded, and as many "
                        "tiles again re-encoded and searched for)")
    v.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random sample (default: 0)")
    v.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N (default: auto)")
    v.add_argument("--batch-size", type=positive_int, default=64, help="tiles per forward pass (default: 64)")
    v.add_argument("--min-rank1", type=number(0, 1), default=0.99,
                   help="least fraction of the sample that must find itself first in the index (default: 0.99)")
    v.add_argument("--tolerance", type=number(low=0), default=None,
                   help="largest 1-cosine between a stored and a re-encoded vector, and between a stored "
                        "orientation column and its re-encoding (plus 1e-6 for float16 storage) (default: 1e-4 "
                        "on a CPU, 2e-2 on CUDA)")

    t = sub.add_parser("tile", parents=[verbose], help="cut a georeferenced raster (orthophoto, any CRS) into a tile catalogue",
                       description="Cut a georeferenced raster into north-up square tiles of --tile-m metres\n"
                                   "every --stride-m metres, and write them with a catalogue CSV for `build`.",
                       epilog=TILE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_tile_args(t)
    return parser


def _encode_options(cls, args):
    kwargs = dict(
        catalog=args.catalog, checkpoint=args.checkpoint, out=args.out, batch_size=args.batch_size,
        workers=args.workers, lanes=args.lanes, shard_size=args.shard_size, resume=args.resume,
        skip_bad=args.skip_bad,
        engine=args.engine, device=args.device, model_config=args.model_config, keep_versions=args.keep_versions,
        progress=not args.quiet, stop_after=args.stop_after, check_files=args.check_files,
        report_path=args.report_path, ray_address=args.ray_address, ray_actors=args.ray_actors,
        ray_cpus_per_actor=args.ray_cpus_per_actor, ray_gpus_per_actor=args.ray_gpus_per_actor,
        ray_decode_threads=args.ray_decode_threads)
    if cls.__name__ == "BuildOptions":
        kwargs.update(index_type=args.index_type, memory_budget=args.memory_budget, nlist=args.nlist,
                      pq_m=args.pq_m, opq=args.opq, target_recall=args.target_recall, tile_phases=args.tile_phases,
                      faiss_gpu={"auto": None, "yes": True, "no": False}[args.faiss_gpu])
    return cls(**kwargs)


def _summary_json(result) -> dict:
    out = result.to_json()
    if result.manifest:
        m = result.manifest
        out["manifest"] = {k: m[k] for k in ("model_fingerprint", "embedding_dim", "count", "index_type")}
        out["manifest"]["index_params"] = {k: v for k, v in m["index_params"].items() if k != "tuning_curve"}
        out["manifest"]["orientation"] = m.get("orientation")  # null: no orientation columns stored
        # null unless the catalogue was cut by `index_build tile` (its tiling.json)
        out["manifest"].update(tile_m=m.get("tile_m"), stride_m=m.get("stride_m"))
    return out


# timings key -> label in the text summary; they add up to total_s (see _encode_step for the encode pair)
_TIMING_LABELS = (("validate_s", "validate"), ("model_load_s", "load model"), ("encode_setup_s", "set up encoder"),
                  ("encode_s", "encode"), ("index_s", "index"), ("publish_s", "publish"))


def _summary_lines(result, command: str) -> list[str]:
    """What a build or add did, for people; --quiet prints only the first line."""
    if result.status == "validated":
        return [f"validated {result.count} tile(s); nothing encoded (--stop-after validate)"]
    if result.status == "encoded":
        from index_build.artifact import ArtifactLayout

        return [f"encoded {result.encode.tiles_encoded} tile(s) into {ArtifactLayout(result.out).work} "
                f"(--stop-after encode); the same command with --resume publishes them"]
    m = result.manifest
    version = os.path.relpath(result.version_dir, os.path.dirname(result.out))
    if command == "add" and m.get("additions"):
        head = f"added {m['additions'][-1]['count']} tile(s) to {result.out} -> {version}: {m['count']} in all"
    else:
        head = f"published {result.out} -> {version}: {m['count']} tile(s)"
    lines = [f"{head}, {m['index_type']} index"]
    details = f"  model fingerprint {m['model_fingerprint']}, {m['embedding_dim']}-d embeddings"
    if m.get("orientation"):
        o = m["orientation"]
        phases = o.get("phases", 1)
        at = f" at {phases} phases" if phases > 1 else ""
        details += f", {o['columns'] // phases} x {o['dim']} orientation columns per tile{at} ({o['file']})"
    if result.skipped:
        details += f"; {result.skipped} unreadable tile(s) skipped (listed in manifest.json under 'skipped')"
    lines.append(details)
    t = result.timings
    parts = []
    for key, label in _TIMING_LABELS:
        if key in t:
            rate = f" ({result.encode.tiles_per_second:.1f} tiles/s)" if key == "encode_s" and t[key] > 0 else ""
            parts.append(f"{label} {t[key]:.1f} s{rate}")
    if parts:
        total = f"; total {t['total_s']:.1f} s" if "total_s" in t else ""
        lines.append("  time: " + ", ".join(parts) + total)
    return lines


def _print_result(result, args) -> None:
    if args.json:
        print(json.dumps(_summary_json(result), indent=2))
    else:
        lines = _summary_lines(result, args.command)
        print("\n".join(lines[:1] if args.quiet else lines))


class _StderrHandler(logging.StreamHandler):
    """Writes each record to sys.stderr as it is then (main may run many times in one process,
    each time with another stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _set_up_logging(level: int) -> None:
    logger = logging.getLogger("index_build")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("index_build: %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def _run_tile(args) -> int:
    """`index_build tile`: every input problem is one line on stderr and exit status 2."""
    def fail(message: str) -> int:
        print(f"index_build tile: error: {message}", file=sys.stderr)
        return EXIT_INVALID

    try:
        from index_build import raster_tiles as rt
    except ImportError as exc:
        return fail(f"needs rasterio ({exc}); install it with: pip install 'l2ltr-geoloc[geo]'")
    try:
        options = rt.TileOptions(
            raster=args.raster, out=args.out, tile_m=args.tile_m, stride_m=args.stride_m,
            centres_m=args.centres_m, tile_px=args.tile_px, image_format=args.image_format,
            jpeg_quality=args.jpeg_quality, max_nodata=args.max_nodata,
            bands=rt.parse_band_list(args.bands) if args.bands is not None else None,
            value_range=rt.parse_value_range(args.value_range) if args.value_range is not None else None,
            resampling=args.resampling, memory_budget=args.memory_budget, id_prefix=args.id_prefix,
            overwrite=args.overwrite)
        result = rt.tile_raster(options, progress=not args.quiet)
    except rt.TilingError as exc:
        return fail(str(exc))
    except OSError as exc:  # not the input's fault (a full disk, say): one line all the same
        print(f"index_build tile: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(result.summary_line())
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    _set_up_logging(logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO)
    try:
        return _run_tile(args) if args.command == "tile" else _run(args)
    except KeyboardInterrupt:  # a finished shard is kept, a half-written file never published
        tool = "index_build tile" if args.command == "tile" else "index_build"
        print(f"{tool}: interrupted{_INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args) -> int:
    from index_build.artifact import ArtifactError
    from index_build.build import AddOptions, BuildError, BuildOptions, run_add, run_build
    from index_build.encode_common import BadImagesError, EncoderFailed
    from index_build.sources import CatalogueError
    from model.checkpoint import CheckpointError
    from model.config import ConfigError

    try:
        if args.command == "build":
            _print_result(run_build(_encode_options(BuildOptions, args)), args)
        elif args.command == "add":
            _print_result(run_add(_encode_options(AddOptions, args)), args)
        elif args.command == "info":
            from index_build.artifact import read_built_manifest, resolve_artifact

            root = resolve_artifact(args.artifact)
            manifest = read_built_manifest(root)
            if not args.full:
                manifest = dict(manifest)
                manifest["shards"] = f"{len(manifest.get('shards', []))} shard file(s) (--full to list)"
                skipped = manifest.get("skipped", {})
                manifest["skipped"] = {"count": skipped.get("count", 0),
                                       "tiles": skipped.get("tiles", [])[:10]}
                manifest.get("index_params", {}).pop("tuning_curve", None)
            # "orientation": null says outright that the artifact stores no orientation columns
            print(json.dumps({"path": os.path.abspath(args.artifact), "resolved": root, **manifest,
                              "orientation": manifest.get("orientation")}, indent=2))
        elif args.command == "verify":
            from index_build.verify import run_verify

            report = run_verify(args.artifact, args.checkpoint, sample=args.sample, seed=args.seed,
                                device=args.device, batch_size=args.batch_size, model_config=args.model_config,
                                min_rank1=args.min_rank1, tolerance=args.tolerance)
            print(json.dumps(report, indent=2))
            return EXIT_OK if report["ok"] else EXIT_FAILED
    except CatalogueError as exc:
        if exc.report_unwritten:  # then every problem is printed: the report file holds none of them
            print(f"index_build: warning: {exc.report_unwritten}", file=sys.stderr)
        print(exc.report(limit=100 if exc.report_path else None), file=sys.stderr)
        return EXIT_INVALID
    except (BuildError, ArtifactError, BadImagesError, EncoderFailed, CheckpointError, ConfigError) as exc:
        print(f"index_build: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as exc:  # e.g. --out where it cannot be written: the message names the file
        if args.verbose:
            raise
        print(f"index_build: error: {exc} (-v shows where)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

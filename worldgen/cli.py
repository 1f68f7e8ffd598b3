"""``python -m worldgen`` / ``worldgen``: generate a synthetic geo-tagged world data set."""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
output layout (docs/INTERFACES.md):
  DIR/world.json            seed, origin, area, tile footprint, sizes, counts, version
  DIR/bingmap/<id>.png      north-up aerial tile centred on the camera
  DIR/streetview/<id>.jpg   equirectangular panorama: left edge south, centre north
  DIR/splits/train.csv      id,aerial,ground,lat,lon (paths relative to DIR)
  DIR/splits/val.csv        same columns; val = whole spatial blocks (--val-fraction)
  DIR/tiles.csv             tile_id,lat,lon,path  (catalogue for index_build)
  DIR/queries.csv           query_id,path,lat,lon,tile_id (panoramas with ground truth)
  DIR/cameras.csv           id,x_m,y_m,lat,lon,heading_deg,area_type,split (extra metadata); with a limited
                            field of view (--camera perspective or --fov < 360) also
                            camera,hfov_deg,vfov_deg,pitch_deg,roll_deg,width,height
--layout grid instead: DIR/ortho.tif (GeoTIFF of the whole region, local transverse Mercator),
  DIR/streetview/<id>.jpg at cameras anywhere on the roads, queries.csv (query_id,path,lat,lon),
  cameras.csv (no split column), world.json; no bingmap/, tiles.csv or splits/. Cut the tiles with
  python -m index_build tile --raster DIR/ortho.tif --tile-m 100 --stride-m 50 --out DIR/tiles

examples:
  python -m worldgen --seed 1 --area-km2 14 --pairs 6000 --out data/world_train --workers 2
  python -m worldgen --seed 2 --area-km2 3 --pairs 1000 --out data/world_eval --workers 2
  # phone-photo queries of the same region: pinhole 4:3, unknown heading, a tilted hand
  python -m worldgen --seed 2 --area-km2 3 --pairs 1000 --out data/world_eval_photos_tilted --camera perspective \
      --fov 65 --heading-jitter 180 --pitch-roll-jitter 5 --exif
  # every aerial tile, but panoramas for only the first 32 positions (what `make demo` renders)
  python -m worldgen --seed 4242 --area-km2 4 --panoramas 32 --out demo/world --workers 2
  # one orthophoto of the region plus 200 panoramas anywhere on its roads
  python -m worldgen --seed 5 --area-km2 1 --layout grid --pairs 200 --out data/world_grid --workers 2
Same seed and arguments give byte-identical output, for any --workers.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worldgen",
        description="Generate a procedural geo-tagged region (roads, buildings, trees, water, fields; "
                    "urban, suburban and rural districts) and render aerial tile + street panorama pairs "
                    "at camera positions on its roads.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, required=True, help="world seed (different seeds = different, unseen regions)")
    p.add_argument("--area-km2", type=float, required=True, help="area of the square region holding the cameras, km^2")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--pairs", type=int, default=None,
                   help="number of pairs; default: every camera position that fits (~300-600 per km^2 at 25 m spacing)")
    p.add_argument("--panoramas", type=int, default=None, metavar="N",
                   help="render the ground images (panoramas, or photos with --camera perspective) of only the "
                        "first N camera positions (default: all). Every aerial tile is still rendered; the images, "
                        "tiles.csv and cameras.csv are byte-identical to a full run's, queries.csv and splits/ "
                        "list only the N pairs with a ground image")
    p.add_argument("--layout", choices=("pairs", "grid"), default="pairs",
                   help="'pairs' (default): an aerial tile centred on every camera; 'grid': the whole region's "
                        "aerial view as one GeoTIFF (DIR/ortho.tif, tile_px pixels per footprint) and ground "
                        "images at cameras anywhere on the roads, for `index_build tile` to cut")
    p.add_argument("--tile-px", type=int, default=256, help="aerial tile size in pixels (default 256)")
    p.add_argument("--footprint-m", type=float, default=100.0, help="aerial tile footprint in metres (default 100)")
    p.add_argument("--pano-height", type=int, default=128, help="panorama height in pixels (default 128)")
    p.add_argument("--pano-width", type=int, default=512, help="panorama width in pixels (default 512)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of pairs in splits/val.csv (default 0.1)")
    p.add_argument("--min-spacing", type=float, default=25.0, help="minimum distance between cameras in metres (default 25)")
    p.add_argument("--lat", type=float, default=47.3769, help="latitude of the region centre (default 47.3769)")
    p.add_argument("--lon", type=float, default=8.5417, help="longitude of the region centre (default 8.5417)")
    p.add_argument("--world-res", type=float, default=0.4, help="world raster resolution in metres/pixel (default 0.4)")
    p.add_argument("--camera", choices=("panorama", "perspective"), default="panorama",
                   help="ground camera: equirectangular 'panorama' (default) or a pinhole 'perspective' photo "
                        "(a phone's frame, see --photo-size) rendered from the same scene")
    p.add_argument("--fov", type=float, default=None,
                   help="horizontal field of view in degrees: of the panorama (default 360 = full; less keeps "
                        "the centre columns) or of the perspective photo (default 65, a phone's main camera)")
    p.add_argument("--heading-jitter", type=float, default=0.0,
                   help="random heading of the panorama centre / the photo's optical axis, uniform in +-degrees "
                        "(default 0: looks north; 180: any heading)")
    p.add_argument("--pitch-roll-jitter", type=float, default=0.0, metavar="DEG",
                   help="perspective only: pitch and roll each uniform in +-DEG (default 0: level camera)")
    p.add_argument("--photo-size", default=None, metavar="WxH",
                   help="perspective only: photo size in pixels (default 1024x768, a phone's 4:3 frame)")
    p.add_argument("--exif", action="store_true",
                   help="perspective only: write EXIF FocalLengthIn35mmFilm (from --fov) and GPSImgDirection "
                        "(the true heading, ref 'T') into the photos")
    p.add_argument("--jpeg-quality", type=int, default=90, help="panorama JPEG quality (default 90)")
    p.add_argument("--workers", type=int, default=1, help="render processes (default 1); output does not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically, at the end)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    return p


def main(argv=None) -> int:
    from worldgen.dataset import GenConfig, WorldgenError, generate_dataset

    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    perspective = args.camera == "perspective"
    if args.photo_size is not None and not perspective:
        print("error: --photo-size needs --camera perspective", file=sys.stderr)
        return 2
    photo_w, photo_h = 1024, 768
    if args.photo_size is not None:
        try:
            photo_w, photo_h = (int(v) for v in args.photo_size.lower().split("x"))
        except ValueError:
            print(f"error: --photo-size must look like 1024x768 (width x height), got {args.photo_size!r}",
                  file=sys.stderr)
            return 2
    fov = args.fov if args.fov is not None else (65.0 if perspective else 360.0)
    cfg = GenConfig(seed=args.seed, area_km2=args.area_km2, pairs=args.pairs, tile_px=args.tile_px,
                    footprint_m=args.footprint_m, pano_height=args.pano_height, pano_width=args.pano_width,
                    val_fraction=args.val_fraction, min_spacing_m=args.min_spacing, lat=args.lat, lon=args.lon,
                    world_res_m=args.world_res, fov_deg=fov, heading_jitter_deg=args.heading_jitter,
                    jpeg_quality=args.jpeg_quality, camera=args.camera,
                    pitch_roll_jitter_deg=args.pitch_roll_jitter, photo_width=photo_w, photo_height=photo_h,
                    exif=args.exif, panoramas=args.panoramas, layout=args.layout)
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        generate_dataset(cfg, args.out, workers=args.workers, overwrite=args.overwrite,
                         progress=not args.quiet, log=log)
    except WorldgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # not the arguments' fault (a full disk, say): one line all the same
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

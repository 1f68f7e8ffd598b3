#!/usr/bin/env python3
"""The README picture: one demo panorama, its top-k tiles from a real /localize call on a map of the region.

    python scripts/demo_picture.py --url http://127.0.0.1:8000 --world demo/world --out docs/demo.png

`make demo-picture` (= `scripts/demo.py --smoke --picture docs/demo.png`) starts the demo API, calls
this and stops it again. Everything shown comes from the running service: the matches and their
scores from POST /localize, the tile images from GET /tiles/{tile_id}; the region's tile
coordinates (grey dots) and the panorama's true position come from the world's tiles.csv and
queries.csv. Needs matplotlib (the `plot` extra).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import DemoError, Region, api_key_from_env, demo_query, haversine_m, localize  # noqa: E402
from model.arguments import non_negative_int, positive_int  # noqa: E402


def _fetch(url: str, api_key: str | None, timeout: float = 10.0) -> bytes | None:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("X-API-Key", api_key)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()
    except OSError:
        return None


def _read_tile_coords(tiles_csv: Path) -> tuple[list[float], list[float]]:
    lats, lons = [], []
    with open(tiles_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            lats.append(float(row["lat"]))
            lons.append(float(row["lon"]))
    return lats, lons


def make_picture(base_url: str, world: Path, out: Path, query: int = 0, k: int = 5,
                 api_key: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpecFromSubplotSpec
    from PIL import Image

    region = Region(world, world / "tiles.csv", world / "queries.csv")
    q = demo_query(region, query)
    answer = localize(base_url, q.path, k, api_key)
    results = answer["results"]
    lats, lons = _read_tile_coords(region.tiles_csv)

    fig = plt.figure(figsize=(12, 7.6), dpi=110)
    outer = fig.add_gridspec(2, 2, height_ratios=[1.0, 2.6], width_ratios=[1.15, 1.0], hspace=0.22, wspace=0.08)

    ax = fig.add_subplot(outer[0, :])
    ax.imshow(Image.open(q.path).convert("RGB"))
    ax.set_title(f"query: street panorama {q.query_id}   (equirectangular; left edge south, centre north)",
                 fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])

    ax = fig.add_subplot(outer[1, 0])
    ax.scatter(lons, lats, s=5, c="#9a9a9a", lw=0, label=f"{len(lats)} indexed aerial tiles")
    cmap = plt.get_cmap("viridis")
    for r in reversed(results):
        colour = cmap((r["rank"] - 1) / max(1, len(results) - 1) * 0.85)
        ax.scatter([r["lon"]], [r["lat"]], s=180 if r["rank"] == 1 else 90, color=colour, edgecolor="black",
                   lw=0.8, zorder=3)
        ax.annotate(str(r["rank"]), (r["lon"], r["lat"]), ha="center", va="center", fontsize=7,
                    color="white", zorder=4, fontweight="bold")
    # a ring, so that a correct rank-1 marker stays visible inside it
    ax.scatter([q.lon], [q.lat], marker="o", s=520, facecolors="none", edgecolors="#e0202a", lw=2.2, zorder=5,
               label="true position")
    ax.scatter([], [], s=90, color=cmap(0.0), edgecolor="black", label=f"top-{len(results)} matches (rank)")
    ax.set_aspect(1.0 / math.cos(math.radians(sum(lats) / len(lats))))
    ax.set_ylabel("latitude")
    ax.ticklabel_format(useOffset=False)
    ax.tick_params(labelsize=7)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, fontsize=8, frameon=False,
              markerscale=0.8)
    top = results[0]
    err = haversine_m(q.lat, q.lon, top["lat"], top["lon"])
    rank = next((r["rank"] for r in results if r["tile_id"] == q.tile_id), None)
    found = f"true tile at rank {rank}" if rank else f"true tile not in the top {len(results)}"
    ax.set_title(f"POST /localize?k={k}: top-1 is {err:.0f} m from the truth; {found}", fontsize=10)

    # Thumbnails, as served by GET /tiles/{tile_id}: the true tile, then the matches.
    shown = [("true tile " + q.tile_id, q.tile_id, "#e0202a")]
    shown += [(f"#{r['rank']}  {r['tile_id']}\nscore {r['score']:.3f}, "
               f"{haversine_m(q.lat, q.lon, r['lat'], r['lon']):.0f} m", r["tile_id"],
               "#e0202a" if r["tile_id"] == q.tile_id else "black") for r in results[:5]]
    grid = GridSpecFromSubplotSpec(2, 3, subplot_spec=outer[1, 1], hspace=0.35, wspace=0.08)
    for i, (label, tile_id, colour) in enumerate(shown):
        ax = fig.add_subplot(grid[i // 3, i % 3])
        data = _fetch(f"{base_url}/tiles/{tile_id}", api_key)
        if data:
            ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        else:
            ax.text(0.5, 0.5, "no thumbnail", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=8, color=colour)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(2 if colour != "black" else 0.8)

    fig.suptitle("L2LTR cross-view geo-localisation: where was this panorama taken?", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running API")
    p.add_argument("--world", default="demo/world", help="the region (tiles.csv, queries.csv)")
    p.add_argument("--out", default="docs/demo.png", help="the picture (PNG) to write (default docs/demo.png)")
    p.add_argument("--query", type=non_negative_int, default=0, help="row of queries.csv to localise")
    p.add_argument("--k", type=positive_int, default=5, help="matches drawn on the map (default 5)")
    args = p.parse_args(argv)
    try:
        out = make_picture(args.url.rstrip("/"), Path(args.world), Path(args.out), args.query, args.k,
                           api_key_from_env())
    except (DemoError, OSError) as exc:  # urllib's URLError is an OSError: no API at --url
        print(f"demo_picture: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

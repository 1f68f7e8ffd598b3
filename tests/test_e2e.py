"""End to end, as a new user runs it: a fresh `make demo`-style pipeline on a tiny unseen region in a
temporary directory (worldgen -> index_build with the shipped demo checkpoint -> a real uvicorn on a
free loopback port), then held-out panoramas POSTed to /localize: their true tiles must come back in
the top-k, and the top-1 localisation error in metres is reported. Then 90 degree crops of them, and phone
photos of the same places sent as a phone app sends them (EXIF only).

The shipped model (weights/l2ltr_tiny_demo.safetensors) was trained on other seeds, so every
panorama of this region is held out. An untrained model cannot pass this, so the test skips when the
checkpoint is absent; L2LTR_E2E_CHECKPOINT points it at another checkpoint (development only).
"""
from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from ship_support import (DEMO_CHECKPOINT, PY, REPO, assert_same_matches, clean_env, demo_module, free_port, post_image,
                          read_csv, stdout_lines)

CHECKPOINT = Path(os.environ.get("L2LTR_E2E_CHECKPOINT", DEMO_CHECKPOINT))
SEED = 777            # not a training seed of the demo model (weights/README.md)
AREA_KM2 = 0.25       # ~120 tiles: the gallery every panorama is matched against
K = 10                # top-k asked for; chance of a hit is k / N, about 8 %
BATCH = 8             # panoramas per POST /localize/batch (GEOLOC_MAX_BATCH_IMAGES default)
MIN_RECALL = 0.7      # fraction of ALL the region's panoramas whose true tile must be in the top-k;
                      # the shipped model gets 1.00 here (129/129; top-1 124/129), a random-weight model 0.09 (11/129)
CROP_FOV = 90.0       # then each panorama again as a 90 degree crop around a random heading, heading unknown
MIN_CROP_RECALL = 0.65  # top-k hits among those crops; the shipped model 0.84 (109/129), the checkpoint before
                        # it 0.88 (114/129), then 0.77 (99/129), then 0.70 (90/129), then 0.73 (94/129), then
                        # 0.75 (97/129; 95 at re-rank weight 0.5), the orientation head before that 0.64 (82/129:
                        # fails), the re-rank off 84/129, chance k / N, about 8 %
MAX_HEADING_ERROR = 20.0  # median degrees, over the crops whose true tile is in the top-k (shipped: 3.1)
PHOTOS = 24           # and phone photos of the first PHOTOS positions (worldgen --camera perspective, 90 degrees,
                      # pitch and roll +-3 degrees, EXIF focal length and compass heading), sent with no parameters:
MIN_PHOTO_RECALL = 0.75  # true tile in the top-k; the shipped model 0.92 (22/24), chance k / N, about 8 %
MAX_TILT_ERROR = 1.0  # median degrees (the worse of pitch and roll) of the tilt the service estimated (shipped: 0.15)


pytestmark = pytest.mark.skipif(
    not CHECKPOINT.is_file(),
    reason=f"{CHECKPOINT.relative_to(REPO) if CHECKPOINT.is_relative_to(REPO) else CHECKPOINT} is absent: "
           "the end-to-end test needs the shipped, trained demo checkpoint (an untrained model cannot "
           "find the true tile)")


def _read_until_curl(proc: subprocess.Popen, timeout: float) -> tuple[str, list[str]]:
    lines = stdout_lines(proc)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line.strip().startswith("curl "):
            return line.strip(), seen
    raise AssertionError("the demo printed no curl line:\n" + "".join(seen[-60:]))


def _localize_batch(base_url: str, images: list[Path], k: int) -> list[dict]:
    import httpx

    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
    resp = httpx.post(f"{base_url}/localize/batch", params={"k": k}, files=files, timeout=120)
    assert resp.status_code == 200, f"/localize/batch answered {resp.status_code}: {resp.text[:500]}"
    return resp.json()["items"]


def test_fresh_pipeline_localises_held_out_panoramas(tmp_path, capsys):
    demo_dir = tmp_path / "demo"
    port = free_port()
    t0 = time.monotonic()
    photos = tmp_path / "photos"  # the same region's phone photos, rendered while the demo starts
    photo_log = open(tmp_path / "photos.log", "w")
    photo_gen = subprocess.Popen(
        [PY, "-m", "worldgen", "--seed", str(SEED), "--area-km2", str(AREA_KM2), "--camera", "perspective",
         "--fov", "90", "--heading-jitter", "180", "--pitch-roll-jitter", "3", "--exif", "--panoramas", str(PHOTOS),
         "--workers", "1", "--out", str(photos)],
        cwd=REPO, env=clean_env(), stdout=photo_log, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(
        [PY, str(REPO / "scripts" / "demo.py"), "--dir", str(demo_dir), "--checkpoint", str(CHECKPOINT),
         "--seed", str(SEED), "--area-km2", str(AREA_KM2), "--workers", "1", "--panoramas", "all",
         "--port", str(port), "--k", str(K)],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        curl, log = _read_until_curl(proc, timeout=240)
        ready_s = time.monotonic() - t0
        base_url = f"http://127.0.0.1:{port}"
        assert any("region: generating" in ln for ln in log) and any("index: building" in ln for ln in log)

        # the printed curl, as a user would paste it
        argv = shlex.split(curl)
        if shutil.which("curl"):
            out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            printed = json.loads(out.stdout)
            assert len(printed["results"]) == K
            assert printed["model"]["fingerprint"] == demo_module().checkpoint_fingerprint(CHECKPOINT)

        world = demo_dir / "world"
        queries = read_csv(world / "queries.csv")
        tiles = read_csv(world / "tiles.csv")
        assert len(tiles) >= 60, f"region too small for a meaningful top-{K}: {len(tiles)} tiles"
        haversine = demo_module().haversine_m
        ranks, errors = [], []
        # one panorama alone through POST /localize ...
        first = post_image(base_url, world / queries[0]["path"], k=K)["results"]
        # ... and every panorama of the region through POST /localize/batch
        picked = queries
        for start in range(0, len(picked), BATCH):
            chunk = picked[start:start + BATCH]
            items = _localize_batch(base_url, [world / q["path"] for q in chunk], K)
            assert [it["image"] for it in items] == list(range(len(chunk)))
            if start == 0:
                assert_same_matches(items[0]["results"], first)  # single and batch answers agree
            for q, item in zip(chunk, items):
                results = item["results"]
                assert len(results) == K
                ranks.append(next((r["rank"] for r in results if r["tile_id"] == q["tile_id"]), None))
                errors.append(haversine(float(q["lat"]), float(q["lon"]), results[0]["lat"], results[0]["lon"]))
        crop_hits, heading_errors = _localize_crops(base_url, world, picked)
        assert photo_gen.wait(timeout=300) == 0, (tmp_path / "photos.log").read_text()[-2000:]
        assert (photos / "tiles.csv").read_bytes() == (world / "tiles.csv").read_bytes()  # the same region
        photo_hits, tilt_errors = _localize_photos(base_url, photos)
    finally:
        if photo_gen.poll() is None:
            photo_gen.kill()
            photo_gen.wait()
        photo_log.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    hits = sum(r is not None for r in ranks)
    top1 = sum(r == 1 for r in ranks)
    report = (f"e2e: {len(tiles)} tiles, all {len(picked)} panoramas held out, ready after {ready_s:.0f} s; "
              f"true tile in top-{K}: {hits}/{len(picked)}, top-1: {top1}/{len(picked)}; "
              f"top-1 error median {statistics.median(errors):.0f} m, mean {statistics.mean(errors):.0f} m, "
              f"first panorama {errors[0]:.0f} m (rank {ranks[0]}); chance of a top-{K} hit {K / len(tiles):.2f}")
    crops = (f"{CROP_FOV:g} degree crops, heading unknown: true tile in top-{K}: {crop_hits}/{len(picked)}; "
             f"heading error at the true tile: median {statistics.median(heading_errors):.1f} deg "
             f"over {len(heading_errors)}" if heading_errors else "no heading estimated")
    phone = (f"phone photos, no parameters (EXIF focal length and heading, tilt estimated): true tile in "
             f"top-{K}: {photo_hits}/{len(tilt_errors)}; tilt error median {statistics.median(tilt_errors):.2f} deg")
    with capsys.disabled():
        print("\n" + report + "\n" + crops + "\n" + phone)
    assert hits >= MIN_RECALL * len(picked), report
    assert crop_hits >= MIN_CROP_RECALL * len(picked), crops
    assert heading_errors and statistics.median(heading_errors) <= MAX_HEADING_ERROR, crops
    assert len(tilt_errors) == PHOTOS and photo_hits >= MIN_PHOTO_RECALL * PHOTOS, phone
    assert statistics.median(tilt_errors) <= MAX_TILT_ERROR, phone


def _localize_crops(base_url: str, world: Path, queries: list[dict]) -> tuple[int, list[float]]:
    """Each panorama cut to CROP_FOV degrees around a random heading, sent with fov_deg and no
    heading: how many find their true tile in the top-K, and the heading error at that tile."""
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from model.preprocess import crop_panorama_fov
    from model.views import angle_difference

    headings = np.random.default_rng(SEED).uniform(0.0, 360.0, len(queries))
    hits, heading_errors = 0, []
    for start in range(0, len(queries), BATCH):
        files = []
        for q, heading in zip(queries[start:start + BATCH], headings[start:start + BATCH]):
            crop = crop_panorama_fov(np.asarray(Image.open(world / q["path"]).convert("RGB")), CROP_FOV, heading)
            out = io.BytesIO()
            Image.fromarray(crop).save(out, format="JPEG", quality=92)
            files.append(("images", (f"{q['query_id']}.jpg", out.getvalue(), "image/jpeg")))
        resp = httpx.post(f"{base_url}/localize/batch", files=files, timeout=120,
                          params={"k": K, "fov_deg": CROP_FOV, "projection": "equirectangular"})
        assert resp.status_code == 200, resp.text[:500]
        for q, heading, item in zip(queries[start:start + BATCH], headings[start:start + BATCH], resp.json()["items"]):
            match = next((r for r in item["results"] if r["tile_id"] == q["tile_id"]), None)
            if match is not None:
                hits += 1
                if match["heading_deg"] is not None:
                    heading_errors.append(float(angle_difference(match["heading_deg"], heading)))
    return hits, heading_errors


def _localize_photos(base_url: str, photos: Path) -> tuple[int, list[float]]:
    """Each phone photo POSTed as a phone app would, with no parameters: the service must take its field of
    view and heading from the EXIF and estimate its tilt. How many find their true tile in the top-K, and
    the error of each estimated tilt (the worse of pitch and roll, degrees)."""
    cameras = {c["id"]: c for c in read_csv(photos / "cameras.csv")}
    hits, tilt_errors = 0, []
    for q in read_csv(photos / "queries.csv"):
        answer = post_image(base_url, photos / q["path"], k=K)
        view, camera = answer["view"], cameras[q["query_id"]]
        assert (view["projection"], view["fov_source"], view["heading_source"], view["tilt_source"]) == (
            "perspective", "exif", "exif", "estimated"), view
        hits += any(r["tile_id"] == q["tile_id"] for r in answer["results"])
        tilt_errors.append(max(abs(view["pitch_deg"] - float(camera["pitch_deg"])),
                               abs(view["roll_deg"] - float(camera["roll_deg"]))))
    return hits, tilt_errors

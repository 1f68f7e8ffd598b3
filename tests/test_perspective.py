"""Limited field of view: worldgen's pinhole photos (--camera perspective) and the mapping of a
photo or an equirectangular crop into the panorama frame (model.preprocess)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import worldgen.render as R
from model.preprocess import (crop_panorama_fov, equirect_crop_to_panorama, exif_camera, panorama_angles,
                              perspective_project, perspective_to_panorama)
from worldgen.dataset import GenConfig, camera_exif, focal_length_35mm, generate_dataset
from worldgen.render import (EYE_HEIGHT, pano_angles, perspective_angles, render_pano, render_perspective,
                             sample_pano_look)
from worldgen.world import add_box_building, blank_world, camera_positions, generate_world

H, W = 128, 512


def _quiet_look(seed=1, noise=0.0):
    return dataclasses.replace(sample_pano_look(np.random.default_rng(seed)), noise=noise)


# --------------------------------------------------------------------------- the camera model

def test_perspective_angles_centre_ray_and_level_columns():
    w, h = 101, 75  # odd: the centre pixel's ray is the optical axis
    rng = np.random.default_rng(3)
    for _ in range(6):
        hf, hd, pt, rl = rng.uniform(20, 120), rng.uniform(-180, 180), rng.uniform(-30, 30), rng.uniform(-30, 30)
        az, el = perspective_angles(w, h, hf, hd, pt, rl)
        assert az.shape == el.shape == (h, w)
        d_az = (az[h // 2, w // 2] - math.radians(hd) + math.pi) % (2 * math.pi) - math.pi
        assert abs(d_az) < 1e-9 and el[h // 2, w // 2] == pytest.approx(math.radians(pt), abs=1e-9)
    # a level camera: image columns are vertical planes (one azimuth each), rows at atan(y / f)
    f = (w / 2) / math.tan(math.radians(30))
    az, el = perspective_angles(w, h, 60.0, 90.0)
    expect_az = math.radians(90) + np.arctan((np.arange(w) + 0.5 - w / 2) / f)
    np.testing.assert_allclose(az, np.broadcast_to(expect_az, (h, w)), atol=1e-12)
    np.testing.assert_allclose(el[:, w // 2], np.arctan((h / 2 - np.arange(h) - 0.5) / f), atol=1e-12)
    # roll > 0 turns the camera's right side down: the right half of the image looks lower
    _, el_r = perspective_angles(w, h, 60.0, 0.0, 0.0, 10.0)
    assert el_r[h // 2, -1] < 0 < el_r[h // 2, 0]


def test_worldgen_rays_and_model_projection_are_inverse():
    rng = np.random.default_rng(4)
    for _ in range(8):
        w, h = int(rng.integers(40, 200)), int(rng.integers(30, 150))
        hf, hd, pt, rl = rng.uniform(10, 150), rng.uniform(-180, 180), rng.uniform(-40, 40), rng.uniform(-40, 40)
        az, el = perspective_angles(w, h, hf, hd, pt, rl)
        x, y, in_front = perspective_project(az, el, hf, (h, w), hd, pt, rl)
        assert in_front.all()
        np.testing.assert_allclose(x, np.broadcast_to(np.arange(w) + 0.5, (h, w)), atol=1e-8)
        np.testing.assert_allclose(y, np.broadcast_to((np.arange(h) + 0.5)[:, None], (h, w)), atol=1e-8)


# --------------------------------------------------------------------------- worldgen renderer

@pytest.fixture(scope="module")
def north_box():
    """Flat world, camera at the origin, a 30 m box whose south face is 20 m north of it."""
    w = blank_world(half_world=160.0)
    add_box_building(w, 0.0, 25.0, hu=15.0, hv=5.0, height=30.0)
    return w


def _facade(depth):
    return np.isfinite(depth) & (depth < 60)


def test_perspective_view_of_a_box_has_pinhole_geometry(north_box):
    pw, ph, hfov = 400, 300, 90.0
    f = (pw / 2) / math.tan(math.radians(hfov / 2))
    img, depth = render_perspective(north_box, 0.0, 0.0, pw, ph, hfov, look=_quiet_look(), return_depth=True)
    assert img.shape == (ph, pw, 3) and img.dtype == np.uint8 and depth.shape == (ph, pw)
    # the facade plane y = 20 m spans x = +-15 m: image columns w/2 +- f * 15/20
    row = ph // 2 - 3  # just above the horizon
    cols = np.flatnonzero(_facade(depth[row]))
    assert abs(cols.min() - (pw / 2 - f * 0.75)) <= 2 and abs(cols.max() + 1 - (pw / 2 + f * 0.75)) <= 2
    assert depth[row, pw // 2] == pytest.approx(20.0, abs=0.3)
    u = pw // 2 + 60  # off-axis: horizontal distance along the ray is 20 / cos(azimuth)
    assert depth[row, u] == pytest.approx(20.0 / math.cos(math.atan((u + 0.5 - pw / 2) / f)), abs=0.3)
    # facing east, the box (+-37 degrees around north) is out of a 90 degree view: above the
    # horizon only sky
    _, d_east = render_perspective(north_box, 0.0, 0.0, pw, ph, hfov, heading_deg=90.0, look=_quiet_look(),
                                   return_depth=True)
    assert not np.isfinite(d_east[:ph // 2 - 1]).any() and _facade(depth[:ph // 2 - 1]).any()
    # pitched up 25 degrees: the roof edge, at elevation atan(27.5 / 20) straight north, sits at
    # h/2 - f tan(e - pitch) in the centre column
    _, d_up = render_perspective(north_box, 0.0, 0.0, pw, ph, hfov, pitch_deg=25.0, look=_quiet_look(),
                                 return_depth=True)
    top = np.flatnonzero(_facade(d_up[:, pw // 2]))[0]
    e_top = math.atan((30.0 - EYE_HEIGHT) / 20.0)
    assert abs(top - (ph / 2 - f * math.tan(e_top - math.radians(25.0)))) <= 1.5
    # rolled clockwise (right side down): the roof edge rises on the right of the image
    _, d_roll = render_perspective(north_box, 0.0, 0.0, pw, ph, hfov, pitch_deg=25.0, roll_deg=8.0,
                                   look=_quiet_look(), return_depth=True)
    first = lambda c: np.flatnonzero(_facade(d_roll[:, c]))[0]
    assert first(pw // 2 + 80) < first(pw // 2) - 5 < first(pw // 2 - 80) - 10


@pytest.fixture(scope="module")
def small_world():
    return generate_world(11, 0.08)


@pytest.fixture(scope="module")
def positions(small_world):
    return camera_positions(small_world, 20.0, np.random.default_rng(0))


def test_row_band_render_equals_the_full_panorama_rows(small_world, positions):
    look = _quiet_look(2)
    x, y = positions[5]
    az, el = pano_angles(96, 384)
    full, d_full = R._render_columns(small_world, x, y, az, el, look, np.random.default_rng(0), EYE_HEIGHT,
                                     120.0, 256, True)
    band, d_band = R._render_columns(small_world, x, y, az, el[30:61], look, np.random.default_rng(0), EYE_HEIGHT,
                                     120.0, 256, True, row0=30, full_rows=96)
    np.testing.assert_array_equal(band, full[30:61])
    np.testing.assert_array_equal(d_band, d_full[30:61])


def test_tree_passes_and_crop_columns_leave_pixels_unchanged(small_world, positions, monkeypatch):
    look = sample_pano_look(np.random.default_rng(3))
    x, y = positions[2]
    one_pass = render_pano(small_world, x, y, H, W, look, np.random.default_rng(1))
    monkeypatch.setattr(R, "_TREE_PIXELS_PER_PASS", 300)
    many = render_pano(small_world, x, y, H, W, look, np.random.default_rng(1))
    np.testing.assert_array_equal(many, one_pass)
    monkeypatch.undo()
    # a crop sees the same solids and tree sprites as the matching columns of the full panorama
    _, d_full = render_pano(small_world, x, y, H, W, look, heading_deg=30.0, return_depth=True)
    for fov in (60.0, 200.0, 350.0):
        _, d_crop = render_pano(small_world, x, y, H, W, look, heading_deg=30.0, fov_deg=fov, return_depth=True)
        keep = d_crop.shape[1]
        c0 = W // 2 - keep // 2
        np.testing.assert_array_equal(d_crop, d_full[:, c0:c0 + keep])


def test_tree_sprites_across_the_edges_of_a_crop():
    """Trees straddling a crop's first/last column and the panorama's own seam (south)."""
    from worldgen.world import C_GRASS, _tree_table

    w = blank_world(half_world=60.0)
    w.cls[:] = C_GRASS
    trees = []
    for az_deg, dist in ((180.0, 7.0), (-100.0, 7.0), (100.0, 7.0), (-175.0, 14.0), (176.0, 20.0)):
        a = math.radians(az_deg)
        trees.append((dist * math.sin(a), dist * math.cos(a), 2.2, 8.0, 2.0, int(az_deg > 170), 0))
    w.trees = _tree_table(w, trees, np.random.default_rng(0))
    assert len(w.trees["x"]) == 5
    look = _quiet_look(5)
    _, d_full = render_pano(w, 0.0, 0.0, H, W, look, return_depth=True)
    assert np.isfinite(d_full[:, 0]).sum() > 10 and np.isfinite(d_full[:, -1]).sum() > 10  # a tree on the seam
    for fov in (200.0, 350.0, 359.0):
        _, d_crop = render_pano(w, 0.0, 0.0, H, W, look, fov_deg=fov, return_depth=True)
        keep = d_crop.shape[1]
        c0 = W // 2 - keep // 2
        np.testing.assert_array_equal(d_crop, d_full[:, c0:c0 + keep])
        assert np.isfinite(d_crop[:H // 2 - 2, [0, -1]]).any(axis=0).all()  # trees cut by both crop edges


def test_photo_rendered_in_column_blocks_equals_one_block(small_world, positions, monkeypatch):
    look = _quiet_look(6, noise=1.5)
    x, y = positions[4]
    args = (small_world, x, y, 320, 240, 70.0, 25.0, 3.0, -2.0, look)
    one = render_perspective(*args, rng=np.random.default_rng(0))
    monkeypatch.setattr(R, "_PERSPECTIVE_BLOCK_PIXELS", 5000)
    np.testing.assert_array_equal(render_perspective(*args, rng=np.random.default_rng(0)), one)


def _mae(a, b, mask):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32))[mask].mean())


def test_photo_mapped_back_matches_the_panorama_of_the_same_place(small_world, positions):
    look = _quiet_look(1, noise=2.0)
    for k, (hd, pt, rl) in zip((3, 9, 14), ((37.0, 0.0, 0.0), (-120.0, 4.0, -3.0), (160.0, -3.0, 2.5))):
        x, y = positions[k]
        pano = render_pano(small_world, x, y, H, W, look, np.random.default_rng(k))
        photo = render_perspective(small_world, x, y, 640, 480, 65.0, hd, pt, rl, look, np.random.default_rng(k))
        assert photo.shape == (480, 640, 3)
        mapped, cov = perspective_to_panorama(photo, 65.0, hd, (H, W), pt, rl)
        right = _mae(mapped, pano, cov)
        wrong, cov_wrong = perspective_to_panorama(photo, 65.0, hd + 30.0, (H, W), pt, rl)
        wrong_heading = _mae(wrong, pano, cov_wrong)
        assert right < 0.1 * 255, (k, right)
        assert wrong_heading > 3 * right, (k, right, wrong_heading)
        if pt or rl:
            level, cov_level = perspective_to_panorama(photo, 65.0, hd, (H, W))
            assert _mae(level, pano, cov_level) > 1.5 * right


def test_a_tilted_photo_sent_level_is_what_tilt_view_trains_on(small_world, positions):
    """The orientation head's tilted training photos (model.views.tilt_view, cut by limit_photo) are
    what the service makes of a tilted photo sent without its tilt (placed level)."""
    from model.views import photo_outline, rotate_view, tilt_view

    look = _quiet_look(2, noise=2.0)
    outline = photo_outline(H, W, 80.0)
    for k, (hd, pt, rl) in zip((5, 11), ((64.0, 5.0, -4.0), (-150.0, -4.0, 5.0))):
        x, y = positions[k]
        pano = render_pano(small_world, x, y, H, W, look, np.random.default_rng(k))
        photo = render_perspective(small_world, x, y, 640, 480, 80.0, hd, pt, rl, look, np.random.default_rng(k))
        placed, cov = perspective_to_panorama(photo, 80.0, 0.0, (H, W))  # level, its axis on the centre column
        assert (cov != outline).mean() < 0.002  # the level outline, up to its edge pixels
        centred = rotate_view(pano, hd)
        tilted, level = _mae(tilt_view(centred, pt, rl), placed, cov & outline), _mae(centred, placed, cov & outline)
        assert tilted < 0.1 * 255 and tilted < 0.6 * level, (k, tilted, level)


def test_worldgen_fov_crop_maps_back_onto_its_columns(small_world, positions):
    look = _quiet_look(4)
    x, y = positions[7]
    pano = render_pano(small_world, x, y, H, W, look)
    heading = -104 * 360 / W  # a whole number of columns: the crop's pixels are the panorama's
    crop = render_pano(small_world, x, y, H, W, look, heading_deg=heading, fov_deg=90.0)
    assert crop.shape == (H, 128, 3)
    mapped, cov = equirect_crop_to_panorama(crop, 90.0, heading, (H, W))
    cols = np.flatnonzero(cov.any(axis=0))
    assert cov.all(axis=0)[cols].all() and cols.tolist() == list(range(W // 2 - 104 - 64, W // 2 - 104 + 64))
    assert _mae(mapped, pano, cov) < 3.0  # only the per-pixel leaf texture of trees differs
    assert _mae(equirect_crop_to_panorama(crop, 90.0, heading + 30.0, (H, W))[0], pano, cov) > 10.0


# --------------------------------------------------------------------------- the mapping alone

def test_level_photo_covers_its_share_of_columns_and_rows():
    photo = np.random.default_rng(0).integers(1, 255, (480, 640, 3), dtype=np.uint8)
    for hfov in (40.0, 65.0, 90.0):
        vfov = 2 * math.degrees(math.atan(math.tan(math.radians(hfov) / 2) * 480 / 640))
        for heading in (0.0, 90.0, -135.0):
            pano, cov = perspective_to_panorama(photo, hfov, heading, (H, W))
            assert pano.shape == (H, W, 3) and pano.dtype == np.uint8 and cov.shape == (H, W) and cov.dtype == bool
            cols = np.flatnonzero(cov.any(axis=0))
            rows = np.flatnonzero(cov.any(axis=1))
            assert abs(len(cols) - hfov / 360 * W) <= 1
            assert abs(len(rows) - vfov / 180 * H) <= 1.5 and abs(rows.mean() - (H - 1) / 2) <= 0.5
            centre = (W / 2 + heading / 360 * W) % W
            assert abs((np.angle(np.exp(2j * np.pi * cols / W).mean()) / (2 * np.pi) * W) % W - centre) <= 0.6
            assert (pano[~cov] == 0).all() and (pano[cov].max(axis=-1) > 0).mean() > 0.99


def test_a_dot_at_the_principal_point_lands_at_heading_and_pitch():
    photo = np.zeros((481, 641, 3), np.uint8)
    photo[236:245, 316:325] = 255
    for heading, pitch, roll in ((100.0, 10.0, 20.0), (-30.0, -8.0, -5.0)):
        pano, _ = perspective_to_panorama(photo, 50.0, heading, (256, 1024), pitch, roll)
        i, j = np.unravel_index(np.argmax(pano[..., 0]), pano.shape[:2])
        assert abs(j - (512 + heading / 360 * 1024)) <= 1
        assert abs(i - ((90 - pitch) / 180 * 256 - 0.5)) <= 1


def _smooth_sky(az, el):
    """An analytic colour field on the sphere (RGB in 0..255)."""
    az, el = np.broadcast_arrays(az, el)
    return np.stack([128 + 100 * np.sin(3 * az) * np.cos(el), 128 + 100 * np.sin(4 * el),
                     128 + 80 * np.cos(2 * az + el)], axis=-1)


def test_photo_of_an_analytic_scene_maps_onto_that_scene():
    hf, hd, pt, rl = 70.0, 200.0, 6.0, -4.0
    az, el = perspective_angles(800, 600, hf, hd, pt, rl)
    photo = np.clip(np.rint(_smooth_sky(az, el)), 0, 255).astype(np.uint8)
    pano, cov = perspective_to_panorama(photo, hf, hd, (H, W), pt, rl)
    p_az, p_el = panorama_angles((H, W))
    truth = _smooth_sky(p_az[None, :], p_el[:, None])
    assert _mae(pano, truth, cov) < 1.5
    assert _mae(perspective_to_panorama(photo, hf, hd + 5.0, (H, W), pt, rl)[0], truth, cov) > 5.0


def test_crop_round_trip_and_coverage():
    rng = np.random.default_rng(1)
    pano = rng.integers(0, 256, (64, 256, 3), dtype=np.uint8)
    crop = crop_panorama_fov(pano, 90.0, 45.0)  # 45 degrees = 32 whole columns
    assert crop.shape == (64, 64, 3)
    np.testing.assert_array_equal(crop, pano[:, 128:192])
    back, cov = equirect_crop_to_panorama(crop, 90.0, 45.0, (64, 256))
    assert cov.sum(axis=1).tolist() == [64] * 64 and cov[:, 128:192].all()
    np.testing.assert_array_equal(back[cov], pano[cov])
    assert (back[~cov] == 0).all()
    # the whole circle is a rotation; it wraps across the panorama's edges
    back360, cov360 = equirect_crop_to_panorama(crop_panorama_fov(pano, 360.0, -90.0), 360.0, -90.0, (64, 256))
    assert cov360.all()
    np.testing.assert_array_equal(back360, pano)
    # a heading between columns, a smooth panorama, another output size: still in place
    az, el = panorama_angles((128, 512))
    smooth = np.clip(np.rint(_smooth_sky(az[None, :], el[:, None])), 0, 255).astype(np.uint8)
    crop = crop_panorama_fov(smooth, 120.0, 10.3)
    back, cov = equirect_crop_to_panorama(crop, 120.0, 10.3, (64, 256))
    small_az, small_el = panorama_angles((64, 256))
    assert abs(cov[0].sum() - 256 / 3) <= 1
    assert _mae(back, _smooth_sky(small_az[None, :], small_el[:, None]), cov) < 2.0


def test_bad_arguments_name_the_field():
    photo = np.zeros((48, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="hfov_deg"):
        perspective_to_panorama(photo, 180.0, 0.0, (H, W))
    with pytest.raises(ValueError, match="RGB image"):
        perspective_to_panorama(np.zeros((48, 64), np.uint8), 60.0, 0.0, (H, W))
    with pytest.raises(ValueError, match="fov_deg"):
        equirect_crop_to_panorama(photo, 0.0, 0.0, (H, W))


# --------------------------------------------------------------------------- EXIF

def test_exif_round_trip(tmp_path):
    assert focal_length_35mm(65.0, 4, 3) == 28 and focal_length_35mm(90.0, 4, 3) == 18
    for hfov, heading in ((65.0, -59.103), (40.0, 359.999), (90.0, 0.0)):
        path = tmp_path / "photo.jpg"
        Image.new("RGB", (64, 48)).save(path, exif=camera_exif(hfov, heading, 64, 48))
        got_fov, got_heading = exif_camera(str(path))
        assert got_fov == pytest.approx(2 * math.degrees(math.atan(18 / focal_length_35mm(hfov, 64, 48))))
        assert abs(got_fov - hfov) < 1.5
        assert abs((got_heading - heading + 180) % 360 - 180) <= 0.005 and 0 <= got_heading < 360
    # a portrait photo: its long side, the height, is the 36 mm side (it was read back 51.5 degrees wide)
    Image.new("RGB", (48, 64)).save(tmp_path / "portrait.jpg", exif=camera_exif(65.0, 0.0, 48, 64))
    assert focal_length_35mm(65.0, 48, 64) == 21 and abs(exif_camera(str(tmp_path / "portrait.jpg"))[0] - 65.0) < 1.5
    Image.new("RGB", (64, 48)).save(tmp_path / "plain.jpg")
    assert exif_camera(str(tmp_path / "plain.jpg")) == (None, None)


def test_the_exif_field_of_view_of_a_portrait_photo_spans_its_upright_width(tmp_path):
    f35 = focal_length_35mm(65.0, 64, 48)
    landscape, portrait = (2 * math.degrees(math.atan(half / f35)) for half in (18.0, 18.0 * 48 / 64))
    for stored, orientation, expected in (((64, 48), 1, landscape), ((48, 64), 1, portrait),
                                          ((64, 48), 6, portrait), ((64, 48), 8, portrait), ((64, 48), 3, landscape)):
        exif = Image.Exif()
        exif.load(camera_exif(65.0, 10.0, 64, 48))
        exif[0x0112] = orientation  # stored on its side (6, 8: the upright photo is 48 x 64) or upside down (3)
        path = tmp_path / "photo.jpg"
        Image.new("RGB", stored).save(path, exif=exif)
        assert exif_camera(str(path))[0] == pytest.approx(expected), (stored, orientation)


# --------------------------------------------------------------------------- worldgen --camera perspective

PHOTO_CFG = dict(seed=5, area_km2=0.05, pairs=6, min_spacing_m=15.0, val_fraction=0.25, camera="perspective",
                 fov_deg=60.0, heading_jitter_deg=180.0, pitch_roll_jitter_deg=5.0, photo_width=320,
                 photo_height=240, exif=True)


@pytest.fixture(scope="module")
def photo_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("persp") / "world"
    generate_dataset(GenConfig(**PHOTO_CFG), str(root), workers=1, progress=False, log=lambda *a: None)
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_perspective_world_layout_cameras_and_exif(photo_world):
    root = photo_world
    assert sorted(os.listdir(root)) == ["bingmap", "cameras.csv", "queries.csv", "splits", "streetview", "tiles.csv",
                                        "world.json"]
    cams = _rows(root / "cameras.csv")
    queries = _rows(root / "queries.csv")
    assert [c["id"] for c in cams] == [q["query_id"] for q in queries]
    assert list(cams[0]) == ["id", "x_m", "y_m", "lat", "lon", "heading_deg", "area_type", "split", "camera",
                             "hfov_deg", "vfov_deg", "pitch_deg", "roll_deg", "width", "height"]
    vfov = 2 * math.degrees(math.atan(math.tan(math.radians(30)) * 0.75))
    for c, q in zip(cams, queries):
        assert c["camera"] == "perspective" and float(c["hfov_deg"]) == 60.0
        assert float(c["vfov_deg"]) == pytest.approx(vfov, abs=1e-3)
        assert (c["width"], c["height"]) == ("320", "240")
        assert -180 <= float(c["heading_deg"]) <= 180
        assert abs(float(c["pitch_deg"])) <= 5 and abs(float(c["roll_deg"])) <= 5
        img = Image.open(root / q["path"])
        assert img.format == "JPEG" and img.size == (320, 240) and img.size[0] * 3 == img.size[1] * 4
        hfov, heading = exif_camera(str(root / q["path"]))
        assert hfov == pytest.approx(2 * math.degrees(math.atan(18 / focal_length_35mm(60.0, 320, 240))))
        assert abs((heading - float(c["heading_deg"]) + 180) % 360 - 180) <= 0.006
    assert len({c["pitch_deg"] for c in cams}) == len(cams)  # jittered, not constant
    meta = json.loads((root / "world.json").read_text())
    assert meta["camera"]["type"] == "perspective" and meta["camera"]["width"] == 320
    assert meta["config"]["camera"] == "perspective" and meta["config"]["exif"] is True


def test_perspective_world_is_deterministic_and_shares_poses_with_the_panorama_world(photo_world, tmp_path):
    again = tmp_path / "again"
    generate_dataset(GenConfig(**PHOTO_CFG), str(again), workers=2, progress=False, log=lambda *a: None)
    for dp, _, fns in os.walk(photo_world):
        for fn in fns:
            p = os.path.join(dp, fn)
            rel = os.path.relpath(p, photo_world)
            assert open(p, "rb").read() == (again / rel).read_bytes(), rel
    pano_cfg = {k: v for k, v in PHOTO_CFG.items()
                if k not in ("camera", "fov_deg", "pitch_roll_jitter_deg", "photo_width", "photo_height", "exif")}
    pano_root = tmp_path / "pano"
    generate_dataset(GenConfig(**pano_cfg), str(pano_root), progress=False, log=lambda *a: None)
    photos, panos = _rows(photo_world / "cameras.csv"), _rows(pano_root / "cameras.csv")
    key = ("id", "x_m", "y_m", "lat", "lon", "heading_deg", "split")
    assert [[r[k] for k in key] for r in photos] == [[r[k] for k in key] for r in panos]
    assert (photo_world / "bingmap" / "000001.png").read_bytes() == (pano_root / "bingmap" / "000001.png").read_bytes()
    assert "camera" not in _rows(pano_root / "cameras.csv")[0]


def test_perspective_photo_in_a_world_maps_onto_the_panorama_columns(photo_world, tmp_path):
    """The world's own photo, placed with cameras.csv, over the panorama of the same pair."""
    pano_root = tmp_path / "pano"
    cfg = {k: v for k, v in PHOTO_CFG.items()
           if k not in ("camera", "fov_deg", "pitch_roll_jitter_deg", "photo_width", "photo_height", "exif")}
    generate_dataset(GenConfig(**{**cfg, "heading_jitter_deg": 0.0}), str(pano_root), progress=False,
                     log=lambda *a: None)
    for c in _rows(photo_world / "cameras.csv")[:2]:
        photo = Image.open(photo_world / "streetview" / f"{c['id']}.jpg")
        pano = np.asarray(Image.open(pano_root / "streetview" / f"{c['id']}.jpg"))
        mapped, cov = perspective_to_panorama(photo, float(c["hfov_deg"]), float(c["heading_deg"]), pano.shape[:2],
                                              float(c["pitch_deg"]), float(c["roll_deg"]))
        assert _mae(mapped, pano, cov) < 0.1 * 255, c["id"]


def test_cli_perspective_options(tmp_path, capsys):
    from worldgen.cli import main

    base = ["--seed", "1", "--area-km2", "0.03", "--pairs", "2", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a"), "--pitch-roll-jitter", "3"]) == 2
    assert "--pitch-roll-jitter needs --camera perspective" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--exif"]) == 2
    assert "--exif needs --camera perspective" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "c"), "--photo-size", "640x480"]) == 2
    assert "--photo-size needs --camera perspective" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "d"), "--camera", "perspective", "--photo-size", "640by480"]) == 2
    assert "--photo-size must look like" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "e"), "--camera", "perspective", "--fov", "360"]) == 2
    assert "--fov must be in [1, 170]" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "f"), "--camera", "perspective", "--pitch-roll-jitter", "45"]) == 2
    assert "--pitch-roll-jitter must be" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path)]
    out = tmp_path / "ok"
    assert main(base + ["--out", str(out), "--camera", "perspective", "--photo-size", "160x120"]) == 0
    assert Image.open(out / "streetview" / "000000.jpg").size == (160, 120)
    row = _rows(out / "cameras.csv")[0]
    assert row["hfov_deg"] == "65.000" and row["pitch_deg"] == "0.000" and row["heading_deg"] == "0.000"
    assert exif_camera(str(out / "streetview" / "000000.jpg")) == (None, None)


def test_evaluate_places_the_photos_level_or_with_their_true_tilt(photo_world):
    """model.evaluate --photos (--photo-tilt): as the service places a photo without and with pitch_deg/roll_deg."""
    from pathlib import Path
    from types import SimpleNamespace

    from model.evaluate import evaluate, photo_views
    from model.views import place_view

    cams = _rows(photo_world / "cameras.csv")[:3]
    records, config = [SimpleNamespace(id=c["id"]) for c in cams], SimpleNamespace(ground_size=(32, 128))
    level, headings = photo_views(photo_world, records, config, centred=False)
    tilted, _ = photo_views(photo_world, records, config, centred=False, tilt=True)
    assert headings == pytest.approx([float(c["heading_deg"]) % 360 for c in cams])
    for c, lv, tv, h in zip(cams, level, tilted, headings):
        path = photo_world / "streetview" / f"{c['id']}.jpg"
        common = dict(fov_deg=float(c["hfov_deg"]), heading_deg=h, projection="perspective")
        assert (lv == place_view(path, config, **common)[0]).all()
        assert (tv == place_view(path, config, pitch_deg=float(c["pitch_deg"]), roll_deg=float(c["roll_deg"]),
                                 **common)[0]).all()
        assert not np.array_equal(tv, lv)  # pitch and roll of up to 5 degrees move the photo's pixels
    from model.preprocess import estimate_photo_tilt, load_image

    estimated, _ = photo_views(photo_world, records[:1], config, centred=False, tilt="estimated")
    photo = load_image(photo_world / "streetview" / f"{cams[0]['id']}.jpg")
    pitch, roll = estimate_photo_tilt(photo, float(cams[0]["hfov_deg"]))
    assert (estimated[0] == place_view(photo, config, fov_deg=float(cams[0]["hfov_deg"]), heading_deg=headings[0],
                                       projection="perspective", pitch_deg=pitch, roll_deg=roll)[0]).all()
    off, _ = photo_views(photo_world, records[:1], config, centred=False, off=np.array([-7.5]))  # a compass's error
    assert (off[0] == place_view(photo_world / "streetview" / f"{cams[0]['id']}.jpg", config, projection="perspective",
                                 fov_deg=float(cams[0]["hfov_deg"]), heading_deg=headings[0] - 7.5)[0]).all()
    assert not np.array_equal(off[0], level[0])
    with pytest.raises(ValueError, match="tilt must be"):
        photo_views(photo_world, records, config, centred=False, tilt="level")
    with pytest.raises(ValueError, match="photos"):
        evaluate(Path("unused.safetensors"), photo_world, photo_tilt=True)

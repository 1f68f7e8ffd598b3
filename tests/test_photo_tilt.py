"""model.preprocess.estimate_photo_tilt: a photo's pitch and roll from its near-vertical edges (measured
in bench/tilt_estimate.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from model.preprocess import estimate_photo_tilt, strong_edges, tilt_scores
from worldgen.render import render_perspective, sample_pano_look
from worldgen.world import camera_positions, generate_world


def test_the_tilt_of_worldgen_photos_is_found_from_their_verticals():
    world = generate_world(11, 0.08)
    positions = camera_positions(world, 20.0, np.random.default_rng(0))
    look = dataclasses.replace(sample_pano_look(np.random.default_rng(2)), noise=2.0)
    errors, level = [], []
    for k, (heading, pitch, roll) in enumerate(((30.0, 3.0, -2.0), (120.0, -2.5, 2.5), (250.0, 1.5, 3.0),
                                                (330.0, -3.0, -1.0))):
        x, y = positions[k]
        photo = render_perspective(world, x, y, 640, 480, 80.0, heading, pitch, roll, look, np.random.default_rng(k))
        found = estimate_photo_tilt(Image.fromarray(photo), 80.0)
        errors.append(max(abs(found[0] - pitch), abs(found[1] - roll)))
        level.append(max(abs(pitch), abs(roll)))
    # 0.1-0.2 deg each when written (0.5 deg grid at 512 pixels: under 1 deg)
    assert np.median(errors) < 0.5 and max(errors) < 1.0 and np.median(errors) < 0.2 * np.median(level), (errors, level)


def test_a_phone_pointed_further_up_or_down_is_found_by_the_wide_grid():
    world = generate_world(11, 0.08)
    positions = camera_positions(world, 20.0, np.random.default_rng(0))
    look = dataclasses.replace(sample_pano_look(np.random.default_rng(2)), noise=2.0)
    for k, (heading, pitch, roll) in enumerate(((30.0, 9.0, -2.0), (250.0, -4.0, 10.0))):
        x, y = positions[k]
        photo = render_perspective(world, x, y, 640, 480, 80.0, heading, pitch, roll, look, np.random.default_rng(k))
        found = estimate_photo_tilt(Image.fromarray(photo), 80.0)
        assert max(abs(found[0] - pitch), abs(found[1] - roll)) < 1.0, (found, pitch, roll)
        # the first grid (+-6) alone reads it as level
        assert estimate_photo_tilt(Image.fromarray(photo), 80.0, wide_span_deg=6.0) == (0.0, 0.0)


def test_edges_along_a_cameras_verticals_score_highest_at_that_camera():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, 500).astype(np.float32), rng.uniform(-0.75, 0.75, 500).astype(np.float32)
    p, r = np.radians(2.5), np.radians(-1.5)  # the camera the edges come from
    up_r, up_u, up_f = -np.cos(p) * np.sin(r), np.cos(p) * np.cos(r), np.sin(p)
    angle = np.degrees(np.arctan2(x * up_f - up_r, up_u - y * up_f)).astype(np.float32)
    edges = (x, y, angle, np.ones(500, np.float32))
    pitches, rolls = np.array([2.5, 0.0, 2.5, 3.5, 2.5]), np.array([-1.5, 0.0, -0.5, -1.5, 1.5])
    scores = tilt_scores(edges, pitches, rolls)
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and (scores[1:] < 0.99).all(), scores
    # a level camera's verticals are the image's columns
    level = (x, y, np.zeros(500, np.float32), np.ones(500, np.float32))
    assert tilt_scores(level, np.array([0.0]), np.array([0.0]))[0] == pytest.approx(1.0, abs=1e-5)


def test_a_photo_without_verticals_is_read_as_level():
    sky = np.zeros((480, 640, 3), np.uint8)
    sky[:, :] = (120, 160, 220)
    sky[300:] = (90, 120, 60)  # a horizon, no verticals
    assert estimate_photo_tilt(Image.fromarray(sky), 80.0) == (0.0, 0.0)


def test_the_work_is_bounded_whatever_the_photos_size_and_shape():
    rng = np.random.default_rng(0)
    for w, h in ((16, 96), (96, 16), (768, 1024), (2000, 1500)):  # the service accepts sides >= 16, aspect <= 6
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        # the top 10% of gradients of an image brought to about 1024 x 768 pixels
        assert len(strong_edges(noise, 60.0)[0]) <= 0.1 * 1024 * 768 * 1.01, (w, h)

"""model.preprocess.estimate_photo_tilt: a photo's pitch and roll from its near-vertical edges (measured
in bench/tilt_estimate.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from model.preprocess import estimate_photo_tilt
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
    assert np.median(errors) < 1.0 and np.median(errors) < 0.4 * np.median(level), (errors, level)

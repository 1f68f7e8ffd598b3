"""POST /localize: the refined position, and the geographic prior (near/radius_m, EXIF GPS)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.metrics import haversine_m
from test_service_support import jpeg_bytes, running_client, settings_for, world  # noqa: F401

pytestmark = pytest.mark.cross_cpu  # compares numbers of two paths: `make test` reruns it with other CPU kernels

GEO = {"Accept": "application/geo+json"}


@pytest.fixture(scope="module")
def client(world):
    with running_client(settings_for(world, world.artifact_a)) as c:
        yield c


def _post(client, data: bytes, query: str = "", headers: dict | None = None):
    return client.post(f"/localize?{query}", files={"image": ("p.jpg", data, "image/jpeg")}, headers=headers or {})


def _gps_jpeg(lat: float, lon: float) -> bytes:
    """A 4:1 panorama with EXIF GPSLatitude/GPSLongitude (degrees, minutes, seconds)."""
    def dms(value: float) -> tuple[float, float, float]:
        value = abs(value)
        d, m = int(value), int(value * 60) % 60
        return float(d), float(m), round((value * 3600) % 60, 4)

    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(512, 128, seed=5))).save(out, format="JPEG", exif=exif)
    return out.getvalue()


def test_the_answer_has_a_refined_position_inside_the_consistent_top_tiles(client, world):
    body = _post(client, world.pano, "k=24").json()
    position, results = body["position"], body["results"]
    assert body["near"] is None and position["uncertainty_m"] >= 25.0  # at least a quarter of a 100 m tile
    best = results[0]
    consistent = [r for r in results if haversine_m(best["lat"], best["lon"], r["lat"], r["lon"]) <= 150]
    lats, lons = [r["lat"] for r in consistent], [r["lon"] for r in consistent]
    assert min(lats) - 1e-9 <= position["lat"] <= max(lats) + 1e-9
    assert min(lons) - 1e-9 <= position["lon"] <= max(lons) + 1e-9
    assert position["lon"] - 7.5 == pytest.approx(position["lat"] - 46.5, abs=1e-6)  # on the tiles' line
    fc = client.post("/localize?k=3", files={"image": ("p.jpg", world.pano, "image/jpeg")}, headers=GEO).json()
    first = fc["features"][0]
    assert first["geometry"]["coordinates"] == pytest.approx([position["lon"], position["lat"]], abs=1e-7)
    assert first["properties"] == {"kind": "position", "uncertainty_m": position["uncertainty_m"]}
    assert [f["properties"]["kind"] for f in fc["features"][1:]] == ["match"] * 3


def test_near_restricts_the_search_exactly_to_the_tiles_within_the_radius(client, world):
    everything = _post(client, world.pano, "k=24").json()["results"]
    centre, radius = (46.5 + 0.010, 7.5 + 0.010), 500.0
    inside = [r for r in everything if haversine_m(*centre, r["lat"], r["lon"]) <= radius]
    assert 4 <= len(inside) < 24
    body = _post(client, world.pano, f"k=24&near={centre[0]},{centre[1]}&radius_m={radius:g}").json()
    assert [r["tile_id"] for r in body["results"]] == [r["tile_id"] for r in inside]
    assert [r["score"] for r in body["results"]] == pytest.approx([r["score"] for r in inside], abs=1e-5)
    assert [r["rank"] for r in body["results"]] == list(range(1, len(inside) + 1))
    assert body["near"] == {"lat": centre[0], "lon": centre[1], "radius_m": radius, "source": "parameter",
                            "tiles": len(inside)}
    some = _post(client, world.pano, f"k=2&near={centre[0]},{centre[1]}&radius_m={radius:g}").json()
    assert [r["tile_id"] for r in some["results"]] == [r["tile_id"] for r in inside[:2]]


def test_no_tile_within_the_radius_is_an_empty_answer(client, world):
    body = _post(client, world.pano, "near=0,0&radius_m=1000").json()
    assert body["results"] == [] and body["position"] is None
    assert body["near"]["tiles"] == 0 and body["confidence"]["margin"] is None
    fc = _post(client, world.pano, "near=0,0&radius_m=1000", GEO).json()
    assert fc["features"] == []


@pytest.mark.parametrize("query,named", [
    ("near=46.5&radius_m=100", "near"), ("near=a,b&radius_m=100", "near"), ("near=91,7&radius_m=100", "near"),
    ("near=46.5,181&radius_m=100", "near"), ("near=nan,7&radius_m=100", "near"), ("near=1,2,3&radius_m=100", "near"),
    ("near=46.5,7.5", "radius_m"), ("near=46.5,7.5&radius_m=0", "radius_m"), ("near=46.5,7.5&radius_m=-5", "radius_m"),
])
def test_bad_near_values_are_422_naming_the_parameter(client, world, query, named):
    resp = _post(client, world.pano, query)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "validation_error"
    assert [e["loc"] for e in body["detail"]] == [["query", named]], body


def test_exif_gps_is_used_only_when_asked_for_and_per_image_in_a_batch(client, world):
    tagged = _gps_jpeg(46.5 + 0.005, 7.5 + 0.005)
    assert _post(client, tagged).json()["near"] is None  # opt-in
    body = _post(client, tagged, "k=24&near_from_exif=true").json()
    assert body["near"]["source"] == "exif" and body["near"]["radius_m"] == 500.0
    assert body["near"]["lat"] == pytest.approx(46.505, abs=1e-6)
    assert 0 < len(body["results"]) == body["near"]["tiles"] < 24
    assert all(haversine_m(46.505, 7.505, r["lat"], r["lon"]) <= 500 for r in body["results"])
    narrow = _post(client, tagged, "k=24&near_from_exif=true&radius_m=150").json()
    assert narrow["near"]["radius_m"] == 150 and len(narrow["results"]) < len(body["results"])
    given = _post(client, tagged, "k=24&near_from_exif=true&near=0,0&radius_m=100").json()
    assert given["near"]["source"] == "parameter" and given["results"] == []  # the parameter wins
    files = [("images", ("gps.jpg", tagged, "image/jpeg")), ("images", ("plain.jpg", world.pano, "image/jpeg"))]
    items = client.post("/localize/batch?k=24&near_from_exif=true", files=files).json()["items"]
    assert items[0]["near"]["source"] == "exif" and len(items[0]["results"]) == items[0]["near"]["tiles"]
    assert items[1]["near"] is None and len(items[1]["results"]) == 24  # no GPS: searched everywhere
    ids = [r["tile_id"] for r in items[1]["results"]]
    assert ids == [r["tile_id"] for r in _post(client, world.pano, "k=24").json()["results"]]


def test_the_manifest_footprint_sets_the_refined_position(client, world, tmp_path):
    """An index cut by `index_build tile --tile-m T` records tile_m: the position's uncertainty floor is a
    quarter of it and only matches within 1.5 footprints of the best are averaged (100 m when absent)."""
    import json
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(world.artifact_a.resolve(), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert "tile_m" not in manifest  # a hand-made catalogue: the default footprint
    manifest.update(tile_m=400.0, stride_m=200.0)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with running_client(settings_for(world, copy)) as wide:
        position = _post(wide, world.pano, "k=24").json()["position"]
    default = _post(client, world.pano, "k=24").json()["position"]
    assert default["uncertainty_m"] < 100.0 <= position["uncertainty_m"]  # a quarter of 400 m

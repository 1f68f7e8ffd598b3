"""The upload page in headless Chromium against a real uvicorn (skips without a browser)."""
from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
import urllib.request

import numpy as np
import pytest

from test_service_support import (  # noqa: F401  (world is a fixture)
    ServiceProcess, build_artifact, micro_checkpoint, with_gpano_heading, world, write_catalog,
)

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                        "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return ("headless Chromium + chromedriver not found; install them with "
                "scripts/ensure-browser.sh (Debian: apt-get install chromium chromium-driver)")
    return None


pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="geoloc-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-quic", "--no-first-run", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages for get_log
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_server(world, tmp_path_factory, browser):
    env = {"GEOLOC_CHECKPOINT": str(world.checkpoint), "GEOLOC_INDEX": str(world.artifact_a),
           "GEOLOC_RELOAD_POLL_S": "0"}
    proc = ServiceProcess(env, tmp_path_factory.mktemp("browser") / "uvicorn.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def keyed_server(world, tmp_path_factory, browser):
    env = {"GEOLOC_CHECKPOINT": str(world.checkpoint), "GEOLOC_INDEX": str(world.artifact_a),
           "GEOLOC_RELOAD_POLL_S": "0", "GEOLOC_API_KEYS": "page-test-key"}
    proc = ServiceProcess(env, tmp_path_factory.mktemp("browser-keyed") / "uvicorn.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def oriented_server(tmp_path_factory, browser):
    """A model with an orientation head and its index (built with orientation features), so that
    answers carry headings; GEOLOC_AMBIGUITY_MARGIN=0: no answer is ambiguous."""
    root = tmp_path_factory.mktemp("browser-oriented")
    checkpoint = root / "oriented.safetensors"
    micro_checkpoint(checkpoint, seed=0, orientation_dim=8)
    artifact = build_artifact(write_catalog(root / "world", "o", 24, seed=1), checkpoint, root / "artifact")
    env = {"GEOLOC_CHECKPOINT": str(checkpoint), "GEOLOC_INDEX": str(artifact), "GEOLOC_RELOAD_POLL_S": "0",
           "GEOLOC_AMBIGUITY_MARGIN": "0"}
    proc = ServiceProcess(env, root / "uvicorn.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def ambiguous_server(world, tmp_path_factory, browser):
    """Every answer is ambiguous (no margin reaches 1.0); the model has no orientation head."""
    env = {"GEOLOC_CHECKPOINT": str(world.checkpoint), "GEOLOC_INDEX": str(world.artifact_a),
           "GEOLOC_RELOAD_POLL_S": "0", "GEOLOC_AMBIGUITY_MARGIN": "1.0"}
    proc = ServiceProcess(env, tmp_path_factory.mktemp("browser-ambiguous") / "uvicorn.log")
    try:
        yield proc
    finally:
        proc.stop()


def _wait(driver, predicate, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(predicate)


def _upload(driver, server, pano, k: int, **view: float) -> None:
    """Open the page, upload ``pano`` asking for ``k`` matches (``view``: fov / heading typed into
    those inputs), wait until the list and the map are drawn with every thumbnail loaded."""
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/")
    driver.find_element(By.ID, "image").send_keys(str(pano))
    for field_id, value in (("k", k), *view.items()):
        field = driver.find_element(By.ID, field_id)
        field.clear()
        field.send_keys(str(value))
    driver.find_element(By.ID, "submit").click()
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li.result")) == k)
    _wait(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img.thumb')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
        " && [...document.querySelectorAll('#map image.tile')].every(i => i.getAttribute('href'))"))


def _coords(item) -> tuple[float, float]:
    from selenium.webdriver.common.by import By

    text = item.find_element(By.CSS_SELECTOR, "a.coords .latlon").text
    lat, lon = (float(v) for v in text.split(","))
    return lat, lon


def _haversine_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371008.8 * math.asin(math.sqrt(h))


def _metres(label: str) -> float:
    value, unit = label.split()
    return float(value) * (1000.0 if unit == "km" else 1.0)


def _access_log(server, since: int) -> list[dict]:
    """The service's access log lines (JSON) written after character ``since`` of its log."""
    lines = []
    for line in server.log()[since:].splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "service.http" and "status" in entry:
            lines.append(entry)
    return lines


def _console_errors(driver) -> list[str]:
    """Console errors since the last call (failed loads show up here as 'Failed to load resource')."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _foreign_resources(driver, server, kinds: tuple[str, ...] = ()) -> list[str]:
    """Resources the page asked for anywhere but the service (a CDN, a tile server); only those
    its elements of ``kinds`` (initiator types: script, link, img, fetch...) asked for, if given."""
    entries = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.initiatorType])")
    return [url for url, kind in entries
            if not url.startswith((server.url + "/", "blob:", "data:")) and (not kinds or kind in kinds)]


def _screenshot(driver, element, path):
    """Scroll ``element`` to the middle of the window, take a screenshot: (RGB image, device pixel ratio)."""
    from PIL import Image

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    path.write_bytes(driver.get_screenshot_as_png())
    return Image.open(path).convert("RGB"), driver.execute_script("return window.devicePixelRatio")


def _client_box(driver, element) -> list[float]:
    return driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height];", element)


def _crop(image, ratio, left, top, width, height):
    return image.crop(tuple(round(v * ratio) for v in (left, top, left + width, top + height)))


def _rgb(css_colour: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in re.findall(r"\d+", css_colour)[:3])


def _share_of(region, colour, tolerance=40) -> tuple[float, int]:
    """The share and the number of the pixels of ``region`` within ``tolerance`` of ``colour``."""
    pixels = np.asarray(region, dtype=np.int16).reshape(-1, 3)
    near = int((np.abs(pixels - np.array(colour)).max(axis=1) <= tolerance).sum())
    return near / max(1, len(pixels)), near


def test_upload_shows_matches_with_thumbnails(browser, page_server, world):
    from selenium.webdriver.common.by import By

    _upload(browser, page_server, world.pano_path, 4)
    assert "panorama" in browser.title.lower()
    items = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    tile_ids = [li.get_attribute("data-tile-id") for li in items]
    assert all(t.startswith("a") for t in tile_ids)
    assert "#1" in items[0].text and "score" in items[0].text
    lat, lon = _coords(items[0])
    assert 46 < lat < 47 and 7 < lon < 8
    assert "Done" in browser.find_element(By.ID, "status").text


def test_coordinates_link_to_openstreetmap_and_say_so(browser, page_server, world):
    from selenium.webdriver.common.by import By

    _upload(browser, page_server, world.pano_path, 2)
    for item in browser.find_elements(By.CSS_SELECTOR, "#results li.result"):
        link = item.find_element(By.CSS_SELECTOR, "a.coords")
        lat, lon = _coords(item)
        assert link.get_attribute("href") == (
            f"https://www.openstreetmap.org/?mlat={lat:.6f}&mlon={lon:.6f}#map=17/{lat:.6f}/{lon:.6f}")
        assert "open in OpenStreetMap" in link.text
        assert "new tab" in link.get_attribute("title")
        assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")


def test_page_links_its_favicon_and_loads_without_errors(browser, page_server, world):
    browser.execute_cdp_cmd("Network.clearBrowserCache", {})  # every request of the load goes out
    browser.get_log("browser")  # forget what earlier tests left
    since = len(page_server.log())
    _upload(browser, page_server, world.pano_path, 3)
    icon = browser.execute_script("return document.querySelector('link[rel~=icon]').href")
    with urllib.request.urlopen(icon, timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("image/svg+xml")
    with urllib.request.urlopen(page_server.url + "/favicon.ico", timeout=10) as resp:
        assert resp.status == 200  # what a browser asks for when a page names no icon
    assert _console_errors(browser) == []
    assert _foreign_resources(browser, page_server) == []

    def page_requests_logged(_):
        entries = _access_log(page_server, since)
        return entries if sum(e["path"].startswith("/tiles/") for e in entries) >= 3 else None

    entries = _wait(browser, page_requests_logged, timeout=10)
    failed = [f"{e['method']} {e['path']} {e['status']}" for e in entries if e["status"] >= 400]
    assert failed == []
    paths = {e["path"] for e in entries}
    assert {"/", "/static/app.js", "/static/style.css", "/localize"} <= paths


def test_map_shows_numbered_markers_distances_and_scale(browser, page_server, world, tmp_path):
    from selenium.webdriver.common.by import By

    k = 4
    _upload(browser, page_server, world.pano_path, k)
    items = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    coords = [_coords(item) for item in items]
    figure = browser.find_element(By.ID, "map-figure")
    assert figure.is_displayed()

    markers = browser.find_elements(By.CSS_SELECTOR, "#map a.marker")
    assert [m.get_attribute("data-rank") for m in markers] == [str(r) for r in range(1, k + 1)]
    assert [m.find_element(By.CSS_SELECTOR, "text.pin-number").text for m in markers] == \
        [str(r) for r in range(1, k + 1)]
    assert [m.get_attribute("data-tile-id") for m in markers] == \
        [li.get_attribute("data-tile-id") for li in items]
    assert browser.find_elements(By.CSS_SELECTOR, "#map a.marker.best") == markers[:1]
    assert all(m.get_dom_attribute("href") == f"#match-{r}" for r, m in enumerate(markers, 1))

    # Each tile centre sits where its lat/lon puts it: further north is higher up, further east
    # further right, in the proportions of a local equirectangular map.
    centres = browser.execute_script(
        "return [...document.querySelectorAll('#map circle.anchor')].map(c => "
        "[+c.getAttribute('data-rank'), +c.getAttribute('cx'), +c.getAttribute('cy')])")
    assert [rank for rank, _, _ in centres] == list(range(1, k + 1))
    xy = [(x, y) for _, x, y in centres]
    east_scale = math.cos(math.radians(sum(lat for lat, _ in coords) / k))
    for i in range(k):
        for j in range(i + 1, k):
            (lat_i, lon_i), (lat_j, lon_j) = coords[i], coords[j]
            (x_i, y_i), (x_j, y_j) = xy[i], xy[j]
            assert (lat_i > lat_j) == (y_i < y_j), (i, j, coords, xy)
            assert (lon_i > lon_j) == (x_i > x_j), (i, j, coords, xy)
            ground = (lon_j - lon_i) * east_scale / (lat_j - lat_i)
            assert (x_j - x_i) / (y_i - y_j) == pytest.approx(ground, rel=0.02)

    # Distances from #1 to the others: on the lines of the map and in the list.
    labels = browser.find_elements(By.CSS_SELECTOR, "#map text.distance")
    assert [lb.get_attribute("data-to") for lb in labels] == [str(r) for r in range(2, k + 1)]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#map .distances line")) == k - 1
    for rank, label in enumerate(labels, 2):
        expected = _haversine_m(coords[0], coords[rank - 1])
        assert _metres(label.text) == pytest.approx(expected, abs=max(1.0, 0.006 * expected)), label.text
        from_best = items[rank - 1].find_element(By.CSS_SELECTOR, ".from-best").text
        assert from_best == f"{label.text} from #1"
    scale = browser.find_element(By.CSS_SELECTOR, "#map .scale-bar text").text
    assert re.fullmatch(r"[125]0* (m|km)", scale), scale
    assert browser.find_element(By.CSS_SELECTOR, "#map .north-arrow text").text == "N"
    caption = browser.find_element(By.ID, "map-caption").text
    assert f"The {k} best matches" in caption and "not to its ground size" in caption
    # The refined position: a cross and a circle of its uncertainty, among the consistent best tiles.
    circle = browser.execute_script(
        "const c = document.querySelector('#map .position circle.uncertainty');"
        "return c && [+c.getAttribute('cx'), +c.getAttribute('cy'), +c.getAttribute('r')];")
    assert circle is not None and circle[2] >= 4
    xs, ys = [x for x, _ in xy], [y for _, y in xy]
    assert min(xs) - 1 <= circle[0] <= max(xs) + 1 and min(ys) - 1 <= circle[1] <= max(ys) + 1
    assert "refined position" in caption and "uncertainty" in caption

    # The screenshot: every numbered pin is really painted, in its own colour, where the DOM says.
    map_el = browser.find_element(By.ID, "map")
    shot = tmp_path / "map.png"
    image, ratio = _screenshot(browser, map_el, shot)
    pins = browser.execute_script(
        "return [...document.querySelectorAll('#map circle.pin')].map(c => {"
        " const r = c.getBoundingClientRect();"
        " return [r.left, r.top, r.width, r.height, getComputedStyle(c).fill]; })")
    map_region = _crop(image, ratio, *_client_box(browser, map_el))
    assert map_region.size[0] > 300 and map_region.size[1] > 150
    colours = [_rgb(fill) for *_, fill in pins]
    assert colours[0] != colours[1] and len(set(colours[1:])) == 1  # #1 stands out
    for rank, (*box, fill) in enumerate(pins, 1):
        share, _ = _share_of(_crop(image, ratio, *box), colours[rank - 1])
        # a filled circle in its bounding square, less the white rim and the digits: about half
        assert share > 0.3, f"pin #{rank} ({fill}) covers only {share:.0%} of its box in {shot}"
    _, marker_pixels = _share_of(map_region, colours[1])
    pin_area = math.pi * (pins[1][2] / 2 - 2) ** 2 * ratio ** 2
    assert marker_pixels > 0.6 * (k - 1) * pin_area, f"{marker_pixels} marker pixels in {shot}"


def test_upload_error_is_shown(browser, page_server, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a panorama")
    browser.get(page_server.url + "/")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    status = _wait(browser, lambda d: (el := d.find_element(By.ID, "status")).text.startswith(
        "Error") and el)
    assert "400" in status.text and "not an image" in status.text
    assert re.search(r"\(request id [0-9a-f]{32}\)$", status.text)  # to quote when asking for help
    assert "error" in status.get_attribute("class")


def test_an_older_answer_never_replaces_a_newer_one(browser, page_server, world):
    """A slow answer to k=5 arriving after the answer to k=2 the user asked for next is dropped."""
    from selenium.webdriver.common.by import By

    _upload(browser, page_server, world.pano_path, 3)
    browser.execute_script("""
      const realFetch = window.fetch; let delayed = false;
      window.fetch = (url, options) => {
        if (String(url).startsWith('localize') && !delayed) {
          delayed = true;  // the first answer comes 1.5 s late, unless its request is cancelled
          return new Promise((resolve, reject) => {
            const timer = setTimeout(() => resolve(realFetch(url, options)), 1500);
            if (options.signal) options.signal.addEventListener('abort', () => {
              clearTimeout(timer); reject(new DOMException('cancelled', 'AbortError')); });
          });
        }
        return realFetch(url, options);
      };""")
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5")
    browser.find_element(By.ID, "submit").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#results li.result") == []  # not the answer to k=3 any more
    k.clear()
    k.send_keys("2")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li.result")) == 2)
    time.sleep(2.0)  # past the first answer's delay
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results li.result")) == 2
    assert browser.find_element(By.ID, "status").text == "Done."


def test_a_heading_from_a_panoramas_xmp_says_so(browser, page_server, world, tmp_path):
    from selenium.webdriver.common.by import By

    pano = tmp_path / "street_view.jpg"
    pano.write_bytes(with_gpano_heading(world.pano, "123"))
    _upload(browser, page_server, pano, 2)
    heading = browser.find_element(By.CSS_SELECTOR, "#view .view-heading")
    assert (heading.get_attribute("data-source"), heading.text) == \
        ("xmp", "heading 123° ±10° (from the panorama's XMP)")  # trusted to HEADING_WITHIN_DEG
    _upload(browser, page_server, pano, 2, **{"heading-within": 40})  # a rough heading, typed in
    heading = browser.find_element(By.CSS_SELECTOR, "#view .view-heading")
    assert heading.text == "heading 123° ±40° (from the panorama's XMP)"


def test_api_key_goes_with_the_upload_and_the_map_thumbnails(browser, keyed_server, world):
    from selenium.webdriver.common.by import By

    browser.get(keyed_server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(keyed_server.url + "/")
    browser.find_element(By.ID, "image").send_keys(str(world.pano_path))
    browser.find_element(By.ID, "submit").click()
    status = _wait(browser, lambda d: (el := d.find_element(By.ID, "status")).text.startswith("Error") and el)
    assert "401" in status.text
    # the page opens the key field and puts the cursor there
    assert browser.find_element(By.ID, "auth").get_attribute("open") is not None
    assert browser.switch_to.active_element.get_attribute("id") == "api-key"
    browser.find_element(By.ID, "api-key").send_keys("page-test-key")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#map a.marker")) == 5)
    # the thumbnails are fetched with the key too (a plain <img src> could not send it)
    _wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#map image.tile')].every(i => i.getAttribute('href'))"
        " && [...document.querySelectorAll('#results img.thumb')].every(i => i.naturalWidth > 0)"))

    _upload(browser, keyed_server, world.pano_path, 3)  # reloads the page: the key is remembered
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == "page-test-key"
    browser.execute_script("sessionStorage.clear()")


def test_swagger_ui_renders_without_internet(browser, page_server):
    """/docs takes Swagger UI from the service (fastapi-offline), not from a CDN."""
    from selenium.webdriver.common.by import By

    browser.get_log("browser")
    browser.get(page_server.url + "/docs")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 5)
    operations = {
        (block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
         block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"))
        for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")}
    assert {("POST", "/localize"), ("POST", "/localize/batch"), ("GET", "/tiles/{tile_id}")} <= operations
    assert _foreign_resources(browser, page_server) == []
    assert _console_errors(browser) == []


# --- limited views: heading arrows, field of view, confidence -----------------------------------

def _photo(path, width: int = 160, height: int = 120, *, hfov: float | None = None,
           heading: float | None = None):
    """A 4:3 JPEG photo; with EXIF FocalLengthIn35mmFilm and GPSImgDirection when ``hfov`` is given."""
    from worldgen.dataset import camera_exif, encode_jpeg

    pixels = np.random.default_rng(11).integers(0, 255, (height, width, 3), dtype=np.uint8)
    path.write_bytes(encode_jpeg(pixels, exif=camera_exif(hfov, heading, width, height) if hfov is not None else None))
    return path


def _answer(server, image, **query) -> dict:
    """The API's own answer for ``image``: what the page is checked against."""
    import httpx

    resp = httpx.post(server.url + "/localize", params=query, timeout=30,
                      files={"image": (image.name, image.read_bytes(), "image/jpeg")})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _degrees(value: float) -> str:
    """Degrees as the page writes them: one decimal at most."""
    return f"{round(value, 1):g}°"


def _bearing(origin, point) -> float:
    """Degrees clockwise from north (up) of ``point`` seen from ``origin``, in map units (y down)."""
    return math.degrees(math.atan2(point[0] - origin[0], origin[1] - point[1])) % 360.0


def _turn(from_deg: float, to_deg: float) -> float:
    """The signed turn (-180, 180] from one bearing to another, clockwise positive."""
    return -((from_deg - to_deg + 180.0) % 360.0 - 180.0)


def _anchors(driver) -> dict[int, tuple[float, float]]:
    """Tile centres on the map by rank."""
    return {rank: (x, y) for rank, x, y in driver.execute_script(
        "return [...document.querySelectorAll('#map circle.anchor')].map(c => "
        "[+c.getAttribute('data-rank'), +c.getAttribute('cx'), +c.getAttribute('cy')])")}


def _arrows(driver) -> list[dict]:
    """Each heading arrow's rank and class, and the outlines of its head, shaft and wedge (None without
    one), sampled along each path and mapped into the map's own coordinates: the geometry as drawn,
    whatever the transforms that put it there."""
    return driver.execute_script("""
        const map = document.getElementById('map');
        const outline = (path, n) => {
          if (!path) return null;
          const toMap = map.getScreenCTM().inverse().multiply(path.getScreenCTM());
          const length = path.getTotalLength();
          return [...Array(n).keys()].map(i => {
            const p = path.getPointAtLength(length * i / n).matrixTransform(toMap);
            return [p.x, p.y];
          });
        };
        return [...map.querySelectorAll('g.heading')].map(g => ({
          rank: +g.getAttribute('data-rank'), classes: g.getAttribute('class'),
          head: outline(g.querySelector('.arrow-head'), 90), shaft: outline(g.querySelector('.arrow-shaft'), 200),
          wedge: outline(g.querySelector('.fov-wedge'), 720)}));""")


def _check_arrows(driver, results) -> list[dict]:
    """Every match with a heading has an arrow from its tile centre pointing that way, #1's the longest."""
    arrows, anchors = _arrows(driver), _anchors(driver)
    assert [a["rank"] for a in arrows] == [r["rank"] for r in results if r["heading_deg"] is not None]
    lengths = []
    for arrow in arrows:
        heading = results[arrow["rank"] - 1]["heading_deg"]
        centre = anchors[arrow["rank"]]
        tip = max(arrow["head"], key=lambda p: math.dist(centre, p))
        assert abs(_turn(heading, _bearing(centre, tip))) < 1.0, (arrow["rank"], heading, centre, tip)
        assert min(math.dist(centre, p) for p in arrow["shaft"]) < 1.5  # it leaves the tile centre
        lengths.append(math.dist(centre, tip))
    assert "best" in arrows[0]["classes"].split() and lengths[0] > max(lengths[1:], default=0)
    return arrows


def test_heading_arrows_point_where_the_answer_says_and_are_painted_there(browser, oriented_server, world,
                                                                          tmp_path):
    from selenium.webdriver.common.by import By

    k = 4
    answer = _answer(oriented_server, world.pano_path, k=k)
    results = answer["results"]
    assert all(r["heading_deg"] is not None for r in results)
    _upload(browser, oriented_server, world.pano_path, k)
    items = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    assert [li.get_attribute("data-tile-id") for li in items] == [r["tile_id"] for r in results]
    assert [li.find_element(By.CSS_SELECTOR, ".heading").text for li in items] == \
        [f"heading {_degrees(r['heading_deg'])}" for r in results]

    view = browser.find_element(By.ID, "view")
    assert view.text.startswith("Read as a 360° panorama (equirectangular)")
    fov = view.find_element(By.CSS_SELECTOR, ".view-fov")
    assert (fov.get_attribute("data-source"), fov.text) == ("aspect", "field of view 360° (from the image's shape)")
    heading = view.find_element(By.CSS_SELECTOR, ".view-heading")
    assert (heading.get_attribute("data-source"), heading.text) == (
        "estimated", f"heading {_degrees(answer['view']['heading_deg'])} (estimated at #1)")

    arrows = _check_arrows(browser, results)
    assert all(a["wedge"] is None for a in arrows)  # a 360 degree panorama sees all around
    assert "The arrows point where the image looks" in browser.find_element(By.ID, "map-caption").text
    note = browser.find_element(By.ID, "confidence")
    assert note.get_attribute("class") == "note" and note.text.startswith("Clear margin ")

    # The screenshot: #1's arrow head is painted in its colour where the DOM puts it.
    head = browser.find_element(By.CSS_SELECTOR, "#map g.heading.best .arrow-head")
    shot = tmp_path / "arrow.png"
    image, ratio = _screenshot(browser, browser.find_element(By.ID, "map"), shot)
    colour = _rgb(browser.execute_script("return getComputedStyle(arguments[0]).fill", head))
    box = _client_box(browser, head)
    share, _ = _share_of(_crop(image, ratio, *box), colour)
    # the triangle's share of its on-screen bounding box: half when it points along an axis, less when turned
    corners = browser.execute_script(
        "const el = arguments[0], m = el.getScreenCTM();"
        "const nums = el.getAttribute('d').match(/-?[0-9.]+/g).map(Number);"
        "const pts = [[nums[0], nums[1]], [nums[2], nums[3]], [-nums[2], nums[3]]];"  # M0 -l L h n H -h Z
        "return pts.map(([x, y]) => { const q = new DOMPoint(x, y).matrixTransform(m); return [q.x, q.y]; });",
        head)
    (ax, ay), (bx, by), (cx, cy) = corners
    expected = abs((bx - ax) * (cy - ay) - (cx - ax) * (by - ay)) / 2 / (box[2] * box[3])
    assert 0.2 < expected <= 0.51, (corners, box)
    # antialiased edges and the line beneath take some of it
    assert share > 0.6 * expected, f"the arrow head ({colour}) covers {share:.0%} of its box in {shot}, " \
        f"its triangle {expected:.0%}"


def test_a_photo_is_read_from_its_exif_and_its_field_of_view_drawn(browser, oriented_server, tmp_path):
    from selenium.webdriver.common.by import By

    photo = _photo(tmp_path / "exif.jpg", hfov=65.0, heading=123.0)
    answer = _answer(oriented_server, photo, k=3)
    assert answer["view"]["fov_deg"] == pytest.approx(65.0, abs=1.0)  # a whole mm of 35 mm focal length
    _upload(browser, oriented_server, photo, 3)
    view = browser.find_element(By.ID, "view")
    assert view.text.startswith("Read as a photo (perspective)")
    fov = view.find_element(By.CSS_SELECTOR, ".view-fov")
    assert (fov.get_attribute("data-source"), fov.text) == (
        "exif", f"field of view {_degrees(answer['view']['fov_deg'])} (from EXIF)")
    heading = view.find_element(By.CSS_SELECTOR, ".view-heading")
    assert (heading.get_attribute("data-source"), heading.text) == ("exif", "heading 123° ±10° (from EXIF)")
    results = answer["results"]
    # the model may turn the given heading at #1 (its arrow shows that): then the view line says so too
    turned = f"the model finds {_degrees(results[0]['heading_deg'])} at #1"
    assert (turned in view.text) == (_degrees(results[0]["heading_deg"]) != "123°")

    arrows = _check_arrows(browser, results)
    assert arrows[0]["wedge"] is not None and all(a["wedge"] is None for a in arrows[1:])
    # The wedge at #1 spans the field of view, centred on #1's heading: the bearings of its far rim.
    centre = _anchors(browser)[1]
    radius = max(math.dist(centre, p) for p in arrows[0]["wedge"])
    rim = [_turn(results[0]["heading_deg"], _bearing(centre, p))
           for p in arrows[0]["wedge"] if math.dist(centre, p) > 0.5 * radius]
    half = answer["view"]["fov_deg"] / 2
    assert min(rim) == pytest.approx(-half, abs=1.0) and max(rim) == pytest.approx(half, abs=1.0)
    assert "the wedge spans its field of view" in browser.find_element(By.ID, "map-caption").text


def test_a_photo_without_a_field_of_view_prompts_for_it(browser, oriented_server, tmp_path):
    from selenium.webdriver.common.by import By

    photo = _photo(tmp_path / "plain.jpg")
    browser.get(oriented_server.url + "/")
    browser.find_element(By.ID, "image").send_keys(str(photo))
    browser.find_element(By.ID, "submit").click()
    prompt = _wait(browser, lambda d: (el := d.find_element(By.ID, "fov-prompt")).is_displayed() and el)
    assert "does not say its field of view: enter it" in prompt.text and "about 65 degrees" in prompt.text
    assert browser.execute_script(
        "const fov = document.getElementById('fov');"
        "return document.activeElement === fov && fov.closest('label').contains(arguments[0])", prompt)
    status = browser.find_element(By.ID, "status")
    assert "error" not in status.get_attribute("class") and not status.text.startswith("Error")
    assert browser.find_elements(By.CSS_SELECTOR, "#results li") == []

    browser.switch_to.active_element.send_keys("65")
    browser.find_element(By.ID, "heading").send_keys("200")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li.result")) == 5)
    assert not prompt.is_displayed()
    view = browser.find_element(By.ID, "view")
    assert view.find_element(By.CSS_SELECTOR, ".view-fov").text == "field of view 65° (as entered)"
    assert view.find_element(By.CSS_SELECTOR, ".view-heading").text == "heading 200° ±10° (as entered)"
    _check_arrows(browser, _answer(oriented_server, photo, k=5, fov_deg=65, heading_deg=200)["results"])


def test_an_ambiguous_answer_warns_and_marks_the_look_alike_place(browser, ambiguous_server, world):
    from selenium.webdriver.common.by import By

    answer = _answer(ambiguous_server, world.pano_path, k=24)
    confidence, ids = answer["confidence"], [r["tile_id"] for r in answer["results"]]
    competitor = confidence["competitor_tile_id"]
    assert confidence["ambiguous"] and competitor in ids
    rank = ids.index(competitor) + 1
    _upload(browser, ambiguous_server, world.pano_path, max(2, rank))
    warning = browser.find_element(By.ID, "confidence")
    assert warning.is_displayed() and warning.get_attribute("class") == "warning"
    assert warning.text.startswith(
        f"Ambiguous: the best match beats a place 150 m or more away (tile {competitor}, #{rank}, ")
    assert warning.text.endswith("the true place may be either.")
    margin = float(re.search(r"by only ([0-9.]+);", warning.text).group(1))
    assert margin == pytest.approx(confidence["margin"], rel=0.05, abs=1e-4)
    assert [m.get_attribute("data-tile-id") for m in browser.find_elements(
        By.CSS_SELECTOR, "#map a.marker.competitor")] == [competitor]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#map rect.tile-frame.competitor")) == 1
    assert [li.get_attribute("data-tile-id") for li in browser.find_elements(
        By.CSS_SELECTOR, "#results li.competitor")] == [competitor]
    assert "dashed red frame marks the look-alike place" in browser.find_element(By.ID, "map-caption").text
    # this model has no orientation head: no heading anywhere, and the page says so
    assert browser.find_elements(By.CSS_SELECTOR, "#map g.heading, #results .heading") == []
    assert "heading unknown" in browser.find_element(By.ID, "view").text

    _upload(browser, ambiguous_server, world.pano_path, 1)  # the look-alike place is off the map
    warning = browser.find_element(By.ID, "confidence")
    assert f"(tile {competitor}, not among the 1 shown: ask for more matches" in warning.text
    assert browser.find_elements(By.CSS_SELECTOR, "#map .competitor, #results .competitor") == []


def test_a_given_heading_is_drawn_at_the_best_match_when_the_service_estimates_none(browser, ambiguous_server,
                                                                                    tmp_path):
    from selenium.webdriver.common.by import By

    photo = _photo(tmp_path / "exif.jpg", hfov=65.0, heading=123.0)
    answer = _answer(ambiguous_server, photo, k=3)
    assert [r["heading_deg"] for r in answer["results"]] == [None] * 3  # no orientation head
    _upload(browser, ambiguous_server, photo, 3)
    given = [{**answer["results"][0], "heading_deg": 123.0}, *answer["results"][1:]]
    arrows = _check_arrows(browser, given)  # #1 only, in the EXIF heading
    assert len(arrows) == 1 and arrows[0]["wedge"] is not None
    assert "The arrow at #1 points" in browser.find_element(By.ID, "map-caption").text
    assert browser.find_element(By.CSS_SELECTOR, "#results li.result .heading").text == "heading 123°"

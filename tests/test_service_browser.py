"""The upload page in headless Chromium against a real uvicorn (skips without a browser)."""
from __future__ import annotations

import shutil
import tempfile

import pytest

from test_service_support import ServiceProcess, world  # noqa: F401  (world is a fixture)

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


def _wait(driver, predicate, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(predicate)


def test_upload_shows_matches_with_thumbnails(browser, page_server, world):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url + "/")
    assert "panorama" in browser.title.lower()
    browser.find_element(By.ID, "image").send_keys(str(world.pano_path))
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("4")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li.result")) == 4)
    _wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img.thumb')]"
        ".every(i => i.complete && i.naturalWidth > 0)"))
    items = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    tile_ids = [li.get_attribute("data-tile-id") for li in items]
    assert all(t.startswith("a") for t in tile_ids)
    assert "#1" in items[0].text and "score" in items[0].text
    coords = items[0].find_element(By.CSS_SELECTOR, "a.coords").text
    lat, lon = (float(v) for v in coords.split(","))
    assert 46 < lat < 47 and 7 < lon < 8
    assert "Done" in browser.find_element(By.ID, "status").text


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
    assert "error" in status.get_attribute("class")

"""Shared helpers and fixtures for the service tests (imported by tests/test_service_*.py).

Artifacts are made the way production makes them, through the public ``python -m index_build
build`` CLI; stages only talk through files, so the service tests never import index_build.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ports import free_port

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

MICRO = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, resnet_units=(1, 1, 1),
             resnet_width_factor=0.5, ground_size=(32, 128), aerial_size=(32, 128), name="micro")


# --- files --------------------------------------------------------------------------------------

def micro_checkpoint(path: Path, seed: int = 0, orientation_dim: int = 0) -> str:
    """A randomly initialised micro L2LTR saved as .safetensors (with `orientation_dim`, an
    orientation head: its index then holds orientation features and answers give headings);
    returns its fingerprint."""
    import torch

    from model import L2LTR, L2LTRConfig, save_checkpoint

    torch.manual_seed(seed)
    net = L2LTR(L2LTRConfig(**MICRO, orientation_dim=orientation_dim)).eval()
    save_checkpoint(net, path, metadata={"provenance": {"purpose": "service tests"}})
    return net.fingerprint()


def jpeg_bytes(width: int = 512, height: int = 128, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def image_bytes(fmt: str, width: int = 256, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(out, format=fmt)
    return out.getvalue()


def write_catalog(directory: Path, prefix: str, count: int, seed: int) -> Path:
    """Tile images plus a tiles.csv catalogue (tile_id,lat,lon,path; path relative to the CSV)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bingmap").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        tile_id = f"{prefix}{i:04d}"
        arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(directory / "bingmap" / f"{tile_id}.png")
        rows.append((tile_id, f"{46.5 + 0.001 * i:.6f}", f"{7.5 + 0.001 * i:.6f}",
                     f"bingmap/{tile_id}.png"))
    catalog = directory / "tiles.csv"
    with catalog.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tile_id", "lat", "lon", "path"])
        writer.writerows(rows)
    return catalog


def build_artifact(catalog: Path, checkpoint: Path, out: Path, *options: str) -> Path:
    """Build an index artifact at ``out`` through the public ``python -m index_build`` CLI (``options``: more of
    its arguments)."""
    proc = subprocess.run(
        [PYTHON, "-m", "index_build", "build", "--catalog", str(catalog),
         "--checkpoint", str(checkpoint), "--out", str(out), "--quiet",
         "--workers", "0", *options],  # encoder threads, not decode processes: bounded on a many-core machine
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"index_build failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def publish_symlink(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (symlink beside it, then rename over)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{time.monotonic_ns()}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


# --- a real uvicorn process --------------------------------------------------------------------

class ServiceProcess:
    """``python -m service`` (the production entry point: uvicorn with its read timeouts) on
    127.0.0.1:<free port> with GEOLOC_* settings."""

    def __init__(self, env: dict[str, str], log_path: Path, wait_ready: bool = True,
                 args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GEOLOC_", "MALLOC_"))}
        full_env.update(env)
        full_env["PYTHONPATH"] = str(REPO)
        full_env.setdefault("OMP_NUM_THREADS", "1")  # micro model: 1 thread is fastest, leaves a core
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port),
             "--timeout-graceful-shutdown", "5", *args],
            cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the service is not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0.0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if "{" in head:
            metric, _, rest = head.partition("{")
            found = dict(
                part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part
            )
            found = {k: v.strip('"') for k, v in found.items()}
        else:
            metric, found = head, {}
        if metric == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


# --- fixtures -----------------------------------------------------------------------------------

class World:
    """Checkpoints and artifacts shared by all service tests of a run (they only read them)."""

    def __init__(self, root: Path) -> None:
        """Made in `root`, or read from there when a test process of the same run made them."""
        self.root = root
        self.checkpoint = root / "micro.safetensors"
        self.other_checkpoint = root / "micro_other.safetensors"
        self.artifact_a, self.artifact_b = root / "artifacts" / "a", root / "artifacts" / "b"
        # Built with a different model: the service must refuse it.
        self.artifact_other = root / "artifacts" / "other"
        self.pano = jpeg_bytes(512, 128, seed=3)
        self.pano_path = root / "pano.jpg"
        self.counts = {"a": 24, "b": 16}
        made = root / "fingerprint.txt"  # written last: everything else is there
        if made.is_file():
            self.fingerprint = made.read_text()
            return
        shutil.rmtree(root, ignore_errors=True)  # what a process that failed half-way left
        root.mkdir(parents=True)
        fingerprint = micro_checkpoint(self.checkpoint, seed=0)
        micro_checkpoint(self.other_checkpoint, seed=1)
        cat_a = write_catalog(root / "world_a", "a", self.counts["a"], seed=1)
        cat_b = write_catalog(root / "world_b", "b", self.counts["b"], seed=2)
        build_artifact(cat_a, self.checkpoint, self.artifact_a)
        build_artifact(cat_b, self.checkpoint, self.artifact_b)
        build_artifact(cat_b, self.other_checkpoint, self.artifact_other)
        self.pano_path.write_bytes(self.pano)
        made.write_text(fingerprint)
        self.fingerprint = fingerprint


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """One World for the whole run. Each test module that imports this fixture has a session fixture
    of its own, and pytest-xdist workers are processes of their own: they all meet in one folder of
    the run, under a lock, and the first to come makes the World there (~9 s of CPU each time)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    with open(base / "service_world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return World(base / "service_world")


def settings_for(world: World, index: Path, **overrides):
    from service.settings import Settings

    base = dict(checkpoint=world.checkpoint, index=index, reload_poll_s=0, json_logs=True,
                exit_on_load_failure=False, max_batch_wait_ms=2.0)
    base.update(overrides)
    return Settings(**base)


@contextlib.contextmanager
def running_client(settings, wait: bool = True):
    """A TestClient around create_app(settings), with model and index loaded."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    app = create_app(settings)
    with TestClient(app) as client:
        if wait:
            assert app.state.runtime.wait_loaded(60), app.state.runtime.error
        yield client


def with_gpano_heading(image: bytes, value: str, *, exif_heading: float | None = None) -> bytes:
    """The image re-encoded as a JPEG whose XMP carries GPano:PoseHeadingDegrees = ``value`` (a Street View
    style panorama's), optionally with an EXIF GPSImgDirection too."""
    from worldgen.dataset import camera_exif

    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description rdf:about="" xmlns:GPano="http://ns.google.com/photos/1.0/panorama/" '
           f'GPano:ProjectionType="equirectangular" GPano:PoseHeadingDegrees="{value}"/></rdf:RDF></x:xmpmeta>')
    out = io.BytesIO()
    extra = {"exif": camera_exif(65.0, exif_heading, 4, 3)} if exif_heading is not None else {}
    Image.open(io.BytesIO(image)).save(out, "JPEG", quality=85, xmp=xmp.encode(), **extra)
    return out.getvalue()

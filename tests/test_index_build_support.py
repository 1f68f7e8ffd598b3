"""Shared helpers for the index_build tests (no tests in here)."""
from __future__ import annotations

import contextlib
import csv
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def micro_checkpoint(path: Path, seed: int = 0, orientation_dim: int = 0, provenance: dict | None = None) -> str:
    """A tiny L2LTR (32-d embeddings; with `orientation_dim`, an orientation head giving 8 aerial
    columns of that width) saved as .safetensors, `provenance` added to its metadata; returns its fingerprint."""
    import torch

    from model import L2LTR, L2LTRConfig, save_checkpoint

    torch.manual_seed(seed)
    cfg = L2LTRConfig(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, resnet_units=(1, 1, 1),
                      resnet_width_factor=0.5, ground_size=(32, 128), aerial_size=(32, 128), name="micro",
                      orientation_dim=orientation_dim)
    return save_checkpoint(L2LTR(cfg), path, metadata={"purpose": "index_build tests", **(provenance or {})})


def make_tile(path: Path, seed: int, size: int = 64) -> None:
    """A distinct little aerial tile: an 8x8 grid of random colours, upscaled."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).resize((size, size), Image.NEAREST).save(path)


def make_catalogue(root: Path, n: int, prefix: str = "t", seed: int = 0, csv_name: str = "tiles.csv",
                   extra: bool = True, image_dir: str = "bingmap") -> Path:
    """A worldgen-like catalogue: root/<csv_name> + root/<image_dir>/<id>.png (paths relative to the CSV)."""
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / csv_name
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile_id", "lat", "lon", "path"] + (["region"] if extra else []))
        for i in range(n):
            tid = f"{prefix}{i:05d}"
            rel = f"{image_dir}/{tid}.png"
            make_tile(root / rel, seed * 100_003 + i)
            w.writerow([tid, 47.3 + i * 1e-3, 8.5 + i * 1e-3, rel] + (["zurich"] if extra else []))
    return csv_path


def encode_tiles_directly(checkpoint: str, paths: list[str]) -> np.ndarray:
    """Ground truth for the pipeline: the model applied to each image, with no index_build code."""
    import torch

    from model import load_checkpoint
    from model.encode import encode_images
    from model.preprocess import aerial_tensor, load_image

    net = load_checkpoint(checkpoint)
    return encode_images(net, [aerial_tensor(load_image(p), net.config) for p in paths], "aerial",
                         batch_size=16, device="cpu")


def encode_columns_directly(checkpoint: str, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Ground truth for the orientation columns: (descriptors, aerial column features) of each image
    from `InferenceEncoder.encode_uint8_with_columns`, images read by model.preprocess alone."""
    import torch

    from model import load_checkpoint
    from model.inference import InferenceEncoder
    from model.preprocess import aerial_image, image_uint8, load_image

    net = load_checkpoint(checkpoint)
    encoder = InferenceEncoder(net, "cpu", branches=("aerial",), warm_up=0)
    images = torch.stack([image_uint8(aerial_image(load_image(p), net.config)) for p in paths])
    return encoder.encode_uint8_with_columns(images, "aerial", max_batch=16)


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def shard_files(vectors_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every shard file, to prove that files were not rewritten."""
    out = {}
    for p in sorted(vectors_dir.glob("shard-*")):
        st = p.stat()
        out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out


@contextlib.contextmanager
def single_threaded():
    """Tiny models and indexes gain nothing from threads, and on a shared 2-core machine OpenMP
    spin-waiting makes them many times slower; restore the previous settings afterwards."""
    import faiss
    import torch

    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)

import os
from pathlib import Path

# Tiny models and indexes gain nothing from threads, and with the suite on 2 xdist workers (or beside
# other work) on a 2-core machine a second OpenMP thread stalls at every barrier: a micro training
# step took ~430 ms with two threads beside a busy core, ~60 ms with one. One thread here and in the
# processes the tests start (they inherit it unless a test says otherwise); where a test or the
# service sets more threads itself, waiting ones sleep instead of spinning (with two threads beside
# a busy core: ~85 ms). Set before torch and faiss load their OpenMP runtimes.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("L2LTR_FIXTURES", REPO.parent / "shared" / "fixtures"))

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (set L2LTR_FIXTURES)")
    return FIXTURES


@pytest.fixture
def micro_config():
    """A very small architecture for fast tests of the plumbing."""
    from model import L2LTRConfig

    return L2LTRConfig(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, resnet_units=(1, 1, 1),
                       resnet_width_factor=0.5, ground_size=(32, 128), aerial_size=(32, 128), name="micro")

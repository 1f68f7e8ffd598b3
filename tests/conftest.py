import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("L2LTR_FIXTURES", REPO.parent / "shared" / "fixtures"))

torch.set_num_threads(min(2, torch.get_num_threads()))


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

"""The network must be numerically the authors' network: reference outputs from their code."""
import pytest
import torch

from model import L2LTR, L2LTRConfig, load_checkpoint
from model.checkpoint import CheckpointError

pytestmark = pytest.mark.cross_cpu  # compares numbers of two paths: `make test` reruns it with other CPU kernels

TOL = 1e-5


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return torch.load(fixtures_dir / "l2ltr_official_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def official_pth(official, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "model_checkpoint.pth"
    torch.save(official["checkpoint"], path)
    return path


def test_official_checkpoint_reproduces_reference_outputs(official, official_pth):
    model = load_checkpoint(official_pth, config=official["config"])
    assert not model.training
    with torch.no_grad():
        grd = model.encode_ground(official["input_grd"])
        sat = model.encode_aerial(official["input_sat"])
    assert (grd - official["output_grd"]).abs().max().item() <= TOL
    assert (sat - official["output_sat"]).abs().max().item() <= TOL


def test_npz_import_reproduces_reference_outputs(fixtures_dir):
    expected = torch.load(fixtures_dir / "vit_npz_tiny_expected.pt", weights_only=True)
    cfg = dict(expected["config"])
    size = cfg.pop("image_size")
    assert cfg.pop("npz_position_grid") == [4, 4]
    model = load_checkpoint(fixtures_dir / "vit_npz_tiny.npz", config=dict(cfg, ground_size=size, aerial_size=size))
    with torch.no_grad():
        for encode in (model.encode_ground, model.encode_aerial):
            assert (encode(expected["input"]) - expected["output"]).abs().max().item() <= TOL


def test_npz_resizes_position_grid_per_branch(fixtures_dir):
    cfg = L2LTRConfig(hidden_size=64, num_heads=4, mlp_dim=128, num_layers=3, resnet_units=(1, 1, 1),
                      resnet_width_factor=0.5, ground_size=(64, 256), aerial_size=(128, 128))
    model = load_checkpoint(fixtures_dir / "vit_npz_tiny.npz", config=cfg)
    assert model.ground.transformer.embeddings.position_embeddings.shape == (1, 1 + 4 * 16, 64)
    assert model.aerial.transformer.embeddings.position_embeddings.shape == (1, 1 + 8 * 8, 64)


def test_paper_config_matches_released_state_dict(fixtures_dir):
    expected = {}
    for line in (fixtures_dir / "l2ltr_paper_state_dict.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.split("x"))
    model = L2LTR(L2LTRConfig.named("paper"))
    for branch in (model.ground, model.aerial):
        got = {k: tuple(v.shape) for k, v in branch.state_dict().items()}
        assert got == expected
    assert len(expected) == 378
    assert abs(sum(p.numel() for p in model.ground.parameters()) / 1e6 - 97.95) < 0.01


def test_official_with_wrong_config_names_the_problem(official, official_pth):
    cfg = dict(official["config"], num_layers=2)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\).*layer\.2"):
        load_checkpoint(official_pth, config=cfg)
    cfg = dict(official["config"], hidden_size=32)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(official_pth, config=cfg)


def test_official_requires_config(official_pth):
    with pytest.raises(CheckpointError, match="holds no architecture; name it .* with config= in Python"):
        load_checkpoint(official_pth)


def test_official_missing_branch(official, tmp_path):
    path = tmp_path / "half.pth"
    torch.save({"model_grd": official["checkpoint"]["model_grd"]}, path)
    with pytest.raises(CheckpointError, match="model_sat"):
        load_checkpoint(path, config=official["config"])


def test_vanilla_switch_changes_outputs(official, official_pth):
    cross = load_checkpoint(official_pth, config=official["config"])
    vanilla = load_checkpoint(official_pth, config=dict(official["config"], attention="vanilla"))
    with torch.no_grad():
        a = cross.encode_ground(official["input_grd"])
        b = vanilla.encode_ground(official["input_grd"])
    assert (a - b).abs().max().item() > 1e-3

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import L2LTR, L2LTRConfig, load_checkpoint, save_checkpoint
from model.checkpoint import CheckpointError, read_safetensors_header
from model.config import ConfigError

pytestmark = pytest.mark.cross_cpu  # compares numbers of two paths: `make test` reruns it with other CPU kernels


def _inputs(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *cfg.ground_size, generator=g), torch.randn(n, 3, *cfg.aerial_size, generator=g)


def test_round_trip_identical_outputs(micro_config, tmp_path):
    model = L2LTR(micro_config).eval()
    path = tmp_path / "m.safetensors"
    fp = save_checkpoint(model, path, metadata={"note": "test"})
    loaded = load_checkpoint(path)
    assert fp == model.fingerprint() == loaded.fingerprint()
    assert loaded.config == micro_config and loaded.provenance == {"note": "test"}
    g, a = _inputs(micro_config)
    with torch.no_grad():
        assert torch.equal(model.encode_ground(g), loaded.encode_ground(g))
        assert torch.equal(model.encode_aerial(a), loaded.encode_aerial(a))
    header = read_safetensors_header(path)
    assert json.loads(header["l2ltr_config"])["hidden_size"] == 32


def test_fp16_storage_keeps_fingerprint_consistent(micro_config, tmp_path):
    model = L2LTR(micro_config).eval()
    path = tmp_path / "half.safetensors"
    fp = save_checkpoint(model, path, dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert loaded.fingerprint() == fp
    assert next(loaded.parameters()).dtype == torch.float32
    g, _ = _inputs(micro_config)
    with torch.no_grad():
        assert (model.encode_ground(g) - loaded.encode_ground(g)).abs().max() < 5e-3


def test_truncated_file_is_rejected(micro_config, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(L2LTR(micro_config), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_checkpoint(path)


def test_tampered_weights_are_rejected(micro_config, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(L2LTR(micro_config), path)
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8 + header_len + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(path)


def test_requested_config_must_match_stored(micro_config, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(L2LTR(micro_config), path)
    with pytest.raises(CheckpointError, match="was made with config"):
        load_checkpoint(path, config=micro_config.replace(num_layers=3))
    load_checkpoint(path, config=micro_config.replace(name="other-name"))  # the name is not architecture


def test_missing_and_unknown_formats(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(junk)


def test_unloadable_paths_say_what_they_are(micro_config, tmp_path):
    """A directory, an empty file and garbage under a checkpoint's name each get their own message."""
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(L2LTR(micro_config), run / "best.safetensors")
    with pytest.raises(CheckpointError, match=r"is a directory; give the checkpoint file itself "
                                              r"\(it holds best\.safetensors\)"):
        load_checkpoint(run)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors: the file is empty"):
        load_checkpoint(empty)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"GARBAGE!" + os.urandom(4096).replace(b"{", b"}"))
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a valid .safetensors file"):
        load_checkpoint(garbage)
    not_pth = tmp_path / "model_checkpoint.pth"
    not_pth.write_bytes(b"just text")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(not_pth, config=micro_config)


def test_missing_and_extra_keys_named(micro_config, tmp_path):
    from safetensors.torch import save_file

    model = L2LTR(micro_config)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    header = read_safetensors_header(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("aerial.transformer.encoder.encoder_norm.bias")
    state["ground.extra.weight"] = torch.zeros(1)
    from model.network import state_fingerprint
    header["fingerprint"] = state_fingerprint(micro_config, state)
    save_file(state, str(path), metadata=header)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "aerial.transformer.encoder.encoder_norm.bias" in str(err.value)
    assert "ground.extra.weight" in str(err.value)


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown config field"):
        L2LTRConfig.from_dict({"hidden_size": 64, "hiden": 3})
    with pytest.raises(ConfigError, match="multiples of 16"):
        L2LTRConfig(ground_size=(100, 512))
    with pytest.raises(ConfigError, match="attention"):
        L2LTRConfig(attention="cross")
    with pytest.raises(ConfigError, match="unknown config name"):
        L2LTRConfig.named("huge")
    assert L2LTRConfig.resolve("tiny") is L2LTRConfig.named("tiny")
    assert L2LTRConfig.resolve(L2LTRConfig.named("tiny").to_json()) == L2LTRConfig.named("tiny")


def test_named_configs():
    tiny = L2LTR(L2LTRConfig.named("tiny"))
    assert 3.0e6 < tiny.num_parameters()["ground"] < 3.6e6
    paper = L2LTRConfig.named("paper")
    assert paper.ground_size == (128, 512) and paper.polar_intermediate == (112, 616)


def test_encoders_return_unit_vectors_and_check_shapes(micro_config):
    model = L2LTR(micro_config).eval()
    g, a = _inputs(micro_config, n=3)
    with torch.no_grad():
        out = model.encode_ground(g)
    assert out.shape == (3, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match=r"ground input must be \[B, 3, 32, 128\]"):
        model.encode_ground(torch.zeros(1, 3, 64, 64))


def test_convert_and_info_cli(fixtures_dir, tmp_path, capsys):
    from model import convert, info

    official = torch.load(fixtures_dir / "l2ltr_official_tiny.pt", weights_only=True)
    pth = tmp_path / "model_checkpoint.pth"
    torch.save(official["checkpoint"], pth)
    out = tmp_path / "converted.safetensors"
    assert convert.main(["--from", "official", "--config", json.dumps(official["config"]),
                         "--in", str(pth), "--out", str(out)]) == 0
    model = load_checkpoint(out)
    with torch.no_grad():
        assert (model.encode_ground(official["input_grd"]) - official["output_grd"]).abs().max() <= 1e-5
    assert info.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert model.fingerprint() in text and "parameters" in text
    # the wrong --from is caught before anything is written
    assert convert.main(["--from", "npz", "--config", "tiny", "--in", str(pth), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert not (tmp_path / "x.safetensors").exists()
    npz_out = tmp_path / "npz.safetensors"
    cfg = {"hidden_size": 64, "num_heads": 4, "mlp_dim": 128, "num_layers": 3, "resnet_units": [1, 1, 1],
           "resnet_width_factor": 0.5, "ground_size": [64, 256], "aerial_size": [64, 256]}
    assert convert.main(["--from", "npz", "--config", json.dumps(cfg), "--in", str(fixtures_dir / "vit_npz_tiny.npz"),
                         "--out", str(npz_out)]) == 0


def test_test_time_flip_is_mirror_invariant_and_inference_only(micro_config):
    micro_config = micro_config.replace(dropout=0.0)
    plain = L2LTR(micro_config).eval()
    flipped = L2LTR(micro_config.replace(test_time_flip=True)).eval()
    flipped.load_state_dict(plain.state_dict())
    assert flipped.fingerprint() != plain.fingerprint()  # descriptors differ, so artifacts must not mix
    g, a = _inputs(micro_config, n=3)
    with torch.no_grad():
        for view, x in (("ground", g), ("aerial", a)):
            enc_flip, enc_plain = getattr(flipped, f"encode_{view}"), getattr(plain, f"encode_{view}")
            expected = torch.nn.functional.normalize(enc_plain(x) + enc_plain(x.flip(3)), dim=-1)
            assert torch.allclose(enc_flip(x), expected, atol=1e-6)
            assert torch.allclose(enc_flip(x.flip(3)), enc_flip(x), atol=1e-6)  # a view and its mirror agree
            assert not torch.allclose(enc_plain(x.flip(3)), enc_plain(x), atol=1e-3)
        flipped.train()
        assert torch.allclose(flipped.encode_ground(g), plain.encode_ground(g), atol=1e-6)  # training sees one view


def test_convert_ours_sets_test_time_flip(micro_config, tmp_path, capsys):
    from model import convert, info

    src = tmp_path / "run.safetensors"
    save_checkpoint(L2LTR(micro_config), src, metadata={"trained_steps": 7})
    out = tmp_path / "demo.safetensors"
    assert convert.main(["--from", "ours", "--in", str(src), "--out", str(out), "--dtype", "float16",
                         "--test-time-flip", "on"]) == 0
    model = load_checkpoint(out)
    assert model.config.test_time_flip and model.provenance["trained_steps"] == 7
    assert info.main([str(out)]) == 0
    assert "test-time flip on" in capsys.readouterr().out
    assert convert.main(["--from", "npz", "--in", str(src), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_inference_encoder_traces_up_front_and_equals_the_eager_network(micro_config, fixtures_dir,
                                                                          tmp_path):
    import threading

    from model.encode import encode_batch
    from model.inference import InferenceEncoder
    from model.preprocess import normalize_uint8_nchw

    # L2LTR is a plain nn.Module: training and loading weights are torch's own
    assert L2LTR.train is torch.nn.Module.train and L2LTR.load_state_dict is torch.nn.Module.load_state_dict
    for config in (micro_config.replace(dropout=0.0), micro_config.replace(test_time_flip=True)):
        torch.manual_seed(0)
        eager = L2LTR(config).eval()
        net = L2LTR(config)
        net.load_state_dict(eager.state_dict())
        encoder = InferenceEncoder(net, "cpu")
        assert encoder.traced == ("ground", "aerial")  # built in the constructor, before any batch
        assert net.fingerprint() == eager.fingerprint()
        for n in (3, 1, 5):  # any batch size
            g, a = _inputs(config, n=n)
            assert torch.allclose(encoder.encode(g, "ground"), encode_batch(eager, g, "ground"), atol=1e-6)
            assert torch.allclose(encoder.encode(a, "aerial"), encode_batch(eager, a, "aerial"), atol=1e-6)
        images = torch.randint(0, 256, (5, 3, *config.ground_size), dtype=torch.uint8)
        rows = encoder.encode_uint8(images, "ground", max_batch=2)  # three forwards
        assert rows.dtype == np.float32 and rows.shape == (5, config.hidden_size)
        assert np.allclose(rows, encode_batch(eager, normalize_uint8_nchw(images), "ground").numpy(), atol=1e-6)
        with pytest.raises(ValueError, match="ground input must be"):
            encoder.encode(torch.zeros(1, 3, 8, 8), "ground")
        with pytest.raises(ValueError, match=r"training mode: call model.eval\(\)"):  # dropout: random rows
            encode_batch(L2LTR(config).train(), g, "ground")
    aerial_only = InferenceEncoder(L2LTR(micro_config), "cpu", branches=("aerial",), trace=False)
    assert aerial_only.traced == ()
    with pytest.raises(ValueError, match="branch must be one of"):
        aerial_only.encode(_inputs(micro_config, n=1)[0], "ground")
    # the authors' reference outputs, through the traced path, from two threads at once
    official = torch.load(fixtures_dir / "l2ltr_official_tiny.pt", weights_only=True)
    torch.save(official["checkpoint"], tmp_path / "model_checkpoint.pth")
    encoder = InferenceEncoder(load_checkpoint(tmp_path / "model_checkpoint.pth", config=official["config"]))
    errors = []

    def check() -> None:
        out = encoder.encode(official["input_grd"], "ground")
        errors.append((out - official["output_grd"]).abs().max().item())

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 2 and max(errors) <= 1e-5


def test_allocator_settings_are_added_to_an_environment_unless_the_user_tuned_malloc():
    from model.allocator import ALLOCATOR_ENV, allocator_env

    assert allocator_env({"PATH": "/bin"}) == {"PATH": "/bin", **ALLOCATOR_ENV}
    for own in ({"MALLOC_TRIM_THRESHOLD_": "1000000"},
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}):
        assert allocator_env(own) == own  # the user's setting wins
    other = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}  # not a malloc tunable
    assert allocator_env(other) == {**other, **ALLOCATOR_ENV}


def _probe_entry(tmp_path, name: str, source: str, *args: str):
    """Writes ``source`` as module ``name`` in ``tmp_path``; returns run(**env) -> its stdout lines, run as
    ``python -m name *args`` with the repository importable and without the environment's own MALLOC_*,
    GLIBC_TUNABLES and OPENBLAS_* variables (plus ``env``)."""
    import subprocess

    (tmp_path / f"{name}.py").write_text(source)
    repo = Path(__file__).resolve().parents[1]

    def run(**env) -> list[str]:
        full = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "OPENBLAS_"))}
        out = subprocess.run([sys.executable, "-m", name, *args], cwd=tmp_path,
                             env={**full, "PYTHONPATH": str(repo), **env}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    return run


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings")
def test_an_entry_point_runs_itself_again_with_the_allocator_settings(tmp_path):
    run = _probe_entry(
        tmp_path, "probe_entry",
        "import os\n"
        "from model.allocator import reexec_with_allocator_env\n"
        "print('start', os.getpid(), flush=True)\n"
        "reexec_with_allocator_env('probe_entry')\n"
        "import sys\n"
        "print(os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TRIM_THRESHOLD_'), sys.argv[1:])\n",
        "--flag", "x y")

    from model.allocator import ALLOCATOR_ENV

    lines = run()
    assert [line.split()[0] for line in lines] == ["start", "start", ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]]
    assert lines[-1].endswith("['--flag', 'x y']")  # the same arguments, once more
    lines = run(MALLOC_TRIM_THRESHOLD_="1000000")  # the user's own setting: no second start
    assert len(lines) == 2 and lines[-1].startswith("None 1000000")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings")
def test_the_service_entry_point_runs_with_one_blas_thread_unless_told_otherwise(tmp_path):
    """python -m service starts itself again with OPENBLAS_NUM_THREADS=1 (numpy's BLAS threads spinning beside the
    encoder's doubled a photo's latency); a value in the environment wins, and then, with the allocator settings
    there too, nothing starts again."""
    from model.allocator import ALLOCATOR_ENV

    run = _probe_entry(
        tmp_path, "probe_service",
        "import os\n"
        "from model.allocator import reexec_with_allocator_env\n"
        "from service.__main__ import SERVICE_ENV_DEFAULTS\n"
        "print('start', flush=True)\n"
        "reexec_with_allocator_env('probe_service', SERVICE_ENV_DEFAULTS)\n"
        "print(os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('MALLOC_MMAP_THRESHOLD_'))\n")
    assert run() == ["start", "start", f"1 {ALLOCATOR_ENV['MALLOC_MMAP_THRESHOLD_']}"]
    assert run(OPENBLAS_NUM_THREADS="2") == ["start", "start", f"2 {ALLOCATOR_ENV['MALLOC_MMAP_THRESHOLD_']}"]
    assert run(OPENBLAS_NUM_THREADS="2", **ALLOCATOR_ENV) == ["start", f"2 {ALLOCATOR_ENV['MALLOC_MMAP_THRESHOLD_']}"]

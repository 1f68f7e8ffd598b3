"""Checkpoint I/O: our .safetensors format, the authors' model_checkpoint.pth, Google's ViT .npz.

Every loader checks keys and shapes strictly and names what is wrong; nothing is loaded partially.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .atomic import atomic_write
from .config import ConfigError, L2LTRConfig
from .network import L2LTR, state_fingerprint

FORMAT = "l2ltr-safetensors/1"
BRANCHES = ("ground", "aerial")
OFFICIAL_BRANCH_KEYS = {"ground": "model_grd", "aerial": "model_sat"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the problem."""


def _limited(items, n: int = 8) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_state_strict(model: L2LTR, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model` only if keys and shapes match exactly."""
    expected = model.state_dict()
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_limited(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {_limited(extra)}")
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatch(es): {_limited(bad_shapes, 4)}")
    if problems:
        raise CheckpointError(f"{source} does not fit config {model.config.name!r} "
                              f"({model.config.to_json()}): " + "; ".join(problems))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k].to(v.dtype))


# --------------------------------------------------------------------------- ours: .safetensors

def save_checkpoint(model: L2LTR, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32) -> str:
    """Write both branches to one .safetensors file (atomically); returns the fingerprint."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    fingerprint = state_fingerprint(model.config, state)
    header = {
        "format": FORMAT,
        "l2ltr_config": model.config.to_json(),
        "fingerprint": fingerprint,
        "provenance": json.dumps(dict(metadata or {}), sort_keys=True),
    }
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=header))
    return fingerprint


def read_safetensors_header(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for truncation etc.
        raise CheckpointError(f"{path}: not a readable .safetensors file ({exc})") from None


def _load_safetensors(path: Path, config: L2LTRConfig | None) -> L2LTR:
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata 'format' is {header.get('format')!r}, expected {FORMAT!r}")
    try:
        stored = L2LTRConfig.from_json(header["l2ltr_config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{path}: metadata 'l2ltr_config' is missing or invalid ({exc})") from None
    if config is not None and config.replace(name=stored.name) != stored:
        raise CheckpointError(f"{path}: the file was made with config {stored.to_json()}, "
                              f"but config {config.to_json()} was requested")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({exc})") from None
    fingerprint = state_fingerprint(stored, state)
    if header.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: weights do not match the fingerprint in the header "
                              f"({header.get('fingerprint')} vs {fingerprint}); the file was modified or damaged")
    model = L2LTR(stored)
    load_state_strict(model, state, str(path))
    model.provenance = json.loads(header.get("provenance") or "{}")
    return model


# --------------------------------------------------------------------------- authors' .pth

def load_official_state(model: L2LTR, checkpoint: Mapping[str, Any], source: str) -> None:
    """Load the authors' {'model_grd': ..., 'model_sat': ...} dict into our two branches."""
    missing = [v for v in OFFICIAL_BRANCH_KEYS.values() if v not in checkpoint]
    if missing:
        raise CheckpointError(f"{source}: missing entr{'y' if len(missing) == 1 else 'ies'} {missing}; "
                              f"an authors' checkpoint has {list(OFFICIAL_BRANCH_KEYS.values())}")
    state = {}
    for branch, key in OFFICIAL_BRANCH_KEYS.items():
        for k, v in checkpoint[key].items():
            state[f"{branch}.{k.removeprefix('module.')}"] = v
    load_state_strict(model, state, source)


def _load_official(path: Path, config: L2LTRConfig) -> L2LTR:
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True ({exc})") from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(checkpoint).__name__}")
    model = L2LTR(config)
    load_official_state(model, checkpoint, str(path))
    model.provenance = {"source": "official", "file": path.name}
    return model


# --------------------------------------------------------------------------- Google ViT .npz

def _np2t(a: np.ndarray, conv: bool = False) -> torch.Tensor:
    if conv:
        a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def resize_position_grid(posemb: np.ndarray, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """[1, 1+h*w, D] -> [1, 1+H*W, D]: class token kept, grid zoomed with order-1 splines."""
    from scipy import ndimage

    token, grid = posemb[:, :1], posemb[0, 1:]
    if old_grid is None:
        side = int(round(len(grid) ** 0.5))
        if side * side != len(grid):
            raise CheckpointError(f"position grid of {len(grid)} entries is not square; give old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    grid = grid.reshape(old_grid[0], old_grid[1], -1)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = ndimage.zoom(grid, zoom, order=1).reshape(1, new_grid[0] * new_grid[1], -1)
    return np.concatenate([token, grid], axis=1)


def npz_branch_state(weights: Mapping[str, np.ndarray], config: L2LTRConfig, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Map Google's R50+ViT .npz names to one branch's state dict (keys without the branch prefix)."""
    d = config.hidden_size
    pre = "transformer.embeddings."
    state = {
        pre + "cls_token": _np2t(weights["cls"]),
        pre + "patch_embeddings.weight": _np2t(weights["embedding/kernel"], conv=True),
        pre + "patch_embeddings.bias": _np2t(weights["embedding/bias"]),
        pre + "position_embeddings": _np2t(resize_position_grid(weights["Transformer/posembed_input/pos_embedding"], grid)),
        pre + "hybrid_model.root.conv.weight": _np2t(weights["conv_root/kernel"], conv=True),
        pre + "hybrid_model.root.gn.weight": _np2t(weights["gn_root/scale"]),
        pre + "hybrid_model.root.gn.bias": _np2t(weights["gn_root/bias"]),
        "transformer.encoder.encoder_norm.weight": _np2t(weights["Transformer/encoder_norm/scale"]),
        "transformer.encoder.encoder_norm.bias": _np2t(weights["Transformer/encoder_norm/bias"]),
    }
    for b, n_units in enumerate(config.resnet_units, start=1):
        for u in range(1, n_units + 1):
            src, dst = f"block{b}/unit{u}/", f"{pre}hybrid_model.body.block{b}.unit{u}."
            for i in (1, 2, 3):
                state[f"{dst}conv{i}.weight"] = _np2t(weights[f"{src}conv{i}/kernel"], conv=True)
                state[f"{dst}gn{i}.weight"] = _np2t(weights[f"{src}gn{i}/scale"])
                state[f"{dst}gn{i}.bias"] = _np2t(weights[f"{src}gn{i}/bias"])
            if f"{src}conv_proj/kernel" in weights:
                state[f"{dst}downsample.weight"] = _np2t(weights[f"{src}conv_proj/kernel"], conv=True)
                state[f"{dst}gn_proj.weight"] = _np2t(weights[f"{src}gn_proj/scale"])
                state[f"{dst}gn_proj.bias"] = _np2t(weights[f"{src}gn_proj/bias"])
    for n in range(config.num_layers):
        src, dst = f"Transformer/encoderblock_{n}/", f"transformer.encoder.layer.{n}."
        att = src + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            state[f"{dst}attn.{name}.weight"] = _np2t(weights[f"{att}{name}/kernel"].reshape(d, d).T)
            state[f"{dst}attn.{name}.bias"] = _np2t(weights[f"{att}{name}/bias"].reshape(d))
        state[f"{dst}attn.out.weight"] = _np2t(weights[f"{att}out/kernel"].reshape(d, d).T)
        state[f"{dst}attn.out.bias"] = _np2t(weights[f"{att}out/bias"])
        for i, fc in ((0, "fc1"), (1, "fc2")):
            state[f"{dst}ffn.{fc}.weight"] = _np2t(weights[f"{src}MlpBlock_3/Dense_{i}/kernel"].T)
            state[f"{dst}ffn.{fc}.bias"] = _np2t(weights[f"{src}MlpBlock_3/Dense_{i}/bias"])
        # Google's ViT has one attention LayerNorm; both of L2LTR's (self and cross) start from it.
        for norm, ln in (("attention_norm_1", "LayerNorm_0"), ("attention_norm_2", "LayerNorm_0"), ("ffn_norm", "LayerNorm_2")):
            state[f"{dst}{norm}.weight"] = _np2t(weights[f"{src}{ln}/scale"])
            state[f"{dst}{norm}.bias"] = _np2t(weights[f"{src}{ln}/bias"])
    return state


def load_npz_into(model: L2LTR, path: str | os.PathLike) -> None:
    """Initialise both branches from a Google R50+ViT .npz (position grids resized per branch)."""
    try:
        with np.load(str(path)) as data:
            weights = {k: data[k] for k in data.files}
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as .npz ({exc})") from None
    state = {}
    for branch in BRANCHES:
        try:
            part = npz_branch_state(weights, model.config, model.config.grid(branch))
        except KeyError as exc:
            raise CheckpointError(f"{path}: missing array {exc.args[0]!r} needed by config {model.config.name!r}") from None
        except ValueError as exc:
            raise CheckpointError(f"{path}: array shapes do not fit config {model.config.name!r} ({exc})") from None
        state.update({f"{branch}.{k}": v for k, v in part.items()})
    load_state_strict(model, state, str(path))


def _load_npz(path: Path, config: L2LTRConfig) -> L2LTR:
    model = L2LTR(config)
    load_npz_into(model, path)
    model.provenance = {"source": "npz", "file": path.name}
    return model


# --------------------------------------------------------------------------- entry point

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".npz")
_FORMAT_OF_SUFFIX = {".safetensors": "safetensors", ".pth": "official", ".pt": "official", ".npz": "npz"}
_EXPECTED_CONTENT = {
    "safetensors": "not a valid .safetensors file: it does not begin with a header length and a JSON header "
                   "(truncated, damaged, or another kind of file renamed)",
    "official": "not a PyTorch checkpoint (neither a zip archive nor a pickle)",
    "npz": "not a .npz archive (no zip signature)",
}


def detect_format(path: Path) -> str:
    """'safetensors', 'official' (the authors' .pth) or 'npz', from the file's first bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise CheckpointError(f"{path}: a damaged zip archive (truncated?)") from None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "official"
    if head[:1] == b"\x80":  # legacy pickle-based torch.save
        return "official"
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    expected = _FORMAT_OF_SUFFIX.get(path.suffix.lower())
    if expected:  # the name says what it should be: say that it is not
        raise CheckpointError(f"{path}: {_EXPECTED_CONTENT[expected]}")
    raise CheckpointError(f"{path}: unknown checkpoint format (expected one of our .safetensors files, "
                          f"the authors' .pth or a Google .npz)")


def check_checkpoint_file(path: str | os.PathLike) -> str:
    """Fail early, with one line, for a checkpoint path that cannot be loaded: missing, a
    directory, empty, or not in a known format (reads only the first bytes and, for .safetensors,
    the header). Returns the format as `detect_format` names it."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
        hint = f" (it holds {_limited(inside, 4)})" if inside else ""
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file itself{hint}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    try:
        fmt = detect_format(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    if fmt == "safetensors":
        read_safetensors_header(path)
    return fmt


def load_checkpoint(path: str | os.PathLike, config: "L2LTRConfig | str | Mapping | None" = None,
                    map_location: str | torch.device = "cpu") -> L2LTR:
    """Load a model in eval mode from .safetensors (ours), the authors' .pth or a Google .npz.

    `config` (a name, JSON, dict or L2LTRConfig) is required for .pth and .npz, optional for
    .safetensors (where it is checked against the stored one).
    """
    path = Path(path)
    fmt = check_checkpoint_file(path)
    cfg = L2LTRConfig.resolve(config) if config is not None else None
    if fmt == "safetensors":
        model = _load_safetensors(path, cfg)
    else:
        if cfg is None:
            raise CheckpointError(f"{path}: a {fmt} checkpoint holds no architecture; name it (paper, small, tiny or "
                                  "a JSON config) with config= in Python or the tool's --config / --model-config, or "
                                  "convert the file once to .safetensors with python -m model.convert")
        model = _load_official(path, cfg) if fmt == "official" else _load_npz(path, cfg)
    return model.to(map_location).eval()

"""Device choice and eager batched encoding (training, evaluation); serving and index builds
encode through `model.inference.InferenceEncoder`."""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Sequence

import numpy as np
import torch

from .network import L2LTR


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

BRANCHES = ("ground", "aerial")


def pick_device(name: str | None = None) -> torch.device:
    """'auto'/None -> cuda when available, else cpu; anything else as given."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device | str, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on CPU, where float32 keeps outputs within fixture tolerance."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode_batch(model: L2LTR, batch: torch.Tensor, branch: str, device: torch.device | str | None = None,
                 amp: bool = True) -> torch.Tensor:
    """One forward of one branch of a model in eval mode (as load_checkpoint returns it); returns
    float32 unit rows on the CPU."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    if model.training:  # dropout would make each call's descriptors differ
        raise ValueError("the model is in training mode: call model.eval() before encoding")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    encode = model.encode_ground if branch == "ground" else model.encode_aerial
    with torch.inference_mode(), autocast_context(device, amp):
        x = batch.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        out = encode(x).float()
    # bf16 rounding leaves rows slightly off unit length; renormalise in float32.
    return torch.nn.functional.normalize(out, dim=-1).cpu()


def encode_images(model: L2LTR, tensors: Sequence[torch.Tensor] | Iterable[torch.Tensor], branch: str,
                  batch_size: int = 64, device: torch.device | str | None = None, amp: bool = True) -> np.ndarray:
    """Encode preprocessed [3,H,W] tensors in batches -> float32 [N, D] numpy array."""
    out, buf = [], []
    for t in tensors:
        buf.append(t)
        if len(buf) == batch_size:
            out.append(encode_batch(model, torch.stack(buf), branch, device, amp))
            buf = []
    if buf:
        out.append(encode_batch(model, torch.stack(buf), branch, device, amp))
    if not out:
        return np.zeros((0, model.embedding_dim), dtype=np.float32)
    return torch.cat(out).numpy()

"""Batched inference helpers shared by evaluation, index_build and the service."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from typing import Iterable, Sequence

import numpy as np
import torch

from .network import L2LTR

log = logging.getLogger(__name__)


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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_allocator_tuned: bool | None = None


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep the memory of freed activations in the process instead of returning it to the kernel.

    By default glibc serves a large allocation with a fresh mmap and hands freed heap tops back,
    so every CPU forward page-faults its activation buffers in again: hundreds of minor faults
    per image for `tiny`, ~10% of its forward's CPU time (bench/RESULTS.md). Above the mmap
    threshold glibc stops adapting it, so buffers up to 32 MiB are reused from the heap. Once per
    process; a no-op (False) off glibc or where the user tuned glibc's malloc (MALLOC_*_THRESHOLD_,
    glibc.malloc.* in GLIBC_TUNABLES), which wins."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc." in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl's mallopt ignores these parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                            and mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    if not _allocator_tuned:
        log.warning("glibc refused the allocator settings; CPU forwards will page-fault more")
    return _allocator_tuned


def prepare_for_inference(model: L2LTR, device: torch.device | str = "cpu") -> L2LTR:
    """eval mode on `device`; channels_last on CUDA, where the stem's convolutions gain from it;
    on a CPU the branches run as TorchScript traces (`L2LTR.trace_for_inference`) and the
    process keeps freed activation memory for the next batch (`keep_freed_memory`)."""
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    else:
        keep_freed_memory()
        model.trace_for_inference()
    return model


def encode_batch(model: L2LTR, batch: torch.Tensor, branch: str, device: torch.device | str | None = None,
                 amp: bool = True) -> torch.Tensor:
    """One forward of one branch; returns float32 unit rows on the CPU."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
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

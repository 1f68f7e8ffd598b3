"""The glibc allocator settings the CPU forward wants, and the re-execution that gives an entry point
them. Imports nothing heavy (no torch), so an entry point re-executes before it pays for torch, and
scripts that only start the entry points can read the settings."""
from __future__ import annotations

import os
import sys
from typing import Mapping

# glibc serves a large allocation with a fresh mmap and hands freed heap tops back to the kernel,
# so every CPU forward page-faults its activation buffers in again: hundreds of minor faults per
# image for `tiny`, ~10% of its forward's CPU time (bench/RESULTS.md). Above a fixed mmap
# threshold glibc stops adapting it, so buffers up to 32 MiB are reused from the heap.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def allocator_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``ALLOCATOR_ENV`` added, unless the user tuned
    glibc's malloc already (MALLOC_*_ variables, glibc.malloc.* tunables): theirs wins."""
    env = dict(os.environ if env is None else env)
    tuned = any(k.startswith("MALLOC_") and k.endswith("_") for k in env) or \
        "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
    if not tuned:
        env.update(ALLOCATOR_ENV)
    return env


def reexec_with_allocator_env(module: str | None = None, defaults: Mapping[str, str] | None = None) -> None:
    """Entry points call this first: on Linux, run this program again (``python -m module``, or
    the script being run) with its arguments and ``allocator_env``, plus ``defaults`` for the variables the
    environment does not set, unless it has them all already (or the user's own malloc tuning). Returns only
    where nothing was to be done."""
    env = allocator_env()
    for key, value in (defaults or {}).items():
        env.setdefault(key, value)
    wanted = (*ALLOCATOR_ENV, *(defaults or {}))
    if not sys.platform.startswith("linux") or all(os.environ.get(k) == env.get(k) for k in wanted):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    program = ["-m", module] if module else [sys.argv[0]]
    os.execve(sys.executable, [sys.executable, *program, *sys.argv[1:]], env)

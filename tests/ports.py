"""A TCP port for a server a test starts in another process (uvicorn, the demo).

Such a port is picked here and bound there a moment later, so the pick must not be handed to anyone
else in between. A port from ``bind(0)`` can be: the kernel gives the same ephemeral range to every
process's ``bind(0)`` and to outgoing connections, so another pytest-xdist worker (or any client)
may get it first. Here each xdist worker draws from its own block of ports below the ephemeral
range, and a port is checked to be free before it is given.
"""
from __future__ import annotations

import itertools
import os
import random
import socket

LOWEST = 20000
EPHEMERAL_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_start() -> int:
    """The first port the kernel hands out by itself (Linux; 32768 elsewhere). Where it starts below
    LOWEST + 4096 the blocks reach into it: the bind check is then all that guards a pick."""
    try:
        with open(EPHEMERAL_FILE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def worker_block(worker: str | None, workers: str | None, top: int) -> range:
    """The ports of xdist worker ``gwN`` of ``workers`` (the env vars' values; None: one process)."""
    index = int(worker[2:]) if worker and worker.startswith("gw") and worker[2:].isdigit() else 0
    count = max(int(workers) if workers and workers.isdigit() else 1, index + 1)
    size = (top - LOWEST) // count
    if size < 16:
        raise RuntimeError(f"no room for {count} port blocks between {LOWEST} and {top}")
    start = LOWEST + index * size
    return range(start, start + size)


def _candidates():
    block = worker_block(os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
                         max(ephemeral_start(), LOWEST + 4096))
    # A random start: two runs of the suite side by side (a developer's and CI's) rarely meet.
    first = random.randrange(len(block))
    return itertools.cycle([block[(first + i) % len(block)] for i in range(len(block))])


_next = None


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, from this worker's block, never the same twice in a row."""
    global _next
    if _next is None:
        _next = _candidates()
    for _ in range(256):
        port = next(_next)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in this worker's block after 256 tries")

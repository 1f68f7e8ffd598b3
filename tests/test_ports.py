"""tests/ports.py: the port a test's server process binds is not handed to another worker."""
import socket

import ports


def test_each_xdist_worker_has_its_own_block_below_the_ephemeral_range():
    blocks = [ports.worker_block(f"gw{i}", "4", 32768) for i in range(4)]
    seen = set()
    for block in blocks:
        assert block.start >= ports.LOWEST and block.stop <= 32768 and len(block) >= 16
        assert seen.isdisjoint(block)
        seen.update(block)
    assert ports.worker_block(None, None, 32768) == range(ports.LOWEST, 32768)
    # A worker index beyond the announced count still gets a block of its own.
    assert ports.worker_block("gw5", "4", 32768).start > blocks[-1].start


def test_free_port_skips_a_port_in_use(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        busy = held.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        monkeypatch.setattr(ports, "_next", iter([busy, busy, free]))
        assert ports.free_port() == free


def test_free_port_gives_a_bindable_port_of_this_workers_block(monkeypatch):
    monkeypatch.setattr(ports, "_next", None)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    block = ports.worker_block("gw1", "2", max(ports.ephemeral_start(), ports.LOWEST + 4096))
    picked = [ports.free_port() for _ in range(3)]
    assert all(p in block for p in picked) and len(set(picked)) == 3
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", picked[-1]))

"""The batching engine alone, with a stand-in encoder: concurrency, pausing, index swaps, limits."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from test_service_support import world  # noqa: F401  (a fixture)


def _index(world, artifact, generation: int):
    from service.artifact import load_artifact

    return load_artifact(artifact, expected_fingerprint=world.fingerprint, embedding_dim=32, generation=generation)


def _engine(world, encode, **overrides):
    from service.engine import Engine
    from service.metrics import Metrics

    options = dict(metrics=Metrics(), workers=2, threads_per_worker=1, max_batch_size=4, max_batch_wait_ms=0,
                   queue_size=8, request_timeout_s=10)
    options.update(overrides)
    engine = Engine(encode, _index(world, world.artifact_a, 1), **options)
    engine.start()
    return engine


def _unit_rows(images: torch.Tensor) -> tuple[np.ndarray, None]:
    """Stands in for the ground branch: unit descriptors, no orientation columns."""
    rows = np.random.default_rng(int(images.sum())).standard_normal((len(images), 32)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True), None


def _images(n: int = 1):
    return lambda: (torch.zeros(n, 3, 32, 128, dtype=torch.uint8), np.ones((n, 128), bool))


def test_two_executor_threads_compute_two_batches_at_once(world):
    both_inside = threading.Barrier(2, timeout=10)
    threads = set()

    def encode(images):
        threads.add(threading.current_thread().name)
        both_inside.wait()  # breaks (and the batch fails) unless two batches overlap
        return _unit_rows(images)

    engine = _engine(world, encode, max_batch_size=1)

    async def two():
        return await asyncio.gather(*(engine.localize(_images(), n=1, k=3) for _ in range(2)))

    try:
        results = asyncio.run(two())
    finally:
        engine.stop()
    assert [r.batch_size for r in results] == [1, 1] and len(threads) == 2
    assert all(len(r.answers[0].matches) == 3 for r in results)


def test_a_batch_is_answered_by_one_index_generation_while_the_next_sees_the_new_one(world):
    inside, go_on = threading.Event(), threading.Event()

    def encode(images):
        inside.set()
        go_on.wait(10)
        return _unit_rows(images)

    engine = _engine(world, encode, workers=1)

    async def scenario():
        first = asyncio.ensure_future(engine.localize(_images(2), n=2, k=100))
        await asyncio.to_thread(inside.wait, 10)
        engine.index = _index(world, world.artifact_b, 2)  # a reload while the batch is encoding
        go_on.set()
        return await first, await engine.localize(_images(), n=1, k=100)

    try:
        before, after = asyncio.run(scenario())
    finally:
        engine.stop()
    assert before.index.generation == 1 and after.index.generation == 2
    assert all(m.tile_id.startswith("a") for answer in before.answers for m in answer.matches)  # 24 a-tiles
    assert len(before.answers[0].matches) == 24 and len(after.answers[0].matches) == 16


def test_the_queue_counts_images_and_refuses_beyond_it_while_paused_jobs_wait(world):
    from service.engine import Overloaded

    engine = _engine(world, _unit_rows, queue_size=5)

    async def scenario():
        with engine.paused():
            waiting = [asyncio.ensure_future(engine.localize(_images(2), n=2, k=1)) for _ in range(2)]
            await asyncio.sleep(0.05)
            assert engine.depth == 4
            with pytest.raises(Overloaded):
                await engine.localize(_images(2), n=2, k=1)  # 6 > 5 images
            await asyncio.sleep(0.1)
            assert not any(w.done() for w in waiting)  # nothing computed while paused
        return await asyncio.gather(*waiting)

    try:
        results = asyncio.run(scenario())
    finally:
        engine.stop()
    assert [r.batch_size for r in results] == [4, 4]  # both jobs in one forward
    assert engine.depth == 0


def test_a_failing_decode_fails_its_job_and_a_failing_forward_its_batch_but_no_worker(world):
    from service.engine import NotReady

    calls = []

    def encode(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return _unit_rows(images)

    def bad():
        raise ValueError("truncated")

    engine = _engine(world, encode, workers=1)

    async def scenario():
        with pytest.raises(RuntimeError, match="device lost"):
            await engine.localize(_images(), n=1, k=1)
        with engine.paused():
            jobs = [asyncio.ensure_future(engine.localize(fn, n=1, k=1)) for fn in (_images(), bad, _images())]
            await asyncio.sleep(0.05)
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        good, failed, also_good = asyncio.run(scenario())
    finally:
        engine.stop()
    assert isinstance(failed, ValueError) and good.batch_size == also_good.batch_size == 2
    assert calls == [1, 2]

    async def after_stop():
        await engine.localize(_images(), n=1, k=1)

    with pytest.raises(NotReady):
        asyncio.run(after_stop())

"""The batching engine alone, with a stand-in encoder: concurrency, pausing, index swaps, limits."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading

import numpy as np
import pytest
import torch

from test_service_support import world  # noqa: F401  (a fixture)

pytestmark = pytest.mark.cross_cpu  # compares numbers of two paths: `make test` reruns it with other CPU kernels


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


def _unit_rows(images: torch.Tensor, view_phases: int = 0, photos: np.ndarray | None = None) -> tuple[np.ndarray, None]:
    """Stands in for the ground branch: unit descriptors, no orientation columns."""
    rows = np.random.default_rng(int(images.sum())).standard_normal((len(images), 32)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True), None


def _images(n: int = 1):
    return lambda: (torch.zeros(n, 3, 32, 128, dtype=torch.uint8), np.ones((n, 128), bool))


def _in_one_batch(engine, *jobs: dict) -> list:
    """Queue ``engine.localize(**job)`` for each job while the engine is paused, so that they meet in one
    micro-batch; their results or exceptions, in order."""
    async def scenario():
        with engine.paused():
            futures = [asyncio.ensure_future(engine.localize(**job)) for job in jobs]
            await asyncio.sleep(0.05)
        return await asyncio.gather(*futures, return_exceptions=True)

    return asyncio.run(scenario())


def test_two_executor_threads_compute_two_batches_at_once(world):
    both_inside = threading.Barrier(2, timeout=10)
    threads = set()

    def encode(images, view_phases, photos=None):
        threads.add(threading.current_thread().name)
        both_inside.wait()  # breaks (and the batch fails) unless two batches overlap
        return _unit_rows(images, view_phases)

    engine = _engine(world, encode, max_batch_size=1)

    async def two():
        return await asyncio.gather(*(engine.localize(_images(), n=1, k=3) for _ in range(2)))

    try:
        results = asyncio.run(two())
    finally:
        engine.stop()
    assert [r.batch_size for r in results] == [1, 1] and len(threads) == 2
    assert all(len(r.answers[0].matches) == 3 for r in results)


def test_a_lone_image_runs_on_every_core_and_batches_side_by_side_on_their_share(world):
    """A one-image batch taken when nothing else is queued or computing runs with every executor
    thread's torch threads (the others wait for it); batches taken together run one-thread each."""
    seen = []
    both_inside = threading.Barrier(2, timeout=10)

    def encode(images, view_phases, photos=None):
        seen.append(torch.get_num_threads())
        if len(seen) > 1:
            both_inside.wait()  # the two queued together overlap: neither ran wide
        return _unit_rows(images, view_phases)

    engine = _engine(world, encode, max_batch_size=1, lone_threads=2)
    try:
        alone = asyncio.run(engine.localize(_images(), n=1, k=1))
        together = _in_one_batch(engine, *(dict(decode=_images(), n=1, k=1) for _ in range(2)))
    finally:
        engine.stop()
    assert alone.batch_size == 1 and all(r.batch_size == 1 for r in together)
    assert seen == [2, 1, 1]
    engine = _engine(world, encode, max_batch_size=1)  # lone_threads unset (e.g. GEOLOC_TORCH_THREADS given)
    try:
        seen.clear()
        asyncio.run(engine.localize(_images(), n=1, k=1))
    finally:
        engine.stop()
    assert seen == [1]


def test_after_a_job_waited_for_a_wide_batch_none_runs_wide_for_the_cooldown(world):
    """A request arriving during a wide forward waits for it; for wide_cooldown_s after that, lone
    images run on their own lane's share (the next client is likely to come soon), then wide again."""
    seen = []
    first_inside, release = threading.Event(), threading.Event()

    def encode(images, view_phases, photos=None):
        seen.append(torch.get_num_threads())
        if len(seen) == 1:
            first_inside.set()
            release.wait(10)
        return _unit_rows(images, view_phases)

    engine = _engine(world, encode, max_batch_size=1, lone_threads=2, wide_cooldown_s=5.0)  # room for a slow box

    async def scenario():
        first = asyncio.ensure_future(engine.localize(_images(), n=1, k=1))
        await asyncio.to_thread(first_inside.wait, 10)
        second = asyncio.ensure_future(engine.localize(_images(), n=1, k=1))  # arrives during the wide one
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(first, second)
        await engine.localize(_images(), n=1, k=1)  # within the cooldown: narrow
        await asyncio.sleep(5.1)
        await engine.localize(_images(), n=1, k=1)  # after it: wide again

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()
    assert seen == [2, 1, 1, 2]


def test_an_error_before_a_batch_computes_fails_that_batch_only(world, monkeypatch):
    """Thread 0 failing to set its thread count (or anything else before the forward) fails the batch it
    took; its bookkeeping is undone, so the next request is answered and the engine still runs."""
    import service.engine as engine_module

    real, calls = torch.set_num_threads, []

    def set_num_threads(n):
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("no threads today")
        real(n)

    monkeypatch.setattr(engine_module.torch, "set_num_threads", set_num_threads)
    engine = _engine(world, _unit_rows, max_batch_size=1, lone_threads=2)
    try:
        with pytest.raises(RuntimeError, match="no threads today"):
            asyncio.run(engine.localize(_images(), n=1, k=1))
        assert len(asyncio.run(engine.localize(_images(), n=1, k=2)).answers[0].matches) == 2
        assert engine.running
    finally:
        engine.stop()
    assert not engine.running


def test_a_batch_is_answered_by_one_index_generation_while_the_next_sees_the_new_one(world):
    inside, go_on = threading.Event(), threading.Event()

    def encode(images, view_phases, photos=None):
        inside.set()
        go_on.wait(10)
        return _unit_rows(images, view_phases)

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


def test_column_features_are_asked_for_only_where_the_served_index_holds_its_own_at_its_phases(world):
    asked = []

    def encode(images, view_phases, photos=None):
        asked.append(view_phases)
        return _unit_rows(images, view_phases)

    engine = _engine(world, encode, workers=1)
    plain = engine.index
    oriented = dataclasses.replace(plain, orientation=np.zeros((plain.count, 4, 8), np.float16))
    phased = dataclasses.replace(plain, orientation=np.zeros((plain.count, 4, 4, 8), np.float16))

    async def one():
        return await engine.localize(_images(), n=1, k=3)

    try:
        asyncio.run(one())
        engine.index = oriented
        asyncio.run(one())
        engine.index = phased  # index_build build --tile-phases 4: the views encoded at 4 phases too
        asyncio.run(one())
        engine.index = plain
        asyncio.run(one())
    finally:
        engine.stop()
    assert asked == [0, 1, 4, 0]
    assert (plain.tile_phases, oriented.tile_phases, phased.tile_phases) == (1, 1, 4)
    engine = _engine(world, encode, workers=1, view_phases=2)  # GEOLOC_VIEW_PHASES: told, not the index's
    asked.clear()
    try:
        asyncio.run(one())
        engine.index = phased
        asyncio.run(one())
    finally:
        engine.stop()
    assert asked == [0, 2]
    assert [engine.view_phases_for(index) for index in (plain, oriented, phased)] == [0, 2, 2]


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

    def encode(images, view_phases, photos=None):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return _unit_rows(images, view_phases)

    def bad():
        raise ValueError("truncated")

    engine = _engine(world, encode, workers=1)

    async def lost():
        with pytest.raises(RuntimeError, match="device lost"):
            await engine.localize(_images(), n=1, k=1)

    try:
        asyncio.run(lost())
        good, failed, also_good = _in_one_batch(
            engine, *(dict(decode=fn, n=1, k=1) for fn in (_images(), bad, _images())))
    finally:
        engine.stop()
    assert isinstance(failed, ValueError) and good.batch_size == also_good.batch_size == 2
    assert calls == [1, 2]

    async def after_stop():
        await engine.localize(_images(), n=1, k=1)

    with pytest.raises(NotReady):
        asyncio.run(after_stop())


def test_one_images_failing_answer_fails_its_job_alone(world, monkeypatch):
    import service.artifact as artifact
    from service.artifact import Near

    real = artifact.rows_within

    def rows_within(lat, lon, at_lat, at_lon, radius_m):
        if radius_m == 13.0:
            raise RuntimeError("restricted search failed")
        return real(lat, lon, at_lat, at_lon, radius_m)

    monkeypatch.setattr(artifact, "rows_within", rows_within)
    engine = _engine(world, _unit_rows, workers=1)
    priors = (None, [Near(46.5, 7.5, 13.0, "parameter")], [Near(46.5, 7.5, 5000.0, "parameter")])

    try:
        free, failed, near = _in_one_batch(
            engine, *(dict(decode=_images(), n=1, k=3, near=near) for near in priors))
    finally:
        engine.stop()
    assert isinstance(failed, RuntimeError)
    assert free.batch_size == near.batch_size == 3  # one forward, one search: only its own answer failed
    assert len(free.answers[0].matches) == 3 and near.answers[0].within > 0


def test_each_image_says_how_far_its_given_heading_is_trusted_to_the_index(world, monkeypatch):
    """Batched with others, a view placed at a given heading is still answered as one (tile phases: phase 0,
    the alignment within its own reach)."""
    import service.artifact as artifact

    seen_within = []
    real = artifact.ServedIndex.answer

    def answer(self, vectors, columns, seen, ks, near=None, heading_within=None):
        seen_within.append(list(heading_within))
        return real(self, vectors, columns, seen, ks, near, heading_within)

    monkeypatch.setattr(artifact.ServedIndex, "answer", answer)
    engine = _engine(world, _unit_rows, workers=1)
    try:
        _in_one_batch(engine, dict(decode=_images(), n=1, k=3, heading_within=[15.0]),
                      dict(decode=_images(2), n=2, k=3), dict(decode=_images(), n=1, k=3, heading_within=[None]))
    finally:
        engine.stop()
    assert seen_within == [[15.0, None, None, None]]


def test_each_image_says_whether_it_is_a_photo_to_the_encoder(world):
    """Batched with others, a phone photo's columns still go through the head's photo map, and only its own."""
    flags = []

    def encode(images, view_phases, photos=None):
        flags.append(photos.tolist())
        return _unit_rows(images, view_phases)

    engine = _engine(world, encode, workers=1, max_batch_size=8)
    try:
        _in_one_batch(engine, dict(decode=_images(), n=1, k=3, photos=[True]), dict(decode=_images(2), n=2, k=3),
                      dict(decode=_images(2), n=2, k=3, photos=[False, True]))
    finally:
        engine.stop()
    assert flags == [[True, False, False, False, True]]


def test_a_job_given_up_leaves_the_queue_at_once_with_its_images_and_upload_bytes(world):
    import gc
    import weakref

    from service.engine import ClientGone, ResultTimeout
    from test_service_support import metric_value

    engine = _engine(world, _unit_rows, queue_size=2, request_timeout_s=0.2)

    class Upload:  # stands in for the request's uploads that a job's decode holds
        def __call__(self):
            return _images(2)()

    async def gone():
        return None  # the client has disconnected

    async def scenario():
        with engine.paused():  # no worker reaches the queue
            upload = Upload()
            held = weakref.ref(upload)
            with pytest.raises(ResultTimeout) as timed_out:
                await engine.localize(upload, n=2, k=1)
            timed_out.value.__traceback__ = None  # its frames name the upload; a server drops them once it answers
            del upload, timed_out
            gc.collect()
            assert engine.depth == 0 and held() is None
            engine.request_timeout_s = 30.0  # what follows must not race the short timeout on a loaded machine
            with pytest.raises(ClientGone):
                await engine.localize(_images(2), n=2, k=1, disconnected=gone)
            assert engine.depth == 0
            waiting = asyncio.ensure_future(engine.localize(_images(2), n=2, k=1))  # the queue has room again
            await asyncio.sleep(0.05)
            assert engine.depth == 2
        return await waiting

    try:
        result = asyncio.run(scenario())
    finally:
        engine.stop()
    assert result.batch_size == 2
    text = engine.metrics.exposition().decode()
    assert metric_value(text, "geoloc_dropped_images_total", reason="timeout") == 2
    assert metric_value(text, "geoloc_dropped_images_total", reason="client_disconnected") == 2


class _ConcurrencyProbe:
    """A FAISS index stand-in that records how many threads search it at once."""

    def __init__(self, index, wait_s: float = 1.0) -> None:
        self.real, self.inside, self.most, self.wait_s = index, 0, 0, wait_s
        self.d, self.ntotal = index.d, index.ntotal
        self._lock, self._both = threading.Lock(), threading.Event()

    def search(self, x, k, **kwargs):
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            if self.inside == 2:
                self._both.set()
        try:
            self._both.wait(self.wait_s)  # the other thread comes in meanwhile unless the searches take turns
            return self.real.search(x, k, **kwargs)
        finally:
            with self._lock:
                self.inside -= 1


def _line_artifact(root, angles: np.ndarray, tiles_csv: str, dim: int = 0, **manifest):
    """A flat artifact whose row i is at ``angles[i]`` from the query (1, 0, ..., 0), loaded as the
    service loads one; ``tiles_csv`` its tiles.csv."""
    import faiss

    from model import index_artifact as ia
    from service.artifact import load_artifact

    count = len(angles)
    dim = dim or count + 1
    vectors = np.zeros((count, dim), np.float32)
    vectors[:, 0], vectors[np.arange(count), np.arange(count) + 1] = np.cos(angles), np.sin(angles)
    flat = faiss.IndexFlatIP(dim)
    root.mkdir()
    if manifest.get("centres_m"):  # views: the index holds each tile's own row, every row's vector in a shard
        lines = [line.split(",") for line in tiles_csv.splitlines()[1:]]
        own = ia.tile_rows_of([line[0] for line in lines], [line[4] for line in lines]) == np.arange(count)
        flat.add(vectors[own])
        (root / "vectors").mkdir()
        np.save(root / "vectors" / "shard-00000.npy", vectors)
        manifest.update(index_rows=int(own.sum()), shards=[{"file": "vectors/shard-00000.npy", "rows": count}])
    else:
        flat.add(vectors)
    faiss.write_index(flat, str(root / ia.INDEX_FILE))
    (root / ia.TILES_FILE).write_text(tiles_csv)
    (root / ia.MANIFEST_FILE).write_text(json.dumps({
        "format_version": 1, "model_fingerprint": "f" * 16, "embedding_dim": dim, "metric": "inner_product",
        "count": count, "index_type": "flat", "built_at": "2026-12-03T00:00:00Z", **manifest}))
    return load_artifact(root, expected_fingerprint="f" * 16, embedding_dim=dim, generation=1)


def test_an_answer_does_not_depend_on_what_its_batch_mates_ask_for(tmp_path):
    """60 tiles 5 m apart on a line, the query most like tile 0 and less like each next one: among the 20
    candidates a query with k=1 looks at, none is 150 m or more from the best (no competitor, no margin);
    a batch-mate asking for k=40 must not make it look further."""
    count, dim = 60, 64
    index = _line_artifact(tmp_path / "line", 0.01 * np.arange(count), "tile_id,lat,lon,source\n" + "".join(
        f"t{i},{47 + i * 5 / 111_195:.8f},8.0,\n" for i in range(count)), dim)
    query = np.zeros((2, dim), np.float32)
    query[:, 0] = 1.0
    seen = np.ones((2, 128), bool)
    alone = index.answer(query[:1], None, seen[:1], [1])[0]
    beside_a_k40 = index.answer(query, None, seen, [1, 40])
    assert alone.margin is None and alone.competitor is None
    assert beside_a_k40[0] == alone
    assert beside_a_k40[1].competitor == "t31" and len(beside_a_k40[1].matches) == 40  # t30: 150 m less a hair


def test_tiles_stored_at_phases_meet_a_searched_heading_at_every_phase_and_a_given_one_within_its_reach(tmp_path):
    """index_build build --tile-phases 4: two tiles 1 km apart, the view's columns those of tile b at phase 2
    (a turn of half a column) and of tile a at phase 0; b is the better by descriptor. A view whose heading is
    searched meets b at phase 2 (heading -11.25 degrees); one placed at a given heading trusted to 10 degrees
    meets the tiles only at the phases within 10 degrees of it (0 and +-5.6) and finds a; trusted to 15, b
    again."""
    from model.orientation import RERANK_WEIGHT

    width, dim_c, phases = 16, 8, 4
    rng = np.random.default_rng(0)
    def unit(*shape):
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    view = unit(width, dim_c).astype(np.float32)
    columns = unit(2, phases, width, dim_c).astype(np.float16)
    columns[0, 0], columns[1, 2] = view, view
    root = tmp_path / "phased"
    _line_artifact(root, np.array([0.2, 0.1]), "tile_id,lat,lon,source\na,47.0,8.0,\nb,47.009,8.0,\n", 32)
    np.save(root / "orientation.npy", columns.reshape(2, phases * width, dim_c))  # as index_build writes it
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["orientation"] = {"file": "orientation.npy", "columns": phases * width, "dim": dim_c, "dtype": "float16",
                               "phases": phases}
    (root / "manifest.json").write_text(json.dumps(manifest))
    from service.artifact import load_artifact

    index = load_artifact(root, expected_fingerprint="f" * 16, embedding_dim=32, generation=1,
                          column_shape=(width, dim_c))
    assert index.orientation.shape == (2, phases, width, dim_c)
    query = np.zeros((3, 32), np.float32)
    query[:, 0] = 1.0
    searched, given, loose = index.answer(query, np.stack([view, view, view]), np.ones((3, 256), bool), [2, 2, 2],
                                          heading_within=[None, 10.0, 15.0])
    assert [m.tile_id for m in searched.matches] == ["b", "a"] and searched.matches[0].heading_deg == pytest.approx(
        360 - 11.25, abs=0.5)
    assert searched.matches[0].score == pytest.approx((1 - RERANK_WEIGHT) * np.cos(0.1) + RERANK_WEIGHT, abs=1e-3)
    assert given.matches[0].tile_id == "a"
    assert min(given.matches[0].heading_deg % 360, -given.matches[0].heading_deg % 360) < 0.5  # north
    assert loose.matches[0].tile_id == "b" and loose.matches[0].heading_deg == pytest.approx(360 - 11.25, abs=0.5)
    # the model's column shape is each phase's: one of another width is refused at load
    with pytest.raises(Exception, match="at each of 4 phases"):
        load_artifact(root, expected_fingerprint="f" * 16, embedding_dim=32, generation=1, column_shape=(8, dim_c))


def test_stored_columns_are_read_as_float32_exactly_from_a_read_only_memory_map(tmp_path):
    import warnings

    from service.artifact import rows_as_float32

    store = np.random.default_rng(2).standard_normal((50, 4, 16, 8)).astype(np.float16)
    rows = np.array([7, 3, 49, 3, 0])
    for name, stored in (("native", store), ("big_endian", store.astype(">f2"))):  # torch reads native order only
        np.save(tmp_path / f"{name}.npy", stored)
        held = np.load(tmp_path / f"{name}.npy", mmap_mode="r")  # as model.index_artifact.read_orientation does
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns of a non-writable array: it must get a copy
            got = rows_as_float32(held, rows)
        assert got.dtype == np.float32 and np.array_equal(got, store[rows].astype(np.float32))
        assert rows_as_float32(held, np.array([], np.int64)).shape == (0, 4, 16, 8)


def test_a_view_of_given_heading_re_ranks_more_candidates_than_one_whose_heading_is_searched(tmp_path):
    """900 tiles, each a little less like the query by descriptor than the one before; the view's columns are
    those of tile 500 only. Searched all round, the view re-ranks the best RERANK_CANDIDATES (200) and cannot reach
    it; placed at a given heading, aligned near it alone, it re-ranks RERANK_CANDIDATES_GIVEN (800) and finds it,
    in the same batch as the searched one."""
    from model.orientation import RERANK_CANDIDATES, RERANK_CANDIDATES_GIVEN

    assert RERANK_CANDIDATES < 500 < RERANK_CANDIDATES_GIVEN < 900
    count, width, dim_c = 900, 16, 8
    dim = count + 1  # _line_artifact's: a dimension of its own for each row
    rng = np.random.default_rng(1)
    columns = rng.standard_normal((count, width, dim_c))
    columns = (columns / np.linalg.norm(columns, axis=-1, keepdims=True)).astype(np.float16)
    root = tmp_path / "many"
    _line_artifact(root, 0.2 + 0.001 * np.arange(count), "tile_id,lat,lon,source\n" + "".join(
        f"t{i},{47 + i * 0.01:.4f},8.0,\n" for i in range(count)))
    np.save(root / "orientation.npy", columns)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["orientation"] = {"file": "orientation.npy", "columns": width, "dim": dim_c, "dtype": "float16"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    from service.artifact import load_artifact

    index = load_artifact(root, expected_fingerprint="f" * 16, embedding_dim=dim, generation=1,
                          column_shape=(width, dim_c))
    query = np.zeros((4, dim), np.float32)
    query[:, 0] = 1.0
    view = columns[500].astype(np.float32)
    searched, given, rough, loose = index.answer(query, np.stack([view] * 4), np.ones((4, 256), bool), [3] * 4,
                                                 heading_within=[None, 10.0, 30.0, 45.0])
    assert searched.matches[0].tile_id != "t500" and given.matches[0].tile_id == "t500"
    assert rough.matches[0].tile_id == "t500"  # a rough compass (GIVEN_REACH_MAX_DEG) still looks at 800
    assert loose.matches[0].tile_id != "t500"  # wider: nearly a search, as many candidates as one
    alone = index.answer(query[:1], view[None], np.ones((1, 256), bool), [3])[0]
    assert alone == searched  # each row looks at as many candidates as it would alone


@pytest.mark.parametrize("gpu", [False, True])
def test_a_faiss_gpu_index_is_searched_by_one_thread_at_a_time(world, monkeypatch, gpu):
    import service.artifact as artifact

    monkeypatch.setattr(artifact, "_to_gpu", lambda index, device: (_ConcurrencyProbe(index), object()))
    index = artifact.load_artifact(world.artifact_a, expected_fingerprint=world.fingerprint, embedding_dim=32,
                                   generation=1, gpu=0 if gpu else None)
    if not gpu:
        index = dataclasses.replace(index, index=_ConcurrencyProbe(index.index, wait_s=10.0))  # both come: no wait
    vectors, _ = _unit_rows(torch.ones(2, 3, 4, 4))
    start = threading.Barrier(2, timeout=10)

    def search():
        start.wait()
        return index.answer(vectors, None, np.ones((2, 128), bool), [3, 3])

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert index.index.most == (1 if gpu else 2)  # a CPU index is searched by both at once


def test_the_service_modules_import_one_another_without_a_cycle():
    import ast
    from pathlib import Path

    service = Path(__file__).resolve().parents[1] / "service"
    imports = {}
    for path in service.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("service."):
                names.add(node.module.split(".")[1])
        imports[path.stem] = names

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in imports.get(start, ()))

    assert [m for m in imports if reaches(m, m)] == []


def test_views_between_tile_centres_answer_each_tile_once_and_place_the_camera(tmp_path):
    """Six tiles 50 m apart on a line north, each with views 10 m north and south of its centre
    (index_build tile --centres-m); the query is most like the view 10 m south of t2 and less like each
    view the farther it is from there. The index searches the tiles by their own rows; the views of the
    tiles it finds are the candidates. The answer names tiles, each once at its best view's score and at
    its own centre; the position is the best view's."""
    from model.metrics import haversine_m
    from service.artifact import Near

    rows = [(f"t{t}" + ("" if dy == 0 else f".e0n{dy}"), 50.0 * t + dy, f"t{t}") for t in range(6)
            for dy in (0, 10, -10)]
    angles = np.minimum(0.02 * np.abs(np.array([y for _, y, _ in rows]) - 90.0), 3.0)
    index = _line_artifact(tmp_path / "views", angles, "tile_id,lat,lon,source,tile\n" + "".join(
        f"{tid},{47 + y / 111_195:.8f},8.0,,{tile}\n" for tid, y, tile in rows),
        tile_m=100.0, stride_m=50.0, centres_m=10.0)
    dim = len(rows) + 1
    assert index.views_per_tile == 3 and index.index.ntotal == 6 and index.count == 18
    query = np.zeros((1, dim), np.float32)
    query[:, 0] = 1.0
    answer = index.answer(query, None, np.ones((1, 128), bool), [3])[0]
    assert [m.tile_id for m in answer.matches] == ["t2", "t1", "t3"]
    assert answer.matches[0].score == pytest.approx(1.0) and answer.matches[0].lat == pytest.approx(47 + 100 / 111_195)
    assert answer.matches[1].score == pytest.approx(np.cos(0.02 * 30))  # t1's best view, 10 m north of it
    assert answer.competitor == "t5"  # a view of t5 is the best match 150 m or more away: named as its tile
    lat, lon, _ = answer.position
    assert haversine_m(lat, lon, 47 + 90 / 111_195, 8.0) < 2.0  # at the best view, not t2's centre 10 m away
    # a prior counts the tiles whose centres lie within its radius, and answers the same way from their views
    near = Near(lat=47 + 100 / 111_195, lon=8.0, radius_m=55.0, source="parameter")  # t1 .. t3
    within = index.answer(query, None, np.ones((1, 128), bool), [3], near=[near])[0]
    assert within.within == 3 and [m.tile_id for m in within.matches] == ["t2", "t1", "t3"]
    near = dataclasses.replace(near, radius_m=45.0)  # t1's view 10 m north of it is within 45 m, t1 is not
    within = index.answer(query, None, np.ones((1, 128), bool), [3], near=[near])[0]
    assert within.within == 1 and [m.tile_id for m in within.matches] == ["t2"]


def test_with_views_the_index_finds_tiles_by_their_own_rows_and_only_their_views_compete(tmp_path, monkeypatch):
    """Three tiles, each with a view 10 m north of its centre. t2's view is the query's best row, but t2's
    own row its worst: found among all tiles it wins; when the search keeps fewer tiles than there are, only
    the views of the tiles it found by their own rows compete (t1's own row best, then t0's)."""
    import service.artifact as artifact

    angles = np.array([0.5, 0.6, 0.3, 0.35, 0.9, 0.0])  # t0, t0's view, t1, t1's view, t2, t2's view
    index = _line_artifact(tmp_path / "views", angles, "tile_id,lat,lon,source,tile\n" + "".join(
        f"t{t}{suffix},{47 + (50 * t + dy) / 111_195:.8f},8.0,,t{t}\n" for t in range(3)
        for suffix, dy in (("", 0), (".e0n10", 10))), tile_m=100.0, stride_m=50.0, centres_m=10.0)
    assert index.index.ntotal == 3 and index.count == 6
    query = np.zeros((1, 7), np.float32)
    query[:, 0] = 1.0
    seen = np.ones((1, 128), bool)
    best = lambda k: [m.tile_id for m in index.answer(query, None, seen, [k])[0].matches]  # noqa: E731
    assert best(3) == ["t2", "t1", "t0"]
    monkeypatch.setattr(artifact, "VIEW_TILES", 1)
    assert best(1) == ["t1"]
    assert best(2) == ["t1", "t0"]
    assert index.answer(query, None, seen, [1])[0].matches[0].score == pytest.approx(np.cos(0.3))


def test_the_service_imports_torch_before_faiss():
    """torch's OpenMP runtime must be loaded first, or faiss keeps its own and a search's spinning threads
    slow the next forward (c=1 +1.5-3 ms on 2 cores: bench/RESULTS.md); sys.modules keeps import order."""
    import subprocess
    import sys

    code = "import sys, service.app; m = list(sys.modules); print(m.index('torch') < m.index('faiss'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "True"

"""service.encoder_process: an encoder worker's child process, driven directly (no HTTP)."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_service_support import world  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]


def _spec(world, **overrides):
    from service.encoder_process import ProcessSpec

    base = dict(checkpoint=str(world.checkpoint), fingerprint=world.fingerprint, threads=1,
                cpu_set=None, nice=0, max_batch_size=4)
    base.update(overrides)
    return ProcessSpec(**base)


@pytest.fixture()
def encoder(world):
    from service.encoder_process import EncoderProcess

    process = EncoderProcess(_spec(world), "test encoder")
    process.start()
    yield process
    process.stop()


def _decode(world):
    from service.localize import decode_uploads
    from service.uploads import ImageLimits, UploadedFile
    from model import load_checkpoint

    config = load_checkpoint(world.checkpoint).config
    limits = ImageLimits(40_000_000, 16, 10.0)
    return functools.partial(decode_uploads, [UploadedFile(0, "p.jpg", "image/jpeg", world.pano)],
                             limits, config), config


def test_a_batch_in_the_process_matches_the_same_batch_in_this_one(world, encoder):
    import torch
    from model import load_checkpoint
    from model.encode import prepare_for_inference
    from service.artifact import load_artifact
    from service.engine import encode_uint8

    loaded = load_artifact(world.artifact_a, expected_fingerprint=world.fingerprint,
                           embedding_dim=load_checkpoint(world.checkpoint).embedding_dim)
    encoder.control("install", 7, str(loaded.path), loaded.signature)
    decode, config = _decode(world)
    images = _decode(world)[0]()  # (decoding empties the upload it read)
    truncated = functools.partial(decode.func, [type(decode.args[0][0])(
        1, "t.jpg", "image/jpeg", world.pano[: len(world.pano) // 2])], *decode.args[1:])
    outcome = encoder.request("batch", 7, 3, [(None, decode), (None, truncated),
                                               (images.numpy(), None)])
    assert outcome.errors[0] is None and outcome.errors[2] is None
    assert outcome.errors[1].status == 400 and outcome.errors[1].code == "undecodable_image"
    assert outcome.scores.shape == (2, 3) and outcome.decode_ms[0] > 0

    net = prepare_for_inference(load_checkpoint(world.checkpoint), "cpu")
    torch.set_num_threads(1)
    scores, rows = loaded.index.search(encode_uint8(net, torch.cat([images, images]),
                                                    torch.device("cpu"), 4), 3)
    assert (outcome.rows == rows).all()
    np.testing.assert_allclose(outcome.scores, scores, atol=1e-5)

    encoder.control("drop", 7)
    with pytest.raises(KeyError):  # an index generation it does not hold is an error, not a crash
        encoder.request("batch", 7, 3, [(None, decode)])
    assert encoder.running


def test_an_unloadable_or_changed_checkpoint_fails_the_start_with_its_reason(world, tmp_path):
    from service.encoder_process import EncoderProcess

    missing = EncoderProcess(_spec(world, checkpoint=str(tmp_path / "gone.safetensors")), "e")
    with pytest.raises(Exception, match="gone.safetensors"):
        missing.start()
    missing.stop()
    assert not missing.running
    changed = EncoderProcess(_spec(world, checkpoint=str(world.other_checkpoint)), "e")
    with pytest.raises(RuntimeError, match="changed on disk"):
        changed.start()
    changed.stop()


def test_an_artifact_built_for_another_model_is_refused_by_the_process(world, encoder):
    from service.artifact import FingerprintMismatch, Signature

    with pytest.raises(FingerprintMismatch):
        encoder.control("install", 1, str(world.artifact_other), Signature.of(world.artifact_other))
    assert encoder.running


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_process_runs_on_its_cpus_with_its_threads(world):
    from service.encoder_process import EncoderProcess

    cpus = sorted(os.sched_getaffinity(0))[:2]
    process = EncoderProcess(_spec(world, cpu_set=frozenset(cpus[1:]), threads=1), "e")
    process.start()
    try:
        assert process.request("placement") == (cpus[1:], 1)
        assert os.sched_getaffinity(process.pid) == set(cpus[1:])
    finally:
        process.stop()


def test_the_process_ends_when_the_service_process_is_killed(world):
    script = (
        "import sys, time\n"
        "from service.encoder_process import EncoderProcess, ProcessSpec\n"
        f"p = EncoderProcess(ProcessSpec({str(world.checkpoint)!r}, {world.fingerprint!r}, 1, None,"
        " 0, 4), 'e')\n"
        "p.start()\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            # an orphan is reaped by init; until then a zombie counts as ended
            if Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        assert not Path(f"/proc/{child}").exists() or \
            Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    finally:
        parent.kill()
        parent.wait()


def test_stop_is_idempotent_and_a_stopped_handle_refuses_work(world, encoder):
    from service.encoder_process import EncoderProcessDied

    pid = encoder.pid
    encoder.stop()
    encoder.stop()
    assert not encoder.running and not Path(f"/proc/{pid}").exists()
    with pytest.raises(EncoderProcessDied, match="not running"):
        encoder.control("drop", 1)


def test_probably_up_asks_the_os_at_most_once_per_recheck_interval(world, encoder):
    from service.encoder_process import ALIVE_RECHECK_S

    polls = []
    real_poll = encoder._proc.poll
    encoder._proc.poll = lambda: polls.append(1) or real_poll()
    assert not encoder.probably_up and not polls  # started, but not serving yet
    encoder.serving = True
    assert all(encoder.probably_up for _ in range(100))
    assert len(polls) == 1  # every request asks; the OS is asked once per interval
    encoder._proc.kill()
    encoder._proc.wait(10)
    time.sleep(ALIVE_RECHECK_S)
    assert not encoder.probably_up and not encoder.probably_up
    assert len(polls) >= 3  # "dead" is not kept: a restarted process counts at once


def test_a_process_that_does_not_answer_in_time_is_killed(world):
    from service.encoder_process import EncoderProcess, EncoderProcessDied

    process = EncoderProcess(_spec(world), "e", reply_timeout_s=1.0)
    process.start()  # (starting has a timeout of its own)
    try:
        pid = process.pid
        hang = functools.partial(time.sleep, 30)  # a "decode" that never ends in time
        started = time.monotonic()
        with pytest.raises(EncoderProcessDied, match="did not answer 'batch' within 1 s"):
            process.request("batch", 1, 1, [(None, hang)])
        assert time.monotonic() - started < 10
        assert process._proc.wait(10) == -signal.SIGKILL and not process.running
        assert pid == process.pid
    finally:
        process.stop()


def test_closing_while_another_thread_starts_the_process_ends_it_at_once(world):
    from service.encoder_process import EncoderProcess, EncoderProcessDied

    process = EncoderProcess(_spec(world), "e")
    errors = []

    def restart() -> None:  # what a worker's restart does: hold the lock through a slow start
        with process.lock:
            try:
                process.start()
            except EncoderProcessDied as exc:
                errors.append(exc)

    starter = threading.Thread(target=restart)
    starter.start()
    deadline = time.monotonic() + 10
    while process.pid is None and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    process.close()  # must not wait for the model to load: kills it
    starter.join(10)
    assert not starter.is_alive() and time.monotonic() - started < 5
    assert errors and not process.running
    with pytest.raises(EncoderProcessDied, match="closed"):
        process.start()

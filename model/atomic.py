"""Crash-safe writes of the tools' outputs, files and whole directories: each is written under a
temporary name beside its target, made durable (fsync) and renamed over it once complete, so that a
reader never sees half an output and a write that fails or is interrupted leaves the older one as it was.
index_build.fsutil builds its artifact writes on these."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# mkstemp makes files 0600; an output is meant to be shared (e.g. with a container's user)
FILE_MODE = _file_mode()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or creation inside ``path`` durable (a no-op where directories can not be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write ``path`` by calling ``write`` with the name of a temporary file beside it (its directory is
    made if missing), then renaming that file, synced to disk, to ``path`` with the ordinary permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


class OutputDirectoryError(OSError):
    """The temporary directory of an output can not be made (a path where nothing can be written)."""


@contextlib.contextmanager
def staged_directory(out_dir: str, error: Callable[[str], Exception] = OutputDirectoryError) -> Iterator["Staging"]:
    """Write a whole output directory or none of it: files go into ``staging.path`` (``.NAME.tmp-PID``
    beside ``out_dir``), ``staging.publish()`` renames it to ``out_dir`` (an existing one replaced only
    then, through ``.NAME.old-PID``); leaving the block without publishing removes it. The run holds
    ``.NAME.run-PID.lock`` (flock) meanwhile, which tells `tidy_leftovers` that it is alive. Where
    nothing can be written there, ``error(message)`` is raised (a tool's own error class)."""
    staging = Staging(os.path.abspath(out_dir), error=error)
    with _held_lock(staging.lock_path, error):
        _tidy_run(staging)  # an earlier run with our pid (a container's pid 1 again) that was killed
        try:
            os.makedirs(staging.path)
        except OSError as exc:
            raise error(f"can not write {staging.path}: {exc.strerror or exc}") from None
        try:
            yield staging
        finally:
            shutil.rmtree(staging.path, ignore_errors=True)  # once published, no longer there


class Staging:
    """The names a `staged_directory` run uses beside its output, and its publish step."""

    def __init__(self, out_dir: str, pid: int | None = None,
                 error: Callable[[str], Exception] = OutputDirectoryError) -> None:
        self.out_dir = out_dir
        self.error = error
        self.parent, self.name = os.path.split(out_dir)
        pid = os.getpid() if pid is None else pid
        self.path = os.path.join(self.parent, f".{self.name}.tmp-{pid}")
        self.old = os.path.join(self.parent, f".{self.name}.old-{pid}")
        self.lock_path = os.path.join(self.parent, f".{self.name}.run-{pid}.lock")

    def publish(self, replace: bool = True) -> None:
        """Rename the finished temporary directory to the output, replacing an old one only now (and
        only with ``replace``: a run that started when there was none must not replace another's)."""
        fsync_dir(self.path)
        if os.path.lexists(self.out_dir):
            if not replace:
                raise self.error(f"{self.out_dir} appeared while this run wrote it (another run?); nothing replaced")
            os.rename(self.out_dir, self.old)
            try:
                os.rename(self.path, self.out_dir)
            except BaseException:  # Ctrl-C or a failure between the two renames: the old output back
                if not os.path.lexists(self.out_dir):
                    os.rename(self.old, self.out_dir)
                raise
            _remove(self.old)
        else:
            os.rename(self.path, self.out_dir)
        fsync_dir(self.parent)


@contextlib.contextmanager
def _held_lock(path: str, error: Callable[[str], Exception]) -> Iterator[None]:
    """Hold the flock of ``path`` (made here) until the block ends, then remove it. A tidying run removes
    a lock file it finds free: one it removed just before we took it is made again."""
    while True:
        try:
            lock = open(path, "a")
        except OSError as exc:
            raise error(f"can not write {path}: {exc.strerror or exc}") from None
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: nobody finds it free
        lock.close()


def tidy_leftovers(out_dir: str, log: Callable[[str], object] = lambda message: None) -> None:
    """Tidy what `staged_directory` runs for ``out_dir`` that were killed outright (kill -9, a power cut)
    left beside it: their temporary directories are removed, and a previous output one was killed in the
    middle of replacing is put back. A run still writing, in another process, container or host, holds
    its lock and is left alone. Called before a tool looks whether ``out_dir`` exists."""
    staging = Staging(os.path.abspath(out_dir))
    pattern = re.compile(re.escape(f".{staging.name}.") + r"(?:(?:tmp|old)-([1-9][0-9]*)|run-([1-9][0-9]*)\.lock)")
    try:
        entries = sorted(os.listdir(staging.parent))
    except OSError:  # a directory that can be written but not listed: nothing to tidy that can be seen
        return
    pids = {int(m.group(1) or m.group(2)) for m in map(pattern.fullmatch, entries) if m}
    for pid in sorted(pids):  # our own pid too: a killed earlier run can have had it (a container's pid 1)
        dead = Staging(staging.out_dir, pid)
        with _lock_if_free(dead.lock_path) as free:
            if not free:
                continue  # a run still writing
            _tidy_run(dead, log)
            with contextlib.suppress(OSError):
                os.unlink(dead.lock_path)


def _tidy_run(dead: Staging, log: Callable[[str], object] = lambda message: None) -> None:
    """Tidy what the run with ``dead``'s names left; its lock is free, or the caller's own."""
    if os.path.lexists(dead.old) and not os.path.lexists(dead.out_dir):
        os.rename(dead.old, dead.out_dir)  # killed between its two renames: the previous output back
        log(f"put back {dead.out_dir} from {dead.old}, left by a run that was killed while replacing it")
    for path in (dead.path, dead.old):
        if os.path.lexists(path):
            log(f"removing {path}, left by a run that was killed")
            _remove(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def _lock_if_free(path: str) -> Iterator[bool]:
    """Hold ``path``'s flock if no live run holds it (True; also when the file is gone: its run ended or
    was killed), else False."""
    lock = None
    for mode in ("r+", "r"):  # another user's lock file is read: flock needs no write access (but over NFS)
        try:
            lock = open(path, mode)
            break
        except FileNotFoundError:
            yield True
            return
        except PermissionError:
            continue
    if lock is None:  # not even readable: taken as a live run's, left alone
        yield False
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live run (or it can not be told: left alone all the same)
            yield False
            return
        yield True

"""Writer stage, part 2: the artifact directory, its manifest, and atomic publication.

On disk, for `--out /data/tiles_index`:

    /data/tiles_index                    symlink -> tiles_index.versions/<version>   (what readers open)
    /data/tiles_index.versions/
        .lock                            flock held by the one build/add writing this artifact (removed after)
        .build/                          work directory of the build in progress (resumable)
        20260101T120000Z-ab12cd34/       a complete artifact: manifest.json index.faiss tiles.csv vectors/
                                         (+ orientation.npy where the checkpoint has an orientation head)

Publishing = (1) every file of the new version is written and fsynced inside `.build`,
(2) `.build` is renamed to its version name, (3) a new symlink is created under a temporary name
and os.replace()d over `/data/tiles_index`. rename(2) of a symlink is atomic, so a reader
resolving the path sees either the old complete version or the new complete version, never a
missing or half-written one; a build killed at any point leaves the live link untouched.
Readers should resolve the link once (os.path.realpath) and open every file of the artifact
from the resolved directory. Old versions beyond --keep-versions are removed after the swap.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time

from index_build.fsutil import atomic_write_json, fsync_dir
from index_build.workdir import PLAN_FILE, utc_now_iso
# The format's names and its reader are in the shared library: the service and evaluation read artifacts too.
from model.index_artifact import FORMAT_VERSION, MANIFEST_FILE, ArtifactError, read_manifest

# Keys index_build writes beyond those every reader needs (model.index_artifact.REQUIRED_MANIFEST_KEYS)
WRITTEN_MANIFEST_KEYS = ("model_config", "index_params", "faiss_version", "catalog_sha256", "source", "shards")


class ArtifactLayout:
    def __init__(self, out: str):
        out = os.path.abspath(out.rstrip("/") or "/")
        self.out = out
        self.parent = os.path.dirname(out)
        self.name = os.path.basename(out)
        self.versions = os.path.join(self.parent, self.name + ".versions")
        self.work = os.path.join(self.versions, ".build")
        self.lock_path = os.path.join(self.versions, ".lock")

    # -- state of the published link --------------------------------------------------------
    def check_publishable(self) -> None:
        if os.path.lexists(self.out) and not os.path.islink(self.out):
            raise ArtifactError(
                f"{self.out} exists and is not a symlink. index_build publishes through a symlink to a "
                f"versioned directory so that readers never see a half-written index; move it aside "
                f"(e.g. `mv {self.out} {self.out}.old`) or choose another --out")

    def live_version_dir(self) -> str | None:
        """Resolved directory of the published artifact, or None if nothing is published."""
        if not os.path.lexists(self.out):
            return None
        return os.path.realpath(self.out)

    def live_is_ours(self) -> bool:
        """`out` links to one of our versions (not to a directory linked there by hand)."""
        live = self.live_version_dir()
        return live is not None and os.path.dirname(live) == os.path.realpath(self.versions)

    def list_versions(self) -> list[str]:
        if not os.path.isdir(self.versions):
            return []
        return sorted(d for d in os.listdir(self.versions)
                      if not d.startswith(".") and os.path.isdir(os.path.join(self.versions, d)))

    @contextlib.contextmanager
    def lock(self):
        """Be the one writer of this artifact for the block (an flock on `.lock`). The lock file is
        removed on the way out, and the versions directory too when the run left it empty, so a
        failed run leaves nothing behind; a killed run leaves a file that holds no lock."""
        fd = self._take_lock()
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)  # before the flock goes: see _take_lock
            os.close(fd)
            with contextlib.suppress(OSError):
                os.rmdir(self.versions)  # fails unless empty: then nothing was ever built here

    def _take_lock(self) -> int:
        # A writer that finishes unlinks the lock file while it still holds the flock. A writer that
        # opened that file just before and is granted the flock afterwards holds a lock on a file no
        # longer reachable by name: it sees that (the path names another inode, or none) and retries.
        for _ in range(100):
            os.makedirs(self.versions, exist_ok=True)
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the versions directory was just removed by a finishing run
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    pid = f"pid {holder}, " if holder.isdigit() else ""
                    raise ArtifactError(f"another index_build is writing {self.out} "
                                        f"({pid}lock {self.lock_path})") from None
                raise
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                current = False
            if current:
                return fd
            os.close(fd)
        raise ArtifactError(f"could not take the lock {self.lock_path}: it keeps being replaced")

    # -- publication -------------------------------------------------------------------------
    def new_version_name(self, fingerprint: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"{stamp}-{fingerprint[:8]}"
        i = 1
        while os.path.exists(os.path.join(self.versions, name)):
            i += 1
            name = f"{stamp}-{fingerprint[:8]}-{i}"
        return name

    def promote_work_dir(self, version: str) -> str:
        """Rename the finished work dir to its version name (not yet live)."""
        target = os.path.join(self.versions, version)
        fsync_tree(self.work)
        os.rename(self.work, target)
        fsync_dir(self.versions)
        return target

    def swap_link(self, version: str) -> None:
        """Atomically point `out` at versions/<version> (a relative link: the tree can be moved)."""
        target = os.path.join(os.path.basename(self.versions), version)
        tmp = os.path.join(self.parent, f".{self.name}.link-{os.getpid()}.tmp")
        prefix = f".{self.name}.link-"  # ours, and those of runs killed here (we hold the lock: none is live)
        for name in os.listdir(self.parent):
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.parent, name))
        os.symlink(target, tmp)
        os.replace(tmp, self.out)
        fsync_dir(self.parent)

    def prune(self, keep: int) -> list[str]:
        """Delete the oldest versions beyond `keep` (never the live one), and first those a killed run
        promoted but never published (they still hold its plan.json): they count as no rollback target.
        Returns the removed names."""
        live = self.live_version_dir() if self.live_is_ours() else None
        paths = {name: os.path.join(self.versions, name) for name in self.list_versions()}
        if live:
            paths = {name: path for name, path in paths.items() if os.path.realpath(path) != live}
        orphans = [name for name, path in paths.items() if os.path.isfile(os.path.join(path, PLAN_FILE))]
        published = [name for name in paths if name not in orphans]
        removed = orphans + published[:max(0, len(published) + (1 if live else 0) - max(1, keep))]
        for name in removed:
            shutil.rmtree(paths[name], ignore_errors=True)
        return removed


def fsync_tree(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)


def make_manifest(*, fingerprint: str, model_config: dict, dim: int, count: int, index_type: str,
                  index_params: dict, faiss_version: str, catalog_sha256: str, source: str, **extra) -> dict:
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": fingerprint,
        "model_config": model_config,
        "embedding_dim": int(dim),
        "metric": "inner_product",
        "count": int(count),
        "index_type": index_type,
        "index_params": index_params,
        "faiss_version": faiss_version,
        "catalog_sha256": catalog_sha256,
        "built_at": utc_now_iso(),
        "source": source,
    }
    manifest.update(extra)
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    atomic_write_json(os.path.join(directory, MANIFEST_FILE), manifest)


def read_built_manifest(directory: str) -> dict:
    """The manifest of an artifact index_build wrote, with every key it writes (as `add`, `info` and
    `verify` use them)."""
    manifest = read_manifest(directory)
    missing = [key for key in WRITTEN_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ArtifactError(f"{os.path.join(directory, MANIFEST_FILE)}: missing key(s) {', '.join(missing)}")
    return manifest


def resolve_artifact(path: str) -> str:
    """The real directory of an artifact (follows the published symlink once)."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ArtifactError(f"{path}: no artifact there")
    return real

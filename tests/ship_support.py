"""Helpers for the ship tests (test_ship_*.py, test_e2e.py): docker/compose parsing without a Docker
engine, a tiny synthetic region shared by the modules of one run, stand-in checkpoints and a real
uvicorn subprocess on a free loopback port."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import queue
import threading
import time
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from ports import free_port  # noqa: F401  (one place for ports; the tests import it from here)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEMO_CHECKPOINT = REPO / "weights" / "l2ltr_tiny_demo.safetensors"


# ------------------------------------------------------------------------------ environment

def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without the developer's GEOLOC_* settings, the repo importable from any cwd
    (as in the images, where the project is an installed wheel), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(extra)
    return env


def run(cmd: list[str], *, cwd: Path | str = REPO, env: dict | None = None, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {shlex.join(map(str, cmd))}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


# ------------------------------------------------------------------------------ compose / Dockerfile

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        value = env.get(name)
        if op == ":-" and not value:
            return default or ""
        if op == "-" and value is None:
            return default or ""
        if op in (":?", "?") and not value:
            raise KeyError(f"required variable {name} is not set")
        return value or ""
    return _VAR.sub(sub, text)


def interpolate_tree(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict:
    import yaml

    raw = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    return interpolate_tree(raw, env if env is not None else {})


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK CMD arguments: JSON (exec) form or shell form."""
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return ["sh", "-c", args]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """ENV key=value pairs of the final stage."""
    env: dict[str, str] = {}
    for instr, args in instructions:
        if instr == "FROM":
            env = {}
        elif instr == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Sources of every COPY/ADD that reads the build context (not --from=<stage>)."""
    sources = []
    for instr, args in instructions:
        if instr not in ("COPY", "ADD"):
            continue
        tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [t for t in tokens if t.startswith("--")]
        paths = [t for t in tokens if not t.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        sources.extend(paths[:-1])
    return sources


def dockerignore_patterns(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _ignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def is_dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is excluded when it or one of its parent directories matches the last
    matching pattern, and that pattern is not a `!` exception."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern[1:] if negate else pattern)
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def fnmatch_any(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


# ------------------------------------------------------------------------------ tiny region + checkpoints

_WORLDS: dict[tuple, Path] = {}


def tiny_world(base: Path, seed: int = 31337, area_km2: float = 0.05, pairs: int | None = 24) -> Path:
    """A small worldgen region, generated once per test run and shared (read-only) by the modules."""
    key = (seed, area_km2, pairs)
    if key not in _WORLDS or not (_WORLDS[key] / "tiles.csv").is_file():
        out = base / f"world-{seed}-{area_km2}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [PY, "-m", "worldgen", "--seed", str(seed), "--area-km2", str(area_km2), "--out", str(out), "--quiet"]
        if pairs:
            cmd += ["--pairs", str(pairs)]
        run(cmd, timeout=240)
        _WORLDS[key] = out
    return _WORLDS[key]


def micro_config():
    from model import L2LTRConfig

    return L2LTRConfig(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2, resnet_units=(1, 1, 1),
                       resnet_width_factor=0.5, ground_size=(32, 128), aerial_size=(32, 128), name="micro")


def stand_in_checkpoint(path: Path, config=None, seed: int = 0) -> Path:
    """A random-weight checkpoint for plumbing tests (never the shipped demo model)."""
    import torch

    from model import L2LTR, save_checkpoint

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(L2LTR(config or micro_config()), path, metadata={"purpose": "test stand-in"})
    return path


# ------------------------------------------------------------------------------ HTTP

def get_json(url: str, timeout: float = 3.0) -> tuple[int, dict | None]:
    """(status, JSON body or None); status 0 when nothing answered. The demo script's own helper."""
    return demo_module().http_get_json(url, timeout=timeout)


def stdout_lines(proc: subprocess.Popen) -> "queue.Queue[str | None]":
    """A queue fed with the process's stdout lines by a daemon thread; None marks the end."""
    q: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def wait_ready(base_url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before ready:\n{tail(log_path)}")
        status, body = get_json(base_url + "/readyz")
        if status == 200 and body and body.get("status") == "ready":
            return body
        time.sleep(0.3)
    raise AssertionError(f"server not ready after {timeout} s (last /readyz {body}):\n{tail(log_path)}")


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def server(cmd: list[str], *, env: dict, cwd: Path, port: int, log_path: Path, timeout: float = 120):
    """Start `cmd` (a uvicorn command line), wait for /readyz, yield (base_url, readyz body), stop it."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(base_url, proc, log_path, timeout)
        yield base_url, ready, proc
    finally:
        stop(proc)


def post_image(base_url: str, image: Path, k: int = 5, timeout: float = 60.0) -> dict:
    import httpx

    with open(image, "rb") as f:
        resp = httpx.post(f"{base_url}/localize", params={"k": k}, timeout=timeout,
                          files={"image": (image.name, f, "image/jpeg")})
    assert resp.status_code == 200, f"/localize answered {resp.status_code}: {resp.text[:500]}"
    return resp.json()


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def script_module(relpath: str):
    """A script of the repository (``scripts/demo.py``, ``bench/...``: folders that are not packages) as a
    module, loaded once. It is registered in sys.modules before it runs: a dataclass looks its module up there."""
    import importlib.util

    name = "repo_script_" + relpath.removesuffix(".py").replace("/", "_").replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def demo_module():
    """scripts/demo.py as a module."""
    return script_module("scripts/demo.py")


# ------------------------------------------------------------------------------ comparing answers

SCORE_TOL = 1e-4  # float32 scores of one image may differ in the last bits between batch sizes and CPUs


def assert_same_matches(got: list[dict], want: list[dict], tol: float = SCORE_TOL) -> None:
    """Two ranked match lists of the same image agree: the same scores within ``tol``, and the same
    tiles wherever the order is decided. A SIMD kernel may change a score's last bits with the batch
    size or the CPU (AMD EPYC vs Intel Xeon), so tiles whose scores lie within ``tol`` of each other
    (a near-tie) may swap places; such a group is compared as a set. The last group is compared by
    score alone: a tile just below the cut-off could tie with it."""
    assert len(got) == len(want), (len(got), len(want))
    scores = [m["score"] for m in want]
    assert [m["score"] for m in got] == pytest.approx(scores, abs=tol)
    start = 0
    for end in range(1, len(want) + 1):
        if end < len(want) and scores[end - 1] - scores[end] <= tol:
            continue  # a near-tie: the group goes on
        if end < len(want):
            assert {m["tile_id"] for m in got[start:end]} == {m["tile_id"] for m in want[start:end]}, \
                f"ranks {start + 1}-{end} differ:\n{got}\n{want}"
        start = end

"""Fetch, on this machine, the wheels that bench/device_check.sh needs on a lent GPU machine.

    bash bench/device_wheels.sh                 # download into .whl/, then check it
    bash bench/device_wheels.sh --check         # check .whl/ only: dependencies, duplicates, size
    bash bench/device_wheels.sh --shadow typing-extensions   # also carry one the machine has

The GPU machine runs Python 3.12 with torch, numpy and many other packages, but not faiss nor the
service's web stack, and it reaches no package registry: what it lacks travels as wheels in the
git-ignored folder .whl/, named in the device call's `carry`, and device_check.sh installs them with
`pip install --no-index --no-deps --target` into its working folder. What is fetched: faiss-cpu and
the service extra of pyproject.toml, with every dependency they need that the machine does not have,
each at the version installed in the Python running this (the project's venv: the versions the suite
passes with), as manylinux x86_64 / pure-Python wheels for CPython 3.12.

Packages the machine already has are refused (a second copy on PYTHONPATH would shadow its own),
unless named with --shadow after a device run has shown its version to be too old. The check
then verifies that every requirement of every carried wheel is met by another carried wheel or by
the machine (whose versions are not known here: those are listed as assumed), that no package is
carried twice (two versions stop pip's joint install), and that the working tree plus the wheels stay
under the 64 MiB a device call carries.
"""
from __future__ import annotations

import argparse
import email.parser
import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / ".whl"
MIB = 2 ** 20
CARRY_LIMIT = 64 * MIB      # the working tree, untracked files and carried paths of one device call
CARRY_MARGIN = 4 * MIB      # files made between this check and the call
WHEELS_LIMIT = 50 * MIB

# What the GPU machine's image holds (the workplace's list of 2026-11-17; versions mostly unknown).
DEVICE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# Where the GPU machine's Python is: the environment its requirement markers are evaluated in.
DEVICE_MARKERS = {**default_environment(), "implementation_name": "cpython", "implementation_version": "3.12.3",
                  "os_name": "posix", "platform_machine": "x86_64", "platform_system": "Linux",
                  "platform_python_implementation": "CPython", "python_full_version": "3.12.3",
                  "python_version": "3.12", "sys_platform": "linux"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# Every wheel tag pip accepts there (its glibc is new enough for any manylinux_2_N up to 2_39).
_DEVICE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + \
    ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
DEVICE_TAGS = frozenset([*cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=_DEVICE_PLATFORMS),
                         *compatible_tags((3, 12), interpreter="cp312", platforms=_DEVICE_PLATFORMS)])


class WheelError(RuntimeError):
    """The wheels cannot be fetched or would not work on the machine; the message says which."""


def device_needs(requirement: Requirement, extras: tuple[str, ...] = ("",)) -> bool:
    """Whether the GPU machine needs this requirement (its markers, for the extras asked for)."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**DEVICE_MARKERS, "extra": extra}) for extra in extras)


def project_roots() -> list[Requirement]:
    """faiss-cpu (index_build and the service search with it) and the service extra."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise WheelError("reading pyproject.toml needs Python 3.11 or later (tomllib)") from None
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = data["project"]["optional-dependencies"]
    roots = [Requirement(r) for r in (*extras["cpu"], *extras["service"])]
    return [r for r in roots if device_needs(r)]


def installed_requirements(name: str) -> list[Requirement]:
    return [Requirement(r) for r in md.requires(name) or []]


def plan(roots: list[Requirement], shadow: set[str]) -> tuple[dict[str, str], list[str]]:
    """({name: version} to fetch, notes): the roots and their dependencies, at the versions this
    Python has installed, without what the GPU machine has (unless shadowed)."""
    want: dict[str, str] = {}
    notes: list[str] = []
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in want:
            continue
        if name in DEVICE_PACKAGES and name not in shadow:
            continue
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            raise WheelError(f"{name} (needed as {req}) is not installed in {sys.executable}; run this with the "
                             "project's venv (make install EXTRAS=cpu,service,...) so that its versions are the "
                             "ones fetched") from None
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            raise WheelError(f"{name} {version} installed here does not meet {req}")
        want[name] = version
        todo += [r for r in installed_requirements(name) if device_needs(r, ("", *req.extras))]
    for name in sorted(shadow - want.keys()):
        notes.append(f"--shadow {name}: nothing here needs it, so it is not fetched")
    return dict(sorted(want.items())), notes


def download(want: dict[str, str], dest: Path) -> None:
    """pip download each wheel for CPython 3.12 on manylinux x86_64 (or pure Python) into dest,
    after removing other versions of the same packages there."""
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in dest.glob("*.whl"):
        name, version = wheel_identity(wheel)
        if name in want and str(version) != want[name]:
            print(f"removing {wheel.name} (fetching {name} {want[name]})")
            wheel.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "--dest", str(dest),
           "--quiet", *(f"{n}=={v}" for n, v in want.items())]
    print("$ " + " ".join(cmd[:4]) + " ... " + " ".join(f"{n}=={v}" for n, v in want.items()), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode:
        raise WheelError(f"pip download failed (exit code {proc.returncode}); if it found no matching distribution, "
                         "a wheel may need another --platform manylinux_2_N_x86_64 (see pip's message above)")


def wheel_identity(path: Path) -> tuple[str, Version]:
    name, version, _, _ = parse_wheel_filename(path.name)
    return canonicalize_name(name), version


def wheel_requirements(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        message = email.parser.Parser().parsestr(zf.read(meta).decode("utf-8"))
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


@dataclass
class CheckResult:
    wheels: dict[str, tuple[Version, Path]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)
    wheels_bytes: int = 0
    tree_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def tree_bytes(repo: Path) -> int | None:
    """Bytes of what a device call sends besides carried paths: tracked files and untracked ones
    that git does not ignore (None outside a git checkout)."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                          capture_output=True)
    if proc.returncode:
        return None
    total = 0
    for rel in set(proc.stdout.decode("utf-8", "replace").split("\0")) - {""}:
        path = repo / rel
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def check(dest: Path, shadow: set[str] = frozenset(), repo: Path | None = REPO) -> CheckResult:
    result = CheckResult()
    for path in sorted(dest.glob("*.whl")):
        try:
            name, version = wheel_identity(path)
        except Exception as exc:  # noqa: BLE001 - a file that is no wheel
            result.problems.append(f"{path.name}: not a wheel file name ({exc})")
            continue
        result.wheels_bytes += path.stat().st_size
        if name in result.wheels:
            result.problems.append(f"{name} is there twice ({result.wheels[name][1].name}, {path.name}): "
                                   "pip's joint install stops on that; remove one")
            continue
        result.wheels[name] = (version, path)
        if name in DEVICE_PACKAGES and name not in shadow:
            result.problems.append(f"{path.name}: the GPU machine has {name} already; a carried copy would shadow "
                                   "it (remove the wheel, or pass --shadow if the machine's is too old)")
        if not parse_wheel_filename(path.name)[3] & DEVICE_TAGS:
            result.problems.append(f"{path.name}: pip would not install it there (CPython 3.12 on Linux x86_64)")
    for name, (_, path) in result.wheels.items():
        for req in wheel_requirements(path):
            if not device_needs(req):
                continue
            dep = canonicalize_name(req.name)
            if dep in result.wheels:
                have = result.wheels[dep][0]
                if req.specifier and not req.specifier.contains(have, prereleases=True):
                    result.problems.append(f"{name} needs {req}, but {dep} {have} is carried")
            elif dep in DEVICE_PACKAGES:
                if req.specifier:
                    result.assumed.append(f"{req} (for {name})")
            else:
                result.problems.append(f"{name} needs {req}, which neither the GPU machine nor .whl/ has")
    if result.wheels_bytes > WHEELS_LIMIT:
        result.problems.append(f"the wheels take {result.wheels_bytes / MIB:.1f} MiB, more than "
                               f"{WHEELS_LIMIT // MIB} MiB")
    if repo is not None:
        result.tree_bytes = tree_bytes(repo)
        if result.tree_bytes is not None and result.tree_bytes + result.wheels_bytes > CARRY_LIMIT - CARRY_MARGIN:
            result.problems.append(
                f"working tree {result.tree_bytes / MIB:.1f} MiB + wheels {result.wheels_bytes / MIB:.1f} MiB is over "
                f"{(CARRY_LIMIT - CARRY_MARGIN) // MIB} MiB (a device call carries at most {CARRY_LIMIT // MIB} MiB)")
    return result


def report(result: CheckResult, dest: Path) -> None:
    print(f"\n{len(result.wheels)} wheels in {dest}:")
    for name, (version, path) in sorted(result.wheels.items()):
        print(f"  {path.stat().st_size / MIB:6.2f} MiB  {name} {version}")
    print(f"  {result.wheels_bytes / MIB:6.2f} MiB  in all (limit {WHEELS_LIMIT // MIB} MiB)")
    if result.tree_bytes is not None:
        total = result.tree_bytes + result.wheels_bytes
        print(f"working tree {result.tree_bytes / MIB:.2f} MiB + wheels = {total / MIB:.2f} MiB of the "
              f"{CARRY_LIMIT // MIB} MiB a device call carries")
    if result.assumed:
        print("assumed to be met by the GPU machine's own packages (their versions are not known here; the "
              "device check's env step reports them):")
        for line in result.assumed:
            print(f"  {line}")
    if result.problems:
        print("PROBLEMS:")
        for line in result.problems:
            print(f"  {line}")
    else:
        print("ok: carry it with run(..., carry=[\".whl\"])")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=DEST, help="wheel folder (default: .whl/ in the repository)")
    p.add_argument("--check", action="store_true", help="only check the folder, fetch nothing")
    p.add_argument("--shadow", action="append", default=[], metavar="NAME",
                   help="carry this package although the GPU machine has it (after a device run showed its "
                        "version too old); repeatable")
    args = p.parse_args(argv)
    shadow = {canonicalize_name(n) for n in args.shadow}
    try:
        if not args.check:
            want, notes = plan(project_roots(), shadow)
            for note in notes:
                print(note)
            print(f"{len(want)} packages the GPU machine lacks: " + ", ".join(f"{n} {v}" for n, v in want.items()))
            download(want, args.dest)
        if not args.dest.is_dir():
            raise WheelError(f"{args.dest} does not exist; run without --check to fetch the wheels")
    except WheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result = check(args.dest, shadow)
    report(result, args.dest)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(args.dest)], cwd=REPO).returncode == 0
    if not ignored and args.dest.resolve().is_relative_to(REPO):
        print(f"warning: {args.dest} is not ignored by git; a device call would send it as part of the tree")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

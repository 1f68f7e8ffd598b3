"""Run a command with the numeric kernels another x86-64 CPU would pick, on this one.

    python scripts/cpu_profile.py zen -- python -m pytest -m cross_cpu

torch, oneDNN, MKL, FAISS, OpenBLAS (FAISS's and numpy's BLAS) and numpy's own loops each pick their kernels
from the CPU when they load, so one number can differ in its last bits from one machine to another
(an AMD EPYC sums a dot product in another order than an Intel Xeon). Each library also reads an
environment variable that caps or names its pick; this sets them for a profile and runs the command
(its children inherit them):

  zen       AMD EPYC Zen 2/3: OpenBLAS's Zen kernels; AVX2 in torch, oneDNN, MKL, FAISS and numpy
  haswell   Intel with AVX2 and no AVX-512 (Haswell to Comet Lake): OpenBLAS's Haswell kernels; AVX2 elsewhere
  skylakex  Intel AVX-512 without AMX (Skylake-SP, Cascade Lake): OpenBLAS's SkylakeX kernels; AVX-512 elsewhere
  baseline  any x86-64 CPU: SSE4.2 kernels, no AVX anywhere (OpenBLAS's Prescott, torch's default)
  other     zen on a CPU with AVX-512 (its kernels then differ from this CPU's own), else baseline

A library can only be sent *down* from what the CPU has: on a machine without a profile's
instructions (or not x86-64 Linux) the command is not run and the script says so and exits 0, unless
--strict (then 77, automake's "skipped").
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    summary: str
    needs: frozenset[str]  # /proc/cpuinfo flags the kernels use
    openblas: str  # OPENBLAS_CORETYPE
    aten: str  # ATEN_CPU_CAPABILITY: torch's own vectorised kernels
    onednn: str  # ONEDNN_MAX_CPU_ISA
    mkl: str  # MKL_ENABLE_INSTRUCTIONS
    faiss_simd: str  # FAISS_SIMD_LEVEL: faiss-cpu with dynamic dispatch (1.15)
    faiss_opt: str  # FAISS_OPT_LEVEL: an older wheel's choice among its swigfaiss_* modules
    numpy_above: tuple[str, ...]  # numpy's dispatch targets this CPU would not have (NPY_DISABLE_CPU_FEATURES)


_BASELINE = frozenset({"sse4_1", "sse4_2", "popcnt"})
_AVX2 = _BASELINE | {"avx2", "fma", "f16c", "bmi2"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# numpy's names: 2.4 dispatches to X86_V3/X86_V4/AVX512_ICL/AVX512_SPR, earlier ones to AVX2, AVX512F, AVX512_SKX, ...
_NUMPY_AVX512 = ("X86_V4", "AVX512F", "AVX512CD", "AVX512_SKX", "AVX512_CLX", "AVX512_CNL", "AVX512_ICL",
                 "AVX512_SPR")
_NUMPY_AVX2 = ("X86_V3", "AVX", "F16C", "FMA3", "AVX2") + _NUMPY_AVX512

PROFILES = {
    "zen": Profile("AMD EPYC Zen 2/3", _AVX2, "Zen", "avx2", "AVX2", "AVX2", "AVX2", "AVX2", _NUMPY_AVX512),
    "haswell": Profile("Intel AVX2 (Haswell to Comet Lake)", _AVX2, "Haswell", "avx2", "AVX2", "AVX2",
                       "AVX2", "AVX2", _NUMPY_AVX512),
    "skylakex": Profile("Intel AVX-512 (Skylake-SP, Cascade Lake)", _AVX512, "SkylakeX", "avx512", "AVX512_CORE",
                        "AVX512", "AVX512", "AVX512", ("AVX512_CNL", "AVX512_ICL", "AVX512_SPR")),
    "baseline": Profile("any x86-64 CPU: SSE4.2 kernels, no AVX", _BASELINE, "Prescott", "default", "SSE41", "SSE4_2",
                        "NONE", "generic", _NUMPY_AVX2),
}
SKIPPED = 77  # --strict, where the profile can not run (automake's "skipped"; pytest uses 0-5)
OTHER = "other"  # zen where this CPU has AVX-512 (zen's kernels then differ from its own), else baseline


def pick_other(flags: set[str]) -> str:
    return "zen" if PROFILES["skylakex"].needs <= flags else "baseline"


def why_not(profile: Profile, flags: set[str]) -> str:
    """Why this machine can not run ``profile``'s kernels (its CPU's ``flags``); empty when it can."""
    machine = platform.machine()
    if machine != "x86_64":
        return f"runs on x86-64 only (this machine: {machine})"
    if not flags:
        return "needs the CPU flags of /proc/cpuinfo, which this machine has not"
    missing = sorted(profile.needs - flags)
    return f"needs {', '.join(missing)}, which this CPU lacks" if missing else ""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's flags; empty where there is no /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def numpy_disable(targets: tuple[str, ...]) -> str:
    """NPY_DISABLE_CPU_FEATURES: what it already holds, and the targets numpy dispatches to on this machine
    among ``targets`` (naming one it does not know, or one this CPU lacks, makes numpy fail or warn)."""
    already = os.environ.get("NPY_DISABLE_CPU_FEATURES", "").replace(",", " ").split()
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        try:  # numpy 1.x
            from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
        except ImportError:
            print("cpu_profile: numpy's kernels can not be capped here (no numpy, or too old)", file=sys.stderr)
            return " ".join(already)
    more = [t for t in targets if t not in already and t in __cpu_dispatch__ and __cpu_features__.get(t)]
    return " ".join(already + more)


def profile_env(profile: Profile) -> dict[str, str]:
    env = {"OPENBLAS_CORETYPE": profile.openblas, "ATEN_CPU_CAPABILITY": profile.aten,
           "ONEDNN_MAX_CPU_ISA": profile.onednn, "MKL_ENABLE_INSTRUCTIONS": profile.mkl,
           "FAISS_SIMD_LEVEL": profile.faiss_simd, "FAISS_OPT_LEVEL": profile.faiss_opt}
    disable = numpy_disable(profile.numpy_above)
    if disable:
        env["NPY_DISABLE_CPU_FEATURES"] = disable
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the command is everything after the first "--", whatever it looks like; options go before it
    ours, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="cpu_profile.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [-h] [--strict] PROFILE -- COMMAND [ARG ...]",
        description="Run COMMAND with the numeric kernels of another x86-64 CPU (profiles below).",
        epilog="\n".join([f"  {name:9} {p.summary}" for name, p in PROFILES.items()]
                         + [f"  {OTHER:9} zen on a CPU with AVX-512, else baseline: kernels unlike this CPU's own"]))
    parser.add_argument("profile", choices=[*PROFILES, OTHER], metavar="PROFILE", help="the CPU to imitate")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit {SKIPPED} instead of 0 where the profile can not run")
    args = parser.parse_args(ours)
    if not command:
        parser.error("no command given (put it after --)")
    flags = cpu_flags()
    name = pick_other(flags) if args.profile == OTHER else args.profile
    profile = PROFILES[name]
    why = why_not(profile, flags)
    if why:
        print(f"cpu_profile: {name} ({profile.summary}) {why}: not run", file=sys.stderr)
        return SKIPPED if args.strict else 0
    env = profile_env(profile)
    print(f"cpu_profile: {name} ({profile.summary}): "
          + " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}" for k, v in env.items()), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, {**os.environ, **env})
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

"""scripts/cpu_profile.py: the kernels of another x86-64 CPU, chosen through each library's variable."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ship_support import REPO, script_module

SCRIPT = REPO / "scripts" / "cpu_profile.py"

cpu_profile = script_module("scripts/cpu_profile.py")
ZEN_RUNS_HERE = not cpu_profile.why_not(cpu_profile.PROFILES["zen"], cpu_profile.cpu_flags())


def test_cpu_flags_are_read_from_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_profile.cpu_flags(info) == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_profile.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("argv, status", [(["skylakex"], 0), (["--strict", "skylakex"], 77),
                                          (["skylakex", "--strict"], 77)])
def test_a_profile_this_cpu_can_not_imitate_is_not_run(monkeypatch, capsys, argv, status):
    monkeypatch.setattr(cpu_profile.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_profile, "cpu_flags", lambda: set(cpu_profile.PROFILES["zen"].needs))  # AVX2 only
    monkeypatch.setattr(cpu_profile.os, "execvpe", lambda *a: pytest.fail("the command ran"))
    assert cpu_profile.main([*argv, "--", "true"]) == status
    err = capsys.readouterr().err
    assert "skylakex" in err and "avx512f" in err and "not run" in err


def test_without_cpu_flags_nothing_is_imitated(monkeypatch, capsys):
    monkeypatch.setattr(cpu_profile.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_profile, "cpu_flags", lambda: set())  # no /proc/cpuinfo: a Mac, say
    monkeypatch.setattr(cpu_profile.os, "execvpe", lambda *a: pytest.fail("the command ran"))
    assert cpu_profile.main(["--strict", "zen", "--", "true"]) == 77
    assert "/proc/cpuinfo" in capsys.readouterr().err


def test_other_is_zen_where_this_cpu_has_avx512_else_baseline():
    assert cpu_profile.pick_other(set(cpu_profile.PROFILES["skylakex"].needs)) == "zen"
    assert cpu_profile.pick_other(set(cpu_profile.PROFILES["zen"].needs)) == "baseline"


def test_everything_after_the_double_dash_is_the_command(monkeypatch):
    ran = []
    monkeypatch.setattr(cpu_profile.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_profile, "cpu_flags", lambda: set(cpu_profile.PROFILES["skylakex"].needs))
    monkeypatch.setattr(cpu_profile.os, "execvpe", lambda file, args, env: ran.append((args, env)))
    cpu_profile.main(["haswell", "--", "tool", "--strict", "-h", "--"])
    (args, env), = ran
    assert args == ["tool", "--strict", "-h", "--"]
    assert env["OPENBLAS_CORETYPE"] == "Haswell" and env["ATEN_CPU_CAPABILITY"] == "avx2"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cpu_profile.main(["zen"])
    assert exc.value.code == 2 and "no command given" in capsys.readouterr().err


@pytest.mark.skipif(not ZEN_RUNS_HERE, reason="this machine can not imitate an AMD EPYC (no AVX2 or not x86-64)")
def test_the_command_runs_with_the_profiles_kernels_and_its_status_is_kept():
    probe = ("import ctypes, glob, os, sys, torch, faiss\n"
             "from numpy._core._multiarray_umath import __cpu_features__\n"
             "blas = glob.glob(os.path.join(os.path.dirname(faiss.__file__), '..', 'faiss_cpu.libs', 'libopenblas*'))\n"
             "core = None\n"
             "if blas:\n"
             "    lib = ctypes.CDLL(blas[0]); lib.openblas_get_corename.restype = ctypes.c_char_p\n"
             "    core = lib.openblas_get_corename().decode()\n"
             "simd = faiss.SIMDConfig.get_level_name() if hasattr(faiss, 'SIMDConfig') else None\n"
             "print(torch.backends.cpu.get_cpu_capability(), __cpu_features__.get('X86_V4'), core, simd)\n"
             "sys.exit(7)\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "zen", "--", sys.executable, "-c", probe],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 7, done.stderr
    capability, avx512_loops, core, simd = done.stdout.split()
    assert capability == "AVX2"  # torch's own kernels
    assert avx512_loops in ("False", "None")  # numpy's: no AVX-512 loops
    assert core in ("Zen", "None")  # FAISS's OpenBLAS (a wheel that bundles it)
    assert simd in ("AVX2", "None")  # FAISS's own kernels (a build with dynamic dispatch)
    assert "OPENBLAS_CORETYPE=Zen" in done.stderr  # the line saying what was set


def test_numpy_features_already_disabled_stay_disabled(monkeypatch):
    monkeypatch.setenv("NPY_DISABLE_CPU_FEATURES", "AVX512_SPR,X86_V3")
    assert cpu_profile.numpy_disable(("X86_V3", "NOT_A_NUMPY_TARGET")).split() == ["AVX512_SPR", "X86_V3"]

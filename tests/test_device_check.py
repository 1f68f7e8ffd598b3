"""bench/device_check.sh, the prepared run for a lent GPU machine: its --dry-run runs every step on
this CPU at toy sizes and reports each with a status and numbers; a failing step is recorded and the
others still run. bench/device_wheels.py: its checks of a wheel folder, on wheels made here."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ship_support import script_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device_check.sh"
STEPS = ("env", "ceilings", "encode", "world", "train", "index", "load", "search")
SERVICE_MODULES = ("fastapi", "uvicorn", "pydantic_settings", "python_multipart", "fastapi_offline", "httptools",
                   "faiss")


def have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def run_script(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DEVICE_CHECK_BUDGET_S", "KEEP_WORK")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("device_check")
    return run_script(out, "--dry-run"), out


def test_dry_run_runs_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    assert list(steps) == ["wheels", *STEPS]
    for name in STEPS:
        if name == "load" and not have(*SERVICE_MODULES):
            assert steps[name]["status"] == "skipped" and "not importable" in steps[name]["reason"]
            continue
        assert steps[name]["status"] == "ok", (name, steps[name])
        assert steps[name]["seconds"] is not None and steps[name]["limit_s"] > 0
    assert steps["wheels"]["status"] == "skipped"  # a dry run installs nothing


def test_dry_run_reports_numbers(dry_run):
    _, out = dry_run
    r = {name: rec["results"] for name, rec in json.loads((out / "device_check.json").read_text())["steps"].items()}
    assert r["env"]["torch"] and r["env"]["cpus"] >= 1
    assert r["ceilings"]["matmul"]["tflops"] > 0 and r["ceilings"]["copy"]["gbps"] > 0
    rows = r["encode"]["rows"]
    assert {(x["branch"], x["batch"]) for x in rows} == {(b, n) for b in ("ground", "aerial") for n in (1, 8)}
    for x in rows:
        assert x["img_s"] > 0 and x["gflop_per_image"] > 0 and x["tflops"] > 0 and x["of_matmul_ceiling"] > 0
        assert x["mfu"] is None  # no datasheet peak for a CPU
    assert r["world"]["tiles"] == 40
    assert r["train"]["steps_per_s"] > 0 and r["train"]["pairs_per_s"] > 0 and r["train"]["steps"] == 4
    (index_row,) = r["index"]["rows"]
    assert index_row["build_tiles_per_s"] > 0 and index_row["raw_tiles_per_s"] > 0
    assert index_row["status"] == ("published" if have("faiss") else "encoded")
    if have(*SERVICE_MODULES):
        assert r["load"]["throughput_rps"] > 0 and r["load"]["c1_p50_ms"] > 0 and r["load"]["rounds"] == 1
    search = r["search"]["rows"]
    methods = {x["method"] for x in search}
    assert "torch exact (float32, cpu)" in methods
    assert ("faiss-cpu flat" in methods) == have("faiss")
    assert all(x["qps"] > 0 for x in search)
    if have("faiss"):  # exact search finds the same neighbours either way
        assert [x["recall_at_10_vs_torch"] for x in search if "recall_at_10_vs_torch" in x] == [1.0, 1.0]


def test_dry_run_writes_a_markdown_report_and_the_log(dry_run):
    proc, out = dry_run
    md = (out / "device_check.md").read_text()
    assert "dry run" in md and "| step | status | seconds (time box) | result |" in md
    for name in STEPS:
        assert f"\n| {name} | " in md
    assert "| branch | input | batch | img/s |" in md and "| method | dim | batch | queries/s |" in md
    log = (out / "device_check.log").read_text()
    assert "step search: done" in log and "device check finished: exit code 0" in log
    assert md.strip() in proc.stdout  # the tables are the last thing printed


def test_a_failing_step_is_recorded_and_the_others_run(tmp_path):
    proc = run_script(tmp_path, "--dry-run", "--steps", "no-such-step,env", timeout=120)
    assert proc.returncode == 1, proc.stdout[-4000:]
    steps = json.loads((tmp_path / "device_check.json").read_text())["steps"]
    assert {n: steps[n]["status"] for n in ("no-such-step", "env")} == {"no-such-step": "failed", "env": "ok"}
    assert "no such step" in steps["no-such-step"]["errors"][0]
    assert "step no-such-step: FAILED" in proc.stdout


def test_without_python_set_the_repositorys_venv_runs_the_steps(tmp_path):
    """As docs/GPU.md runs it, `bash bench/device_check.sh --dry-run` with no PYTHON: the python3 on PATH
    (here one that fails, as a system python without torch does) is not used where `make install` made
    .venv; on a lent machine without one it is."""
    if not (REPO / ".venv" / "bin" / "python").is_file():
        pytest.skip("no .venv here (make install makes it)")
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python3").write_text("#!/bin/sh\necho 'python3 from PATH: no torch here' >&2\nexit 1\n")
    (stub / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DEVICE_CHECK_BUDGET_S", "KEEP_WORK", "PYTHON")}
    env.update(OUT=str(tmp_path / "out"), PATH=f"{stub}:{env.get('PATH', '/usr/bin:/bin')}")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--steps", "env"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no torch here" not in proc.stdout + proc.stderr


def test_script_arguments(tmp_path):
    helped = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--dry-run" in helped.stdout and 'carry=[".whl"]' in helped.stdout
    wrong = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown argument '--fast'" in wrong.stderr


# ------------------------------------------------------------------------------ device_wheels.py

@pytest.fixture(scope="module")
def wheels():
    return script_module("bench/device_wheels.py")


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (),
               tag: str = "py3-none-any") -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                    f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


def test_wheel_check_accepts_a_closed_set(wheels, tmp_path):
    make_wheel(tmp_path, "fastapi", "1.0", ("starlette>=1", "typing-extensions>=4.8", 'httpx; extra == "all"'))
    make_wheel(tmp_path, "starlette", "1.2", ("anyio<5,>=4",))
    make_wheel(tmp_path, "httptools", "0.9", tag="cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64")
    make_wheel(tmp_path, "faiss-cpu", "1.15", ("numpy>=1.25",), tag="cp310-abi3-manylinux_2_28_x86_64")
    result = wheels.check(tmp_path, repo=None)
    assert result.ok, result.problems
    assert sorted(result.wheels) == ["faiss-cpu", "fastapi", "httptools", "starlette"]
    # what the machine must provide itself is listed; extras nobody asked for are not needed
    assert result.assumed == ["numpy>=1.25 (for faiss-cpu)", "typing-extensions>=4.8 (for fastapi)",
                              "anyio<5,>=4 (for starlette)"]


def test_wheel_check_finds_what_would_break_the_install(wheels, tmp_path):
    make_wheel(tmp_path, "pydantic", "2.1", ("pydantic-core==2.5", "not-anywhere>=1"))
    make_wheel(tmp_path, "pydantic-core", "2.4", tag="cp312-cp312-manylinux_2_17_x86_64")
    make_wheel(tmp_path, "uvicorn", "0.1")
    make_wheel(tmp_path, "uvicorn", "0.2")
    make_wheel(tmp_path, "numpy", "1.0", tag="cp312-cp312-manylinux_2_17_x86_64")
    make_wheel(tmp_path, "httptools", "0.9", tag="cp311-cp311-manylinux_2_17_x86_64")
    make_wheel(tmp_path, "python-multipart", "0.1", tag="py3-none-macosx_11_0_arm64")
    problems = "\n".join(wheels.check(tmp_path, repo=None).problems)
    assert "pydantic needs pydantic-core==2.5, but pydantic-core 2.4 is carried" in problems
    assert "not-anywhere>=1, which neither the GPU machine nor .whl/ has" in problems
    assert "uvicorn is there twice" in problems
    assert "the GPU machine has numpy already" in problems
    assert "httptools-0.9-cp311" in problems and "python_multipart-0.1" in problems
    assert "the GPU machine has numpy" not in "\n".join(wheels.check(tmp_path, {"numpy"}, repo=None).problems)


def test_wheel_check_counts_the_working_tree(wheels, tmp_path, monkeypatch):
    make_wheel(tmp_path, "fastapi", "1.0")
    monkeypatch.setattr(wheels, "tree_bytes", lambda repo: 62 * wheels.MIB)
    problems = wheels.check(tmp_path, repo=REPO).problems
    assert len(problems) == 1 and "a device call carries at most 64 MiB" in problems[0]


@pytest.mark.skipif(not have("pydantic_settings", "faiss"), reason="needs the cpu and service extras installed")
def test_wheel_plan_fetches_only_what_the_machine_lacks(wheels):
    want, notes = wheels.plan(wheels.project_roots(), shadow=set())
    assert {"faiss-cpu", "fastapi", "uvicorn", "pydantic", "pydantic-core", "pydantic-settings",
            "python-multipart"} <= set(want)
    assert not set(want) & wheels.DEVICE_PACKAGES  # numpy, typing-extensions, uvloop... are there
    assert notes == []
    shadowed, _ = wheels.plan(wheels.project_roots(), shadow={"typing-extensions"})
    assert set(shadowed) - set(want) == {"typing-extensions"}


def test_report_of_a_device_run(tmp_path):
    """The report from steps' records shaped as on a GPU: MFU against the peak, a step stopped at its
    time box (its partial results kept), one the budget left no time for."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    records = {
        "env": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "torch_cuda": "13.0", "cpus": 16},
        "ceilings": {"matmul": {"n": 8192, "dtype": "bfloat16", "tflops": 780.0}, "copy": {"gbps": 4300.0}},
        "encode": {"setup": {"config": "paper", "peak_bf16_tflops": 989.4, "matmul_ceiling_tflops": 780.0,
                             "precision": "bf16 autocast, channels_last", "params_m": 97.95},
                   "rows": [{"branch": "ground", "input": "128x512", "batch": 256, "img_s": 5000.0,
                             "gflop_per_image": 54.33, "tflops": 271.7, "mfu": 0.275, "of_matmul_ceiling": 0.348,
                             "peak_memory_gib": 12.5, "bf16_max_abs_dev": 0.004}]},
        "search": {"setup": {"n": 1000000, "k": 10, "faiss": "1.15.1", "faiss_threads": 16, "copy_gbps": 4300.0},
                   "rows": [{"method": "torch exact (float32, cuda)", "dim": 768, "batch": 1, "qps": 900.0,
                             "ms_per_call": 1.1, "scan_gbps": 2790.0},
                            {"method": "torch exact (float16, cuda)", "dim": 768, "batch": 1, "qps": 1500.0,
                             "ms_per_call": 0.66, "scan_gbps": 2300.0, "recall_at_10_vs_float32": 0.998}]},
    }
    for name, results in records.items():
        (work / f"{name}.json").write_text(json.dumps({"step": name, "status": "ok", "results": results,
                                                       "errors": []}))
    (work / "load.json").write_text(json.dumps({"step": "load", "status": "running", "results": {}, "errors": []}))
    (work / "load.log").write_text("server starting\n")
    (work / "status.tsv").write_text("env\t0\t4\t30\nceilings\t0\t9\t30\nencode\t0\t41\t90\n"
                                     "load\t124\t110\t110\nsearch\t0\t30\t80\ntrain\tnot-started\t0\t0\n")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "device_check.py"), "report", "--work", str(work),
                           "--out", str(out), "--budget", "470", "--total", "200"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr  # a step ran out of time
    steps = json.loads((out / "device_check.json").read_text())["steps"]
    assert {n: s["status"] for n, s in steps.items()} == {
        "env": "ok", "ceilings": "ok", "encode": "ok", "train": "skipped", "load": "timeout", "search": "ok"}
    assert steps["load"]["log_tail"] == "server starting\n"
    md = (out / "device_check.md").read_text()
    assert "device run" in md and "NVIDIA H200" in md
    assert "| encode | ok | 41 (90) | paper: ground 5,000.0 img/s at batch 256 (MFU 0.275, 0.348 of the matmul" in md
    assert "| ground | 128x512 | 256 | 5,000.0 | 54.33 | 271.70 | 0.275 | 0.348 | 12.50 | 4.00e-03 |" in md
    assert "| load | **timeout** | 110 (110) |" in md and "| train | **skipped** |" in md
    assert "| torch exact (float16, cuda) | 768 | 1 | 1,500.0 | 0.66 | 2,300.0 | 0.998 |" in md

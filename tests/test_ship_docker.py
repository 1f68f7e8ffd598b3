"""docker/: the images and the compose stack, checked without a Docker engine.

What can be checked here is checked: compose.yaml parses and wires index-build -> api the way the
docs say, every build context, Dockerfile, COPY source and bind-mounted path exists (and is not
dropped by .dockerignore), the images run as a non-root user with a /readyz healthcheck and take
weights and index as volumes, and each container's command line runs locally against the venv with
the container paths mapped to temporary directories: the demo region, the index build, the API
until /readyz answers and the healthcheck script says healthy.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from ship_support import (PY, REPO, clean_env, copy_sources, demo_module, dockerfile_env, dockerfile_instructions,
                          dockerignore_patterns, exec_form, free_port, is_dockerignored, load_compose, post_image,
                          read_csv, run, server, stand_in_checkpoint)

DOCKER = REPO / "docker"
COMPOSE_DIR = DOCKER                       # compose resolves relative paths against the file's directory
CONTAINER_ROOTS = ("tiles", "weights", "index", "app")
SERVE_SERVICES = ("api", "api-gpu")
BUILD_SERVICES = ("index-build", "index-build-gpu")


def compose() -> dict:
    return load_compose({})


def settings_fields() -> set[str]:
    from service.settings import Settings

    return set(Settings.model_fields)


def dockerfiles() -> list[Path]:
    found = set()
    for svc in compose()["services"].values():
        build = svc.get("build")
        if build:
            found.add((COMPOSE_DIR / build["context"] / build.get("dockerfile", "Dockerfile")).resolve())
    return sorted(found)


# ------------------------------------------------------------------------------ static checks

def test_compose_parses_and_wires_index_build_before_api():
    c = compose()
    services = c["services"]
    assert {"index-build", "api"} <= set(services)
    for api, builder in (("api", "index-build"), ("api-gpu", "index-build-gpu")):
        dep = services[api]["depends_on"]
        assert dep[builder]["condition"] == "service_completed_successfully", api
        assert services[builder].get("restart") == "no", "index-build is a one-shot"
        # the builder publishes into a named volume that the API mounts at the same place
        out = services[builder]["command"][services[builder]["command"].index("--out") + 1]
        assert services[api]["environment"]["GEOLOC_INDEX"] == out
        builder_vols = {v.split(":")[1]: v.split(":")[0] for v in services[builder]["volumes"]}
        api_vols = {v.split(":")[1]: v.split(":")[0] for v in services[api]["volumes"]}
        mount = "/" + out.strip("/").split("/")[0]
        assert builder_vols[mount] == api_vols[mount], f"{builder} and {api} must share the volume at {mount}"
        assert api_vols[mount] in c["volumes"], "the index lives in a named volume"
        assert not services[builder]["volumes"][[v.split(":")[1] for v in services[builder]["volumes"]]
                                                .index(mount)].endswith(":ro"), "the builder writes it"
        # thumbnails: the API reads the indexed images at the paths the builder saw
        assert builder_vols["/tiles"] == api_vols["/tiles"]
        assert builder_vols["/weights"] == api_vols["/weights"]
        assert services[api]["environment"]["GEOLOC_CHECKPOINT"] == \
            services[builder]["command"][services[builder]["command"].index("--checkpoint") + 1]
        for port in services[api]["ports"]:
            assert str(port).startswith("127.0.0.1:"), "publish on loopback only by default"
        assert services[api]["healthcheck"]["test"][:2] == ["CMD", "python"]


def test_compose_gpu_profile_reserves_a_gpu():
    services = compose()["services"]
    gpu = {name: s for name, s in services.items() if "gpu" in (s.get("profiles") or [])}
    assert set(gpu) == {"index-build-gpu", "api-gpu"}
    for name, svc in gpu.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices), name
        assert svc["image"] == "l2ltr-geoloc:gpu"
    assert services["api-gpu"]["environment"]["GEOLOC_DEVICE"] == "cuda"
    assert services["index-build-gpu"]["command"][-2:] == ["--device", "cuda"]
    # the default (no profile) stack is the CPU one
    for name in ("demo-region", "index-build", "api"):
        assert not services[name].get("profiles"), name
        assert services[name]["image"] == "l2ltr-geoloc:cpu"


def test_each_image_is_built_by_one_service_and_the_stack_stops_and_builds_safely():
    """Several services building one tag race on a first `up --build` (bake: "already exists"); the
    builders' DataLoader workers need more than Docker's 64 MiB /dev/shm; `docker stop` waits for the
    service's 30 s graceful shutdown."""
    services = compose()["services"]
    builds = {name: svc["build"]["dockerfile"] for name, svc in services.items() if "build" in svc}
    assert builds == {"demo-region": "docker/Dockerfile.cpu", "index-build-gpu": "docker/Dockerfile.gpu"}
    for name, svc in services.items():
        assert svc.get("init") is True, name
    for name in ("index-build", "index-build-gpu"):
        assert services[name]["shm_size"] == "1gb", name
    for name in ("api", "api-gpu"):
        assert services[name]["stop_grace_period"] == "40s", name


def test_compose_paths_exist_and_volumes_are_declared():
    c = compose()
    declared = set(c.get("volumes") or {})
    for name, svc in c["services"].items():
        build = svc.get("build")
        if build:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_dockerfiles_copy_sources_exist_and_reach_the_context():
    patterns = dockerignore_patterns(REPO)
    assert patterns, ".dockerignore is missing"
    for dockerfile in dockerfiles():
        sources = copy_sources(dockerfile_instructions(dockerfile))
        assert sources, dockerfile
        for src in sources:
            path = REPO / src
            assert path.exists(), f"{dockerfile.name}: COPY source {src} does not exist"
            assert not is_dockerignored(src, patterns), f"{dockerfile.name}: {src} is excluded by .dockerignore"
            if path.is_dir():
                for f in path.rglob("*.py"):
                    rel = f.relative_to(REPO).as_posix()
                    assert not is_dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"
    # the context stays small: local state, data and weights never travel
    for heavy in (".venv", ".git", "demo", "data", "runs", "weights", "weights/l2ltr_tiny_demo.safetensors",
                  "model/__pycache__/x.pyc"):
        assert is_dockerignored(heavy, patterns), heavy


def test_dockerignore_matcher():
    pats = ["weights", "**/__pycache__", "docker/*.yaml", "!docker/keep.yaml"]
    assert is_dockerignored("weights/x.safetensors", pats)
    assert is_dockerignored("model/__pycache__/a.pyc", pats)
    assert is_dockerignored("docker/compose.yaml", pats)
    assert not is_dockerignored("docker/keep.yaml", pats)
    assert not is_dockerignored("docker/healthcheck.py", pats)
    assert not is_dockerignored("model/network.py", pats)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_runtime_contract(name):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    instr = dockerfile_instructions(DOCKER / name)
    kinds = [i for i, _ in instr]
    users = [a for i, a in instr if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must drop root"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "USER after the last RUN"
    # healthcheck: the script it runs is COPYed into the image and asks /readyz
    hc = next(a for i, a in instr if i == "HEALTHCHECK")
    hc_cmd = exec_form(hc[hc.index("CMD") + 3:])
    script = next(a for a in hc_cmd if a.endswith(".py"))
    copies = [a for i, a in instr if i == "COPY" and a.split()[-1] == script]
    assert copies, f"{script} is not copied into the image"
    assert "/readyz" in (REPO / copies[0].split()[-2]).read_text()
    # weights and index are volumes; the defaults point into them
    volumes = set()
    for i, a in instr:
        if i == "VOLUME":
            volumes |= set(eval(a) if a.startswith("[") else a.split())  # noqa: S307 (our own file)
    assert {"/weights", "/index"} <= volumes
    env = dockerfile_env(instr)
    assert env["GEOLOC_CHECKPOINT"].startswith("/weights/")
    assert env["GEOLOC_INDEX"].startswith("/index/")
    for key in env:
        if key.startswith("GEOLOC_"):
            assert key[len("GEOLOC_"):].lower() in settings_fields(), f"{key} is not a service setting"
    # the default command is the compose api's
    cmd = exec_form(next(a for i, a in instr if i == "CMD"))
    assert cmd == compose()["services"]["api"]["command"]
    # pins and extras agree with the Makefile and pyproject
    makefile = (REPO / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", makefile, re.M).group(1)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for i, a in instr if i == "ARG" and "=" in a}
    assert args["TORCH_SPEC"] == torch_spec
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = [a for i, a in instr if i == "RUN" and "/wheels/" in a and "pip install" in a]
    assert installs
    wanted = set(re.search(r"\[([a-z,]+)\]", installs[0]).group(1).split(","))
    assert wanted <= extras
    if name == "Dockerfile.gpu":
        base = args["CUDA_IMAGE"]
        assert base.startswith("nvidia/cuda:") and "runtime" in base
        assert "gpu" in wanted and "cu" in args["TORCH_INDEX_URL"]
        gpu_deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
        assert any(d.startswith("faiss-gpu") for d in gpu_deps)
        assert dockerfile_env(instr)["GEOLOC_DEVICE"] == "cuda"
    else:
        assert "cpu" in wanted and args["TORCH_INDEX_URL"].endswith("/cpu")
        from model.allocator import ALLOCATOR_ENV

        # set in the image, so the entry point need not start itself again with them
        assert {k: env.get(k) for k in ALLOCATOR_ENV} == ALLOCATOR_ENV


def test_every_geoloc_variable_in_compose_is_a_setting():
    fields = settings_fields()
    for name, svc in compose()["services"].items():
        for key in (svc.get("environment") or {}):
            if key.startswith("GEOLOC_"):
                assert key[len("GEOLOC_"):].lower() in fields, f"{name}: {key}"


def test_compose_demo_region_defaults_match_make_demo():
    demo = demo_module()
    text = (DOCKER / "compose.yaml").read_text()
    assert f"${{DEMO_SEED:-{demo.DEFAULT_SEED}}}" in text
    assert f"${{DEMO_AREA_KM2:-{demo.DEFAULT_AREA_KM2}}}" in text


# ------------------------------------------------------------------------------ the commands, run locally

def localise(value: str, roots: dict[str, Path]) -> str:
    """Map container paths (/tiles/..., /weights/..., /index/..., /app/...) to the local stand-ins."""
    pattern = re.compile(r'(?<![\w./-])/(' + "|".join(CONTAINER_ROOTS) + r')(?=/|$|[\s"\'])')
    return pattern.sub(lambda m: str(roots[m.group(1)]), value)


def local_argv(argv: list[str], roots: dict[str, Path], port: int | None = None) -> list[str]:
    out = [localise(a, roots) for a in argv]
    if out[0] == "python":
        out[0] = PY
    elif out[0] == "uvicorn":
        out = [PY, "-m", "uvicorn"] + out[1:]
    elif out[0] == "sh":
        out[2] = re.sub(r"(^|[;|&]\s*|\s)python(?= )", lambda m: m.group(1) + shlex.quote(PY), out[2])
    if "--host" in out:
        out[out.index("--host") + 1] = "127.0.0.1"     # tests only ever listen on loopback
    if port is not None and "--port" in out:
        out[out.index("--port") + 1] = str(port)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Run demo-region, index-build and api exactly as compose.yaml says, with container paths mapped."""
    base = tmp_path_factory.mktemp("compose")
    roots = {r: base / r for r in CONTAINER_ROOTS}
    for path in roots.values():
        path.mkdir()
    (roots["app"] / "healthcheck.py").write_bytes((DOCKER / "healthcheck.py").read_bytes())
    # a small region; every other variable keeps its compose default
    variables = {"DEMO_AREA_KM2": "0.04", "DEMO_WORKERS": "1"}
    c = load_compose(variables)
    services = c["services"]
    ckpt = services["index-build"]["command"][services["index-build"]["command"].index("--checkpoint") + 1]
    stand_in_checkpoint(Path(localise(ckpt, roots)))
    workdir = base / "cwd"                        # like /app in the image: no source tree around
    workdir.mkdir()
    env_cpu = clean_env(**{k: localise(v, roots)
                           for k, v in dockerfile_env(dockerfile_instructions(DOCKER / "Dockerfile.cpu")).items()})

    results = {}
    region_cmd = local_argv(services["demo-region"]["command"], roots)
    results["region_first"] = run(region_cmd, cwd=workdir, env=env_cpu, timeout=240)
    results["region_second"] = run(region_cmd, cwd=workdir, env=env_cpu, timeout=60)
    results["index"] = run(local_argv(services["index-build"]["command"], roots), cwd=workdir, env=env_cpu,
                           timeout=240)
    port = free_port()
    api_env = dict(env_cpu)
    api_env.update({k: localise(str(v), roots) for k, v in services["api"]["environment"].items()})
    api_cmd = local_argv(services["api"]["command"], roots, port)
    hc_cmd = local_argv(services["api"]["healthcheck"]["test"][1:], roots)
    hc_env = clean_env(HEALTHCHECK_URL=f"http://127.0.0.1:{port}/readyz")
    results["health_before"] = run(hc_cmd, cwd=workdir, env=hc_env, check=False, timeout=30)
    with server(api_cmd, env=api_env, cwd=workdir, port=port, log_path=base / "api.log") as (url, ready, _):
        results["ready"] = ready
        results["health"] = run(hc_cmd, cwd=workdir, env=hc_env, check=False, timeout=30)
        query = read_csv(roots["tiles"] / "world" / "queries.csv")[0]
        results["answer"] = post_image(url, roots["tiles"] / "world" / query["path"], k=3)
        results["tiles_csv"] = read_csv(roots["index"] / "current" / "tiles.csv")
    return roots, results


def test_demo_region_command_generates_then_reuses(stack):
    roots, results = stack
    assert (roots["tiles"] / "world" / "tiles.csv").is_file()
    assert "nothing to do" in results["region_second"].stdout


def test_index_build_command_publishes_into_the_volume(stack):
    roots, results = stack
    current = roots["index"] / "current"
    assert current.is_symlink(), "index_build publishes through a symlink"
    assert (current / "manifest.json").is_file() and (current / "index.faiss").is_file()
    # the link is relative, so the volume can be mounted anywhere (read-only in the api container)
    import os

    assert not os.path.isabs(os.readlink(current))


def test_api_command_serves_and_healthcheck_tracks_readiness(stack):
    _roots, results = stack
    assert results["health_before"].returncode == 1, "healthcheck must fail while nothing answers"
    assert results["health"].returncode == 0, results["health"].stderr
    assert results["ready"]["index"]["count"] == len(results["tiles_csv"])
    answer = results["answer"]
    assert len(answer["results"]) == 3
    assert {"tile_id", "lat", "lon", "score"} <= set(answer["results"][0])


def test_custom_catalogue_without_file_fails_early(tmp_path):
    c = load_compose({"CATALOG": "/tiles/mine.csv"})
    roots = {r: tmp_path / r for r in CONTAINER_ROOTS}
    roots["tiles"].mkdir()
    proc = run(local_argv(c["services"]["demo-region"]["command"], roots), cwd=tmp_path, check=False, timeout=30)
    assert proc.returncode == 1 and "no catalogue" in proc.stderr
    assert not (roots["tiles"] / "world").exists()


def test_gpu_index_build_flags_exist():
    """The GPU builder's extra flag is a real index_build option (its run needs a GPU: not here)."""
    help_text = run([PY, "-m", "index_build", "build", "--help"]).stdout
    for flag in [a for a in compose()["services"]["index-build-gpu"]["command"] if a.startswith("--")]:
        assert flag in help_text, flag


def test_healthcheck_script_rejects_a_server_that_is_not_ready(tmp_path):
    """A 503 /readyz (still loading) is unhealthy: a tiny stand-in server answers 503."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"status": "loading"}')

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        proc = subprocess.run([PY, str(DOCKER / "healthcheck.py")], capture_output=True, text=True, timeout=30,
                              env=clean_env(HEALTHCHECK_URL=f"http://127.0.0.1:{httpd.server_port}/readyz"))
    finally:
        httpd.shutdown()
    assert proc.returncode == 1 and "503" in proc.stderr

"""The README and the docs pages it links work as written.

The pages: README.md and every docs/*.md it links (each docs page must be linked). Every command in
a ```bash block or quoted inline in their prose is checked against the project: a module or script
accepts each option the page passes it (its --help lists it), make targets, compose files, profiles
and services, curl'd API routes, query parameters and form fields exist, GEOLOC_ variables are real
settings, and Python runs as `.venv/bin/python` (a fresh clone has no `python` with the project's
packages). Metric names and links are checked wherever they appear. Blocks preceded by
`<!-- readme-test: run -->` are executed verbatim in a sandbox that looks like a fresh checkout
after `make install`: the packages, a weights/ directory, `.venv` and a fresh data/, and no
`python` on PATH that could stand in for `.venv/bin/python`. The configuration table
(docs/CONFIGURATION.md) lists exactly the service's settings with their defaults; the compose
variable table (docs/DOCKER.md) only variables compose.yaml reads.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from ship_support import DEMO_CHECKPOINT, PY, REPO, clean_env, load_compose, run, stand_in_checkpoint

README = REPO / "README.md"
CONFIGURATION = REPO / "docs" / "CONFIGURATION.md"
DOCKER = REPO / "docs" / "DOCKER.md"
BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*(?P<mark>[\w-]+)\s*-->\s*\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
SEPARATORS = {"&&", "||", ";", "|"}
PACKAGES = ("model", "worldgen", "index_build", "service")
README_MAX_BYTES = 10 * 1024


def linked_docs() -> list[Path]:
    """The docs/*.md pages README.md links, in the order it first links them."""
    found: list[Path] = []
    for target in LINK.findall(README.read_text()):
        path = (REPO / target).resolve()
        if path.parent == REPO / "docs" and path.suffix == ".md" and path not in found:
            found.append(path)
    return found


def pages() -> list[Path]:
    return [README, *linked_docs()]


def rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def blocks(page: Path, lang: str = "bash") -> list[tuple[str | None, str]]:
    return [(m["mark"], m["body"]) for m in BLOCK.finditer(page.read_text()) if m["lang"] == lang]


def commands(body: str) -> list[list[str]]:
    """Simple commands of a block: continuations joined, comments dropped, split at && ; || |."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for tok in lexer:
            if tok in SEPARATORS:
                if current:
                    out.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            out.append(current)
    return out


# a bare `python` is quoted so that the check can refuse it
INLINE_PROGRAMS = ("make ", "python ", "python3 ", ".venv/bin/", "docker ", "curl ", "bash ")


def inline_commands(page: Path) -> list[list[str]]:
    """Commands quoted inline in the prose (`make demo DEMO_PORT=8001`), outside code blocks."""
    prose = BLOCK.sub("", page.read_text())
    spans = re.findall(r"`([^`\n]+)`", prose)
    return [cmd for span in spans if span.startswith(INLINE_PROGRAMS) for cmd in commands(span)]


def page_commands(page: Path) -> list[list[str]]:
    return [cmd for _, body in blocks(page) for cmd in commands(body)] + inline_commands(page)


def all_commands() -> list[tuple[str, list[str]]]:
    return [(rel(page), cmd) for page in pages() for cmd in page_commands(page)]


@lru_cache(maxsize=None)
def help_text(*argv: str) -> str:
    proc = run([*argv, "--help"], env=clean_env(), timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def settings_fields() -> dict:
    from service.settings import Settings

    return Settings.model_fields


def _query_params(dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_params(sub)
    return names


def api_routes() -> dict[tuple[str, str], set[str]]:
    """(method, path template) -> the route's query parameters."""
    from service import routes

    found = {}
    for router in (routes.api, routes.public, routes.admin):
        for route in router.routes:
            for method in route.methods:
                found[(method, route.path)] = _query_params(route.dependant)
    return found


def route_params(method: str, path: str) -> set[str] | None:
    """The query parameters of the route that answers ``method path``; None when none does."""
    for (m, template), params in api_routes().items():
        pattern = "^" + re.sub(r"\{[^}]+\}", r"[^/]+", template) + "$"
        if m == method and re.match(pattern, path):
            return params
    return None


def check_flags(cmd: list[str], help_out: str) -> None:
    for tok in cmd:
        if tok.startswith("--"):
            flag = tok.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_out), \
                f"the docs pass {flag} but `{' '.join(cmd[:4])} --help` does not list it"


def check_python(cmd: list[str]) -> None:
    if len(cmd) == 1:
        return  # the interpreter named, nothing run
    if cmd[1] == "-m":
        module = cmd[2]
        if module == "pytest":
            for tok in cmd[3:]:
                if not tok.startswith("-"):
                    assert (REPO / tok.split("::")[0]).exists(), tok
            return
        argv = [PY, "-m", module]
        rest = cmd[3:]
        if rest and not rest[0].startswith("-") and re.fullmatch(r"[a-z]+", rest[0]) and module == "index_build":
            argv.append(rest[0])
        check_flags(cmd, help_text(*argv))
    else:
        script = REPO / cmd[1]
        assert script.is_file(), cmd[1]
        check_flags(cmd, help_text(PY, str(script)))


def check_bash(cmd: list[str]) -> None:
    script = REPO / cmd[1]
    assert script.is_file() and script.suffix == ".sh", f"no shell script {cmd[1]}"
    if len(cmd) > 2:
        check_flags(cmd, help_text("bash", str(script)))


def check_make(cmd: list[str], env: dict[str, str]) -> None:
    targets = [t for t in cmd[1:] if "=" not in t and not t.startswith("-")]
    assigns = [t for t in cmd[1:] if "=" in t]
    makefile = (REPO / "Makefile").read_text()
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make target {target} does not exist"
        for a in assigns:
            assert re.search(rf"^{re.escape(a.split('=')[0])}\s*\?=", makefile, re.M), f"Makefile has no {a}"
        proc = run(["make", "-n", "-B", target, *assigns], env=clean_env(), check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr


def check_docker(cmd: list[str], env: dict[str, str]) -> None:
    if cmd[1] == "build":
        assert cmd[cmd.index("-f") + 1].startswith("docker/")
        assert (REPO / cmd[cmd.index("-f") + 1]).is_file()
        assert cmd[-1] == "."
        return
    assert cmd[1] == "compose", cmd
    assert (REPO / cmd[cmd.index("-f") + 1]).is_file()
    services = load_compose({})["services"]
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    if "--profile" in cmd:
        assert cmd[cmd.index("--profile") + 1] in profiles
    for var in env:
        if not var.startswith("GEOLOC_"):
            assert f"${{{var}" in (REPO / "docker" / "compose.yaml").read_text(), f"compose has no ${var}"
    sub = next(t for t in cmd[2:] if t in ("up", "run", "down", "build", "logs", "ps"))
    rest = cmd[cmd.index(sub) + 1:]
    names = [t for t in rest if not t.startswith("-")]
    for name in names:
        assert name in services, f"no compose service {name}"


def check_curl(cmd: list[str]) -> None:
    urls = [t for t in cmd if t.startswith("http")]
    assert len(urls) == 1, cmd
    url = urlsplit(urls[0])
    path = url.path or "/"
    fields = [cmd[i + 1].split("=", 1)[0] for i, t in enumerate(cmd) if t == "-F"]
    method = cmd[cmd.index("-X") + 1] if "-X" in cmd else ("POST" if fields else "GET")
    params = route_params(method, path)
    assert params is not None, f"the docs curl {method} {path}, which the API does not have"
    for name, _ in parse_qsl(url.query, keep_blank_values=True):
        assert name in params, f"the docs pass ?{name}= to {method} {path}, which takes only {sorted(params)}"
    if path == "/localize":
        assert set(fields) == {"image"}
    if path == "/localize/batch":
        assert set(fields) == {"images"}


def check_uvicorn(cmd: list[str]) -> None:
    assert cmd[1] == "service.app:app"
    check_flags(cmd, help_text(PY, "-m", "uvicorn"))


def check_command(cmd: list[str]) -> None:
    env = {}
    while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
        key, _, value = cmd.pop(0).partition("=")
        env[key] = value
    for key in env:
        if key.startswith("GEOLOC_"):
            assert key[len("GEOLOC_"):].lower() in settings_fields(), f"{key} is not a setting"
    prog = cmd[0]
    if prog == ".venv/bin/python":
        check_python(cmd)
    elif prog in ("python", "python3", "uvicorn", "pytest"):
        pytest.fail(f"the docs run a bare {prog!r}: a fresh clone has the project's packages only in .venv, "
                    f"write .venv/bin/{'python' if prog == 'python3' else prog}")
    elif prog == ".venv/bin/uvicorn":
        check_uvicorn(cmd)
    elif prog == "make":
        check_make(cmd, env)
    elif prog == "docker":
        check_docker(cmd, env)
    elif prog == "curl":
        check_curl(cmd)
    elif prog == "bash":
        check_bash(cmd)
    elif prog == "rm":
        assert cmd == ["rm", "-rf", ".venv"], cmd
    elif prog == "mkdir":
        assert cmd[1] == "-p" and all(not p.startswith("/") for p in cmd[2:]), cmd
    else:
        pytest.fail(f"the docs run {prog!r}; teach tests/test_ship_readme.py how to check it")


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The rows (cells, stripped) of the table whose header line starts with ``header``."""
    match = re.search(rf"^{re.escape(header)}.*\n\|[-| ]+\|\n((?:\|.*\n)+)", text, re.M)
    assert match, f"no table headed {header!r}"
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in match.group(1).splitlines()]


# ------------------------------------------------------------------------------ tests

def test_readme_has_the_two_commands_first():
    cmds = page_commands(README)
    assert cmds[:2] == [["make", "demo"], ["make", "test"]]


def test_readme_is_short_and_links_every_docs_page():
    assert len(README.read_bytes()) <= README_MAX_BYTES, "README.md: keep it to what a newcomer needs"
    every = sorted(p.resolve() for p in (REPO / "docs").glob("*.md"))
    assert sorted(linked_docs()) == every, "each docs/*.md page is linked from README.md (and so checked here)"
    assert {"CONFIGURATION.md", "DOCKER.md", "API.md"} <= {p.name for p in every}


@pytest.mark.parametrize("page,cmd", all_commands(), ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else x)
def test_documented_command_matches_the_project(page, cmd):
    check_command(list(cmd))


def test_configuration_table_lists_every_setting():
    rows = {cells[0].strip("`"): cells[1] for cells in markdown_table(CONFIGURATION.read_text(), "| variable |")}
    fields = settings_fields()
    assert set(rows) == {"GEOLOC_" + name.upper() for name in fields}
    for name, field in fields.items():
        default = field.default_factory() if field.default_factory else field.default
        if default is None:
            expected = "unset"
        elif default == []:
            expected = "empty"
        elif isinstance(default, bool):
            expected = f"`{str(default).lower()}`"
        else:
            expected = f"`{default}`"
        assert rows["GEOLOC_" + name.upper()] == expected, name


def test_service_options_table_matches_the_parser():
    rows = {cells[0].strip("`"): cells[1].strip("`") for cells in
            markdown_table(CONFIGURATION.read_text(), "| option |")}
    entries = re.split(r"\n  (?=-)", help_text(PY, "-m", "service").split("options:", 1)[1])
    described = {re.match(r"\s*(?:-\w, )?(--[a-z-]+)", e).group(1): " ".join(e.split()) for e in entries if e.strip()}
    described.pop("--help")
    assert set(rows) == set(described)
    for option, default in rows.items():
        assert f"(default: {default})" in described[option], option


def test_compose_variables_exist():
    compose_text = (REPO / "docker" / "compose.yaml").read_text()
    variables = [v for cells in markdown_table(DOCKER.read_text(), "| compose variable |")
                 for v in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])]
    assert len(variables) >= 8
    for var in variables:
        assert f"${{{var}" in compose_text, var


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_links_settings_and_metric_names_exist(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        path = (page.parent / target).resolve()
        if path == REPO / "docs" / "demo.png" and not path.exists() and not DEMO_CHECKPOINT.is_file():
            continue  # drawn by `make demo-picture` once the trained demo checkpoint is there
        assert path.exists(), f"{rel(page)} links {target}, which does not exist"
        assert REPO in path.parents, f"{rel(page)} links {target}, outside the repository"
    fields = settings_fields()
    for name in set(re.findall(r"\bGEOLOC_([A-Z0-9][A-Z0-9_]*)", text)):
        assert name.lower() in fields, f"{rel(page)} names GEOLOC_{name}, which is not a setting"
    metrics_src = (REPO / "service" / "metrics.py").read_text()
    for name in set(re.findall(r"\bgeoloc_[a-z_]+", text)):
        assert f'"{name}"' in metrics_src, f"{rel(page)} names metric {name}, which service/metrics.py does not define"


def _sandbox(root: Path) -> dict[str, str]:
    """``root`` made to look like a fresh checkout after `make install`; the environment to run in."""
    for pkg in PACKAGES:
        (root / pkg).symlink_to(REPO / pkg)
    weights = root / "weights"
    weights.mkdir()
    if DEMO_CHECKPOINT.is_file():
        (weights / DEMO_CHECKPOINT.name).symlink_to(DEMO_CHECKPOINT)
    else:
        stand_in_checkpoint(weights / DEMO_CHECKPOINT.name)
    if sys.prefix != sys.base_prefix:  # the tests run in a virtual environment: it is the checkout's .venv
        venv = Path(sys.prefix)
        (root / ".venv").symlink_to(venv)
    else:
        venv = root / ".venv"
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(sys.executable)
    # A newcomer's shell has no `python` that can import the project: the system's lacks its packages.
    # Stand-ins that fail loudly take that place, and the environment's own bin/ is off PATH.
    shadow = root / ".no-python"
    shadow.mkdir()
    for name in ("python", "python3"):
        stub = shadow / name
        stub.write_text("#!/bin/sh\necho \"plain $0 has none of the project's packages; the docs must say "
                        ".venv/bin/python\" >&2\nexit 127\n")
        stub.chmod(0o755)
    hidden = {str(Path(sys.executable).parent.resolve()), str((venv / "bin").resolve())}
    path = [str(shadow)] + [p for p in os.environ.get("PATH", "").split(os.pathsep)
                            if p and str(Path(p).resolve()) not in hidden]
    env = clean_env(PATH=os.pathsep.join(path))
    env.pop("PYTHONPATH", None)  # nothing but the checkout itself makes the packages importable
    env.pop("VIRTUAL_ENV", None)
    return env


def test_runnable_blocks_run(tmp_path):
    """The `readme-test: run` blocks of every page, verbatim, in a sandbox that looks like a checkout."""
    runnable = [(rel(page), body) for page in pages() for mark, body in blocks(page) if mark == "run"]
    assert runnable, "no block is marked runnable"
    env = _sandbox(tmp_path)
    probe = subprocess.run(["bash", "-c", "python -c 'import PIL' && echo found"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert "found" not in probe.stdout, "the sandbox must not offer a `python` with the project's packages"
    for page, body in runnable:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{page}: block failed:\n{body}\n--- stdout\n{proc.stdout[-3000:]}\n" \
                                     f"--- stderr\n{proc.stderr[-3000:]}"

"""The README's commands work as written.

Every command in a ```bash block is checked against the project: a module or script accepts each
option the README passes it (its --help lists it), make targets, compose files, profiles and services,
and curl'd API routes and form fields exist, GEOLOC_ variables are real settings. Blocks preceded by
`<!-- readme-test: run -->` are executed verbatim in a sandbox (the packages, a weights/ directory
and a fresh data/). The configuration table lists exactly the service's settings with their defaults.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from ship_support import DEMO_CHECKPOINT, PY, REPO, clean_env, load_compose, run, stand_in_checkpoint

README = REPO / "README.md"
BLOCK = re.compile(r"(?:<!--\s*readme-test:\s*(?P<mark>[\w-]+)\s*-->\s*\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)
SEPARATORS = {"&&", "||", ";", "|"}
PACKAGES = ("model", "worldgen", "index_build", "service")


def blocks(lang: str = "bash") -> list[tuple[str | None, str]]:
    return [(m["mark"], m["body"]) for m in BLOCK.finditer(README.read_text()) if m["lang"] == lang]


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


INLINE_PROGRAMS = ("make ", "python ", ".venv/bin/python ", "docker ", "curl ")


def inline_commands() -> list[list[str]]:
    """Commands quoted inline in the prose (`make demo DEMO_PORT=8001`), outside code blocks."""
    prose = BLOCK.sub("", README.read_text())
    spans = re.findall(r"`([^`\n]+)`", prose)
    return [cmd for span in spans if span.startswith(INLINE_PROGRAMS) for cmd in commands(span)]


def all_commands() -> list[list[str]]:
    return [cmd for _, body in blocks() for cmd in commands(body)] + inline_commands()


@lru_cache(maxsize=None)
def help_text(*argv: str) -> str:
    proc = run([*argv, "--help"], env=clean_env(), timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def settings_fields() -> dict:
    from service.settings import Settings

    return Settings.model_fields


def api_routes() -> set[tuple[str, str]]:
    from service import routes

    found = set()
    for router in (routes.api, routes.public, routes.admin):
        for route in router.routes:
            for method in route.methods:
                found.add((method, route.path))
    return found


def route_matches(method: str, path: str) -> bool:
    for m, template in api_routes():
        pattern = "^" + re.sub(r"\{[^}]+\}", r"[^/]+", template) + "$"
        if m == method and re.match(pattern, path):
            return True
    return False


def check_flags(cmd: list[str], help_out: str) -> None:
    for tok in cmd:
        if tok.startswith("--"):
            flag = tok.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_out), \
                f"README passes {flag} but `{' '.join(cmd[:4])} --help` does not list it"


def check_python(cmd: list[str]) -> None:
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
    path = re.sub(r"^https?://[^/]+", "", urls[0]).split("?")[0] or "/"
    fields = [cmd[i + 1].split("=", 1)[0] for i, t in enumerate(cmd) if t == "-F"]
    method = "POST" if fields else "GET"
    assert route_matches(method, path), f"README curls {method} {path}, which the API does not have"
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
    if prog in ("python", ".venv/bin/python"):
        check_python(cmd)
    elif prog in (".venv/bin/uvicorn", "uvicorn"):
        check_uvicorn(cmd)
    elif prog == "make":
        check_make(cmd, env)
    elif prog == "docker":
        check_docker(cmd, env)
    elif prog == "curl":
        check_curl(cmd)
    elif prog == "rm":
        assert cmd == ["rm", "-rf", ".venv"], cmd
    elif prog == "mkdir":
        assert cmd[1] == "-p" and all(not p.startswith("/") for p in cmd[2:]), cmd
    else:
        pytest.fail(f"README runs {prog!r}; teach tests/test_ship_readme.py how to check it")


# ------------------------------------------------------------------------------ tests

def test_readme_has_the_two_commands_first():
    cmds = all_commands()
    assert cmds[:2] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("cmd", all_commands(), ids=lambda c: " ".join(c)[:60])
def test_readme_command_matches_the_project(cmd):
    check_command(list(cmd))


def test_readme_configuration_table_lists_every_setting():
    table = re.search(r"^## Configuration\n(.*?)(?=^## )", README.read_text(), re.S | re.M).group(1)
    rows = dict(re.findall(r"^\| `(GEOLOC_[A-Z0-9_]+)` \| ([^|]*) \|", table, re.M))
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
        assert rows["GEOLOC_" + name.upper()].strip() == expected, name


def test_readme_compose_variables_exist():
    text = README.read_text()
    table = re.search(r"\| compose variable \|.*?\n\n", text, re.S).group(0)
    compose_text = (REPO / "docker" / "compose.yaml").read_text()
    variables = [v for row in table.splitlines()[2:] if row.startswith("|") for v in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])]
    assert len(variables) >= 8
    for var in variables:
        assert f"${{{var}" in compose_text, var


def test_readme_links_and_metric_names_exist():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if target.startswith("http"):
            continue
        if target == "docs/demo.png" and not (REPO / target).exists() and not DEMO_CHECKPOINT.is_file():
            continue  # drawn by `make demo-picture` once the trained demo checkpoint is there
        assert (REPO / target).exists(), f"README links {target}, which does not exist"
    metrics_src = (REPO / "service" / "metrics.py").read_text()
    for name in set(re.findall(r"`(geoloc_[a-z_]+)`", text)):
        assert f'"{name}"' in metrics_src, f"README names metric {name}, which service/metrics.py does not define"


def test_readme_runnable_blocks_run(tmp_path):
    """The `readme-test: run` blocks, verbatim, in a sandbox that looks like a checkout."""
    runnable = [body for mark, body in blocks() if mark == "run"]
    assert runnable, "no README block is marked runnable"
    for pkg in PACKAGES:
        (tmp_path / pkg).symlink_to(REPO / pkg)
    weights = tmp_path / "weights"
    weights.mkdir()
    if DEMO_CHECKPOINT.is_file():
        (weights / DEMO_CHECKPOINT.name).symlink_to(DEMO_CHECKPOINT)
    else:
        stand_in_checkpoint(weights / DEMO_CHECKPOINT.name)
    env = clean_env(PYTHONPATH=str(tmp_path), PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}")
    for body in runnable:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"README block failed:\n{body}\n--- stdout\n{proc.stdout[-3000:]}\n" \
                                     f"--- stderr\n{proc.stderr[-3000:]}"

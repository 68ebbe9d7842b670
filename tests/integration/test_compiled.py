"""The optional mypyc build of the hot path (scripts/compile.py).

A copy of the package is compiled in a temporary directory and the proxy's
integration tests run again with that copy first on the path: every sidecar
they start runs the compiled modules (the harness checks each one's `started`
log line, HMS_TEST_HOT_PATH). The rest of the suite covers the plain-Python
build, which stays the default.
"""

from __future__ import annotations

import ast
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.integration.harness import HOT_PATH_ENV, running_sidecar

REPO = Path(__file__).resolve().parents[2]
#: The proxy's integration tests: routing, failures and retries, early answers, HTTP
#: conformance, app-connection limits, header hygiene, streaming and drain, tunnels;
#: tracing (and its OTLP encoding) and metrics, whose modules are compiled too.
PROXY_TESTS = (
    "test_routing.py",
    "test_failures.py",
    "test_early_answers.py",
    "test_http_conformance.py",
    "test_app_connections.py",
    "test_proxy_headers.py",
    "test_streaming_and_lifecycle.py",
    "test_websocket.py",
    "test_tracing.py",
    "test_metrics.py",
)
#: scripts/compile.py's HOT files, and the modules they are, as imported.
HOT: tuple[str, ...] = runpy.run_path(str(REPO / "scripts" / "compile.py"))["HOT"]
COMPILED = tuple(name.removesuffix(".py").replace("/", ".") for name in HOT)

#: A module-level constant by its name: `LIMIT`, `_PAUSE_QUEUE`.
CONSTANT = re.compile(r"^_?[A-Z][A-Z0-9_]*$")


def _is_final(annotation: ast.expr) -> bool:
    if isinstance(annotation, ast.Subscript):
        annotation = annotation.value
    return isinstance(annotation, ast.Name) and annotation.id == "Final"


def test_the_compiled_modules_constants_are_final() -> None:
    """Every module-level constant of the compiled modules is declared `Final`: mypyc
    keeps a Final name in a C static, and looks any other up in the module's dict on
    every use (two dozen such lookups a request cost the compiled build about 4 % of
    its throughput; docs/performance.md)."""
    plain: list[str] = []
    for name in HOT:
        for node in ast.parse((REPO / name).read_text()).body:
            if isinstance(node, ast.Assign):
                targets = [
                    leaf
                    for target in node.targets
                    for leaf in (target.elts if isinstance(target, ast.Tuple) else [target])
                ]
            elif isinstance(node, ast.AnnAssign) and not _is_final(node.annotation):
                targets = [node.target]
            else:
                continue
            plain += [
                f"{name}:{node.lineno} {leaf.id}"
                for leaf in targets
                if isinstance(leaf, ast.Name) and CONSTANT.match(leaf.id)
            ]
    assert [] == plain


needs_compiler = pytest.mark.skipif(
    shutil.which("gcc") is None
    or not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
    reason="the compiled build needs gcc and the Python headers",
)


async def test_the_default_build_is_plain_python_and_says_so(tmp_path: Path) -> None:
    """Without scripts/compile.py the sidecar runs as Python, and its `started` line
    tells (`hot_path`), as it tells a compiled build (the runs below)."""
    from sidecar.proxy import server  # noqa: PLC0415 - the package as this run imports it

    assert "python" == server.hot_path_build()
    async with running_sidecar(tmp_path, {"billing": {"endpoints": ["127.0.0.1:9"]}}) as sc:
        await sc.wait_hot_path("python", 15.0)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled copy of the package; its directory."""
    root = tmp_path_factory.mktemp("compiled")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compile.py"), "--root", str(root), "--copy"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return root


@needs_compiler
def test_the_copy_imports_the_compiled_modules(compiled: Path) -> None:
    probe = (
        "import importlib\n"
        "from sidecar.proxy import server\n"
        f"names = {COMPILED!r}\n"
        "print(server.hot_path_build(), *(importlib.import_module(n).__file__ for n in names))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=compiled, capture_output=True, text=True, check=True
    )
    build, *files = done.stdout.split()
    assert build == "compiled"
    assert [Path(f).name.split(".")[0] for f in files] == [n.rsplit(".", 1)[1] for n in COMPILED]
    assert all(f.endswith(".so") for f in files), files


@needs_compiler
@pytest.mark.parametrize("module", PROXY_TESTS)
def test_the_proxy_integration_tests_pass_on_the_compiled_build(
    compiled: Path, module: str
) -> None:
    """One module per run: the ten together took 117 s on a slow 2-vCPU machine, at the
    edge of the suite's 120 s limit for one test."""
    tests = [str(REPO / "tests" / "integration" / module)]
    env = {**os.environ, HOT_PATH_ENV: "compiled"}
    options = ["-q", "-p", "no:cacheprovider", "-x", "--rootdir", str(REPO)]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *options, "-c", str(REPO / "pyproject.toml"), *tests],
        cwd=compiled,  # `python -m sidecar` in every test finds the compiled copy first
        env=env,
        capture_output=True,
        text=True,
        timeout=110,  # below the suite's limit: a hung run is killed, not left behind
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]

"""Compile the proxy's hot path with mypyc: an optional build, next to the Python.

The modules every proxied request runs through (`HOT`) are compiled by mypyc into
C extensions placed beside their `.py` files (one shared library,
`sidecar/proxy/_hot__mypyc.*.so`, and one small module per file). Python imports
an extension before a source file of the same name, so the sidecar runs compiled
from then on; `--clean` removes them and it runs as plain Python again. Nothing
else changes: the same source, already checked by `mypy --strict`, is what mypyc
compiles. Measured gain and the reasons are in docs/performance.md.

    .venv/bin/python scripts/compile.py            # compile in this checkout
    .venv/bin/python scripts/compile.py --clean    # back to plain Python
    .venv/bin/python scripts/compile.py --root DIR # compile the package under DIR
    .venv/bin/python scripts/compile.py --root DIR --copy  # copy this one there first

Needs what `pip install -e '.[dev]'` installs (mypy, which ships mypyc, and
setuptools), a C compiler and the Python headers (Debian: gcc, python3-dev).
Module-level constants of these modules are declared `Final`: mypyc keeps those in C
statics and looks any other name up in the module's dict on every use
(tests/integration/test_compiled.py checks it).
The unit tests run on plain Python (they patch and subclass these classes,
which compiled classes do not allow); tests/integration/test_compiled.py runs the
proxy's integration tests against a compiled copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: What each request runs through; compiled together so calls between them stay native.
HOT = (
    "sidecar/proxy/headers.py",
    "sidecar/proxy/forward.py",
    "sidecar/proxy/balancer.py",
    "sidecar/proxy/resilience.py",
    "sidecar/proxy/upstream.py",
    "sidecar/proxy/server.py",
    # Every request begins a trace context and counts in the metrics; a sampled one's
    # spans are encoded on the event loop.
    "sidecar/telemetry/tracing.py",
    "sidecar/telemetry/metrics.py",
    "sidecar/telemetry/otlp.py",
)
#: The shared library's module (`sidecar/proxy/_hot__mypyc...so`), inside the package
#: so it is found wherever the package is installed.
GROUP = "sidecar.proxy._hot"


def built(root: Path) -> list[Path]:
    """The compiled files of the hot path under `root`."""
    stems = [root / Path(name).with_suffix("") for name in HOT]
    stems.append(root / "sidecar" / "proxy" / "_hot__mypyc")
    return sorted(path for stem in stems for path in stem.parent.glob(f"{stem.name}.*.so"))


def clean(root: Path) -> None:
    for path in built(root):
        path.unlink()
        print(f"removed {path.relative_to(root)}")


def compile_hot_path(root: Path) -> None:
    # Imported here: --clean must work without the build tools.
    from mypyc.build import mypycify  # noqa: PLC0415
    from setuptools import setup  # noqa: PLC0415

    clean(root)  # a stale extension of one module must not shadow a new build of another
    with tempfile.TemporaryDirectory(prefix="sidecar-compile-") as tmp:
        # setuptools reads the project files of the current directory; build from an
        # empty one that only shows the package, so `--inplace` writes into `root`.
        (Path(tmp) / "sidecar").symlink_to(root / "sidecar")
        os.chdir(tmp)
        extensions = mypycify(
            ["--config-file", str(REPO / "pyproject.toml"), *HOT],
            separate=[(list(HOT), GROUP)],
            opt_level="3",
        )
        setup(
            name="sidecar-hot-path",
            ext_modules=extensions,
            script_args=["build_ext", "--inplace", "--quiet"],
        )
    for path in built(root):
        print(f"built {path.relative_to(root)}")


def copy_package(root: Path) -> None:
    """This checkout's package into `root` (created), without caches or extensions."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(REPO / "sidecar", root / "sidecar", ignore=ignore)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="the directory holding sidecar/")
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules")
    parser.add_argument(
        "--copy", action="store_true", help="copy this checkout's package to --root first"
    )
    args = parser.parse_args()
    root = args.root.resolve()
    if args.copy:
        if (root / "sidecar").exists():
            print(f"compile: --copy: {root / 'sidecar'} exists already", file=sys.stderr)
            return 2
        copy_package(root)
    if not (root / "sidecar" / "proxy" / "server.py").is_file():
        print(f"compile: no sidecar package under {root}", file=sys.stderr)
        return 2
    if args.clean:
        clean(root)
    else:
        compile_hot_path(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())

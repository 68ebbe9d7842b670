"""The image's entrypoint works: run from a venv that the Dockerfile's own builder stage
built on this machine (there is no Docker engine in the test run).

`tests.dockerfile.build_stage` runs the builder's RUN lines as they are written (the lock
files, `--require-hashes`, `--only-binary`, the wheel built with the locked setuptools,
`compileall`), with the venv in the pytest cache instead of /opt/venv; a second run reuses
it while the stage, the files it copies and the interpreter are unchanged. The sidecar
then runs as `ENTRYPOINT` + `CMD` with the final stage's ENV (the paths moved the same
way) and as the image runs it under `readOnlyRootFilesystem`: with a mount namespace
(root with CAP_SYS_ADMIN) every mount but /tmp, /proc, /sys and /dev is read-only;
otherwise the venv loses its write bits (which binds only a non-root user). Either way,
the venv is compared before and after and HOME must stay uncreated.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import runpy
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from sidecar import __version__
from tests.dockerfile import (
    BASE_IMAGE_PATH,
    ROOT,
    RUNTIME_LOCK,
    Stage,
    base_python_version,
    build_stage,
    context_files,
    marker_environment,
    read_dockerfile,
    read_lock,
    stage_fingerprint,
)
from tests.integration.conftest import UpstreamFactory
from tests.integration.harness import free_port

#: Where the image keeps what the tests move: the venv and the spool volume.
IMAGE_VENV = "/opt/venv"
IMAGE_SPOOL_DIR = "/var/lib/sidecar"


@dataclass(frozen=True)
class ImageBuild:
    """The builder stage's venv on this machine, and the final stage that runs it."""

    venv: Path
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def command(self, *args: str) -> list[str]:
        """`docker run image [args]`: ENTRYPOINT, then `args` or else CMD."""
        entrypoint = self.final.last("ENTRYPOINT").json_list()
        return entrypoint + (list(args) or self.final.last("CMD").json_list())

    def env(self, spool_dir: Path, home: Path, **extra: str) -> dict[str, str]:
        """The container's environment: the base image's, the final stage's ENV with the
        image's paths moved to this machine's, and HOME as Docker sets it for a user
        whose home does not exist."""
        base = {"PATH": BASE_IMAGE_PATH, "LANG": "C.UTF-8", "HOME": str(home)}
        env = self.final.env(base)
        moved = {IMAGE_VENV: str(self.venv), IMAGE_SPOOL_DIR: str(spool_dir)}
        for key in env:
            for image_path, here in moved.items():
                env[key] = env[key].replace(image_path, here)
        return env | extra

    @property
    def site_packages(self) -> Path:
        (path,) = self.venv.glob("lib/python3.*/site-packages")
        return path


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ImageBuild:
    """The builder stage, run once per change of its inputs (kept in the pytest cache)."""
    stages = read_dockerfile()
    builder = next(s for s in stages if s.name == "builder")
    # Untracked files count too, as in a developer's `docker build .`.
    context = context_files(tracked_only=False)
    try:
        cache = Path(request.config.cache.mkdir("image-build"))
    except AttributeError:  # -p no:cacheprovider
        cache = tmp_path_factory.mktemp("image-build")
    # The venv's scripts name its interpreter by absolute path: a moved cache is a new key.
    key = stage_fingerprint(builder, context, {"cache": str(cache)})
    root = cache / key
    venv = root / IMAGE_VENV.lstrip("/")
    if not (root / "complete").exists():
        for stale in cache.iterdir():
            _make_writable(stale)
            shutil.rmtree(stale)
        root.mkdir()
        build_stage(builder, context, root, {"VENV": str(venv)}, root / "build.log")
        (root / "complete").write_text(key + "\n")
    return ImageBuild(venv, stages)


def _make_writable(path: Path) -> None:
    for entry in [path, *path.rglob("*")]:
        if not entry.is_symlink():
            entry.chmod(entry.stat().st_mode | stat.S_IWUSR)


def _tree(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `path` with its mode, size and modification time."""
    state = {}
    for entry in [path, *path.rglob("*")]:
        info = entry.lstat()
        state[str(entry.relative_to(path))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return state


def _mount_namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


def _read_only_root(command: list[str], writable: list[Path]) -> list[str]:
    """`command` in a mount namespace of its own where every mount is read-only except
    `writable` (bound onto themselves first) and /proc, /sys and /dev. The shell execs
    the command, so its pid is the sidecar's."""
    binds = " && ".join(
        f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))}" for p in writable
    )
    keep = " | ".join(shlex.quote(str(p)) for p in writable)
    script = f"""
set -e
{binds}
awk '{{print $5}}' /proc/self/mountinfo | sort -u | while read -r point; do
    case "$point" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|{keep}) continue ;; esac
    mount -o remount,bind,ro "$point" 2>/dev/null || [ "$point" != / ]
done
exec "$@"
"""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command]


@contextlib.contextmanager
def _venv_read_only(venv: Path) -> Iterator[None]:
    """Without a mount namespace: the venv's write bits off (binding for a non-root user)."""
    for entry in [venv, *venv.rglob("*")]:
        if not entry.is_symlink():
            entry.chmod(entry.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        _make_writable(venv)


def _run(
    image: ImageBuild, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        image.command(*args),
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _config(app_port: int, admin_port: int, endpoints: list[str]) -> dict[str, Any]:
    return {
        "service": {"name": "image-test", "port": 8080},
        "listen": f"127.0.0.1:{app_port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "consul": {"enabled": False},
        "upstreams": {"billing": {"endpoints": endpoints}},
        "shutdown": {"drain": "0s", "grace": "5s"},
    }


class TestImageVenv:
    def test_the_hot_path_is_compiled(self, image: ImageBuild) -> None:
        """The builder ran scripts/compile.py on the installed package: every hot-path
        module has its C extension (and its source, kept for tracebacks), built for the
        image's Python."""
        package = image.site_packages
        compile_script = runpy.run_path(str(ROOT / "scripts" / "compile.py"))
        hot: tuple[str, ...] = compile_script["HOT"]
        suffix = sysconfig.get_config_var("EXT_SUFFIX")  # the image's Python is this one
        expected = sorted(
            [
                *(f"{Path(name).with_suffix('')}{suffix}" for name in hot),
                f"sidecar/proxy/_hot__mypyc{suffix}",
            ]
        )
        built = package.glob("sidecar/**/*.so")
        assert expected == sorted(str(p.relative_to(package)) for p in built)
        assert all((package / name).exists() for name in hot)

    def test_holds_exactly_the_locked_packages_and_the_project(self, image: ImageBuild) -> None:
        """The venv holds the project and exactly the lock's packages at the lock's
        versions, every requirement of each is met (`pip check`), and every locked
        package is needed by the project: the lock has nothing missing and nothing extra."""
        lock = read_lock(RUNTIME_LOCK)
        installed = {
            canonicalize_name(d.metadata["Name"]): d.version
            for d in importlib.metadata.distributions(path=[str(image.site_packages)])
        }
        check = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(image.venv / "bin" / "python"), "check"],
            capture_output=True,
            text=True,
            check=False,
        )
        environment = marker_environment(base_python_version(image.stages))
        needed = _closure(image.site_packages, canonicalize_name("hms-sidecar"), environment)
        expected = {name: pin.version for name, pin in lock.items()} | {"hms-sidecar": __version__}
        assert (0, expected) == (check.returncode, installed), check.stdout + check.stderr
        assert sorted(lock) == sorted(needed - {"hms-sidecar"})

    def test_every_module_is_compiled_without_a_source_check(self, image: ImageBuild) -> None:
        """Every module in the venv has its bytecode, hash-based and never checked against
        the source, so nothing is compiled (or written) when the sidecar imports it."""
        tag = sys.implementation.cache_tag
        missing, checked = [], []
        for source in image.venv.rglob("*.py"):
            compiled = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
            if not compiled.exists():
                missing.append(str(source.relative_to(image.venv)))
                continue
            with compiled.open("rb") as file:
                flags = int.from_bytes(file.read(8)[4:8], "little")
            if flags != 0b01:  # hash-based (bit 0), check_source off (bit 1)
                checked.append(str(source.relative_to(image.venv)))
        assert ([], []) == (missing[:5], checked[:5])


def _closure(
    site_packages: Path, root: NormalizedName, environment: dict[str, str]
) -> set[NormalizedName]:
    """The distributions `root` needs, from their installed metadata and markers."""
    metadata = {
        canonicalize_name(d.metadata["Name"]): d
        for d in importlib.metadata.distributions(path=[str(site_packages)])
    }
    needed: set[NormalizedName] = set()
    pending: list[tuple[NormalizedName, frozenset[str]]] = [(root, frozenset())]
    while pending:
        name, extras = pending.pop()
        if name in needed and not extras:
            continue
        needed.add(name)
        for text in metadata[name].requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            wanted = marker is None or any(
                marker.evaluate(environment | {"extra": extra}) for extra in {"", *extras}
            )
            if wanted:
                pending.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return needed


class TestEntrypoint:
    def test_check_config_reads_the_mounted_file(self, image: ImageBuild, tmp_path: Path) -> None:
        """`docker run image check-config` with the config file where SIDECAR_CONFIG points
        (the chart mounts it at /etc/sidecar/sidecar.yaml) validates it and exits 0."""
        config = tmp_path / "sidecar.yaml"
        config.write_text(yaml.safe_dump(_config(free_port(), free_port(), ["127.0.0.1:9"])))
        env = image.env(tmp_path / "spool", tmp_path / "nonexistent", SIDECAR_CONFIG=str(config))
        done = _run(image, ["check-config"], env)
        assert (0, f"config OK: {config}") == (done.returncode, done.stdout.splitlines()[0])

    def test_without_a_config_it_says_what_is_missing(
        self, image: ImageBuild, tmp_path: Path
    ) -> None:
        """`docker run image` with neither a file nor SIDECAR_* variables exits 64 naming
        the required setting, instead of starting or printing a traceback."""
        done = _run(image, [], image.env(tmp_path / "spool", tmp_path / "nonexistent"))
        assert (64, "") == (done.returncode, done.stdout)
        assert "service.name: required" in done.stderr
        assert "Traceback" not in done.stderr

    async def test_runs_on_a_read_only_root_and_stops_on_sigterm(
        self, image: ImageBuild, tmp_path: Path, upstreams: UpstreamFactory
    ) -> None:
        """`docker run image` (ENTRYPOINT + CMD, the image's ENV) on a read-only root
        filesystem, as user code that may write only /tmp and the spool volume: it gets
        ready, proxies to its upstream, spools an event in the volume (no broker), and
        exits 0 on SIGTERM; the venv is unchanged and no HOME was created."""
        billing = await upstreams("billing")
        app_port, admin_port = free_port(), free_port()
        config = tmp_path / "etc-sidecar" / "sidecar.yaml"
        config.parent.mkdir()
        config.write_text(yaml.safe_dump(_config(app_port, admin_port, [billing.endpoint])))
        spool_dir, home = tmp_path / "var-lib-sidecar", tmp_path / "nonexistent"
        spool_dir.mkdir(mode=0o700)
        env = image.env(
            spool_dir,
            home,
            SIDECAR_CONFIG=str(config),
            SIDECAR_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",  # nothing there
        )
        command = image.command()
        with contextlib.ExitStack() as stack:
            if _mount_namespaces_work():
                command = _read_only_root(command, [Path(tempfile.gettempdir()), spool_dir])
            else:
                stack.enter_context(_venv_read_only(image.venv))
            before = await asyncio.to_thread(_tree, image.venv)
            with _running(command, env, tmp_path / "sidecar.log") as proc:
                admin = f"http://127.0.0.1:{admin_port}"
                app = f"http://127.0.0.1:{app_port}"
                async with aiohttp.ClientSession() as session:
                    await _wait_ready(session, admin, proc, tmp_path / "sidecar.log")
                    async with session.get(f"{app}/v1/invoke/billing/echo/hi") as resp:
                        proxied = (resp.status, (await resp.json())["instance"])
                    async with session.post(f"{app}/v1/publish/image.test", data=b"{}") as resp:
                        published = (resp.status, (await resp.json())["status"])
                    async with session.get(f"{admin}/v1/status") as resp:
                        spool_path = (await resp.json())["events"]["spool"]["path"]
                proc.send_signal(signal.SIGTERM)
                code = await _wait_exit(proc, 30)
            after = await asyncio.to_thread(_tree, image.venv)
        logs = (tmp_path / "sidecar.log").read_text()
        assert (200, "billing") == proxied
        assert (202, "spooled") == published
        assert str(spool_dir / "spool.db") == spool_path
        assert 0 == code, logs
        assert "spool.db" in os.listdir(spool_dir)
        assert before == after
        assert not home.exists()
        assert "Traceback" not in logs
        started = [e for e in map(json.loads, logs.splitlines()) if e.get("event") == "started"]
        assert ["compiled"] == [e.get("hot_path") for e in started]


@contextlib.contextmanager
def _running(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The command started, its output in `log`; killed and reaped on exit if still running."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd="/", stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _wait_ready(
    session: aiohttp.ClientSession, admin: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll /ready until 200; fail with the sidecar's output if it exits or never gets there."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"sidecar exited {proc.returncode}:\n{output}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{admin}/ready") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    output = await asyncio.to_thread(log.read_text)
    raise AssertionError(f"sidecar not ready after 30 s:\n{output}")


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"sidecar did not exit within {timeout} s of SIGTERM")
        await asyncio.sleep(0.05)
    return proc.returncode

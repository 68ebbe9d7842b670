"""The `sidecar` command line: subcommands, exit codes and config error reporting (SPEC §2)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from sidecar import __version__
from sidecar.cli import main
from sidecar.config import ENV_VARS, Config
from sidecar.errors import ConfigError

GOOD_YAML = """\
service: {name: permits, address: 10.0.0.1}
listen: 127.0.0.1:4001
consul: {enabled: false}
upstreams:
  billing: {endpoints: ["10.0.0.2:8080"]}
  audit: {endpoints: ["10.0.0.3:8080"]}
"""

BAD_YAML = """\
service:
  port: 80800
listen: 127.0.0.1
consul: {enabled: false}
upstreams:
  billing:
    endpoints: ["10.0.0.2:8080"]
    timeout: ten
    timout: 3s
    retries: {on: [connect-failure, 502, teapot]}
"""

BAD_PROBLEMS = [
    "service.name: required",
    "service.port: must be between 1 and 65535, got 80800",
    "listen: invalid address '127.0.0.1' (expected host:port)",
    "upstreams.billing.timeout: invalid duration 'ten'",
    "upstreams.billing.retries.on[2]: unknown condition 'teapot' "
    "(expected connect-failure, timeout, reset, 5xx or a status 500-599)",
    "upstreams.billing.timout: unknown key",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SIDECAR_* or CONSUL_* variable from the outer environment leaks into a test."""
    for var in ENV_VARS:
        monkeypatch.delenv(var.name, raising=False)


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_YAML)
    return path


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_YAML)
    return path


class FakeApp:
    """Stands in for `sidecar.app` so `run` can be tested without starting anything."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, exit_code: int = 0) -> None:
        self.configs: list[Config] = []
        self.logging: list[tuple[str, str]] = []
        self.exit_code = exit_code
        self.error: ConfigError | None = None
        module = types.ModuleType("sidecar.app")
        module.run_app = self.run_app  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "sidecar.app", module)
        monkeypatch.setattr("sidecar.cli.configure_logging", self.configure_logging)

    def configure_logging(self, log_format: str, log_level: str) -> None:
        self.logging.append((log_format, log_level))

    def run_app(self, config: Config) -> int:
        self.configs.append(config)
        if self.error is not None:
            raise self.error
        return self.exit_code


class TestVersion:
    def test_prints_the_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`sidecar version` prints the distribution name and version and exits 0."""
        assert 0 == main(["version"])
        assert f"hms-sidecar {__version__}\n" == capsys.readouterr().out


class TestUsage:
    @pytest.mark.parametrize(
        "argv", [[], ["bogus"], ["check-config", "--nope"], ["run", "-c"], ["version", "extra"]]
    )
    def test_usage_errors_exit_64(
        self, argv: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A usage error prints usage and the message to stderr and exits 64, not 2."""
        assert 64 == main(argv)
        err = capsys.readouterr().err
        assert err.startswith("usage: sidecar")
        assert "error: " in err

    def test_help_exits_0(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help lists the subcommands and exits 0."""
        assert 0 == main(["--help"])
        out = capsys.readouterr().out
        assert all(command in out for command in ("run", "check-config", "version"))


class TestCheckConfig:
    def test_valid_config_prints_ok_and_a_summary(
        self, good_file: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A valid file prints `config OK: <file>` and a one-line summary, exit 0."""
        assert 0 == main(["check-config", "-c", str(good_file)])
        captured = capsys.readouterr()
        assert [
            f"config OK: {good_file}",
            "service permits, listen 127.0.0.1:4001, admin 0.0.0.0:9902, "
            "2 upstream(s): billing, audit",
        ] == captured.out.splitlines()
        assert "" == captured.err

    def test_invalid_config_lists_every_problem(
        self, bad_file: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each problem is printed on its own indented line under a count, exit 64."""
        assert 64 == main(["check-config", "--config", str(bad_file)])
        captured = capsys.readouterr()
        expected = [f"config error: {len(BAD_PROBLEMS)} problem(s) in {bad_file}"]
        assert expected + [f"  {p}" for p in BAD_PROBLEMS] == captured.err.splitlines()
        assert "" == captured.out

    def test_file_defaults_to_sidecar_config(
        self, good_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without -c, $SIDECAR_CONFIG names the file."""
        monkeypatch.setenv("SIDECAR_CONFIG", str(good_file))
        assert 0 == main(["check-config"])
        assert f"config OK: {good_file}" == capsys.readouterr().out.splitlines()[0]

    def test_without_a_file_env_and_defaults_are_checked(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With no file at all, the config comes from env and defaults: `(defaults)`."""
        monkeypatch.setenv("SIDECAR_SERVICE_NAME", "orders")
        monkeypatch.setenv("SIDECAR_SERVICE_ADDRESS", "10.0.0.1")
        monkeypatch.setenv("SIDECAR_CONSUL_ENABLED", "false")
        assert 0 == main(["check-config"])
        assert "config OK: (defaults)" == capsys.readouterr().out.splitlines()[0]

    def test_a_meta_key_consul_would_refuse_is_exit_64(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A dotted meta key fails check-config, not a 400 from Consul at registration."""
        path = tmp_path / "meta.yaml"
        path.write_text(
            "service: {name: permits, port: 8080, meta: {app.version: '1'}}\n"
            "upstreams: {billing: {}}\n"
        )
        assert 64 == main(["check-config", "-c", str(path)])
        assert [
            f"config error: 1 problem(s) in {path}",
            "  service.meta.app.version: key may only hold letters, digits, '_' and '-' "
            "(Consul rejects others)",
        ] == capsys.readouterr().err.splitlines()

    def test_missing_file_is_a_config_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file that cannot be read is one problem, exit 64."""
        path = tmp_path / "missing.yaml"
        assert 64 == main(["check-config", "-c", str(path)])
        assert [
            f"config error: 1 problem(s) in {path}",
            f"  {path}: cannot read config file (No such file or directory)",
        ] == capsys.readouterr().err.splitlines()

    def test_summary_never_shows_the_token(
        self, good_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The Consul token stays out of check-config's output."""
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cr3t-token")
        assert 0 == main(["check-config", "-c", str(good_file)])
        captured = capsys.readouterr()
        assert "s3cr3t-token" not in captured.out + captured.err


class TestRun:
    def test_runs_the_app_with_the_loaded_config(
        self, good_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`run` configures logging from the config, then returns run_app's exit code."""
        app = FakeApp(monkeypatch, exit_code=1)
        monkeypatch.setenv("SIDECAR_LOG_FORMAT", "console")
        assert 1 == main(["run", "-c", str(good_file)])
        assert [("console", "info")] == app.logging
        assert ["permits"] == [config.service.name for config in app.configs]

    def test_bad_config_never_starts_the_app(
        self, bad_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A config error is printed like check-config's, exit 64, and nothing starts."""
        app = FakeApp(monkeypatch)
        assert 64 == main(["run", "-c", str(bad_file)])
        assert [] == app.configs
        assert [] == app.logging
        err = capsys.readouterr().err
        assert f"config error: {len(BAD_PROBLEMS)} problem(s) in {bad_file}" in err
        assert "Traceback" not in err

    def test_config_error_from_the_app_exits_64(
        self, good_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A ConfigError found while building components is reported, not raised."""
        app = FakeApp(monkeypatch)
        app.error = ConfigError(["upstreams.billing.listen: cannot bind"])
        assert 64 == main(["run", "-c", str(good_file)])
        assert [
            f"config error: 1 problem(s) in {good_file}",
            "  upstreams.billing.listen: cannot bind",
        ] == capsys.readouterr().err.splitlines()


class TestProcess:
    def test_check_config_in_a_real_process(self, bad_file: Path) -> None:
        """`python -m sidecar check-config -c bad.yaml` exits 64, lists all, no traceback."""
        env = {k: v for k, v in os.environ.items() if k not in {var.name for var in ENV_VARS}}
        result = subprocess.run(
            [sys.executable, "-m", "sidecar", "check-config", "-c", str(bad_file)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert 64 == result.returncode
        assert all(problem in result.stderr for problem in BAD_PROBLEMS)
        assert "Traceback" not in result.stderr
        assert "" == result.stdout


_PROBE = """
import builtins, signal, sys
real_import = builtins.__import__
def probe(name, *args, **kwargs):
    if name == "sidecar.cli":
        print(getattr(signal.getsignal(signal.SIGTERM), "__name__", "default"))
        sys.exit(0)
    return real_import(name, *args, **kwargs)
builtins.__import__ = probe
from sidecar.launcher import main
main()
"""


class TestLauncher:
    def test_stop_signals_are_handled_before_the_cli_imports(self) -> None:
        """The `sidecar` console script (the image's entrypoint, PID 1 in a pod, where a
        signal without a handler is ignored) installs the quiet SIGTERM handler before
        it imports the CLI and its libraries."""
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=30, check=False
        )
        assert (0, "_exit_quietly") == (done.returncode, done.stdout.strip()), done.stderr

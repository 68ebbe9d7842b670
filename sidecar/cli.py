"""The `sidecar` command: parse arguments, load config, run, map errors to exit codes.

Exit codes (SPEC §2): 0 clean stop, 1 runtime failure (from the app), 64 bad usage
or bad configuration (EX_USAGE). A config error is printed as a list of problems,
never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn

from sidecar import __version__
from sidecar.config import Config, load_config, resolve_config_path
from sidecar.errors import ConfigError
from sidecar.stopsignals import exit_quietly_until_started
from sidecar.telemetry.logging import configure_logging

__all__ = ["EX_USAGE", "main"]

EX_USAGE = 64
_DEFAULTS_LABEL = "(defaults)"


class _ArgumentParser(argparse.ArgumentParser):
    """Exits 64 (EX_USAGE) on a usage error instead of argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="sidecar", description="hms-sidecar: the service sidecar.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "YAML config file (default: $SIDECAR_CONFIG, else env and defaults only)"
    for name, help_text in (
        ("run", "run the daemon"),
        ("check-config", "validate the configuration and list every problem"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("-c", "--config", metavar="FILE", help=config_help)
    commands.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line in `argv` (default: `sys.argv[1:]`) and return the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (64)
        return exit_.code if isinstance(exit_.code, int) else EX_USAGE

    if args.command == "version":
        print(f"hms-sidecar {__version__}")
        return 0

    source = resolve_config_path(args.config)
    label = source or _DEFAULTS_LABEL
    if args.command == "check-config":
        try:
            config = load_config(source)
        except ConfigError as error:
            return _report(error, label)
        print(f"config OK: {label}")
        print(_summary(config))
        return 0

    with _stop_quietly_while_starting():
        try:
            config = load_config(source)
        except ConfigError as error:
            return _report(error, label)
        configure_logging(config.telemetry.log_format, config.telemetry.log_level)
        from sidecar.app import run_app  # noqa: PLC0415 - only `run` needs the app and its deps

        try:
            return run_app(config)
        except ConfigError as error:  # a problem only found while building components
            return _report(error, label)


@contextlib.contextmanager
def _stop_quietly_while_starting() -> Iterator[None]:
    """SIGTERM or SIGINT before the app installs its own handlers (while the config
    loads and the app's libraries import) exits 0 with nothing bound yet, instead of
    dying by the signal or printing a KeyboardInterrupt traceback."""

    previous = exit_quietly_until_started()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _report(error: ConfigError, label: str) -> int:
    print(f"config error: {len(error.problems)} problem(s) in {label}", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
    return EX_USAGE


def _summary(config: Config) -> str:
    """One line naming what will run; no secrets."""
    upstreams = ", ".join(config.upstreams) or "none"
    return (
        f"service {config.service.name}, listen {config.listen}, admin {config.admin.listen}, "
        f"{len(config.upstreams)} upstream(s): {upstreams}"
    )

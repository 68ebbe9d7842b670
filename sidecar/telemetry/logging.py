"""Structured logging: one JSON object (or one plain console line) per event on stderr.

structlog loggers filter by level in the bound logger class itself, so a disabled
`log.debug(...)` on the hot path is a no-op call. The level can change at run time
(`set_log_level`, behind the admin API's `PUT /v1/log-level`): every logger has the
one class `_SidecarBoundLogger`, whose level methods are swapped for those of
structlog's filtering class of the new level, so loggers already created and cached
follow at once and a disabled level still costs only a call to `return None`.
Records from stdlib `logging` (aiohttp, asyncio) at WARNING and above go through the
same renderer, so the stream stays one format. Output goes to whatever `sys.stderr`
is at write time.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, cast

import structlog
from structlog.typing import FilteringBoundLogger, Processor

__all__ = ["LEVELS", "configure_logging", "current_log_level", "get_logger", "set_log_level"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Keys whose values are secrets wherever they appear; masked as a last line of defence.
_SECRET_KEYS = frozenset({"token", "password", "authorization", "x-consul-token", "secret"})
_REDACTED = "[redacted]"


class _StderrLogger:
    """structlog's output end: writes each rendered line to the current `sys.stderr`."""

    __slots__ = ("name",)

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def msg(self, message: str) -> None:
        sys.stderr.write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _StderrHandler(logging.Handler):
    """The stdlib's output end, sharing the same lookup of `sys.stderr`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _add_logger_name(logger: Any, _: str, event_dict: MutableMapping[str, Any]) -> Any:
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


def _redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Any:
    for key in event_dict.keys() & _SECRET_KEYS:
        event_dict[key] = _REDACTED
    return event_dict


class _SidecarBoundLogger(structlog.make_filtering_bound_logger(logging.DEBUG)):  # type: ignore[misc]
    """The wrapper class of every sidecar logger; `_apply_level` re-points its level methods.

    structlog caches each logger on first use (`cache_logger_on_first_use`) as an
    instance of the wrapper class configured then, so configuring a new filtering
    class would leave module-level loggers at the old level. Changing the methods on
    this one class reaches every instance, cached or bound, at no cost per call.
    """


_level = "info"


def _apply_level(level: int) -> None:
    """Copy the methods of structlog's filtering class for `level` onto ours.

    Those are the per-level methods and their `a*` twins, `exception`, `log`,
    `is_enabled_for`, `get_effective_level` and the aliases (warn, fatal, msg): below
    the level each is structlog's shared no-op.
    """
    source = structlog.make_filtering_bound_logger(level)
    for name, method in vars(source).items():
        if not name.startswith("_") and callable(method):
            setattr(_SidecarBoundLogger, name, method)


_apply_level(LEVELS[_level])  # only our class: importing leaves stdlib logging alone


def set_log_level(name: str) -> str:
    """Switch every logger to level `name` (one of LEVELS) now; return the previous name.

    structlog loggers created before the change, cached or bound, follow it too; the
    stdlib root logger goes to `name` but never below WARNING (other libraries' info
    is noise here). Raises ValueError for an unknown name.
    """
    global _level  # the process has one log level
    if name not in LEVELS:
        raise ValueError(f"unknown log level {name!r}")
    level = LEVELS[name]
    _apply_level(level)
    logging.getLogger().setLevel(max(logging.WARNING, level))
    previous, _level = _level, name
    return previous


def current_log_level() -> str:
    """The name of the log level in force (one of LEVELS)."""
    return _level


def configure_logging(log_format: str, log_level: str) -> None:
    """Send structlog and stdlib logging to stderr as `json` or `console` lines.

    Idempotent: calling it again replaces the previous configuration. Raises
    ValueError for an unknown format or level (config validation prevents both).
    """
    if log_format not in ("json", "console"):
        raise ValueError(f"unknown log format {log_format!r}")
    if log_level not in LEVELS:
        raise ValueError(f"unknown log level {log_level!r}")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _redact_secrets,
    ]
    renderer: Processor
    if log_format == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )

    structlog.configure(
        processors=[_add_logger_name, *shared, renderer],
        wrapper_class=_SidecarBoundLogger,
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=True,
    )

    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    set_log_level(log_level)
    # aiormq logs an ERROR with a traceback on every lost broker connection; the relay and
    # the subscriptions report those themselves (broker_connection_lost, with the reason).
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger that adds `logger=name` to each event; safe to create at import time."""
    return cast(FilteringBoundLogger, structlog.get_logger(name))

"""Structured logging: JSON or console lines on stderr, for structlog and stdlib alike."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from sidecar.telemetry.logging import (
    configure_logging,
    current_log_level,
    get_logger,
    set_log_level,
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test starts from, and leaves behind, the logging setup it found."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    set_log_level("info")  # the module's level, which outlives structlog's configuration
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


class TestJsonFormat:
    def test_one_json_object_per_event(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Each event is one line holding a JSON object with event, level, logger, timestamp."""
        configure_logging("json", "info")
        log = get_logger("sidecar.proxy")
        log.info("listening", address="127.0.0.1:4001")
        log.warning("slow upstream", upstream="billing")
        first, second = json_lines(capsys)
        assert {"event", "level", "logger", "timestamp", "address"} == set(first)
        assert ("listening", "info", "sidecar.proxy", "127.0.0.1:4001") == (
            first["event"],
            first["level"],
            first["logger"],
            first["address"],
        )
        assert ("slow upstream", "warning") == (second["event"], second["level"])

    def test_timestamp_is_iso_utc(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`timestamp` is an ISO 8601 instant in UTC, close to now."""
        configure_logging("json", "info")
        get_logger("t").info("tick")
        [line] = json_lines(capsys)
        stamp = datetime.fromisoformat(line["timestamp"])
        assert timedelta(0) == stamp.utcoffset()
        assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)

    def test_logger_key_only_where_bound(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A plain structlog logger has no `logger` key; an explicit binding is kept."""
        configure_logging("json", "info")
        structlog.get_logger().info("anonymous")
        get_logger("a").bind(logger="b").info("rebound")
        anonymous, rebound = json_lines(capsys)
        assert "logger" not in anonymous
        assert "b" == rebound["logger"]

    def test_exceptions_are_rendered_inside_the_line(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """log.exception puts the traceback in an `exception` string; still one line."""
        configure_logging("json", "info")
        try:
            raise RuntimeError("kaput")
        except RuntimeError:
            get_logger("t").exception("failed")
        [line] = json_lines(capsys)
        assert "error" == line["level"]
        assert "RuntimeError: kaput" in line["exception"]

    def test_secret_keys_are_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Values under token/password/authorization keys never reach the output."""
        configure_logging("json", "info")
        get_logger("t").info("connecting", token="s3cr3t", password="hunter2", user="me")
        [line] = json_lines(capsys)
        assert ("[redacted]", "[redacted]", "me") == (
            line["token"],
            line["password"],
            line["user"],
        )


class TestLevels:
    def test_events_below_the_level_are_dropped(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At `warning`, debug and info events produce nothing."""
        configure_logging("json", "warning")
        log = get_logger("t")
        log.debug("d")
        log.info("i")
        log.error("e")
        assert ["e"] == [line["event"] for line in json_lines(capsys)]

    def test_debug_level_shows_debug(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At `debug`, debug events are emitted."""
        configure_logging("json", "debug")
        get_logger("t").debug("detail")
        assert ["debug"] == [line["level"] for line in json_lines(capsys)]

    def test_filtering_uses_structlog_level_methods(self) -> None:
        """The bound logger class has the methods of structlog's per-level filter, so a
        disabled call is the same no-op call structlog's own filter makes."""
        configure_logging("json", "info")
        wrapper = structlog.get_config()["wrapper_class"]
        at_info = structlog.make_filtering_bound_logger(logging.INFO)
        names = ("debug", "adebug", "info", "ainfo", "warning", "error", "log", "is_enabled_for")
        assert [vars(at_info)[n] for n in names] == [getattr(wrapper, n) for n in names]

    def test_loggers_created_before_configuration_follow_it(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A module-level `log = get_logger(...)` picks up the later configuration."""
        early = get_logger("early")
        configure_logging("json", "info")
        early.info("late")
        assert [("late", "early")] == [(e["event"], e["logger"]) for e in json_lines(capsys)]

    @pytest.mark.parametrize(("log_format", "log_level"), [("xml", "info"), ("json", "loud")])
    def test_unknown_format_or_level_is_refused(self, log_format: str, log_level: str) -> None:
        """configure_logging raises ValueError rather than guessing."""
        with pytest.raises(ValueError, match="unknown log"):
            configure_logging(log_format, log_level)


class TestLevelAtRunTime:
    def test_a_logger_used_before_the_change_follows_it_both_ways(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A module-level logger already used (so cached by structlog) shows debug after a
        switch to `debug`, and drops info after a switch to `error`; so do its bound copies."""
        configure_logging("json", "info")
        log = get_logger("cached")
        bound = log.bind(upstream="billing")
        log.debug("hidden at info")
        log.info("shown at info")
        set_log_level("debug")
        log.debug("shown at debug")
        bound.debug("bound shown at debug")
        set_log_level("error")
        log.info("hidden at error")
        bound.warning("bound hidden at error")
        log.error("shown at error")
        assert [
            "shown at info",
            "shown at debug",
            "bound shown at debug",
            "shown at error",
        ] == [line["event"] for line in json_lines(capsys)]

    def test_reconfiguring_alone_would_not_reach_a_cached_logger(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Why set_log_level exists: structlog keeps a used logger's class, so configuring
        a new `make_filtering_bound_logger(DEBUG)` leaves that logger at its old level."""
        configure_logging("json", "info")
        log = get_logger("cached")
        log.info("first use")
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
        log.debug("still hidden")
        assert ["first use"] == [line["event"] for line in json_lines(capsys)]

    async def test_async_variants_and_introspection_follow_too(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`adebug`, `log(level, ...)`, `is_enabled_for` and `get_effective_level` follow the
        level like the plain methods."""
        configure_logging("json", "warning")
        log = get_logger("cached")
        log.warning("first use")
        set_log_level("debug")
        await log.adebug("async debug")
        log.log(logging.INFO, "via log()")
        assert (True, logging.DEBUG) == (
            log.is_enabled_for(logging.DEBUG),
            log.get_effective_level(),
        )
        set_log_level("error")
        log.log(logging.WARNING, "hidden via log()")
        assert (False, logging.ERROR) == (
            log.is_enabled_for(logging.WARNING),
            log.get_effective_level(),
        )
        assert ["first use", "async debug", "via log()"] == [
            line["event"] for line in json_lines(capsys)
        ]

    def test_set_log_level_returns_the_previous_level(self) -> None:
        """set_log_level answers the level it replaced; current_log_level the one in force."""
        configure_logging("json", "info")
        previous = set_log_level("warning")
        now = current_log_level()
        back = set_log_level("info")
        assert ("info", "warning", "warning") == (previous, now, back)

    def test_stdlib_root_follows_but_never_below_warning(self) -> None:
        """The stdlib root logger takes `error`, and stays at WARNING for `debug`."""
        configure_logging("json", "info")
        set_log_level("error")
        at_error = logging.getLogger().level
        set_log_level("debug")
        assert (logging.ERROR, logging.WARNING) == (at_error, logging.getLogger().level)

    def test_an_unknown_level_is_refused_and_nothing_changes(self) -> None:
        """set_log_level raises ValueError for a name outside LEVELS; the level stays."""
        configure_logging("json", "info")
        with pytest.raises(ValueError, match="unknown log level 'verbose'"):
            set_log_level("verbose")
        assert "info" == current_log_level()


class TestStdlib:
    def test_warnings_are_json_lines_too(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A stdlib WARNING (aiohttp, asyncio) is rendered like a structlog event."""
        configure_logging("json", "info")
        logging.getLogger("aiohttp.server").warning("bad request from %s", "10.0.0.1")
        [line] = json_lines(capsys)
        assert ("bad request from 10.0.0.1", "warning", "aiohttp.server") == (
            line["event"],
            line["level"],
            line["logger"],
        )
        assert "timestamp" in line

    def test_info_and_below_are_dropped_even_at_debug(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Only WARNING and above of other libraries' logging is shown."""
        configure_logging("json", "debug")
        logging.getLogger("aiohttp.access").info("GET / 200")
        logging.getLogger("asyncio").debug("poll took 1ms")
        assert [] == json_lines(capsys)

    def test_exceptions_are_rendered_inside_the_line(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A stdlib logger.exception keeps the traceback inside its one JSON line."""
        configure_logging("json", "info")
        try:
            raise OSError("reset")
        except OSError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
        [line] = json_lines(capsys)
        assert "OSError: reset" in line["exception"]

    def test_reconfiguring_does_not_duplicate_lines(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Calling configure_logging twice leaves one stdlib handler of ours."""
        configure_logging("json", "info")
        configure_logging("json", "info")
        logging.getLogger("x").error("once")
        assert ["once"] == [line["event"] for line in json_lines(capsys)]


class TestConsoleFormat:
    def test_plain_lines_without_colour(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`console` renders readable lines with key=value pairs and no ANSI escapes."""
        configure_logging("console", "info")
        get_logger("sidecar.app").info("listening", port=4001)
        logging.getLogger("aiohttp").warning("stdlib too")
        first, second = capsys.readouterr().err.splitlines()
        assert "\x1b[" not in first + second
        assert all(part in first for part in ("[info", "listening", "port=4001", "sidecar.app"))
        assert all(part in second for part in ("[warning", "stdlib too", "aiohttp"))

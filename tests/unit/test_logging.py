"""Structured logging: JSON or console lines on stderr, for structlog and stdlib alike."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from sidecar.telemetry.logging import configure_logging, get_logger


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test starts from, and leaves behind, the logging setup it found."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
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

    def test_filtering_uses_structlog_level_classes(self) -> None:
        """The bound logger class is structlog's per-level filter, so a disabled call is a no-op."""
        configure_logging("json", "info")
        wrapper = structlog.get_config()["wrapper_class"]
        assert structlog.make_filtering_bound_logger(logging.INFO) is wrapper

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

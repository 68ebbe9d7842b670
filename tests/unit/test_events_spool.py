"""The spool (durable, ordered, bounded, one owner) and the CloudEvent an app's request makes."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from pathlib import Path

import pytest

from sidecar.errors import ProxyError
from sidecar.events.cloudevents import Event, from_http
from sidecar.events.publisher import masked_url
from sidecar.events.spool import Spool, SpoolError, SpoolFull, event_size


def event(seq: int, topic: str = "orders.created", body: bytes = b"{}") -> Event:
    return Event(
        id=f"e{seq}",
        topic=topic,
        content_type="application/json",
        body=body,
        headers={"ce-id": f"e{seq}"},
        time=1.0,
        seq=seq,
    )


async def spooled(spool: Spool, *events: Event) -> None:
    for item in events:
        spool.reserve(item)
    await asyncio.gather(*(spool.append(item) for item in events))


class TestSpool:
    async def test_events_come_back_in_arrival_order_and_survive_a_reopen(
        self, tmp_path: Path
    ) -> None:
        """Appended events are read in seq order, also by the next owner of the file."""
        path = str(tmp_path / "spool.db")
        spool = Spool(path, 1 << 20)
        await spool.open()
        await spooled(spool, event(3), event(1, "a"), event(2))
        assert [1, 2, 3] == [e.seq for e in await spool.head(10)]
        await spool.close()
        again = Spool(path, 1 << 20)
        await again.open()
        assert (3, 3, {"orders.created": 2, "a": 1}) == (
            again.depth,
            again.last_seq,
            dict(again.topics),
        )
        assert ["e1", "e2", "e3"] == [e.id for e in await again.head(10)]
        await again.close()

    async def test_the_database_is_durable_on_disk(self, tmp_path: Path) -> None:
        """WAL journal with synchronous=FULL, as the no-loss rules require."""
        path = str(tmp_path / "spool.db")
        spool = Spool(path, 1 << 20)
        await spool.open()
        await spooled(spool, event(1))
        with sqlite3.connect(path) as db:
            assert "wal" == db.execute("PRAGMA journal_mode").fetchone()[0]
            assert 1 == db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        assert 2 == spool._require().execute("PRAGMA synchronous").fetchone()[0]  # FULL
        await spool.close()

    async def test_delete_removes_only_what_was_confirmed(self, tmp_path: Path) -> None:
        """Deleting confirmed events leaves the rest, and the counters follow."""
        spool = Spool(str(tmp_path / "spool.db"), 1 << 20)
        await spool.open()
        first, second = event(1), event(2, "b")
        await spooled(spool, first, second)
        await spool.delete([first])
        assert (1, {"b": 1}, ["e2"]) == (
            spool.depth,
            dict(spool.topics),
            [e.id for e in await spool.head(10)],
        )
        await spool.delete([second])
        assert (0, 0, None) == (spool.depth, spool.bytes, spool.oldest_age)
        await spool.close()

    async def test_a_full_spool_refuses_and_drops_nothing(self, tmp_path: Path) -> None:
        """Past max_bytes reserve raises SpoolFull; what is spooled stays."""
        one = event(1, body=b"x" * 1000)
        spool = Spool(str(tmp_path / "spool.db"), event_size(one) * 2)
        await spool.open()
        await spooled(spool, one, event(2, body=b"x" * 1000))
        with pytest.raises(SpoolFull):
            spool.reserve(event(3, body=b"x" * 1000))
        assert 2 == len(await spool.head(10))
        await spool.close()

    async def test_skipped_topics_are_left_out_of_the_head(self, tmp_path: Path) -> None:
        """A blocked (unroutable) topic does not hold back the others."""
        spool = Spool(str(tmp_path / "spool.db"), 1 << 20)
        await spool.open()
        await spooled(spool, event(1, "stuck"), event(2, "moving"))
        assert ["e2"] == [e.id for e in await spool.head(10, ["stuck"])]
        await spool.close()

    async def test_one_sidecar_per_spool_file(self, tmp_path: Path) -> None:
        """A second owner of the same file is refused with a message naming the fix."""
        path = str(tmp_path / "spool.db")
        first = Spool(path, 1 << 20)
        await first.open()
        second = Spool(path, 1 << 20)
        with pytest.raises(SpoolError, match="in use by another sidecar"):
            await second.open()
        await first.close()

    async def test_many_concurrent_appends_share_commits(self, tmp_path: Path) -> None:
        """500 concurrent appends all land, in seq order (group commit)."""
        spool = Spool(str(tmp_path / "spool.db"), 1 << 24)
        await spool.open()
        await spooled(spool, *(event(i, f"t{i % 3}") for i in range(1, 501)))
        assert list(range(1, 501)) == [e.seq for e in await spool.head(1000)]
        await spool.close()


def headers(**fields: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in fields.items()]


class TestMaskedUrl:
    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
            ("amqp://u:p%40ss@rabbit/vh", "amqp://u:***@rabbit/vh"),
            ("amqp://u:a@b@rabbit/", "amqp://u:***@rabbit/"),
            ("amqp://rabbit:5672/", "amqp://rabbit:5672/"),
        ],
    )
    def test_the_password_never_shows(self, url: str, shown: str) -> None:
        """Everything between the user name and the last @ is hidden."""
        assert shown == masked_url(url)


class TestCloudEvents:
    def test_binary_mode_defaults(self) -> None:
        """type = topic, source = the service, time = now, a generated id."""
        made = from_http(
            "orders.created",
            headers(content_type="application/json"),
            b"{}",
            source="/orders",
            now=0.0,
        )
        assert ("orders.created", "/orders", "1.0", "1970-01-01T00:00:00.000Z") == (
            made.headers["ce-type"],
            made.headers["ce-source"],
            made.headers["ce-specversion"],
            made.headers["ce-time"],
        )
        assert made.id == made.headers["ce-id"]
        assert "application/json" == made.content_type

    def test_id_from_ce_id_then_idempotency_key(self) -> None:
        """ce-id wins over Idempotency-Key; either is the event's id."""
        both = headers(ce_id="a", idempotency_key="b")
        assert "a" == from_http("t", both, b"", source="/s", now=0).id
        assert "b" == from_http("t", headers(idempotency_key="b"), b"", source="/s", now=0).id

    def test_trace_context_is_carried(self) -> None:
        """traceparent and tracestate go into the AMQP headers."""
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        made = from_http("t", headers(traceparent=tp, tracestate="a=b"), b"", source="/s", now=0)
        assert (tp, "a=b") == (made.headers["traceparent"], made.headers["tracestate"])

    def test_structured_mode_becomes_binary(self) -> None:
        """A structured CloudEvent's attributes become ce-* headers and data the body."""
        document = {
            "specversion": "1.0",
            "id": "x1",
            "source": "/app",
            "type": "t.v1",
            "subject": "42",
            "data": {"a": 1},
        }
        made = from_http(
            "t",
            headers(content_type="application/cloudevents+json"),
            json.dumps(document).encode(),
            source="/s",
            now=0,
        )
        assert ("x1", "/app", "t.v1", "42", b'{"a":1}', "application/json") == (
            made.id,
            made.headers["ce-source"],
            made.headers["ce-type"],
            made.headers["ce-subject"],
            made.body,
            made.content_type,
        )
        binary = dict(document, data_base64=base64.b64encode(b"\x00\x01").decode())
        del binary["data"]
        raw = from_http(
            "t",
            headers(content_type="application/cloudevents+json"),
            json.dumps(binary).encode(),
            source="/s",
            now=0,
        )
        assert b"\x00\x01" == raw.body

    @pytest.mark.parametrize(
        ("topic", "fields", "body", "message"),
        [
            ("bad topic", {}, b"", "invalid topic"),
            ("t", {"ce_time": "yesterday"}, b"", "is not an RFC 3339 time"),
            ("t", {"ce_specversion": "0.3"}, b"", "only 1.0 is supported"),
            ("t", {"ce_id": "a" * 256}, b"", "longer than 255 bytes"),
            ("t", {"content_type": "text/" + "a" * 300}, b"", "Content-Type is longer"),
            ("t", {"ce_time": "1960-01-01T00:00:00Z"}, b"", "before 1970"),
            ("t", {"ce_time": "2024-01-01T00:00:00"}, b"", "not an RFC 3339 time"),
            ("t", {"ce_time": "2024-01-01"}, b"", "not an RFC 3339 time"),
            ("t", {"content_type": "application/cloudevents+json"}, b"[1]", "JSON object"),
            (
                "t",
                {"content_type": "application/cloudevents+json"},
                b'{"specversion": "1.0", "id": "1"}',
                "lacks source, type",
            ),
        ],
    )
    def test_bad_requests_name_the_problem(
        self, topic: str, fields: dict[str, str], body: bytes, message: str
    ) -> None:
        """Each invalid publish is a 400 whose message says what is wrong."""
        with pytest.raises(ProxyError) as info:
            from_http(topic, headers(**fields), body, source="/s", now=0)
        assert 400 == info.value.code.status
        assert message in info.value.message

"""POST /v1/publish/{topic} against the real RabbitMQ: what arrives in a bound queue,
what is refused, and what the spool keeps while the broker cannot take an event.

Each test declares an exchange of its own and quorum queues bound to it, deletes
them at the end, and holds the broker lock shared so no cooperating suite stops
RabbitMQ under it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests

from sidecar.events.spool import _SCHEMA as SPOOL_SCHEMA
from tests.integration.amqp_harness import (
    AmqpScope,
    Received,
    closed_port_url,
    event_sidecar,
    events_config,
    events_status,
    first_occurrences,
    publish,
    tcp_proxy,
    wait_drained,
    wait_events,
    wait_relay_started,
)
from tests.integration.harness import Sidecar, metric_samples

JSON = {"content-type": "application/json"}


pytestmark = pytest.mark.usefixtures("broker_shared")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def started(run_dir: Path, events: dict[str, Any], *, connected: bool = True) -> Sidecar:
    """A ready sidecar whose relay has started (killed by the caller); with `connected`,
    once it holds a broker connection, so a publish can be confirmed at once."""
    sidecar = event_sidecar(run_dir, events).start()
    try:
        await sidecar.wait_ready()
        async with aiohttp.ClientSession() as session:
            await wait_relay_started(session, sidecar)
            if connected:
                await wait_events(
                    session,
                    sidecar,
                    lambda s: s["broker"]["state"] == "connected",
                    what="a broker connection",
                )
    except BaseException:
        sidecar.kill()
        raise
    return sidecar


def numbered(messages: list[Received]) -> list[int]:
    return [int(m.json()["n"]) for m in messages]


class TestConfirmedPublish:
    async def test_event_arrives_as_binary_cloudevent(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """A confirmed event arrives in the bound queue with its body, every ce-* header,
        content_type, message_id = ce-id, persistent delivery and a timestamp."""
        queue = await scope.bind("orders.*")
        sidecar = await started(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
        try:
            before = time.time()
            status, answer = await publish(
                session,
                sidecar,
                "orders.created",
                b'{"order": 42}',
                {**JSON, "ce-id": "order-42", "ce-type": "com.example.order", "ce-subject": "42"},
            )
            samples = await metric_samples(sidecar)
        finally:
            sidecar.kill()
        [message] = await scope.read(queue)
        assert (202, {"id": "order-42", "topic": "orders.created", "status": "confirmed"}) == (
            status,
            answer,
        )
        assert b'{"order": 42}' == message.body
        assert "orders.created" == message.routing_key
        assert "application/json" == message.content_type
        assert "order-42" == message.message_id
        assert 2 == message.delivery_mode
        assert {
            "ce-id": "order-42",
            "ce-source": "/itest",
            "ce-specversion": "1.0",
            "ce-type": "com.example.order",
            "ce-subject": "42",
        } == {k: v for k, v in message.headers.items() if k != "ce-time"}
        ce_time = datetime.fromisoformat(message.headers["ce-time"]).timestamp()
        assert before - 1 <= ce_time <= time.time() + 1
        assert message.timestamp is not None
        assert abs(message.timestamp.timestamp() - ce_time) < 1.5  # AMQP: whole seconds
        key = 'sidecar_events_published_total{outcome="confirmed",topic="orders.created"}'
        assert 1.0 == samples[key]

    @pytest.mark.parametrize(
        ("headers", "expected"),
        [
            ({"ce-id": "from-ce-id", "Idempotency-Key": "from-key"}, "from-ce-id"),
            ({"Idempotency-Key": "from-key"}, "from-key"),
            ({}, None),
        ],
        ids=["ce-id", "idempotency-key", "generated"],
    )
    async def test_event_id(
        self,
        tmp_path: Path,
        scope: AmqpScope,
        session: aiohttp.ClientSession,
        headers: dict[str, str],
        expected: str | None,
    ) -> None:
        """The id is `ce-id`, else `Idempotency-Key`, else a new UUID; the answer, ce-id and
        message_id all carry it."""
        queue = await scope.bind()
        sidecar = await started(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
        try:
            status, answer = await publish(session, sidecar, "ids", b"x", headers)
        finally:
            sidecar.kill()
        [message] = await scope.read(queue)
        assert (202, "confirmed") == (status, answer["status"])
        if expected is None:
            expected = str(uuid.UUID(answer["id"]))
        assert [expected] * 3 == [answer["id"], message.ce_id, message.message_id]

    async def test_structured_mode_becomes_binary(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """A structured-mode CloudEvent (`data` or `data_base64`) goes to AMQP in binary mode:
        its attributes as ce-* headers, its data as the body, datacontenttype as content_type."""
        queue = await scope.bind()
        sidecar = await started(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
        structured = {"content-type": "application/cloudevents+json"}
        json_event = {
            "specversion": "1.0",
            "id": "s-1",
            "source": "/shop",
            "type": "shop.order",
            "subject": "o-1",
            "datacontenttype": "application/json",
            "data": {"order": 1},
        }
        binary_event = {
            "specversion": "1.0",
            "id": "s-2",
            "source": "/shop",
            "type": "shop.blob",
            "datacontenttype": "application/octet-stream",
            "data_base64": base64.b64encode(b"\x00\xffraw").decode(),
        }
        try:
            first = await publish(session, sidecar, "shop", json.dumps(json_event), structured)
            second = await publish(session, sidecar, "shop", json.dumps(binary_event), structured)
        finally:
            sidecar.kill()
        one, two = await scope.read(queue)
        assert [(202, "s-1", "confirmed"), (202, "s-2", "confirmed")] == [
            (status, answer["id"], answer["status"]) for status, answer in (first, second)
        ]
        assert (b'{"order":1}', "application/json", "s-1") == (
            one.body,
            one.content_type,
            one.message_id,
        )
        assert {
            "ce-id": "s-1",
            "ce-source": "/shop",
            "ce-type": "shop.order",
            "ce-subject": "o-1",
            "ce-specversion": "1.0",
        } == {k: v for k, v in one.headers.items() if k != "ce-time"}
        assert (b"\x00\xffraw", "application/octet-stream", "s-2") == (
            two.body,
            two.content_type,
            two.message_id,
        )
        assert ("s-2", "shop.blob") == (two.headers["ce-id"], two.headers["ce-type"])

    async def test_each_http_client_publishes(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """curl, requests, httpx and aiohttp each publish an event that is confirmed and
        arrives."""
        queue = await scope.bind()
        sidecar = await started(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
        url = f"{sidecar.url}/v1/publish/clients"

        def with_requests() -> tuple[int, Any]:
            with requests.Session() as client:
                client.trust_env = False
                resp = client.post(url, data=b'{"by":"requests"}', headers={"ce-id": "requests"})
                return resp.status_code, resp.json()

        try:
            argv = ["curl", "-sS", "--noproxy", "*", "-w", "\n%{http_code}", "-H", "ce-id: curl"]
            argv += ["--data-binary", '{"by":"curl"}', url]
            curl = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
            out, _ = await curl.communicate()
            text, code = out.decode().rsplit("\n", 1)
            answers = {"curl": (int(code), json.loads(text))}
            answers["requests"] = await asyncio.to_thread(with_requests)
            async with httpx.AsyncClient(trust_env=False) as client:
                resp = await client.post(url, content=b'{"by":"httpx"}', headers={"ce-id": "httpx"})
                answers["httpx"] = (resp.status_code, resp.json())
            answers["aiohttp"] = await publish(
                session, sidecar, "clients", b'{"by":"aiohttp"}', {"ce-id": "aiohttp"}
            )
        finally:
            sidecar.kill()
        received = await scope.read(queue)
        clients = ["curl", "requests", "httpx", "aiohttp"]
        expected = {c: (202, {"id": c, "topic": "clients", "status": "confirmed"}) for c in clients}
        assert expected == answers
        assert clients == [m.ce_id for m in received]
        assert clients == [m.json()["by"] for m in received]


class TestRefused:
    async def test_bad_topic_is_400_json(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """A topic outside [A-Za-z0-9_.-]{1,255} is 400 BAD_REQUEST with the JSON error."""
        sidecar = await started(
            tmp_path, events_config(scope.exchange, tmp_path / "spool.db"), connected=False
        )
        answers = []
        try:
            for topic in ("bad%20topic", "a" * 256, "", "x:y"):
                async with session.post(f"{sidecar.url}/v1/publish/{topic}", data=b"x") as resp:
                    body = await resp.json(content_type=None)
                    answers.append((resp.status, resp.headers.get("x-sidecar-error"), body))
        finally:
            sidecar.kill()
        for status, code, body in answers:
            assert (400, "BAD_REQUEST", "BAD_REQUEST") == (status, code, body["error"]["code"])
            assert "topic" in body["error"]["message"]

    async def test_get_is_400(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """Only POST publishes: GET is 400 BAD_REQUEST naming the method."""
        sidecar = await started(
            tmp_path, events_config(scope.exchange, tmp_path / "spool.db"), connected=False
        )
        try:
            async with session.get(f"{sidecar.url}/v1/publish/orders") as resp:
                status, body = resp.status, await resp.json(content_type=None)
        finally:
            sidecar.kill()
        assert (400, "BAD_REQUEST") == (status, body["error"]["code"])
        assert "use POST" in body["error"]["message"]

    async def test_over_limit_by_content_length_is_413_unread(
        self, tmp_path: Path, scope: AmqpScope
    ) -> None:
        """A Content-Length over max_event_bytes is 413 BODY_TOO_LARGE before any body byte
        is sent: the sidecar does not wait for (or read) the body."""
        events = events_config(scope.exchange, tmp_path / "spool.db", max_event_bytes=1000)
        sidecar = await started(tmp_path, events, connected=False)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.app_port)
            writer.write(
                b"POST /v1/publish/big HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
            writer.close()
        finally:
            sidecar.kill()
        assert head.startswith(b"HTTP/1.1 413 ")
        assert "BODY_TOO_LARGE" == body["error"]["code"]
        assert "max_event_bytes" in body["error"]["message"]

    async def test_over_limit_chunked_is_413_before_the_end(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """A chunked body is cut off once it passes max_event_bytes: 413 arrives while the
        body is still unfinished, and nothing is published or spooled."""
        queue = await scope.bind()
        events = events_config(scope.exchange, tmp_path / "spool.db", max_event_bytes=1000)
        sidecar = await started(tmp_path, events)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.app_port)
            writer.write(
                b"POST /v1/publish/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            writer.write(b"%x\r\n%s\r\n" % (1200, b"a" * 1200))  # no last chunk: unfinished
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
            status = await events_status(session, sidecar)
        finally:
            sidecar.kill()
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"x-sidecar-error: BODY_TOO_LARGE" in head
        assert 0 == status["spool"]["depth"]
        assert 0 == await scope.depth(queue)


class TestSpool:
    async def test_broker_unreachable_spools_then_drains_in_order(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """With the broker unreachable every event is 202 `spooled` and /v1/status shows the
        spool; a sidecar restarted on that spool with the right URL drains it in order."""
        queue = await scope.bind()
        spool = tmp_path / "spool.db"
        unreachable = events_config(scope.exchange, spool, closed_port_url())
        down = await started(tmp_path / "down", unreachable, connected=False)
        try:
            answers = [
                await publish(session, down, f"t{n % 3}", json.dumps({"n": n}), {"ce-id": f"e{n}"})
                for n in range(30)
            ]
            status = await events_status(session, down)
            samples = await metric_samples(down)
            down.signal(signal.SIGTERM)
            assert 0 == await down.wait_exit()
        finally:
            down.kill()
        expected = [
            (202, {"id": f"e{n}", "topic": f"t{n % 3}", "status": "spooled"}) for n in range(30)
        ]
        assert expected == answers
        assert status["broker"]["state"] != "connected"
        assert status["broker"]["last_error"]
        assert (30, {"t0": 10, "t1": 10, "t2": 10}) == (
            status["spool"]["depth"],
            status["spool"]["topics"],
        )
        assert status["spool"]["bytes"] > 30 * len('{"n": 0}')
        assert status["spool"]["oldest_age_s"] >= 0
        assert 10.0 == samples['sidecar_events_published_total{outcome="spooled",topic="t0"}']
        assert 30.0 == samples["sidecar_events_spool_depth"]
        assert 0.0 == samples["sidecar_events_broker_connected"]

        up = await started(tmp_path / "up", events_config(scope.exchange, spool), connected=False)
        try:
            drained = await wait_drained(session, up)
        finally:
            up.kill()
        received = await scope.read(queue)
        assert list(range(30)) == numbered(received)
        assert [f"e{n}" for n in range(30)] == [m.message_id for m in received]
        assert (0, {}) == (drained["spool"]["depth"], drained["spool"]["topics"])

    async def test_events_survive_kill_9(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """Spooled events survive SIGKILL of the sidecar: restarted on the same spool, it
        drains all of them in order."""
        queue = await scope.bind()
        spool = tmp_path / "spool.db"
        unreachable = events_config(scope.exchange, spool, closed_port_url())
        down = await started(tmp_path / "down", unreachable, connected=False)
        try:
            answers = await asyncio.gather(
                *(
                    publish(session, down, f"k{p}", json.dumps({"n": n}), {"ce-id": f"k{p}-{n}"})
                    for p in range(4)
                    for n in range(25)
                )
            )
        finally:
            down.kill()  # SIGKILL, straight after the last 202
        assert 100 == sum(1 for status, a in answers if (status, a["status"]) == (202, "spooled"))

        up = await started(tmp_path / "up", events_config(scope.exchange, spool), connected=False)
        try:
            await wait_drained(session, up)
        finally:
            up.kill()
        received = await scope.read(queue)
        assert 100 == len(received)
        for p in range(4):
            ids = [m.ce_id for m in received if m.routing_key == f"k{p}"]
            assert [f"k{p}-{n}" for n in range(25)] == ids

    async def test_default_spool_is_in_the_users_state_directory(
        self,
        tmp_path: Path,
        scope: AmqpScope,
        session: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Without `spool.path` the spool is `$XDG_STATE_HOME/hms-sidecar/<service id>.spool.db`
        (`~/.local/state` when unset): no root needed, and it does spool there."""
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        events = {"amqp_url": closed_port_url(), "exchange": scope.exchange}
        sidecar = await started(tmp_path, events, connected=False)
        try:
            status, answer = await publish(session, sidecar, "local", b"{}")
            spool = (await events_status(session, sidecar))["spool"]
        finally:
            sidecar.kill()
        path = Path(spool["path"])
        assert (202, "spooled") == (status, answer["status"])
        assert (tmp_path / "state" / "hms-sidecar", 1) == (path.parent, spool["depth"])
        assert re.fullmatch(r"itest[\w.-]*\.spool\.db", path.name)  # the service id's
        assert await asyncio.to_thread(path.exists)

    async def test_spool_full_is_507_and_keeps_everything(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """When the spool is full the next event is 507 SPOOL_FULL; nothing already spooled
        is dropped for it, and every event answered 202 arrives once the broker is back."""
        queue = await scope.bind()
        spool = tmp_path / "spool.db"
        body = "x" * 1024
        small = {"spool": {"path": str(spool), "max_bytes": 65536}, "max_event_bytes": 4096}
        down = await started(
            tmp_path / "down",
            {**events_config(scope.exchange, spool, closed_port_url()), **small},
            connected=False,
        )
        accepted: list[int] = []
        try:
            for n in range(200):
                status, answer = await publish(
                    session, down, "full", json.dumps({"n": n, "pad": body}), {"ce-id": f"f{n}"}
                )
                if status != 202:
                    refused = (n, status, answer)
                    break
                accepted.append(n)
            else:
                pytest.fail("200 events of 1 KiB fitted in a 64 KiB spool")
            again, _ = await publish(session, down, "other", body)
            full = await events_status(session, down)
            samples = await metric_samples(down)
        finally:
            down.kill()
        n, status, answer = refused
        assert (507, "SPOOL_FULL") == (status, answer["error"]["code"])
        assert 507 == again
        assert len(accepted) == full["spool"]["depth"]
        assert full["spool"]["bytes"] <= 65536
        assert 1.0 == samples['sidecar_events_published_total{outcome="rejected",topic="full"}']

        up = await started(
            tmp_path / "up", {**events_config(scope.exchange, spool), **small}, connected=False
        )
        try:
            await wait_drained(session, up)
            after = await publish(session, up, "full", json.dumps({"n": n, "pad": body}))
        finally:
            up.kill()
        received = await scope.read(queue)
        assert (202, "confirmed") == (after[0], after[1]["status"])
        assert [*accepted, n] == numbered(received)

    async def test_new_events_queue_behind_spooled_ones_of_their_topic(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """While a topic has events in the spool, new events for it are spooled behind them
        even with the broker connected (per-topic order); other topics are confirmed at once."""
        others = await scope.bind("other")
        sidecar = await started(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
        try:
            first = await publish(session, sidecar, "late", json.dumps({"n": 0}))  # unroutable
            queue = await scope.bind("late")
            later = [
                await publish(session, sidecar, "late", json.dumps({"n": n})) for n in (1, 2, 3)
            ]
            other = await publish(session, sidecar, "other", json.dumps({"n": 9}))
            await wait_drained(session, sidecar)
        finally:
            sidecar.kill()
        assert ["spooled"] * 4 == [answer["status"] for _, answer in [first, *later]]
        assert "confirmed" == other[1]["status"]
        assert [0, 1, 2, 3] == numbered(await scope.read(queue))
        assert [9] == numbered(await scope.read(others))


def prefill_spool(path: Path, count: int) -> None:
    """A spool file holding `count` events of topic `old` (ids old-1 ...), as a sidecar
    stopped with a long backlog leaves it: a spool that takes a moment to open."""
    headers = json.dumps({"ce-id": "old", "ce-source": "/itest", "ce-specversion": "1.0"})
    now = time.time()
    rows = (
        (n, "old", f"old-{n}", "application/json", headers, b"{}", now, now)
        for n in range(1, count + 1)
    )
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(SPOOL_SCHEMA)
        db.executemany(
            "INSERT INTO events (seq, topic, id, content_type, headers, body, time, spooled_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.commit()
    finally:
        db.close()


def spooled_ids(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT id FROM events ORDER BY seq")]
    finally:
        db.close()


async def publish_at_once(port: int, ce_id: str) -> bytes:
    """POST an event the moment the app port accepts, not waiting for /ready; the
    answer's status line."""
    deadline = time.monotonic() + 15
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            assert time.monotonic() < deadline, "the app port never accepted"
            await asyncio.sleep(0.001)
    try:
        writer.write(
            b"POST /v1/publish/early HTTP/1.1\r\nHost: x\r\nce-id: %s\r\n"
            b"Content-Length: 2\r\n\r\n{}" % ce_id.encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    finally:
        writer.close()
    return head.split(b"\r\n", 1)[0]


class TestStartup:
    BACKLOG = 200_000  # old events in the spool: opening it takes ~0.1 s

    async def test_publish_while_the_spool_opens_loses_nothing(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """An event accepted (202) while the sidecar is still opening a spool with a backlog
        is kept, and so is every event of the backlog; /v1/status counts them all."""
        spool = tmp_path / "spool.db"
        await asyncio.to_thread(prefill_spool, spool, self.BACKLOG)
        sidecar = event_sidecar(tmp_path, events_config(scope.exchange, spool, closed_port_url()))
        sidecar.start()
        try:
            early = await publish_at_once(sidecar.app_port, "early")
            await sidecar.wait_ready()
            depth = (await events_status(session, sidecar))["spool"]["depth"]
            sidecar.signal(signal.SIGTERM)
            await sidecar.wait_exit()
        finally:
            sidecar.kill()
        ids = await asyncio.to_thread(spooled_ids, spool)
        assert early.startswith(b"HTTP/1.1 202 ")
        assert {"old-1", "early"} <= set(ids)
        assert [self.BACKLOG + 1] * 2 == [len(ids), depth]

    async def test_not_ready_before_the_spool_is_open(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """/ready requires a writable spool, so it is not 200 before the spool is open: the
        first 200 comes with the backlog already counted in /v1/status."""
        spool = tmp_path / "spool.db"
        await asyncio.to_thread(prefill_spool, spool, self.BACKLOG)
        sidecar = event_sidecar(tmp_path, events_config(scope.exchange, spool, closed_port_url()))
        sidecar.start()
        try:
            deadline = time.monotonic() + 15
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{sidecar.admin}/ready") as resp:
                        if resp.status == 200:
                            break
                assert time.monotonic() < deadline, "never ready"
                await asyncio.sleep(0.001)
            status = await events_status(session, sidecar)
        finally:
            sidecar.kill()
        assert self.BACKLOG == status["spool"]["depth"]


class TestBrokerDoesNotConfirm:
    async def test_nacked_event_is_spooled_and_sent_again(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """An event the broker nacks (its queue is full, overflow `reject-publish`) is 202
        `spooled`, not lost, and so is the next one of its topic; both arrive, in order,
        once the queue has room again."""
        capped = {"x-max-length": 2, "x-overflow": "reject-publish"}
        # A classic queue: a quorum queue applies the limit a message late (soft limit).
        queue = await scope.bind("capped", quorum=False, arguments=capped)
        sidecar = await started(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
        try:
            answers = [
                await publish(session, sidecar, "capped", json.dumps({"n": n})) for n in range(4)
            ]
            refused = await events_status(session, sidecar)
            room = await scope.read(queue, 2)
            await wait_drained(session, sidecar)
        finally:
            sidecar.kill()
        assert ["confirmed", "confirmed", "spooled", "spooled"] == [a["status"] for _, a in answers]
        assert 2 == refused["spool"]["depth"]
        assert "nack" in (refused["broker"]["last_error"] or "")
        assert [0, 1] == numbered(room)
        assert [2, 3] == numbered(await scope.read(queue))

    async def test_no_confirm_in_time_spools_under_the_same_id(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """A broker that does not confirm within `confirm_timeout` (its connection stalls):
        the event is 202 `spooled` after that bound, and the next one of its topic at once;
        when the broker answers again both arrive, in order, any copy under the same id."""
        queue = await scope.bind()
        async with tcp_proxy() as proxy:
            events = events_config(
                scope.exchange, tmp_path / "spool.db", proxy.url, confirm_timeout="500ms"
            )
            sidecar = await started(tmp_path, events)
            try:
                proxy.stall()
                began = time.monotonic()
                slow = await publish(session, sidecar, "slow", b'{"n":0}', {"ce-id": "slow-0"})
                took = time.monotonic() - began
                behind = await publish(session, sidecar, "slow", b'{"n":1}', {"ce-id": "slow-1"})
                proxy.unstall()
                await wait_drained(session, sidecar)
            finally:
                sidecar.kill()
        received = await scope.read(queue)
        assert [(202, "spooled"), (202, "spooled")] == [
            (status, answer["status"]) for status, answer in (slow, behind)
        ]
        assert 0.5 <= took < 2.0
        assert ["slow-0", "slow-1"] == [m.ce_id for m in first_occurrences(received)]
        assert {"slow-0", "slow-1"} == {m.message_id for m in received}
        assert all(m.body == b'{"n":%d}' % int(m.ce_id[-1]) for m in received)


class TestUnroutable:
    async def test_unroutable_is_kept_counted_and_delivered_once_bound(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """An event no queue is bound for comes back from the broker: it is spooled, counted,
        shown in /v1/status, and delivered once a queue is bound."""
        sidecar = await started(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
        try:
            status, answer = await publish(session, sidecar, "nobody", b'{"n":1}', {"ce-id": "u1"})
            shown = await events_status(session, sidecar)
            samples = await metric_samples(sidecar)
            queue = await scope.bind("nobody")
            await wait_drained(session, sidecar, timeout=15)
        finally:
            sidecar.kill()
        [message] = await scope.read(queue)
        assert (202, "spooled") == (status, answer["status"])
        assert (1, 1, ["nobody"]) == (
            shown["spool"]["depth"],
            shown["spool"]["unroutable"],
            shown["unroutable_topics"],
        )
        assert 1.0 == samples['sidecar_events_unroutable_total{topic="nobody"}']
        assert 1.0 == samples['sidecar_events_published_total{outcome="spooled",topic="nobody"}']
        assert ("u1", b'{"n":1}') == (message.message_id, message.body)
        events = [e["event"] for e in sidecar.log_events()]
        assert 1 == events.count("event_unroutable")

    async def test_unroutable_count_is_the_events_waiting(
        self, tmp_path: Path, scope: AmqpScope, session: aiohttp.ClientSession
    ) -> None:
        """/v1/status `spool.unroutable` is the number of spooled events waiting for a queue:
        retries do not add to it, and it is 0 again once they are delivered."""
        sidecar = await started(tmp_path, events_config(scope.exchange, tmp_path / "spool.db"))
        try:
            for n in range(3):
                await publish(session, sidecar, "nobody", json.dumps({"n": n}))
            returns = 'sidecar_events_unroutable_total{topic="nobody"}'
            deadline = time.monotonic() + 15
            while (await metric_samples(sidecar)).get(returns, 0) < 4:  # 1 + a retry of 3
                assert time.monotonic() < deadline, "the relay did not retry within 15 s"
                await asyncio.sleep(0.1)
            waiting = await events_status(session, sidecar)
            await scope.bind("nobody")
            delivered = await wait_drained(session, sidecar, timeout=15)
        finally:
            sidecar.kill()
        assert [(3, 3), (0, 0)] == [
            (state["spool"]["depth"], state["spool"]["unroutable"])
            for state in (waiting, delivered)
        ]

"""Benchmark the sidecar's event relay against aio-pika publishing to RabbitMQ directly.

One run measures, against the real RabbitMQ at 127.0.0.1:5672, into one durable
quorum queue bound to an exchange of the run's own:

1. **direct**: one aio-pika connection with publisher confirms, `--in-flight` (256)
   publishes awaiting their confirm at a time (mandatory, persistent);
2. **relay**: the sidecar (`python -m sidecar run`) with `--publishers` (64)
   concurrent keep-alive HTTP clients POSTing to /v1/publish/{topic}, each waiting
   for its 202 before sending the next: wrk (`-t1 -c64`, a Lua script giving each
   event its own `ce-id`) for the target ratio, so the clients' own CPU is not
   charged to the sidecar (as in bench_proxy.py); and aiohttp clients in this
   process, as a Python app would publish, for context;
3. **spool drain**: the sidecar's broker URL points at a TCP proxy that refuses
   connections while `--spool-events` (10,000) events are published (all 202
   `spooled`); then the proxy lets connections through, and the drain is timed from
   the sidecar's connection reaching the proxy (its reconnect back-off left out)
   until /v1/status shows an empty spool.

Direct and both relays alternate for `--rounds` rounds and the medians are compared, so a
drift in the machine's speed hits both alike. Events are `--size` (1 KiB) bytes.
Prints one JSON object to stdout (`ratio_vs_direct` with wrk clients,
`ratio_vs_direct_aiohttp_clients`, `spool_drain_events_per_s`, the
rounds, CPU cores each process kept busy); progress goes to stderr. The exchange and
queue are deleted at the end.

Usage: .venv/bin/python tests/perf/bench_events.py [--events 10240] [--rounds 3] [--quick]

Exit status is 0 whether or not the targets are met (this is a measurement, not a
test), 1 when the broker or the sidecar fails, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import aio_pika
import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, from anywhere

from tests.integration.amqp_harness import (
    AMQP_URL,
    QUORUM,
    TcpProxy,
    broker_lock,
    events_config,
)
from tests.integration.harness import Sidecar, metric_samples
from tests.perf.bench_proxy import WRK, parse_wrk

#: wrk's Lua: 1 KiB-ish JSON events (the size is substituted), each with its own ce-id.
WRK_SCRIPT = """
local n = 0
local body = '{"n":0,"pad":"' .. string.rep("x", %d) .. '"}'
request = function()
  n = n + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
    ["ce-id"] = "wrk-" .. n}, body)
end
"""
TARGETS_SPEC = {"ratio_vs_direct_min": 0.5, "spool_drain_events_per_s_min": 2000}
WARMUP_EVENTS = 500
DRAIN_TIMEOUT_S = 120.0


class BenchError(Exception):
    """The broker or the sidecar failed; the message says which and why."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by `pid`, or by this process."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The RabbitMQ node's OS process (beam.smp), to charge it its CPU; None if not found."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"beam" in cmdline and b"rabbit" in cmdline:
                    return int(entry.name)
    return None


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


class CpuMeter:
    """CPU seconds of the bench, the sidecar and the broker over a phase, as cores kept
    busy; `machine` is the busy fraction of all cores (other work included), to tell
    a measurement taken on a saturated machine."""

    def __init__(self, sidecar_pid: int | None) -> None:
        self.pids = {"bench": None, "sidecar": sidecar_pid, "broker": broker_pid()}
        self.start = self._now()
        self.machine = machine_ticks()

    def _now(self) -> dict[str, float]:
        now = {}
        for name, pid in self.pids.items():
            if name == "bench" or pid is not None:
                with contextlib.suppress(OSError):
                    now[name] = cpu_s(pid)
        return now

    def used(self, wall: float) -> dict[str, float]:
        """Cores busy on average, per process, since the meter started."""
        end = self._now()
        used = {k: round((end[k] - self.start[k]) / wall, 2) for k in end if k in self.start}
        busy, total = machine_ticks()
        if total > self.machine[1]:
            used["machine"] = round((busy - self.machine[0]) / (total - self.machine[1]), 2)
        return used


def payload(size: int, n: int) -> bytes:
    head = b'{"n":%d,"pad":"' % n
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


async def bench_direct(
    exchange: aio_pika.abc.AbstractExchange, count: int, in_flight: int, size: int
) -> float:
    """Events/s for aio-pika with confirms, `in_flight` unconfirmed at a time."""
    window = asyncio.Semaphore(in_flight)
    failures = Counter[str]()

    async def one(n: int) -> None:
        message = aio_pika.Message(
            payload(size, n),
            message_id=f"direct-{n}",
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            confirm = await exchange.publish(message, routing_key="bench.direct", mandatory=True)
        finally:
            window.release()
        if type(confirm).__name__ != "Ack":
            failures[type(confirm).__name__] += 1

    async def run(total: int) -> float:
        tasks = []
        began = time.perf_counter()
        for n in range(total):
            await window.acquire()
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - began

    await run(WARMUP_EVENTS)
    elapsed = await run(count)
    if failures:
        raise BenchError(f"direct publishes not acked: {dict(failures)}")
    return count / elapsed


async def http_publish(
    url: str, count: int, publishers: int, size: int, topic: str
) -> tuple[float, Counter[str]]:
    """Events/s for `publishers` concurrent keep-alive clients; the outcomes counted."""
    outcomes = Counter[str]()
    share = [count // publishers + (p < count % publishers) for p in range(publishers)]
    connector = aiohttp.TCPConnector(limit=publishers, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def publisher(p: int) -> None:
            for i in range(share[p]):
                async with session.post(
                    f"{url}/v1/publish/{topic}",
                    data=payload(size, i),
                    headers={"content-type": "application/json", "ce-id": f"{topic}-{p}-{i}"},
                ) as resp:
                    body = await resp.read()
                    if resp.status == 202:
                        outcomes[json.loads(body)["status"]] += 1
                    else:
                        outcomes[f"http_{resp.status}"] += 1

        began = time.perf_counter()
        await asyncio.gather(*(publisher(p) for p in range(publishers)))
        elapsed = time.perf_counter() - began
    return count / elapsed, outcomes


async def wrk_publish(
    url: str, workdir: Path, *, seconds: float, publishers: int, size: int, topic: str
) -> tuple[float, int]:
    """Events/s for wrk with `publishers` keep-alive connections; non-2xx answers."""
    script = workdir / "publish.lua"
    script.write_text(WRK_SCRIPT % max(0, size - 15))
    proc = await asyncio.create_subprocess_exec(
        WRK,
        "--latency",
        "-t1",
        f"-c{publishers}",
        f"-d{seconds:g}s",
        "-s",
        str(script),
        f"{url}/v1/publish/{topic}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {out.decode()}{err.decode()}")
    result = parse_wrk(out.decode())
    return result.rps, result.errors


async def published(sidecar: Sidecar, topic: str) -> Counter[str]:
    """The sidecar's sidecar_events_published_total for `topic`, by outcome."""
    samples = await metric_samples(sidecar)
    counts = Counter[str]()
    for outcome in ("confirmed", "spooled", "rejected"):
        series = f'sidecar_events_published_total{{outcome="{outcome}",topic="{topic}"}}'
        value = samples.get(series)
        if value:
            counts[outcome] = int(value)
    return counts


async def status(session: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    async with session.get(f"{sidecar.admin}/v1/status") as resp:
        events: dict[str, Any] = (await resp.json())["events"]
    return events


async def start_sidecar(workdir: Path, name: str, events: dict[str, Any]) -> Sidecar:
    run_dir = workdir / name
    run_dir.mkdir()
    sidecar = Sidecar(
        run_dir, {}, events=events, telemetry={"log_format": "json", "log_level": "warning"}
    ).start()
    try:
        await sidecar.wait_ready()
    except AssertionError as exc:
        sidecar.kill()
        raise BenchError(str(exc)) from None
    return sidecar


async def wait_for(
    session: aiohttp.ClientSession, sidecar: Sidecar, what: str, done: Any, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        current = await status(session, sidecar)
        if done(current):
            return current
        if time.monotonic() > deadline:
            raise BenchError(
                f"sidecar: {what} not reached in {timeout:g}s: {current}\n{sidecar.logs()[-3000:]}"
            )
        await asyncio.sleep(0.01)


async def phase_throughput(
    args: argparse.Namespace,
    workdir: Path,
    exchange: aio_pika.abc.AbstractExchange,
    queue: aio_pika.abc.AbstractQueue,
) -> dict[str, Any]:
    """Direct and relay in alternating rounds, so drift in the machine hits both alike."""
    sidecar = await start_sidecar(
        workdir, "relay", events_config(exchange.name, workdir / "relay.db")
    )
    rounds = []
    outcomes = Counter[str]()

    async def drained(sidecar: Sidecar) -> None:
        async with aiohttp.ClientSession() as session:
            await wait_for(
                session,
                sidecar,
                "an empty spool",
                lambda s: s["spool"]["depth"] == 0,
                DRAIN_TIMEOUT_S,
            )

    cores: dict[str, dict[str, float]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for(
                session,
                sidecar,
                "broker connected",
                lambda s: s["broker"]["state"] == "connected",
                20,
            )
        await http_publish(sidecar.url, WARMUP_EVENTS, args.publishers, args.size, "warm")
        await queue.purge()
        assert sidecar.proc is not None
        for i in range(args.rounds):
            meter, began = CpuMeter(None), time.perf_counter()
            direct = await bench_direct(exchange, args.events, args.in_flight, args.size)
            cores["direct"] = meter.used(time.perf_counter() - began)
            await queue.purge()
            # Context, not the target: aio-pika held to the relay's concurrency.
            direct_same = await bench_direct(exchange, args.events, args.publishers, args.size)
            await queue.purge()
            meter, began = CpuMeter(sidecar.proc.pid), time.perf_counter()
            relay_aiohttp, got = await http_publish(
                sidecar.url, args.events, args.publishers, args.size, "bench.relay"
            )
            cores["relay_aiohttp"] = meter.used(time.perf_counter() - began)
            outcomes.update(got)
            await drained(sidecar)
            await queue.purge()
            topic = f"bench.wrk{i}"
            meter, began = CpuMeter(sidecar.proc.pid), time.perf_counter()
            relay, bad = await wrk_publish(
                sidecar.url,
                workdir,
                seconds=args.wrk_seconds,
                publishers=args.publishers,
                size=args.size,
                topic=topic,
            )
            cores["relay_wrk"] = meter.used(time.perf_counter() - began)
            got_wrk = await published(sidecar, topic)
            if bad:
                got_wrk["http_error"] = bad
            outcomes.update(got_wrk)
            await drained(sidecar)
            await queue.purge()
            log(
                f"round {i + 1}/{args.rounds}: direct {direct:,.0f} events/s; relay with wrk "
                f"{relay:,.0f} events/s ({relay / direct:.2f}) {dict(got_wrk)}; relay with "
                f"aiohttp {relay_aiohttp:,.0f} events/s ({relay_aiohttp / direct:.2f}) "
                f"{dict(got)}; direct with {args.publishers} in flight {direct_same:,.0f}/s"
            )
            rounds.append(
                {
                    "direct": round(direct),
                    "relay": round(relay),
                    "ratio": round(relay / direct, 3),
                    "relay_aiohttp": round(relay_aiohttp),
                    "ratio_aiohttp": round(relay_aiohttp / direct, 3),
                    "direct_at_relay_concurrency": round(direct_same),
                }
            )
    finally:
        sidecar.kill()
    direct_median = statistics.median(r["direct"] for r in rounds)
    relay_median = statistics.median(r["relay"] for r in rounds)
    aiohttp_median = statistics.median(r["relay_aiohttp"] for r in rounds)
    return {
        "direct_events_per_s": round(direct_median),
        "relay_events_per_s": round(relay_median),
        "ratio_vs_direct": round(relay_median / direct_median, 3),
        "relay_aiohttp_clients_events_per_s": round(aiohttp_median),
        "ratio_vs_direct_aiohttp_clients": round(aiohttp_median / direct_median, 3),
        "direct_at_relay_concurrency_events_per_s": round(
            statistics.median(r["direct_at_relay_concurrency"] for r in rounds)
        ),
        "rounds": rounds,
        "relay_outcomes": dict(outcomes),
        "cpu_cores_busy": cores,  # of the last round
    }


async def phase_drain(
    args: argparse.Namespace, workdir: Path, exchange: str, queue: aio_pika.abc.AbstractQueue
) -> dict[str, Any]:
    """Fill the spool with the broker unreachable (a refusing proxy), then let it through."""
    proxy = await TcpProxy(accepting=False).start()
    try:
        sidecar = await start_sidecar(
            workdir, "drain", events_config(exchange, workdir / "drain.db", proxy.url)
        )
        try:
            log(f"spool: filling with {args.spool_events} events, broker unreachable ...")
            assert sidecar.proc is not None
            meter, began = CpuMeter(sidecar.proc.pid), time.perf_counter()
            fill, fill_outcomes = await http_publish(
                sidecar.url, args.spool_events, args.publishers, args.size, "bench.spool"
            )
            fill_cores = meter.used(time.perf_counter() - began)
            async with aiohttp.ClientSession() as session:
                filled = await status(session, sidecar)
                depth = filled["spool"]["depth"]
                opened = time.perf_counter()
                proxy.accepting = True
                while proxy.connections == 0:  # the sidecar's reconnect back-off
                    if time.perf_counter() - opened > 30:
                        raise BenchError("the sidecar did not reconnect within 30 s")
                    await asyncio.sleep(0.001)
                connected = time.perf_counter()
                meter = CpuMeter(sidecar.proc.pid)
                await wait_for(
                    session,
                    sidecar,
                    "an empty spool",
                    lambda s: s["spool"]["depth"] == 0,
                    DRAIN_TIMEOUT_S,
                )
                emptied = time.perf_counter()
                cores = meter.used(emptied - connected)
        finally:
            sidecar.kill()
    finally:
        await proxy.stop()
    arrived = (await queue.channel.declare_queue(queue.name, passive=True)).declaration_result
    drain = depth / (emptied - connected)
    log(
        f"spool: filled at {fill:,.0f} events/s {dict(fill_outcomes)}; drained {depth} at "
        f"{drain:,.0f} events/s (reconnected {connected - opened:.2f}s after opening)"
    )
    return {
        "spool_drain_events_per_s": round(drain),
        "spool_drain_s": round(emptied - connected, 3),
        "spool_depth_before_drain": depth,
        "spool_bytes_before_drain": filled["spool"]["bytes"],
        "spool_fill_events_per_s": round(fill),
        "spool_fill_outcomes": dict(fill_outcomes),
        "spool_reconnect_wait_s": round(connected - opened, 3),
        "spool_drained_messages_in_queue": arrived.message_count,
        "spool_fill_cpu_cores_busy": fill_cores,
        "spool_drain_cpu_cores_busy": cores,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    exchange_name = f"bench-events.{uuid.uuid4().hex[:12]}"
    queue_name = f"bench-q.{uuid.uuid4().hex[:12]}"
    connection = await aio_pika.connect(AMQP_URL)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
            await queue.bind(exchange, "#")
            results = await phase_throughput(args, Path(tmp), exchange, queue)
            await queue.purge()
            results |= await phase_drain(args, Path(tmp), exchange_name, queue)
    finally:
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            await cleanup.queue_delete(queue_name)
            await cleanup.exchange_delete(exchange_name)
        await connection.close()
    results["targets"] = TARGETS_SPEC
    results["meets_targets"] = {
        "ratio_vs_direct": results["ratio_vs_direct"] >= TARGETS_SPEC["ratio_vs_direct_min"],
        "spool_drain_events_per_s": results["spool_drain_events_per_s"]
        >= TARGETS_SPEC["spool_drain_events_per_s_min"],
    }
    results["params"] = {
        "events_per_round": args.events,
        "rounds": args.rounds,
        "spool_events": args.spool_events,
        "size": args.size,
        "in_flight": args.in_flight,
        "publishers": args.publishers,
        "wrk_seconds": args.wrk_seconds,
        "queue": "quorum, durable",
    }
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    return results


async def bench_locked(args: argparse.Namespace) -> dict[str, Any]:
    # Shared: no cooperating test suite stops the broker in the middle of the run.
    async with broker_lock(exclusive=False):
        return await bench(args)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally`s that stop the sidecar


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=10240, help="events per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="direct/relay rounds (median)")
    parser.add_argument("--spool-events", type=int, default=10000, help="events to drain")
    parser.add_argument("--size", type=int, default=1024, help="bytes per event")
    parser.add_argument("--in-flight", type=int, default=256, help="direct: unconfirmed at most")
    parser.add_argument("--publishers", type=int, default=64, help="relay: concurrent clients")
    parser.add_argument("--wrk-seconds", type=float, default=4.0, help="relay with wrk: seconds")
    parser.add_argument("--quick", action="store_true", help="one round of 5,120 events")
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds, args.spool_events, args.wrk_seconds = 5120, 1, 5120, 2.0
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        import uvloop  # noqa: PLC0415 - optional, as for the sidecar

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        report = runner(bench_locked(args))
    except (BenchError, OSError, aio_pika.exceptions.AMQPError) as exc:
        log(f"bench_events: {exc}")
        return 1
    except KeyboardInterrupt:
        log("bench_events: interrupted; sidecar stopped")
        return 130
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

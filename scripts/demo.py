"""A guided tour of the sidecar's main job: the app calls `billing` on localhost, the
sidecar balances, retries, ejects a dead instance and opens the circuit when all are down.

Everything runs on this machine on embedded defaults (static upstreams, no Consul):
two "billing" instances (small aiohttp apps, subprocesses of this script), and a
`sidecar run` subprocess in front of them. When a `consul` binary is on PATH, the
demo runs `consul agent -dev` instead of static endpoints: the sidecar registers
the app "orders" with a TTL check it keeps passing from its probe of the app, and
discovers the billing instances (registered in the agent) by blocking queries.
Each step prints what was observed; when the story does not happen as it should,
the demo says what went wrong and exits 1, so it doubles as an end-to-end check.

Usage:  .venv/bin/python scripts/demo.py      (or `bash scripts/demo.sh`, which sets up .venv)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
UPSTREAM = "billing"
INVOICE = "/invoices/42"
INVOKE = f"/v1/invoke/{UPSTREAM}{INVOICE}"

# The story's knobs: small so each step takes a second, not half a minute.
CONSECUTIVE_FAILURES = 2  # outlier: failures in a row that eject an instance
BASE_EJECTION = 5.0  # seconds
FAILURE_THRESHOLD = 3  # circuit breaker: failed requests in a row that open it
OPEN_FOR = 2.0  # seconds the circuit stays open before a half-open probe
RETRIES = 1
EXCHANGE = f"demo-events-{os.getpid()}"  # deleted at the end, with the subscription's queues
WORK = 0.005  # seconds each billing call "works", so concurrent calls overlap


def render_config(
    app_port: int,
    admin_port: int,
    port_a: int,
    port_b: int,
    *,
    consul: str | None = None,
    orders_port: int = 0,
    amqp_port: int = 5672,
    spool: str = "spool.db",
) -> str:
    """The sidecar's YAML config for the demo: quick limits; static endpoints, or with
    `consul` (a dev agent's address) registration of "orders" and discovery of billing."""
    if consul is None:
        service = f"  port: {orders_port}          # the app (receives subscribed events)\n"
        registry = "consul:\n  enabled: false            # embedded defaults: static endpoints\n"
        found = f"    endpoints: [{HOST}:{port_a}, {HOST}:{port_b}]"
    else:
        service = f"  port: {orders_port}          # the app; probed by TCP connect\n"
        service += "  health: {interval: 1s, timeout: 500ms}\n"
        registry = f"consul:\n  enabled: true\n  address: {consul}\n"
        found = "    service: billing          # discovered from Consul (blocking queries)"
    return f"""\
# Written by scripts/demo.py: the app "orders" calls one upstream, "billing".
service:
  name: orders
  address: {HOST}
{service}listen: {HOST}:{app_port}
admin:
  listen: {HOST}:{admin_port}
{registry}upstreams:
  {UPSTREAM}:
{found}
    timeout: 5s
    per_try_timeout: 1s
    retries: {{max: {RETRIES}}}
    outlier: {{consecutive_failures: {CONSECUTIVE_FAILURES}, base_ejection: {BASE_EJECTION:g}s, max_ejection_percent: 50}}
    circuit_breaker: {{failure_threshold: {FAILURE_THRESHOLD}, open_for: {OPEN_FOR:g}s, half_open_probes: 1}}
events:
  amqp_url: amqp://guest:guest@{HOST}:{amqp_port}/   # through the demo's cuttable relay
  exchange: {EXCHANGE}
  confirm_timeout: 1s
  spool: {{path: {spool}}}
  subscriptions:
    - {{name: receipts, topic: "invoice.*", path: /events/invoice, max_attempts: 3,
       backoff: {{initial: 200ms, max: 1s}}}}
telemetry:
  tracing: {{exporter: console, schedule_delay: 100ms}}   # spans as JSON lines on stdout
shutdown:
  drain: 0s                 # no app to drain for in a demo: stop at once
  grace: 3s
"""  # noqa: E501 - one upstream setting per line reads better than wrapped YAML


class DemoFailed(Exception):
    """The story did not happen as it should; the message says which part."""


# --- the demo "billing" service (run as `demo.py --billing NAME PORT`) ----------------------


def serve_billing(name: str, port: int) -> None:
    """One billing instance: `GET /invoices/{id}` answers JSON naming this instance;
    `/live` is a WebSocket that answers each text message with `<instance>: <text>`."""
    import asyncio  # noqa: PLC0415 - only the billing subprocesses run an event loop

    from aiohttp import WSMsgType, web  # noqa: PLC0415 - only the billing subprocesses need it

    async def invoice(request: web.Request) -> web.Response:
        await asyncio.sleep(WORK)
        invoice_id = request.match_info["id"]
        return web.json_response({"invoice": invoice_id, "instance": name, "port": port})

    async def live(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"{name}: {message.data}")
        return ws

    received: list[dict[str, str]] = []

    async def event_in(request: web.Request) -> web.Response:
        """A subscription's delivery (the sidecar POSTs each event here)."""
        received.append(
            {
                "id": request.headers.get("ce-id", ""),
                "type": request.headers.get("ce-type", ""),
                "traceparent": request.headers.get("traceparent", ""),
                "body": (await request.read()).decode(errors="replace"),
            }
        )
        return web.Response(status=204)

    async def events_seen(_: web.Request) -> web.Response:
        return web.json_response(received)

    app = web.Application()
    app.router.add_get("/invoices/{id}", invoice)
    app.router.add_get("/live", live)
    app.router.add_post("/events/{kind}", event_in)
    app.router.add_get("/events", events_seen)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None)


# --- processes ---------------------------------------------------------------------------------


def free_port(taken: set[int]) -> int:
    """A port nobody listens on right now (the kernel's pick), distinct from `taken`."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what} did not happen within {timeout:g}s")
        time.sleep(interval)


def listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def child_env() -> dict[str, str]:
    """This environment minus settings that would override the demo's config file."""
    prefixes = ("SIDECAR_", "CONSUL_", "OTEL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


class Billing:
    """One billing instance in its own process, which the story kills and restarts."""

    def __init__(self, name: str, port: int, logs: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = logs / f"billing-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--billing", self.name, str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                start_new_session=True,  # Ctrl-C reaches the demo only; it cleans up
            )

    def wait_listening(self) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise DemoFailed(f"billing {self.name} exited; see {self.log_path}")
            return listening(self.port)

        wait_for(f"billing {self.name} listening on {HOST}:{self.port}", up, 15)

    def kill(self) -> None:
        """SIGKILL, like a crash or an OOM kill: no goodbye to open connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"<Billing {self.name} port={self.port} pid={pid}>"


@dataclass
class Reply:
    """What the app saw for one call."""

    status: int
    ms: float
    instance: str | None  # which billing instance answered, if one did
    error: str | None  # the x-sidecar-error header
    retry_after: str | None
    body: bytes

    def describe(self) -> str:
        text = f"{self.status}"
        if self.instance:
            text += f" from {self.instance}"
        if self.error:
            text += f"  x-sidecar-error: {self.error}"
        if self.retry_after:
            text += f"  Retry-After: {self.retry_after}"
        return f"{text}  ({self.ms:.2f} ms)"


class Sidecar:
    """The `sidecar run` subprocess and the app's (keep-alive) connection to it."""

    def __init__(self, config_path: Path, app_port: int, admin_port: int, logs: Path) -> None:
        self.config_path = config_path
        self.app_port = app_port
        self.admin_port = admin_port
        self.log_path = logs / "sidecar.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._conn: http.client.HTTPConnection | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise DemoFailed(
                    f"the sidecar exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                return self.admin("/ready")[0] == 200
            except OSError:
                return False

        wait_for("sidecar /ready answering 200", ready, 20, 0.1)

    def stop(self) -> int | None:
        """SIGTERM and wait for the graceful exit; SIGKILL if it hangs. Returns the exit code."""
        if self._conn is not None:
            self._conn.close()
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    # -- the app's view ---------------------------------------------------------------------

    def call_once(self) -> Reply:
        """One GET through the app listener on a connection of its own (thread-safe)."""
        conn = http.client.HTTPConnection(HOST, self.app_port, timeout=10)
        try:
            started = time.perf_counter()
            conn.request("GET", INVOKE)
            response = conn.getresponse()
            return _reply(response, response.read(), started)
        finally:
            conn.close()

    def call(self, target: str = INVOKE) -> Reply:
        """One GET through the app listener on a reused connection, timed end to end."""
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(HOST, self.app_port, timeout=10)
            try:
                started = time.perf_counter()
                self._conn.request("GET", target)
                response = self._conn.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # Our own idle keep-alive connection was closed: that is not the sidecar's
                # answer, so open a new one and send again.
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
                continue
            if response.will_close:
                self._conn.close()
                self._conn = None
            return _reply(response, body, started)
        raise AssertionError("unreachable")

    # -- the operator's view ------------------------------------------------------------------

    def admin(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.admin_port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metrics(self) -> str:
        status, body = self.admin("/metrics")
        if status != 200:
            raise DemoFailed(f"GET /metrics answered {status}")
        return body.decode()

    def circuit_state(self) -> int:
        """The `sidecar_circuit_state` gauge of billing: 0 closed, 1 half-open, 2 open."""
        pattern = rf'^sidecar_circuit_state\{{upstream="{UPSTREAM}"\}} (\S+)$'
        match = re.search(pattern, self.metrics(), re.MULTILINE)
        if match is None:
            raise DemoFailed(f"/metrics has no sidecar_circuit_state for {UPSTREAM}")
        return int(float(match[1]))

    def status(self) -> dict[str, Any]:
        """`/v1/status` for the billing upstream."""
        status, body = self.admin("/v1/status")
        if status != 200:
            raise DemoFailed(f"GET /v1/status answered {status}")
        upstream: dict[str, Any] = json.loads(body)["upstreams"][UPSTREAM]
        return upstream

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"<Sidecar app={HOST}:{self.app_port} admin={HOST}:{self.admin_port} pid={pid}>"


def _reply(response: http.client.HTTPResponse, body: bytes, started: float) -> Reply:
    error = response.getheader("x-sidecar-error")
    return Reply(
        status=response.status,
        ms=(time.perf_counter() - started) * 1000,
        instance=_instance(body) if error is None else None,
        error=error,
        retry_after=response.getheader("retry-after"),
        body=body,
    )


def _error_message(body: bytes) -> str:
    """The `error.message` of the sidecar's JSON error body, or the body itself."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")


def _instance(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    instance = data.get("instance") if isinstance(data, dict) else None
    return instance if isinstance(instance, str) else None


# --- telling the story -------------------------------------------------------------------------

STATE_NAMES = {0: "closed", 1: "half-open", 2: "open"}


def headline(number: int, text: str) -> None:
    print(f"\n{number}. {text}")
    print("   " + "-" * (len(text) + 3))


def fact(text: str) -> None:
    print(f"   {text}")


def show_endpoints(sidecar: Sidecar, names: dict[str, str]) -> list[dict[str, Any]]:
    """Print the endpoints excerpt of /v1/status and return it."""
    status = sidecar.status()
    fact(
        f"/v1/status: circuit {status['circuit']!r}, healthy {status['healthy']}, "
        f"ejected {status['ejected']}"
    )
    endpoints: list[dict[str, Any]] = status["endpoints"]
    for ep in endpoints:
        fact(
            f"  {ep['address']} ({names.get(ep['address'], '?')}): "
            f"ejected: {json.dumps(ep['ejected'])}, ejected_for_s: {ep['ejected_for_s']}, "
            f"consecutive_failures: {ep['consecutive_failures']}, ejections: {ep['ejections']}"
        )
    return endpoints


def show_circuit(sidecar: Sidecar) -> int:
    state = sidecar.circuit_state()
    gauge = f'sidecar_circuit_state{{upstream="{UPSTREAM}"}}'
    fact(f"/metrics: {gauge} {state}  ({STATE_NAMES[state]})")
    return state


def metric_value(metrics: str, name: str) -> float:
    """Sum of every sample of `name` for the billing upstream (0 when absent)."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") and f'upstream="{UPSTREAM}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def summarize(replies: list[Reply]) -> str:
    """`6x 200 from A, 2x 502 UPSTREAM_CONNECT_FAILED` in order of first appearance."""
    counts = Counter(
        f"{r.status} from {r.instance}" if r.instance else f"{r.status} {r.error or ''}".strip()
        for r in replies
    )
    return ", ".join(f"{n}x {what}" for what, n in counts.items())


def step_spread(sidecar: Sidecar, calls: int, clients: int) -> None:
    headline(1, "The app calls billing through the sidecar; both instances answer")
    fact(f"{calls} calls to GET http://{HOST}:{sidecar.app_port}{INVOKE}, {clients} at a time")
    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(lambda _: sidecar.call_once(), range(calls)))
    fact(f"-> {summarize(replies)}")
    fact(f"one answer: {replies[0].body.decode().strip()}")
    bad = [r for r in replies if r.status != 200]
    if bad:
        raise DemoFailed(f"calls failed while both instances were up: {bad[0].describe()}")
    answered = {r.instance for r in replies}
    if len(answered) < 2:
        raise DemoFailed(f"all {calls} calls went to one instance ({answered}); no balancing")

    proxy = f"http://{HOST}:{sidecar.app_port}"
    fact(f"an unmodified client with HTTP_PROXY={proxy} asks http://{UPSTREAM}{INVOICE}:")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    try:
        with opener.open(f"http://{UPSTREAM}{INVOICE}", timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except urllib.error.URLError as exc:
        raise DemoFailed(f"the proxy-style call did not reach the sidecar: {exc.reason}") from exc
    fact(f"-> {status} {body.decode().strip()}")
    if status != 200 or _instance(body) is None:
        raise DemoFailed("the HTTP_PROXY-style call was not answered by a billing instance")
    step_websocket(sidecar)


def step_websocket(sidecar: Sidecar) -> None:
    """A WebSocket through the sidecar: the 101 relayed, bytes both ways, in flight."""
    import asyncio  # noqa: PLC0415 - the one step that needs a client event loop

    import aiohttp  # noqa: PLC0415 - installed with the sidecar; imported where it is used

    url = f"ws://{HOST}:{sidecar.app_port}/v1/invoke/{UPSTREAM}/live"
    fact(f"a WebSocket client (aiohttp) opens {url}:")

    async def talk() -> tuple[list[str], int]:
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            answers = []
            for text in ("hello", "still there?"):
                await ws.send_str(text)
                answers.append(str((await ws.receive(timeout=10)).data))
            in_flight = int(sidecar.status()["in_flight"])
            return answers, in_flight

    try:
        answers, in_flight = asyncio.run(talk())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DemoFailed(f"the WebSocket through the sidecar failed: {exc!r}") from exc
    fact(f"-> 101 relayed, then echoes {answers}; in flight while open: {in_flight}")
    if len(answers) != 2 or not all(a.endswith(("hello", "still there?")) for a in answers):
        raise DemoFailed(f"the WebSocket tunnel did not carry the messages: {answers}")


def step_one_down(sidecar: Sidecar, b: Billing, names: dict[str, str]) -> None:
    headline(2, "Instance B crashes (kill -9); the app does not notice")
    retries_before = metric_value(sidecar.metrics(), "sidecar_retries_total")
    b.kill()
    fact(f"killed billing B (port {b.port})")
    replies: list[Reply] = []
    ejected = False
    while len(replies) < 20 and not (ejected and len(replies) >= 6):
        replies.append(sidecar.call())
        ejected = any(
            ep["ejected"] for ep in sidecar.status()["endpoints"] if names.get(ep["address"]) == "B"
        )
    times = sorted(r.ms for r in replies)
    fact(f"{len(replies)} calls, one at a time -> {summarize(replies)}")
    fact(f"latency: median {statistics.median(times):.2f} ms, slowest {times[-1]:.2f} ms")
    retries = metric_value(sidecar.metrics(), "sidecar_retries_total") - retries_before
    fact(f"/metrics: sidecar_retries_total grew by {retries:g}")
    show_endpoints(sidecar, names)
    failed = [r for r in replies if r.status != 200]
    if failed:
        raise DemoFailed(f"the app saw a failure while A was up: {failed[0].describe()}")
    if not ejected:
        raise DemoFailed(f"B was not ejected after {len(replies)} calls")


def step_all_down(sidecar: Sidecar, a: Billing, names: dict[str, str]) -> None:
    headline(3, "Instance A crashes too: fast, explicit errors, then the circuit opens")
    a.kill()
    fact(f"killed billing A (port {a.port})")
    replies: list[Reply] = []
    explained: set[str] = set()
    while len(replies) < 10:
        reply = sidecar.call()
        replies.append(reply)
        fact(f"call {len(replies)}: {reply.describe()}")
        if reply.error and reply.error not in explained:
            explained.add(reply.error)
            fact(f"        {_error_message(reply.body)}")
        if reply.error == "CIRCUIT_OPEN":
            break
    if replies[-1].error != "CIRCUIT_OPEN":
        raise DemoFailed(f"the circuit did not open after {len(replies)} failed calls")
    if not replies[-1].retry_after:
        raise DemoFailed("the CIRCUIT_OPEN answer has no Retry-After header")
    fact(f"body: {replies[-1].body.decode()}")
    show_circuit(sidecar)

    fast = [sidecar.call() for _ in range(50)]
    if any(r.error != "CIRCUIT_OPEN" for r in fast):
        other = next(r for r in fast if r.error != "CIRCUIT_OPEN")
        raise DemoFailed(f"the circuit let a call through while open: {other.describe()}")
    times = sorted(r.ms for r in fast)
    fact(
        f"{len(fast)} more calls while open: all 503 CIRCUIT_OPEN, answered in "
        f"median {statistics.median(times):.3f} ms, max {times[-1]:.3f} ms"
    )
    tried = [r.ms for r in replies if r.error != "CIRCUIT_OPEN"]
    if tried:
        median = statistics.median(tried)
        fact(f"(the {len(tried)} calls that still tried to reach billing: median {median:.2f} ms)")
    if statistics.median(times) > 25:
        raise DemoFailed("open-circuit answers are not fast")
    show_endpoints(sidecar, names)


def step_recovery(sidecar: Sidecar, a: Billing, names: dict[str, str]) -> None:
    headline(4, "Instance A comes back; a half-open probe closes the circuit")
    a.start()
    a.wait_listening()
    fact(f"restarted billing A on the same port {a.port}")
    reply = sidecar.call()
    fact(f"call right away: {reply.describe()}")
    if reply.error == "CIRCUIT_OPEN":
        fact(f"A is back, but the circuit stays open for open_for ({OPEN_FOR:g}s) before a probe")
        began = time.monotonic()
        wait_for("circuit half-open", lambda: sidecar.circuit_state() == 1, OPEN_FOR + 3)
        fact(f"after {time.monotonic() - began:.1f}s more:")
        show_circuit(sidecar)
        reply = sidecar.call()
        fact(f"next call is the probe: {reply.describe()}")
    if reply.status != 200:
        raise DemoFailed(f"the call after recovery failed: {reply.describe()}")
    if show_circuit(sidecar) != 0:
        raise DemoFailed("the circuit did not close after a successful probe")
    replies = [sidecar.call() for _ in range(6)]
    fact(f"6 more calls -> {summarize(replies)}")
    if any(r.status != 200 for r in replies):
        raise DemoFailed("calls failed after the circuit closed")
    show_endpoints(sidecar, names)


def publish(sidecar: Sidecar, topic: str, event_id: str, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection(HOST, sidecar.app_port, timeout=10)
    try:
        conn.request(
            "POST",
            f"/v1/publish/{topic}",
            json.dumps(body).encode(),
            {"content-type": "application/json", "ce-id": event_id},
        )
        response = conn.getresponse()
        answer: dict[str, Any] = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 202:
        raise DemoFailed(f"publish answered {response.status}: {answer}")
    return answer


def events_status(sidecar: Sidecar) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(sidecar.admin("/v1/status")[1])["events"]
    return status


def received(orders: Billing) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"http://{HOST}:{orders.port}/events", timeout=5) as resp:
        answer: list[dict[str, str]] = json.loads(resp.read())
    return answer


def step_events(sidecar: Sidecar, relay: TcpRelay, orders: Billing, broker: bool) -> None:
    headline(5, "Events: published without loss, delivered to a subscription")
    if not broker:
        for n in (1, 2, 3):
            answer = publish(sidecar, "invoice.paid", f"invoice-{n}-paid", {"invoice": n})
            fact(f"POST /v1/publish/invoice.paid (ce-id {answer['id']}) -> 202 {answer['status']}")
        depth = events_status(sidecar)["spool"]["depth"]
        fact(f"no RabbitMQ on {HOST}:5672: the events wait in the local spool (depth {depth})")
        fact("with `apt-get install rabbitmq-server` running, the demo also shows them")
        fact("confirmed, delivered to the app's subscription, and the spool draining")
        return
    wait_for(
        "the publisher connected to RabbitMQ",
        lambda: events_status(sidecar)["broker"]["state"] == "connected",
        15,
    )
    for n in (1, 2, 3):
        answer = publish(sidecar, "invoice.paid", f"invoice-{n}-paid", {"invoice": n})
        fact(f"POST /v1/publish/invoice.paid (ce-id {answer['id']}) -> 202 {answer['status']}")
    wait_for("3 deliveries to the app", lambda: len(received(orders)) >= 3, 15)
    fact(
        "subscription 'receipts' (invoice.*) POSTed them to the app: "
        + ", ".join(e["id"] for e in received(orders)[:3])
    )
    relay.cut()
    fact("RabbitMQ becomes unreachable (the demo cuts the connection):")
    wait_for(
        "the publisher noticed",
        lambda: events_status(sidecar)["broker"]["state"] != "connected",
        15,
    )
    for n in range(4, 9):
        answer = publish(sidecar, "invoice.paid", f"invoice-{n}-paid", {"invoice": n})
        fact(f"  ce-id {answer['id']} -> 202 {answer['status']}")
    spool = events_status(sidecar)["spool"]
    fact(f"the spool holds {spool['depth']} events ({spool['bytes']} bytes, SQLite, fsynced)")
    relay.restore()
    began = time.monotonic()
    wait_for("the spool to drain", lambda: events_status(sidecar)["spool"]["depth"] == 0, 30)
    fact(f"RabbitMQ is back: the spool drained in {time.monotonic() - began:.1f}s, in order")
    wait_for("8 deliveries to the app", lambda: len(received(orders)) >= 8, 30)
    ids = [e["id"] for e in received(orders)]
    fact(f"the app received all {len(set(ids))} events: {', '.join(ids[3:8])} ...")


async def _delete_demo_topology(port: int) -> None:
    import aio_pika  # noqa: PLC0415 - only when a broker was used

    connection = await aio_pika.connect(f"amqp://guest:guest@{HOST}:{port}/", timeout=5)
    async with connection:
        channel = await connection.channel()
        for queue in ("orders.receipts", "orders.receipts.dlq"):
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        with contextlib.suppress(Exception):
            await channel.exchange_delete(EXCHANGE)


def spans_of(sidecar: Sidecar, trace_id: str) -> list[dict[str, Any]]:
    """The spans of one trace the console exporter wrote into the sidecar's log."""
    spans = []
    for line in sidecar.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"context"' in line and trace_id in line:
            with contextlib.suppress(ValueError):
                span = json.loads(line)
                if span["context"]["trace_id"] == f"0x{trace_id}":
                    spans.append(span)
    return spans


def show_trace(spans: list[dict[str, Any]]) -> None:
    """Print a trace as a tree: kind, name and the attributes that tell the story."""
    keys = (
        "http.response.status_code",
        "sidecar.endpoint",
        "error.type",
        "sidecar.event.outcome",
        "messaging.destination.name",
    )
    ids = {s["context"]["span_id"] for s in spans}

    def show(parent: str | None, depth: int) -> None:
        children = [
            s for s in spans if (s["parent_id"] if s["parent_id"] in ids else None) == parent
        ]
        for span in sorted(children, key=lambda s: str(s["start_time"])):
            kind = span["kind"].removeprefix("SpanKind.")
            attrs = span["attributes"]
            shown = ", ".join(f"{k}={attrs[k]}" for k in keys if k in attrs)
            links = " (linked to its producer)" if span["links"] else ""
            fact(f"  {'   ' * depth}{kind:8} {span['name']}  {shown}{links}")
            show(span["context"]["span_id"], depth + 1)

    show(None, 0)


def step_traces(sidecar: Sidecar, orders: Billing, broker: bool) -> None:
    headline(6, "Traces: one call and one event, end to end")
    fact("tracing: {exporter: console} prints each span as a JSON line (Jaeger: set")
    fact("OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 instead; see docs/tracing.md)")
    trace_id = f"{random.getrandbits(128):032x}"
    caller = f"00-{trace_id}-{random.getrandbits(64):016x}-01"
    conn = http.client.HTTPConnection(HOST, sidecar.app_port, timeout=10)
    try:
        conn.request("GET", INVOKE, headers={"traceparent": caller})
        first = conn.getresponse()
        first.read()
        status = first.status
        conn.request(
            "POST",
            "/v1/publish/invoice.traced",
            b'{"invoice": 99}',
            {"content-type": "application/json", "ce-id": "invoice-99", "traceparent": caller},
        )
        answer = conn.getresponse()
        outcome = json.loads(answer.read())["status"]
    finally:
        conn.close()
    fact(f"GET {INVOKE} and POST /v1/publish/invoice.traced with traceparent {caller}")
    fact(f"  -> {status}, and 202 {outcome}")
    wanted = 6 if broker else 4  # SERVER, CLIENT; SERVER, PRODUCER (+ CONSUMER, CLIENT)
    wait_for(
        f"{wanted} spans of trace {trace_id}",
        lambda: len(spans_of(sidecar, trace_id)) >= wanted,
        15,
    )
    fact(f"trace {trace_id} (the app's own trace, continued):")
    show_trace(spans_of(sidecar, trace_id))
    if broker:
        got = [e for e in received(orders) if e["id"] == "invoice-99"]
        if got and got[0].get("traceparent"):
            fact(f"the app's handler received traceparent {got[0]['traceparent']}")


def step_metrics(sidecar: Sidecar) -> None:
    headline(7, "Everything above is in the metrics")
    fact(f"Prometheus metrics: http://{HOST}:{sidecar.admin_port}/metrics (while the demo runs)")
    fact(f"status JSON:        http://{HOST}:{sidecar.admin_port}/v1/status")
    wanted = (
        "sidecar_upstream_requests_total{",
        "sidecar_circuit_state{",
        "sidecar_retries_total{",
        "sidecar_events_published_total{",
        "sidecar_events_delivered_total{",
    )
    metrics = sidecar.metrics().splitlines()
    lines = [
        next(x for x in metrics if x.startswith(p))
        for p in wanted
        if any(x.startswith(p) for x in metrics)
    ]
    fact("excerpt:")
    for line in lines[:7]:
        fact(f"  {line}")
    if not any(line.startswith(wanted[0]) for line in lines):
        raise DemoFailed("/metrics has no sidecar_upstream_requests_total")


# --- putting it together -----------------------------------------------------------------------


class TcpRelay:
    """A TCP forwarder to RabbitMQ that the demo can cut and restore (threads, no asyncio)."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.create_server((HOST, self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones: RabbitMQ 'vanishes'."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the pipe threads; the peer sees it
                    sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # for connecting only: RabbitMQ may stay silent for long
            with self._lock:
                if self._listener is not listener:  # cut while it connected: cut it too
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class ConsulAgent:
    """`consul agent -dev` on free ports, when a `consul` binary is on PATH."""

    def __init__(self, binary: str, taken: set[int], logs: Path) -> None:
        self.binary = binary
        self.http_port = free_port(taken)
        self.log_path = logs / "consul.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_ports = [free_port(taken) for _ in range(4)]

    @property
    def address(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def start(self) -> None:
        serf_lan, serf_wan, server, grpc = self.extra_ports
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "agent",
                    "-dev",
                    "-bind",
                    HOST,
                    "-client",
                    HOST,
                    f"-http-port={self.http_port}",
                    "-dns-port=-1",
                    f"-grpc-port={grpc}",
                    f"-serf-lan-port={serf_lan}",
                    f"-serf-wan-port={serf_wan}",
                    f"-server-port={server}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                start_new_session=True,
            )

    def call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.address + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=5) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def wait_leader(self) -> None:
        def elected() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise DemoFailed(f"consul agent exited; see {self.log_path}")
            try:
                return bool(self.call("GET", "/v1/status/leader"))
            except (OSError, ValueError):
                return False

        wait_for(f"consul agent -dev answering on {self.address}", elected, 30, 0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # consul leaves gracefully on SIGINT
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def step_consul(sidecar: Sidecar, agent: ConsulAgent) -> None:
    headline(0, "Consul: the app is registered, billing is discovered")
    services = agent.call("GET", "/v1/agent/services")
    orders = [s for s in services.values() if s["Service"] == "orders"]
    if not orders:
        raise DemoFailed(f"the sidecar did not register 'orders' in Consul: {services}")
    checks = agent.call("GET", "/v1/agent/checks")
    check = checks.get(f"service:{orders[0]['ID']}", {})
    fact(f"registered in the local agent: {orders[0]['ID']} at {HOST}:{orders[0]['Port']}")
    fact(f"its TTL check: {check.get('Status')} — {check.get('Output')}")
    status = json.loads(sidecar.admin("/v1/status")[1])
    found = [e["address"] for e in status["upstreams"][UPSTREAM]["endpoints"]]
    fact(f"billing discovered by a blocking query: {', '.join(sorted(found))}")
    if len(found) != 2:
        raise DemoFailed(f"expected both billing instances from Consul, got {found}")


@dataclass
class Demo:
    relay: TcpRelay
    orders: Billing
    broker: bool  # RabbitMQ answers on 127.0.0.1:5672


@contextmanager
def running(workdir: Path) -> Iterator[tuple[Sidecar, Billing, Billing, ConsulAgent | None, Demo]]:
    """Start billing A and B and the sidecar (and a Consul dev agent when `consul` is on
    PATH); stop every process on the way out."""
    taken: set[int] = set()
    a = Billing("A", free_port(taken), workdir)
    b = Billing("B", free_port(taken), workdir)
    app_port, admin_port = free_port(taken), free_port(taken)
    binary = shutil.which("consul")
    agent = ConsulAgent(binary, taken, workdir) if binary else None
    orders = Billing("orders", free_port(taken), workdir)
    amqp = int(os.environ.get("DEMO_AMQP_PORT", "5672"))  # a closed port shows the no-broker story
    relay = TcpRelay(free_port(taken), (HOST, amqp))
    broker = listening(amqp)
    config = workdir / "sidecar.yaml"
    config.write_text(
        render_config(
            app_port,
            admin_port,
            a.port,
            b.port,
            consul=agent.address if agent else None,
            orders_port=orders.port,
            amqp_port=relay.port,
            spool=str(workdir / "spool.db"),
        )
    )
    sidecar = Sidecar(config, app_port, admin_port, workdir)
    try:
        a.start()
        b.start()
        orders.start()
        relay.restore()
        if agent is not None:
            agent.start()
            agent.wait_leader()
            for instance in (a, b):  # as their own sidecars would
                agent.call(
                    "PUT",
                    "/v1/agent/service/register",
                    {
                        "ID": f"billing-{instance.name}",
                        "Name": UPSTREAM,
                        "Address": HOST,
                        "Port": instance.port,
                    },
                )
        sidecar.start()
        a.wait_listening()
        b.wait_listening()
        orders.wait_listening()
        sidecar.wait_ready()
        yield sidecar, a, b, agent, Demo(relay, orders, broker)
    except DemoFailed:
        print(f"\nlast lines of {sidecar.log_path}:\n{sidecar.log_tail()}", file=sys.stderr)
        raise
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        a.kill()
        b.kill()
        code = sidecar.stop()
        orders.kill()
        relay.cut()
        if agent is not None:
            agent.stop()
        if broker:
            with contextlib.suppress(Exception):
                asyncio.run(_delete_demo_topology(5672))
        if code not in (None, 0):
            print(f"\nthe sidecar exited with code {code}:\n{sidecar.log_tail()}", file=sys.stderr)


def tell(workdir: Path) -> None:
    """The whole story, from start to stop."""
    with running(workdir) as (sidecar, a, b, agent, demo):
        names = {f"{HOST}:{a.port}": "A", f"{HOST}:{b.port}": "B"}
        fact(f"billing A on {HOST}:{a.port}, billing B on {HOST}:{b.port}")
        fact(
            f"sidecar (pid {sidecar.proc.pid if sidecar.proc else '?'}) ready: app API on "
            f"{HOST}:{sidecar.app_port}, admin on {HOST}:{sidecar.admin_port}"
        )
        config = sidecar.config_path.read_text().splitlines()
        if agent is None:
            fact("its config, upstreams and events (no Consul, static endpoints):")
        else:
            fact(f"its config, upstreams and events (Consul dev agent at {agent.address}):")
        for line in config[config.index("upstreams:") : config.index("shutdown:")]:
            fact(f"  {line}")
        if agent is not None:
            step_consul(sidecar, agent)
        else:
            fact("(no `consul` binary on PATH: static endpoints; with one, the demo also")
            fact(" runs `consul agent -dev` and shows registration and discovery)")
        step_spread(sidecar, 16, 8)
        step_one_down(sidecar, b, names)
        step_all_down(sidecar, a, names)
        step_recovery(sidecar, a, names)
        step_events(sidecar, demo.relay, demo.orders, demo.broker)
        step_traces(sidecar, demo.orders, demo.broker)
        step_metrics(sidecar)
        began = time.monotonic()
        code = sidecar.stop()
        print(f"\nSIGTERM: the sidecar exited with code {code} in {time.monotonic() - began:.2f}s")
        if code != 0:
            raise DemoFailed("the sidecar did not stop cleanly (exit code 0) on SIGTERM")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--billing", nargs=2, metavar=("NAME", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.billing:
        serve_billing(args.billing[0], int(args.billing[1]))
        return 0

    missing = [name for name in ("sidecar", "aiohttp") if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"{sys.executable} cannot import {', '.join(missing)}: run `bash scripts/demo.sh`, "
            "or `pip install -e .` in the repository first",
            file=sys.stderr,
        )
        return 1

    # Also when started with SIGINT ignored (a background job of a script): Ctrl-C and
    # SIGTERM must reach the cleanup.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    print("hms-sidecar demo: the app 'orders' calls 'billing' (instances A and B) via its sidecar")
    try:
        tell(workdir)
    except DemoFailed as exc:
        print(f"\nDEMO FAILED: {exc}\n(config and logs kept in {workdir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        shutil.rmtree(workdir, ignore_errors=True)
        print("\ninterrupted; every demo process was stopped", file=sys.stderr)
        return 130
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nDemo complete in {time.monotonic() - began:.1f}s; every process stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

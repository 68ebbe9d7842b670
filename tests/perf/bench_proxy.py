"""Benchmark the sidecar's proxy against nginx served directly and through HAProxy.

One run starts nginx (the upstream), HAProxy in front of it and three sidecars in
front of it - tracing off, tracing on at ratio 0.01 and at ratio 1.0 (spans
exported over OTLP/HTTP to an nginx location that accepts them; requests carry
no trace context, so the ratio decides) - loads each with wrk at 1 and 32
connections, and prints one JSON object to stdout (`tail_c32` gives every target's
p99 against HAProxy's and its p99/p50 spread); progress goes to stderr.
Each sidecar's CPU time per request is read from /proc around its runs.
Everything runs on this machine in one run, interleaved per connection count, so
the ratios between targets mean something even though the absolute numbers
depend on the machine.

Usage: .venv/bin/python tests/perf/bench_proxy.py [--duration 10] [--quick]

Exit status is 0 whether or not the targets are met (this is a measurement,
not a test) and 1 when a server or wrk fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"
WRK = "/usr/bin/wrk"
CONNECTIONS = (1, 32)
REPO = Path(__file__).resolve().parents[2]
#: The tracing every target of the issue is judged with: configured, sampling 1 in 100.
TRACED: dict[str, object] = {"sampler_ratio": 0.01}
#: The sidecars measured, by target name: their `telemetry.tracing` (None: tracing off).
SIDECARS: dict[str, dict[str, object] | None] = {
    "sidecar": None,
    "sidecar_trace_0.01": TRACED,
    "sidecar_trace_1": {"sampler_ratio": 1.0},
}
#: A minimal keep-alive forwarder on the sidecar's own building blocks (uvloop +
#: httptools, no features): the Python ceiling the sidecar is compared with.
MINIMAL = Path(__file__).with_name("minimal_forwarder.py")
TARGETS = ("direct", "haproxy", "minimal", *SIDECARS)
WARMUP_S = 1
#: The open-loop load generator (wrk is closed-loop: see `open_tails`), built with cc.
OPENLOOP_SRC = Path(__file__).with_name("openloop.c")
#: Open-loop tails: requests due at this share of the traced sidecar's closed-loop
#: throughput at 32 connections, the same rate for every target, in this many rounds.
OPEN_LOOP_LOAD = 0.5
OPEN_LOOP_ROUNDS = 3
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
#: The hot-path issue's targets (with tracing configured at ratio 0.01, they apply to
#: the `sidecar_trace_0.01` target; the plain sidecar is reported beside it).
TARGETS_SPEC = {
    "ratio_rps_vs_haproxy_c32_min": 0.55,
    "ratio_vs_minimal_forwarder_c32_min": 0.7,
    "added_p50_us_c1_max": 60,
    "p99_vs_haproxy_c32_max": 1.3,
    # The same bound at the same offered load (open loop, see open_tails).
    "p99_vs_haproxy_open_c32_max": 1.3,
    "rss_mb_max": 45,
}

# Environment proxies must not intercept requests to 127.0.0.1.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_SOCKET_ERRORS = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


class BenchError(Exception):
    """A server or wrk failed; the message says which and why."""


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    errors: int
    non_2xx: int
    socket_errors: int


@dataclass(frozen=True)
class OpenLoopResult:
    """One run of openloop.c: latencies in microseconds from when each request was due."""

    rate: float
    due: int  # after the warm-up: answered with a 200 + errors
    answered: int
    p50_us: float
    p99_us: float
    p999_us: float
    errors: int
    late_sends: int


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_ports(count: int) -> list[int]:
    """Ephemeral ports that are free now; all held open together so they differ."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


@contextmanager
def spawn(
    name: str, argv: list[str], workdir: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run argv with output in <workdir>/<name>.log; always stopped on exit."""
    with (workdir / f"{name}.log").open("wb") as out:
        # A new session keeps Ctrl-C away from the children so we stop them in order.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            cwd=cwd,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(f"{name} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; killing it")
                proc.kill()
                proc.wait()


def wait_http_ok(name: str, proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Return once url answers 200; raise with the server's output if it exits or times out."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with status {proc.returncode} before {url} answered 200;"
                f" its output:\n{tail(log_path)}"
            )
        try:
            with _HTTP.open(url, timeout=1) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(
        f"{name} not ready: {url} did not answer 200 within {READY_TIMEOUT_S:.0f}s"
        f" (last: {last}); its output:\n{tail(log_path)}"
    )


@contextmanager
def start_nginx(workdir: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    prefix = workdir / "nginx"
    prefix.mkdir()
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 75s;
{temp_paths}
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "hello from nginx\\n"; }}
        # The tracing sidecars' OTLP/HTTP collector: accepts and drops every batch.
        location = /v1/traces {{ client_max_body_size 64m; return 200 ""; }}
    }}
}}
""")
    argv = [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    with spawn("nginx", argv, workdir) as proc:
        wait_http_ok("nginx", proc, f"http://127.0.0.1:{port}/", prefix / "error.log")
        yield proc


@contextmanager
def start_haproxy(workdir: Path, port: int, upstream: int) -> Iterator[subprocess.Popen[bytes]]:
    conf = workdir / "haproxy.cfg"
    conf.write_text(f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend bench
    bind 127.0.0.1:{port}
    default_backend nginx

backend nginx
    server nginx 127.0.0.1:{upstream}
""")
    with spawn("haproxy", [HAPROXY, "-db", "-f", str(conf)], workdir) as proc:
        wait_http_ok("haproxy", proc, f"http://127.0.0.1:{port}/", workdir / "haproxy.log")
        yield proc


@contextmanager
def start_minimal(workdir: Path, port: int, upstream: int) -> Iterator[subprocess.Popen[bytes]]:
    argv = [sys.executable, str(MINIMAL), str(port), str(upstream)]
    with spawn("minimal", argv, workdir) as proc:
        wait_http_ok("minimal", proc, f"http://127.0.0.1:{port}/", workdir / "minimal.log")
        yield proc


@contextmanager
def start_sidecar(
    workdir: Path,
    upstream: int,
    name: str = "sidecar",
    tracing: dict[str, object] | None = None,
    source: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Yield the sidecar process and the port of its dedicated listener for nginx; with
    `source`, the sidecar package of that checkout (`python -m sidecar` run there)."""
    listen, admin, proxy = free_ports(3)
    conf = workdir / f"{name}.yaml"
    telemetry: dict[str, object] = {"log_level": "warning"}
    if tracing is not None:
        telemetry["tracing"] = {"otlp_endpoint": f"http://127.0.0.1:{upstream}", **tracing}
    conf.write_text(f"""\
service: {{name: bench}}
listen: 127.0.0.1:{listen}
admin: {{listen: 127.0.0.1:{admin}}}
consul: {{enabled: false}}
telemetry: {json.dumps(telemetry)}
upstreams:
  nginx:
    endpoints: ["127.0.0.1:{upstream}"]
    listen: 127.0.0.1:{proxy}
""")
    argv = [sys.executable, "-m", "sidecar", "run", "-c", str(conf)]
    log_path = workdir / f"{name}.log"
    with spawn(name, argv, workdir, cwd=source) as proc:
        wait_http_ok("sidecar", proc, f"http://127.0.0.1:{admin}/ready", log_path)
        # Ready must also mean it proxies: fail here rather than benchmark error pages.
        wait_http_ok("sidecar proxy", proc, f"http://127.0.0.1:{proxy}/", log_path)
        yield proc, proxy


def parse_wrk(output: str) -> WrkResult:
    """Requests/s, p50/p90/p99 in microseconds and error counts from `wrk --latency` output."""

    def latency_us(percent: str) -> float:
        match = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
        if match is None:
            raise BenchError(f"no {percent}% latency in wrk output:\n{output}")
        return float(match[1]) * _UNIT_US[match[2]]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if rps is None:
        raise BenchError(f"no Requests/sec in wrk output:\n{output}")
    sock = re.search(_SOCKET_ERRORS, output)
    socket_errors = sum(int(n) for n in sock.groups()) if sock else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    non_2xx = int(non2xx[1]) if non2xx else 0
    return WrkResult(
        rps=round(float(rps[1]), 1),
        p50_us=round(latency_us("50"), 1),
        p90_us=round(latency_us("90"), 1),
        p99_us=round(latency_us("99"), 1),
        errors=non_2xx + socket_errors,
        non_2xx=non_2xx,
        socket_errors=socket_errors,
    )


def run_wrk(port: int, connections: int, duration_s: int, script: Path | None = None) -> WrkResult:
    """`script`: a wrk Lua script (cpu_split.py's `--body` sends POSTs with one)."""
    argv = [WRK, "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    done = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=duration_s + 30,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"wrk exited with status {done.returncode}:\n{done.stderr}")
    return parse_wrk(done.stdout)


def build_openloop(workdir: Path) -> Path:
    """tests/perf/openloop.c compiled into `workdir`."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("a C compiler is needed to build tests/perf/openloop.c (Debian: gcc)")
    binary = workdir / "openloop"
    done = subprocess.run(
        [cc, "-O2", "-o", str(binary), str(OPENLOOP_SRC)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"cannot build {OPENLOOP_SRC.name}:\n{done.stderr}")
    return binary


def run_open_loop(
    binary: Path, port: int, connections: int, rate: float, duration_s: int
) -> OpenLoopResult:
    """Requests due at `rate` per second for `duration_s` (after a counted-out second)."""
    argv = [str(binary), "-c", str(connections), "-r", str(rate), "-d", str(duration_s)]
    done = subprocess.run(
        [*argv, "-w", str(WARMUP_S), "127.0.0.1", str(port), "/"],
        capture_output=True,
        text=True,
        timeout=duration_s + WARMUP_S + 30,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"openloop exited with status {done.returncode}:\n{done.stderr}")
    out = json.loads(done.stdout)
    if out["answered"] + out["errors"] != out["due"]:
        raise BenchError(f"openloop lost track of requests: {done.stdout}")
    return OpenLoopResult(
        rate=out["rate"],
        due=out["due"],
        answered=out["answered"],
        p50_us=out["p50_us"],
        p99_us=out["p99_us"],
        p999_us=out["p999_us"],
        errors=out["errors"],
        late_sends=out["late_sends"],
    )


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) pid has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of pid in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    rss, hwm = (round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM"))
    return rss, hwm


def versions() -> dict[str, str]:
    def first_match(argv: list[str], pattern: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        match = re.search(pattern, done.stdout + done.stderr)
        return match[1] if match else "unknown"

    return {
        "haproxy": first_match([HAPROXY, "-v"], r"HAProxy version (\S+)"),
        "nginx": first_match([NGINX, "-v"], r"nginx/(\S+)"),
    }


def judge(
    results: dict[str, dict[str, WrkResult]],
    target: str,
    rss_mb: float,
    open_loop: dict[str, Any] | None = None,
) -> tuple[dict[str, float], dict[str, bool]]:
    """The issue's measures of one sidecar target, and whether each meets TARGETS_SPEC
    (`open_loop`: the open-loop tails, `open_tails`)."""
    c1, c32 = results["c1"], results["c32"]
    spec = TARGETS_SPEC
    measured = {
        "ratio_rps_vs_haproxy_c32": round(c32[target].rps / c32["haproxy"].rps, 3),
        "ratio_vs_minimal_forwarder_c32": round(c32[target].rps / c32["minimal"].rps, 3),
        "added_p50_us_c1": round(c1[target].p50_us - c1["direct"].p50_us, 1),
        "p99_vs_haproxy_c32": round(c32[target].p99_us / c32["haproxy"].p99_us, 2),
        "rss_mb": rss_mb,
    }
    meets = {
        "ratio_rps_vs_haproxy_c32": measured["ratio_rps_vs_haproxy_c32"]
        >= spec["ratio_rps_vs_haproxy_c32_min"],
        "ratio_vs_minimal_forwarder_c32": measured["ratio_vs_minimal_forwarder_c32"]
        >= spec["ratio_vs_minimal_forwarder_c32_min"],
        "added_p50_us_c1": measured["added_p50_us_c1"] <= spec["added_p50_us_c1_max"],
        "p99_vs_haproxy_c32": measured["p99_vs_haproxy_c32"] <= spec["p99_vs_haproxy_c32_max"],
        "rss_mb": rss_mb <= spec["rss_mb_max"],
    }
    if open_loop is not None:
        ratio = open_loop["p99_vs_haproxy"][target]  # None: no round without errors
        measured["p99_vs_haproxy_open_c32"] = ratio
        meets["p99_vs_haproxy_open_c32"] = (
            ratio is not None and ratio <= spec["p99_vs_haproxy_open_c32_max"]
        )
    return measured, meets


def summarize(  # noqa: PLR0917 - the report of one run, all of it
    results: dict[str, dict[str, WrkResult]],
    rss: tuple[float, float],
    duration_s: int,
    cpu_us: dict[str, float],
    compiled_rss: tuple[float, float] | None = None,
    previous_traced: bool = False,
    open_rounds: list[dict[str, OpenLoopResult]] | None = None,
) -> dict[str, object]:
    c1 = results["c1"]
    open_loop = open_tails(open_rounds) if open_rounds else None
    ratio = {c: round(r["sidecar"].rps / r["haproxy"].rps, 3) for c, r in results.items()}
    c32 = results["c32"]
    ratios = {name: round(c32[name].rps / c32["haproxy"].rps, 3) for name in SIDECARS}
    targets = {"ratio_0.01_vs_off_min": 0.9, "ratio_1_vs_off_min": 0.35}
    tracing: dict[str, object] = {
        "ratio_rps_vs_haproxy_c32": ratios,
        "ratio_0.01_vs_off_c32": round(c32["sidecar_trace_0.01"].rps / c32["sidecar"].rps, 3),
        "ratio_1_vs_off_c32": round(c32["sidecar_trace_1"].rps / c32["sidecar"].rps, 3),
        "cpu_us_per_request_c32": cpu_us,
        "sampled_cost_us_per_request": round(cpu_us["sidecar_trace_1"] - cpu_us["sidecar"], 1),
        "targets": targets,
    }
    if "sidecar_previous" in c32:
        previous = c32["sidecar_previous"].rps / c32["haproxy"].rps
        ratios["sidecar_previous"] = round(previous, 3)
        if previous_traced:  # both at ratio 0.01: this build against the previous one
            this = c32["sidecar_trace_0.01"]
            tracing["0.01_vs_previous_0.01_c32"] = {
                "rps": round(this.rps / c32["sidecar_previous"].rps, 3),
                "p99": round(this.p99_us / c32["sidecar_previous"].p99_us, 3),
                "previous_p99_vs_haproxy": round(
                    c32["sidecar_previous"].p99_us / c32["haproxy"].p99_us, 2
                ),
            }
        else:
            tracing["off_vs_previous_c32"] = round(ratio["c32"] / previous, 3)
            targets["off_vs_previous_min"] = 0.97
    added = {t: round(c1[t].p50_us - c1["direct"].p50_us, 1) for t in ("haproxy", "sidecar")}
    spec = TARGETS_SPEC
    measured, meets = judge(results, "sidecar_trace_0.01", rss[0], open_loop)
    p99_vs_haproxy = measured["p99_vs_haproxy_c32"]
    flagged = [f"{c}/{t}" for c, row in results.items() for t, res in row.items() if res.errors]
    if open_loop is not None:
        flagged += [f"open/{t}" for t, errors in open_loop["errors"].items() if errors]
    compiled: dict[str, object] = {}
    if compiled_rss is not None:
        # The optional mypyc build (scripts/compile.py), tracing at 0.01 like the target.
        measured_c, meets_c = judge(results, "sidecar_compiled", compiled_rss[0], open_loop)
        compiled = {
            "compiled": {
                "measured": measured_c,
                "cpu_us_per_request_c32": cpu_us.get("sidecar_compiled"),
                "meets_targets": meets_c,
            }
        }
    return {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), **versions()},
        "duration_s": duration_s,
        "results": {c: {t: asdict(res) for t, res in row.items()} for c, row in results.items()},
        "runs_with_errors": flagged,
        "ratio_rps_vs_haproxy": ratio,
        "p99_vs_haproxy_c32_tracing_0.01": p99_vs_haproxy,
        "ratio_vs_minimal_forwarder": {
            c: round(r["sidecar"].rps / r["minimal"].rps, 3) for c, r in results.items()
        },
        "minimal_forwarder_vs_haproxy": {
            c: round(r["minimal"].rps / r["haproxy"].rps, 3) for c, r in results.items()
        },
        "tail_c32": tails(c32),
        **({"open_loop_c32": open_loop} if open_loop is not None else {}),
        "tracing": tracing,
        "added_p50_us_c1": added,
        "sidecar_rss_mb": rss[0],
        "sidecar_peak_rss_mb": rss[1],
        "targets": spec,
        "measured_tracing_0.01": measured,
        "meets_targets": meets,
        **compiled,
    }


def tails(c32: dict[str, WrkResult]) -> dict[str, dict[str, float]]:
    """Every target's p99 against HAProxy's, and its own p99/p50 and p90/p50, at 32
    connections.

    wrk keeps 32 requests in flight, so a target's median latency is about 32 / its
    requests per second (Little's law) and its p99 against HAProxy's is about HAProxy's
    throughput over its own, times the ratio of their spreads (p99/p50). The spread is
    what a target's own stalls (a GC pause, a thread holding the GIL) would widen; p90/p50
    is the body of the distribution, which a proxy that answers requests out of the order
    they came in widens too (the pool's order within one pass of the loop did: see
    docs/performance.md). HAProxy's and the minimal forwarder's is about 1.2-1.3.
    """
    haproxy = c32["haproxy"].p99_us
    return {
        "p99_vs_haproxy": {t: round(r.p99_us / haproxy, 2) for t, r in c32.items()},
        "p99_over_p50": {t: round(r.p99_us / r.p50_us, 2) for t, r in c32.items()},
        "p90_over_p50": {t: round(r.p90_us / r.p50_us, 2) for t, r in c32.items()},
    }


def open_tails(rounds: list[dict[str, OpenLoopResult]]) -> dict[str, Any]:
    """Every target's latency at the same offered load, medians over the rounds.

    wrk is closed-loop: each connection sends its next request when the last answer
    arrives, so a slower proxy is offered less load and its p99 against HAProxy's
    mostly measures throughput (see `tails`). openloop.c sends every target the same
    requests at the same times (a fixed rate, 32 connections) and counts each
    latency from when the request was due, so a target's p99 against HAProxy's is
    how much longer it makes the same requests wait. The ratio is taken within each
    round, where both ran in the same machine state, and only from rounds where
    neither had errors (a failed request has no latency: failing the slowest would
    make a better p99); None when there is no such round.
    """
    names = list(rounds[0])

    def median(values: Iterator[float]) -> float:
        return round(statistics.median(values), 1)

    def p99_vs_haproxy(target: str) -> float | None:
        clean = [
            r[target].p99_us / r["haproxy"].p99_us
            for r in rounds
            if r[target].errors == r["haproxy"].errors == 0 and r["haproxy"].p99_us > 0
        ]
        return round(statistics.median(clean), 2) if clean else None

    return {
        "rate_rps": rounds[0]["haproxy"].rate,
        "rounds": len(rounds),
        "p50_us": {t: median(r[t].p50_us for r in rounds) for t in names},
        "p99_us": {t: median(r[t].p99_us for r in rounds) for t in names},
        "p999_us": {t: median(r[t].p999_us for r in rounds) for t in names},
        "p99_vs_haproxy": {t: p99_vs_haproxy(t) for t in names},
        "errors": {t: sum(r[t].errors for r in rounds) for t in names},
        # Requests due when no connection was free: the target fell behind the rate.
        "late_sends": {t: sum(r[t].late_sends for r in rounds) for t in names},
    }


def compile_copy(workdir: Path) -> Path:
    """This checkout's package compiled by scripts/compile.py in `workdir`; its root."""
    root = workdir / "compiled"
    log("compiling the hot path (scripts/compile.py, about 30 s)")
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compile.py"), "--root", str(root), "--copy"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"scripts/compile.py failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return root


def bench(
    duration_s: int,
    previous: Path | None = None,
    compiled: bool = False,
    previous_traced: bool = False,
) -> dict[str, object]:
    for binary in (NGINX, HAPROXY, WRK):
        if shutil.which(binary) is None:
            raise BenchError(f"{binary} not found or not executable")
    nginx_port, haproxy_port = free_ports(2)
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        openloop = build_openloop(workdir)
        stack.enter_context(start_nginx(workdir, nginx_port))
        stack.enter_context(start_haproxy(workdir, haproxy_port, nginx_port))
        (minimal_port,) = free_ports(1)
        stack.enter_context(start_minimal(workdir, minimal_port, nginx_port))
        ports = {"direct": nginx_port, "haproxy": haproxy_port, "minimal": minimal_port}
        pids: dict[str, int] = {}
        for name, tracing in SIDECARS.items():
            proc, ports[name] = stack.enter_context(
                start_sidecar(workdir, nginx_port, name, tracing)
            )
            pids[name] = proc.pid
        targets: tuple[str, ...] = TARGETS
        if previous is not None:
            # The previous build's sidecar in the same run, for a like-for-like ratio.
            tracing = TRACED if previous_traced else None
            proc, ports["sidecar_previous"] = stack.enter_context(
                start_sidecar(workdir, nginx_port, "sidecar_previous", tracing, previous)
            )
            pids["sidecar_previous"] = proc.pid
            targets = (*targets, "sidecar_previous")
        if compiled:
            root = compile_copy(workdir)
            proc, ports["sidecar_compiled"] = stack.enter_context(
                start_sidecar(workdir, nginx_port, "sidecar_compiled", TRACED, root)
            )
            pids["sidecar_compiled"] = proc.pid
            targets = (*targets, "sidecar_compiled")
        log(f"nginx :{nginx_port}, haproxy :{haproxy_port}, sidecars {ports} ready")
        results: dict[str, dict[str, WrkResult]] = {}
        cpu_us: dict[str, float] = {}
        for conns in CONNECTIONS:
            row = results[f"c{conns}"] = {}
            for target in targets:
                run_wrk(ports[target], conns, WARMUP_S)
                before = cpu_s(pids[target]) if target in pids else 0.0
                res = row[target] = run_wrk(ports[target], conns, duration_s)
                if target in pids and conns == CONNECTIONS[-1]:
                    used = cpu_s(pids[target]) - before
                    cpu_us[target] = round(used * 1e6 / max(1.0, res.rps * duration_s), 1)
                flag = f"  <-- {res.errors} errors" if res.errors else ""
                log(
                    f"c{conns:<3} {target:18} {res.rps:>10.1f} rps"
                    f"  p50 {res.p50_us:>8.1f}us  p90 {res.p90_us:>8.1f}us"
                    f"  p99 {res.p99_us:>9.1f}us{flag}"
                )
        # The same requests at the same times for every target (see open_tails); not
        # the sidecar at 1.0, which could not keep up with the rate.
        rate = max(100.0, round(OPEN_LOOP_LOAD * results["c32"]["sidecar_trace_0.01"].rps, -2))
        open_rounds: list[dict[str, OpenLoopResult]] = []
        for _ in range(OPEN_LOOP_ROUNDS):
            row_open = {}
            for target in targets:
                if target == "sidecar_trace_1":
                    continue
                res_open = row_open[target] = run_open_loop(
                    openloop, ports[target], CONNECTIONS[-1], rate, duration_s
                )
                flag = f"  <-- {res_open.errors} errors" if res_open.errors else ""
                log(
                    f"open {rate:>7.0f}/s {target:18} p50 {res_open.p50_us:>8.1f}us"
                    f"  p99 {res_open.p99_us:>9.1f}us  p99.9 {res_open.p999_us:>9.1f}us{flag}"
                )
            open_rounds.append(row_open)
        rss = read_rss_mb(pids["sidecar"])
        compiled_rss = read_rss_mb(pids["sidecar_compiled"]) if compiled else None
        return summarize(
            results, rss, duration_s, cpu_us, compiled_rss, previous_traced, open_rounds
        )


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally`s that stop the servers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--quick", action="store_true", help="3 s per run (overrides --duration)")
    parser.add_argument(
        "--previous",
        type=Path,
        help="a checkout of the previous build: its sidecar is measured in the same run",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also measure this checkout compiled by scripts/compile.py (tracing at 0.01)",
    )
    parser.add_argument(
        "--previous-traced",
        action="store_true",
        help="run the previous build with tracing at 0.01 (default: off) and compare it"
        " with this build's sidecar at 0.01",
    )
    args = parser.parse_args()
    if args.previous_traced and args.previous is None:
        parser.error("--previous-traced needs --previous")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        duration = 3 if args.quick else args.duration
        report = bench(duration, args.previous, args.compiled, args.previous_traced)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        log(f"bench_proxy: {exc}")
        return 1
    except KeyboardInterrupt:
        log("bench_proxy: interrupted; servers stopped")
        return 130
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

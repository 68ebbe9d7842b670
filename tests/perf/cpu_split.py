"""Per-request CPU of the proxy alone, split into user (Python) and kernel time.

Starts nginx, the minimal forwarder, this checkout's sidecar (with `--source DIR`,
the one of DIR: a compiled copy, say) and, with `--previous DIR`, an older
checkout's sidecar, all with tracing at ratio 0.01 as in the
issue's throughput target; then loads each in turn with `wrk -t1 -c32` (or
`--connections N`) for
`--duration` seconds, `--rounds` times alternating, and reads `utime`/`stime`
from /proc/<pid>/stat around every run. Prints one JSON object: per target, the
user and kernel microseconds per request of every round and their medians, and
the median requests/s and p99; with `--haproxy`, HAProxy (1 thread) is loaded in
every round too and each target's p99 is also given against HAProxy's of the
same round. With `--body N`, wrk sends POSTs with an N-byte body instead of GETs;
with `--direct`, nginx itself is loaded in every round too (the added latency at
one connection is each target's p50 less nginx's of the same round).

Usage: .venv/bin/python tests/perf/cpu_split.py [--duration 8] [--rounds 3] [--previous DIR]
       [--source DIR] [--haproxy] [--body N] [--connections N] [--direct]

Two compiled builds side by side: `scripts/compile.py --root A --copy` in each
checkout, then `cpu_split.py --source A --previous B`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, from anywhere

from tests.perf import bench_proxy as bench

TRACING: dict[str, object] = {"sampler_ratio": 0.01}


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, kernel) CPU seconds pid has used so far, every thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(
    duration_s: int,
    rounds: int,
    previous: Path | None,
    *,
    haproxy: bool = False,
    body: int = 0,
    connections: int = 32,
    direct: bool = False,
    source: Path | None = None,
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="cpu-split-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        script = None
        if body:  # POSTs of `body` bytes instead of GETs
            script = workdir / "post.lua"
            script.write_text(
                f'wrk.method = "POST"\nwrk.body = string.rep("x", {body})\n'
                'wrk.headers["Content-Type"] = "application/octet-stream"\n'
            )
        nginx_port, minimal_port, haproxy_port = bench.free_ports(3)
        nginx = stack.enter_context(bench.start_nginx(workdir, nginx_port))
        targets: dict[str, tuple[int, int]] = {}
        if direct:  # nginx runs without a master process: its pid is the worker's
            targets["direct"] = (nginx.pid, nginx_port)
        if haproxy:
            proc = stack.enter_context(bench.start_haproxy(workdir, haproxy_port, nginx_port))
            targets["haproxy"] = (proc.pid, haproxy_port)
        minimal = stack.enter_context(bench.start_minimal(workdir, minimal_port, nginx_port))
        targets["minimal"] = (minimal.pid, minimal_port)
        proc, port = stack.enter_context(
            bench.start_sidecar(workdir, nginx_port, "sidecar", TRACING, source)
        )
        targets["sidecar"] = (proc.pid, port)
        if previous is not None:
            proc, port = stack.enter_context(
                bench.start_sidecar(workdir, nginx_port, "sidecar_previous", TRACING, previous)
            )
            targets["sidecar_previous"] = (proc.pid, port)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        loads: dict[str, list[bench.WrkResult]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (pid, port) in targets.items():
                bench.run_wrk(port, connections, 1, script)  # warm-up
                user0, kernel0 = cpu_times(pid)
                result = bench.run_wrk(port, connections, duration_s, script)
                user1, kernel1 = cpu_times(pid)
                requests = max(1.0, result.rps * duration_s)
                user = round((user1 - user0) * 1e6 / requests, 1)
                kernel = round((kernel1 - kernel0) * 1e6 / requests, 1)
                runs[name].append((user, kernel))
                loads[name].append(result)
                bench.log(
                    f"{name:18} {result.rps:>9.0f} rps  user {user:5.1f}us  kernel {kernel:5.1f}us"
                    f"  p50 {result.p50_us:6.0f}us  p99 {result.p99_us:6.0f}us"
                )
    report: dict[str, object] = {}
    for name, rows in runs.items():
        results = loads[name]
        entry: dict[str, object] = {
            "user_us": [u for u, _ in rows],
            "kernel_us": [k for _, k in rows],
            "median_user_us": statistics.median(u for u, _ in rows),
            "median_kernel_us": statistics.median(k for _, k in rows),
            "median_rps": statistics.median(r.rps for r in results),
            "median_p50_us": statistics.median(r.p50_us for r in results),
            "median_p99_us": statistics.median(r.p99_us for r in results),
        }
        if direct:  # each round against nginx's p50 of the same round
            entry["added_p50_us"] = [
                round(r.p50_us - d.p50_us, 1) for r, d in zip(results, loads["direct"], strict=True)
            ]
        if haproxy:  # each round against HAProxy's run of the same round
            baseline = loads["haproxy"]
            entry["p99_vs_haproxy"] = [
                round(r.p99_us / h.p99_us, 2) for r, h in zip(results, baseline, strict=True)
            ]
        report[name] = entry
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--previous", type=Path, help="a checkout of the previous build")
    parser.add_argument("--source", type=Path, help="run this build's sidecar from DIR")
    parser.add_argument(
        "--haproxy", action="store_true", help="also load HAProxy each round (p99 baseline)"
    )
    parser.add_argument(
        "--body", type=int, default=0, help="send POSTs with a body of this many bytes"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk's connections")
    parser.add_argument(
        "--direct", action="store_true", help="also load nginx directly (added p50 baseline)"
    )
    args = parser.parse_args()
    try:
        result = measure(
            args.duration,
            args.rounds,
            args.previous,
            haproxy=args.haproxy,
            body=args.body,
            connections=args.connections,
            direct=args.direct,
            source=args.source,
        )
    except bench.BenchError as exc:
        print(f"cpu_split: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The sidecar's resident memory across a long run: flat, or growing?

Starts nginx and one sidecar (tracing at 0.01, as the issue's targets are judged;
`--source DIR` runs another checkout's, a compiled copy for example), loads it
with `wrk -t1 -c32` for `--duration` seconds and reads VmRSS every 5 s. Prints
one JSON object: the samples, their spread and the requests/s.

Usage: .venv/bin/python tests/perf/rss_flat.py [--duration 60] [--source DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, from anywhere

from tests.perf import bench_proxy as bench

EVERY_S = 5.0


def measure(duration_s: int, source: Path | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="rss-flat-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        (nginx_port,) = bench.free_ports(1)
        stack.enter_context(bench.start_nginx(workdir, nginx_port))
        proc, port = stack.enter_context(
            bench.start_sidecar(workdir, nginx_port, "sidecar", bench.TRACED, source)
        )
        bench.run_wrk(port, 32, 2)  # warm-up: pools, caches, first allocations
        samples: list[tuple[float, float]] = []
        began = time.monotonic()

        def sample() -> None:
            while (elapsed := time.monotonic() - began) <= duration_s + 0.5:
                samples.append((round(elapsed, 1), bench.read_rss_mb(proc.pid)[0]))
                time.sleep(EVERY_S)

        sampler = threading.Thread(target=sample)
        sampler.start()
        result = bench.run_wrk(port, 32, duration_s)
        sampler.join()
    values = [rss for _, rss in samples]
    return {
        "duration_s": duration_s,
        "rps": round(result.rps),
        "rss_mb_samples": samples,
        "rss_mb_min": min(values),
        "rss_mb_max": max(values),
        "rss_mb_spread": round(max(values) - min(values), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds under load")
    parser.add_argument("--source", type=Path, help="a checkout whose sidecar to run")
    args = parser.parse_args()
    try:
        report = measure(args.duration, args.source)
    except bench.BenchError as exc:
        print(f"rss_flat: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

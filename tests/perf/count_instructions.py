"""Instructions per proxied request, counted by valgrind's callgrind: a measure that the
machine's noise does not move.

On a shared 2-vCPU machine, requests/s and latencies move by tens of percent between
runs; the instructions a request runs do not (two runs agree within about 1 %). So a
change to the hot path can be judged here first, and its functions compared one by one
(`callgrind_annotate`), before `bench_proxy.py` and `cpu_split.py` time it. What the
count does not show: the kernel's share, cache misses, and waits.

It starts nginx (as `bench_proxy.py` does) and the sidecar, or the minimal forwarder,
under `valgrind --tool=callgrind` with instrumentation off; warms it up; then turns
counting on for exactly `--requests` requests (`wrk`'s `GET /` with a `Host` field) sent
over `--connections` keep-alive connections, each waiting for its answer before the
next request (a closed loop, as wrk runs), and turns it off again.

    .venv/bin/python tests/perf/count_instructions.py                  # this checkout
    .venv/bin/python tests/perf/count_instructions.py --source DIR     # another build
    .venv/bin/python tests/perf/count_instructions.py --minimal        # the Python ceiling
    .venv/bin/python tests/perf/count_instructions.py --connections 32 --keep OUT

Prints one JSON object: `instructions_per_request`, and with `--keep DIR` the
callgrind profile is kept there (`callgrind_annotate --inclusive=yes DIR/callgrind.out.*`).
Needs valgrind (Debian: valgrind) and nginx-light. Under valgrind the sidecar runs some
50 times slower: 6,400 requests take about a minute. The sidecar is traced at ratio
0.01 with its spans sent to nginx, as in `bench_proxy.py`; compile it first
(`scripts/compile.py --root DIR --copy`) to count the compiled build.
"""

from __future__ import annotations

import argparse
import json
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, from anywhere

from tests.perf import bench_proxy as bench

VALGRIND = "valgrind"
BODY = b"hello from nginx\n"
WARMUP_PER_CONNECTION = 300
#: Under valgrind, starting Python and the sidecar takes seconds, not milliseconds.
START_TIMEOUT_S = 300.0


def callgrind(pid: int, command: str) -> None:
    """`callgrind_control` on the process: `-i on`, `-i off` or `-d` (dump)."""
    subprocess.run(
        ["callgrind_control", *command.split(), str(pid)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def connect(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> socket.socket:
    """A connection to the proxy once it answers a request (valgrind starts slowly)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise bench.BenchError(
                f"exited with status {proc.returncode}; its output:\n{bench.tail(log_path)}"
            )
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=60)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise bench.BenchError(f"{port}: {exc}:\n{bench.tail(log_path)}") from exc
            time.sleep(0.5)


def load(socks: list[socket.socket], request: bytes, total: int) -> None:
    """`total` requests over `socks`, each connection sending its next request once the
    answer to its last one is in (closed loop)."""
    sent = done = 0
    pending: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            if sent < total:
                sock.sendall(request)
                sent += 1
            pending[sock] = b""
            selector.register(sock, selectors.EVENT_READ)
        while done < total:
            events = selector.select(timeout=120)
            if not events:
                raise bench.BenchError(f"no answer in 120 s ({done} of {total} requests done)")
            for key, _ in events:
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                chunk = ready.recv(65536)
                if not chunk:
                    raise bench.BenchError("the proxy closed a connection")
                buffered = pending[ready] + chunk
                while BODY in buffered:
                    buffered = buffered[buffered.index(BODY) + len(BODY) :]
                    done += 1
                    if sent < total:
                        ready.sendall(request)
                        sent += 1
                pending[ready] = buffered


def count(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    nginx_port, listen, admin, proxy = bench.free_ports(4)
    out = workdir / "callgrind"
    out.mkdir()
    vg = [
        VALGRIND,
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}/callgrind.out.%p",
    ]
    with ExitStack() as stack:
        stack.enter_context(bench.start_nginx(workdir, nginx_port))
        if args.minimal:
            argv = [*vg, sys.executable, str(bench.MINIMAL), str(proxy), str(nginx_port)]
            name, cwd = "minimal", None
        else:
            conf = workdir / "sidecar.yaml"
            tracing = {"otlp_endpoint": f"http://127.0.0.1:{nginx_port}", **bench.TRACED}
            conf.write_text(f"""\
service: {{name: bench}}
listen: 127.0.0.1:{listen}
admin: {{listen: 127.0.0.1:{admin}}}
consul: {{enabled: false}}
telemetry: {json.dumps({"log_level": "warning", "tracing": tracing})}
upstreams:
  nginx:
    endpoints: ["127.0.0.1:{nginx_port}"]
    listen: 127.0.0.1:{proxy}
""")
            argv = [*vg, sys.executable, "-m", "sidecar", "run", "-c", str(conf)]
            name, cwd = "sidecar", args.source
        proc = stack.enter_context(bench.spawn(name, argv, workdir, cwd=cwd))
        log_path = workdir / f"{name}.log"
        socks = [connect(proxy, proc, log_path) for _ in range(args.connections)]
        for sock in socks:
            stack.enter_context(sock)
        request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % proxy
        load(socks, request, WARMUP_PER_CONNECTION * args.connections)
        callgrind(proc.pid, "-i on")
        load(socks, request, args.requests)
        callgrind(proc.pid, "-i off")
        callgrind(proc.pid, "-d")
    dumps = [path for path in out.iterdir() if path.read_bytes().count(b"\ntotals: ")]
    total = 0
    for path in dumps:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals: "):
                total += int(line.split()[1])
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        for path in dumps:
            shutil.copy(path, args.keep / path.name)
    return {
        "target": name,
        "source": str(args.source or bench.REPO),
        "connections": args.connections,
        "requests": args.requests,
        "instructions_per_request": round(total / args.requests),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6400, help="requests counted")
    parser.add_argument("--connections", type=int, default=1, help="keep-alive connections")
    parser.add_argument("--source", type=Path, help="run the sidecar package of this checkout")
    parser.add_argument("--minimal", action="store_true", help="count the minimal forwarder")
    parser.add_argument("--keep", type=Path, help="keep the callgrind profile in this folder")
    args = parser.parse_args()
    for tool in (VALGRIND, "callgrind_control", bench.NGINX):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian: valgrind, nginx-light)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="count-instructions-") as tmp:
        try:
            result = count(args, Path(tmp))
        except bench.BenchError as exc:
            print(exc, file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

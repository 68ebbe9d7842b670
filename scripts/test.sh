#!/usr/bin/env bash
# The whole test run: installs what it needs, then lint, types and the test suite.
#   bash scripts/test.sh [extra pytest args]
# Needs Python >= 3.11. Installs RabbitMQ from Debian when missing and starts it when
# it is not running (the event tests use the real broker at 127.0.0.1:5672); installs
# Debian's prometheus and prometheus-alertmanager for the metrics and alert tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
have_root() { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Debian installs it in /usr/sbin, which a normal user's PATH may lack.
rabbitmq_bin() { command -v rabbitmq-server 2>/dev/null || { [ -x /usr/sbin/rabbitmq-server ] && echo /usr/sbin/rabbitmq-server; }; }

ensure_rabbitmq() {
    if port_open 5672; then
        return
    fi
    if ! have_root; then
        echo "RabbitMQ is not running on 127.0.0.1:5672 and installing or starting it needs root or sudo:" >&2
        echo "  sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached" >&2
        echo "(the event tests publish to and consume from the real broker)" >&2
        exit 1
    fi
    if [ -z "$(rabbitmq_bin)" ]; then
        echo "== installing rabbitmq-server"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    fi
    echo "== starting rabbitmq-server"
    as_root "$(rabbitmq_bin)" -detached
    for _ in $(seq 1 120); do
        port_open 5672 && return
        sleep 1
    done
    echo "RabbitMQ did not open 127.0.0.1:5672 within 120 s" >&2
    exit 1
}

# promtool checks and unit-tests the shipped Prometheus alerting rules; a real Alertmanager
# receives the alert tests' alerts. Debian: promtool is in `prometheus`.
ensure_prometheus_tools() {
    local missing=()
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 \
        || missing+=(prometheus-alertmanager)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    if ! have_root; then
        echo "missing ${missing[*]} (promtool and Alertmanager for the alert tests); install with:" >&2
        echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
    echo "== installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

ensure_venv() {
    if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then  # missing, or half-made without pip
        echo "== creating .venv"
        "$PYTHON" -m venv --clear .venv || {
            echo "python3 -m venv failed: install it with 'apt-get install -y python3-venv'" >&2
            exit 1
        }
    fi
    echo "== installing hms-sidecar[dev]"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev]"
}

ensure_venv
ensure_rabbitmq
ensure_prometheus_tools

echo "== ruff"
.venv/bin/ruff check sidecar tests scripts
echo "== mypy --strict"
.venv/bin/mypy --strict sidecar tests scripts
echo "== pytest"
.venv/bin/pytest "$@"

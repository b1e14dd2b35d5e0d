#!/usr/bin/env bash
# What the durable store (--data-dir) costs: publish rate and latency with 1
# and 16 concurrent publishers for the memory store, --fsync always and
# --fsync interval (`crier bench publish`, a fresh crier and data directory
# per row), disk bytes per retained event, and fan-out to SUBSCRIBERS
# subscribers on the memory and the durable store (`crier bench fanout`).
# Prints one JSON result per line; docs/BENCHMARKS.md ("Durable store") has
# the table.
#
# Settings (environment):
#   DURATION=5s               publishing time of one publish run
#   SIZE=200                  event payload, bytes
#   RETAINED=100000           events each topic retains (--retention-events)
#   DISK_DURATION=15s         publishing time of the disk figure's run
#   SUBSCRIBERS=1000          fan-out subscribers (0: skip fan-out)
#   FANOUT_RATE=40            fan-out events/s
#   FANOUT_DURATION=5s
#   CRIER=target/release/crier
#
# Every process it starts is stopped by its PID on exit. All traffic is to
# 127.0.0.1; data directories are made under a temporary directory removed
# on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
DURATION=${DURATION:-5s}
SIZE=${SIZE:-200}
RETAINED=${RETAINED:-100000}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
FANOUT_RATE=${FANOUT_RATE:-40}
FANOUT_DURATION=${FANOUT_DURATION:-5s}
CRIER=${CRIER:-$ROOT/target/release/crier}
PORT=18931
URL=http://127.0.0.1:$PORT

TMP=$(mktemp -d)
PID=
stop() {
  if [[ -n $PID ]]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
  fi
}
trap 'stop; rm -rf "$TMP"' EXIT INT TERM

# start STORE: memory, always or interval, fresh data directory.
start() {
  local args=(--listen 127.0.0.1:$PORT --publish-rate 0 --retention-events "$RETAINED"
    --max-connections-per-ip 100000 --max-streams-per-ip 100000 --connection-rate 0)
  rm -rf "$TMP/data"
  case $1 in
    memory) ;;
    *) args+=(--data-dir "$TMP/data" --fsync "$1") ;;
  esac
  RUST_LOG=warn "$CRIER" "${args[@]}" 2>>"$TMP/crier.log" &
  PID=$!
  for _ in $(seq 100); do
    curl -s -o /dev/null "$URL/healthz" && return
    sleep 0.05
  done
  echo "crier did not start" >&2
  cat "$TMP/crier.log" >&2
  exit 1
}

for store in memory always interval; do
  for publishers in 1 16; do
    start "$store"
    result=$("$CRIER" bench publish --url "$URL" --publishers "$publishers" \
      --duration "$DURATION" --size "$SIZE" --pid "$PID")
    echo "{\"store\":\"$store\",\"result\":$result}"
    stop
  done
done

# Disk per retained event: 16 publishers for DISK_DURATION into one topic
# keeping RETAINED events; then the same directory after a restart.
start always
"$CRIER" bench publish --url "$URL" --publishers 16 --duration "${DISK_DURATION:-15s}" \
  --size "$SIZE" >/dev/null
seq=$(curl -s -X POST "$URL/topics/bench-publish" -d x | sed -E 's/.*"seq":([0-9]+).*/\1/')
retained=$((seq < RETAINED ? seq : RETAINED))
used=$(du -sk "$TMP/data" | cut -f1)
stop
start always
used_after_restart=$(du -sk "$TMP/data" | cut -f1)
stop
echo "{\"disk\":{\"published\":$seq,\"retained\":$retained,\"size\":$SIZE,\"du_kib\":$used,\"du_kib_after_restart\":$used_after_restart,\"bytes_per_retained_event\":$((used * 1024 / retained)),\"after_restart\":$((used_after_restart * 1024 / retained))}}"

if [[ $SUBSCRIBERS -gt 0 ]]; then
  for store in memory always; do
    start "$store"
    result=$("$CRIER" bench fanout --url "$URL" --subscribers "$SUBSCRIBERS" \
      --rate "$FANOUT_RATE" --duration "$FANOUT_DURATION" --size "$SIZE" --pid "$PID")
    echo "{\"store\":\"$store\",\"result\":$result}"
    stop
  done
fi

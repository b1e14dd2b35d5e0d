#!/usr/bin/env bash
# The publish script alone, on an otherwise idle redis-server: REQUESTS
# single-event requests (one topic each, 200-byte data, no idempotency key)
# per EVALSHA call, as the outbox groups publishes that queued meanwhile.
# Prints Redis's usec_per_call, the time per request and INFO commandstats
# for the commands the script made.
#
# Settings (environment): REQUESTS=8  CALLS=5000  CLIENTS=4  PORT=18960
#   SCRIPTS=src/store/redis (another build's scripts, to compare)
#
# The redis-server it starts is stopped by its PID on exit; it listens on
# 127.0.0.1 and keeps nothing on disk.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPTS=${SCRIPTS:-$(dirname "$HERE")/src/store/redis}
REQUESTS=${REQUESTS:-8}
CALLS=${CALLS:-5000}
CLIENTS=${CLIENTS:-4}
PORT=${PORT:-18960}

TMP=$(mktemp -d)
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$TMP" --daemonize no >"$TMP/redis.log" 2>&1 &
REDIS_PID=$!
trap 'kill $REDIS_PID 2>/dev/null || true; wait $REDIS_PID 2>/dev/null || true; rm -rf "$TMP"' EXIT INT TERM
rcli() { redis-cli -p "$PORT" "$@" | tr -d '\r'; }
for _ in $(seq 100); do
  rcli PING 2>/dev/null | grep -q PONG && break
  sleep 0.05
done

SHA=$(cat "$SCRIPTS/fresh_epoch.lua" "$SCRIPTS/first_kept.lua" "$SCRIPTS/publish.lua" | redis-cli -p "$PORT" -x SCRIPT LOAD | tr -d '\r')
DATA=$(head -c 200 /dev/zero | tr '\0' x)
KEYS=() COUNTS=() ARGS=()
for r in $(seq "$REQUESTS"); do
  KEYS+=("c:{t$r}:meta" "c:{t$r}:events")
  COUNTS+=(2 15)
  # channel, max events, max age ms, meta ttl ms, floor epoch and number,
  # window ms, wait flag, live command, live head, keys, guards, then the
  # event: key index, name, data.
  ARGS+=("c:{t$r}:live" 1000 3600000 3700000 "" 0 86400000 0 PUBLISH "" 0 0 0 "" "$DATA")
done
call=(EVALSHA "$SHA" $((2 * REQUESTS)) "${KEYS[@]}" "$REQUESTS" "${COUNTS[@]}" "${ARGS[@]}")
# Fill the topics to their 1,000 events first, so every XADD trims.
redis-benchmark -p "$PORT" -n $((1000 + 100)) -c 1 "${call[@]}" >/dev/null
rcli CONFIG RESETSTAT >/dev/null
redis-benchmark -p "$PORT" -n "$CALLS" -c "$CLIENTS" "${call[@]}" >/dev/null
usec=$(rcli INFO commandstats | sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')
echo "requests per call: $REQUESTS, usec_per_call: $usec, per request: $(awk -v u="$usec" -v r="$REQUESTS" 'BEGIN { printf "%.2f", u / r }') µs"
rcli INFO commandstats | grep -E '^cmdstat_(xadd|hmget|hset|publish|time|info):' | sed 's/,rejected_calls.*//'

#!/usr/bin/env bash
# What publishing through Redis costs against the embedded store, in the
# same run: `crier bench publish` (PUBLISHERS keep-alive publishers over
# TOPICS topics) against an embedded crier and a crier on one local
# redis-server, alternated ROUNDS times, single events then batches of
# BATCH events to one topic; then 2 and 3 crier nodes on the same Redis,
# the publishers split between them. For Redis runs it adds Redis's own
# figures: its process CPU per event and, from INFO commandstats, the
# publish script's calls, usec_per_call and time per event (a call carries
# every publish that queued meanwhile), and XADD's.
# Prints one JSON result per line; docs/BENCHMARKS.md ("The Redis publish
# path") has the table.
#
# Settings (environment):
#   DURATION=8s   PUBLISHERS=16   TOPICS=64   SIZE=200   BATCH=100
#   ROUNDS=2      CRIER=target/release/crier   NODES="2 3"
#   CRIERS="before=/path/to/crier after=target/release/crier": builds to
#     compare, each (embedded, then Redis) in turn within every round; the
#     tool is always $CRIER's. Default: $CRIER alone.
#
# Every process it starts is stopped by its PID on exit. All traffic is to
# 127.0.0.1; Redis keeps nothing on disk.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
DURATION=${DURATION:-8s}
PUBLISHERS=${PUBLISHERS:-16}
TOPICS=${TOPICS:-64}
SIZE=${SIZE:-200}
BATCH=${BATCH:-100}
ROUNDS=${ROUNDS:-2}
CRIER=${CRIER:-$ROOT/target/release/crier}
CRIERS=${CRIERS:-"$(basename "$CRIER")=$CRIER"}
NODES=${NODES-2 3}
SERVER=$CRIER
REDIS_PORT=18940
PORTS=(18941 18942 18943)
TICK=$(getconf CLK_TCK)

TMP=$(mktemp -d)
PIDS=()
REDIS_PID=
stop_all() {
  for pid in "${PIDS[@]}" $REDIS_PID; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
  REDIS_PID=
}
trap 'stop_all; rm -rf "$TMP"' EXIT INT TERM

rcli() { redis-cli -p $REDIS_PORT "$@" | tr -d '\r'; }

start_redis() {
  redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$TMP" --daemonize no >"$TMP/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 100); do
    rcli PING 2>/dev/null | grep -q PONG && return
    sleep 0.05
  done
  echo "redis-server did not start" >&2
  exit 1
}

# start_crier PORT [--redis URL]: a crier on PORT; its PID is appended to PIDS.
start_crier() {
  local port=$1
  shift
  RUST_LOG=warn "$SERVER" --listen 127.0.0.1:"$port" --publish-rate 0 \
    --max-connections-per-ip 100000 --max-streams-per-ip 100000 --connection-rate 0 \
    --drain-delay 0 --drain-window 0 \
    "$@" 2>>"$TMP/crier.log" &
  PIDS+=($!)
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/readyz" && return
    sleep 0.05
  done
  echo "crier did not start" >&2
  cat "$TMP/crier.log" >&2
  exit 1
}

redis_ticks() { awk '{print $14 + $15}' "/proc/$REDIS_PID/stat"; }

# stat NAME FIELD: a field of INFO commandstats for command NAME (0 if none).
stat() {
  rcli INFO commandstats | sed -n "s/^cmdstat_$1:\(.*,\)\{0,1\}$2=\([0-9.]*\).*/\2/p" | grep . || echo 0
}

# run LABEL STORE EXTRA...: one bench publish against the first crier.
run() {
  local label=$1 store=$2
  shift 2
  [[ $store == redis ]] && rcli CONFIG RESETSTAT >/dev/null
  local before
  [[ $store == redis ]] && before=$(redis_ticks)
  local result
  result=$(nice -n 5 "$CRIER" bench publish --url "http://127.0.0.1:${PORTS[0]}" \
    --publishers "$PUBLISHERS" --topics "$TOPICS" --duration "$DURATION" --size "$SIZE" \
    --pid "${PIDS[0]}" "$@")
  local extra='null'
  if [[ $store == redis ]]; then
    local ticks=$(($(redis_ticks) - before))
    local published
    published=$(echo "$result" | sed -n 's/.*"published":\([0-9]*\).*/\1/p')
    local calls usec xadds
    calls=$(stat evalsha calls) usec=$(stat evalsha usec_per_call) xadds=$(stat xadd calls)
    extra=$(printf '{"cpu_us_per_event":%s,"script_calls":%s,"script_usec_per_call":%s,"script_usec_per_event":%s,"xadd_calls":%s,"xadd_usec_per_call":%s}' \
      "$(awk -v t="$ticks" -v k="$TICK" -v n="$published" 'BEGIN { printf "%.1f", t * 1000000 / k / n }')" \
      "$calls" "$usec" "$(awk -v c="$calls" -v u="$usec" -v x="$(( xadds > 0 ? xadds : 1 ))" 'BEGIN { printf "%.2f", c * u / x }')" \
      "$xadds" "$(stat xadd usec_per_call)")
  fi
  echo "{\"run\":\"$label\",\"build\":\"$BUILD\",\"store\":\"$store\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"redis\":$extra,\"result\":$result}"
}

start_redis
for round in $(seq "$ROUNDS"); do
  for build in $CRIERS; do
    BUILD=${build%%=*} SERVER=${build#*=}
    for store in embedded redis; do
      case $store in
        embedded) start_crier "${PORTS[0]}" ;;
        redis) rcli FLUSHALL >/dev/null; start_crier "${PORTS[0]}" --redis "redis://127.0.0.1:$REDIS_PORT" ;;
      esac
      run "single-$round" $store
      run "batch-$round" $store --batch "$BATCH"
      kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()
    done
  done
done
SERVER=$CRIER BUILD=$(basename "$CRIER")

# Several nodes on one Redis: the publishers split between them, each
# node's tool run at once; every line is one node's share.
for nodes in $NODES; do
  rcli FLUSHALL >/dev/null
  for n in $(seq 0 $((nodes - 1))); do
    start_crier "${PORTS[$n]}" --redis "redis://127.0.0.1:$REDIS_PORT"
  done
  rcli CONFIG RESETSTAT >/dev/null
  before=$(redis_ticks)
  share=$((PUBLISHERS / nodes))
  tools=()
  for n in $(seq 0 $((nodes - 1))); do
    nice -n 5 "$CRIER" bench publish --url "http://127.0.0.1:${PORTS[$n]}" \
      --publishers "$share" --topics "$TOPICS" --duration "$DURATION" --size "$SIZE" \
      --pid "${PIDS[$n]}" >"$TMP/node-$n.json" &
    tools+=($!)
  done
  for tool in "${tools[@]}"; do wait "$tool"; done
  ticks=$(($(redis_ticks) - before))
  for n in $(seq 0 $((nodes - 1))); do
    echo "{\"run\":\"nodes-$nodes\",\"node\":$n,\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"result\":$(cat "$TMP/node-$n.json")}"
  done
  echo "{\"run\":\"nodes-$nodes\",\"redis_cpu_s\":$(awk -v t="$ticks" -v k="$TICK" 'BEGIN { printf "%.2f", t / k }'),\"script_calls\":$(stat evalsha calls),\"script_usec_per_call\":$(stat evalsha usec_per_call)}"
  for pid in "${PIDS[@]}"; do kill "$pid"; wait "$pid" 2>/dev/null || true; done
  PIDS=()
done

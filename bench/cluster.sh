#!/usr/bin/env bash
# Publishing through one Redis against a Redis Cluster of three primaries,
# with NODES crier nodes (default 3) publishing into it: `crier bench
# publish` with PUBLISHERS split between the nodes, over TOPICS topics,
# each node's tool run at once; alternated ROUNDS times. For each run it
# prints every node's result and the publish rate and p99 over the nodes.
# Then fan-out CPU per delivery on one node, on one Redis and on the
# cluster (`crier bench fanout`).
# Prints one JSON result per line; docs/BENCHMARKS.md ("Redis Cluster")
# has the table.
#
# Settings (environment):
#   DURATION=8s   PUBLISHERS=16   TOPICS=64   SIZE=200   ROUNDS=2   NODES=3
#   SUBSCRIBERS=1000   RATE=20   CRIER=target/release/crier
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
ROUNDS=${ROUNDS:-2}
NODES=${NODES:-3}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
RATE=${RATE:-20}
CRIER=${CRIER:-$ROOT/target/release/crier}
SINGLE_PORT=18950
CLUSTER_PORTS=(18951 18952 18953)
PORTS=(18961 18962 18963 18964)

TMP=$(mktemp -d)
PIDS=()
REDIS_PIDS=()
stop_crier() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
stop_all() {
  stop_crier
  for pid in "${REDIS_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  REDIS_PIDS=()
}
trap 'stop_all; rm -rf "$TMP"' EXIT INT TERM

# start_redis PORT [ARGS...]: a redis-server on PORT in a folder of its own.
start_redis() {
  local port=$1
  shift
  mkdir -p "$TMP/$port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$TMP/$port" --daemonize no "$@" >"$TMP/redis-$port.log" 2>&1 &
  REDIS_PIDS+=($!)
  for _ in $(seq 100); do
    redis-cli -p "$port" PING 2>/dev/null | grep -q PONG && return
    sleep 0.05
  done
  echo "redis-server did not start on $port" >&2
  exit 1
}

start_redis "$SINGLE_PORT"
for port in "${CLUSTER_PORTS[@]}"; do
  start_redis "$port" --cluster-enabled yes --cluster-config-file "$TMP/$port/nodes.conf"
done
redis-cli --cluster create $(for p in "${CLUSTER_PORTS[@]}"; do echo "127.0.0.1:$p"; done) \
  --cluster-yes >/dev/null
for _ in $(seq 200); do
  redis-cli -p "${CLUSTER_PORTS[0]}" CLUSTER INFO | grep -q cluster_state:ok && break
  sleep 0.05
done

# start_crier PORT REDIS-FLAGS...: a crier on PORT; its PID is appended to PIDS.
start_crier() {
  local port=$1
  shift
  RUST_LOG=warn "$CRIER" --listen 127.0.0.1:"$port" --publish-rate 0 \
    --max-connections-per-ip 100000 --max-streams-per-ip 100000 --connection-rate 0 \
    --drain-delay 0 --drain-window 0 --redis-prefix "bench$RANDOM:" \
    "$@" 2>>"$TMP/crier.log" &
  PIDS+=($!)
  for _ in $(seq 200); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz") == 200 ]] && return
    sleep 0.05
  done
  echo "crier did not become ready" >&2
  cat "$TMP/crier.log" >&2
  exit 1
}

flags_for() {
  case $1 in
    single) echo "--redis redis://127.0.0.1:$SINGLE_PORT" ;;
    cluster) echo "--redis-cluster redis://127.0.0.1:${CLUSTER_PORTS[0]},redis://127.0.0.1:${CLUSTER_PORTS[1]}" ;;
  esac
}

redis_ticks() {
  local total=0
  for pid in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}

for round in $(seq "$ROUNDS"); do
  for redis in single cluster; do
    for n in $(seq 0 $((NODES - 1))); do
      # shellcheck disable=SC2046
      start_crier "${PORTS[$n]}" $(flags_for "$redis")
    done
    before=$(redis_ticks "${REDIS_PIDS[@]}")
    share=$((PUBLISHERS / NODES))
    tools=()
    for n in $(seq 0 $((NODES - 1))); do
      nice -n 5 "$CRIER" bench publish --url "http://127.0.0.1:${PORTS[$n]}" \
        --publishers "$share" --topics "$TOPICS" --duration "$DURATION" --size "$SIZE" \
        --pid "${PIDS[$n]}" >"$TMP/node-$n.json" &
      tools+=($!)
    done
    for tool in "${tools[@]}"; do wait "$tool"; done
    ticks=$(($(redis_ticks "${REDIS_PIDS[@]}") - before))
    for n in $(seq 0 $((NODES - 1))); do
      echo "{\"run\":\"$redis-$round\",\"node\":$n,\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"result\":$(cat "$TMP/node-$n.json")}"
    done
    rate=$(cat "$TMP"/node-*.json | sed -n 's/.*"events_per_second":\([0-9.]*\).*/\1/p' | paste -sd+ | bc)
    echo "{\"run\":\"$redis-$round\",\"nodes\":$NODES,\"events_per_s\":$rate,\"redis_cpu_s\":$(echo "scale=2; $ticks / $(getconf CLK_TCK)" | bc)}"
    rm -f "$TMP"/node-*.json
    stop_crier
  done
done

# Fan-out: one node, SUBSCRIBERS over the topic, RATE events a second.
for round in $(seq "$ROUNDS"); do
  for redis in single cluster; do
    # shellcheck disable=SC2046
    start_crier "${PORTS[3]}" $(flags_for "$redis")
    result=$(nice -n 5 "$CRIER" bench fanout --url "http://127.0.0.1:${PORTS[3]}" \
      --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration "$DURATION" --pid "${PIDS[0]}")
    echo "{\"run\":\"fanout-$redis-$round\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"result\":$result}"
    stop_crier
  done
done

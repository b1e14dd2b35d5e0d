#!/usr/bin/env bash
# What compressed streams cost crier, per content coding, quickly: N
# subscribers on one topic asking for a coding as a browser would
# (`crier bench fanout --accept-encoding`, every event decoded and checked),
# RATE events/s of SIZE-byte JSON, a fresh crier per row, the hub's CPU and
# memory from /proc. Prints a Markdown table of medians: µs of hub CPU per
# delivery and resident memory per subscriber, per coding. See
# bench/README.md.
#
# Settings (environment):
#   SUBSCRIBERS=2000                subscribers on the one topic
#   RATE=10                         events/s
#   DURATION=20s                    publishing time of one run
#   RUNS=3                          runs per coding (the table shows medians)
#   CODINGS="identity zstd br gzip" what the subscribers ask for (identity:
#                                   no Accept-Encoding header)
#   SIZE=200                        event payload, bytes
#   PAYLOAD=metrics                 metrics (JSON that changes per event) or padded
#   PAUSE=2                         seconds between two runs
#   PER_SOURCE=2000                 subscribers per loopback source address
#   CRIER=target/release/crier      the binary (built with cargo build --release
#                                   unless BUILD=0)
#   BUILD=1                         0: use CRIER as it is
#   RESULTS=bench/results/codings-DATE.jsonl
#   DRY_RUN=1                       print the commands, run nothing
#
# Every process it starts (each crier, each load tool) is stopped by its PID
# on exit, error, Ctrl-C or SIGTERM. All traffic is to 127.0.0.0/8.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

SUBSCRIBERS=${SUBSCRIBERS:-2000}
RATE=${RATE:-10}
DURATION=${DURATION:-20s}
RUNS=${RUNS:-3}
CODINGS=${CODINGS:-"identity zstd br gzip"}
SIZE=${SIZE:-200}
PAYLOAD=${PAYLOAD:-metrics}
PAUSE=${PAUSE:-2}
PER_SOURCE=${PER_SOURCE:-2000}
BUILD=${BUILD:-1}
DRY_RUN=${DRY_RUN:-0}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$HERE/results/codings-$STAMP.jsonl}
TOOL_LOG=${RESULTS%.jsonl}.log
CRIER=${CRIER:-${CARGO_TARGET_DIR:-$ROOT/target}/release/crier}

NAME=codings.sh
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

[ -n "$CODINGS" ] || die "CODINGS is empty (identity, zstd, br, gzip)"
for coding in $CODINGS; do
    case $coding in identity | zstd | br | gzip) ;; *) die "unknown coding '$coding' (identity, zstd, br, gzip)" ;; esac
done
[ "$RUNS" -ge 1 ] 2>/dev/null || die "RUNS must be a positive integer"
[ "$SUBSCRIBERS" -ge 1 ] 2>/dev/null || die "SUBSCRIBERS must be a positive integer"
case $PAYLOAD in metrics | padded) ;; *) die "PAYLOAD must be metrics or padded" ;; esac

# Children are started, waited for and stopped by bench/lib.sh (start,
# finish, cleanup); free_port is there too.

# ---------------------------------------------------------------- the hub

HUB_PID="" HUB_PORT=""
# A fresh crier, its defaults (compression: zstd, br, gzip) but for the
# per-client caps, raised as in compare.sh: the crowd comes from a few
# loopback addresses, and the point is the fan-out.
start_crier() {
    local name=$1
    HUB_PORT=$(free_port)
    # No drain on SIGTERM: the row is over, the next wants a fresh hub now.
    local -a cmd=("$CRIER" --listen "127.0.0.1:$HUB_PORT" --shutdown-timeout 2s
        --drain-delay 0 --drain-window 0 --max-connections-per-ip 1000000 --max-streams-per-ip 1000000
        --connection-rate 0 --publish-rate 0)
    if dry; then
        show "${cmd[@]}"
        HUB_PID="<crier-pid>"
        return
    fi
    start "$TMP/$name-hub.out" "$TMP/$name-hub.log" env RUST_LOG=warn "${cmd[@]}"
    HUB_PID=$STARTED
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$HUB_PORT") 2>/dev/null && return 0
        kill -0 "$HUB_PID" 2>/dev/null || die "crier exited (see $TMP/$name-hub.log)"
        sleep 0.05
    done
    die "crier does not listen on 127.0.0.1:$HUB_PORT after 10 s"
}

stop_crier() {
    if dry; then show kill -TERM "$HUB_PID"; return 0; fi
    kill -TERM "$HUB_PID" 2>/dev/null || true
    finish "$HUB_PID" || true
}

# ------------------------------------------------------------- one row

FAILED=0
# row CODING RUN: a fresh crier, one fanout run whose subscribers ask for
# CODING, the JSON line tagged with the coding and the run.
row() {
    local coding=$1 run=$2 rc=0 out err
    start_crier "$coding-$run"
    local -a cmd=("$CRIER" bench fanout --url "http://127.0.0.1:$HUB_PORT" --pid "$HUB_PID"
        --topic "codings-$STAMP-$coding-$run" --subscribers "$SUBSCRIBERS"
        --sources "$((SUBSCRIBERS / PER_SOURCE + 1))" --rate "$RATE" --duration "$DURATION"
        --size "$SIZE" --payload "$PAYLOAD")
    [ "$coding" = identity ] || cmd+=(--accept-encoding "$coding")
    if dry; then
        show "${cmd[@]}"
        stop_crier
        return
    fi
    out=$TMP/bench.out
    err=$TMP/bench-$coding-$run.err
    start "$out" "$err" "${cmd[@]}"
    finish "$STARTED" || rc=$?
    stop_crier
    { echo "### $coding run $run: ${cmd[*]}"; grep -v '^connecting: ' "$err" || true; } >>"$TOOL_LOG"
    if [ "$rc" -ne 0 ] || ! jq -e . "$out" >/dev/null 2>&1; then
        FAILED=$((FAILED + 1))
        log "FAILED ($rc): ${cmd[*]}"
        tail -n 5 "$err" >&2 || true
        return 0
    fi
    jq -c --arg coding "$coding" --argjson run "$run" \
        '{coding: $coding, run: $run} + .' "$out" >>"$RESULTS"
    jq -r '"    \(.content_encoding): connected=\(.connected) server=\(.server.cpu_us_per_delivery) µs/delivery rss/subscriber=\(.server.rss_growth_per_subscriber) B wire=\(.wire.bytes_per_event) B/event p99=\(.latency_ms.p99) ms lost=\(.lost)"' \
        "$out" >&2
    if ! jq -e --arg coding "$coding" '.content_encoding == $coding' "$out" >/dev/null; then
        log "WARNING: asked for $coding, the hub answered $(jq -r .content_encoding "$out")"
    fi
}

# --------------------------------------------------------------- the report

report() {
    [ -s "$RESULTS" ] || { log "no results in $RESULTS"; return 0; }
    local codings_json
    # shellcheck disable=SC2086 # the list is split on purpose
    codings_json=$(printf '%s\n' $CODINGS | jq -R . | jq -sc .)
    echo
    echo "## crier per content coding ($(date -u +%Y-%m-%d), $RUNS run(s) each, medians)"
    echo
    echo "Machine: $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -sr); $("$CRIER" --version 2>/dev/null || echo crier)."
    echo "$SUBSCRIBERS subscribers on one topic, $RATE events/s of $SIZE-byte JSON ($PAYLOAD) for $DURATION, a fresh crier per row."
    echo "Results: ${RESULTS#"$ROOT"/} (the tool's messages: ${TOOL_LOG#"$ROOT"/})."
    echo
    jq -rs --argjson codings "$codings_json" '
        def median: map(select(. != null)) | sort |
            if length == 0 then null
            elif length % 2 == 1 then .[(length - 1) / 2]
            else (.[length / 2 - 1] + .[length / 2]) / 2 end;
        def med(f): map(f) | median;
        . as $all
        | ($all | map(select(.coding == "identity"))) as $plain
        | ($plain | med(.server.cpu_us_per_delivery)) as $plain_cpu
        | ($plain | med(.server.rss_growth_per_subscriber)) as $plain_rss
        | $codings[] as $coding
        | [$all[] | select(.coding == $coding)] as $rs
        | select($rs | length > 0)
        | ($rs | med(.server.cpu_us_per_delivery)) as $cpu
        | ($rs | med(.server.rss_growth_per_subscriber)) as $rss
        | [$coding, ([$rs[] | .content_encoding] | unique | join("/")), ($rs | length),
           ($rs | med(.connected)), $cpu,
           (if $plain_cpu and $cpu then $cpu / $plain_cpu else null end),
           $rss, (if $plain_rss and $rss then $rss - $plain_rss else null end),
           ($rs | med(.wire.bytes_per_event)), ($rs | med(.latency_ms.p99)),
           ($rs | med(.lost)), ($rs | med(.tool.cpu_us_per_delivery))]
        | map(if . == null then "-" else tostring end) | @tsv' "$RESULTS" |
        awk -F'\t' '
            function num(x, d) { return x == "-" ? "-" : sprintf("%." d "f", x) }
            function kib(x) { return x == "-" ? "-" : sprintf("%.1f", x / 1024) }
            BEGIN {
                print "| coding | answered | runs | connected | server µs/delivery | × identity | RSS / subscriber KiB | over identity KiB | wire bytes/event | p99 ms | lost | tool µs/delivery |"
                print "|--------|----------|-----:|----------:|-------------------:|-----------:|---------------------:|------------------:|-----------------:|-------:|-----:|-----------------:|"
            }
            {
                printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
                    $1, $2, $3, num($4, 0), num($5, 2), num($6, 2), kib($7), kib($8),
                    num($9, 1), num($10, 2), num($11, 0), num($12, 2)
            }'
    echo
    echo "RSS / subscriber: the hub's resident memory after the last event, less before the crowd connected, per subscriber (its compressor has seen $DURATION of events)."
}

# -------------------------------------------------------------------- main

if dry; then
    TMP=/tmp/crier-codings.XXXXXX
    log "DRY_RUN: printing the commands, running none"
else
    command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
    TMP=$(mktemp -d /tmp/crier-codings.XXXXXX)
fi

if [ "$BUILD" = 1 ]; then
    if dry; then
        show cargo build --release --manifest-path "$ROOT/Cargo.toml"
    else
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release --quiet)
    fi
fi
dry || [ -x "$CRIER" ] || die "no $CRIER (build it, or set CRIER)"
if ! dry; then
    "$CRIER" bench fanout --help 2>/dev/null | grep -q -- --accept-encoding ||
        die "this crier's \`bench fanout\` has no --accept-encoding"
fi

# The load tool holds SUBSCRIBERS sockets open; it raises its own limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if ! dry; then
    mkdir -p "$(dirname "$RESULTS")"
    : >"$RESULTS"
fi
log "results: $RESULTS$(dry && echo ' (not written in a dry run)')"

# Codings interleaved within each run, so a drift of the machine (another
# load, heat) touches every coding alike.
for run in $(seq "$RUNS"); do
    for coding in $CODINGS; do
        log "$coding: $SUBSCRIBERS subscribers, $RATE events/s, run $run/$RUNS"
        row "$coding" "$run"
        dry || sleep "$PAUSE"
    done
done

dry && exit 0
report | tee "${RESULTS%.jsonl}.md"
[ "$FAILED" -eq 0 ] || die "$FAILED run(s) failed (their stderr is in $TMP)"

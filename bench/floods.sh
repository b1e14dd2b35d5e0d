#!/usr/bin/env bash
# The flood figures: for each attack, a fresh crier with its DEFAULT limits,
# 1,000 honest subscribers receiving 20 events/s (`crier bench fanout`) once
# without the attack and once while `crier bench attack` runs it; the honest
# p99 and loss, and the hub's memory and descriptors before, during and
# after. See bench/README.md.
#
# Settings (environment):
#   ATTACKS="conns addresses silent tls-half slowloris dribble publish-flood"
#   DURATION=30s            the honest run's publishing time, and the attack's
#   SUBSCRIBERS=1000        honest subscribers (500 per address, 127.0.0.2 up)
#   RATE=20                 honest events/s (published from 127.0.0.1)
#   PAUSE=2                 seconds between the two runs of an attack
#   CONNS=4000              conns: connections from one address (127.0.1.1)
#   ADDRESSES=20000         addresses: connections from 12 addresses, in two
#                           processes (each may open 20,000 files at most)
#   SILENT=8000 TLS_HALF=8000 SLOWLORIS=4000 DRIBBLE=20 PUBLISHERS=64
#   PROBE_EVERY=0.05        tls-half: seconds between two curl probes
#   ATTACK_NICE=0           run the attacking processes at this niceness (19:
#                           an attacker on another machine, roughly; the
#                           hub and the honest crowd keep theirs)
#   CRIER=PATH              measure this binary, built by nobody (default:
#                           build, and use $CARGO_TARGET_DIR/release/crier)
#   RESULTS=bench/results/floods-DATE.jsonl
#   DRY_RUN=1               print the commands, run nothing
#
# The attackers use 127.0.1.x (and 127.0.2.x, 127.0.3.x), the honest crowd
# 127.0.0.2 upwards and its publishers 127.0.0.1: every client is counted
# apart by the hub's per-client limits. Every process started is stopped by
# its PID on exit, error, Ctrl-C or SIGTERM. All traffic is to 127.0.0.0/8.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

ATTACKS=${ATTACKS:-"conns addresses silent tls-half slowloris dribble publish-flood"}
DURATION=${DURATION:-30s}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
RATE=${RATE:-20}
PAUSE=${PAUSE:-2}
CONNS=${CONNS:-4000}
ADDRESSES=${ADDRESSES:-20000}
SILENT=${SILENT:-8000}
TLS_HALF=${TLS_HALF:-8000}
SLOWLORIS=${SLOWLORIS:-4000}
DRIBBLE=${DRIBBLE:-20}
PUBLISHERS=${PUBLISHERS:-64}
PROBE_EVERY=${PROBE_EVERY:-0.05}
ATTACK_NICE=${ATTACK_NICE:-0}
DRY_RUN=${DRY_RUN:-0}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$HERE/results/floods-$STAMP.jsonl}
TOOL_LOG=${RESULTS%.jsonl}.log
BUILD=1
if [ -n "${CRIER:-}" ]; then BUILD=0; fi
CRIER=${CRIER:-${CARGO_TARGET_DIR:-$ROOT/target}/release/crier}

NAME=floods.sh
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

for attack in $ATTACKS; do
    case $attack in
        conns | addresses | silent | tls-half | slowloris | dribble | publish-flood) ;;
        *) die "unknown attack '$attack'" ;;
    esac
done
SECONDS_LONG=$(sed -n 's/^\([0-9]\+\)s$/\1/p' <<<"$DURATION")
[ -n "$SECONDS_LONG" ] || die "DURATION must be whole seconds, like 30s"

# Children are started, waited for and stopped by bench/lib.sh (start,
# finish, cleanup); free_port is there too.

# ---------------------------------------------------------------- the hub

HUB_PID="" HUB_URL=""
start_crier() {   # start_crier NAME [crier flags...]: defaults but for the flags
    local name=$1 port
    shift
    port=$(free_port)
    case " $* " in
        *" --tls-cert "*) HUB_URL="https://127.0.0.1:$port" ;;
        *) HUB_URL="http://127.0.0.1:$port" ;;
    esac
    # No drain on stop: the hub is stopped by SIGTERM between attacks.
    set -- --drain-delay 0s --drain-window 0s "$@"
    if dry; then
        show "$CRIER" --listen "127.0.0.1:$port" "$@"
        HUB_PID="<crier-pid>"
        return
    fi
    start "$TMP/$name-hub.out" "$TMP/$name-hub.log" \
        env RUST_LOG=warn "$CRIER" --listen "127.0.0.1:$port" --shutdown-timeout 2s "$@"
    HUB_PID=$STARTED
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        kill -0 "$HUB_PID" 2>/dev/null || die "crier exited (see $TMP/$name-hub.log)"
        sleep 0.05
    done
}

stop_crier() {
    dry && return 0
    kill -TERM "$HUB_PID" 2>/dev/null || true
    finish "$HUB_PID" || true
}

# The hub's resident memory (bytes) and open descriptors, as JSON.
hub_sample() {
    local rss fds
    rss=$(awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$HUB_PID/status")
    fds=$(find "/proc/$HUB_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    printf '{"rss_bytes":%s,"fds":%s}' "$rss" "$fds"
}

# ------------------------------------------------------------ machine load

# CPU ticks machine-wide (user, nice, system, irq, softirq: without
# IRQ_TIME_ACCOUNTING, interrupt ticks are also charged to the task they
# interrupted), and stolen by the hypervisor; of one process; of this
# script and every child it has waited for.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
steal_ticks() { awk '/^cpu / { print $9 }' /proc/stat; }
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
our_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' /proc/$$/stat; }

LOAD_T0="" LOAD_BUSY0="" LOAD_STEAL0="" LOAD_HUB0="" LOAD_OURS0=""
load_begin() {
    LOAD_T0=$(date +%s.%N) LOAD_BUSY0=$(busy_ticks) LOAD_STEAL0=$(steal_ticks)
    LOAD_HUB0=$(proc_ticks "$HUB_PID") LOAD_OURS0=$(our_ticks)
}
# The share of the machine (all cores) since load_begin, in %, that other
# processes used (busy time less the hub's and that of this script's
# children: the bench tools, curl) and that the hypervisor stole, as JSON
# fields.
load_end() {
    local t busy steal hub ours
    t=$(date +%s.%N) busy=$(busy_ticks) steal=$(steal_ticks)
    hub=$(proc_ticks "$HUB_PID") ours=$(our_ticks)
    awk -v t0="$LOAD_T0" -v t="$t" -v b0="$LOAD_BUSY0" -v b="$busy" \
        -v s0="$LOAD_STEAL0" -v s="$steal" \
        -v h0="$LOAD_HUB0" -v h="$hub" -v o0="$LOAD_OURS0" -v o="$ours" \
        -v hz="$(getconf CLK_TCK)" -v cores="$(nproc)" \
        'BEGIN {
            all = (t - t0) * hz * cores
            others = (b - b0) - (h - h0) - (o - o0)
            if (others < 0) others = 0
            printf "\"others_cpu_pct\": %.1f, \"steal_pct\": %.1f", 100 * others / all, 100 * (s - s0) / all
        }'
}

# ------------------------------------------------------------- the runs

# keep_log ATTACK PHASE ROLE FILE: a tool's messages, into TOOL_LOG.
keep_log() {
    { printf '### %s, %s the attack: %s\n' "$1" "$2" "$3"; cat "$4"; echo; } >>"$TOOL_LOG"
}

record() {   # record ATTACK PHASE ROLE FILE [extra JSON]: one line in RESULTS
    local extra=${5:-"{}"}
    jq -c --arg attack "$1" --arg phase "$2" --arg role "$3" --argjson extra "$extra" \
        '. + {attack: $attack, phase: $phase, role: $role} + $extra' "$4" >>"$RESULTS"
}

# The command lines of an attack's attacker processes, one per line, as
# `source-range connections kind [flags]`.
attackers() {
    case $1 in
        conns) echo "127.0.1.1 $CONNS conns" ;;
        addresses)
            echo "127.0.2.1-127.0.2.6 $((ADDRESSES / 2)) conns"
            echo "127.0.3.1-127.0.3.6 $((ADDRESSES - ADDRESSES / 2)) conns"
            ;;
        silent) echo "127.0.1.1-127.0.1.8 $SILENT silent" ;;
        tls-half) echo "127.0.1.1-127.0.1.8 $TLS_HALF tls-half" ;;
        slowloris) echo "127.0.1.1-127.0.1.4 $SLOWLORIS slowloris" ;;
        dribble) echo "127.0.1.1 $DRIBBLE dribble --path /topics/flood-dribble" ;;
        publish-flood) echo "127.0.1.1 $PUBLISHERS publish-flood --retry 10ms" ;;
    esac
}

# Starts the attack's processes; their PIDs in ATTACK_PIDS. The first one
# measures the hub.
ATTACK_PIDS=()
start_attack() {
    local name=$1 i=0 sources connections kind flags
    ATTACK_PIDS=()
    while read -r sources connections kind flags; do
        i=$((i + 1))
        # shellcheck disable=SC2086 # flags split on purpose
        set -- nice -n "$ATTACK_NICE" "$CRIER" bench attack --kind "$kind" --url "$HUB_URL" \
            --connections "$connections" --sources "$sources" --duration "$DURATION" $flags
        if [ "$i" = 1 ]; then set -- "$@" --pid "$HUB_PID"; fi
        if dry; then show "$@"; continue; fi
        start "$TMP/$name-attack-$i.json" "$TMP/$name-attack-$i.log" "$@"
        ATTACK_PIDS+=("$STARTED")
    done < <(attackers "$name")
}

finish_attack() {
    local name=$1 pid i=0 role
    for pid in "${ATTACK_PIDS[@]}"; do
        i=$((i + 1))
        finish "$pid" || die "the attack failed (see $TMP/$name-attack-$i.log)"
        role=attack
        if [ "$i" -gt 1 ]; then role=attack-$i; fi
        keep_log "$name" with "$role" "$TMP/$name-attack-$i.log"
        record "$name" with "$role" "$TMP/$name-attack-$i.json"
    done
}

# The honest crowd, with the attack started once it is connected (and its
# publishers, a quarter of a second later) when PHASE is `with`.
fanout() {
    local name=$1 phase=$2 out err pid n load slowest
    set -- "$CRIER" bench fanout --url "$HUB_URL" --subscribers "$SUBSCRIBERS" --rate "$RATE" \
        --duration "$DURATION" --topic "honest-$name-$phase" --pid "$HUB_PID"
    if dry; then
        show "$@"
        if [ "$phase" = with ]; then start_attack "$name"; fi
        return 0
    fi
    out=$TMP/$name-$phase-fanout.json err=$TMP/$name-$phase-fanout.log
    load_begin
    start "$out" "$err" "$@"
    pid=$STARTED
    if [ "$phase" = with ]; then
        for _ in $(seq 600); do
            n=$(sed -n 's/^connecting: \([0-9]*\)\/[0-9]* connected, \([0-9]*\) failed.*/\1 \2/p' "$err" |
                tail -n1 | awk '{ print $1 + $2 }')
            [ "${n:-0}" -ge "$SUBSCRIBERS" ] && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        sleep 1
        log "$name: attacking"
        start_attack "$name"
    fi
    finish "$pid" || die "the honest fanout failed (see $err)"
    if [ "$phase" = with ]; then finish_attack "$name"; fi
    load=$(load_end)
    keep_log "$name" "$phase" honest "$err"
    # The slowest delivery of each second of the run, from the progress lines.
    slowest=$(sed -n 's/.*, slowest \([0-9]*\) ms).*/\1/p' "$err" | jq -sc .)
    record "$name" "$phase" honest "$out" "{$load, \"slowest_per_s_ms\": $slowest}"
}

# For the TLS attack: the bench's crowd speaks plain HTTP only, so honest
# clients are curl over TLS: one subscriber held through the run, and a
# probe every 0.2 s from another address (a new connection, a full
# handshake and a publish, timed), whose events the subscriber must get,
# all and in order.
CERT=""
curl_check() {
    local name=$1 phase=$2 topic=honest-$1-$2 dir sub pid end i=0 load
    dir=$TMP/$name-$phase-curl
    if dry; then
        show curl -sN --cacert CERT --interface 127.0.0.2 "$HUB_URL/topics/$topic"
        show curl -s --cacert CERT --interface 127.0.0.3 -X POST "$HUB_URL/topics/$topic" -d 'probe-N'
        if [ "$phase" = with ]; then start_attack "$name"; fi
        return 0
    fi
    mkdir -p "$dir"
    load_begin
    start "$dir/sub.txt" /dev/null curl -sN --cacert "$CERT" --interface 127.0.0.2 "$HUB_URL/topics/$topic"
    sub=$STARTED
    for _ in $(seq 100); do [ -s "$dir/sub.txt" ] && break; sleep 0.05; done
    if [ "$phase" = with ]; then
        log "$name: attacking"
        start_attack "$name"
    fi
    : >"$dir/probes.txt"
    end=$((SECONDS + SECONDS_LONG))
    while [ "$SECONDS" -lt "$end" ]; do
        i=$((i + 1))
        curl -s --max-time 10 --cacert "$CERT" --interface 127.0.0.3 -o /dev/null \
            -w '%{http_code} %{time_appconnect} %{time_total}\n' \
            -X POST "$HUB_URL/topics/$topic" -d "probe-$i" >>"$dir/probes.txt" 2>/dev/null ||
            echo "000 0 0" >>"$dir/probes.txt"
        sleep "$PROBE_EVERY"
    done
    if [ "$phase" = with ]; then finish_attack "$name"; fi
    sleep 1
    kill -TERM "$sub" 2>/dev/null || true
    finish "$sub" || true
    load=$(load_end)
    # The result, as JSON: probes answered 201 and their times (sorted, for
    # percentiles by nearest rank), and what the subscriber got (ids
    # SEQ.EPOCH, which must run 1, 2, 3, ...).
    awk '$1 == 201 { print $3 * 1000 }' "$dir/probes.txt" | sort -n >"$dir/total.txt"
    awk '$1 == 201 { print $2 * 1000 }' "$dir/probes.txt" | sort -n >"$dir/handshake.txt"
    awk -v probes="$(wc -l <"$dir/probes.txt")" -v hs="$dir/handshake.txt" '
        function rank(q, n,   r) { r = int(q * n); if (r < q * n) r++; return r < 1 ? 1 : r }
        { t[NR] = $1 }
        END {
            while ((getline v < hs) > 0) h[++m] = v
            printf "{\"scenario\":\"curl-check\",\"probes\":%d,\"ok\":%d,", probes, NR
            printf "\"latency_ms\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.2f},", t[rank(0.5, NR)], t[rank(0.99, NR)], t[NR]
            printf "\"handshake_ms\":{\"p50\":%.2f,\"max\":%.2f}}\n", h[rank(0.5, m)], h[m]
        }' "$dir/total.txt" >"$dir/probes.json"
    # (The stream's first `id: 0` only marks where it starts: not an event.)
    awk -F'[ .]' '/^id: / && $2 != "0" { n++; if ($2 != n) bad++ } END { printf "{\"received\":%d,\"in_order\":%s}\n", n, bad ? "false" : "true" }' \
        "$dir/sub.txt" >"$dir/sub.json"
    jq -s --argjson load "{$load}" '.[0] + .[1] + {lost: (.[0].ok - .[1].received)} + $load' \
        "$dir/probes.json" "$dir/sub.json" >"$dir/result.json"
    record "$name" "$phase" honest "$dir/result.json"
}

run_attack() {
    local name=$1 flags=() fresh
    if [ "$name" = tls-half ]; then
        flags=(--tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem")
    fi
    log "$name: a fresh crier (default limits)"
    start_crier "$name" "${flags[@]}"
    if ! dry; then
        fresh=$(hub_sample)
        echo "$fresh" >"$TMP/$name-fresh.json"
        record "$name" fresh hub "$TMP/$name-fresh.json" "{\"load1\": $(cut -d' ' -f1 /proc/loadavg)}"
    fi
    for phase in without with; do
        log "$name: honest clients, $phase the attack"
        if [ "$name" = tls-half ]; then curl_check "$name" "$phase"; else fanout "$name" "$phase"; fi
        if [ "$phase" = without ] && ! dry; then sleep "$PAUSE"; fi
    done
    stop_crier
}

# ----------------------------------------------------------------- report

machine() {
    local mem cpu
    mem=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    echo "Machine: $(nproc) cores ($cpu), $mem memory, $(uname -sr); open-file limit $(ulimit -Hn)."
}

report() {
    echo
    echo "## Floods ($(date -u +%Y-%m-%d), $SUBSCRIBERS honest subscribers at $RATE events/s, $DURATION per run)"
    echo
    machine
    echo "Attacking processes at niceness $ATTACK_NICE (ATTACK_NICE)."
    echo "Results: ${RESULTS#"$ROOT"/} (the tools' messages: ${TOOL_LOG#"$ROOT"/})."
    echo
    echo "| attack | honest p99 ms without → with | honest lost without / with | target | hub RSS MiB fresh / before / during / after | hub fds fresh / before / during / after | what the attacker got | others' CPU % (stolen) without / with |"
    echo "|---|---|---|---|---|---|---|---|"
    jq -rs '
        def mib: if . == null then "-" else (. / 1048576 * 10 | round / 10 | tostring) end;
        def n: if . == null then "-" else tostring end;
        . as $all
        | (reduce $all[].attack as $a ([]; if index([$a]) then . else . + [$a] end))[] as $a
        | ($all | map(select(.attack == $a))) as $rs
        | ($rs | map(select(.role == "honest" and .phase == "without"))[0]) as $wo
        | ($rs | map(select(.role == "honest" and .phase == "with"))[0]) as $w
        | ($rs | map(select(.phase == "fresh"))[0]) as $fresh
        | ($rs | map(select(.role | startswith("attack")))) as $atk
        | ($atk | map(select(.role == "attack"))[0]) as $main
        | ($atk | map(.outcomes | to_entries) | add // []
            | group_by(.key) | map({key: .[0].key, value: (map(.value.count) | add)})) as $got
        | (($wo.latency_ms.p99) // null) as $p0 | (($w.latency_ms.p99) // null) as $p1
        | ($wo.lost // null) as $l0 | ($w.lost // null) as $l1
        | (if $p0 == null or $p1 == null then "-"
           elif $l1 == 0 and $p1 <= 2 * $p0 then "met: p99 ×\($p1 / $p0 * 100 | round / 100)"
           else "**missed**: p99 ×\($p1 / $p0 * 100 | round / 100)" + (if $l1 > 0 then ", \($l1) lost" else "" end) end
           + (if $w.slowest_per_s_ms then "; \($w.slowest_per_s_ms | map(select(. > 2 * $p0)) | length) of \($w.slowest_per_s_ms | length) s with a delivery over 2 × p99 without" else "" end)) as $target
        | [
            ($a + (if $w.scenario == "curl-check" then " (curl probes)" else "" end)),
            "\($p0 | n) → \($p1 | n)",
            "\($l0 | n) / \($l1 | n)",
            $target,
            "\($fresh.rss_bytes | mib) / \($main.hub.rss_bytes.before | mib) / \($main.hub.rss_bytes.during_max | mib) / \($main.hub.rss_bytes.after | mib)",
            "\($fresh.fds | n) / \($main.hub.fds.before | n) / \($main.hub.fds.during_max | n) / \($main.hub.fds.after | n)",
            ((["at most \($atk | map(.open_max) | add) open at once"] + ($got | map("\(.key) ×\(.value)")) | join("; "))
              + (if $main.stored then "; stored \($main.stored.count), dense: \($main.stored.dense)" else "" end)),
            "\($wo.others_cpu_pct | n) (\($wo.steal_pct | n)) / \($w.others_cpu_pct | n) (\($w.steal_pct | n))"
          ]
        | "| " + join(" | ") + " |"' "$RESULTS"
    echo
    echo "Honest p99 and loss: \`crier bench fanout\` over its whole run (tls-half: curl probes, each a new TLS connection and a publish, p99 over the probes sent, one every $PROBE_EVERY s; lost: published but not received by the held curl subscriber). Before: the crowd connected, the attack not yet started; during: the highest sample (every 0.2 s); after: 2 s after the attack's last socket closed (the honest run has ended by then). Others' CPU: the share of the machine's cores that processes other than the hub and the bench used during the run (stolen: taken by the hypervisor)."
}

# -------------------------------------------------------------------- main

if dry; then
    TMP=/tmp/crier-floods.XXXXXX
    log "DRY_RUN: printing the commands, running none"
    show cargo build --release --manifest-path "$ROOT/Cargo.toml"
else
    TMP=$(mktemp -d /tmp/crier-floods.XXXXXX)
    for tool in jq curl openssl; do command -v "$tool" >/dev/null || die "needs $tool"; done
    if [ "$BUILD" = 1 ]; then
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release --quiet)
    fi
    [ -x "$CRIER" ] || die "no $CRIER after the build"
    "$CRIER" bench attack --help >/dev/null 2>&1 || die "this crier has no \`crier bench attack\`"
    mkdir -p "$(dirname "$RESULTS")"
    : >"$RESULTS"
    : >"$TOOL_LOG"
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

case " $ATTACKS " in
    *" tls-half "*)
        CERT=$TMP/cert.pem
        if dry; then
            show openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -keyout "$TMP/key.pem" -out "$CERT" -days 1 -subj /CN=127.0.0.1
        else
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -keyout "$TMP/key.pem" -out "$CERT" -days 1 -subj /CN=127.0.0.1 \
                -addext "subjectAltName=IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
                2>/dev/null || die "openssl could not make a certificate"
        fi
        ;;
esac

log "results: $RESULTS$(dry && echo ' (not written in a dry run)')"
for attack in $ATTACKS; do run_attack "$attack"; done
dry && exit 0
report | tee "${RESULTS%.jsonl}.md"

#!/usr/bin/env bash
# Compares crier (embedded store, and Redis store) with nginx + Nchan, the hub
# to beat, using crier's own load tool (`crier bench fanout`, `crier bench
# idle`) against each over 127.0.0.1. See bench/README.md.
#
# Settings (environment):
#   SUBSCRIBERS="100 1000 10000"        subscriber counts, one block of runs each
#   RATES="100:50 1000:40 10000:2"      N:events/s, or N:r1/r2/... for a sweep of
#                                       rates; an N not listed uses RATE_DEFAULT
#   RATE_DEFAULT=10                     events/s for an N that RATES does not name
#   RUNS=3                              runs per hub and N (the table shows medians)
#   DURATION=20s                        publishing time of one fanout run
#   SIZE=200                            event payload, bytes
#   HUBS="crier crier-redis nchan"      which hubs, in this order; also `bare`, the
#                                       floor: `crier bench bare-hub`, a bare tokio
#                                       broadcast-to-socket loop (identity only)
#   CODINGS="identity zstd br gzip"     what crier's subscribers ask for (one row
#                                       each; Nchan does not compress: identity)
#   PAYLOAD=metrics                     event body after the stamp: metrics (JSON
#                                       that changes per event) or padded
#   IDLE_SUBSCRIBERS=10000              idle connections per hub (0 skips `bench idle`)
#   PAUSE=2                             seconds between two runs (sockets settle)
#   PER_SOURCE=2000                     subscribers per loopback source address
#   DRY_RUN=1                           print the commands, install/build/start nothing
#   SMOKE_ONLY=1                        start the hubs, check each with curl, stop
#   RESULTS=bench/results/DATE.jsonl    where the JSON lines go
#   NCHAN_MODULE=/usr/lib/nginx/modules/ngx_nchan_module.so
#   CRIER=target/release/crier          the binary (built with cargo build --release
#                                       unless BUILD=0)
#   BUILD=1                             0: use CRIER as it is
#
# Every process it starts (hubs, redis-server, the load tool) is its child and
# is stopped on exit, error, Ctrl-C or SIGTERM. All traffic is to 127.0.0.1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

SUBSCRIBERS=${SUBSCRIBERS:-"100 1000 10000"}
RATES=${RATES:-"100:50 1000:40 10000:2"}
RATE_DEFAULT=${RATE_DEFAULT:-10}
RUNS=${RUNS:-3}
DURATION=${DURATION:-20s}
SIZE=${SIZE:-200}
HUBS=${HUBS:-"crier crier-redis nchan"}
CODINGS=${CODINGS:-"identity zstd br gzip"}
PAYLOAD=${PAYLOAD:-metrics}
IDLE_SUBSCRIBERS=${IDLE_SUBSCRIBERS:-10000}
PAUSE=${PAUSE:-2}
PER_SOURCE=${PER_SOURCE:-2000}
DRY_RUN=${DRY_RUN:-0}
SMOKE_ONLY=${SMOKE_ONLY:-0}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$HERE/results/$STAMP.jsonl}
TOOL_LOG=${RESULTS%.jsonl}.log
CRIER=${CRIER:-${CARGO_TARGET_DIR:-$ROOT/target}/release/crier}
BUILD=${BUILD:-1}

# Path templates given to the load tool; {topic} is the tool's placeholder.
declare -A PUB_PATH=(
    [crier]='/topics/{topic}' [crier-redis]='/topics/{topic}' [nchan]='/pub?id={topic}'
    [bare]='/topics/{topic}'
)
declare -A SUB_PATH=(
    [crier]='/topics/{topic}' [crier-redis]='/topics/{topic}' [nchan]='/sub/{topic}'
    [bare]='/topics/{topic}'
)
declare -A PORT=() SERVER_PIDS=()

NAME=compare.sh
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

for hub in $HUBS; do
    [ -n "${PUB_PATH[$hub]+x}" ] || die "unknown hub '$hub' (crier, crier-redis, nchan, bare)"
done
[ "$RUNS" -ge 1 ] 2>/dev/null || die "RUNS must be a positive integer"
for coding in $CODINGS; do
    case $coding in identity | zstd | br | gzip) ;; *) die "unknown coding '$coding' (identity, zstd, br, gzip)" ;; esac
done
[ -n "$CODINGS" ] || die "CODINGS is empty (identity, zstd, br, gzip)"
case $PAYLOAD in metrics | padded) ;; *) die "PAYLOAD must be metrics or padded" ;; esac

# The codings a hub's subscribers ask for: crier's from CODINGS; Nchan and
# the bare loop do not compress event streams, so they have identity only.
codings_for() {
    case $1 in nchan | bare) echo identity ;; *) echo "$CODINGS" ;; esac
}
# The tool's flag for a coding: no Accept-Encoding at all for identity.
accept_args() {
    [ "$1" = identity ] || printf -- '--accept-encoding\n%s\n' "$1"
}

# Children are started, waited for and stopped by bench/lib.sh (run_child,
# cleanup); free_port is there too.

# Waits until 127.0.0.1:$1 accepts connections, while pid $2 lives.
wait_port() {
    local port=$1 pid=$2 name=$3
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || die "$name exited before listening on $port (see $TMP/$name.log)"
        sleep 0.05
    done
    die "$name does not listen on 127.0.0.1:$port after 10 s (see $TMP/$name.log)"
}

# ------------------------------------------------------------------ installs

APT_UPDATED=0
apt_install() {
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    if dry; then show $sudo apt-get install -y "$@"; return; fi
    command -v apt-get >/dev/null || die "missing $*, and no apt-get to install it"
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        $sudo apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

find_cmd() { PATH=$PATH:/usr/sbin:/sbin command -v "$1" 2>/dev/null || true; }

nchan_module() {
    if [ -n "${NCHAN_MODULE:-}" ]; then echo "$NCHAN_MODULE"; return; fi
    if [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
        echo /usr/lib/nginx/modules/ngx_nchan_module.so
        return
    fi
    dpkg -L libnginx-mod-nchan 2>/dev/null | grep '/ngx_nchan_module\.so$' | head -n1 || true
}

system_nginx_running() {
    [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null
}

install_missing() {
    local want_nchan=0 want_redis=0 pkgs=() before_nginx=0
    case " $HUBS " in *" nchan "*) want_nchan=1 ;; esac
    case " $HUBS " in *" crier-redis "*) want_redis=1 ;; esac
    [ -n "$(find_cmd jq)" ] || pkgs+=(jq)
    [ -n "$(find_cmd curl)" ] || pkgs+=(curl)
    if [ "$want_redis" = 1 ] && [ -z "$(find_cmd redis-server)" ]; then pkgs+=(redis-server); fi
    if [ "$want_nchan" = 1 ]; then
        if [ -z "$(find_cmd nginx)" ]; then
            if apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=(nginx); fi
        fi
        [ -n "$(nchan_module)" ] || pkgs+=(libnginx-mod-nchan)
    fi
    [ "${#pkgs[@]}" -gt 0 ] || return 0
    system_nginx_running && before_nginx=1
    apt_install "${pkgs[@]}"
    # Installing nginx (or redis-server) may start the system service where
    # init scripts run; we started it, so we stop it: the bench runs its own.
    if ! dry && [ "$before_nginx" = 0 ] && system_nginx_running; then
        log "stopping the system nginx service that the install started"
        service nginx stop >/dev/null 2>&1 || systemctl stop nginx 2>/dev/null ||
            kill -QUIT "$(cat /run/nginx.pid)" 2>/dev/null || true
    fi
    if ! dry && [[ " ${pkgs[*]} " == *" redis-server "* ]]; then
        service redis-server stop >/dev/null 2>&1 || systemctl stop redis-server 2>/dev/null || true
    fi
}

# ---------------------------------------------------------------- the hubs

start_crier() {   # start_crier NAME [crier flags...]
    local name=$1 port pid
    shift
    # The load tool's crowd comes from a handful of loopback addresses and
    # publishes from one: per-client caps and rates would measure the tool,
    # not the hub. They stay in force (and cost what they cost), just high.
    # No drain on SIGTERM (a restart between idle runs wants a fresh hub now).
    set -- --max-connections-per-ip 1000000 --max-streams-per-ip 1000000 \
        --connection-rate 0 --publish-rate 0 --drain-delay 0 --drain-window 0 "$@"
    port=$(free_port "${PORT[@]}")
    PORT[$name]=$port
    if dry; then
        show "$CRIER" --listen "127.0.0.1:$port" --shutdown-timeout 2s "$@"
        SERVER_PIDS[$name]="<${name}-pid>"
        return
    fi
    RUST_LOG=warn "$CRIER" --listen "127.0.0.1:$port" --shutdown-timeout 2s "$@" \
        >"$TMP/$name.log" 2>&1 &
    pid=$!
    CHILDREN+=("$pid")
    wait_port "$port" "$pid" "$name"
    SERVER_PIDS[$name]=$pid
}

# The floor: a bare tokio broadcast-to-socket loop in the same binary
# (`crier bench bare-hub`), the same event bytes and chunk framing as crier.
start_bare() {
    local port pid
    port=$(free_port "${PORT[@]}")
    PORT[bare]=$port
    if dry; then
        show "$CRIER" bench bare-hub --listen "127.0.0.1:$port"
        SERVER_PIDS[bare]="<bare-pid>"
        return
    fi
    "$CRIER" bench bare-hub --listen "127.0.0.1:$port" >"$TMP/bare.log" 2>&1 &
    pid=$!
    CHILDREN+=("$pid")
    wait_port "$port" "$pid" bare
    SERVER_PIDS[bare]=$pid
}

# Starts a hub (crier-redis: its redis-server must be running).
start_hub() {
    case $1 in
        crier) start_crier crier ;;
        crier-redis) start_crier crier-redis --redis "redis://127.0.0.1:$REDIS_PORT" ;;
        nchan) start_nchan ;;
        bare) start_bare ;;
    esac
}

# Stops a crier hub by its PID and starts a fresh one (another port), so
# that each idle run sees a hub whose memory no earlier run touched.
restart_crier() {
    local hub=$1 pid=${SERVER_PIDS[$1]} i
    if dry; then
        show kill -TERM "$pid"
        start_hub "$hub"
        return
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!CHILDREN[@]}"; do
        [ "${CHILDREN[i]}" = "$pid" ] && unset 'CHILDREN[i]'
    done
    CHILDREN=("${CHILDREN[@]}")
    unset 'PORT[$hub]'
    start_hub "$hub"
    log "$hub restarted on 127.0.0.1:${PORT[$hub]} (pid ${SERVER_PIDS[$hub]})"
}

REDIS_PORT=""
REDIS_PID=""
start_redis() {
    local redis
    redis=$(find_cmd redis-server)
    dry && redis=${redis:-redis-server}
    REDIS_PORT=$(free_port "${PORT[@]}")
    if dry; then
        show "$redis" --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no
        REDIS_PID="<redis-pid>"
        return
    fi
    "$redis" --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$TMP" >"$TMP/redis.log" 2>&1 &
    REDIS_PID=$!
    CHILDREN+=("$REDIS_PID")
    wait_port "$REDIS_PORT" "$REDIS_PID" redis
}

start_nchan() {
    local port prefix module nginx master workers
    port=$(free_port "${PORT[@]}" "${REDIS_PORT:-}")
    PORT[nchan]=$port
    prefix=$TMP/nchan
    module=$(nchan_module)
    nginx=$(find_cmd nginx)
    if dry; then
        module=${module:-/usr/lib/nginx/modules/ngx_nchan_module.so}
        show sed "s#@PORT@#$port#g; s#@PREFIX@#$prefix#g; s#@NCHAN_MODULE@#$module#g" \
            "$HERE/nchan.conf.template"
        show "${nginx:-nginx}" -c "$prefix/nginx.conf" -p "$prefix/" -g 'daemon off;'
        SERVER_PIDS[nchan]="<nginx-worker-pids>"
        return
    fi
    if [ -z "$module" ] || [ ! -f "$module" ]; then
        die "ngx_nchan_module.so not found (apt-get install libnginx-mod-nchan)"
    fi
    [ -n "$nginx" ] || die "nginx not found (apt-get install nginx-light)"
    mkdir -p "$prefix"
    # nginx's workers run as nobody: they must reach the prefix.
    chmod 755 "$TMP" "$prefix"
    sed -e "s#@PORT@#$port#g; s#@PREFIX@#$prefix#g; s#@NCHAN_MODULE@#$module#g" \
        "$HERE/nchan.conf.template" >"$prefix/nginx.conf"
    "$nginx" -t -q -c "$prefix/nginx.conf" -p "$prefix/" >"$TMP/nchan.log" 2>&1 ||
        { cat "$TMP/nchan.log" >&2; die "nginx rejects $prefix/nginx.conf"; }
    "$nginx" -c "$prefix/nginx.conf" -p "$prefix/" -g 'daemon off;' >>"$TMP/nchan.log" 2>&1 &
    master=$!
    CHILDREN+=("$master")
    wait_port "$port" "$master" nchan
    # The workers do the work: measure them, not the master.
    for _ in $(seq 100); do
        workers=$(pgrep -P "$master" | tr '\n' ' ' | sed 's/ $//' || true)
        [ "$(wc -w <<<"$workers")" -ge 2 ] && break
        sleep 0.05
    done
    [ -n "$workers" ] || die "no nginx worker under master $master"
    SERVER_PIDS[nchan]=$workers
}

# Subscribes with curl, publishes one event, and checks it arrives as SSE.
smoke() {
    local hub=$1 port=${PORT[$1]} topic data pub sub out pid ok=0
    topic=smoke$RANDOM
    data="smoke-$hub-$RANDOM"
    pub=${PUB_PATH[$hub]//\{topic\}/$topic}
    sub=${SUB_PATH[$hub]//\{topic\}/$topic}
    if dry; then
        show curl -sN -H 'Accept: text/event-stream' "http://127.0.0.1:$port$sub"
        show curl -sf -X POST "http://127.0.0.1:$port$pub" --data-binary "$data"
        return
    fi
    out=$TMP/smoke-$hub.out
    curl -sN --max-time 10 -H 'Accept: text/event-stream' "http://127.0.0.1:$port$sub" >"$out" 2>/dev/null &
    pid=$!
    CHILDREN+=("$pid")
    # Connected once the stream's first bytes arrived (both hubs send some).
    for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
    [ -s "$out" ] || log "$hub: no bytes on the stream before the first event"
    curl -sf -o /dev/null -X POST "http://127.0.0.1:$port$pub" --data-binary "$data" ||
        die "$hub: publish to $pub failed"
    for _ in $(seq 100); do
        if grep -qx "data: $data" "$out"; then ok=1; break; fi
        sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset 'CHILDREN[${#CHILDREN[@]}-1]'
    [ "$ok" = 1 ] || { cat "$out" >&2; die "$hub: the event did not arrive on $sub"; }
    log "$hub ok on 127.0.0.1:$port (server pids ${SERVER_PIDS[$hub]})"
}

# ------------------------------------------------------------- measurements

rate_for() {   # the events/s for N, space-separated when RATES names several
    local n=$1 pair
    for pair in $RATES; do
        [ "${pair%%:*}" = "$n" ] && { echo "${pair#*:}" | tr '/' ' '; return; }
    done
    echo "$RATE_DEFAULT"
}

pid_args() {
    local pid
    for pid in ${SERVER_PIDS[$1]}; do printf -- '--pid\n%s\n' "$pid"; done
    # crier with Redis: Redis's CPU and memory are part of that hub's cost.
    if [ "$1" = crier-redis ]; then printf -- '--pid\n%s\n' "$REDIS_PID"; fi
}

FAILED=0
# bench KIND HUB CODING RUN SUBSCRIBERS TOOL-ARGS...: runs the tool, its
# subscribers asking for CODING, and appends its JSON line tagged with the
# hub, the coding, the kind and the run number.
bench() {
    local kind=$1 hub=$2 coding=$3 run=$4 subscribers=$5 out err rc=0
    shift 5
    local -a pids accept
    mapfile -t pids < <(pid_args "$hub")
    mapfile -t accept < <(accept_args "$coding")
    # Each run's client sockets linger in TIME_WAIT for a minute after it,
    # each holding a local port of its source address; the next runs would
    # run out of ports on one address (28,000 by default), so spread wide.
    local -a cmd=("$CRIER" bench "$kind" --url "http://127.0.0.1:${PORT[$hub]}"
        --subscribers "$subscribers" --sources "$((subscribers / PER_SOURCE + 1))" "$@"
        ${accept[@]+"${accept[@]}"} "${pids[@]}")
    if dry; then show "${cmd[@]}"; return; fi
    out=$TMP/bench.out
    err=$TMP/bench-$hub-$coding-$kind-$run.err
    run_child "$out" "$err" "${cmd[@]}" || rc=$?
    { echo "### $hub $coding $kind run $run: ${cmd[*]}"; grep -v '^connecting: ' "$err" || true; } >>"$TOOL_LOG"
    if [ "$rc" -ne 0 ] || ! jq -e . "$out" >/dev/null 2>&1; then
        FAILED=$((FAILED + 1))
        log "FAILED ($rc): ${cmd[*]}"
        tail -n 5 "$err" >&2 || true
        sleep "$PAUSE"
        return 0
    fi
    jq -c --arg hub "$hub" --arg coding "$coding" --arg kind "$kind" --argjson run "$run" \
        '{hub: $hub, coding: $coding, kind: $kind, run: $run} + .' "$out" >>"$RESULTS"
    jq -r --arg hub "$hub" 'if .deliveries_per_s != null then
        "    \($hub) \(.content_encoding) N=\(.subscribers) connected=\(.connected) deliveries/s=\(.deliveries_per_s | floor) p50=\(.latency_ms.p50) ms p99=\(.latency_ms.p99) ms lost=\(.lost)"
      else
        "    \($hub) \(.content_encoding) idle N=\(.subscribers) connected=\(.connected) bytes/connection=\(.bytes_per_connection)" end' \
        "$out" >&2
    if ! jq -e --arg coding "$coding" '.content_encoding == $coding' "$out" >/dev/null; then
        log "WARNING: asked for $coding, the hub answered $(jq -r .content_encoding "$out")"
    fi
    if jq -e '.connected < .subscribers' "$out" >/dev/null; then
        log "WARNING: only $(jq .connected "$out") of $(jq .subscribers "$out") subscribers connected (see $TOOL_LOG)"
    fi
    sleep "$PAUSE"
}

# --------------------------------------------------------------- the report

machine() {
    local mem cpu
    mem=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    echo "Machine: $(nproc) cores ($cpu), $mem memory, $(uname -sr)."
    echo "Versions: $("$CRIER" --version 2>/dev/null || echo crier);" \
        "$(version_of nginx -v | sed 's/^nginx version: //')" \
        "with Nchan $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo '?');" \
        "$(version_of redis-server --version | awk '{print $1, $2, $3}')."
}

# version_of CMD FLAG: what CMD says of its version, or "no CMD" where it
# is not installed (a run of crier alone needs neither nginx nor Redis).
version_of() {
    local cmd
    cmd=$(find_cmd "$1")
    if [ -z "$cmd" ]; then echo "no $1"; return; fi
    "$cmd" "$2" 2>&1 || true
}

# ratios REF TITLE: each crier row of the medians against hub REF's
# identity row of the same N and rate, when REF was measured.
ratios() {
    local ref=$1 title=$2
    awk -F'\t' -v ref="$ref" '$1 == ref { f = 1 } END { exit !f }' "$TMP/medians.tsv" || return 0
    echo "$title (deliveries/s: higher is better; latency and CPU: lower is better):"
    echo
    awk -F'\t' -v ref="$ref" '
        function ratio(a, b) { return (a == "-" || b == "-" || b + 0 == 0) ? "-" : sprintf("%.2f", a / b) }
        BEGIN {
            print "| hub | coding | N | events/s | deliveries/s | p50 | p99 | server CPU / delivery |"
            print "|-----|--------|--:|---------:|-------------:|----:|----:|----------------------:|"
        }
        $1 == "nchan" || $1 == "bare" {
            if ($1 == ref) base[$3 SUBSEP $5] = $0
            next
        }
        {
            key = $3 SUBSEP $5
            row = $1 SUBSEP $2
            line[row, key] = $0
            if (!(key in seen)) { seen[key] = 1; ks[++k] = key }
            if (!(row in rs)) { rs[row] = 1; rows[++r] = row }
        }
        END {
            for (i = 1; i <= k; i++) for (j = 1; j <= r; j++) {
                key = ks[i]; row = rows[j]
                if (!((row, key) in line) || !(key in base)) continue
                split(line[row, key], c, "\t"); split(base[key], x, "\t")
                printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", c[1], c[2], c[3], c[5],
                    ratio(c[7], x[7]), ratio(c[8], x[8]), ratio(c[9], x[9]), ratio(c[11], x[11])
            }
        }' "$TMP/medians.tsv"
    echo
}

report() {
    [ -s "$RESULTS" ] || { log "no results in $RESULTS"; return 0; }
    local hubs_json ns_json codings_json
    # shellcheck disable=SC2086 # the lists are split on purpose
    hubs_json=$(printf '%s\n' $HUBS | jq -R . | jq -sc .)
    # shellcheck disable=SC2086
    ns_json=$(printf '%s\n' $SUBSCRIBERS | jq -sc .)
    # shellcheck disable=SC2086
    codings_json=$(printf '%s\n' identity $CODINGS | awk '!seen[$0]++' | jq -R . | jq -sc .)
    echo
    echo "## crier vs Nchan ($(date -u +%Y-%m-%d), $RUNS run(s) each, medians)"
    echo
    machine
    echo "Results: ${RESULTS#"$ROOT"/} (the tool's messages: ${TOOL_LOG#"$ROOT"/}). Payload $SIZE bytes ($PAYLOAD), $DURATION of publishing per run;"
    echo "rates (N:events/s): $(for n in $SUBSCRIBERS; do printf "%s:%s " "$n" "$(rate_for "$n" | tr " " /)"; done)"
    echo "crier's subscribers ask for: $CODINGS (Accept-Encoding; identity sends none); Nchan's for identity."
    echo
    # Medians per hub, coding, N and rate, as TSV, then formatted by awk.
    # Columns: hub, coding, N, runs, rate, connected, deliveries/s, p50,
    # p99, lost, server and tool µs/delivery, runs on schedule, wire bytes
    # per event, the codings answered, idle bytes per connection.
    jq -rs --argjson hubs "$hubs_json" --argjson ns "$ns_json" --argjson codings "$codings_json" '
        def median: map(select(. != null)) | sort |
            if length == 0 then null
            elif length % 2 == 1 then .[(length - 1) / 2]
            else (.[length / 2 - 1] + .[length / 2]) / 2 end;
        def med(f): map(f) | median;
        def coding: .coding // "identity";
        # A run is lossless and on schedule when every subscriber got every
        # event once and in order, the publisher kept its schedule (at most
        # 5 % of events sent more than 5 ms after their slot: the tool shares
        # the cores, so a saturated machine shows here first) and p99 stayed
        # within a second.
        def on_schedule: .lost == 0 and .duplicated == 0 and .out_of_order == 0
            and .deliveries == .expected_deliveries
            and .published_late <= .published / 20 and .latency_ms.p99 <= 1000;
        map(select(.kind == "idle")) as $idle
        | map(select(.kind == "fanout")) as $all
        | $ns[] as $n | ([$all[] | select(.subscribers == $n) | .rate] | unique)[] as $rate
        | $hubs[] as $hub | $codings[] as $coding
        | [$all[] | select(.hub == $hub and coding == $coding and .subscribers == $n and .rate == $rate)] as $rs
        | select($rs | length > 0)
        | [$hub, $coding, $n, ($rs | length), $rate, ($rs | med(.connected)),
           ($rs | med(.deliveries_per_s)), ($rs | med(.latency_ms.p50)),
           ($rs | med(.latency_ms.p99)), ($rs | med(.lost)),
           ($rs | med(.cpu_us_per_delivery.server? // .server.cpu_us_per_delivery)),
           ($rs | med(.cpu_us_per_delivery.tool? // .tool.cpu_us_per_delivery)),
           ([$rs[] | select(on_schedule)] | length),
           ($rs | med(.wire.bytes_per_event?)),
           ([$rs[] | .content_encoding // "identity"] | unique | join("/")),
           ([$idle[] | select(.hub == $hub and coding == $coding) | .bytes_per_connection] | median)]
        | map(if . == null then "-" else tostring end) | @tsv' "$RESULTS" >"$TMP/medians.tsv"
    awk -F'\t' '
        function num(x, d) { return x == "-" ? "-" : sprintf("%." d "f", x) }
        BEGIN {
            print "| hub | coding | N | runs | events/s | connected | deliveries/s | p50 ms | p99 ms | lost | server µs/delivery | tool µs/delivery | on schedule |"
            print "|-----|--------|--:|-----:|---------:|----------:|-------------:|-------:|-------:|-----:|-------------------:|-----------------:|------------:|"
        }
        {
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s/%s |\n",
                $1, $2, $3, $4, $5, num($6, 0), num($7, 0), num($8, 2), num($9, 2), num($10, 0),
                num($11, 2), num($12, 2), $13, $4
        }' "$TMP/medians.tsv"
    echo
    # Per coding: what compressing costs the hub and what it saves on the wire.
    echo "Per coding (server µs/delivery and p99 from fanout; bytes / subscriber: hub RSS growth per idle connection asking for that coding):"
    echo
    awk -F'\t' '
        function num(x, d) { return x == "-" ? "-" : sprintf("%." d "f", x) }
        BEGIN {
            print "| hub | asked | answered | N | events/s | server µs/delivery | bytes / subscriber (idle) | p99 ms | lost | wire bytes/event |"
            print "|-----|-------|----------|--:|---------:|-------------------:|--------------------------:|-------:|-----:|-----------------:|"
        }
        {
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
                $1, $2, $15, $3, $5, num($11, 2), num($16, 0), num($9, 2), num($10, 0), num($14, 1)
        }' "$TMP/medians.tsv"
    echo
    # The highest rate every run of which was lossless and on schedule, per
    # hub, coding and N (rates tried in a sweep: RATES="N:r1/r2/...").
    echo "Highest rate lossless and on schedule in every run (events/s; deliveries/s):"
    echo
    awk -F'\t' '
        { key = $1 SUBSEP $2 SUBSEP $3 }
        $13 == $4 && $5 + 0 > best[key] + 0 { best[key] = $5; dps[key] = $7 }
        { if (!(key in seen)) { seen[key] = 1; keys[++k] = key } }
        END {
            print "| hub | coding | N | events/s | deliveries/s |"
            print "|-----|--------|--:|---------:|-------------:|"
            for (i = 1; i <= k; i++) {
                split(keys[i], kv, SUBSEP)
                if (keys[i] in best)
                    printf "| %s | %s | %s | %s | %.0f |\n", kv[1], kv[2], kv[3], best[keys[i]], dps[keys[i]]
                else
                    printf "| %s | %s | %s | none | - |\n", kv[1], kv[2], kv[3]
            }
        }' "$TMP/medians.tsv"
    echo
    # Ratios of each crier row to Nchan's identity row, then to the bare
    # loop's (the floor), per crier flavour, coding and N.
    ratios nchan "crier / Nchan"
    ratios bare "crier / the bare tokio loop (the floor)"
    if jq -e -s 'any(.[]; .kind == "idle")' "$RESULTS" >/dev/null; then
        echo "Idle connections (\`crier bench idle\`, server RSS growth / connection, a fresh hub per row):"
        echo
        echo "| hub | coding | answered | subscribers | connected | RSS before MiB | RSS after MiB | bytes / connection |"
        echo "|-----|--------|----------|------------:|----------:|---------------:|--------------:|-------------------:|"
        jq -rs --argjson hubs "$hubs_json" '
            $hubs[] as $hub | .[] | select(.kind == "idle" and .hub == $hub)
            | [$hub, .coding // "identity", .content_encoding // "identity", .subscribers, .connected,
               .rss_before_bytes, .rss_after_bytes, .bytes_per_connection]
            | map(if . == null then "-" else tostring end) | @tsv' "$RESULTS" |
            awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %.1f | %.1f | %.0f |\n", $1, $2, $3, $4, $5, $6 / 1048576, $7 / 1048576, $8 }'
        echo
    fi
}

# -------------------------------------------------------------------- main

if dry; then
    TMP=/tmp/crier-compare.XXXXXX
    log "DRY_RUN: printing the commands, running none"
else
    TMP=$(mktemp -d /tmp/crier-compare.XXXXXX)
fi

install_missing

if [ "$BUILD" != 1 ]; then
    dry || [ -x "$CRIER" ] || die "no $CRIER (BUILD=0: build it, or set CRIER)"
elif dry; then
    show cargo build --release --manifest-path "$ROOT/Cargo.toml"
else
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet)
    [ -x "$CRIER" ] || die "no $CRIER after the build"
fi

# The load tool holds up to N sockets open; crier raises its own limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if ! dry && [ "$SMOKE_ONLY" != 1 ]; then
    for kind in fanout idle; do
        "$CRIER" bench "$kind" --help >/dev/null 2>&1 ||
            die "this crier has no \`crier bench $kind\` (SMOKE_ONLY=1 checks the hubs alone)"
    done
fi

for hub in $HUBS; do
    if [ "$hub" = crier-redis ]; then start_redis; fi
    start_hub "$hub"
done
for hub in $HUBS; do smoke "$hub"; done
if [ "$SMOKE_ONLY" = 1 ]; then
    log "SMOKE_ONLY: every hub answered; stopping them"
    exit 0
fi

if ! dry; then
    mkdir -p "$(dirname "$RESULTS")"
    : >"$RESULTS"
fi
log "results: $RESULTS$(dry && echo ' (not written in a dry run)')"

# Idle first, on fresh hubs: memory freed by the fanout runs would otherwise
# be reused and hide the cost of a connection. Each coding after a hub's
# first gets a fresh crier (stopped and started again) for the same reason.
if [ "$IDLE_SUBSCRIBERS" -gt 0 ]; then
    for hub in $HUBS; do
        first=1
        for coding in $(codings_for "$hub"); do
            [ "$first" = 1 ] || restart_crier "$hub"
            first=0
            log "idle: $hub, $coding, $IDLE_SUBSCRIBERS subscribers"
            bench idle "$hub" "$coding" 1 "$IDLE_SUBSCRIBERS" \
                --subscribe-path "${SUB_PATH[$hub]}" --topic "idle-$STAMP-$coding"
        done
    done
fi

# Fanout: hubs and codings interleaved within each run, so a drift of the
# machine (another load, heat) touches every row alike.
for n in $SUBSCRIBERS; do
    for rate in $(rate_for "$n"); do
        for run in $(seq "$RUNS"); do
            for hub in $HUBS; do
                for coding in $(codings_for "$hub"); do
                    log "fanout: $hub, $coding, N=$n, $rate events/s, run $run/$RUNS"
                    bench fanout "$hub" "$coding" "$run" "$n" \
                        --publish-path "${PUB_PATH[$hub]}" --subscribe-path "${SUB_PATH[$hub]}" \
                        --topic "fanout-$STAMP-$n-$rate-$run-$coding" --rate "$rate" --duration "$DURATION" \
                        --size "$SIZE" --payload "$PAYLOAD"
                done
            done
        done
    done
done

dry && exit 0
report | tee "${RESULTS%.jsonl}.md"
[ "$FAILED" -eq 0 ] || die "$FAILED run(s) failed (their stderr is in $TMP)"

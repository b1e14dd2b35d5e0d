# Shared by the bench scripts (sourced, not run): messages, and tracking of
# every child process so that each is stopped by its PID on exit, error,
# Ctrl-C or SIGTERM. Set NAME (the script's name, for messages) and DRY_RUN
# before sourcing. A script keeps its scratch folder in TMP: removed on
# exit, kept (and said) after a failure.

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$NAME" "$*" >&2; exit 1; }
dry() { [ "$DRY_RUN" = 1 ]; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

CHILDREN=()      # every live child, stopped in reverse order on exit
TMP=""
cleanup() {
    local rc=$? pid i
    trap - EXIT INT TERM
    for ((i = ${#CHILDREN[@]} - 1; i >= 0; i--)); do
        kill -TERM "${CHILDREN[i]}" 2>/dev/null || true
    done
    for pid in "${CHILDREN[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop within 5 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        # Kept after a failure, not after Ctrl-C (130) or SIGTERM (143).
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ] &&
            [ -n "$(ls -A "$TMP" 2>/dev/null)" ]; then
            log "logs kept in $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# forget PID: a child that has been waited for leaves the list.
forget() {
    local pid=$1 i
    for i in "${!CHILDREN[@]}"; do
        [ "${CHILDREN[i]}" = "$pid" ] && unset 'CHILDREN[i]'
    done
    CHILDREN=("${CHILDREN[@]}")
}

# start OUT ERR CMD...: runs CMD as a tracked background child; its PID in $STARTED.
start() {
    local out=$1 err=$2
    shift 2
    "$@" >"$out" 2>"$err" &
    STARTED=$!
    CHILDREN+=("$STARTED")
}

# finish PID: waits for a child started by `start`; its exit status.
finish() {
    local rc=0
    wait "$1" || rc=$?
    forget "$1"
    return "$rc"
}

# run_child OUT ERR CMD...: runs CMD as a tracked child and waits for it, so
# that a signal reaching the script interrupts the wait and the trap stops
# the child.
run_child() {
    start "$@"
    finish "$STARTED"
}

# free_port [PORT...]: a TCP port on 127.0.0.1 that nothing listens on
# (bash's /dev/tcp, no tools) and that is none of the PORTs given (handed
# out earlier in the run, not yet listened on).
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 12000))
        case " $* " in *" $port "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

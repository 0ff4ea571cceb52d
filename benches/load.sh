#!/usr/bin/env bash
# qsguard load benchmark: qsguard next to nginx and HAProxy as reverse proxies, all on loopback.
#
#   bash benches/load.sh                     # full run: both phases, 3 rounds of 10s
#   DURATION=3s ROUNDS=1 bash benches/load.sh   # quick check
#
# Phase "load": a static upstream (nginx answering 200 "ok\n") on core 0; wrk (1 thread, keep-alive)
# on core 0; each proxy alone on core 1. For each round and each connection count, wrk hits the
# upstream directly, then nginx, HAProxy and qsguard in front of it (qsguard three ways: guard on,
# guard off, and guard on as one guard of a pair, [cluster] on a local redis-server). Per run it records req/s,
# p50/p99 latency and the proxy's CPU time; the table shows the medians over the rounds and the
# ratios to nginx.
#
# Phase "ws": the memory cost of one idle proxied WebSocket. A WebSocket echo upstream
# (benches/ws_idle.rs, `server` mode) sits behind fresh nginx, HAProxy and qsguard instances; the
# same helper in `client` mode opens WS_N connections through each proxy, and the proxy's
# resident memory before and after gives KiB per idle WebSocket.
#
# Environment knobs (defaults in brackets):
#   PHASES     phases to run, any of "load ws"                   ["load ws"]
#   DURATION   wrk duration of one measurement                   [10s]
#   ROUNDS     rounds over all (connections, target) pairs; the table shows the median [3]
#   CONNS      wrk connection counts                             ["16 64 256"]
#   WARMUP     wrk warm-up per target before the rounds, 0 = none [2s]
#   WRK_HEADER one extra request header for every wrk request. The default is what a browser
#              in a Qlik session sends: a live session cookie (which the script first has
#              qsguard learn through a /login answer of the upstream that sets it) and the
#              guard's device cookie. WRK_HEADER=none sends no cookie (every request is then a
#              new browser to qsguard).
#   WS_N       idle WebSockets opened through each proxy         [2000]
#   WS_HOLD    seconds the client keeps them open (it is stopped once measured) [120]
#   BASE_PORT  first of the 10 consecutive loopback ports used   [18080]
#   LOAD_CORE / PROXY_CORE  cores for wrk+upstream / for the proxy [0 / 1]
#   QUIET_MAX  before each run, wait until cores 0+1 are busy at most this % of a core [10]
#   QUIET_WAIT ... but at most this many seconds per run          [300]
#   FOREIGN_MAX  a run where other processes took more than this % of a core is
#              measured again, up to ATTEMPTS [5] attempts (the last one is kept) [10]
#   RESULTS    results file                    [benches/results/load-<date>-<time>.md]
#   QSGUARD    use this qsguard binary instead of building one (skips `cargo build`)
#   CARGO_TARGET_DIR  honoured by the cargo builds (binary in $CARGO_TARGET_DIR/release/)
#
# Only 127.0.0.1 is ever a target. Every process started here is stopped on exit (trap), also on
# failure or Ctrl-C.

set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PHASES="${PHASES:-load ws}"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-3}"
CONNS="${CONNS:-16 64 256}"
WARMUP="${WARMUP:-2s}"
BENCH_DEVICE="0123456789abcdef0123456789abcdef"
BENCH_SESSION="3f2a9c1e-0d4b-4c8e-9a77-1b2c3d4e5f60"
WRK_HEADER="${WRK_HEADER:-Cookie: _ga=GA1.2.123456789.1700000000; X-Qlik-Session=$BENCH_SESSION; qsguard=$BENCH_DEVICE}"
WRK_EXTRA=()
[[ $WRK_HEADER != none ]] && WRK_EXTRA=(-H "$WRK_HEADER")
WS_N="${WS_N:-2000}"
WS_HOLD="${WS_HOLD:-120}"
BASE_PORT="${BASE_PORT:-18080}"
LOAD_CORE="${LOAD_CORE:-0}"
PROXY_CORE="${PROXY_CORE:-1}"
QUIET_MAX="${QUIET_MAX:-10}"
QUIET_WAIT="${QUIET_WAIT:-300}"
FOREIGN_MAX="${FOREIGN_MAX:-10}"
ATTEMPTS="${ATTEMPTS:-5}"
TARGETS=(direct nginx haproxy qsguard qsguard-noguard qsguard-pair)

# Ports, all on 127.0.0.1.
P_UPSTREAM=$((BASE_PORT + 0))     # static nginx upstream (load phase)
P_NGINX=$((BASE_PORT + 1))        # nginx reverse proxy (load)
P_HAPROXY=$((BASE_PORT + 2))      # HAProxy (load)
P_QSGUARD=$((BASE_PORT + 3))      # qsguard (load)
P_QSGUARD_ADMIN=$((BASE_PORT + 4))
P_WS_UPSTREAM=$((BASE_PORT + 5))  # WebSocket echo upstream (ws phase)
P_WS_NGINX=$((BASE_PORT + 6))
P_WS_HAPROXY=$((BASE_PORT + 7))
P_WS_QSGUARD=$((BASE_PORT + 8))
P_WS_QSGUARD_ADMIN=$((BASE_PORT + 9))
P_QSGUARD_OFF=$((BASE_PORT + 10))  # qsguard with the session guard off (load)
P_QSGUARD_OFF_ADMIN=$((BASE_PORT + 11))
P_QSGUARD_PAIR=$((BASE_PORT + 12)) # qsguard as one guard of a pair ([cluster]) (load)
P_QSGUARD_PAIR_ADMIN=$((BASE_PORT + 13))
P_REDIS=$((BASE_PORT + 14))        # redis-server, the pair's store

has_phase() { [[ " $PHASES " == *" $1 "* ]]; }
log() { printf '[load.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf '[load.sh] error: %s\n' "$*" >&2; exit 1; }

for p in $PHASES; do
    [[ $p == load || $p == ws ]] || die "unknown phase '$p' in PHASES (use: load ws)"
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $WS_N =~ ^[1-9][0-9]*$ ]] || die "WS_N must be a positive integer"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping and cleanup
# ---------------------------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/qsguard-bench.XXXXXX)"
chmod 755 "$WORK"          # nginx workers run as nobody and must reach their temp dirs
OURS=()                    # "pid:comm" of every process this script started
KEEP_WORK=0
RESULTS_STARTED=0          # 1 once this run has written its results file header

# alive PID: true while PID exists and is not a zombie.
alive() {
    [[ -r /proc/$1/stat ]] || return 1
    local st
    st="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n $st && $st != Z ]]
}

# register PID...: remember processes to stop on exit (with their command name, so that a
# recycled pid of a stranger is never signalled).
register() {
    local pid comm
    for pid in "$@"; do
        comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
        OURS+=("$pid:$comm")
    done
}

# ours PID COMM: PID still runs COMM (or still is the taskset that is about to exec it).
ours() {
    local now
    alive "$1" || return 1
    now="$(cat "/proc/$1/comm" 2>/dev/null)" || return 1
    [[ $now == "$2" || $now == taskset ]]
}

# stop_ours PID...: TERM, wait up to 5 s, then KILL; only pids that were registered.
stop_pids() {
    local entry pid comm i any
    local targets=("$@")
    for entry in "${targets[@]}"; do
        pid="${entry%%:*}"; comm="${entry#*:}"
        if ours "$pid" "$comm"; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 50; i++)); do
        any=0
        for entry in "${targets[@]}"; do alive "${entry%%:*}" && any=1; done
        ((any)) || break
        sleep 0.1
    done
    for entry in "${targets[@]}"; do
        pid="${entry%%:*}"; comm="${entry#*:}"
        if ours "$pid" "$comm"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if ((${#OURS[@]})); then
        log "stopping ${#OURS[@]} process(es) started by this script"
        # Newest first: clients before proxies before upstreams.
        local rev=() i
        for ((i = ${#OURS[@]} - 1; i >= 0; i--)); do rev+=("${OURS[i]}"); done
        stop_pids "${rev[@]}"
    fi
    wait 2>/dev/null
    if ((rc != 0 && RESULTS_STARTED)); then
        printf '\n**This run failed (exit %s): the tables above, if any, are incomplete.**\n' "$rc" >>"$RESULTS"
    fi
    if ((rc != 0 || KEEP_WORK)); then
        log "logs and configs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
# Install what is missing with apt-get (apt-get update once, only if something is missing).
install_tools() {
    local need=()
    command -v nginx >/dev/null || need+=(nginx)
    command -v haproxy >/dev/null || need+=(haproxy)
    has_phase load && { command -v wrk >/dev/null || need+=(wrk); }
    has_phase load && { command -v redis-server >/dev/null || need+=(redis-server); }
    command -v taskset >/dev/null || need+=(util-linux)
    command -v pgrep >/dev/null || need+=(procps)
    if ((${#need[@]})); then
        log "installing: ${need[*]}"
        command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
        apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
            || die "apt-get install ${need[*]} failed"
    fi
    local t
    for t in nginx haproxy taskset pgrep getconf; do
        command -v "$t" >/dev/null || die "'$t' is still missing after installing; install it by hand"
    done
    if has_phase load; then
        command -v wrk >/dev/null || die "'wrk' is still missing after installing; install it by hand"
        command -v redis-server >/dev/null || die "'redis-server' is still missing after installing; install it by hand"
    fi
}
install_tools
CLK_TCK="$(getconf CLK_TCK)"
NCPU="$(nproc)"
((NCPU > PROXY_CORE && NCPU > LOAD_CORE)) || die "need cores $LOAD_CORE and $PROXY_CORE; this machine has $NCPU"

# Many sockets: 2000 idle WebSockets are 2000 fds in the client, 4000 in a proxy.
# Ask for 65536; where the hard limit is lower (containers), take the hard limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"
((NOFILE >= 4 * WS_N + 1024)) || die "ulimit -n is $NOFILE: too few for WS_N=$WS_N (needs $((4 * WS_N + 1024)))"

# ---------------------------------------------------------------------------------------------
# Build qsguard (release) and, for the ws phase, the ws_idle helper
# ---------------------------------------------------------------------------------------------
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
if [[ -n ${QSGUARD:-} ]]; then
    [[ -x $QSGUARD ]] || die "QSGUARD=$QSGUARD is not an executable"
else
    command -v cargo >/dev/null || die "cargo not found (needed to build qsguard)"
    log "building qsguard (release) in $TARGET_DIR"
    (cd "$REPO" && cargo build --release --bin qsguard) || die "cargo build --release failed"
    QSGUARD="$TARGET_DIR/release/qsguard"
    [[ -x $QSGUARD ]] || die "no qsguard binary at $QSGUARD after the build"
fi

WS_IDLE=""
if has_phase ws; then
    command -v cargo >/dev/null || die "cargo not found (needed to build benches/ws_idle.rs)"
    log "building the ws_idle helper (cargo bench --no-run --bench ws_idle)"
    # The JSON messages name the produced executable; fall back to the newest deps/ws_idle-*.
    WS_IDLE="$(cd "$REPO" && cargo bench --no-run --bench ws_idle --message-format=json 2>"$WORK/ws_idle-build.log" \
        | grep -o '"executable":"[^"]*ws_idle[^"]*"' | tail -n1 | sed 's/^"executable":"//; s/"$//')" || true
    if [[ -z $WS_IDLE || ! -x $WS_IDLE ]]; then
        local_newest=""
        for f in "$TARGET_DIR"/release/deps/ws_idle-*; do
            [[ -f $f && -x $f && $f != *.d ]] || continue
            [[ -z $local_newest || $f -nt $local_newest ]] && local_newest="$f"
        done
        WS_IDLE="$local_newest"
    fi
    [[ -n $WS_IDLE && -x $WS_IDLE ]] || { cat "$WORK/ws_idle-build.log" >&2; die "could not build benches/ws_idle.rs"; }
fi

# ---------------------------------------------------------------------------------------------
# Helpers: ports, starting servers, /proc readings, wrk parsing
# ---------------------------------------------------------------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_ports_free() {
    local p
    for p in "$@"; do
        port_open "$p" && die "port 127.0.0.1:$p is already in use (set BASE_PORT to move all ports)"
    done
    return 0
}

# start NAME CORE CMD...: run CMD pinned to CORE in the background, output to $WORK/NAME.log.
# Sets STARTED_PID. taskset execs CMD, so the pid is CMD's own.
start() {
    local name="$1" core="$2"; shift 2
    taskset -c "$core" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    # The kernel's comm: the program's file name, cut to 15 characters.
    local comm; comm="$(basename "$1")"; comm="${comm:0:15}"
    OURS+=("$STARTED_PID:$comm")
}

# wait_port NAME PID PORT: wait (max 15 s) until PORT accepts; fail if PID died meanwhile.
wait_port() {
    local name="$1" pid="$2" port="$3" i
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || { cat "$WORK/$name.log" >&2 2>/dev/null; die "$name exited at start (log above)"; }
        port_open "$port" && return 0
        sleep 0.1
    done
    cat "$WORK/$name.log" >&2 2>/dev/null
    die "$name did not accept on 127.0.0.1:$port within 15 s"
}

# proc_tree PID: PID and its direct children (nginx master + workers).
proc_tree() {
    echo "$1"
    pgrep -P "$1" 2>/dev/null || true
}

# cpu_ticks PID...: utime+stime (clock ticks) of the processes, all their threads included.
# Fields 14 and 15 of /proc/PID/stat; the command name (field 2) may hold spaces, so cut
# everything up to ") " first (then utime/stime are fields 12/13).
cpu_ticks() {
    local pid sum=0 t
    for pid in "$@"; do
        t="$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')"
        sum=$((sum + t))
    done
    echo "$sum"
}

# mem_kib PID...: "RSS PSS" in KiB, summed (PSS from smaps_rollup, "-" if unavailable).
mem_kib() {
    local pid rss=0 pss=0 have_pss=1 r s
    for pid in "$@"; do
        r="$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")"
        rss=$((rss + ${r:-0}))
        if [[ -r /proc/$pid/smaps_rollup ]]; then
            s="$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")"
            pss=$((pss + ${s:-0}))
        else
            have_pss=0
        fi
    done
    ((have_pss)) || pss="-"
    echo "$rss $pss"
}

now() { date +%s.%N; }

# busy_ticks: busy clock ticks (user nice system irq softirq steal) of the two cores in use.
busy_ticks() {
    awk -v a="cpu$LOAD_CORE" -v b="cpu$PROXY_CORE" \
        '$1 == a || $1 == b {s += $2 + $3 + $4 + $7 + $8 + $9} END {print s}' /proc/stat
}

# wait_quiet: before a measurement, wait (at most QUIET_WAIT s) until the two cores are idle
# but for QUIET_MAX % of one core, so that other jobs on the machine (builds) do not skew it.
wait_quiet() {
    local waited=0 b0 b1 pct warned=0 quiet=0
    while :; do
        b0="$(busy_ticks)"; sleep 1; b1="$(busy_ticks)"
        pct=$(((b1 - b0) * 100 / CLK_TCK))
        # Two quiet seconds in a row: a pause between two compiler runs is not quiet.
        if ((pct <= QUIET_MAX)); then
            quiet=$((quiet + 1)); ((quiet >= 2)) && return 0; continue
        fi
        quiet=0
        ((warned)) || { log "other processes use ${pct}% of a core; waiting up to ${QUIET_WAIT}s for quiet"; warned=1; }
        waited=$((waited + 1))
        if ((waited >= QUIET_WAIT)); then
            log "warning: still ${pct}% busy after ${QUIET_WAIT}s; measuring anyway (see foreign_cpu_pct)"
            return 0
        fi
    done
}

# wrk_ms VALUE: wrk's latency (e.g. 812.00us, 1.25ms, 2.01s, 1.00m) in milliseconds.
wrk_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "ms") n = n; else if (u == "s") n *= 1000;
        else if (u == "m") n *= 60000; else if (u == "h") n *= 3600000; else { print "nan"; exit }
        printf "%.3f", n }'
}

# ---------------------------------------------------------------------------------------------
# Config writers
# ---------------------------------------------------------------------------------------------
# nginx_conf DIR BODY: a self-contained nginx config (prefix DIR) with the given http{} body.
nginx_conf() {
    local dir="$1" body="$2"
    mkdir -p "$dir"/{client_body,proxy,fastcgi,uwsgi,scgi}
    cat >"$dir/nginx.conf" <<EOF
daemon off;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $((4 * WS_N + 4096)); }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
$body
}
EOF
}

start_nginx() {  # start_nginx NAME CORE PORT: sets STARTED_PIDS (master + workers)
    local name="$1" core="$2" port="$3" dir="$WORK/$1"
    nginx -t -q -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" \
        || { cat "$dir/error.log" >&2; die "nginx config for $name is invalid"; }
    start "$name" "$core" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    local master="$STARTED_PID"
    wait_port "$name" "$master" "$port"
    # shellcheck disable=SC2207
    STARTED_PIDS=($(proc_tree "$master"))
    register "${STARTED_PIDS[@]:1}"
}

# haproxy_conf FILE PORT UPSTREAM_PORT
haproxy_conf() {
    cat >"$1" <<EOF
global
    nbthread 1
    # Enough for WS_N tunnels (2 fds each) and the load phase, within the fd limit.
    maxconn $((WS_N + 4000))
    # no "log" line: no logging at all

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout tunnel 1h
    http-reuse always

frontend fe
    bind 127.0.0.1:$2
    default_backend be

backend be
    server up1 127.0.0.1:$3
EOF
}

start_haproxy() {  # start_haproxy NAME CORE PORT UPSTREAM_PORT
    local name="$1" core="$2" port="$3" up="$4" cfg="$WORK/$1.cfg"
    haproxy_conf "$cfg" "$port" "$up"
    haproxy -c -q -f "$cfg" || die "haproxy config for $name is invalid"
    # -db: stay in the foreground, one process (no master/worker).
    start "$name" "$core" haproxy -db -f "$cfg"
    wait_port "$name" "$STARTED_PID" "$port"
    STARTED_PIDS=("$STARTED_PID")
}

# login_through NAME PORT: the browser logs in once through that guard, which learns the
# session and its device. The guard signs the device cookie it issues with the new session (an
# id the browser chose is never trusted): wrk's browser sends that one to that guard, as a real
# browser would (DEVICE_OF[NAME]).
declare -A DEVICE_OF
login_through() {
    local name="$1" port="$2" device
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 0
        printf 'GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: qsguard=%s\r\nConnection: close\r\n\r\n' "$BENCH_DEVICE" >&3
        timeout 5 cat <&3 >"$WORK/login-$name.answer" || true
    )
    device="$(tr -d '\r' <"$WORK/login-$name.answer" | grep -i '^set-cookie: qsguard=' | head -n1 | sed -E 's/^[^=]*=([^;[:space:]]*).*/\1/')" || true
    DEVICE_OF[$name]="$device"
}

# wrk_header TARGET: WRK_EXTRA for that target (its own device cookie, for a guard).
wrk_header() {
    WRK_EXTRA=()
    [[ $WRK_HEADER == none ]] && return 0
    local device="${DEVICE_OF[$1]:-}"
    if [[ -n $device ]]; then
        WRK_EXTRA=(-H "${WRK_HEADER//qsguard=$BENCH_DEVICE/qsguard=$device}")
    else
        WRK_EXTRA=(-H "$WRK_HEADER")
    fi
}

start_qsguard() {  # start_qsguard NAME CORE PORT ADMIN_PORT UPSTREAM_PORT [GUARD true|false] [REDIS_PORT]
    local name="$1" core="$2" port="$3" admin="$4" up="$5" guard="${6:-true}" redis="${7:-}" cfg="$WORK/$1.toml"
    cat >"$cfg" <<EOF
[server]
listen = "127.0.0.1:$port"
workers = 1
[admin]
listen = "127.0.0.1:$admin"
[[upstream]]
url = "http://127.0.0.1:$up"
[log]
requests = false
[sessions]
guard = $guard
EOF
    if [[ -n $redis ]]; then
        printf '[cluster]\nredis_url = "redis://127.0.0.1:%s/0"\nname = "load-%s"\nkey_prefix = "qsguard:load:"\n' "$redis" "$name" >>"$cfg"
    fi
    "$QSGUARD" check-config "$cfg" >/dev/null || die "qsguard check-config $cfg failed"
    start "$name" "$core" "$QSGUARD" --config "$cfg" --log-level warn
    wait_port "$name" "$STARTED_PID" "$port"
    STARTED_PIDS=("$STARTED_PID")
}

# ---------------------------------------------------------------------------------------------
# Results file header
# ---------------------------------------------------------------------------------------------
mkdir -p "$REPO/benches/results"
RESULTS="${RESULTS:-$REPO/benches/results/load-$(date +%Y-%m-%d-%H%M).md}"
first_line() { { "$@" 2>&1 || true; } | head -n1; }
QS_REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]] && QS_REV="$QS_REV+uncommitted changes"
{
    echo "# qsguard load benchmark — $(date '+%Y-%m-%d %H:%M %Z')"
    echo
    echo "- machine: $NCPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
    echo "- qsguard $QS_REV (release build); $(first_line nginx -v); $(first_line haproxy -v); $(first_line wrk -v)"
    echo "- wrk + upstream pinned to core $LOAD_CORE; each proxy alone on core $PROXY_CORE"
    echo "- PHASES=\"$PHASES\" DURATION=$DURATION ROUNDS=$ROUNDS CONNS=\"$CONNS\" WARMUP=$WARMUP WS_N=$WS_N WRK_HEADER=\"$WRK_HEADER\""
    echo
} >"$RESULTS"
RESULTS_STARTED=1

# ---------------------------------------------------------------------------------------------
# Phase "load"
# ---------------------------------------------------------------------------------------------
RAW="$WORK/load.tsv"   # one line per measurement

declare -A URL PIDS_OF
run_load_phase() {
    check_ports_free "$P_UPSTREAM" "$P_NGINX" "$P_HAPROXY" "$P_QSGUARD" "$P_QSGUARD_ADMIN" "$P_QSGUARD_OFF" "$P_QSGUARD_OFF_ADMIN" "$P_QSGUARD_PAIR" "$P_QSGUARD_PAIR_ADMIN" "$P_REDIS"
    LOAD_MARK=${#OURS[@]}

    # The static upstream: nginx, one worker, keep-alive without a request cap, fixed 200 "ok\n".
    nginx_conf "$WORK/upstream" "
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$P_UPSTREAM backlog=4096;
        location / { default_type text/plain; return 200 \"ok\\n\"; }
        # Where the benchmark's session comes from: a Qlik-like session cookie.
        location = /login {
            default_type text/plain;
            add_header Set-Cookie \"X-Qlik-Session=$BENCH_SESSION; Path=/; HttpOnly; SameSite=Lax\";
            return 200 \"ok\\n\";
        }
        # The Personal API, as Qlik answers it: the guard learns the session's owner, as it
        # does on a real site (without it the session stays unresolved).
        location = /qps/user {
            default_type application/json;
            return 200 '{\"userDirectory\":\"BENCH\",\"userId\":\"alice\",\"session\":\"active\"}';
        }
    }"
    start_nginx upstream "$LOAD_CORE" "$P_UPSTREAM"
    UPSTREAM_PIDS=("${STARTED_PIDS[@]}")
    log "static upstream on 127.0.0.1:$P_UPSTREAM (pids ${STARTED_PIDS[*]})"

    # nginx as a reverse proxy: 1 worker, no access log, keep-alive pool of 256 to the upstream.
    # keepalive_requests is raised from nginx's default 1000 on both sides so that nginx, like
    # the others, never closes a keep-alive connection during a run (this only helps nginx).
    nginx_conf "$WORK/nginx" "
    upstream up {
        server 127.0.0.1:$P_UPSTREAM;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$P_NGINX backlog=4096;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"
    start_nginx nginx "$PROXY_CORE" "$P_NGINX"
    PIDS_OF[nginx]="${STARTED_PIDS[*]}"

    start_haproxy haproxy "$PROXY_CORE" "$P_HAPROXY" "$P_UPSTREAM"
    PIDS_OF[haproxy]="${STARTED_PIDS[*]}"

    start_qsguard qsguard "$PROXY_CORE" "$P_QSGUARD" "$P_QSGUARD_ADMIN" "$P_UPSTREAM"
    PIDS_OF[qsguard]="${STARTED_PIDS[*]}"
    login_through qsguard "$P_QSGUARD"

    start_qsguard qsguard-noguard "$PROXY_CORE" "$P_QSGUARD_OFF" "$P_QSGUARD_OFF_ADMIN" "$P_UPSTREAM" false
    PIDS_OF[qsguard-noguard]="${STARTED_PIDS[*]}"

    # One guard of a pair: its store (in memory) beside the load generator.
    start redis "$LOAD_CORE" redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no
    wait_port redis "$STARTED_PID" "$P_REDIS"
    start_qsguard qsguard-pair "$PROXY_CORE" "$P_QSGUARD_PAIR" "$P_QSGUARD_PAIR_ADMIN" "$P_UPSTREAM" true "$P_REDIS"
    PIDS_OF[qsguard-pair]="${STARTED_PIDS[*]}"
    login_through qsguard-pair "$P_QSGUARD_PAIR"

    URL[direct]="http://127.0.0.1:$P_UPSTREAM/"
    URL[nginx]="http://127.0.0.1:$P_NGINX/"
    URL[haproxy]="http://127.0.0.1:$P_HAPROXY/"
    URL[qsguard]="http://127.0.0.1:$P_QSGUARD/"
    URL[qsguard-noguard]="http://127.0.0.1:$P_QSGUARD_OFF/"
    URL[qsguard-pair]="http://127.0.0.1:$P_QSGUARD_PAIR/"
    PIDS_OF[direct]=""

    local t
    local -A RSS_START
    for t in "${TARGETS[@]}"; do
        # shellcheck disable=SC2086
        [[ $t == direct ]] || RSS_START[$t]="$(mem_kib ${PIDS_OF[$t]} | cut -d' ' -f1)"
        log "target $t: ${URL[$t]} pids: ${PIDS_OF[$t]:--}"
        # One request each: every target answers 200 before anything is measured.
        curl_like_check "$t"
    done

    if [[ $WARMUP != 0 ]]; then
        for t in "${TARGETS[@]}"; do
            log "warm-up $t ($WARMUP, 64 connections)"
            wrk_header "$t"
            taskset -c "$LOAD_CORE" wrk -t1 -c64 -d"$WARMUP" ${WRK_EXTRA[@]+"${WRK_EXTRA[@]}"} "${URL[$t]}" >/dev/null
        done
    fi

    printf 'conns\ttarget\tround\treq_s\tp50_ms\tp99_ms\trequests\twall_s\tcpu_s\tcpu_pct\treq_per_cpu_s\terrors\tforeign_cpu_pct\n' >"$RAW"
    local round c out t0 t1 c0 c1 u0 u1 b0 b1 pids attempt foreign
    export OUT
    for ((round = 1; round <= ROUNDS; round++)); do
        for c in $CONNS; do
            for t in "${TARGETS[@]}"; do
                out="$WORK/wrk-$t-$c-$round.txt"; OUT="$out"
                wrk_header "$t"
                read -r -a pids <<<"${PIDS_OF[$t]}"
                for p in ${pids[@]+"${pids[@]}"}; do
                    alive "$p" || die "$t (pid $p) is no longer running; see $WORK/$t.log"
                done
                for ((attempt = 1; ; attempt++)); do
                    wait_quiet
                    c0=0; ((${#pids[@]})) && c0="$(cpu_ticks "${pids[@]}")"
                    u0="$(cpu_ticks "${UPSTREAM_PIDS[@]}")"
                    b0="$(busy_ticks)"
                    t0="$(now)"
                    # wrk runs under a small bash that, once wrk is reaped, reports its own
                    # children's CPU time (cutime+cstime): that is wrk's CPU time.
                    taskset -c "$LOAD_CORE" bash -c 'wrk "$@" >"$OUT" 2>&1; rc=$?
                        sed "s/^.*) //" /proc/$$/stat | awk "{print \$14 + \$15}" >"$OUT.ticks"; exit $rc' \
                        wrk -t1 -c"$c" -d"$DURATION" --latency ${WRK_EXTRA[@]+"${WRK_EXTRA[@]}"} "${URL[$t]}" \
                        || { cat "$out" >&2; die "wrk failed against $t"; }
                    t1="$(now)"
                    b1="$(busy_ticks)"
                    u1="$(cpu_ticks "${UPSTREAM_PIDS[@]}")"
                    c1=0; ((${#pids[@]})) && c1="$(cpu_ticks "${pids[@]}")"
                    # Foreign CPU: busy time of both cores not spent by wrk, the upstream or
                    # the proxy (other jobs on the machine), in % of one core.
                    foreign="$(awk -v b="$((b1 - b0))" -v o="$((c1 - c0 + u1 - u0 + $(cat "$out.ticks")))" \
                        -v w="$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" -v hz="$CLK_TCK" \
                        'BEGIN {f = 100 * (b - o) / hz / w; if (f < 0) f = 0; printf "%.1f", f}')"
                    if awk -v f="$foreign" -v m="$FOREIGN_MAX" 'BEGIN {exit !(f > m)}' && ((attempt < ATTEMPTS)); then
                        log "round $round c=$c $t: ${foreign}% of a core went to other processes; measuring again"
                        continue
                    fi
                    break
                done
                record "$c" "$t" "$round" "$out" "$t0" "$t1" "$c0" "$c1" "$foreign"
            done
        done
    done

    print_load_table | tee "$WORK/load-table.md"
    {
        echo
        echo "| proxy | RSS at start KiB | RSS after the load phase KiB | requests measured |"
        echo "|---|---:|---:|---:|"
        for t in nginx haproxy qsguard qsguard-noguard qsguard-pair; do
            # shellcheck disable=SC2086
            printf '| %s | %s | %s | %s |\n' "$t" "${RSS_START[$t]}" "$(mem_kib ${PIDS_OF[$t]} | cut -d' ' -f1)" \
                "$(awk -F'\t' -v t="$t" 'NR > 1 && $2 == t {s += $7} END {printf "%.0f", s}' "$RAW")"
        done
    } | tee -a "$WORK/load-table.md"
    {
        echo "## Load: keep-alive GET of a 3-byte 200 response (wrk -t1 --latency, ${DURATION} per run, median of $ROUNDS rounds)"
        echo
        cat "$WORK/load-table.md"
        echo
        echo "<details><summary>every run</summary>"
        echo
        echo '```'
        column -t -s $'\t' "$RAW" 2>/dev/null || cat "$RAW"
        echo '```'
        echo
        echo "</details>"
        echo
    } >>"$RESULTS"

    # Free core 1 and the ports before the next phase.
    stop_load_phase_processes
}

# curl_like_check TARGET: one plain HTTP/1.1 GET with bash's /dev/tcp; must answer 200.
curl_like_check() {
    local t="$1" port status
    port="${URL[$t]##*:}"; port="${port%/}"
    status="$(
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 0
        printf 'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
        timeout 5 head -n1 <&3 || true
    )"
    [[ $status == *" 200"* ]] || die "$t did not answer 200 to a test GET (got: ${status:-nothing}); see $WORK/$t.log"
}

# record CONNS TARGET ROUND WRK_OUT T0 T1 CPU0 CPU1: parse one wrk output and append to $RAW.
record() {
    local c="$1" t="$2" round="$3" out="$4" t0="$5" t1="$6" c0="$7" c1="$8" foreign="$9"
    local rps p50 p99 reqs errs wall cpu cpu_pct rpc
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
    p50="$(wrk_ms "$(awk '$1 == "50%" {print $2}' "$out")")"
    p99="$(wrk_ms "$(awk '$1 == "99%" {print $2}' "$out")")"
    reqs="$(awk '/requests in/ {print $1}' "$out")"
    # Socket errors (connect/read/write/timeout) plus non-2xx/3xx answers.
    errs="$(awk '/Socket errors:/ {gsub(/,/, ""); s += $4 + $6 + $8 + $10}
                 /Non-2xx or 3xx responses:/ {s += $5} END {print s + 0}' "$out")"
    [[ -n $rps && -n $reqs ]] || { cat "$out" >&2; die "cannot parse the wrk output for $t"; }
    wall="$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')"
    if [[ $t == direct ]]; then
        cpu="-"; cpu_pct="-"; rpc="-"
    else
        cpu="$(awk -v a="$c0" -v b="$c1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')"
        cpu_pct="$(awk -v c="$cpu" -v w="$wall" 'BEGIN {printf "%.1f", 100 * c / w}')"
        rpc="$(awk -v r="$reqs" -v c="$cpu" 'BEGIN {if (c > 0) printf "%.0f", r / c; else print "inf"}')"
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$c" "$t" "$round" "$rps" "$p50" "$p99" "$reqs" "$wall" "$cpu" "$cpu_pct" "$rpc" "$errs" "$foreign" >>"$RAW"
    log "round $round c=$c $t: ${rps} req/s, p50 ${p50} ms, p99 ${p99} ms, proxy cpu ${cpu} s (${cpu_pct}%), ${rpc} req/cpu-s, errors $errs, other load ${foreign}%"
}

# median CONNS TARGET COLUMN: median over the rounds of one column of $RAW ("-" if not numeric).
median() {
    awk -F'\t' -v c="$1" -v t="$2" -v col="$3" 'NR > 1 && $1 == c && $2 == t {print $col}' "$RAW" \
        | { grep -E '^[0-9.]+$' || true; } | sort -g \
        | awk '{a[NR] = $1} END {
            if (NR == 0) {print "-"; exit}
            if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# total CONNS TARGET COLUMN: sum over the rounds (used for error counts).
total() {
    awk -F'\t' -v c="$1" -v t="$2" -v col="$3" 'NR > 1 && $1 == c && $2 == t {s += $col} END {print s + 0}' "$RAW"
}

ratio() {  # ratio A B: A/B as "1.23x", "-" when either is missing
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2fx", a / b }'
}
fmt() {  # fmt PRINTF_FORMAT VALUE: "-" passes through
    if [[ $2 == - ]]; then echo -; else awk -v f="$1" -v v="$2" 'BEGIN {printf f, v}'; fi
}

print_load_table() {
    echo "| conns | target | req/s | p50 ms | p99 ms | proxy CPU % | req per proxy CPU-s | req/s vs nginx | req/CPU-s vs nginx | p99 vs nginx | errors | other CPU % |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local c t rps p50 p99 cpu rpc n_rps n_rpc n_p99 errs
    for c in $CONNS; do
        n_rps="$(median "$c" nginx 4)"; n_p99="$(median "$c" nginx 6)"; n_rpc="$(median "$c" nginx 11)"
        for t in "${TARGETS[@]}"; do
            rps="$(median "$c" "$t" 4)"; p50="$(median "$c" "$t" 5)"; p99="$(median "$c" "$t" 6)"
            cpu="$(median "$c" "$t" 10)"; rpc="$(median "$c" "$t" 11)"; errs="$(total "$c" "$t" 12)"
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$c" "$t" "$(fmt '%.0f' "$rps")" "$(fmt '%.3f' "$p50")" "$(fmt '%.3f' "$p99")" \
                "$(fmt '%.1f' "$cpu")" "$(fmt '%.0f' "$rpc")" \
                "$(ratio "$rps" "$n_rps")" "$(ratio "$rpc" "$n_rpc")" "$(ratio "$p99" "$n_p99")" "$errs" "$(fmt '%.1f' "$(median "$c" "$t" 13)")"
        done
    done
}

# The processes of the load phase are those registered since it began.
stop_load_phase_processes() {
    local stop=("${OURS[@]:LOAD_MARK}")
    ((${#stop[@]})) && stop_pids "${stop[@]}"
    OURS=(${OURS[@]+"${OURS[@]:0:LOAD_MARK}"})
    sleep 1
}

# ---------------------------------------------------------------------------------------------
# Phase "ws"
# ---------------------------------------------------------------------------------------------
WS_RAW="$WORK/ws.tsv"
run_ws_phase() {
    check_ports_free "$P_WS_UPSTREAM" "$P_WS_NGINX" "$P_WS_HAPROXY" "$P_WS_QSGUARD" "$P_WS_QSGUARD_ADMIN"

    start ws-upstream "$LOAD_CORE" "$WS_IDLE" server "127.0.0.1:$P_WS_UPSTREAM"
    wait_port ws-upstream "$STARTED_PID" "$P_WS_UPSTREAM"

    # Fresh proxies in front of the echo upstream.
    nginx_conf "$WORK/nginx-ws" "
    server {
        listen 127.0.0.1:$P_WS_NGINX backlog=4096;
        location / {
            proxy_pass http://127.0.0.1:$P_WS_UPSTREAM;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \"upgrade\";
            proxy_read_timeout 3600s;
        }
    }"
    local -A WS_PIDS WS_URL
    start_nginx nginx-ws "$PROXY_CORE" "$P_WS_NGINX"
    WS_PIDS[nginx]="${STARTED_PIDS[*]}"; WS_URL[nginx]="ws://127.0.0.1:$P_WS_NGINX/app/ws"
    start_haproxy haproxy-ws "$PROXY_CORE" "$P_WS_HAPROXY" "$P_WS_UPSTREAM"
    WS_PIDS[haproxy]="${STARTED_PIDS[*]}"; WS_URL[haproxy]="ws://127.0.0.1:$P_WS_HAPROXY/app/ws"
    start_qsguard qsguard-ws "$PROXY_CORE" "$P_WS_QSGUARD" "$P_WS_QSGUARD_ADMIN" "$P_WS_UPSTREAM"
    WS_PIDS[qsguard]="${STARTED_PIDS[*]}"; WS_URL[qsguard]="ws://127.0.0.1:$P_WS_QSGUARD/app/ws"

    printf 'proxy\tn\trss_before_kib\trss_after_kib\tpss_before_kib\tpss_after_kib\n' >"$WS_RAW"
    local t pids before after client i
    for t in nginx haproxy qsguard; do
        read -r -a pids <<<"${WS_PIDS[$t]}"
        # Warm-up: a few connections opened and closed, so one-time set-up is not counted.
        taskset -c "$LOAD_CORE" "$WS_IDLE" client "${WS_URL[$t]}" 16 0 >"$WORK/ws-warm-$t.log" 2>&1 \
            || { cat "$WORK/ws-warm-$t.log" >&2; die "WebSocket through $t failed"; }
        sleep 2
        before="$(mem_kib "${pids[@]}")"
        start "ws-client-$t" "$LOAD_CORE" "$WS_IDLE" client "${WS_URL[$t]}" "$WS_N" "$WS_HOLD"
        client="$STARTED_PID"
        for ((i = 0; i < 1200; i++)); do   # up to 120 s for all handshakes
            grep -qx "ready $WS_N" "$WORK/ws-client-$t.log" 2>/dev/null && break
            alive "$client" || { cat "$WORK/ws-client-$t.log" >&2; die "ws client through $t failed"; }
            sleep 0.1
        done
        grep -qx "ready $WS_N" "$WORK/ws-client-$t.log" || die "ws client through $t not ready in 120 s"
        sleep 3   # let the proxy settle (lazy frees, deferred work)
        after="$(mem_kib "${pids[@]}")"
        for p in "${pids[@]}"; do alive "$p" || die "$t died while holding the WebSockets"; done
        read -r rb pb <<<"$before"; read -r ra pa <<<"$after"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$WS_N" "$rb" "$ra" "$pb" "$pa" >>"$WS_RAW"
        log "ws $t: RSS $rb -> $ra KiB, PSS $pb -> $pa KiB for $WS_N idle WebSockets"
        # Close them (stop the client) before the next proxy.
        local entry keep=()
        for entry in "${OURS[@]}"; do
            if [[ ${entry%%:*} == "$client" ]]; then stop_pids "$entry"; else keep+=("$entry"); fi
        done
        OURS=("${keep[@]}")
        wait "$client" 2>/dev/null || true
        sleep 2
    done

    echo
    print_ws_table | tee "$WORK/ws-table.md"
    {
        echo "## Idle WebSocket memory ($WS_N idle proxied WebSockets, one echo each, then idle)"
        echo
        cat "$WORK/ws-table.md"
        echo
    } >>"$RESULTS"
}

print_ws_table() {
    echo "| proxy | idle WebSockets | RSS before KiB | RSS after KiB | KiB per idle WS (RSS) | KiB per idle WS (PSS) | RSS vs nginx | PSS vs nginx |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    local n_rss n_pss
    n_rss="$(awk -F'\t' '$1 == "nginx" {printf "%.3f", ($4 - $3) / $2}' "$WS_RAW")"
    n_pss="$(awk -F'\t' '$1 == "nginx" && $5 != "-" {printf "%.3f", ($6 - $5) / $2}' "$WS_RAW")"
    [[ -n $n_pss ]] || n_pss="-"
    local t n rb ra pb pa per_rss per_pss
    while IFS=$'\t' read -r t n rb ra pb pa; do
        [[ $t == proxy ]] && continue
        per_rss="$(awk -v a="$ra" -v b="$rb" -v n="$n" 'BEGIN {printf "%.3f", (a - b) / n}')"
        if [[ $pb == - ]]; then per_pss="-"; else
            per_pss="$(awk -v a="$pa" -v b="$pb" -v n="$n" 'BEGIN {printf "%.3f", (a - b) / n}')"
        fi
        printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$t" "$n" "$rb" "$ra" \
            "$(fmt '%.2f' "$per_rss")" "$(fmt '%.2f' "$per_pss")" \
            "$(ratio "$per_rss" "$n_rss")" "$(ratio "$per_pss" "$n_pss")"
    done <"$WS_RAW"
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
log "work dir $WORK; results to $RESULTS"
has_phase load && run_load_phase
has_phase ws && run_ws_phase
log "results written to $RESULTS"

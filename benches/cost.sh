#!/usr/bin/env bash
# qsguard cost benchmark: what one proxied request costs, in CPU instructions and in system
# calls, for qsguard next to nginx and HAProxy. Counts, not time: the numbers do not depend on
# what else runs on the machine, so they can be compared across runs and binaries (A/B).
#
#   bash benches/cost.sh                                   # every row, about 15 minutes (A/B: 22)
#   ROWS="nginx guard-browser" bash benches/cost.sh        # only some rows (quick iteration)
#   QSGUARD=/tmp/old QSGUARD_B=target/release/qsguard bash benches/cost.sh   # A/B, before/after
#   CG_OUT=/tmp/cg ROWS=guard-browser bash benches/cost.sh # keep cachegrind files (cg_annotate)
#   VG_TOOL=callgrind CG_OUT=/tmp/cg ROWS=noguard ...      # callgrind instead: who calls what
#                                                          # (callgrind_annotate --inclusive=yes)
#
# Per row (one proxy configuration), two numbers:
#
# * instructions/request: user-space instructions of the proxy process (all its threads) as
#   counted by valgrind's cachegrind (`--tool=cachegrind --cache-sim=no`), as the marginal cost.
#   The proxy is started twice under cachegrind: once it serves N1 requests, once N2, and each
#   time it is stopped cleanly so cachegrind writes its total (Ir). (Ir(N2) - Ir(N1)) / (N2 - N1)
#   cancels start-up, configuration, connection set-up and shut-down.
# * syscalls/request: the proxy is started natively, warmed up with WARM requests, then
#   `strace -f -c -p <pid>` (every thread) is attached for M requests; the summary's total
#   divided by M. (This includes the 8 connection set-ups and closes of that run: < 0.01/request.)
#
# The load: benches/cost_client.rs (built with `cargo bench --no-run --bench cost_client`),
# 8 keep-alive connections (CONNS), exactly N requests in total, every answer checked (status 200
# and the origin's exact 100-byte body, or the exact echo of a WebSocket message): a proxy that
# answers errors fails the run instead of looking cheap. The client and the origin run on core
# LOAD_CORE, the proxy alone on core PROXY_CORE. Every request carries a browser's Cookie field
# (`_ga=...; X-Qlik-Session=<live session>; qsguard=<device>`) except on the row guard-api.
#
# Rows (ROWS, default all, in this order; the ratio column compares with the nginx row of the
# same kind: plain, log, h2, ws):
#   nginx              nginx, master_process off (one process, the one under valgrind),
#                      keep-alive pool to the origin, access_log off             [plain]
#   haproxy            HAProxy -db, nbthread 1, http-reuse always, no log       [plain]
#   noguard            qsguard workers = 1, [sessions] guard = false, no request log [plain]
#   guard-browser      qsguard, guard on; the browser's session was learnt first
#                      (GET /login through qsguard, the origin sets the session cookie),
#                      so the guard takes its real hot path                      [plain]
#   guard-api          qsguard, guard on, no Cookie field at all (a new device each time) [plain]
#   guard-browser-pair guard-browser as one guard of a pair: [cluster] on a redis-server the
#                      script starts (the headline compares it with guard-browser) [plain]
#   nginx-log          nginx with its default `combined` access log to a file    [log]
#   noguard-log        qsguard guard off, [log] requests = true, stderr (text) to a file [log]
#   guard-browser-log  qsguard guard on, browser, request log to a file          [log]
#   nginx-h2           nginx, TLS + HTTP/2 (self-signed certificate), browser    [h2]
#   guard-h2           qsguard, tls_cert/tls_key (ALPN h2), guard on, browser    [h2]
#   nginx-ws           a WebSocket message relayed each way through nginx        [ws]
#   haproxy-ws         the same through HAProxy                                  [ws]
#   guard-ws           the same through qsguard (guard on, browser session, /app/engineData) [ws]
# For the ws rows one "request" is one message sent by the client and its echo.
#
# Environment knobs (defaults in brackets):
#   ROWS        rows to measure, names above                       [all]
#   N1, N2      requests served in the two cachegrind runs         [4000, 12000]
#   M           requests counted under strace                      [20000]
#   WARM        requests before strace is attached                 [2000]
#   CONNS       client connections (or WebSockets)                 [8]
#   WS_SIZE     WebSocket message size in bytes                    [100]
#   STABILITY   1: measure the plain rows a second time at the end and report how much the
#               counts moved between the two passes; 0: do not      [1]
#   QSGUARD     qsguard binary to use (A); default: `cargo build --release` of this checkout
#   QSGUARD_B   a second qsguard binary (B): every qsguard row is measured for A and for B in
#               the same run, with B-vs-A columns (A = before, B = after a change)
#   CG_OUT      keep the cachegrind output files in this directory (for cg_annotate; the
#               results file prints the command)
#   KEEP_WORK   1: keep the work directory (configs, logs, each row's strace summary) also
#               after a run that succeeded; its path is logged at the end
#   BASE_PORT   first of 48 consecutive loopback ports used        [18180]
#   LOAD_CORE / PROXY_CORE  cores for client+origin / for the proxy [0 / 1]
#   RESULTS     results file                           [benches/results/cost-<date>-<time>.md]
#   CARGO_TARGET_DIR  honoured by the cargo builds
#
# Needs valgrind, strace, nginx (with http_v2), haproxy, openssl, curl: installed with apt-get
# when missing (run as root on Debian/Ubuntu). Only 127.0.0.1 is used. Every process started
# here is stopped on exit (trap), also on failure or Ctrl-C.

set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_ROWS=(nginx haproxy noguard guard-browser guard-api guard-browser-pair
          nginx-log noguard-log guard-browser-log
          nginx-h2 guard-h2
          nginx-ws haproxy-ws guard-ws)
PLAIN_ROWS=(nginx haproxy noguard guard-browser guard-api guard-browser-pair)
ROWS="${ROWS:-${ALL_ROWS[*]}}"
N1="${N1:-4000}"
N2="${N2:-12000}"
M="${M:-20000}"
WARM="${WARM:-2000}"
CONNS="${CONNS:-8}"
WS_SIZE="${WS_SIZE:-100}"
STABILITY="${STABILITY:-1}"
BASE_PORT="${BASE_PORT:-18180}"
LOAD_CORE="${LOAD_CORE:-0}"
PROXY_CORE="${PROXY_CORE:-1}"
CG_OUT="${CG_OUT:-}"
QSGUARD_B="${QSGUARD_B:-}"
QS_BUILT=""

# qsguard's RUST_LOG would override --log-level (and so what it logs per request): not ours.
unset RUST_LOG

BENCH_DEVICE="0123456789abcdef0123456789abcdef"
BENCH_SESSION="3f2a9c1e-0d4b-4c8e-9a77-1b2c3d4e5f60"
BROWSER_COOKIE="_ga=GA1.2.123456789.1700000000; X-Qlik-Session=$BENCH_SESSION; qsguard=$BENCH_DEVICE"
# The origin's answer: exactly 100 bytes, no character nginx's `return` would interpret.
BODY_TEXT="$(printf 'qsguard-cost-origin-%080d' 0)"

P_ORIGIN=$((BASE_PORT + 0))      # static nginx origin (HTTP rows)
P_WS_ORIGIN=$((BASE_PORT + 1))   # cost_client origin: WebSocket echo (+ /login, /qps/user)
P_ADMIN=$((BASE_PORT + 2))       # qsguard's admin listener
P_REDIS=$((BASE_PORT + 3))       # redis-server, the pair's store (guard-browser-pair)
P_FIRST=$((BASE_PORT + 8))       # proxies: a fresh port per start, from here ...
P_COUNT=40                       # ... rotating over this many
NEXT_PORT=0

log() { printf '[cost.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf '[cost.sh] error: %s\n' "$*" >&2; exit 1; }

for v in N1 N2 M WARM CONNS WS_SIZE BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer"
done
((N2 > N1 && N1 > 0)) || die "need 0 < N1 < N2"
((M > 0 && CONNS > 0 && WS_SIZE >= 20)) || die "need M > 0, CONNS > 0, WS_SIZE >= 20"
read -r -a SEL_ROWS <<<"$ROWS"
for r in "${SEL_ROWS[@]}"; do
    [[ " ${ALL_ROWS[*]} " == *" $r "* ]] || die "unknown row '$r' in ROWS (rows: ${ALL_ROWS[*]})"
done
selected() { [[ " ${SEL_ROWS[*]} " == *" $1 "* ]]; }

# ---------------------------------------------------------------------------------------------
# Process bookkeeping and cleanup
# ---------------------------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/qsguard-cost.XXXXXX)"
chmod 755 "$WORK"
OURS=()            # "pid:starttime" of every process this script started
RESULTS_STARTED=0
T_START=$SECONDS

alive() {
    [[ -r /proc/$1/stat ]] || return 1
    local st
    st="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n $st && $st != Z ]]
}
# The start time (field 22 of /proc/PID/stat) tells a recycled pid from ours.
starttime() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }
register() { OURS+=("$1:$(starttime "$1")"); }
ours() {   # ours PID:START
    local pid="${1%%:*}" st="${1#*:}"
    alive "$pid" && [[ "$(starttime "$pid")" == "$st" ]]
}
forget() {  # forget PID: drop it from OURS
    local e keep=()
    for e in ${OURS[@]+"${OURS[@]}"}; do [[ ${e%%:*} == "$1" ]] || keep+=("$e"); done
    OURS=(${keep[@]+"${keep[@]}"})
}
entry_of() {
    local e
    for e in ${OURS[@]+"${OURS[@]}"}; do [[ ${e%%:*} == "$1" ]] && { echo "$e"; return 0; }; done
    return 1
}

# stop PID SIGNAL WAIT_SECONDS: signal one process of ours, wait for it to go; KILL after the wait.
# Returns 1 if it had to be killed.
stop() {
    local pid="$1" sig="$2" secs="$3" e i
    e="$(entry_of "$pid")" || return 0
    ours "$e" && kill "-$sig" "$pid" 2>/dev/null
    for ((i = 0; i < secs * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    local killed=0
    if ours "$e"; then kill -KILL "$pid" 2>/dev/null; killed=1; fi
    wait "$pid" 2>/dev/null || true
    forget "$pid"
    return $((killed))
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if ((${#OURS[@]})); then
        log "stopping ${#OURS[@]} process(es) started by this script"
        local i e
        for ((i = ${#OURS[@]} - 1; i >= 0; i--)); do
            e="${OURS[i]}"
            ours "$e" && kill -TERM "${e%%:*}" 2>/dev/null
        done
        for ((i = 0; i < 50; i++)); do
            local any=0
            for e in "${OURS[@]}"; do ours "$e" && any=1; done
            ((any)) || break
            sleep 0.1
        done
        for e in "${OURS[@]}"; do ours "$e" && kill -KILL "${e%%:*}" 2>/dev/null; done
    fi
    wait 2>/dev/null
    if ((rc != 0 && RESULTS_STARTED)); then
        printf '\n**This run failed (exit %s): the tables above, if any, are incomplete.**\n' "$rc" >>"$RESULTS"
    fi
    if ((rc != 0)) || [[ -n ${KEEP_WORK:-} ]]; then log "logs and configs kept in $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
install_tools() {
    local need=()
    command -v valgrind >/dev/null || need+=(valgrind)
    command -v strace >/dev/null || need+=(strace)
    command -v nginx >/dev/null || need+=(nginx)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v openssl >/dev/null || need+=(openssl)
    command -v curl >/dev/null || need+=(curl)
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || need+=(redis-server)
    command -v taskset >/dev/null || need+=(util-linux)
    if command -v nginx >/dev/null && [[ "$(nginx -V 2>&1)" != *--with-http_v2_module* ]]; then
        need+=(nginx-full)   # Debian's nginx flavour with http_v2
    fi
    if ((${#need[@]})); then
        log "installing: ${need[*]}"
        command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
        apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
            || die "apt-get install ${need[*]} failed"
    fi
    local t
    for t in valgrind strace nginx haproxy openssl curl taskset cg_diff redis-server; do
        command -v "$t" >/dev/null || die "'$t' is still missing after installing; install it by hand"
    done
    [[ "$(nginx -V 2>&1)" == *--with-http_v2_module* ]] || die "this nginx has no http_v2 module"
}
install_tools
NCPU="$(nproc)"
((NCPU > PROXY_CORE && NCPU > LOAD_CORE)) || die "need cores $LOAD_CORE and $PROXY_CORE; this machine has $NCPU"

# ---------------------------------------------------------------------------------------------
# Binaries: qsguard (A, and B if given) and the client
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
    QS_BUILT=1
fi
QSGUARD="$(readlink -f "$QSGUARD")"
if [[ -n $QSGUARD_B ]]; then
    [[ -x $QSGUARD_B ]] || die "QSGUARD_B=$QSGUARD_B is not an executable"
    QSGUARD_B="$(readlink -f "$QSGUARD_B")"
fi
# Copies, so that a build running meanwhile (same target dir) cannot swap a binary mid-run.
cp "$QSGUARD" "$WORK/qsguard-A"; BIN_A="$WORK/qsguard-A"
BIN_B=""
if [[ -n $QSGUARD_B ]]; then cp "$QSGUARD_B" "$WORK/qsguard-B"; BIN_B="$WORK/qsguard-B"; fi

command -v cargo >/dev/null || die "cargo not found (needed to build benches/cost_client.rs)"
log "building the load client (cargo bench --no-run --bench cost_client)"
CLIENT="$(cd "$REPO" && cargo bench --no-run --bench cost_client --message-format=json 2>"$WORK/client-build.log" \
    | grep -o '"executable":"[^"]*cost_client[^"]*"' | tail -n1 | sed 's/^"executable":"//; s/"$//')" || true
if [[ -z $CLIENT || ! -x $CLIENT ]]; then
    CLIENT=""
    for f in "$TARGET_DIR"/release/deps/cost_client-*; do
        [[ -f $f && -x $f && $f != *.d ]] || continue
        [[ -z $CLIENT || $f -nt $CLIENT ]] && CLIENT="$f"
    done
fi
[[ -n $CLIENT && -x $CLIENT ]] || { cat "$WORK/client-build.log" >&2; die "could not build benches/cost_client.rs"; }
cp "$CLIENT" "$WORK/cost_client"; CLIENT="$WORK/cost_client"

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for ((p = BASE_PORT; p < P_FIRST + P_COUNT; p++)); do
    port_open "$p" && die "port 127.0.0.1:$p is already in use (set BASE_PORT to move all $((P_FIRST + P_COUNT - BASE_PORT)) ports)"
done

next_port() {  # sets PORT: the next proxy port, checked free
    local i
    for ((i = 0; i < P_COUNT; i++)); do
        PORT=$((P_FIRST + NEXT_PORT)); NEXT_PORT=$(((NEXT_PORT + 1) % P_COUNT))
        port_open "$PORT" || return 0
    done
    die "no free port in $P_FIRST..$((P_FIRST + P_COUNT - 1))"
}

# start NAME CORE CMD...: CMD pinned to CORE, stdout to $WORK/NAME.out, stderr to NAME.err.
# Sets STARTED_PID (taskset execs CMD: the pid is CMD's own).
start() {
    local name="$1" core="$2"; shift 2
    taskset -c "$core" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    STARTED_PID=$!
    register "$STARTED_PID"
}

wait_port() {  # wait_port NAME PID PORT: up to 60 s (valgrind starts slowly)
    local name="$1" pid="$2" port="$3" i
    for ((i = 0; i < 600; i++)); do
        alive "$pid" || { tail -n 30 "$WORK/$name".{err,out} "$WORK/$name.vg" 2>/dev/null >&2; die "$name exited at start (log above)"; }
        port_open "$port" && return 0
        sleep 0.1
    done
    die "$name did not accept on 127.0.0.1:$port within 60 s"
}

ratio() {  # A/B as "1.23x"; "-" when either is missing
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2fx", a / b }'
}
pct() {    # (B-A)/A as "+1.2%"
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "-" || b == "-" || a + 0 == 0) print "-"; else printf "%+.1f%%", 100 * (b - a) / a }'
}

# ---------------------------------------------------------------------------------------------
# Fixed material: body, certificate, the origins
# ---------------------------------------------------------------------------------------------
printf '%s' "$BODY_TEXT" >"$WORK/body"
[[ $(wc -c <"$WORK/body") == 100 ]] || die "the origin body is not 100 bytes"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>"$WORK/openssl.log" \
    || { cat "$WORK/openssl.log" >&2; die "openssl could not make the certificate"; }

NGINX_VERSION="$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')"
nginx_at_least() { printf '%s\n%s\n' "$1" "$NGINX_VERSION" | sort -V -C; }

# nginx_conf DIR BODY: a self-contained single-process nginx (master_process off, daemon off).
nginx_conf() {
    local dir="$1" body="$2"
    mkdir -p "$dir"/{client_body,proxy,fastcgi,uwsgi,scgi}
    cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    # Never close a keep-alive connection during a run (nginx's default is 1000 requests).
    keepalive_requests 1000000;
    keepalive_timeout 300s;
$body
}
EOF
}

# The HTTP origin: nginx on the load core; 200 + the 100-byte body; /login sets the session
# cookie; /qps/user is a Personal API answer, so the guard learns the session's owner.
nginx_conf "$WORK/origin" "
    server {
        listen 127.0.0.1:$P_ORIGIN backlog=4096;
        location / { default_type text/plain; return 200 \"$BODY_TEXT\"; }
        location = /login {
            default_type text/plain;
            add_header Set-Cookie \"X-Qlik-Session=$BENCH_SESSION; Path=/; HttpOnly; SameSite=Lax\";
            return 200 \"$BODY_TEXT\";
        }
        location = /qps/user {
            default_type application/json;
            return 200 '{\"userDirectory\":\"BENCH\",\"userId\":\"alice\",\"session\":\"active\"}';
        }
    }"
nginx -t -q -p "$WORK/origin" -e "$WORK/origin/error.log" -c "$WORK/origin/nginx.conf" \
    || die "the origin's nginx config is invalid"
start origin "$LOAD_CORE" nginx -p "$WORK/origin" -e "$WORK/origin/error.log" -c "$WORK/origin/nginx.conf"
wait_port origin "$STARTED_PID" "$P_ORIGIN"
[[ "$(curl -s --max-time 5 "http://127.0.0.1:$P_ORIGIN/")" == "$BODY_TEXT" ]] || die "the origin does not answer its body"

# The WebSocket rows' origin: echo, plus /login and /qps/user like the HTTP origin.
# The pair's store, only when a pair row runs (in memory, nothing written to disk).
if [[ " ${SEL_ROWS[*]} " == *-pair\ * ]]; then
    start redis "$LOAD_CORE" redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no
    wait_port redis "$STARTED_PID" "$P_REDIS"
fi
start ws-origin "$LOAD_CORE" "$CLIENT" origin "127.0.0.1:$P_WS_ORIGIN" --body-file "$WORK/body" --session "$BENCH_SESSION"
wait_port ws-origin "$STARTED_PID" "$P_WS_ORIGIN"

# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
# row_spec ROW: sets R_PROXY (nginx|haproxy|qsguard), R_KIND (plain|log|h2|ws), R_PROTO
# (h1|h2|ws), R_GUARD, R_LOG (0|1), R_COOKIE (the Cookie value or ""), R_LOGIN (0|1), R_WHAT.
row_spec() {
    R_GUARD=true; R_LOG=0; R_COOKIE="$BROWSER_COOKIE"; R_LOGIN=0; R_PROTO=h1; R_KIND=plain; R_CLUSTER=0
    case "$1" in
        nginx) R_PROXY=nginx; R_WHAT="nginx, 1 process, keep-alive pool, no access log" ;;
        haproxy) R_PROXY=haproxy; R_WHAT="HAProxy, nbthread 1, http-reuse always, no log" ;;
        noguard) R_PROXY=qsguard; R_GUARD=false; R_WHAT="qsguard, guard off, no request log" ;;
        guard-browser) R_PROXY=qsguard; R_LOGIN=1; R_WHAT="qsguard, guard on, browser (live session + device cookie)" ;;
        guard-api) R_PROXY=qsguard; R_COOKIE=""; R_WHAT="qsguard, guard on, cookie-less API client" ;;
        guard-browser-pair) R_PROXY=qsguard; R_LOGIN=1; R_CLUSTER=1; R_WHAT="qsguard, guard on, browser, one guard of a pair ([cluster] on a local redis-server)" ;;
        nginx-log) R_PROXY=nginx; R_LOG=1; R_KIND=log; R_WHAT="nginx, access log (combined) to a file" ;;
        noguard-log) R_PROXY=qsguard; R_GUARD=false; R_LOG=1; R_KIND=log; R_WHAT="qsguard, guard off, request log to a file" ;;
        guard-browser-log) R_PROXY=qsguard; R_LOGIN=1; R_LOG=1; R_KIND=log; R_WHAT="qsguard, guard on, browser, request log to a file" ;;
        nginx-h2) R_PROXY=nginx; R_PROTO=h2; R_KIND=h2; R_WHAT="nginx, HTTP/2 over TLS" ;;
        guard-h2) R_PROXY=qsguard; R_PROTO=h2; R_KIND=h2; R_LOGIN=1; R_WHAT="qsguard, HTTP/2 over TLS, guard on, browser" ;;
        nginx-ws) R_PROXY=nginx; R_PROTO=ws; R_KIND=ws; R_WHAT="nginx, WebSocket message each way" ;;
        haproxy-ws) R_PROXY=haproxy; R_PROTO=ws; R_KIND=ws; R_WHAT="HAProxy, WebSocket message each way" ;;
        guard-ws) R_PROXY=qsguard; R_PROTO=ws; R_KIND=ws; R_LOGIN=1; R_WHAT="qsguard, WebSocket message each way, guard on, browser" ;;
        *) die "unknown row $1" ;;
    esac
    R_UP=$P_ORIGIN
    [[ $R_PROTO == ws ]] && R_UP=$P_WS_ORIGIN
    return 0
}
nginx_row_of() { case "$1" in plain) echo nginx ;; log) echo nginx-log ;; h2) echo nginx-h2 ;; ws) echo nginx-ws ;; esac; }

# config NAME ROW PORT: writes the proxy's config for the row; sets CFG (file or nginx dir).
config() {
    local name="$1" row="$2" port="$3"
    row_spec "$row"
    case "$R_PROXY" in
    nginx)
        local listen="listen 127.0.0.1:$port backlog=4096;" tls="" alog="" loc
        if [[ $R_PROTO == h2 ]]; then
            if nginx_at_least 1.25.1; then
                listen="listen 127.0.0.1:$port ssl backlog=4096; http2 on;"
            else
                listen="listen 127.0.0.1:$port ssl http2 backlog=4096;"
            fi
            # TLS 1.3 as qsguard (nginx < 1.23.4 leaves it out by default): the same cipher.
            tls="ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem; ssl_protocols TLSv1.2 TLSv1.3;"
        fi
        ((R_LOG)) && alog="access_log $WORK/$name/access.log;"   # the default format: combined
        if [[ $R_PROTO == ws ]]; then
            loc="location / {
                proxy_pass http://127.0.0.1:$R_UP;
                proxy_http_version 1.1;
                proxy_set_header Upgrade \$http_upgrade;
                proxy_set_header Connection \"upgrade\";
                proxy_read_timeout 3600s;
            }"
        else
            loc="location / {
                proxy_pass http://up;
                proxy_http_version 1.1;
                proxy_set_header Connection \"\";
            }"
        fi
        nginx_conf "$WORK/$name" "
    upstream up {
        server 127.0.0.1:$R_UP;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        $listen
        $tls
        $alog
        $loc
    }"
        nginx -t -q -p "$WORK/$name" -e "$WORK/$name/error.log" -c "$WORK/$name/nginx.conf" \
            || { cat "$WORK/$name/error.log" >&2; die "nginx config for $name is invalid"; }
        CFG="$WORK/$name"
        ;;
    haproxy)
        CFG="$WORK/$name.cfg"
        cat >"$CFG" <<EOF
global
    nbthread 1
    maxconn 4000
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
    bind 127.0.0.1:$port
    default_backend be

backend be
    server up1 127.0.0.1:$R_UP
EOF
        haproxy -c -q -f "$CFG" || die "haproxy config for $name is invalid"
        ;;
    qsguard)
        CFG="$WORK/$name.toml"
        {
            echo "[server]"
            echo "listen = \"127.0.0.1:$port\""
            echo "workers = 1"
            if [[ $R_PROTO == h2 ]]; then
                echo "tls_cert = \"$WORK/cert.pem\""
                echo "tls_key = \"$WORK/key.pem\""
            fi
            echo "[admin]"
            echo "listen = \"127.0.0.1:$P_ADMIN\""
            echo "[[upstream]]"
            echo "url = \"http://127.0.0.1:$R_UP\""
            echo "# Health checks are idle work, not per-request work: out of the way."
            echo "[health]"
            echo "interval = \"1h\""
            echo "[log]"
            echo "requests = $( ((R_LOG)) && echo true || echo false)"
            echo "[sessions]"
            echo "guard = $R_GUARD"
            if ((R_CLUSTER)); then
                echo "[cluster]"
                echo "redis_url = \"redis://127.0.0.1:$P_REDIS/0\""
                echo "name = \"cost-$name\""
                # Each start its own keys: no row inherits another's sessions.
                echo "key_prefix = \"qsguard:cost:$name:\""
            fi
        } >"$CFG"
        ;;
    esac
}

# launch NAME ROW BIN PORT [CGFILE]: starts the row's proxy on PROXY_CORE, natively or under
# cachegrind; sets PROXY_PID.
launch() {
    local name="$1" row="$2" bin="$3" port="$4" cg="${5:-}" pre=()
    config "$name" "$row" "$port"
    if [[ $R_PROXY == qsguard ]]; then
        "$bin" check-config "$CFG" >"$WORK/$name.check" 2>&1 \
            || { cat "$WORK/$name.check" >&2; die "qsguard check-config $CFG failed"; }
    fi
    if [[ -n $cg ]]; then
        if [[ ${VG_TOOL:-cachegrind} == callgrind ]]; then
            pre=(valgrind --tool=callgrind ${VG_OPTS:-} --callgrind-out-file="$cg" --log-file="$WORK/$name.vg")
        else
            pre=(valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file="$cg" --log-file="$WORK/$name.vg")
        fi
    fi
    case "$R_PROXY" in
        nginx) start "$name" "$PROXY_CORE" ${pre[@]+"${pre[@]}"} nginx -p "$CFG" -e "$CFG/error.log" -c "$CFG/nginx.conf" ;;
        haproxy) start "$name" "$PROXY_CORE" ${pre[@]+"${pre[@]}"} haproxy -db -f "$CFG" ;;
        qsguard)
            # The request log (info level) is written to stderr, redirected to $WORK/NAME.err.
            local level=warn
            ((R_LOG)) && level=info
            start "$name" "$PROXY_CORE" ${pre[@]+"${pre[@]}"} "$bin" --config "$CFG" --log-level "$level" ;;
    esac
    PROXY_PID=$STARTED_PID
    wait_port "$name" "$PROXY_PID" "$port"
}

# prepare NAME PORT: what every run of a row does before its load: the browser's login through
# qsguard (the guard learns the session and, from /qps/user, its owner), then one checked GET.
prepare() {
    local name="$1" port="$2" scheme=http curlopt=() code i
    if [[ $R_PROTO == h2 ]]; then scheme=https; curlopt=(-k --http2); fi
    RUN_COOKIE="$R_COOKIE"
    if ((R_LOGIN)); then
        code="$(curl -s ${curlopt[@]+"${curlopt[@]}"} --max-time 30 -o /dev/null -w '%{http_code}' \
            -D "$WORK/login.head" -H "Cookie: qsguard=$BENCH_DEVICE" "$scheme://127.0.0.1:$port/login")" || true
        [[ $code == 200 ]] || die "$name: the login through qsguard answered ${code:-nothing}"
        # The guard signs the device cookie it issues with the login's new session (an id the
        # browser chose is never trusted): the browser sends that one from now on.
        local device
        device="$(grep -i '^set-cookie: qsguard=' "$WORK/login.head" | head -n1 | sed -E 's/^[^=]*=([^;[:space:]]*).*/\1/')"
        [[ -n $device ]] || die "$name: the login through qsguard set no device cookie"
        RUN_COOKIE="${R_COOKIE//qsguard=$BENCH_DEVICE/qsguard=$device}"
        # Until the guard knows the owner (learnt off the hot path from /qps/user).
        local sessions=""
        for ((i = 0; i < 100; i++)); do
            sessions="$(curl -s --max-time 5 "http://127.0.0.1:$P_ADMIN/sessions" 2>/dev/null)" || true
            [[ $sessions == *alice* ]] && break
            sleep 0.2
        done
        [[ $sessions == *alice* ]] \
            || die "$name: the guard did not learn the session's owner (admin /sessions: ${sessions:0:300})"
        # One of a pair: the session is in the store (else the row measures a guard whose
        # store is down, which decides alone).
        if ((R_CLUSTER)); then
            local ready=""
            for ((i = 0; i < 50; i++)); do
                ready="$(curl -s --max-time 5 "http://127.0.0.1:$P_ADMIN/readyz" 2>/dev/null)" || true
                [[ $ready == *'"degraded":false'* && -n "$(redis-cli -p "$P_REDIS" --scan --pattern "qsguard:cost:$name:s:*")" ]] && break
                sleep 0.2
            done
            [[ $ready == *'"degraded":false'* ]] || die "$name: the guard's store is not ok (/readyz: ${ready:0:300})"
            [[ -n "$(redis-cli -p "$P_REDIS" --scan --pattern "qsguard:cost:$name:s:*")" ]] \
                || die "$name: the guard did not write the browser's session to the store"
        fi
    fi
    local hdr=()
    [[ -n $RUN_COOKIE ]] && hdr=(-H "Cookie: $RUN_COOKIE")
    curl -s ${curlopt[@]+"${curlopt[@]}"} --max-time 30 -D "$WORK/check.head" -o "$WORK/check.body" \
        ${hdr[@]+"${hdr[@]}"} "$scheme://127.0.0.1:$port/" || die "$name: the check GET failed"
    head -n1 "$WORK/check.head" | grep -q ' 200' || die "$name: the check GET answered $(head -n1 "$WORK/check.head")"
    cmp -s "$WORK/check.body" "$WORK/body" || die "$name: the check GET's body is not the origin's"
    # A browser on its hot path gets no cookie back; a cookie-less client gets a device cookie.
    if [[ $R_PROXY == qsguard && $R_GUARD == true && -z $RUN_COOKIE ]]; then
        grep -qi '^set-cookie: qsguard=' "$WORK/check.head" || die "$name: no device cookie for a cookie-less client"
    elif grep -qi '^set-cookie:' "$WORK/check.head"; then
        die "$name: the browser's request got a Set-Cookie (the guard is not on its hot path): $(grep -i '^set-cookie:' "$WORK/check.head")"
    fi
}

# load NAME PORT N: the client's N requests (or messages) against the proxy; fails the run on
# any wrong answer.
load() {
    local name="$1" port="$2" n="$3" args=()
    case "$R_PROTO" in
        h1) args=(h1 "127.0.0.1:$port" "$n" --body-file "$WORK/body") ;;
        h2) args=(h2 "127.0.0.1:$port" "$n" --body-file "$WORK/body") ;;
        ws) args=(ws "ws://127.0.0.1:$port/app/engineData" "$n" --size "$WS_SIZE") ;;
    esac
    [[ -n $RUN_COOKIE ]] && args+=(--cookie "$RUN_COOKIE")
    taskset -c "$LOAD_CORE" "$CLIENT" "${args[@]}" --conns "$CONNS" >"$WORK/$name.client" 2>&1 \
        || { cat "$WORK/$name.client" >&2; die "$name: the load client failed (above)"; }
    grep -q '^ok ' "$WORK/$name.client" || die "$name: the load client did not report ok"
    CLIENT_LINE="$(grep '^ok ' "$WORK/$name.client")"
}

# check_log NAME N: with a request log, at least N lines were written.
check_log() {
    local name="$1" n="$2" lines
    ((R_LOG)) || return 0
    if [[ $R_PROXY == nginx ]]; then
        lines="$(wc -l <"$WORK/$name/access.log")"
    else
        lines="$(grep -c 'qsguard::access' "$WORK/$name.err" || true)"
    fi
    ((lines >= n)) || die "$name: $lines request log lines for $n requests"
}

RAW="$WORK/raw.tsv"   # row label pass ir1 ir2 instr_per_req sc_total sc_per_req
: >"$RAW"

# measure ROW LABEL(A|B) PASS: one row, one binary: two cachegrind runs and one strace run.
measure() {
    local row="$1" label="$2" pass="$3" bin="$BIN_A" n ir=() cg name tag
    [[ $label == B ]] && bin="$BIN_B"
    tag="$row-$label-$pass"
    row_spec "$row"
    for n in "$N1" "$N2"; do
        name="cg-$tag-$n"
        cg="$WORK/cachegrind.out.$row.$label.$pass.$n"
        next_port
        launch "$name" "$row" "$bin" "$PORT" "$cg"
        prepare "$name" "$PORT"
        load "$name" "$PORT" "$n"
        stop "$PROXY_PID" TERM 120 || die "$name did not exit within 120 s of SIGTERM (killed: no cachegrind total)"
        check_log "$name" "$n"
        [[ -s $cg ]] || { tail -n 20 "$WORK/$name.vg" >&2; die "$name: cachegrind wrote no output"; }
        ir+=("$(awk '/^summary:/ {print $2}' "$cg")")
        [[ -n ${ir[-1]} ]] || die "$name: no summary line in $cg"
        if [[ -n $CG_OUT ]]; then mkdir -p "$CG_OUT"; cp "$cg" "$CG_OUT/"; fi
    done
    local ipr
    ipr="$(awk -v a="${ir[0]}" -v b="${ir[1]}" -v n1="$N1" -v n2="$N2" 'BEGIN {printf "%.0f", (b - a) / (n2 - n1)}')"

    # strace: native, warmed up, then M requests with strace attached to every thread.
    name="st-$tag"
    next_port
    launch "$name" "$row" "$bin" "$PORT"
    prepare "$name" "$PORT"
    load "$name-warm" "$PORT" "$WARM"
    local st="$WORK/strace.$tag.txt" spid i
    taskset -c "$LOAD_CORE" strace -f -c -U calls,errors,name -o "$st" -p "$PROXY_PID" 2>"$WORK/$name.strace.err" &
    spid=$!; register "$spid"
    for ((i = 0; i < 100; i++)); do
        grep -q 'attached' "$WORK/$name.strace.err" 2>/dev/null && break
        alive "$spid" || { cat "$WORK/$name.strace.err" >&2; die "strace could not attach to $name"; }
        sleep 0.1
    done
    grep -q 'attached' "$WORK/$name.strace.err" || die "strace did not attach to $name within 10 s"
    sleep 0.5   # every thread attached
    load "$name" "$PORT" "$M"
    printf -- '- %s%s: %s\n' "$row" "${BIN_B:+ ($label, pass $pass)}" "$CLIENT_LINE" >>"$WORK/client-lines.md"
    stop "$spid" INT 30 || die "strace did not stop on SIGINT"
    stop "$PROXY_PID" TERM 30 || true
    check_log "$name" "$M"
    local total
    total="$(awk '$NF == "total" {print $1}' "$st")"
    [[ $total =~ ^[0-9]+$ ]] || { cat "$st" >&2; die "$name: cannot read strace's summary"; }
    local spr
    spr="$(awk -v t="$total" -v m="$M" 'BEGIN {printf "%.2f", t / m}')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$label" "$pass" "${ir[0]}" "${ir[1]}" "$ipr" "$total" "$spr" >>"$RAW"
    log "$row [$label, pass $pass]: $ipr instructions/request (Ir $N1: ${ir[0]}, $N2: ${ir[1]}); $spr syscalls/request ($total for $M)"
}

# ---------------------------------------------------------------------------------------------
# Results file header
# ---------------------------------------------------------------------------------------------
mkdir -p "$REPO/benches/results"
RESULTS="${RESULTS:-$REPO/benches/results/cost-$(date +%Y-%m-%d-%H%M).md}"
QS_REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[[ -n "$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]] && QS_REV="$QS_REV+uncommitted changes"
# The checkout's commit describes A only when A was built here (no QSGUARD given).
A_ORIGIN="given with QSGUARD"; [[ -n $QS_BUILT ]] && A_ORIGIN="built from checkout $QS_REV"
first_line() { { "$@" 2>&1 || true; } | head -n1; }
{
    echo "# qsguard cost benchmark — $(date '+%Y-%m-%d %H:%M %Z')"
    echo
    echo "- machine: $NCPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r)"
    echo "- qsguard A: \`$QSGUARD\` (sha256 $(sha256sum "$BIN_A" | cut -c1-12); $A_ORIGIN)"
    [[ -n $BIN_B ]] && echo "- qsguard B: \`$QSGUARD_B\` (sha256 $(sha256sum "$BIN_B" | cut -c1-12))"
    echo "- $(first_line nginx -v); $(first_line haproxy -v); $(first_line valgrind --version); $(first_line strace -V)"
    echo "- client + origin on core $LOAD_CORE, the proxy on core $PROXY_CORE; $CONNS keep-alive connections; body 100 bytes; WebSocket messages $WS_SIZE bytes"
    echo "- instructions/request = (Ir($N2) - Ir($N1)) / $((N2 - N1)) (cachegrind, user space, all threads); syscalls/request = strace -f -c total over $M requests after $WARM warm-up"
    echo "- ROWS=\"$ROWS\" STABILITY=$STABILITY; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
} >"$RESULTS"
RESULTS_STARTED=1

# ---------------------------------------------------------------------------------------------
# Measure
# ---------------------------------------------------------------------------------------------
log "work dir $WORK; results to $RESULTS"
labels_for() {  # labels_for ROW: A, plus B for qsguard rows in an A/B run
    row_spec "$1"
    if [[ -n $BIN_B && $R_PROXY == qsguard ]]; then echo "A B"; else echo "A"; fi
}
for row in "${SEL_ROWS[@]}"; do
    for label in $(labels_for "$row"); do measure "$row" "$label" 1; done
done
if ((STABILITY)); then
    for row in "${PLAIN_ROWS[@]}"; do
        selected "$row" || continue
        for label in $(labels_for "$row"); do measure "$row" "$label" 2; done
    done
fi

# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
get() {  # get ROW LABEL PASS COLUMN(6=instr/req, 8=syscalls/req, 4=ir1, 5=ir2, 7=sc total)
    awk -F'\t' -v r="$1" -v l="$2" -v p="$3" -v c="$4" '$1 == r && $2 == l && $3 == p {print $c; exit}' "$RAW"
}
vs_nginx() {  # vs_nginx ROW LABEL COLUMN: the ratio to the nginx row of the same kind
    row_spec "$1"
    local base; base="$(nginx_row_of "$R_KIND")"
    ratio "$(get "$1" "$2" 1 "$3")" "$(get "$base" A 1 "$3")"
}

print_table() {
    if [[ -z $BIN_B ]]; then
        echo "| row | what | instructions/request | vs nginx | syscalls/request | vs nginx |"
        echo "|---|---|---:|---:|---:|---:|"
        for row in "${SEL_ROWS[@]}"; do
            row_spec "$row"
            printf '| %s | %s | %s | %s | %s | %s |\n' "$row" "$R_WHAT" \
                "$(get "$row" A 1 6)" "$(vs_nginx "$row" A 6)" "$(get "$row" A 1 8)" "$(vs_nginx "$row" A 8)"
        done
    else
        echo "| row | what | instr/req A | instr/req B | B vs A | A vs nginx | B vs nginx | syscalls/req A | syscalls/req B | B vs A | A vs nginx | B vs nginx |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for row in "${SEL_ROWS[@]}"; do
            row_spec "$row"
            local ia ib sa sb
            ia="$(get "$row" A 1 6)"; sa="$(get "$row" A 1 8)"
            if [[ $R_PROXY == qsguard ]]; then
                ib="$(get "$row" B 1 6)"; sb="$(get "$row" B 1 8)"
                printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$row" "$R_WHAT" \
                    "$ia" "$ib" "$(pct "$ia" "$ib")" "$(vs_nginx "$row" A 6)" "$(vs_nginx "$row" B 6)" \
                    "$sa" "$sb" "$(pct "$sa" "$sb")" "$(vs_nginx "$row" A 8)" "$(vs_nginx "$row" B 8)"
            else
                printf '| %s | %s | %s | - | - | %s | - | %s | - | - | %s | - |\n' "$row" "$R_WHAT" \
                    "$ia" "$(vs_nginx "$row" A 6)" "$sa" "$(vs_nginx "$row" A 8)"
            fi
        done
    fi
    echo
    echo "(ws rows: per WebSocket message relayed each way. \"vs nginx\": the nginx row of the same kind — plain: nginx, log: nginx-log, h2: nginx-h2, ws: nginx-ws.)"
}

headline() {
    local label="$1" out="" pair row what
    for pair in "guard-browser:guard on, browser vs nginx" "guard-api:cookie-less vs nginx" \
                "noguard:guard off vs nginx" "guard-browser-log:access log, browser vs nginx + log" \
                "guard-h2:h2 vs nginx h2" "guard-ws:ws vs nginx ws"; do
        row="${pair%%:*}"; what="${pair#*:}"
        [[ -n "$(get "$row" "$label" 1 6)" ]] || continue
        # Without its nginx row in ROWS there is no ratio to give.
        [[ $(vs_nginx "$row" "$label" 6) != - ]] || continue
        out+="${out:+; }$what $(vs_nginx "$row" "$label" 6) instructions, $(vs_nginx "$row" "$label" 8) syscalls"
    done
    # The pair's browser path against the single guard's (issue 14: within 10%).
    local single paired
    single="$(get guard-browser "$label" 1 6)"; paired="$(get guard-browser-pair "$label" 1 6)"
    if [[ -n $single && -n $paired ]]; then
        out+="${out:+; }one of a pair vs a single guard, browser $(awk -v a="$single" -v b="$paired" 'BEGIN { printf "%.2fx", b / a }') instructions"
    fi
    if [[ -n $out ]]; then
        echo "**Headline${BIN_B:+ ($label)}** (qsguard per request, instructions and syscalls, vs nginx): $out."
    fi
}

print_stability() {
    echo "| row | bin | instr/req pass 1 | pass 2 | moved | syscalls/req pass 1 | pass 2 | moved |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    local row label
    for row in "${PLAIN_ROWS[@]}"; do
        selected "$row" || continue
        for label in $(labels_for "$row"); do
            local i1 i2 s1 s2
            i1="$(get "$row" "$label" 1 6)"; i2="$(get "$row" "$label" 2 6)"
            s1="$(get "$row" "$label" 1 8)"; s2="$(get "$row" "$label" 2 8)"
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$row" "$label" "$i1" "$i2" "$(pct "$i1" "$i2")" \
                "$s1" "$s2" "$(pct "$s1" "$s2")"
        done
    done
}

# Per-syscall counts per request of each row (first pass), from the strace summaries.
print_syscalls() {
    local row label st
    for row in "${SEL_ROWS[@]}"; do
        for label in $(labels_for "$row"); do
            st="$WORK/strace.$row-$label-1.txt"
            [[ -f $st ]] || continue
            printf -- '- %s%s: %s\n' "$row" "${BIN_B:+ ($label)}" "$(awk -v m="$M" '
                $NF != "total" && $NF != "syscall" && $1 ~ /^[0-9]+$/ {
                    printf "%s%s %.2f", sep, $NF, $1 / m; sep = ", " }' "$st")"
        done
    done
}

TABLE="$(print_table)"
HEAD_A="$(headline A)"
HEAD_B=""; [[ -n $BIN_B ]] && HEAD_B="$(headline B)"
STAB=""
if ((STABILITY)) && [[ -n "$(awk -F'\t' '$3 == 2' "$RAW")" ]]; then STAB="$(print_stability)"; fi
ELAPSED=$((SECONDS - T_START))

CG_CMD=""
if [[ -n $CG_OUT ]]; then
    CG_OUT="$(readlink -f "$CG_OUT")"
    cg_row=guard-browser
    selected guard-browser || cg_row="${SEL_ROWS[0]}"
    CG_CMD="cg_diff $CG_OUT/cachegrind.out.$cg_row.A.1.$N1 $CG_OUT/cachegrind.out.$cg_row.A.1.$N2 > /tmp/$cg_row.cgdiff && cg_annotate --auto=no /tmp/$cg_row.cgdiff | head -n 60"
fi

{
    echo
    echo "$TABLE"
    echo
    echo "$HEAD_A"
    [[ -n $HEAD_B ]] && { echo; echo "$HEAD_B"; }
    if [[ -n $STAB ]]; then
        echo
        echo "Stability: the plain rows measured twice in this run."
        echo
        echo "$STAB"
    fi
    echo
    echo "Run took ${ELAPSED}s."
}

{
    echo "## Cost per request"
    echo
    echo "$TABLE"
    echo
    echo "$HEAD_A"
    [[ -n $HEAD_B ]] && { echo; echo "$HEAD_B"; }
    echo
    if [[ -n $STAB ]]; then
        echo "## Stability (the plain rows, measured twice in this run)"
        echo
        echo "$STAB"
        echo
    fi
    echo "## Syscalls per request, by name (strace -c, pass 1)"
    echo
    print_syscalls
    echo
    echo "## Client (the strace run of each row)"
    echo
    cat "$WORK/client-lines.md" 2>/dev/null || true
    echo
    echo "## Raw counts"
    echo
    echo "| row | bin | pass | Ir($N1) | Ir($N2) | instr/req | strace total for $M | syscalls/req |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8}' "$RAW"
    echo
    echo "<details><summary>strace summaries</summary>"
    echo
    for f in "$WORK"/strace.*.txt; do
        [[ -f $f ]] || continue
        echo "$(basename "$f" .txt | sed 's/^strace\.//'):"
        echo '```'
        cat "$f"
        echo '```'
    done
    echo
    echo "</details>"
    echo
    if [[ -n $CG_CMD ]]; then
        echo "Cachegrind files kept in \`$CG_OUT\` (cachegrind.out.ROW.BIN.PASS.N). Where the marginal"
        echo "instructions of $((N2 - N1)) requests go, per function:"
        echo
        echo '```'
        echo "$CG_CMD"
        echo '```'
        echo
    fi
    echo "Run took ${ELAPSED}s (N1=$N1 N2=$N2 M=$M WARM=$WARM CONNS=$CONNS)."
} >>"$RESULTS"

[[ -n $CG_CMD ]] && log "per-function marginal cost: $CG_CMD"
log "results written to $RESULTS (${ELAPSED}s)"

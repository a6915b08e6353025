#!/usr/bin/env bash
# The side-by-side run of RELIABILITY.md's "Attacks" table: the rapid reset, slowloris
# (head, body, ClientHello) and the header bombs against `lobe-tls serve`, HAProxy and
# nginx, each on loopback in front of the same backend, with defaults tuned as usual.
# Not part of CI (no assertion on the peers). Needs haproxy, nginx, curl, .ci/venv with h2,
# and a built `cargo test -p lobe-tls-cli --test attacks --no-run` (its backend).
#
#   lobe-tls-cli/tests/attacks/peers.sh [serve|haproxy|nginx]...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
py="$root/.ci/venv/bin/python"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

name=edge.example.com
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$work/key.pem" -out "$work/cert.pem" -subj "/CN=$name" \
    -addext "subjectAltName=DNS:$name" 2>/dev/null
mkdir -p "$work/certs/site"
cp "$work/cert.pem" "$work/certs/site/fullchain.pem"
cp "$work/key.pem" "$work/certs/site/privkey.pem"
cat "$work/cert.pem" "$work/key.pem" >"$work/combined.pem"

# The backend of the edge tests (the attacks test binary started as one).
tests_bin="$(ls -t "$root"/target/debug/deps/attacks-* | grep -v '\.d$' | head -1)"
LOBE_TLS_TEST_BACKEND="127.0.0.1:18181 backend" "$tests_bin" --exact support::backend_process \
    >/dev/null 2>&1 &
pids+=($!)

start_peer() {
    local peer=$1 port=$2
    case $peer in
    serve)
        "$root/target/debug/lobe-tls" serve --listen "127.0.0.1:$port" --upstream 127.0.0.1:18181 \
            --cert-dir "$work/certs" --no-http 2>"$work/serve.log" &
        pids+=($!)
        peer_pids() { echo "${pids[-1]}"; }
        ;;
    haproxy)
        cat >"$work/haproxy.cfg" <<EOF
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 75s
frontend fe
    bind 127.0.0.1:$port ssl crt $work/combined.pem alpn h2,http/1.1
    default_backend be
backend be
    server b1 127.0.0.1:18181
EOF
        haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
        pids+=($!)
        peer_pids() { pgrep -f "haproxy -f $work/haproxy.cfg" | tr '\n' ' '; }
        ;;
    nginx)
        mkdir -p "$work/nginx"
        cat >"$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    server {
        listen 127.0.0.1:$port ssl http2;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        client_header_timeout 10s;
        location / { proxy_pass http://127.0.0.1:18181; proxy_http_version 1.1; }
    }
}
EOF
        nginx -c "$work/nginx.conf" -p "$work/nginx" >/dev/null 2>&1 &
        pids+=($!)
        peer_pids() { pgrep -f "nginx.*$work/nginx.conf" | tr '\n' ' '; pgrep -P "$(cat "$work/nginx.pid")" | tr '\n' ' '; }
        ;;
    esac
    for _ in $(seq 50); do
        curl -sk --resolve "$name:$port:127.0.0.1" "https://$name:$port/page" -o /dev/null && return 0
        sleep 0.1
    done
    echo "$peer never came up" >&2
    exit 1
}

# RSS (KiB) and CPU ticks of the peer's processes, summed.
usage() {
    local rss=0 ticks=0 p
    for p in $(peer_pids | tr ' ' '\n' | sort -u); do
        [ -r "/proc/$p/status" ] || continue
        rss=$((rss + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
        ticks=$((ticks + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$rss $ticks"
}

# The legitimate client: GET /page from 127.0.0.2 every 50 ms until $1 exists; prints
# "ok failed p50_ms p99_ms".
legit() {
    local port=$1 stop=$2 out="$work/legit.$RANDOM"
    : >"$out"
    while [ ! -e "$stop" ]; do
        curl -sk --max-time 5 --interface 127.0.0.2 --resolve "$name:$port:127.0.0.1" \
            -o /dev/null -w '%{http_code} %{time_total}\n' "https://$name:$port/page" >>"$out" || true
        sleep 0.05
    done
    awk '$1 == 200 {ok++} $1 != 200 {bad++} END {printf "%d %d ", ok, bad}' "$out"
    awk '{print $2 * 1000}' "$out" | sort -n | awk '{a[NR] = $1} END {
        p50 = a[int(NR * 0.5 + 0.5)]; p99 = a[int(NR * 0.99 + 0.5)];
        printf "%.1f %.1f\n", p50, p99 }'
}

run_row() {
    local peer=$1 port=$2 row=$3
    shift 3
    local stop="$work/stop.$RANDOM"
    legit "$port" "$stop" >"$work/before" &
    sleep 3
    touch "$stop"
    wait $!
    local before
    before="$(cat "$work/before")"
    read -r rss0 ticks0 < <(usage)
    stop="$work/stop.$RANDOM"
    legit "$port" "$stop" >"$work/during" &
    local legit_pid=$! peak=$rss0
    "$py" "$@" --addr "127.0.0.1:$port" --sni "$name" >"$work/attack" &
    local attack=$!
    while kill -0 "$attack" 2>/dev/null; do
        read -r rss _ < <(usage)
        [ "$rss" -gt "$peak" ] && peak=$rss
        sleep 0.2
    done
    wait "$attack" || true
    touch "$stop"
    wait "$legit_pid"
    read -r rss1 ticks1 < <(usage)
    printf '%s | %s | legit before (ok failed p50 p99): %s | during: %s | rss %s -> peak %s KiB | cpu %.2f s | %s\n' \
        "$peer" "$row" "$before" "$(cat "$work/during")" "$rss0" "$peak" \
        "$(echo "($ticks1 - $ticks0) / 100" | bc -l)" "$(tail -1 "$work/attack")"
}

port=18400
for peer in "${@:-serve haproxy nginx}"; do
    for p in $peer; do
        port=$((port + 1))
        start_peer "$p" "$port"
        run_row "$p" "$port" "rapid reset" "$here/h2_attack.py" rapid-reset --count 300000 --seconds 6
        run_row "$p" "$port" "slowloris head" "$here/slow_attack.py" slow-headers --conns 50 --seconds 35
        run_row "$p" "$port" "slowloris ClientHello" "$here/slow_attack.py" slow-handshake --conns 50 --seconds 35
        for bomb in header-bomb-many header-bomb-large; do
            run_row "$p" "$port" "h1 $bomb" "$here/slow_attack.py" "$bomb"
            run_row "$p" "$port" "h2 $bomb" "$here/h2_attack.py" "$bomb"
        done
        # Last: its aborted uploads may leave the upstream marked out for a while.
        run_row "$p" "$port" "slowloris body" "$here/slow_attack.py" slow-body --conns 50 --seconds 35
    done
done

#!/usr/bin/env bash
# The edge side by side with HAProxy (mode http) and nginx (L7 proxy_pass with an upstream
# keepalive pool), in front of the same backend, with wrk: a 100-byte page over TLS, with
# keep-alive and with `Connection: close` (a new TLS connection per request). Needs a
# release build: cargo build --release -p lobe-tls-cli --bin lobe-tls -p lobe-tls-tests --bin backend
# Usage: tests/bench-edge/run.sh [SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs=${1:-10}
conns=${2:-32}
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
mkdir -p "$work/certs/localhost"
cp "$work/cert.pem" "$work/certs/localhost/fullchain.pem"
cp "$work/key.pem" "$work/certs/localhost/privkey.pem"
cat "$work/cert.pem" "$work/key.pem" > "$work/haproxy.pem"

"$bin/backend" 127.0.0.1:18080 bench & pids+=($!)
"$bin/lobe-tls" serve --listen 127.0.0.1:18443 --upstream 127.0.0.1:18080 --no-http \
    --cert-dir "$work/certs" 2>/dev/null & pids+=($!)
"$bin/lobe-tls" serve --mode tcp --listen 127.0.0.1:18444 --upstream 127.0.0.1:18080 --no-http \
    --cert-dir "$work/certs" 2>/dev/null & pids+=($!)
cat > "$work/haproxy.cfg" <<CFG
global
  maxconn 4096
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend tls
  bind 127.0.0.1:18445 ssl crt $work/haproxy.pem alpn h2,http/1.1
  default_backend app
backend app
  server app 127.0.0.1:18080
CFG
haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!)
cat > "$work/nginx.conf" <<CFG
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:18080; keepalive 64; }
  server {
    listen 127.0.0.1:18446 ssl http2;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CFG
nginx -c "$work/nginx.conf" -e "$work/nginx-error.log" >/dev/null 2>&1 & pids+=($!)
sleep 2

run() {
    local name=$1 port=$2 shift_args=("${@:3}")
    local out
    out=$(wrk -t2 -c"$conns" -d"${secs}s" "${shift_args[@]}" "https://localhost:$port/page" 2>&1) || true
    local rps errors
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    printf '%-22s %10s req/s %s\n' "$name" "$rps" "$errors"
}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for mode in keep-alive close; do
    args=()
    [ "$mode" = close ] && args=(-H "Connection: close")
    echo "== $mode"
    run "lobe-tls (http)" 18443 "${args[@]}"
    run "lobe-tls (tcp)" 18444 "${args[@]}"
    run "haproxy 2.6 (http)" 18445 "${args[@]}"
    run "nginx 1.22 (proxy)" 18446 "${args[@]}"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# The quick start: build lobe-tls, start a local Pebble, issue an HTTP-01 certificate and a
# wildcard + apex DNS-01 certificate into a fresh store, and list them; then run the edge,
# `lobe-tls serve`, in front of three small backends, with certificates issued from
# Pebble at start: requests balanced round-robin, then pinned by cookie, and one backend
# killed with no failed request. Everything is stopped again at the end.
#
#   bash pebble/quickstart.sh
#
# Works on a fresh Debian machine as root: installs what is missing (Pebble, a C
# compiler, Rust through rustup). The ports can be moved with the PEBBLE_*_PORT variables
# that pebble/run.sh documents.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_rust() {
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null 2>&1 && return 0
    echo "installing Rust (rustup, stable, minimal profile)" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl ca-certificates build-essential >/dev/null
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
    export PATH="$HOME/.cargo/bin:$PATH"
}

ensure_rust
if ! command -v cc >/dev/null 2>&1; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >/dev/null
fi

echo "== building lobe-tls (and the test backend)"
# Cargo says where it put the binaries: CARGO_TARGET_DIR or a config may move them.
built="$(cargo build --quiet -p lobe-tls-cli -p lobe-tls-tests --bin lobe-tls --bin backend \
    --message-format=json-render-diagnostics)"
binary() {
    grep -o "\"executable\":\"[^\"]*/$1\"" <<<"$built" | tail -n 1 | cut -d'"' -f4
}
lobe_tls="$(binary lobe-tls)"
backend="$(binary backend)"
[ -x "$lobe_tls" ] && [ -x "$backend" ] || { echo "cargo built no lobe-tls binary" >&2; exit 1; }

work="$(mktemp -d /tmp/lobe-tls-quickstart.XXXXXX)"
export PEBBLE_STATE="$work/pebble"
echo "== starting Pebble"
bash pebble/run.sh start
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    bash "$repo/pebble/run.sh" stop
}
trap cleanup EXIT

export LOBE_TLS_STORE="$work/store"
export LOBE_TLS_DIRECTORY="https://127.0.0.1:${PEBBLE_ACME_PORT:-14000}/dir"
export LOBE_TLS_DIRECTORY_CA="$PEBBLE_STATE/ca.pem"

echo "== issuing www.example.com + example.com through HTTP-01"
"$lobe_tls" issue -d www.example.com -d example.com \
    --http-listen "127.0.0.1:${PEBBLE_HTTP_PORT:-5002}"

echo "== issuing *.example.com + example.com through DNS-01 (challtestsrv)"
"$lobe_tls" issue -d '*.example.com' -d example.com --challenge dns-01 \
    --dns-provider challtestsrv --challtestsrv "http://127.0.0.1:${PEBBLE_CTS_PORT:-8055}" \
    --dns-resolver "127.0.0.1:${PEBBLE_DNS_PORT:-8053}"

echo "== lobe-tls list"
"$lobe_tls" list
echo "== lobe-tls check"
"$lobe_tls" check

echo "== three backends (app-1, app-2, app-3) and lobe-tls serve in front of them"
for i in 1 2 3; do
    "$backend" "127.0.0.1:1808$i" "app-$i" &
    pids+=($!)
done
cat >"$work/edge.toml" <<TOML
[[site]]
domains = ["rr.example.com"]
upstreams = ["127.0.0.1:18081", "127.0.0.1:18082", "127.0.0.1:18083"]
lb = "round-robin"
health_path = "/healthz"

[[site]]
domains = ["sticky.example.com"]
upstreams = ["127.0.0.1:18081", "127.0.0.1:18082", "127.0.0.1:18083"]
lb = "cookie"
TOML
"$lobe_tls" serve --config "$work/edge.toml" --listen 127.0.0.1:8443 \
    --http-listen "127.0.0.1:${PEBBLE_HTTP_PORT:-5002}" --ready-file "$work/ready.json" \
    --access-log "$work/access.log" 2>"$work/serve.log" &
serve_pid=$!
pids+=("$serve_pid")
curl -s --cacert "$PEBBLE_STATE/ca.pem" \
    "https://127.0.0.1:${PEBBLE_MGMT_PORT:-15000}/roots/0" >"$work/root.pem"
get() { # NAME PATH [curl options]: one request through the edge, trusting Pebble's root
    local name="$1" path="$2"
    shift 2
    curl -sS --fail --max-time 5 --cacert "$work/root.pem" \
        --resolve "$name:8443:127.0.0.1" "$@" "https://$name:8443$path"
}
for _ in $(seq 1 300); do # the certificates are issued at start: up to 30 s
    get rr.example.com /whoami >/dev/null 2>&1 && get sticky.example.com /whoami >/dev/null 2>&1 && break
    kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
    sleep 0.1
done
echo "serve listens on $(cat "$work/ready.json")"
echo "== readiness, from the admin listener (127.0.0.1:9180 by default)"
echo "  GET /readyz: $(curl -sS --max-time 5 -w ' (%{http_code})' http://127.0.0.1:9180/readyz)"

echo "== round-robin: which backend answered each of 6 requests"
for _ in 1 2 3 4 5 6; do echo "  $(get rr.example.com /whoami)"; done

echo "== cookie affinity: the first answer sets a cookie, the next 5 follow it"
for _ in 1 2 3 4 5 6; do
    echo "  $(get sticky.example.com /whoami -b "$work/cookies" -c "$work/cookies")"
done

echo "== app-2 killed: 9 more requests, none fails"
kill "${pids[1]}"
failed=0
for _ in $(seq 1 9); do
    if answer="$(get rr.example.com /whoami)"; then echo "  $answer"; else failed=$((failed + 1)); fi
done
echo "  failed requests: $failed"

echo "== the access log: the last 3 of $(wc -l <"$work/access.log") lines (one JSON object per request)"
tail -n 3 "$work/access.log" | sed 's/^/  /'

echo "== serve's log"
sed 's/^/  /' "$work/serve.log" | head -n 20
echo
echo "The certificates are in $LOBE_TLS_STORE/live/; Pebble, the backends and serve are stopped again."
[ "$failed" -eq 0 ]

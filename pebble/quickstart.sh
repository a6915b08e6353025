#!/usr/bin/env bash
# The quick start: build lobe-tls, start a local Pebble, issue an HTTP-01 certificate and a
# wildcard + apex DNS-01 certificate into a fresh store, and list them.
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

echo "== building lobe-tls"
cargo build --quiet -p lobe-tls-cli
lobe_tls="$repo/target/debug/lobe-tls"

work="$(mktemp -d /tmp/lobe-tls-quickstart.XXXXXX)"
export PEBBLE_STATE="$work/pebble"
echo "== starting Pebble"
bash pebble/run.sh start
trap 'bash "$repo/pebble/run.sh" stop' EXIT

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
echo
echo "The certificates are in $LOBE_TLS_STORE/live/ (Pebble is stopped again)."

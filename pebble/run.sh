#!/usr/bin/env bash
# Runs a local ACME CA for lobe-tls: Pebble plus pebble-challtestsrv on loopback.
#
#   bash pebble/run.sh [start]   install Pebble if missing, start both, print how to use them
#   bash pebble/run.sh stop      stop what `start` started
#
# Ports (defaults as in pebble-config.json; each can be changed by its env var):
#   PEBBLE_ACME_PORT=14000  PEBBLE_MGMT_PORT=15000  PEBBLE_HTTP_PORT=5002 (HTTP-01 validation)
#   PEBBLE_TLS_PORT=5001 (TLS-ALPN-01 validation)  PEBBLE_DNS_PORT=8053  PEBBLE_CTS_PORT=8055
# challtestsrv's own HTTP-01/TLS-ALPN-01 listeners are off, so lobe-tls can bind those ports.
# State (certificates, logs, pids) lives in $PEBBLE_STATE (default /tmp/lobe-tls-pebble).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${PEBBLE_STATE:-/tmp/lobe-tls-pebble}"
acme_port="${PEBBLE_ACME_PORT:-14000}"
mgmt_port="${PEBBLE_MGMT_PORT:-15000}"
http_port="${PEBBLE_HTTP_PORT:-5002}"
tls_port="${PEBBLE_TLS_PORT:-5001}"
dns_port="${PEBBLE_DNS_PORT:-8053}"
cts_port="${PEBBLE_CTS_PORT:-8055}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_if_missing() {
    local missing=()
    command -v pebble >/dev/null 2>&1 || missing+=(pebble)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${missing[*]} (apt-get)" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# A small CA plus a localhost leaf signed by it: webpki refuses a self-signed
# certificate presented as the server's own, so clients trust ca.pem instead.
make_certs() {
    [ -s "$state/cert.pem" ] && [ -s "$state/ca.pem" ] && return 0
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$state/ca.key" -out "$state/ca.pem" -days 3650 \
        -subj "/CN=lobe-tls Pebble listener CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$state/key.pem" -out "$state/leaf.csr" -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
        >"$state/leaf.ext"
    openssl x509 -req -in "$state/leaf.csr" -CA "$state/ca.pem" -CAkey "$state/ca.key" \
        -CAcreateserial -days 3650 -extfile "$state/leaf.ext" -out "$state/cert.pem" 2>/dev/null
    chmod 600 "$state/ca.key" "$state/key.pem"
}

stop() {
    local pid
    for f in "$state/pebble.pid" "$state/challtestsrv.pid"; do
        [ -f "$f" ] || continue
        pid="$(cat "$f")"
        kill "$pid" 2>/dev/null || true
        rm -f "$f"
    done
}

wait_for_port() { # port what log
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "error: $2 did not start listening on 127.0.0.1:$1; see $3" >&2
    exit 1
}

start() {
    install_if_missing
    mkdir -p "$state"
    stop
    for port in "$acme_port" "$mgmt_port" "$http_port" "$tls_port" "$dns_port" "$cts_port"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "error: port $port on 127.0.0.1 is already in use; stop whatever holds it" >&2
            exit 1
        fi
    done
    make_certs
    sed -e "s/:14000/:$acme_port/; s/:15000/:$mgmt_port/" \
        -e "s/\"httpPort\": 5002/\"httpPort\": $http_port/; s/\"tlsPort\": 5001/\"tlsPort\": $tls_port/" \
        "$here/pebble-config.json" >"$state/pebble-config.json"

    (cd "$state" && exec pebble-challtestsrv -http01 "" -https01 "" -tlsalpn01 "" \
        -dns01 "127.0.0.1:$dns_port" -management "127.0.0.1:$cts_port" \
        -defaultIPv4 127.0.0.1 -defaultIPv6 "" \
        >"$state/challtestsrv.log" 2>&1 </dev/null) &
    echo $! >"$state/challtestsrv.pid"
    wait_for_port "$cts_port" pebble-challtestsrv "$state/challtestsrv.log"

    (cd "$state" && PEBBLE_VA_NOSLEEP=1 exec pebble -config pebble-config.json \
        -dnsserver "127.0.0.1:$dns_port" >"$state/pebble.log" 2>&1 </dev/null) &
    echo $! >"$state/pebble.pid"
    wait_for_port "$acme_port" pebble "$state/pebble.log"

    cat <<INFO
Pebble is running (stop it with: bash pebble/run.sh stop)
  directory URL:     https://127.0.0.1:$acme_port/dir         (--directory)
  CA file:           $state/ca.pem   (--directory-ca)
  HTTP-01 port:      127.0.0.1:$http_port                        (--http-listen)
  TLS-ALPN-01 port:  127.0.0.1:$tls_port
  challtestsrv API:  http://127.0.0.1:$cts_port                  (--dns-provider challtestsrv --challtestsrv)
  challtestsrv DNS:  127.0.0.1:$dns_port                        (--dns-resolver)
  issuing root:      curl --cacert $state/ca.pem https://127.0.0.1:$mgmt_port/roots/0
  logs:              $state/pebble.log, $state/challtestsrv.log
INFO
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac

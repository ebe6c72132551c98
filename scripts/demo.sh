#!/usr/bin/env bash
# The `make run` demo: three demo backends and sluice (conf/demo.yaml) on
# 127.0.0.1, a short tour of round robin and failover, then sluice keeps
# running until Ctrl-C. Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SLUICE=./target/debug/sluice
BACKEND=./target/debug/examples/demo_backend
pids=()
app1=""
cleanup() {
    for p in "${pids[@]}" $app1; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

for port in 8080 8081 9100 9001 9002 9003; do
    if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
        echo "port $port on 127.0.0.1 is in use; stop what uses it and try again" >&2
        exit 1
    fi
done

$BACKEND app1 127.0.0.1:9001 2>/dev/null & app1=$!
$BACKEND app2 127.0.0.1:9002 2>/dev/null & pids+=($!)
$BACKEND app3 127.0.0.1:9003 2>/dev/null & pids+=($!)
RUST_LOG=${RUST_LOG:-info,pingora_core=warn} $SLUICE -c conf/demo.yaml & pids+=($!)

ready() { curl -fs -o /dev/null http://127.0.0.1:9100/readyz; }
for _ in $(seq 100); do ready && break; sleep 0.1; done
ready || { echo "sluice did not become ready" >&2; exit 1; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
hit() { for _ in $(seq "$2"); do curl -s "http://127.0.0.1:$1" | sed 's/^/   /'; done; }
wait_active() { # pool, backend address, wanted "true"/"false"
    for _ in $(seq 100); do
        curl -s http://127.0.0.1:9100/api/v1/pools | tr -d ' \n' \
            | grep -q "\"active\":$3,\"address\":\"$2\"" && return 0
        sleep 0.1
    done
}

say "round robin over app1 and app2 (app3 is a backup): curl 127.0.0.1:8080"
hit 8080 4
say "active-passive: app1 serves, app2 stands by: curl 127.0.0.1:8081"
hit 8081 2
say "stopping app1 ..."
kill $app1; wait $app1 2>/dev/null || true; app1=""
wait_active app 127.0.0.1:9001 false
say "failover: 8080 sends everything to app2, 8081 fails over to app2"
hit 8080 3
hit 8081 2
say "starting app1 again ..."
$BACKEND app1 127.0.0.1:9001 2>/dev/null & app1=$!
wait_active app 127.0.0.1:9001 true
say "failback: app1 is back in both pools"
hit 8080 2
hit 8081 1

cat <<'TIP'

sluice keeps running. Try:
  curl -s 127.0.0.1:8080                      # round robin
  curl -s 127.0.0.1:9100/api/v1/pools         # pool and backend state
  curl -s 127.0.0.1:9100/metrics | grep ^sluice_
Ctrl-C stops sluice and the demo backends.
TIP
wait

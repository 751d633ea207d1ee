#!/bin/sh
# ember's main job, against a live service: create a Python sandbox, install a dependency in
# it, snapshot it, delete it, create a new sandbox from the snapshot and use the dependency
# without reinstalling. Prints cold-boot vs restore time-to-first-exec figures, timed through
# the HTTP API as an application's client sees them, and where the restore spent its time.
# Needs: ember and curl on PATH, EMBER_KERNEL, EMBER_ROOTFS, and STATE (an empty directory).
set -eu
mkdir -p "$STATE"
SOCK="$STATE/api.sock"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
ember serve --socket "$SOCK" --state-dir "$STATE" --warm-pool 2 > "$STATE/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null' EXIT
for i in $(seq 1 300); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "ember serve did not start:"; cat "$STATE/serve.log"; exit 1; }
E="--socket $SOCK"
ember doctor || true

# The API through curl: METHOD PATH [JSON]. Fails on an HTTP error, printing its answer.
api() {
  curl -sS --fail-with-body --unix-socket "$SOCK" -X "$1" -H 'content-type: application/json' \
    ${3:+--data "$3"} "http://ember$2"
}
id_of() { grep -o '"id":"[^"]*"' | head -n 1 | cut -d '"' -f 4; }
stdout_of() { sed -n 's/.*"stdout":"\([^"]*\)".*/\1/p' | head -n 1 | sed 's/\\n/\n/g'; }
# A sandbox's start, step by step, from its GET /sandboxes/{id} answer.
timeline_of() {
  grep -o '"step":"[a-z_]*","ms":[0-9.]*' | sed 's/"step":"\([a-z_]*\)","ms":\([0-9]*\).*/    \2 ms  \1/'
}
pool_idle() { api GET /metrics | sed -n 's/^ember_warm_pool_idle \([0-9]*\)$/\1/p'; }
# Both starts find the warm pool full, as a service with spare capacity would.
wait_pool() { for i in $(seq 1 600); do [ "$(pool_idle)" = 2 ] && return; sleep 0.1; done; }

PY='import platform; print("hello from Python", platform.python_version(), "on Linux", platform.release(), "- 44*44 =", 44*44)'
wait_pool
echo '--- a fresh sandbox (cold boot) ---'
t0=$(now_ms)
SB=$(api POST /sandboxes '{}' | id_of)
t1=$(now_ms)
api POST "/sandboxes/$SB/exec?wait=true" "{\"cmd\":\"python3\",\"args\":[\"-c\",\"$(echo "$PY" | sed 's/"/\\"/g')\"]}" | stdout_of
t2=$(now_ms)
echo '--- installing a dependency (a package written into site-packages; no network here) ---'
ember exec $E "$SB" -- sh -c 'D=/usr/local/lib/python3.11/dist-packages/emberdemo; mkdir -p $D &&
  printf "def greet():\n    return \"hello from a dependency installed before the snapshot\"\n" > $D/__init__.py &&
  python3 -m compileall -q $D && echo installed'
echo '--- snapshot, delete the sandbox ---'
ember snapshot $E "$SB" --name demo --stop
ember rm $E "$SB"
# The service maps a snapshot's memory from a file it writes right after the snapshot.
for i in $(seq 1 600); do api GET /snapshots/demo | grep -q '"memory_materialised":true' && break; sleep 0.1; done
wait_pool
echo '--- a new sandbox from the snapshot ---'
t3=$(now_ms)
W=$(api POST /sandboxes '{"snapshot":"demo"}' | id_of)
t4=$(now_ms)
api POST "/sandboxes/$W/exec?wait=true" '{"cmd":"python3","args":["-c","import emberdemo; print(emberdemo.greet())"]}' | stdout_of
t5=$(now_ms)
echo "--- where the restore spent its time (ms since the request, the service's timeline) ---"
api GET "/sandboxes/$W" | timeline_of
ember ls $E
ember rm $E "$W" > /dev/null
echo
echo "figures (this run, timed through the API; inside the lab absolute times are ~30x native):"
echo "  cold:     create $((t1 - t0)) ms, first exec done at $((t2 - t0)) ms"
echo "  restored: create $((t4 - t3)) ms, first exec done at $((t5 - t3)) ms"
awk -v c=$((t2 - t0)) -v w=$((t5 - t3)) 'BEGIN { if (w > 0) printf "  time to first exec: restore is %.1fx faster than cold boot\n", c / w }'

#!/bin/sh
# ember's main job, against a live service: create a Python sandbox, install a dependency in
# it, snapshot it, delete it, create new sandboxes from the snapshot and use the dependency
# without reinstalling. Prints cold-boot vs restore time-to-first-exec figures, each request
# timed by curl as an application's client sees it (curl's own start left out), and where a
# restore spent its time.
# Needs: ember and curl on PATH, EMBER_KERNEL, EMBER_ROOTFS, and STATE (an empty directory).
set -eu
mkdir -p "$STATE/bin"
SOCK="$STATE/api.sock"
# The programs run from local disk, as an installed ember would (not from a network share).
cp "$(command -v ember)" "$(dirname "$(command -v ember)")/ember-vmm" "$STATE/bin/"
PATH="$STATE/bin:$PATH"
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
# As api, but timed: the answer goes to $STATE/answer, the request's milliseconds to stdout.
timed() {
  t=$(curl -sS --fail-with-body --unix-socket "$SOCK" -X "$1" -H 'content-type: application/json' \
    ${3:+--data "$3"} -o "$STATE/answer" -w '%{time_total}' "http://ember$2") ||
    { cat "$STATE/answer"; echo; exit 1; }
  echo "$t" | awk '{ printf "%d", $1 * 1000 }'
}
id_of() { grep -o '"id":"[^"]*"' | head -n 1 | cut -d '"' -f 4; }
stdout_of() { sed -n 's/.*"stdout":"\([^"]*\)".*/\1/p' | head -n 1 | sed 's/\\n/\n/g'; }
# A sandbox's start, step by step, from its GET /sandboxes/{id} answer.
timeline_of() {
  { tr '{' '\n'; echo; } | sed -n 's/^"ms":\([0-9]*\)[0-9.]*,"step":"\([a-z_]*\)".*/    \1 ms  \2/p'
}
pool_idle() { api GET /metrics | sed -n 's/^ember_warm_pool_idle \([0-9]*\)$/\1/p'; }
# Both starts find the warm pool full, as a service with spare capacity would.
wait_pool() { for i in $(seq 1 600); do [ "$(pool_idle)" = 2 ] && return; sleep 0.1; done; }

PY='import platform; print("hello from Python", platform.python_version(), "on Linux", platform.release(), "- 44*44 =", 44*44)'
wait_pool
echo '--- a fresh sandbox (cold boot) ---'
c1=$(timed POST /sandboxes '{}')
SB=$(id_of < "$STATE/answer")
c2=$(timed POST "/sandboxes/$SB/exec?wait=true" "{\"cmd\":\"python3\",\"args\":[\"-c\",\"$(echo "$PY" | sed 's/"/\\"/g')\"]}")
stdout_of < "$STATE/answer"
echo '--- installing a dependency (a package written into site-packages; no network here) ---'
ember exec $E "$SB" -- sh -c 'D=/usr/local/lib/python3.11/dist-packages/emberdemo; mkdir -p $D &&
  printf "def greet():\n    return \"hello from a dependency installed before the snapshot\"\n" > $D/__init__.py &&
  python3 -m compileall -q $D && echo installed'
echo '--- snapshot, delete the sandbox ---'
ember snapshot $E "$SB" --name demo --stop
ember rm $E "$SB"
# The service maps a snapshot's memory from a file it writes right after the snapshot.
for i in $(seq 1 600); do api GET /snapshots/demo | grep -q '"memory_materialised":true' && break; sleep 0.1; done
RESTORES=""
for n in 1 2 3; do
  wait_pool
  echo "--- sandbox $n from the snapshot ---"
  r1=$(timed POST /sandboxes '{"snapshot":"demo"}')
  W=$(id_of < "$STATE/answer")
  r2=$(timed POST "/sandboxes/$W/exec?wait=true" '{"cmd":"python3","args":["-c","import emberdemo; print(emberdemo.greet())"]}')
  stdout_of < "$STATE/answer"
  if [ "$n" = 1 ]; then
    echo "--- where its restore spent its time (ms since the request, the service's timeline) ---"
    api GET "/sandboxes/$W" | timeline_of
  fi
  ember rm $E "$W" > /dev/null
  RESTORES="$RESTORES $r1:$r2"
done
echo
echo "figures (this run; each request timed by curl, without curl's own start; inside the lab"
echo "absolute times are ~20-30x native):"
echo "  cold boot:  create $c1 ms + first exec $c2 ms = $((c1 + c2)) ms"
echo "$RESTORES" | awk -v cold=$((c1 + c2)) '{
  for (i = 1; i <= NF; i++) {
    split($i, t, ":"); total[i] = t[1] + t[2]
    printf "  restore %d:  create %d ms + first exec %d ms = %d ms (%.1fx faster)%s\n", i, t[1], t[2],
      total[i], cold / total[i], i == 1 ? "  <- the snapshot'"'"'s first" : ""
  }
  # the median of the three
  a = total[1]; b = total[2]; c = total[3]
  m = (a > b) ? ((b > c) ? b : ((a > c) ? c : a)) : ((a > c) ? a : ((b > c) ? c : b))
  printf "  time to first exec: a restore is %.1fx faster than a cold boot (median of 3 restores)\n", cold / m
}'
echo "  (in the lab a snapshot's first restore is the slow one: the emulator translates guest code"
echo "  again in the memory file's new pages; see docs/benchmarks.md)"

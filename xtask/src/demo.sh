#!/bin/sh
# ember's main job, against a live service: create a python3.13 sandbox, `pip install` a
# package from the package index in it, snapshot it, delete it, create new sandboxes from the
# snapshot and use the package without reinstalling. Prints boot + install vs restore
# time-to-first-run figures, each request timed by curl as an application's client sees it
# (curl's own start left out), and where a restore spent its time.
# Needs: ember and curl on PATH, EMBER_KERNEL, EMBER_ROOTFS, the python3.13 image built, a
# network that reaches the package index, and STATE (an empty directory).
set -eu
mkdir -p "$STATE/bin"
SOCK="$STATE/api.sock"
# The programs run from local disk, as an installed ember would (not from a network share).
cp "$(command -v ember)" "$(dirname "$(command -v ember)")/ember-vmm" "$STATE/bin/"
PATH="$STATE/bin:$PATH"
ember serve --socket "$SOCK" --state-dir "$STATE" > "$STATE/serve.log" 2>&1 &
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
  { tr '{' '\n'; echo; } | sed -n -e 's/^"ms":\([0-9]*\)[0-9.]*,"step":"\([a-z_]*\)".*/    \1 ms  \2/p' \
    -e 's/^"step":"\([a-z_]*\)","ms":\([0-9]*\).*/    \2 ms  \1/p'
}

PKG=python-dateutil==2.9.0.post0
PY='import platform, dateutil; print("hello from Python", platform.python_version(), "with dateutil", dateutil.__version__, "- 44*44 =", 44*44)'
echo '--- a fresh python3.13 sandbox with an egress network (cold boot) ---'
c1=$(timed POST /sandboxes '{"runtime":"python3.13","network":{"mode":"egress"}}')
SB=$(id_of < "$STATE/answer")
echo "--- pip install $PKG (from the package index, through the sandbox's network) ---"
i1=$(timed POST "/sandboxes/$SB/exec?wait=true" "{\"cmd\":\"pip\",\"args\":[\"install\",\"--user\",\"--no-warn-script-location\",\"--progress-bar\",\"off\",\"$PKG\"],\"timeout_s\":600}")
grep -q '"exit_code":0' "$STATE/answer" || { echo "pip install failed:"; cat "$STATE/answer"; echo; exit 1; }
stdout_of < "$STATE/answer" | tail -n 1
c2=$(timed POST "/sandboxes/$SB/exec?wait=true" "{\"cmd\":\"python3\",\"args\":[\"-c\",\"$(echo "$PY" | sed 's/"/\\"/g')\"]}")
stdout_of < "$STATE/answer"
echo '--- snapshot, delete the sandbox ---'
ember snapshot $E "$SB" --name demo --stop
ember rm $E "$SB"
# The service maps a snapshot's memory from a file it writes right after the snapshot.
for i in $(seq 1 600); do api GET /snapshots/demo | grep -q '"memory_materialised":true' && break; sleep 0.1; done
RESTORES=""
for n in 1 2 3; do
  echo "--- sandbox $n from the snapshot: the package is there, nothing is installed ---"
  r1=$(timed POST /sandboxes '{"snapshot":"demo"}')
  W=$(id_of < "$STATE/answer")
  r2=$(timed POST "/sandboxes/$W/exec?wait=true" "{\"cmd\":\"python3\",\"args\":[\"-c\",\"$(echo "$PY" | sed 's/"/\\"/g')\"]}")
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
echo "  cold boot + install:  create $c1 ms + pip install $i1 ms + first run $c2 ms = $((c1 + i1 + c2)) ms"
echo "$RESTORES" | awk -v cold=$((c1 + i1 + c2)) -v boot=$((c1 + c2)) '{
  for (i = 1; i <= NF; i++) {
    split($i, t, ":"); total[i] = t[1] + t[2]
    printf "  restore %d:  create %d ms + first run %d ms = %d ms (saves %d ms, %.1fx faster)%s\n", i,
      t[1], t[2], total[i], cold - total[i], cold / total[i], i == 1 ? "  <- the snapshot'"'"'s first" : ""
  }
  # the median of the three
  a = total[1]; b = total[2]; c = total[3]
  m = (a > b) ? ((b > c) ? b : ((a > c) ? c : a)) : ((a > c) ? a : ((b > c) ? c : b))
  printf "  install skipped: a restore answers %.1fx sooner than boot + install (median of 3 restores);\n", cold / m
  printf "  against a cold boot without the install (%d ms) it is %.1fx\n", boot, boot / m
}'
echo "  (in the lab a snapshot's first restore is the slow one: the emulator translates guest code"
echo "  again in the memory file's new pages; see docs/benchmarks.md)"

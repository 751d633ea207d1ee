#!/bin/sh
# ember's main job, against a live service: create a Python sandbox, install a dependency in
# it, snapshot it, delete it, create a new sandbox from the snapshot and use the dependency
# without reinstalling. Prints cold-boot vs restore vs time-to-first-exec figures.
# Needs: ember on PATH, EMBER_KERNEL, EMBER_ROOTFS, and STATE (an empty directory).
set -eu
mkdir -p "$STATE"
SOCK="$STATE/api.sock"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
ember serve --socket "$SOCK" --state-dir "$STATE" > "$STATE/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null' EXIT
for i in $(seq 1 300); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "ember serve did not start:"; cat "$STATE/serve.log"; exit 1; }
E="--socket $SOCK"
ember doctor || true

echo '--- a fresh sandbox (cold boot) ---'
t0=$(now_ms)
SB=$(ember create $E)
t1=$(now_ms)
ember exec $E "$SB" -- python3 -c 'import platform; print("hello from Python", platform.python_version(), "on Linux", platform.release(), "- 44*44 =", 44*44)'
t2=$(now_ms)
echo '--- installing a dependency (a package written into site-packages; no network here) ---'
ember exec $E "$SB" -- sh -c 'D=/usr/local/lib/python3.11/dist-packages/emberdemo; mkdir -p $D &&
  printf "def greet():\n    return \"hello from a dependency installed before the snapshot\"\n" > $D/__init__.py &&
  python3 -m compileall -q $D && echo installed'
echo '--- snapshot, delete the sandbox ---'
ember snapshot $E "$SB" --name demo --stop
ember rm $E "$SB"
echo '--- a new sandbox from the snapshot ---'
t3=$(now_ms)
W=$(ember create $E --snapshot demo)
t4=$(now_ms)
ember exec $E "$W" -- python3 -c 'import emberdemo; print(emberdemo.greet())'
t5=$(now_ms)
ember ls $E
ember rm $E "$W" > /dev/null
echo
echo "figures (this run; inside the lab absolute times are ~30x native):"
echo "  cold:     create $((t1 - t0)) ms, first exec done at $((t2 - t0)) ms"
echo "  restored: create $((t4 - t3)) ms, first exec done at $((t5 - t3)) ms"
awk -v c=$((t2 - t0)) -v w=$((t5 - t3)) 'BEGIN { if (w > 0) printf "  time to first exec: restore is %.1fx faster than cold boot\n", c / w }'

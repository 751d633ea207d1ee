#!/bin/sh
# Cold vs warm through the service, the way API users see it: POST /sandboxes → agent ready
# (create) and → first exec finished, for cold boots and for restores of one snapshot in each
# restore mode. Run where KVM can run Linux, e.g.:
#   cargo build --release -p ember-cli -p ember-sandbox && cargo xtask lab --no-build -- sh benches/service.sh
# Lab figures are ~20-30x native: compare the ratios, measured in the same run.
set -u
E=${EMBER:-$(pwd)/target/release/ember}
ROUNDS=${ROUNDS:-3}
STATE=$(mktemp -d /tmp/ember-svc-bench.XXXXXX)
SOCK=$STATE/api.sock
RUST_LOG=${RUST_LOG:-info} $E serve --socket "$SOCK" --state-dir "$STATE" > "$STATE/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null; rm -rf "$STATE"' EXIT
for i in $(seq 1 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
api() { curl -sS --unix-socket "$SOCK" -H 'content-type: application/json' "$@"; }
# A top-level string or number field of a JSON object (no python: under the lab's TCG its
# start-up alone takes seconds).
field() { grep -o "\"$1\":\"\{0,1\}[^\",}]*" | head -1 | sed 's/.*:"\{0,1\}//'; }

# One sandbox: create with BODY, run `true`, delete; appends "create_ms exec_ms ready_ms".
round() {
  t0=$(now)
  sb=$(api -d "$1" http://ember/sandboxes)
  t1=$(now)
  id=$(echo "$sb" | field id); [ -n "$id" ] || { echo "create failed: $sb" >&2; return 1; }
  ready=$(echo "$sb" | field ready_ms)
  api -d '{"cmd":"true"}' "http://ember/sandboxes/$id/exec?wait=true" > /dev/null
  t2=$(now)
  [ -n "${SHOW_LOGS:-}" ] && sed "s/^/  [$id] /" "$STATE/sandboxes/$id/vmm.log" >&2
  api -X DELETE "http://ember/sandboxes/$id"
  echo "$(ms $t0 $t1) $(ms $t0 $t2) ${ready%.*}"
}

report() {
  create=$(cut -d' ' -f1 "$STATE/$1" | median)
  first=$(cut -d' ' -f2 "$STATE/$1" | median)
  ready=$(cut -d' ' -f3 "$STATE/$1" | median)
  echo "$1: create $create ms (VMM start -> agent ready $ready ms), first exec done at $first ms (medians of $ROUNDS)"
}

for i in $(seq "$ROUNDS"); do round '{}'; done > "$STATE/cold"
report cold

# The snapshot: a sandbox that "installed" something (byte-identical files and imports).
id=$(api -d '{}' http://ember/sandboxes | field id)
api -d '{"cmd":"sh","args":["-c","mkdir -p /opt/pkg && cp -r /usr/lib/python3.11/json /opt/pkg/ && python3 -c \"import json, email\" && sync"]}' \
  "http://ember/sandboxes/$id/exec?wait=true" > /dev/null
api -d '{"name":"base","stop":true}' "http://ember/sandboxes/$id/snapshots" | field took_ms | sed 's/^/snapshot (256 MiB, full) ms: /'
api -X DELETE "http://ember/sandboxes/$id"

for mode in ${MODES:-eager lazy prefetch}; do
  # The first prefetch restore records the working set; it is not counted.
  [ $mode = prefetch ] && round '{"snapshot":"base","restore_mode":"prefetch"}' > /dev/null
  for i in $(seq "$ROUNDS"); do round "{\"snapshot\":\"base\",\"restore_mode\":\"$mode\"}"; done > "$STATE/$mode"
  report "$mode"
done
cold=$(cut -d' ' -f2 "$STATE/cold" | median)
for mode in ${MODES:-eager lazy prefetch}; do
  awk -v c="$cold" -v r="$(cut -d' ' -f2 "$STATE/$mode" | median)" -v m=$mode \
    'BEGIN {printf "  %s: first exec %.2fx sooner than cold boot\n", m, c / r}'
done

#!/bin/sh
# Snapshot and restore figures in one run: cold boot vs restore (lazy, eager, prefetch) to the
# first exec finished, faults served on demand, full vs diff snapshot time, and store bytes
# for ten sandboxes that made the same install. Run where KVM can run Linux, e.g.:
#   cargo build --release -p ember-cli -p ember-sandbox && cargo xtask lab --no-build -- sh benches/snapshots.sh
# Lab figures are ~20-30x native: compare the ratios, measured in the same run.
set -u
E=${EMBER:-$(pwd)/target/release/ember}
S=$(mktemp -d /tmp/ember-snap-bench.XXXXXX)
ROUNDS=${ROUNDS:-3}
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# The "install": byte-identical files on the disk and in memory in every sandbox.
INSTALL='mkdir -p /opt/pkg && cp -r /usr/lib/python3.11/email /usr/lib/python3.11/json /opt/pkg/ && python3 -c "import compileall; compileall.compile_dir(\"/opt/pkg\", quiet=1)" && sync'

$E run --store "$S" --snapshot-on-exit base -- sh -c "$INSTALL" 2>/dev/null || exit 1

for i in $(seq "$ROUNDS"); do t=$(date +%s%N); $E run -- true 2>/dev/null; ms "$t"; done > "$S/cold"
echo "cold boot -> first exec done: median $(median < "$S/cold") ms of $ROUNDS"
for mode in eager lazy prefetch; do
  : > "$S/$mode"; : > "$S/$mode.faults"
  # The first prefetch restore records the working set; it is not counted.
  [ $mode = prefetch ] && $E restore base --store "$S" --mode prefetch -- true 2>/dev/null
  for i in $(seq "$ROUNDS"); do
    t=$(date +%s%N)
    log=$($E restore base --store "$S" --mode $mode -- true 2>&1)
    ms "$t" >> "$S/$mode"
    echo "$log" | grep -o "[0-9]* pages served on demand" | cut -d' ' -f1 >> "$S/$mode.faults"
  done
  faults=$(median < "$S/$mode.faults")
  echo "$mode restore -> first exec done: median $(median < "$S/$mode") ms of $ROUNDS${faults:+, $faults pages served on demand}"
done
cold=$(median < "$S/cold")
for mode in eager lazy prefetch; do
  echo "  $mode: $(awk -v c="$cold" -v r="$(median < "$S/$mode")" 'BEGIN {printf "%.2fx faster than cold boot", c / r}')"
done

# Full vs diff snapshot of a 512 MiB guest.
$E run --mem-mib 512 --store "$S" --snapshot-on-exit big -- true 2>&1 | grep -o "saved snapshot.*" | sed 's/^/full: /'
$E restore big --store "$S" --snapshot-on-exit big-diff --diff -- sh -c 'head -c 4194304 /dev/urandom > /tmp/x' 2>&1 \
  | grep -o "saved snapshot.*\|[0-9]* pages written since big" | sed 's/^/diff: /'
$E restore big --store "$S" --snapshot-on-exit big-full -- sh -c 'head -c 4194304 /dev/urandom > /tmp/x' 2>&1 \
  | grep -o "saved snapshot.*" | sed 's/^/full after the same change: /'

# Ten sandboxes that made the same install, each snapshotted.
T=$(mktemp -d /tmp/ember-snap-bench10.XXXXXX)
for i in $(seq 10); do
  $E run --store "$T" --snapshot-on-exit "sandbox$i" -- sh -c "$INSTALL" 2>/dev/null || exit 1
done
echo "ten sandboxes after the same install:"
$E store stats --store "$T"
rm -rf "$S" "$T"

#!/bin/sh
# Cold boot vs restore, each to its first exec finished and the guest's shutdown, in one run.
# Run where KVM can run Linux, e.g.:
#   cargo build --release -p ember-api && cargo xtask lab --no-build -- sh benches/restore-vs-boot.sh
# Figures from the lab are ~20-30x native: compare the ratios.
set -u
E=${EMBER:-target/release/ember}
S=$(mktemp -d /tmp/ember-restore-bench.XXXXXX)
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
for i in 1 2 3; do
  t=$(date +%s%N); $E run --store "$S" --snapshot-on-exit "s$i" -- true 2>/dev/null
  echo "round $i: cold boot -> first exec -> snapshot saved: $(ms "$t") ms"
  t=$(date +%s%N); $E run -- true 2>/dev/null
  echo "round $i: cold boot -> first exec -> shutdown: $(ms "$t") ms"
  t=$(date +%s%N); faults=$($E restore "s$i" --store "$S" -- true 2>&1 | grep -o "[0-9]* pages served on demand")
  echo "round $i: lazy restore -> first exec -> shutdown: $(ms "$t") ms ($faults)"
  t=$(date +%s%N); $E restore "s$i" --store "$S" --eager -- true 2>/dev/null
  echo "round $i: eager restore -> first exec -> shutdown: $(ms "$t") ms"
done
echo "store for 3 snapshots of 3 separate boots: $(du -sh "$S" | cut -f1)"
rm -rf "$S"

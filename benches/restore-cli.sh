#!/bin/sh
# `ember restore` (no service, no pool): a snapshot's first restore against its later ones.
# Run in the lab (or on a host whose KVM runs Linux) from the workspace, after a release
# build of ember and ember-vmm:
#   cargo build --release -p ember-cli -p ember-sandbox
#   cargo xtask lab --no-build -- sh benches/restore-cli.sh
# The programs are copied to the lab's tmpfs first, as an installed ember would be local
# (exec'ing them from the lab's 9p share costs 1-2 s of its own). EMBER_BIN_DIR names another
# build's folder (say, an older commit's) to measure it the same way.
# Then the snapshot's memory file is dropped from the cache and written again (an `auto`
# restore that finds no file reads the store and materialises it), and the file restores are
# measured once more: in the lab the first restore from the new file's pages is as slow as the
# snapshot's first, because the emulator translates guest code again in physical pages it has
# not run from. Nothing else changed between those restores.
set -eu
runs=${RUNS:-5}
bin=/tmp/ember-restore-bench/bin
work=/tmp/ember-restore-bench/work
rm -rf /tmp/ember-restore-bench
mkdir -p "$bin" "$work"
from=${EMBER_BIN_DIR:-target/release}
cp "$from/ember" "$bin/"
[ ! -e "$from/ember-vmm" ] || cp "$from/ember-vmm" "$bin/"
echo "ember from $from"
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
start=$(date +%s%N)
"$bin/ember" run --store "$work/store" --snapshot-on-exit base \
    -- sh -c 'echo saved > /root/note' > /dev/null
echo "boot, command and snapshot (memory materialised before exit): $(ms "$start") ms"
restores() {
    i=1
    while [ "$i" -le "$runs" ]; do
        start=$(date +%s%N)
        out=$("$bin/ember" restore base --store "$work/store" -- cat /root/note)
        took=$(ms "$start")
        [ "$out" = "saved" ] || { echo "restore $i printed: $out"; exit 1; }
        echo "$1 restore $i to its command's end: $took ms"
        i=$((i + 1))
    done
}
restores "file"
rm -f "$work"/mem-cache/*
"$bin/ember" restore base --store "$work/store" -- true
echo "memory file dropped and materialised again (by a restore that read the store)"
restores "file, new pages:"
rm -rf /tmp/ember-restore-bench

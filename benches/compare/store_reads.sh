#!/usr/bin/env bash
# What a snapshot's reads of a volume's block store do to the volume's writes of it: the
# 4 KiB buffered pwrite latency (what the applier does under the journal lock) beside no
# reader (the baseline, same run), an O_DIRECT reader and the block store's own bulk read
# (RWF_DONTCACHE), with 64 KiB and 1 MiB requests. On ext4 and XFS a direct read holds the
# file's inode lock for its whole disk read, and a buffered write needs that lock.
#
# Usage: benches/compare/store_reads.sh   (about 2 minutes)
# Environment:
#   KEEL_BENCH_DIR  parent of the scratch file (default /var/tmp; must be a real disk)
#   SIZE_MIB        the file's size (default 1024)
#   SECONDS_EACH    seconds per run (default 5)
#   ROUNDS          rounds over all modes, alternating (default 2)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
SECONDS_EACH=${SECONDS_EACH:-5}
ROUNDS=${ROUNDS:-2}
die() { echo "store_reads.sh: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "python3 is missing"

echo "== building store-read-lock (release)"
(cd "$ROOT" && cargo build --release --quiet -p keel-benches --bin store-read-lock)
BIN=$ROOT/target/release/store-read-lock

SCRATCH=$(mktemp -d "${KEEL_BENCH_DIR:-/var/tmp}/keel-store-reads.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
FILE=$SCRATCH/store
echo "== writing a $SIZE_MIB MiB file of random bytes in $SCRATCH ($(df -T "$SCRATCH" | awk 'NR==2 {print $2}'))"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$FILE"
sync

if [[ ! -w /proc/sys/vm/drop_caches ]]; then
    echo "store_reads.sh: not root: the page cache is not dropped between runs, so reads may come from it" >&2
fi
RESULTS=$SCRATCH/results.jsonl
for round in $(seq 1 "$ROUNDS"); do
    for run in "none 65536" "direct 65536" "store 65536" "direct 1048576" "store 1048576"; do
        set -- $run
        # Every run starts from the disk: nothing of the file cached, nothing dirty.
        sync
        if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 > /proc/sys/vm/drop_caches; fi
        "$BIN" "$FILE" "$1" "$2" "$SECONDS_EACH" | tee -a "$RESULTS"
    done
    echo "== round $round done"
done

python3 - "$RESULTS" <<'EOF'
import json, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["mode"], r["read_bytes"])].append(r)
base = runs[("none", 65536)]
def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)
b99, b999 = mean(base, "write_p99_us"), mean(base, "write_p999_us")
print()
print("RWF_DONTCACHE taken:", all(r.get("dontcache") for rows in runs.values() for r in rows))
print("| reader | writes/s | write p50 | write p99 | write p99.9 | p99 / no reader | p99.9 / no reader | read MiB/s |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for (mode, size), rows in runs.items():
    label = "none" if mode == "none" else f"{mode} {size >> 10} KiB"
    print(f"| {label} | {mean(rows, 'writes') / rows[0]['seconds']:.0f} | {mean(rows, 'write_p50_us'):.0f} µs "
          f"| {mean(rows, 'write_p99_us'):.0f} µs | {mean(rows, 'write_p999_us'):.0f} µs "
          f"| {mean(rows, 'write_p99_us') / b99:.1f}× | {mean(rows, 'write_p999_us') / b999:.1f}× "
          f"| {mean(rows, 'read_mib_s'):.0f} |")
EOF

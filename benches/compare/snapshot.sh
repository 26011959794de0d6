#!/usr/bin/env bash
# Keel snapshots next to restic and borg, on the same image file and the same disk.
#
# Targets (report.py snapshot prints them with ✓/✗, for each Keel chunk size):
#   full:         keel >= 2x faster than restic's first backup, with a repo no larger
#   incremental:  keel >= 20x faster than restic's second backup (after the churn)
#   restore:      keel >= 0.7x the disk's sequential write speed (dd, same size, same disk)
#
# What runs:
#   image    KEEL_BENCH_IMAGE_GIB GiB (default 8; `quick`: 1), fully allocated, made of
#              5/8  an ext4 filesystem (mkfs.ext4 -d, no mount) holding a PostgreSQL 15 data
#                   directory after initdb + pgbench -i -s (20 x GiB), shut down cleanly;
#                   the rest of the filesystem is free (zero) blocks
#              1/8  seeded pseudo-random bytes (incompressible)
#              2/8  zeros
#            The exact byte counts go to composition.json and the report.
#   churn    1 % of the image's 8 KiB pages, chosen at random (seed CHURN_SEED), overwritten
#            with seeded random bytes; their offsets go to changed-pages.txt. The original
#            pages are kept and written back after each system's turn, so every system sees
#            the same pristine image for its full backup and the same churned one after.
#   keel     target/release/snapshot-bench into a local vault, per chunk size in
#            KEEL_CHUNK_SIZES (64K 256K 1M), zstd KEEL_ZSTD (3), one sealing thread per CPU:
#            full, then churn + incr (the change map's 64 KiB regions of the written pages,
#            rounded up to chunks), then restore into a new sparse file
#   restic   restic backup of the image file (repository v2, compression auto = zstd
#            default level), churn, second backup, restic restore latest
#   borg     borg create (repokey-blake2, --compression zstd,3; borg's default is lz4;
#            default buzhash chunker, ~2 MiB), churn, second create, borg extract --sparse
#   disk     dd if=/dev/zero bs=1M of a new file of the image's size, conv=fdatasync: the
#            disk's sequential write speed (twice: before and after the restores)
#   Restic's and borg's restores are followed by `sync FILE` inside the timed command, as
#   Keel's restore fsyncs its file. Every restore is checked byte for byte (cmp, untimed).
#   Page caches are dropped before every timed step when /proc/sys/vm/drop_caches is
#   writable (root); the report says whether they were.
#
# Usage: benches/compare/snapshot.sh [quick]   (8 GiB: ~25 min on 2 vCPUs; quick: ~4)
# Needs root only to drop caches and to run PostgreSQL as the postgres user; python3,
# e2fsprogs, postgresql-15 (tests/run installs it), /usr/bin/time. Installs restic and
# borgbackup from Debian when they are missing. No network otherwise: PostgreSQL listens
# on a Unix socket in the scratch directory only.
# Environment:
#   KEEL_BENCH_DIR        parent of the scratch directory (default /var/tmp; a real disk).
#                         Needs about 2.3 x the image size free.
#   KEEL_BENCH_IMAGE_GIB  image size in GiB (default 8, 1 with `quick`)
#   PGBENCH_SCALE         pgbench -i scale (default 20 x GiB: ~2.5 GiB of tables at 8 GiB)
#   KEEL_CHUNK_SIZES      Keel chunk sizes to measure ("64K 256K 1M")
#   KEEL_THREADS          snapshot-bench --threads (default: CPUs)
#   KEEL_ZSTD             snapshot-bench --zstd, Keel's zstd level (default 3, as [snapshots])
#   SNAPSHOT_BENCH_BIN    the binary (default target/release/snapshot-bench, built first)
#   SYSTEMS               which systems to run ("keel restic borg")
#   CHURN_SEED            seed of the churn (1)
#   KEEP_RESULTS          copy the raw results (time -v output, JSON lines, sizes) here
#   KEEL_BENCH_IMAGE_CACHE  a directory that keeps the pristine image between runs: built
#                         there on the first run (same size, scale and seed), copied from
#                         there after (reflink where the filesystem can); saves the
#                         initdb + pgbench -i minutes when iterating
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MODE=${1:-full}
BASE=${KEEL_BENCH_DIR:-/var/tmp}
case $MODE in
quick) GIB=${KEEL_BENCH_IMAGE_GIB:-1} ;;
full) GIB=${KEEL_BENCH_IMAGE_GIB:-8} ;;
*)
    echo "snapshot.sh: unknown mode $MODE (full or quick)" >&2
    exit 1
    ;;
esac
PGBENCH_SCALE=${PGBENCH_SCALE:-$((20 * GIB))}
KEEL_CHUNK_SIZES=${KEEL_CHUNK_SIZES:-64K 256K 1M}
KEEL_THREADS=${KEEL_THREADS:-$(nproc)}
KEEL_ZSTD=${KEEL_ZSTD:-3}
SYSTEMS=${SYSTEMS:-keel restic borg}
CHURN_SEED=${CHURN_SEED:-1}
KEEP_RESULTS=${KEEP_RESULTS:-}
IMAGE_CACHE=${KEEL_BENCH_IMAGE_CACHE:-}
PGBIN=/usr/lib/postgresql/15/bin
IMAGE_BYTES=$((GIB << 30))

die() {
    echo "snapshot.sh: $*" >&2
    exit 1
}
[[ $GIB =~ ^[1-9][0-9]*$ ]] || die "KEEL_BENCH_IMAGE_GIB must be a whole number of GiB"
for tool in python3 mkfs.ext4 cmp dd du; do
    command -v "$tool" >/dev/null || die "$tool not found in PATH"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is missing: apt-get install time"
[[ -x $PGBIN/postgres && -x $PGBIN/pgbench ]] || die "PostgreSQL 15 is not installed ($PGBIN; tests/run installs it)"
[[ $(id -u) == 0 ]] || die "run as root (PostgreSQL runs as the postgres user; page caches are dropped)"
id postgres >/dev/null 2>&1 || die "there is no postgres user"

# restic and borg from Debian, only when missing.
missing=()
[[ " $SYSTEMS " != *" restic "* ]] || command -v restic >/dev/null || missing+=(restic)
[[ " $SYSTEMS " != *" borg "* ]] || command -v borg >/dev/null || missing+=(borgbackup)
if ((${#missing[@]})); then
    echo "== installing ${missing[*]} (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ -z ${SNAPSHOT_BENCH_BIN:-} ]]; then
    echo "== building snapshot-bench (release)"
    (cd "$ROOT" && cargo build --release --quiet -p keel-benches --bin snapshot-bench)
    SNAPSHOT_BENCH_BIN=$ROOT/target/release/snapshot-bench
fi
[[ -x $SNAPSHOT_BENCH_BIN ]] || die "$SNAPSHOT_BENCH_BIN is not executable"

mkdir -p "$BASE"
free_bytes=$(df --output=avail -B1 "$BASE" | tail -1)
need=$((IMAGE_BYTES * 23 / 10))
((free_bytes > need)) || die "$BASE has $((free_bytes >> 30)) GiB free; a ${GIB} GiB image needs about $((need >> 30)) GiB"
WORK=$(mktemp -d "$BASE/keel-snapshot.XXXXXX")
# PostgreSQL runs as postgres and must reach its directory under here.
chmod 755 "$WORK"
RESULTS=$WORK/results
mkdir -p "$RESULTS"
IMAGE=$WORK/image.raw
PAGES=$WORK/changed-pages.txt
UNDO=$WORK/churn-undo.bin
PGDIR=$WORK/pg
PG_RUNNING=0

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if ((PG_RUNNING)); then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/root/pgdata" stop -m immediate -t 30 >/dev/null 2>&1 || true
    fi
    if [[ -n $KEEP_RESULTS && -d $RESULTS ]]; then
        mkdir -p "$KEEP_RESULTS"
        cp -r "$RESULTS"/. "$KEEP_RESULTS"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== scratch directory $WORK ($(df --output=source,fstype "$WORK" | tail -1 | tr -s ' ')), image ${GIB} GiB"

DROP_CACHES=0
if sync && echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
    DROP_CACHES=1
fi
drop_caches() {
    sync
    if ((DROP_CACHES)); then
        echo 3 >/proc/sys/vm/drop_caches
    fi
}

# measure NAME CMD...: one timed step. GNU time's report goes to NAME.time, the command's
# stdout to NAME.out, its stderr to NAME.log.
measure() {
    local name=$1
    shift
    drop_caches
    echo "   $name"
    if ! /usr/bin/time -v -o "$RESULTS/$name.time" "$@" >"$RESULTS/$name.out" 2>"$RESULTS/$name.log"; then
        tail -20 "$RESULTS/$name.log" >&2
        die "step $name failed"
    fi
}

# repo_size NAME DIR: apparent bytes (du -sb) and allocated bytes of a repository.
repo_size() {
    echo "$(du -sb "$2" | cut -f1) $(du -s -B1 "$2" | cut -f1)" >"$RESULTS/$1.size"
}

# --- the image ------------------------------------------------------------------------
FS_BYTES=$((IMAGE_BYTES / 8 * 5))
RANDOM_BYTES=$((IMAGE_BYTES / 8))
ZERO_BYTES=$((IMAGE_BYTES - FS_BYTES - RANDOM_BYTES))
# image_tool: builds the image (every byte written, holes included) and applies or undoes
# the churn. Seeded, so two runs make the same image and churn the same pages.
image_tool() {
    python3 - "$@" <<'EOF'
import os, random, sys

op, image = sys.argv[1], sys.argv[2]
MIB = 1 << 20
PAGE = 8 << 10
if op == "build":
    fs, random_bytes, zero_bytes, seed = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    rng = random.Random(seed)
    with open(image, "wb") as out, open(fs, "rb") as src:
        while block := src.read(8 * MIB):
            out.write(block)
        for _ in range(random_bytes // MIB):
            out.write(rng.randbytes(MIB))
        zeros = bytes(8 * MIB)
        left = zero_bytes
        while left:
            n = min(left, len(zeros))
            out.write(zeros[:n])
            left -= n
        out.flush()
        os.fsync(out.fileno())
elif op == "churn":
    pages_file, undo, seed = sys.argv[3], sys.argv[4], int(sys.argv[5])
    rng = random.Random(seed)
    size = os.path.getsize(image)
    pages = size // PAGE
    chosen = sorted(rng.sample(range(pages), pages // 100))
    fd = os.open(image, os.O_RDWR)
    with open(undo, "wb") as u, open(pages_file, "w") as p:
        for page in chosen:
            u.write(os.pread(fd, PAGE, page * PAGE))
            os.pwrite(fd, rng.randbytes(PAGE), page * PAGE)
            p.write(f"{page * PAGE}\n")
    os.fsync(fd)
    os.close(fd)
elif op == "revert":
    pages_file, undo = sys.argv[3], sys.argv[4]
    fd = os.open(image, os.O_RDWR)
    with open(undo, "rb") as u, open(pages_file) as p:
        for line in p:
            os.pwrite(fd, u.read(PAGE), int(line))
    os.fsync(fd)
    os.close(fd)
EOF
}

# build_image: initdb + pgbench -i into an ext4 image, then the random and zero parts;
# sets PGDATA_BYTES and FS_USED_BYTES. (Not indented: it holds here-documents.)
build_image() {
echo "== PostgreSQL data directory: initdb + pgbench -i -s $PGBENCH_SCALE"
mkdir -p "$PGDIR/root"
chown -R postgres: "$PGDIR"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDIR/root/pgdata" -A trust -E UTF8 --no-sync >"$WORK/initdb.log" 2>&1 ||
    {
        cat "$WORK/initdb.log" >&2
        die "initdb failed"
    }
# No TCP at all; a bounded pg_wal so the directory is mostly table and index pages.
cat >>"$PGDIR/root/pgdata/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$PGDIR'
max_wal_size = 128MB
min_wal_size = 32MB
fsync = off
EOF
PG_RUNNING=1
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/root/pgdata" -l "$PGDIR/postgres.log" -w start >/dev/null
runuser -u postgres -- "$PGBIN/pgbench" -h "$PGDIR" -i -s "$PGBENCH_SCALE" -q postgres >"$WORK/pgbench.log" 2>&1 ||
    {
        tail -20 "$WORK/pgbench.log" >&2
        die "pgbench -i failed"
    }
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/root/pgdata" -m fast -w stop >/dev/null
PG_RUNNING=0
# fsync = off only sped up the load; the image holds a cleanly shut-down cluster.
sed -i 's/^fsync = off$//' "$PGDIR/root/pgdata/postgresql.conf"
PGDATA_BYTES=$(du -sb "$PGDIR/root/pgdata" | cut -f1)

((PGDATA_BYTES < FS_BYTES * 85 / 100)) ||
    die "the data directory ($PGDATA_BYTES bytes) does not fit the filesystem ($FS_BYTES); lower PGBENCH_SCALE"
echo "== image: ext4 with the data directory, random, zeros"
mkfs.ext4 -q -F -L keelbench -d "$PGDIR/root" "$WORK/fs.ext4" "$((FS_BYTES >> 10))k" >"$WORK/mkfs.log" 2>&1 ||
    {
        cat "$WORK/mkfs.log" >&2
        die "mkfs.ext4 -d failed"
    }
FS_USED_BYTES=$(dumpe2fs -h "$WORK/fs.ext4" 2>/dev/null | python3 -c '
import sys
f = dict(line.split(":", 1) for line in sys.stdin if ":" in line)
count, free, size = (int(f[k].strip()) for k in ("Block count", "Free blocks", "Block size"))
print((count - free) * size)')
rm -rf "$PGDIR"

image_tool build "$IMAGE" "$WORK/fs.ext4" "$RANDOM_BYTES" "$ZERO_BYTES" "$CHURN_SEED"
rm -f "$WORK/fs.ext4"
}

cache_key="gib=$GIB scale=$PGBENCH_SCALE seed=$CHURN_SEED"
if [[ -n $IMAGE_CACHE && -f $IMAGE_CACHE/image.raw && -f $IMAGE_CACHE/image.env &&
    $(sed -n 1p "$IMAGE_CACHE/image.env") == "# $cache_key" ]]; then
    echo "== image from the cache $IMAGE_CACHE ($cache_key)"
    cp --reflink=auto "$IMAGE_CACHE/image.raw" "$IMAGE"
    # shellcheck disable=SC1091
    source "$IMAGE_CACHE/image.env"
else
    build_image
    if [[ -n $IMAGE_CACHE ]]; then
        mkdir -p "$IMAGE_CACHE"
        cp --reflink=auto "$IMAGE" "$IMAGE_CACHE/image.raw"
        printf '# %s\nPGDATA_BYTES=%s\nFS_USED_BYTES=%s\n' "$cache_key" "$PGDATA_BYTES" "$FS_USED_BYTES" >"$IMAGE_CACHE/image.env"
    fi
fi
PRISTINE_SUM=$(cksum <"$IMAGE")

churn() {
    image_tool churn "$IMAGE" "$PAGES" "$UNDO" "$CHURN_SEED"
}
revert() {
    image_tool revert "$IMAGE" "$PAGES" "$UNDO"
    [[ $(cksum <"$IMAGE") == "$PRISTINE_SUM" ]] || die "the image did not return to its pristine state"
}
# check_restore FILE: the restored file must equal the churned image.
check_restore() {
    cmp "$IMAGE" "$1" || die "$1 differs from the image"
}

churn
CHANGED_PAGES=$(wc -l <"$PAGES")
revert
python3 - "$RESULTS/composition.json" <<EOF
import json, sys
json.dump({
    "image_bytes": $IMAGE_BYTES, "ext4_bytes": $FS_BYTES, "ext4_used_bytes": $FS_USED_BYTES,
    "pgdata_bytes": $PGDATA_BYTES, "pgbench_scale": $PGBENCH_SCALE, "random_bytes": $RANDOM_BYTES,
    "zero_bytes": $ZERO_BYTES, "churn_pages": $CHANGED_PAGES, "page_bytes": 8192, "churn_seed": $CHURN_SEED,
    "drop_caches": bool($DROP_CACHES), "keel_threads": $KEEL_THREADS, "keel_zstd": $KEEL_ZSTD,
}, open(sys.argv[1], "w"))
EOF
echo "   ext4 $((FS_BYTES >> 20)) MiB ($((FS_USED_BYTES >> 20)) MiB used; data directory $((PGDATA_BYTES >> 20)) MiB)," \
    "random $((RANDOM_BYTES >> 20)) MiB, zeros $((ZERO_BYTES >> 20)) MiB; churn: $CHANGED_PAGES pages of 8 KiB"
((DROP_CACHES)) && echo "   page caches dropped before every timed step" ||
    echo "   page caches NOT dropped (/proc/sys/vm/drop_caches not writable)"

disk_baseline() {
    measure "disk-write-r$1" dd if=/dev/zero of="$WORK/dd.img" bs=1M count=$((IMAGE_BYTES >> 20)) conv=fdatasync
    rm -f "$WORK/dd.img"
}
disk_baseline 1

# --- keel -----------------------------------------------------------------------------
if [[ " $SYSTEMS " == *" keel "* ]]; then
    for chunk in $KEEL_CHUNK_SIZES; do
        echo "== keel, chunk size $chunk"
        repo=$WORK/keel-repo
        name=keel-$chunk
        measure "$name-full" "$SNAPSHOT_BENCH_BIN" full --image "$IMAGE" --repo "$repo" --chunk-size "$chunk" \
            --zstd "$KEEL_ZSTD" --threads "$KEEL_THREADS"
        repo_size "$name-full" "$repo"
        churn
        measure "$name-incr" "$SNAPSHOT_BENCH_BIN" incr --image "$IMAGE" --repo "$repo" --changed-pages "$PAGES" \
            --zstd "$KEEL_ZSTD" --threads "$KEEL_THREADS"
        repo_size "$name-incr" "$repo"
        measure "$name-restore" "$SNAPSHOT_BENCH_BIN" restore --repo "$repo" --to "$WORK/restored.img" \
            --threads "$KEEL_THREADS"
        check_restore "$WORK/restored.img"
        rm -rf "$repo" "$WORK/restored.img"
        revert
    done
fi

# --- restic ---------------------------------------------------------------------------
if [[ " $SYSTEMS " == *" restic "* ]]; then
    echo "== restic $(restic version | cut -d' ' -f2)"
    export RESTIC_REPOSITORY=$WORK/restic-repo RESTIC_PASSWORD=keel-bench RESTIC_CACHE_DIR=$WORK/restic-cache
    restic init --repository-version 2 >"$WORK/restic-init.log" 2>&1 || die "restic init failed"
    measure restic-full restic backup --host bench "$IMAGE"
    repo_size restic-full "$RESTIC_REPOSITORY"
    churn
    measure restic-incr restic backup --host bench "$IMAGE"
    repo_size restic-incr "$RESTIC_REPOSITORY"
    # restic restores to TARGET/<the file's absolute path>.
    out=$WORK/restic-out$IMAGE
    measure restic-restore sh -c 'restic restore latest --target "$1" && sync "$2"' sh "$WORK/restic-out" "$out"
    check_restore "$out"
    rm -rf "$RESTIC_REPOSITORY" "$RESTIC_CACHE_DIR" "$WORK/restic-out"
    revert
fi

# --- borg -----------------------------------------------------------------------------
if [[ " $SYSTEMS " == *" borg "* ]]; then
    echo "== $(borg --version)"
    export BORG_REPO=$WORK/borg-repo BORG_PASSPHRASE=keel-bench BORG_BASE_DIR=$WORK/borg-home
    borg init -e repokey-blake2 >"$WORK/borg-init.log" 2>&1 || die "borg init failed"
    measure borg-full borg create --compression zstd,3 ::full "$IMAGE"
    repo_size borg-full "$BORG_REPO"
    churn
    measure borg-incr borg create --compression zstd,3 ::incr "$IMAGE"
    repo_size borg-incr "$BORG_REPO"
    # borg extracts to the current directory, under the path without its leading /.
    mkdir -p "$WORK/borg-out"
    out=$WORK/borg-out$IMAGE
    measure borg-restore sh -c 'cd "$1" && borg extract --sparse ::incr && sync "$2"' sh "$WORK/borg-out" "$out"
    check_restore "$out"
    rm -rf "$BORG_REPO" "$BORG_BASE_DIR" "$WORK/borg-out"
    revert
fi

disk_baseline 2

echo
echo "keel $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff-index --quiet HEAD -- 2>/dev/null || echo '+uncommitted')," \
    "$(nproc) CPUs, $(uname -r), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
python3 "$HERE/report.py" snapshot "$RESULTS"

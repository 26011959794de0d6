#!/usr/bin/env bash
# Keel next to its physical limit and next to a plain NBD server, on the same disk.
#
# Runs the same fio workloads against
#   plain   a file on the disk: O_DIRECT libaio for throughput; for the write+flush latency
#           twice, buffered pwrite + fdatasync (psync: what a single-threaded database
#           does) and O_DIRECT write + fdatasync through io_uring (the device's flush cost)
#   nbdkit  nbdkit's `file` plugin over NBD on a Unix socket (fio --ioengine=nbd)
#   keel    `keel daemon` over NBD on a Unix socket (fio --ioengine=nbd)
# and prints tables with absolute numbers and the ratios the project targets
# (report.py):
#   seq write MiB/s and 4K randwrite IOPS: keel >= 0.9x nbdkit
#   4K write+flush p50:                    keel flush <= 1.2x plain fdatasync
#
# Read the latency table with care on small VMs: there a task sleeping in fdatasync is
# often woken one host tick (~4 ms) late, so a p50 can land on either side of that step.
# The latency runs therefore alternate between targets, and the means and pairs/s are
# steadier than the p50s; docs/benchmarks.md has the details.
#
# Usage: benches/compare/run.sh            (about 2 minutes)
# Environment:
#   KEEL_BENCH_DIR   parent of the scratch directory (default /var/tmp; must be a real disk)
#   KEEL_BIN         keel binary (default: target/release/keel, built first)
#   KEEL_IO_BACKEND  io_backend in Keel's config: posix (default) or uring
#   SEQ_SIZE         bytes written by the sequential job and range of the random ones (1g)
#   RAND_RUNTIME     seconds of 4K random writes (15)
#   LAT_RUNTIME      seconds of each write+flush latency run (8)
#   LAT_ROUNDS       rounds of latency runs over all targets (2)
#   KEEP_RESULTS     copy fio's JSON and the servers' logs into this directory
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BASE=${KEEL_BENCH_DIR:-/var/tmp}
IO_BACKEND=${KEEL_IO_BACKEND:-posix}
SEQ_SIZE=${SEQ_SIZE:-1g}
RAND_RUNTIME=${RAND_RUNTIME:-15}
LAT_RUNTIME=${LAT_RUNTIME:-8}
LAT_ROUNDS=${LAT_ROUNDS:-2}
KEEP_RESULTS=${KEEP_RESULTS:-}

die() {
    echo "run.sh: $*" >&2
    exit 1
}
for tool in fio nbdkit python3; do
    command -v "$tool" >/dev/null || die "$tool not found in PATH"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine (it needs fio built with libnbd)"

if [[ -z ${KEEL_BIN:-} ]]; then
    echo "== building keel (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin keel)
    KEEL_BIN=$ROOT/target/release/keel
fi
[[ -x $KEEL_BIN ]] || die "keel binary $KEEL_BIN is not executable"

mkdir -p "$BASE"
WORK=$(mktemp -d "$BASE/keel-compare.XXXXXX")
PIDS=()

# Stops one process we started: SIGTERM, up to 60 s (Keel checkpoints on the way out),
# then SIGKILL.
stop_pid() {
    local pid=$1
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 600); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "run.sh: pid $pid ignored SIGTERM for 60 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    if [[ -n $KEEP_RESULTS && -d $WORK ]]; then
        mkdir -p "$KEEP_RESULTS"
        cp "$WORK"/*.json "$WORK"/*.log "$WORK"/*.server_cpu "$KEEP_RESULTS"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() {
    local keep=() pid
    for pid in "${PIDS[@]}"; do
        [[ $pid == "$1" ]] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

# Waits until the Unix socket accepts connections, or fails if the server dies.
wait_socket() {
    local socket=$1 pid=$2 log=$3
    for _ in $(seq 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -20 "$log" >&2
            die "server (pid $pid) exited before listening"
        fi
        if python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$socket" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    tail -20 "$log" >&2
    die "server (pid $pid) did not listen on $socket within 30 s"
}

# CPU seconds (user + system, all threads) a process has used so far.
cpu_seconds() {
    python3 -c '
import os, sys
fields = open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")", 1)[1].split()
# utime, stime, cutime, cstime are fields 14-17 of the line, 11-14 after the name.
print(sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK"))' "$1"
}

# run_job TARGET JOB SERVER_PID|- FIO_ARGS...: one fio run into $WORK/TARGET-JOB.json, and
# the server's CPU time during it into $WORK/TARGET-JOB.server_cpu.
run_job() {
    local target=$1 job=$2 server_pid=$3
    shift 3
    # Start every job without the previous job's dirty pages still being written back.
    sync
    local before=0
    if [[ $server_pid != - ]]; then
        before=$(cpu_seconds "$server_pid")
    fi
    echo "   $target $job"
    if ! fio --name="$job" --output-format=json --output="$WORK/$target-$job.json" "$@" \
        >"$WORK/$target-$job.fio.log" 2>&1; then
        cat "$WORK/$target-$job.fio.log" >&2
        die "fio failed: $target $job"
    fi
    if [[ $server_pid != - ]]; then
        python3 -c "print($(cpu_seconds "$server_pid") - $before)" >"$WORK/$target-$job.server_cpu"
    fi
}

# throughput TARGET SERVER_PID|- FIO_ARGS_ARRAY: the sequential and the random write jobs.
throughput() {
    local target=$1 server_pid=$2
    local -n args=$3
    # Twice: first into fresh (sparse) storage, then over the same range again. On a VM
    # the first pass also pays for the guest's first touch of page-cache memory, which
    # varies with the host from run to run; the second pass is the steady state.
    run_job "$target" seq "$server_pid" "${args[@]}" --rw=write --bs=1m --iodepth=8 --size="$SEQ_SIZE" --end_fsync=1
    run_job "$target" seq2 "$server_pid" "${args[@]}" --rw=write --bs=1m --iodepth=8 --size="$SEQ_SIZE" --end_fsync=1
    run_job "$target" rand "$server_pid" "${args[@]}" --rw=randwrite --bs=4k --iodepth=32 --size="$SEQ_SIZE" \
        --time_based --runtime="$RAND_RUNTIME"
}

# latency TARGET JOB SERVER_PID|- FIO_ARGS_ARRAY: 4 KiB write + flush at depth 1.
latency() {
    local target=$1 job=$2 server_pid=$3
    local -n args=$4
    run_job "$target" "$job" "$server_pid" "${args[@]}" --rw=randwrite --bs=4k --iodepth=1 --size="$SEQ_SIZE" \
        --time_based --runtime="$LAT_RUNTIME"
}

echo "== scratch directory $WORK ($(df --output=source,fstype "$WORK" | tail -1 | tr -s ' '))"

# Every target starts from a sparse 4 GiB file (a fresh volume for Keel); its sequential
# job lays down the range that the random and latency jobs then overwrite.
echo "== throughput: plain file"
truncate -s 4G "$WORK/plain.img"
# shellcheck disable=SC2034 # arrays below are used through namerefs
plain_tput=(--filename="$WORK/plain.img" --ioengine=libaio --direct=1)
throughput plain - plain_tput

echo "== throughput: nbdkit file plugin"
truncate -s 4G "$WORK/nbdkit.img"
nbdkit --foreground --unix "$WORK/nbdkit.sock" file "$WORK/nbdkit.img" >"$WORK/nbdkit.log" 2>&1 &
NBDKIT_PID=$!
PIDS+=("$NBDKIT_PID")
wait_socket "$WORK/nbdkit.sock" "$NBDKIT_PID" "$WORK/nbdkit.log"
# shellcheck disable=SC2034
nbdkit_args=(--ioengine=nbd --uri="nbd+unix:///?socket=$WORK/nbdkit.sock")
throughput nbdkit "$NBDKIT_PID" nbdkit_args

echo "== throughput: keel daemon (io_backend = $IO_BACKEND)"
mkdir -p "$WORK/keel"
cat >"$WORK/keel/node.toml" <<EOF
node_name = "bench"
data_dir = "$WORK/keel/data"
nbd_socket = "$WORK/keel/nbd.sock"
io_backend = "$IO_BACKEND"
[[volume]]
name = "bench"
size = "4GiB"
EOF
"$KEEL_BIN" daemon --config "$WORK/keel/node.toml" >"$WORK/keel.log" 2>&1 &
KEEL_PID=$!
PIDS+=("$KEEL_PID")
wait_socket "$WORK/keel/nbd.sock" "$KEEL_PID" "$WORK/keel.log"
# shellcheck disable=SC2034
keel_args=(--ioengine=nbd --uri="nbd+unix:///bench?socket=$WORK/keel/nbd.sock")
throughput keel "$KEEL_PID" keel_args

# Latency runs alternate between the targets, in reverse order every other round, so that a
# change in the machine's mood (see the header) hits all of them alike.
# shellcheck disable=SC2034
plain_lat_buffered=(--filename="$WORK/plain.img" --ioengine=psync --fdatasync=1)
# io_uring runs the fdatasync on a kernel worker, as nbdkit and Keel run theirs on a server
# thread; O_DIRECT leaves only the device cache flush to it.
# shellcheck disable=SC2034
plain_lat_direct=(--filename="$WORK/plain.img" --ioengine=io_uring --direct=1 --fdatasync=1)
# fio's nbd engine sends each fsync as an NBD FLUSH.
# shellcheck disable=SC2034
nbdkit_lat=("${nbdkit_args[@]}" --fsync=1)
# shellcheck disable=SC2034
keel_lat=("${keel_args[@]}" --fsync=1)
order=("plain lat - plain_lat_buffered" "plain latdirect - plain_lat_direct" "nbdkit lat $NBDKIT_PID nbdkit_lat"
    "keel lat $KEEL_PID keel_lat")
for round in $(seq "$LAT_ROUNDS"); do
    echo "== latency, round $round"
    for i in 0 1 2 3; do
        ((round % 2)) || i=$((3 - i))
        read -r target job pid args <<<"${order[$i]}"
        latency "$target" "$job-r$round" "$pid" "$args"
    done
done

stop_pid "$KEEL_PID"
forget_pid "$KEEL_PID"
stop_pid "$NBDKIT_PID"
forget_pid "$NBDKIT_PID"

echo
echo "keel $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (io_backend $IO_BACKEND)," \
    "$(nproc) CPUs, $(uname -r), $(fio --version), $(nbdkit --version | head -1), load average" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
echo
python3 "$HERE/report.py" "$WORK" "$SEQ_SIZE" "$RAND_RUNTIME" "$LAT_RUNTIME" "$LAT_ROUNDS"

#!/usr/bin/env bash
# Synchronous replication next to a single node, the transport's limits, and PostgreSQL's
# own synchronous streaming replication, all in one run on one machine.
#
# Targets (report.py replication prints them with ✓/✗):
#   4K write+flush:  replicated keel flush p50 <= single-node keel flush p50 + 1.5 x QUIC RTT
#   seq write 1M:    replicated keel MiB/s >= 0.8 x quinn bulk MiB/s on this machine
#   pgbench:         PostgreSQL on replicated keel TPS >= 0.8 x PostgreSQL sync replication TPS
#
# What runs:
#   quic     target/release/quic-probe: QUIC ping-pong (64 B and 4 KiB out, 8 B back) and a
#            1 GiB bulk transfer between two processes on 127.0.0.1, with the transport
#            settings replication uses. Once before and once after the fio phase.
#   single   `keel daemon` with a 1 GiB volume without peer (same settings as keel up's nodes)
#   repl     `keel up`: witness, node-a primary, node-b standby, 1 GiB volume "demo"
#   plain    a file on the same disk (buffered pwrite + fdatasync: what a database does)
#   fio      seq write 1M qd8 over the whole 1 GiB with end_fsync (fresh, then SEQ_ROUNDS
#            overwrites, alternating targets), then 4K randwrite qd1 with an NBD FLUSH
#            (fdatasync for the plain file) after every write, LAT_ROUNDS rounds alternating
#            targets in reverse order every other round
#   pgbench  PostgreSQL 15 three ways, each initialised with pgbench -i -s PGBENCH_SCALE:
#              pgsync  primary + standby on local disk, synchronous_commit = on,
#                      synchronous_standby_names = standby1 (pg_basebackup -R)
#              single  data directory on ext4 on a loop device (--direct-io=on) on nbdfuse
#                      on the single-node volume
#              repl    the same stack on the replicated volume
#            then PGBENCH_ROUNDS rounds of pgbench -c PGBENCH_CLIENTS -j 2 -T PGBENCH_DURATION,
#            alternating setups, with a CHECKPOINT before each run. Same postgresql.conf for
#            all (max_wal_size = 256MB: the Keel volume is 1 GiB).
#
# Usage: benches/compare/replication.sh [all|fio|pgbench]   (all: about 12 minutes)
# Needs root (loop devices, mounts), fio with the nbd engine, nbdfuse, python3 and
# postgresql-15; the pgbench phase takes the machine-wide mount lock the tests use.
# Environment:
#   KEEL_BENCH_DIR     parent of the scratch directory (default /var/tmp; a real disk)
#   KEEL_BIN, QUIC_PROBE_BIN  binaries (default: target/release/{keel,quic-probe}, built first)
#   SEQ_ROUNDS         overwrite passes of the sequential job per target (2)
#   LAT_RUNTIME        seconds of each write+flush run (10)
#   LAT_ROUNDS         rounds of write+flush runs over the targets (3)
#   QUIC_ITERATIONS    round trips per ping-pong size (20000)
#   QUIC_BULK_MIB      MiB per bulk run (1024), QUIC_BULK_RUNS runs per probe (3)
#   PGBENCH_SCALE (20), PGBENCH_CLIENTS (8), PGBENCH_DURATION seconds (60), PGBENCH_ROUNDS (2)
#   KEEP_RESULTS       copy the raw results (fio JSON, probe JSON lines, pgbench output) here
#   KEEL_UP_SUPERVISOR pause (default) or run: whether `keel up`'s own process keeps polling
#                      the nodes' status during the measurements. Its poll can deadlock the
#                      primary while a sequential write holds the ship queue full (a known bug,
#                      see docs/benchmarks.md "Replication"); pausing it (SIGSTOP, SIGCONT at
#                      the end) leaves the witness and the two nodes exactly as keel up made them.
#   FIO_TIMEOUT        seconds after which one fio job counts as hung and the run fails (300)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PHASES=${1:-all}
BASE=${KEEL_BENCH_DIR:-/var/tmp}
SEQ_ROUNDS=${SEQ_ROUNDS:-2}
LAT_RUNTIME=${LAT_RUNTIME:-10}
LAT_ROUNDS=${LAT_ROUNDS:-3}
QUIC_ITERATIONS=${QUIC_ITERATIONS:-20000}
QUIC_BULK_MIB=${QUIC_BULK_MIB:-1024}
QUIC_BULK_RUNS=${QUIC_BULK_RUNS:-3}
PGBENCH_SCALE=${PGBENCH_SCALE:-20}
PGBENCH_CLIENTS=${PGBENCH_CLIENTS:-8}
PGBENCH_DURATION=${PGBENCH_DURATION:-60}
PGBENCH_ROUNDS=${PGBENCH_ROUNDS:-2}
KEEP_RESULTS=${KEEP_RESULTS:-}
KEEL_UP_SUPERVISOR=${KEEL_UP_SUPERVISOR:-pause}
FIO_TIMEOUT=${FIO_TIMEOUT:-300}
PGBIN=/usr/lib/postgresql/15/bin
VOLUME_BYTES=$((1 << 30)) # keel up's demo volume; the single node gets the same size

die() {
    echo "replication.sh: $*" >&2
    exit 1
}
case $PHASES in
all | fio | pgbench) ;;
*) die "unknown phase $PHASES (all, fio or pgbench)" ;;
esac
for tool in fio python3; do
    command -v "$tool" >/dev/null || die "$tool not found in PATH"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine (it needs fio built with libnbd)"
if [[ $PHASES != fio ]]; then
    [[ $(id -u) == 0 ]] || die "the pgbench phase needs root (loop devices, mounts); run with 'fio' to skip it"
    for tool in nbdfuse losetup mkfs.ext4 runuser flock; do
        command -v "$tool" >/dev/null || die "$tool not found in PATH"
    done
    [[ -x $PGBIN/postgres ]] || die "PostgreSQL 15 is not installed ($PGBIN)"
    id postgres >/dev/null 2>&1 || die "there is no postgres user"
fi

if [[ -z ${KEEL_BIN:-} || -z ${QUIC_PROBE_BIN:-} ]]; then
    echo "== building keel and quic-probe (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin keel --bin quic-probe)
fi
KEEL_BIN=${KEEL_BIN:-$ROOT/target/release/keel}
QUIC_PROBE_BIN=${QUIC_PROBE_BIN:-$ROOT/target/release/quic-probe}
[[ -x $KEEL_BIN ]] || die "keel binary $KEEL_BIN is not executable"
[[ -x $QUIC_PROBE_BIN ]] || die "quic-probe binary $QUIC_PROBE_BIN is not executable"

mkdir -p "$BASE"
WORK=$(mktemp -d "$BASE/keel-replication.XXXXXX")
# PostgreSQL runs as postgres and must reach its directories under here.
chmod 755 "$WORK"
RESULTS=$WORK/results
mkdir -p "$RESULTS"

PIDS=()          # servers we started (keel daemon, keel up, then keel up's children), stopped last
PG_DIRS=()       # running PostgreSQL data directories, stopped first
MOUNTS=()        # "mountpoint loopdev nbdfuse_pid fuse_dir", torn down in between

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
            echo "replication.sh: pid $pid ignored SIGTERM for 60 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

# Stops a PostgreSQL cluster: fast shutdown, else immediate, else SIGKILL to the
# postmaster and every backend (killing only the postmaster leaves backends behind).
pg_stop() {
    local dir=$1 pid
    [[ -f $dir/postmaster.pid ]] || return 0
    pid=$(head -1 "$dir/postmaster.pid")
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$dir" stop -m fast -t 60 >/dev/null 2>&1 ||
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$dir" stop -m immediate -t 20 >/dev/null 2>&1 || {
        pkill -KILL -P "$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
    }
}

# umount -l, losetup -d, then end nbdfuse (the order that never hangs when the server
# under the mount is gone).
teardown_mount() {
    local mountpoint=$1 loopdev=$2 fuse_pid=$3 fuse_dir=$4
    if mountpoint -q "$mountpoint"; then
        umount -l "$mountpoint" || true
    fi
    [[ $loopdev == - ]] || losetup -d "$loopdev" 2>/dev/null || true
    fusermount3 -u "$fuse_dir" 2>/dev/null || fusermount3 -u -z "$fuse_dir" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$fuse_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$fuse_pid" 2>/dev/null || true
    wait "$fuse_pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local item pid
    for item in "${PG_DIRS[@]}"; do
        pg_stop "$item"
    done
    for item in "${MOUNTS[@]}"; do
        # shellcheck disable=SC2086 # four words on purpose
        teardown_mount $item
    done
    for pid in "${PIDS[@]}"; do
        # keel up's supervisor may be paused; a stopped process cannot act on SIGTERM.
        kill -CONT "$pid" 2>/dev/null || true
        stop_pid "$pid"
    done
    if [[ -n $KEEP_RESULTS && -d $RESULTS ]]; then
        mkdir -p "$KEEP_RESULTS"
        cp -r "$RESULTS"/. "$KEEP_RESULTS"/ 2>/dev/null || true
        cp "$WORK"/*.log "$WORK"/pglogs/*.log "$KEEP_RESULTS"/ 2>/dev/null || true
        for node in "$WORK"/up/*/; do
            cp "$node/keel.log" "$KEEP_RESULTS/up-$(basename "$node").log" 2>/dev/null || true
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

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

# CPU seconds (user + system, all threads) each of the given processes has used so far,
# as one JSON list.
cpu_seconds() {
    python3 -c '
import json, os, sys
def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime are fields 14-17 of the line, 11-14 after the name.
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
print(json.dumps([cpu(p) for p in sys.argv[1:]]))' "$@"
}

# Server processes of each target, for the CPU columns ("-" for none).
declare -A SERVER_PIDS=([plain]=-)

# run_job TARGET JOB FIO_ARGS...: one fio run into $RESULTS/TARGET-JOB.json and the
# servers' CPU seconds during it into $RESULTS/TARGET-JOB.server_cpu (a JSON list).
run_job() {
    local target=$1 job=$2
    shift 2
    local pids=${SERVER_PIDS[$target]}
    sync
    local before=[]
    # shellcheck disable=SC2086 # a list of pids
    [[ $pids == - ]] || before=$(cpu_seconds $pids)
    echo "   $target $job"
    if ! timeout -s KILL "$FIO_TIMEOUT" fio --name="$job" --output-format=json \
        --output="$RESULTS/$target-$job.json" "$@" >"$WORK/$target-$job.fio.log" 2>&1; then
        cat "$WORK/$target-$job.fio.log" >&2
        die "fio failed or hung for $FIO_TIMEOUT s: $target $job"
    fi
    if [[ $pids != - ]]; then
        # shellcheck disable=SC2086
        python3 -c 'import json, sys; print(json.dumps([b - a for a, b in zip(json.loads(sys.argv[1]), json.loads(sys.argv[2]))]))' \
            "$before" "$(cpu_seconds $pids)" >"$RESULTS/$target-$job.server_cpu"
    fi
}

quic_probe() {
    local round=$1
    echo "== QUIC probe, round $round"
    "$QUIC_PROBE_BIN" --iterations "$QUIC_ITERATIONS" --bulk-mib "$QUIC_BULK_MIB" --bulk-runs "$QUIC_BULK_RUNS" \
        >"$RESULTS/quic-r$round.jsonl" 2>"$WORK/quic-r$round.log" || {
        cat "$WORK/quic-r$round.log" >&2
        die "quic-probe failed"
    }
}

echo "== scratch directory $WORK ($(df --output=source,fstype "$WORK" | tail -1 | tr -s ' '))"

# The probe saturates both CPUs for seconds; run it while no Keel node is up, so that it
# cannot starve the pair's heartbeats (it did: the primary marked its standby Outdated).
[[ $PHASES == pgbench ]] || quic_probe 1

# --- the two Keel deployments ---------------------------------------------------------
echo "== starting a single-node keel daemon"
mkdir -p "$WORK/single"
cat >"$WORK/single/keel.toml" <<EOF
node_name = "single"
data_dir = "$WORK/single/data"
nbd_socket = "$WORK/single/nbd.sock"
io_backend = "posix"
checkpoint_interval_secs = 10
[[volume]]
name = "demo"
size = "1GiB"
EOF
"$KEEL_BIN" daemon --config "$WORK/single/keel.toml" >"$WORK/single.log" 2>&1 &
SINGLE_PID=$!
PIDS+=("$SINGLE_PID")
wait_socket "$WORK/single/nbd.sock" "$SINGLE_PID" "$WORK/single.log"
SINGLE_URI="nbd+unix:///demo?socket=$WORK/single/nbd.sock"
SERVER_PIDS[single]=$SINGLE_PID

echo "== starting keel up (witness, primary, standby)"
"$KEEL_BIN" up --dir "$WORK/up" >"$WORK/up.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
for _ in $(seq 1800); do
    [[ -f $WORK/up/up.json ]] && break
    kill -0 "$UP_PID" 2>/dev/null || {
        cat "$WORK/up.log" >&2
        die "keel up exited before the pair was ready"
    }
    sleep 0.1
done
[[ -f $WORK/up/up.json ]] || die "keel up did not write up.json within 180 s"
read -r REPL_URI PRIMARY_PID STANDBY_PID WITNESS_PID < <(python3 -c '
import json, sys
state = json.load(open(sys.argv[1]))
nodes = {n["role"]: n["pid"] for n in state["nodes"]}
print(state["volumes"][0]["nbd_uri"], nodes["primary"], nodes["standby"], nodes["witness"])' "$WORK/up/up.json")
SERVER_PIDS[repl]="$PRIMARY_PID $STANDBY_PID"
# After keel up itself (which stops them in order), in case it cannot: nodes, then witness.
PIDS+=("$PRIMARY_PID" "$STANDBY_PID" "$WITNESS_PID")
if [[ $KEEL_UP_SUPERVISOR == pause ]]; then
    kill -STOP "$UP_PID"
    echo "   keel up's supervisor (pid $UP_PID) paused during the measurements (KEEL_UP_SUPERVISOR)"
fi
echo "   replicated volume: $REPL_URI (primary pid $PRIMARY_PID, standby pid $STANDBY_PID)"

# shellcheck disable=SC2034 # used through namerefs
single_args=(--ioengine=nbd --uri="$SINGLE_URI")
# shellcheck disable=SC2034
repl_args=(--ioengine=nbd --uri="$REPL_URI")
# shellcheck disable=SC2034
plain_args=(--filename="$WORK/plain.img")

# --- fio: sequential throughput and write+flush latency --------------------------------
# repl_health LABEL: the replicated pair's state before a measurement, one line in
# health.txt (report.py flags any line that is not "primary 1 UpToDate"). Only asked while
# the pair is idle: see KEEL_UP_SUPERVISOR.
repl_health() {
    "$KEEL_BIN" status --json --config "$WORK/up/node-a/keel.toml" 2>/dev/null | python3 -c '
import json, sys
try:
    v = next(v for v in json.load(sys.stdin)["volumes"] if v["name"] == "demo")
    print(sys.argv[1], v["role"], v["epoch"], v["peer"]["state"])
except Exception as e:
    print(sys.argv[1], "unknown", e)' "$1" >>"$RESULTS/health.txt"
}

if [[ $PHASES != pgbench ]]; then
    echo "== sequential write, 1 MiB qd8, 1 GiB, end_fsync"
    # The plain file only needs its range laid down for the latency runs.
    run_job plain seq --filename="$WORK/plain.img" --ioengine=psync --rw=write --bs=1m --size=1g --end_fsync=1
    seq_job() {
        local target=$1 job=$2
        local -n args=${target}_args
        [[ $target != repl ]] || repl_health "$job"
        run_job "$target" "$job" "${args[@]}" --rw=write --bs=1m --iodepth=8 --size=1g --end_fsync=1
    }
    seq_job single seq
    seq_job repl seq
    for round in $(seq "$SEQ_ROUNDS"); do
        if ((round % 2)); then order=(repl single); else order=(single repl); fi
        for target in "${order[@]}"; do
            seq_job "$target" "seq-over-r$round"
        done
    done

    lat_job() {
        local target=$1 round=$2
        local -n args=${target}_args
        [[ $target != repl ]] || repl_health "lat-r$round"
        if [[ $target == plain ]]; then
            run_job plain "lat-r$round" "${args[@]}" --ioengine=psync --fdatasync=1 \
                --rw=randwrite --bs=4k --iodepth=1 --size=1g --time_based --runtime="$LAT_RUNTIME"
        else
            # fio's nbd engine sends each fsync as an NBD FLUSH.
            run_job "$target" "lat-r$round" "${args[@]}" --fsync=1 \
                --rw=randwrite --bs=4k --iodepth=1 --size=1g --time_based --runtime="$LAT_RUNTIME"
        fi
    }
    for round in $(seq "$LAT_ROUNDS"); do
        echo "== write+flush latency, round $round"
        if ((round % 2)); then order=(plain single repl); else order=(repl single plain); fi
        for target in "${order[@]}"; do
            lat_job "$target" "$round"
        done
    done
fi

# --- pgbench ----------------------------------------------------------------------------
if [[ $PHASES != fio ]]; then
    exec 9>/tmp/keel-tests-mount.lock
    echo "== waiting for the machine-wide mount lock (/tmp/keel-tests-mount.lock)"
    flock -w 600 9 || die "the mount lock stayed taken for 10 minutes"
    SOCKDIR=$WORK/pgsock
    PGLOGS=$WORK/pglogs
    mkdir -p "$SOCKDIR" "$PGLOGS"
    chown postgres: "$SOCKDIR" "$PGLOGS"

    # pg_init DATADIR PORT [EXTRA_CONF]: initdb and start a cluster on a Unix socket only.
    pg_init() {
        local dir=$1 port=$2 extra=${3:-}
        mkdir -p "$dir"
        chown postgres: "$dir"
        chmod 700 "$dir"
        local log
        log=$PGLOGS/$(echo "${dir#"$WORK"/}" | tr / -)
        runuser -u postgres -- "$PGBIN/initdb" -D "$dir" --data-checksums --auth=trust -U postgres \
            --locale=C -E UTF8 >"$log.initdb.log" 2>&1 || {
            cat "$log.initdb.log" >&2
            die "initdb $dir failed"
        }
        cat >>"$dir/postgresql.conf" <<EOF
listen_addresses = ''
port = $port
unix_socket_directories = '$SOCKDIR'
max_wal_size = 256MB
$extra
EOF
        pg_start "$dir"
    }
    pg_start() {
        local dir=$1 log
        log=$PGLOGS/$(echo "${dir#"$WORK"/}" | tr / -).log
        PG_DIRS+=("$dir")
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$dir" -l "$log" -w -t 300 start >/dev/null || {
            cat "$log" >&2
            die "PostgreSQL in $dir did not start"
        }
    }
    psql_at() {
        local port=$1
        shift
        runuser -u postgres -- "$PGBIN/psql" -h "$SOCKDIR" -p "$port" -U postgres -X -q -At "$@"
    }
    pgbench_init() {
        local name=$1 port=$2
        echo "   $name: pgbench -i -s $PGBENCH_SCALE"
        runuser -u postgres -- "$PGBIN/pgbench" -h "$SOCKDIR" -p "$port" -U postgres -i -q -s "$PGBENCH_SCALE" \
            postgres >"$WORK/$name.pgbench-init.log" 2>&1 || {
            cat "$WORK/$name.pgbench-init.log" >&2
            die "pgbench -i failed on $name"
        }
        psql_at "$port" -c CHECKPOINT
    }
    # mount_keel NAME URI: nbdfuse + loop (direct I/O) + ext4, mounted at $WORK/NAME/fs.
    mount_keel() {
        local name=$1 uri=$2
        local fuse_dir=$WORK/$name/fuse mnt=$WORK/$name/fs
        mkdir -p "$fuse_dir" "$mnt"
        nbdfuse "$fuse_dir/vol" "$uri" >"$WORK/$name.nbdfuse.log" 2>&1 &
        local fuse_pid=$!
        MOUNTS+=("$mnt - $fuse_pid $fuse_dir")
        for _ in $(seq 300); do
            [[ $(stat -c %s "$fuse_dir/vol" 2>/dev/null) == "$VOLUME_BYTES" ]] && break
            kill -0 "$fuse_pid" 2>/dev/null || die "nbdfuse for $name exited: $(cat "$WORK/$name.nbdfuse.log")"
            sleep 0.1
        done
        local dev
        dev=$(losetup --direct-io=on -f --show "$fuse_dir/vol")
        MOUNTS[-1]="$mnt $dev $fuse_pid $fuse_dir"
        [[ $(losetup --noheadings -O DIO "$dev" | tr -d ' ') == 1 ]] || die "$dev has no direct I/O"
        mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
        mount -t ext4 "$dev" "$mnt"
        echo "   $name: $uri on nbdfuse, $dev, ext4 at $mnt"
    }

    echo "== pgbench setup: PostgreSQL synchronous replication on local disk"
    PORT_PGSYNC=54321 PORT_PGSYNC_STANDBY=54322 PORT_SINGLE=54323 PORT_REPL=54324
    pg_init "$WORK/pgsync/primary" $PORT_PGSYNC "synchronous_commit = on
synchronous_standby_names = 'standby1'"
    # Initialise before the standby exists, or the load waits for it for nothing.
    psql_at $PORT_PGSYNC -c "ALTER SYSTEM SET synchronous_standby_names = ''" -c "SELECT pg_reload_conf()" >/dev/null
    pgbench_init pgsync $PORT_PGSYNC
    psql_at $PORT_PGSYNC -c "ALTER SYSTEM RESET synchronous_standby_names" -c "SELECT pg_reload_conf()" >/dev/null
    install -d -o postgres -g postgres -m 700 "$WORK/pgsync/standby"
    runuser -u postgres -- "$PGBIN/pg_basebackup" -h "$SOCKDIR" -p $PORT_PGSYNC -U postgres \
        -D "$WORK/pgsync/standby" -R -X stream -c fast >"$WORK/pgsync.basebackup.log" 2>&1 || {
        cat "$WORK/pgsync.basebackup.log" >&2
        die "pg_basebackup failed"
    }
    # postgresql.auto.conf, where -R wrote its primary_conninfo: it is read last, so this wins.
    cat >>"$WORK/pgsync/standby/postgresql.auto.conf" <<EOF
port = $PORT_PGSYNC_STANDBY
primary_conninfo = 'host=$SOCKDIR port=$PORT_PGSYNC user=postgres application_name=standby1'
EOF
    pg_start "$WORK/pgsync/standby"
    for _ in $(seq 600); do
        state=$(psql_at $PORT_PGSYNC -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'")
        [[ $state == sync ]] && break
        sleep 0.1
    done
    [[ ${state:-} == sync ]] || die "the PostgreSQL standby did not become synchronous (state '${state:-}')"
    echo "   pgsync: standby1 is synchronous"

    echo "== pgbench setup: PostgreSQL on the single-node keel volume"
    mount_keel single "$SINGLE_URI"
    pg_init "$WORK/single/fs/pgdata" $PORT_SINGLE
    pgbench_init single $PORT_SINGLE

    echo "== pgbench setup: PostgreSQL on the replicated keel volume"
    mount_keel repl "$REPL_URI"
    pg_init "$WORK/repl/fs/pgdata" $PORT_REPL
    pgbench_init repl $PORT_REPL

    declare -A PG_PORT=([pgsync]=$PORT_PGSYNC [single]=$PORT_SINGLE [repl]=$PORT_REPL)
    for round in $(seq "$PGBENCH_ROUNDS"); do
        echo "== pgbench, round $round ($PGBENCH_CLIENTS clients, $PGBENCH_DURATION s)"
        if ((round % 2)); then order=(pgsync single repl); else order=(repl single pgsync); fi
        for name in "${order[@]}"; do
            port=${PG_PORT[$name]}
            [[ $name != repl ]] || repl_health "pgbench-r$round"
            psql_at "$port" -c CHECKPOINT
            sync
            echo "   $name"
            runuser -u postgres -- "$PGBIN/pgbench" -h "$SOCKDIR" -p "$port" -U postgres \
                -c "$PGBENCH_CLIENTS" -j 2 -T "$PGBENCH_DURATION" postgres \
                >"$RESULTS/pgbench-$name-r$round.txt" 2>&1 || {
                cat "$RESULTS/pgbench-$name-r$round.txt" >&2
                die "pgbench failed on $name"
            }
            grep -E '^tps' "$RESULTS/pgbench-$name-r$round.txt" | sed 's/^/     /'
        done
    done
    psql_at $PORT_PGSYNC -c "SELECT application_name, sync_state FROM pg_stat_replication" \
        >"$RESULTS/pgsync-replication.txt"
fi

stop_all_now() {
    local item
    for item in "${PG_DIRS[@]}"; do
        pg_stop "$item"
    done
    PG_DIRS=()
    for item in "${MOUNTS[@]}"; do
        # shellcheck disable=SC2086
        teardown_mount $item
    done
    MOUNTS=()
    # Check the pair stayed healthy (no failover, standby in sync) before stopping it.
    "$KEEL_BIN" status --json --config "$WORK/up/node-a/keel.toml" >"$RESULTS/keel-status.json" 2>/dev/null || true
    kill -CONT "$UP_PID" 2>/dev/null || true
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    PIDS=()
}
stop_all_now
[[ $PHASES == pgbench ]] || quic_probe 2

echo
echo "keel $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff-index --quiet HEAD -- 2>/dev/null || echo '+uncommitted')," \
    "$(nproc) CPUs, $(uname -r), $(fio --version), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
python3 "$HERE/report.py" replication "$RESULTS"

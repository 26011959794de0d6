#!/usr/bin/env bash
# What an incremental snapshot costs when little changed on a large volume: the "every few
# minutes" case. Two builds of snapshot-bench take the same snapshots of the same image in
# the same run, so their ratio is what the change between them bought.
#
# What runs:
#   image    a sparse file of SIZE (default 64G) whose first DATA (default 1G) are seeded
#            pseudo-random bytes; the rest reads as zeros (holes in every snapshot)
#   full     each build: a full snapshot into its own local vault
#   rounds   ROUNDS times (default 5): PAGES (default 100) random 8 KiB pages anywhere in
#            the image are overwritten with random bytes (the same pages for every build),
#            then each build takes an incremental of its newest snapshot, timed with the
#            page cache dropped (when root), and its vault's growth is measured (du)
#   builds   NEW_BIN (default target/release/snapshot-bench, built first) and, when given,
#            BASELINE_BIN (a snapshot-bench built from another commit, e.g.
#            `git worktree add /tmp/base <commit> && cargo build --release -p keel-benches`)
#
# Prints per build: the median incremental's wall time (the whole process: opening the
# vault and loading the parent's manifest count), CPU, and vault growth per incremental,
# and the new/baseline ratios. KEEP_RESULTS=DIR keeps the raw JSON lines and time -v output.
# Usage: SIZE=64G PAGES=100 ROUNDS=5 BASELINE_BIN=... benches/compare/small_change.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SIZE=${SIZE:-64G}
DATA=${DATA:-1G}
PAGES=${PAGES:-100}
ROUNDS=${ROUNDS:-5}
SEED=${SEED:-1}
die() { echo "small_change.sh: $*" >&2; exit 1; }
[[ -x /usr/bin/time ]] || die "/usr/bin/time (GNU time) is missing: apt-get install time"
command -v python3 >/dev/null || die "python3 is missing"

if [[ -z "${NEW_BIN:-}" ]]; then
    echo "== building snapshot-bench (release)"
    (cd "$ROOT" && cargo build --release --quiet -p keel-benches --bin snapshot-bench)
    NEW_BIN=$ROOT/target/release/snapshot-bench
fi
builds=("new=$NEW_BIN")
[[ -n "${BASELINE_BIN:-}" ]] && builds+=("baseline=$BASELINE_BIN")

WORK=$(mktemp -d "${KEEL_BENCH_DIR:-/var/tmp}/keel-small-change-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RESULTS=$WORK/results
mkdir -p "$RESULTS"

drop_caches() { sync; echo 3 2>/dev/null >/proc/sys/vm/drop_caches || true; }

echo "== image: $SIZE sparse, the first $DATA random"
truncate -s "$SIZE" "$WORK/image"
python3 - "$WORK/image" "$DATA" "$SEED" <<'EOF'
import random, sys
path, data, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
size = int(data[:-1]) * units[data[-1]] if data[-1] in units else int(data)
rng = random.Random(seed)
with open(path, "r+b") as f:
    for _ in range(size >> 20):
        f.write(rng.randbytes(1 << 20))
EOF

# Runs a build's subcommand under time -v; the JSON line goes to RESULTS/NAME.json.
run() {
    local name=$1 bin=$2
    shift 2
    drop_caches
    /usr/bin/time -v -o "$RESULTS/$name.time" "$bin" "$@" >"$RESULTS/$name.json" 2>"$RESULTS/$name.log" ||
        die "$name failed: $(tail -5 "$RESULTS/$name.log")"
}

for build in "${builds[@]}"; do
    name=${build%%=*}
    echo "== $name: full snapshot"
    run "$name-full" "${build#*=}" full --image "$WORK/image" --repo "$WORK/repo-$name"
done

for round in $(seq 1 "$ROUNDS"); do
    python3 - "$WORK/image" "$PAGES" "$((SEED * 1000 + round))" "$WORK/pages-$round.txt" <<'EOF'
import os, random, sys
path, pages, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
size = os.path.getsize(path)
offsets = sorted(rng.randrange(size // 8192) * 8192 for _ in range(pages))
with open(path, "r+b") as f:
    for offset in offsets:
        f.seek(offset)
        f.write(rng.randbytes(8192))
with open(out, "w") as f:
    f.write("".join(f"{o}\n" for o in offsets))
EOF
    for build in "${builds[@]}"; do
        name=${build%%=*}
        before=$(du -sb "$WORK/repo-$name" | cut -f1)
        run "$name-incr-$round" "${build#*=}" incr --image "$WORK/image" --repo "$WORK/repo-$name" \
            --changed-pages "$WORK/pages-$round.txt"
        after=$(du -sb "$WORK/repo-$name" | cut -f1)
        echo "$((after - before))" >"$RESULTS/$name-incr-$round.growth"
    done
    echo "   round $round done"
done

python3 - "$RESULTS" "$ROUNDS" "$SIZE" "$PAGES" "${builds[@]}" <<'EOF'
import json, re, statistics, sys
results, rounds, size, pages, builds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
def time_v(path):
    """CPU seconds, max RSS MiB and wall seconds of a process (GNU time -v)."""
    text = open(path).read()
    get = lambda key: float(re.search(re.escape(key) + r":\s*([\d.]+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*([\d:.]+)", text).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    cpu = get("User time (seconds)") + get("System time (seconds)")
    return cpu, get("Maximum resident set size (kbytes)") / 1024, seconds
rows = {}
for build in builds:
    name = build.split("=", 1)[0]
    secs, cpu, rss, growth = [], [], [], []
    for r in range(1, rounds + 1):
        # The whole process: opening the vault and loading the parent's manifest count.
        c, m, wall = time_v(f"{results}/{name}-incr-{r}.time")
        secs.append(wall); cpu.append(c); rss.append(m)
        growth.append(int(open(f"{results}/{name}-incr-{r}.growth").read()))
    full = json.loads(open(f"{results}/{name}-full.json").read())
    rows[name] = dict(seconds=statistics.median(secs), cpu=statistics.median(cpu), rss=max(rss),
                      growth=statistics.median(growth), full_seconds=full["seconds"])
print(f"\n{size} image, {pages} random 8 KiB pages changed per incremental, {rounds} rounds (medians)")
print(f"{'build':<10} {'incr s':>8} {'CPU s':>7} {'max RSS MiB':>12} {'vault growth':>14} {'full s':>8}")
for name, r in rows.items():
    print(f"{name:<10} {r['seconds']:>8.3f} {r['cpu']:>7.2f} {r['rss']:>12.0f} {r['growth'] / 2**20:>11.2f} MiB {r['full_seconds']:>8.1f}")
if "baseline" in rows:
    new, base = rows["new"], rows["baseline"]
    ratio = lambda a, b: a / b if b else float("nan")
    print(f"new / baseline: time {ratio(new['seconds'], base['seconds']):.3f}x, CPU {ratio(new['cpu'], base['cpu']):.3f}x, "
          f"vault growth {ratio(new['growth'], base['growth']):.3f}x")
EOF
if [[ -n "${KEEP_RESULTS:-}" ]]; then
    mkdir -p "$KEEP_RESULTS" && cp -r "$RESULTS"/. "$KEEP_RESULTS"/
fi

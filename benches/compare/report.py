#!/usr/bin/env python3
"""Tables for benches/compare/run.sh and benches/compare/replication.sh.

Usage: report.py WORK_DIR SEQ_SIZE RAND_RUNTIME LAT_RUNTIME LAT_ROUNDS   (run.sh)
Reads WORK_DIR/{plain,nbdkit,keel}-{seq,seq2,rand}.json, {plain,nbdkit,keel}-lat-rN.json,
plain-latdirect-rN.json and the *.server_cpu files run.sh writes next to them.

Usage: report.py replication RESULTS_DIR   (replication.sh)
Reads quic-rN.jsonl (quic-probe), {single,repl}-seq*.json, {plain,single,repl}-lat-rN.json,
*.server_cpu (JSON lists: the primary's and the standby's CPU seconds) and
pgbench-{pgsync,single,repl}-rN.txt; prints what is there and the targets with ✓/✗.

Usage: report.py snapshot RESULTS_DIR   (snapshot.sh)
Reads composition.json, SYSTEM-{full,incr,restore}.time (GNU time -v), .out (snapshot-bench's
JSON line for keel-CHUNK), .size ("apparent allocated" bytes of the repository) and
disk-write-rN.time; prints time, size and memory tables and the targets with ✓/✗.
"""

import glob
import json
import os
import re
import statistics
import sys


def main():
    if sys.argv[1] == "replication":
        replication(sys.argv[2])
        return
    if sys.argv[1] == "snapshot":
        snapshot(sys.argv[2])
        return
    work, seq_size, rand_runtime, lat_runtime = sys.argv[1:5]
    rounds = int(sys.argv[5])

    def job(target, name):
        with open(os.path.join(work, f"{target}-{name}.json")) as f:
            return json.load(f)["jobs"][0]

    def cpu(target, name):
        path = os.path.join(work, f"{target}-{name}.server_cpu")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return float(f.read())

    targets = ["plain", "nbdkit", "keel"]
    seq = {t: job(t, "seq") for t in targets}
    seq2 = {t: job(t, "seq2") for t in targets}
    rand = {t: job(t, "rand") for t in targets}
    mib = {t: seq[t]["write"]["bw"] / 1024.0 for t in targets}  # fio reports KiB/s
    mib2 = {t: seq2[t]["write"]["bw"] / 1024.0 for t in targets}
    iops = {t: rand[t]["write"]["iops"] for t in targets}

    def per_op(t, name, ops):
        c = cpu(t, name)
        return None if c is None else c / max(ops, 1) * 1e6

    print("Throughput (plain file: O_DIRECT, libaio)")
    show([
        ["workload", "plain file", "nbdkit file", "keel", "keel/nbdkit", "target"],
        [f"seq write 1M qd8, {seq_size}, end_fsync, fresh (MiB/s)", *(f0(mib[t]) for t in targets),
         f"{mib['keel'] / mib['nbdkit']:.2f}", ">= 0.90"],
        [f"seq write 1M qd8, {seq_size}, end_fsync, overwrite (MiB/s)", *(f0(mib2[t]) for t in targets),
         f"{mib2['keel'] / mib2['nbdkit']:.2f}", ">= 0.90"],
        [f"4K randwrite qd32, {rand_runtime} s (IOPS)", *(f0(iops[t]) for t in targets),
         f"{iops['keel'] / iops['nbdkit']:.2f}", ">= 0.90"],
        ["server CPU per 1M write, fresh (us)",
         *(f0(per_op(t, "seq", seq[t]["write"]["total_ios"])) for t in targets), "", ""],
        ["server CPU per 1M write, overwrite (us)",
         *(f0(per_op(t, "seq2", seq2[t]["write"]["total_ios"])) for t in targets), "", ""],
        ["server CPU per 4K randwrite (us)",
         *(f0(per_op(t, "rand", rand[t]["write"]["total_ios"])) for t in targets), "", ""],
    ])

    rows = [("plain, buffered pwrite + fdatasync", "plain", "lat"),
            ("plain, O_DIRECT + fdatasync (io_uring)", "plain", "latdirect"),
            ("nbdkit file, WRITE + FLUSH", "nbdkit", "lat"),
            ("keel, WRITE + FLUSH", "keel", "lat")]
    lat = {}
    table = [["4K write+flush qd1 (us)", "write p50", "flush p50", "flush p90", "flush p99", "flush mean",
              "pairs/s", "server CPU/pair"]]
    for r in range(1, rounds + 1):
        for label, target, name in rows:
            j = job(target, f"{name}-r{r}")
            w, s = j["write"]["clat_ns"], j["sync"]["lat_ns"]
            lat[(target, name, r)] = {"p50": pct(s, 50), "mean": s["mean"] / 1000.0}
            table.append([f"r{r} {label}", f0(pct(w, 50)), f0(pct(s, 50)), f0(pct(s, 90)), f0(pct(s, 99)),
                          f0(s["mean"] / 1000.0), f0(j["write"]["iops"]),
                          f0(per_op(target, f"{name}-r{r}", j["write"]["total_ios"]))])
    print(f"Write+flush latency, {lat_runtime} s per run, {rounds} rounds alternating between targets "
          "(flush: fdatasync for the plain file, NBD FLUSH otherwise)")
    show(table)

    header = ["keel flush vs"]
    header += [f"p50 ratio r{r}" for r in range(1, rounds + 1)]
    header += [f"mean ratio r{r}" for r in range(1, rounds + 1)]
    ratios = [header + ["target"]]
    for label, (target, name), goal in (("plain buffered fdatasync", ("plain", "lat"), "p50 <= 1.20"),
                                        ("plain O_DIRECT fdatasync", ("plain", "latdirect"), ""),
                                        ("nbdkit file FLUSH", ("nbdkit", "lat"), "")):
        line = [label]
        for stat in ("p50", "mean"):
            for r in range(1, rounds + 1):
                line.append(f"{lat[('keel', 'lat', r)][stat] / lat[(target, name, r)][stat]:.2f}")
        ratios.append(line + [goal])
    show(ratios)


def replication(results):
    """The replication tables: transport, sequential write, write+flush, pgbench, targets."""

    def path(name):
        return os.path.join(results, name)

    def fio(target, job):
        with open(path(f"{target}-{job}.json")) as f:
            return json.load(f)["jobs"][0]

    def server_cpu(target, job):
        try:
            with open(path(f"{target}-{job}.server_cpu")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def rounds(pattern):
        found = sorted(glob.glob(path(pattern)))
        return [int(re.search(r"-r(\d+)\.", os.path.basename(p)).group(1)) for p in found]

    checks = []  # (target, measured, goal, ok)

    # Transport.
    probes = {}
    for r in rounds("quic-r*.jsonl"):
        with open(path(f"quic-r{r}.jsonl")) as f:
            probes[r] = [json.loads(line) for line in f if line.strip()]
    rtt4k = bulk = None
    if probes:
        table = [["QUIC, 2 processes on 127.0.0.1", "64 B p50", "64 B p99", "4 KiB p50", "4 KiB p99",
                  "bulk MiB/s (runs)", "CPU-s/GiB client+server", "lost pkts"]]
        rtt4k_all, bulk_all = [], []
        for r, lines in probes.items():
            rtt = {l["payload_bytes"]: l for l in lines if l["probe"] == "rtt"}
            bulks = [l for l in lines if l["probe"] == "bulk"]
            rtt4k_all.append(rtt[4096]["p50_us"])
            bulk_all += [b["mib_per_s"] for b in bulks]
            cpu = statistics.median(b["client_cpu_s_per_gib"] + b["server_cpu_s_per_gib"] for b in bulks)
            lost = sum(l["lost_packets"] for l in lines)
            table.append([f"probe r{r}", f0(rtt[64]["p50_us"]), f0(rtt[64]["p99_us"]), f0(rtt[4096]["p50_us"]),
                          f0(rtt[4096]["p99_us"]), " / ".join(f0(b["mib_per_s"]) for b in bulks), f"{cpu:.1f}",
                          str(lost)])
        rtt4k = statistics.median(rtt4k_all)
        bulk = statistics.median(bulk_all)
        print("QUIC transport (quic-probe: keel_net::quic endpoints, TransportConfig::default(), mTLS)")
        show(table)
        print(f"Yardsticks: QUIC RTT = median 4 KiB p50 = {rtt4k:.0f} us; "
              f"transport ceiling = median bulk = {bulk:.0f} MiB/s\n")

    # Sequential write.
    if os.path.exists(path("repl-seq.json")):
        table = [["seq write 1M qd8, 1 GiB, end_fsync (MiB/s)", "single", "replicated", "repl/single",
                  "repl/QUIC bulk", "CPU ms/MiB single", "CPU ms/MiB primary+standby"]]
        jobs = ["seq"] + [f"seq-over-r{r}" for r in rounds("repl-seq-over-r*.json")]
        over = []
        for job in jobs:
            single, repl = fio("single", job), fio("repl", job)
            mib = {t: j["write"]["bw"] / 1024.0 for t, j in (("single", single), ("repl", repl))}
            mibs = {t: j["write"]["io_bytes"] / 2**20 for t, j in (("single", single), ("repl", repl))}
            cpu_s, cpu_r = server_cpu("single", job), server_cpu("repl", job)
            if job != "seq":
                over.append(mib)
            table.append([
                "fresh" if job == "seq" else f"overwrite {job[-2:]}", f0(mib["single"]), f0(mib["repl"]),
                f"{mib['repl'] / mib['single']:.2f}", "-" if bulk is None else f"{mib['repl'] / bulk:.2f}",
                "-" if cpu_s is None else f"{cpu_s[0] / mibs['single'] * 1000:.2f}",
                "-" if cpu_r is None else
                f"{cpu_r[0] / mibs['repl'] * 1000:.2f} + {cpu_r[1] / mibs['repl'] * 1000:.2f}"])
        print("Sequential write (fio nbd engine; single = keel daemon without peer, replicated = keel up's primary)")
        show(table)
        if bulk is not None and over:
            repl = statistics.median(m["repl"] for m in over)
            checks.append(("seq write, overwrite (median): replicated >= 0.8 x QUIC bulk",
                           f"{repl:.0f} MiB/s = {repl / bulk:.2f} x {bulk:.0f}", "0.80", repl >= 0.8 * bulk))

    # Write+flush latency.
    lat_rounds = rounds("repl-lat-r*.json")
    if lat_rounds:
        table = [["4K write+flush qd1 (us)", "write p50", "flush p50", "flush p90", "flush p99", "flush mean",
                  "pairs/s", "CPU us/pair (primary+standby)"]]
        flush = {}
        for r in lat_rounds:
            for label, target in (("plain, pwrite + fdatasync", "plain"), ("single-node keel, WRITE + FLUSH", "single"),
                                  ("replicated keel, WRITE + FLUSH", "repl")):
                j = fio(target, f"lat-r{r}")
                w, s = j["write"]["clat_ns"], j["sync"]["lat_ns"]
                flush[(target, r)] = pct(s, 50)
                cpu = server_cpu(target, f"lat-r{r}")
                ops = max(j["write"]["total_ios"], 1)
                table.append([f"r{r} {label}", f0(pct(w, 50)), f0(pct(s, 50)), f0(pct(s, 90)), f0(pct(s, 99)),
                              f0(s["mean"] / 1000.0), f0(j["write"]["iops"]),
                              "-" if cpu is None else " + ".join(f0(c / ops * 1e6) for c in cpu)])
        print("Write+flush latency (4 KiB randwrite at depth 1, a flush after every write; alternating rounds)")
        show(table)
        table = [["flush p50", *(f"r{r}" for r in lat_rounds)]]
        table.append(["replicated - single (us)", *(f0(flush[("repl", r)] - flush[("single", r)]) for r in lat_rounds)])
        if rtt4k is not None:
            table.append(["... in QUIC RTTs", *(f"{(flush[('repl', r)] - flush[('single', r)]) / rtt4k:.2f}"
                                                for r in lat_rounds)])
        table.append(["replicated / single", *(f"{flush[('repl', r)] / flush[('single', r)]:.2f}" for r in lat_rounds)])
        table.append(["replicated / plain fdatasync",
                      *(f"{flush[('repl', r)] / flush[('plain', r)]:.2f}" for r in lat_rounds)])
        show(table)
        if rtt4k is not None:
            repl = statistics.median(flush[("repl", r)] for r in lat_rounds)
            single = statistics.median(flush[("single", r)] for r in lat_rounds)
            budget = single + 1.5 * rtt4k
            checks.append(("flush p50 (median of rounds): replicated <= single + 1.5 x QUIC RTT",
                           f"{repl:.0f} us vs {single:.0f} + 1.5 x {rtt4k:.0f} = {budget:.0f} us",
                           f"{budget:.0f} us", repl <= budget))

    # pgbench.
    pg_rounds = rounds("pgbench-repl-r*.txt")
    if pg_rounds:
        def pgbench(name, r):
            with open(path(f"pgbench-{name}-r{r}.txt")) as f:
                text = f.read()
            tps = float(re.search(r"^tps = ([0-9.]+)", text, re.M).group(1))
            lat = re.search(r"^latency average = ([0-9.]+) ms", text, re.M)
            return tps, float(lat.group(1)) if lat else None

        table = [["pgbench TPS (latency avg ms)", "PG sync replication", "single-node keel", "replicated keel",
                  "repl/PG sync", "repl/single"]]
        ratios = []
        for r in pg_rounds:
            res = {n: pgbench(n, r) for n in ("pgsync", "single", "repl")}
            ratios.append(res["repl"][0] / res["pgsync"][0])
            table.append([f"round {r}", *(f"{res[n][0]:.0f} ({res[n][1]:.1f})" for n in ("pgsync", "single", "repl")),
                          f"{ratios[-1]:.2f}", f"{res['repl'][0] / res['single'][0]:.2f}"])
        print("pgbench (TPC-B-like; keel: PostgreSQL on ext4 on loop --direct-io=on on nbdfuse)")
        show(table)
        ratio = statistics.median(ratios)
        checks.append(("pgbench TPS (median ratio): replicated keel >= 0.8 x PG sync replication",
                       f"{ratio:.2f}x", "0.80x", ratio >= 0.8))

    try:
        with open(path("health.txt")) as f:
            health = [line.split() for line in f if line.strip()]
        bad = [" ".join(h) for h in health if h[1:] != ["primary", "1", "UpToDate"]]
        print(f"Replicated pair before each measurement: {len(health) - len(bad)} of {len(health)} checks "
              "primary / epoch 1 / standby UpToDate" + (f"; NOT healthy: {'; '.join(bad)}" if bad else ""))
    except FileNotFoundError:
        pass
    try:
        with open(path("keel-status.json")) as f:
            status = json.load(f)
        v = next(v for v in status["volumes"] if v["name"] == "demo")
        healthy = v["role"] == "primary" and v["epoch"] == 1 and v["peer"]["state"] == "UpToDate"
        print(f"Replicated pair at the end: {status['node']} {v['role']}, epoch {v['epoch']}, standby "
              f"{v['peer']['state']}" + ("" if healthy else "  <-- NOT the pair measured from the start (failover?)")
              + "\n")
    except (FileNotFoundError, ValueError, KeyError, StopIteration):
        print("Replicated pair at the end: unknown (no answer from keel status)\n")

    if checks:
        print("Targets")
        show([["target", "measured", "goal", ""]] + [[t, m, g, "✓" if ok else "✗"] for t, m, g, ok in checks])


def snapshot(results):
    """The snapshot tables: Keel per chunk size, restic, borg and the disk on one image."""

    def path(name):
        return os.path.join(results, name)

    def gnu_time(name):
        """Wall seconds, max RSS (MiB) and CPU seconds of one step, or None if it did not run."""
        try:
            with open(path(f"{name}.time")) as f:
                fields = dict(line.strip().rsplit(": ", 1) for line in f if ": " in line)
        except FileNotFoundError:
            return None
        wall = 0.0
        for part in fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":"):
            wall = wall * 60 + float(part)
        return {"wall": wall, "rss": int(fields["Maximum resident set size (kbytes)"]) / 1024,
                "cpu": float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])}

    def bench_line(name):
        try:
            with open(path(f"{name}.out")) as f:
                return json.loads(f.read().strip().splitlines()[-1])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def size(name):
        try:
            with open(path(f"{name}.size")) as f:
                apparent, allocated = f.read().split()
            return int(apparent), int(allocated)
        except FileNotFoundError:
            return None

    with open(path("composition.json")) as f:
        c = json.load(f)
    image = c["image_bytes"]
    chunks = sorted({os.path.basename(p)[len("keel-"):-len("-full.time")] for p in glob.glob(path("keel-*-full.time"))},
                    key=parse_size)
    systems = [(f"keel {ch}", f"keel-{ch}") for ch in chunks]
    systems += [(label, name) for label, name in (("restic", "restic"), ("borg", "borg"))
                if os.path.exists(path(f"{name}-full.time"))]
    disk = [t for t in (gnu_time(f"disk-write-r{r}") for r in (1, 2)) if t]
    steps = {(name, op): gnu_time(f"{name}-{op}") for _, name in systems for op in ("full", "incr", "restore")}
    sizes = {(name, op): size(f"{name}-{op}") for _, name in systems for op in ("full", "incr")}

    print(f"Image: {gib(image)} = ext4 {gib(c['ext4_bytes'])} (PostgreSQL 15 data directory after "
          f"pgbench -i -s {c['pgbench_scale']}: {gib(c['pgdata_bytes'])}; {gib(c['ext4_used_bytes'])} of its blocks "
          f"used, the rest zeros) + {gib(c['random_bytes'])} random + {gib(c['zero_bytes'])} zeros.")
    print(f"Churn: {c['churn_pages']} random {c['page_bytes'] >> 10} KiB pages (1 %, "
          f"{c['churn_pages'] * c['page_bytes'] / 2**20:.0f} MiB) overwritten with random bytes. "
          f"Page caches dropped before every step: {'yes' if c['drop_caches'] else 'NO'}. "
          f"Keel sealing/restore threads: {c['keel_threads']}; zstd level {c.get('keel_zstd', 3)}.\n")

    def cell(t):
        return "-" if t is None else f"{t['wall']:.1f} s ({image / 2**20 / t['wall']:.0f} MiB/s)"

    labels = {"full": "full", "incr": "incremental (after the churn)", "restore": "restore to a new file + fsync"}
    disk_cells = {"full": "", "incr": "", "restore": " / ".join(cell(t) for t in disk) or "-"}
    table = [["wall time (image MiB/s)", *(label for label, _ in systems), "disk: dd 1M + fdatasync"]]
    for op in ("full", "incr", "restore"):
        table.append([labels[op], *(cell(steps[(name, op)]) for _, name in systems), disk_cells[op]])
    show(table)

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.0f}"

    table = [["repository and memory (MiB)", *(label for label, _ in systems)]]
    table.append(["repo after full (du -sb)", *(mib(sizes[(n, "full")] and sizes[(n, "full")][0]) for _, n in systems)])
    table.append(["  allocated on disk", *(mib(sizes[(n, "full")] and sizes[(n, "full")][1]) for _, n in systems)])
    table.append(["repo growth from the incremental", *(
        "-" if not (sizes[(n, "full")] and sizes[(n, "incr")]) else mib(sizes[(n, "incr")][0] - sizes[(n, "full")][0])
        for _, n in systems)])
    for op in ("full", "incr", "restore"):
        table.append([f"max RSS, {op}", *(f0(steps[(n, op)] and steps[(n, op)]["rss"]) for _, n in systems)])
    for op in ("full", "incr", "restore"):
        table.append([f"CPU s (user+sys), {op}",
                      *("-" if steps[(n, op)] is None else f"{steps[(n, op)]['cpu']:.1f}" for _, n in systems)])
    show(table)

    if chunks:
        table = [["keel, per chunk size", *chunks]]
        lines = {(ch, op): bench_line(f"keel-{ch}-{op}") for ch in chunks for op in ("full", "incr", "restore")}

        def row(label, op, fmt):
            table.append([label, *("-" if lines[(ch, op)] is None else fmt(lines[(ch, op)]) for ch in chunks)])

        row("chunks in the image", "full", lambda l: str(l["chunks_total"]))
        row("  holes (all zero)", "full", lambda l: str(l["zero_chunks"]))
        row("  stored (after dedup)", "full", lambda l: str(l["new_chunks"]))
        row("  stored MiB / plain MiB", "full",
            lambda l: f"{l['new_stored_bytes'] / 2**20:.0f} / {l['new_plain_bytes'] / 2**20:.0f}")
        row("incr: 64 KiB regions changed", "incr", lambda l: str(l["changed_regions"]))
        row("incr: chunks read", "incr", lambda l: str(l["chunks_read"]))
        row("incr: MiB read", "incr", lambda l: f"{l['bytes_read'] / 2**20:.0f}")
        row("incr: new chunks, stored MiB", "incr",
            lambda l: f"{l['new_chunks']}, {l['new_stored_bytes'] / 2**20:.0f}")
        row("incr: s in the library (MiB read/s)", "incr", lambda l: f"{l['seconds']:.2f} ({l['read_mib_per_s']:.0f})")
        row("restore: chunks written, holes skipped", "restore", lambda l: f"{l['chunks_written']}, {l['holes']}")
        table.append(["repo growth per MiB of pages written", *(
            "-" if not (sizes[(f"keel-{ch}", "full")] and sizes[(f"keel-{ch}", "incr")]) else
            f"{(sizes[(f'keel-{ch}', 'incr')][0] - sizes[(f'keel-{ch}', 'full')][0]) / (c['churn_pages'] * c['page_bytes']):.1f}"
            for ch in chunks)])
        show(table)

    restic = {op: steps.get(("restic", op)) for op in ("full", "incr")}
    restic_size = sizes.get(("restic", "full"))
    disk_mib = statistics.median(image / 2**20 / t["wall"] for t in disk) if disk else None
    checks = []
    for ch in chunks:
        name = f"keel-{ch}"
        full, incr, rest = (steps[(name, op)] for op in ("full", "incr", "restore"))
        if full and restic["full"] and restic_size and sizes[(name, "full")]:
            speedup = restic["full"]["wall"] / full["wall"]
            ratio = sizes[(name, "full")][0] / restic_size[0]
            checks.append((f"full, keel {ch}: >= 2x faster than restic, repo <= restic's",
                           f"{speedup:.2f}x, repo {ratio:.2f}x restic's", ">= 2x, <= 1.00x",
                           speedup >= 2 and ratio <= 1))
        if incr and restic["incr"]:
            speedup = restic["incr"]["wall"] / incr["wall"]
            checks.append((f"incremental, keel {ch}: >= 20x faster than restic's second backup",
                           f"{speedup:.1f}x", ">= 20x", speedup >= 20))
        if rest and disk_mib:
            ratio = image / 2**20 / rest["wall"] / disk_mib
            checks.append((f"restore, keel {ch}: >= 0.7x the disk's sequential write",
                           f"{ratio:.2f}x ({image / 2**20 / rest['wall']:.0f} vs {disk_mib:.0f} MiB/s)", ">= 0.70x",
                           ratio >= 0.7))
    if checks:
        print("Targets (disk = median of the dd runs)")
        show([["target", "measured", "goal", ""]] + [[t, m, g, "✓" if ok else "✗"] for t, m, g, ok in checks])


def parse_size(text):
    """`64K`, `1M` -> bytes (sorts the chunk sizes)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def gib(v):
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def pct(lat, p):
    """Percentile p of a fio latency block, in microseconds."""
    return lat["percentile"][f"{p:.6f}"] / 1000.0


def f0(v):
    return "-" if v is None else f"{v:.0f}"


def show(table):
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(widths[k]) if k == 0 else c.rjust(widths[k]) for k, c in enumerate(r)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()


if __name__ == "__main__":
    main()

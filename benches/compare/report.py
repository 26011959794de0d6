#!/usr/bin/env python3
"""Tables for benches/compare/run.sh from fio's JSON output.

Usage: report.py WORK_DIR SEQ_SIZE RAND_RUNTIME LAT_RUNTIME LAT_ROUNDS
Reads WORK_DIR/{plain,nbdkit,keel}-{seq,seq2,rand}.json, {plain,nbdkit,keel}-lat-rN.json,
plain-latdirect-rN.json and the *.server_cpu files run.sh writes next to them.
"""

import json
import os
import sys


def main():
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

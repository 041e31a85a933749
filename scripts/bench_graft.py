"""Benchmark `moemerge graft` against a durable copy of its output and a pure-write probe; measure its memory.

Builds a synthetic Llama-shaped bf16 checkpoint (2 shards, the same generator as `bench_upcycle.py`)
in a temporary folder, then for SOLAR `--drop n/4` (and LLaMA-Pro `--expand n/4`) measures, in
alternating rounds: the graft in a child process (start-up included; source evicted from the page
cache first unless --warm), `cp -r` of its output + `sync` of the copied files (`--no-cp` skips it),
and the same number of bytes (a random block, repeated) written by N threads + fsync (N = the graft's
writer threads), through the page cache and then direct (O_DIRECT), each after a sync and a pause
(`--settle`). Prints the medians, graft / cp, graft / each probe, and the graft's peak anonymous memory.

    python scripts/bench_graft.py                              # ~1.1B-param source (2.2 GB), --drop, 3 rounds
    python scripts/bench_graft.py --size 3 --shard-sizes 5GB 1GB --expand
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_upcycle import VOCAB, add_round_args, alternating_rounds, build_dense, files, timed, writer_threads  # noqa: E402 - one synthetic-checkpoint generator, one set of measurements

HIDDEN, INTER = 2048, 5632


def layers_for(size_b: float) -> int:
    """Number of Llama layers (hidden 2048) giving about `size_b` billion parameters, at least 4."""
    kv = HIDDEN // 4  # build_dense: 16 heads of 128, 4 kv heads
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * INTER + 2 * HIDDEN
    return max(4, round((size_b * 1e9 - 2 * VOCAB * HIDDEN) / per_layer))


def bench_one(src: Path, work: Path, flag: str, k: int, shard: str, args: argparse.Namespace) -> dict:
    out, copy = work / "out", work / "copy"
    cmd = [sys.executable, "-m", "mergekit_lite", "graft", str(src), flag, str(k), "-o", str(out),
           "--shard-size", shard] + (["--workers", str(args.workers)] if args.workers else [])
    threads = writer_threads(args.workers, work)
    grafts, cps, probes, directs, anon, out_bytes = alternating_rounds(cmd, src, out, copy, threads, args)
    g, c, p, d = (statistics.median(x) for x in (grafts, cps, probes, directs))
    return {"op": f"{flag} {k}", "shard": shard, "out_GB": out_bytes / 1e9, "threads": threads, "graft_s": g,
            "cp_s": c, "probe_s": p, "direct_s": d, "anon_GB": anon / 1e9,
            "rounds": list(zip(grafts, cps, probes)), "directs": directs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.1, help="source size in billions of parameters (bf16)")
    ap.add_argument("--shard-sizes", nargs="+", default=["5GB"])
    ap.add_argument("--expand", action="store_true", help="also LLaMA-Pro --expand n/4 (first shard size)")
    ap.add_argument("--workers", type=int, default=None, help="writer threads (default: moemerge's own default)")
    add_round_args(ap, "graft")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    n = layers_for(args.size)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        largest = build_dense(work / "src", HIDDEN, INTER, n)
        subprocess.run(["sync", *files(work / "src")], check=True)
        t_start = timed([sys.executable, "-c", "import mergekit_lite.ops.graft, transformers.models.llama"])
        rows = [bench_one(work / "src", work, "--drop", n // 4, s, args) for s in args.shard_sizes]
        if args.expand:
            rows.append(bench_one(work / "src", work, "--expand", max(1, n // 4), args.shard_sizes[0], args))
    print(f"source: {n} layers, ~{args.size}B params bf16; largest tensor {largest / 1e9:.2f} GB; "
          f"interpreter + imports {t_start:.2f} s")
    print(f"{'op':>11} {'shard':>6} {'out GB':>7} {'threads':>7} {'graft s':>8} {'cp s':>6} {'probe s':>7} "
          f"{'/cp':>6} {'/probe':>6} {'w/o start':>9} {'anon GB':>8}")
    for r in rows:
        print(f"{r['op']:>11} {r['shard']:>6} {r['out_GB']:7.2f} {r['threads']:7d} {r['graft_s']:8.2f} "
              f"{r['cp_s']:6.2f} {r['probe_s']:7.2f} {r['graft_s'] / r['cp_s']:5.2f}x "
              f"{r['graft_s'] / r['probe_s']:5.2f}x {(r['graft_s'] - t_start) / r['probe_s']:8.2f}x "
              f"{r['anon_GB']:8.2f}")
        print("            rounds (graft, cp, probe) s: "
              + "; ".join(f"{g:.1f}, {c:.1f}, {p:.1f}" for g, c, p in r["rounds"]))
        if not math.isnan(r["direct_s"]):
            print("            direct probe (O_DIRECT) s: " + ", ".join(f"{d:.1f}" for d in r["directs"])
                  + f"; graft / direct probe {r['graft_s'] / r['direct_s']:.2f}x, w/o start-up "
                  f"{(r['graft_s'] - t_start) / r['direct_s']:.2f}x")
    print(f"(cores: {os.cpu_count()}; medians of {args.rounds} alternating rounds; source "
          f"{'warm' if args.warm else 'evicted from the page cache'} before each graft; copies are memory-mapped "
          "views, so anonymous memory stays near the interpreter's whatever the shard size)")


if __name__ == "__main__":
    main()

"""Benchmark `moemerge graft` against a plain durable copy, and measure its memory.

Builds a synthetic Llama-shaped bf16 checkpoint (2 shards, the same generator as
`bench_upcycle.py`) in a temporary folder, then for SOLAR `--drop n/4` and LLaMA-Pro `--expand n/4`
runs the graft in a child process and copies its output folder with `cp -r`; both are followed by
`sync`, so both are durable writes of the same bytes. Prints, measured side by side in one run:

  * wall(graft) / wall(cp of the output)      target <= 1.3x
  * peak anonymous memory of the graft        against the shard size it was given

    python scripts/bench_graft.py                           # ~1B-param source (2 GB), 3 shard sizes
    python scripts/bench_graft.py --size 3 --shard-sizes 5GB
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_upcycle import VOCAB, build_dense, run_sampled, timed  # noqa: E402 - one synthetic-checkpoint generator

HIDDEN, INTER = 2048, 5632


def layers_for(size_b: float) -> int:
    """Number of Llama layers (hidden 2048) giving about `size_b` billion parameters, at least 4."""
    kv = HIDDEN // 4  # build_dense: 16 heads of 128, 4 kv heads
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * INTER + 2 * HIDDEN
    return max(4, round((size_b * 1e9 - 2 * VOCAB * HIDDEN) / per_layer))


def bench_one(src: Path, work: Path, flag: str, k: int, shard: str) -> dict:
    out, copy = work / "out", work / "copy"
    cmd = [sys.executable, "-m", "mergekit_lite", "graft", str(src), flag, str(k), "-o", str(out),
           "--shard-size", shard]
    t_graft, anon = run_sampled(cmd)  # interpreter start-up and imports are part of what a user waits for
    t_cp = timed(["cp", "-r", str(out), str(copy)])
    out_bytes = sum(f.stat().st_size for f in out.iterdir())
    row = {"op": f"{flag} {k}", "shard": shard, "out_GB": out_bytes / 1e9, "graft_s": t_graft, "cp_s": t_cp,
           "ratio": t_graft / t_cp, "anon_GB": anon / 1e9}
    shutil.rmtree(out)
    shutil.rmtree(copy)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="source size in billions of parameters (bf16)")
    ap.add_argument("--shard-sizes", nargs="+", default=["5GB", "1GB", "500MB"])
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    n = layers_for(args.size)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        largest = build_dense(work / "src", HIDDEN, INTER, n)
        subprocess.run(["sync"], check=True)
        t_start = timed([sys.executable, "-c", "import mergekit_lite.ops.graft, transformers.models.llama"])
        rows = [bench_one(work / "src", work, "--drop", n // 4, s) for s in args.shard_sizes]
        rows.append(bench_one(work / "src", work, "--expand", max(1, n // 4), args.shard_sizes[0]))
    print(f"source: {n} layers, ~{args.size}B params bf16; largest tensor {largest / 1e9:.2f} GB; "
          f"interpreter + imports {t_start:.2f} s")
    print(f"{'op':>11} {'shard':>6} {'out GB':>7} {'graft s':>8} {'cp s':>6} {'ratio':>6} {'w/o start':>9} {'anon GB':>8}")
    for r in rows:
        print(f"{r['op']:>11} {r['shard']:>6} {r['out_GB']:7.2f} {r['graft_s']:8.2f} {r['cp_s']:6.2f} "
              f"{r['ratio']:5.2f}x {(r['graft_s'] - t_start) / r['cp_s']:8.2f}x {r['anon_GB']:8.2f}")
    print(f"(cores: {os.cpu_count()}; ratio target <= 1.3x; copies are memory-mapped views, so anonymous memory "
          "stays near the interpreter's whatever the shard size)")


if __name__ == "__main__":
    main()

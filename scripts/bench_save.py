"""Benchmark the training save (`final/`) against a durable copy of it and a pure-write probe.

Builds a synthetic Llama-shaped bf16 checkpoint, upcycles it to 8 experts with `moemerge upcycle`,
loads that model with transformers (as training holds it: fused expert tensors in memory), then in
alternating rounds: `train.save.save_final` (what `moemerge train` runs at its end: per-expert Hub
layout, shards, config, card), `cp -r` of the `final/` it wrote + `sync` of the copied files, and the
same bytes of zeros written by N threads + fsync (N = the writer's threads). Prints the medians,
save / cp, save / probe, and the anonymous memory the save added on top of the loaded model.

    python scripts/bench_save.py                    # ~0.25B dense -> 8 experts (~1.2B params, 2.4 GB)
    python scripts/bench_save.py --size 0.5 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_upcycle import SHAPES, build_dense, files, timed, write_probe, writer_threads  # noqa: E402


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def timed_save(model, moe: Path, run: Path, workers: int | None, shard_size: int) -> tuple[float, int]:
    """Seconds of one `save_final` into run/final and the anonymous memory it added at its peak."""
    from accelerate import Accelerator

    from mergekit_lite.train.save import save_final

    config = json.loads((moe / "config.json").read_text())
    base, peak, done = rss_anon(), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    save_final(Accelerator(cpu=True), model, moe, config, run, lora=False, save_dtype="source",
               shard_size=shard_size, recipe_text="# bench_save\n", training={}, echo=lambda _: None,
               workers=workers)
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    return seconds, max(0, peak - base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=0.25, choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="writer threads (default: moemerge's own default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=5 * 10**9)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        build_dense(work / "dense", *SHAPES[args.size])
        recipe = work / "r.yaml"
        recipe.write_text(f"source: {work / 'dense'}\nnum_experts: {args.experts}\nexperts_per_token: 2\n")
        subprocess.run([sys.executable, "-m", "mergekit_lite", "upcycle", str(recipe), "-o", str(work / "moe")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work / "dense")
        model = AutoModelForCausalLM.from_pretrained(work / "moe", dtype=torch.bfloat16)
        threads = writer_threads(args.workers, work)
        saves, cps, probes, anon = [], [], [], 0
        for _ in range(args.rounds):  # alternating, so a neighbour's burst of load hits all three alike
            t, added = timed_save(model, work / "moe", work / "run", args.workers, args.shard_size)
            saves.append(t)
            anon = max(anon, added)
            final = work / "run" / "final"
            out_bytes = sum(os.path.getsize(f) for f in files(final))
            cps.append(timed(["cp", "-r", str(final), str(work / "copy")], sync=work / "copy"))
            shutil.rmtree(work / "copy")
            shutil.rmtree(work / "run")
            probes.append(write_probe(work / "probe", out_bytes, threads))
    s, c, p = (statistics.median(x) for x in (saves, cps, probes))
    params = sum(t.numel() for t in model.parameters())
    print(f"{'model':>14} {'out GB':>7} {'threads':>7} {'save s':>7} {'cp s':>6} {'probe s':>7} {'/cp':>6} "
          f"{'/probe':>6} {'anon added GB':>13}")
    print(f"{params / 1e9:6.2f}B {args.experts}-exp {out_bytes / 1e9:7.2f} {threads:7d} {s:7.2f} {c:6.2f} {p:7.2f} "
          f"{s / c:5.2f}x {s / p:5.2f}x {anon / 1e9:13.2f}")
    print("        rounds (save, cp, probe) s: " + "; ".join(f"{a:.1f}, {b:.1f}, {d:.1f}"
                                                           for a, b, d in zip(saves, cps, probes)))
    print(f"(cores: {os.cpu_count()}; medians of {args.rounds} alternating rounds; the save runs in this process, "
          "model loaded: no start-up in its time)")


if __name__ == "__main__":
    main()

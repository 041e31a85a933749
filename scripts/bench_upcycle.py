"""Benchmark `moemerge upcycle` against a durable copy of its output and a pure-write probe; measure its memory.

Builds a synthetic Llama-shaped bf16 checkpoint (2 shards) in a temporary folder, then for each
requested size measures, in alternating rounds (upcycle, `cp -r` of its output, write probe):

  * upcycle: `moemerge upcycle` to 8 experts in a child process (interpreter start-up and imports
    included: a user waits for them), its files fsynced by the writer itself; the source is evicted
    from the page cache first (posix_fadvise DONTNEED; --warm keeps it), as on a first run;
  * cp: `cp -r` of the upcycle's output, then `sync` of the copied files (`--no-cp` skips it);
  * probe: the same number of bytes (a random block, repeated) written by N threads (N = the upcycle's
    writer threads), each to its own file, fsynced: what the disk takes at that queue depth through the
    page cache; then the same probe written direct (O_DIRECT), as the writer writes whole blocks;

each timed command starting after a `sync` and a short pause (`--settle`), and prints the medians over the
rounds, upcycle / cp and upcycle / each probe, and the upcycle's peak anonymous memory. mergekit-moe runs on
the same job when it is installed (`pip install mergekit`).

    python scripts/bench_upcycle.py                        # 1.1B (TinyLlama-shaped) -> 8 experts, 3 rounds
    python scripts/bench_upcycle.py --sizes 0.25 --rounds 3 --architecture glm4_moe
    python scripts/bench_upcycle.py --sizes 1.1 --workers 1 # one writer thread, for comparison
    python scripts/bench_upcycle.py --shard-size 2GB        # 7 shard files instead of 3: more writers at once
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

# Llama-shaped layouts (hidden, intermediate, layers) giving roughly N billion dense parameters;
# 1.1 is TinyLlama-1.1B's shape (22 layers).
SHAPES = {1.1: (2048, 5632, 22), 1.0: (2048, 5632, 16), 0.5: (1536, 4096, 14), 0.25: (1024, 2816, 16),
          0.05: (512, 1408, 4)}  # 0.05: a smoke run (~0.3 GB out), e.g. of a new --architecture
VOCAB = 32000
NAN = float("nan")  # a measurement skipped (--no-cp) or not possible here (no O_DIRECT)


def build_dense(folder: Path, hidden: int, inter: int, layers: int) -> int:
    """Write config.json and two bf16 shards; returns the largest tensor's size in bytes."""
    folder.mkdir(parents=True)
    heads, kv = hidden // 128, max(1, hidden // 512)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": VOCAB, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    hd = hidden // heads
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    weight_map, largest = {}, 0
    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.k_proj.weight": rnd(kv * hd, hidden),
                 p + "self_attn.v_proj.weight": rnd(kv * hd, hidden), p + "self_attn.o_proj.weight": rnd(hidden, hidden),
                 p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
                 p + "mlp.down_proj.weight": rnd(hidden, inter), p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        shards[0 if i < layers // 2 else 1].update(layer)
    shards[0]["model.embed_tokens.weight"] = rnd(VOCAB, hidden)
    shards[1]["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    shards[1]["lm_head.weight"] = rnd(VOCAB, hidden)
    total = 0
    for n, sd in enumerate(shards):
        name = f"model-{n + 1:05d}-of-00002.safetensors"
        save_file(sd, str(folder / name), metadata={"format": "pt"})
        for k, t in sd.items():
            weight_map[k] = name
            total += t.numel() * 2
            largest = max(largest, t.numel() * 2)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return largest


def run_sampled(cmd: list[str]) -> tuple[float, int]:
    """Run a command; returns (wall seconds, peak anonymous RSS in bytes sampled every 20 ms)."""
    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    done.set()
    th.join()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed with {rc}")
    return time.perf_counter() - t0, peak


def files(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file()]


def timed(cmd: list[str], sync: Path | None = None) -> float:
    """Wall time of `cmd`, then of `sync` of the files it wrote under `sync` (each fsynced: durable)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    if sync is not None:
        subprocess.run(["sync", *files(sync)], check=True)
    return time.perf_counter() - t0


def settle(seconds: float) -> None:
    """Let the disk finish what earlier steps left (dirty pages, and the TRIMs a `discard` mount issues after a
    removal) before the next timed command. Measured without it on this VM (ext4 mounted with `discard`): of two
    identical upcycles in a row, the one that came right after removing the previous 12.9 GB output took
    2-3 s longer, whichever code it ran."""
    os.sync()
    time.sleep(seconds)


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (clean pages only; no root needed), as on a first read."""
    for name in files(folder):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_probe(folder: Path, nbytes: int, threads: int, chunk: int = 64 * 2**20, zeros: bool = False,
                direct: bool = False) -> float:
    """Seconds for `threads` threads to write `nbytes` in all (one file each) and fsync them.

    `direct=True` writes with O_DIRECT (Linux) from page-aligned memory, around the page cache, as the
    writer does for whole blocks: what the disk itself takes, with no copy into cache pages (`nbytes`
    rounded up to whole chunks per thread).

    The bytes are one random 64 MiB block written again and again: to the copy into the page cache they cost
    what model weights cost. `zeros=True` writes zeros instead, as this probe did first: read from the kernel's one shared zero page,
    they cost the copy less than any real data (measured to tmpfs, 12.9 GB: 6.0-6.3 s of system CPU against
    7.6-9.3 s for random bytes), so the probe flattered the disk.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if direct:  # page-aligned memory and whole blocks, as O_DIRECT needs
        aligned = mmap.mmap(-1, chunk)
        aligned.write(bytes(chunk) if zeros else os.urandom(2**20) * (chunk // 2**20))
        block = memoryview(aligned)
    else:
        block = memoryview(bytes(chunk) if zeros else bytearray(os.urandom(2**20)) * (chunk // 2**20))
    per = -(-nbytes // threads)
    if direct:
        per = -(-per // chunk) * chunk

    def one(i: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        fd = os.open(folder / f"probe{i}", flags, 0o644)
        try:
            left = per
            while left > 0:
                left -= os.write(fd, block[:min(chunk, left)])
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))
    seconds = time.perf_counter() - t0
    shutil.rmtree(folder)
    return seconds


def mergekit_moe(dense: Path, out: Path, experts: int) -> float | None:
    """mergekit-moe on the same job (random gates, bf16), when installed; None otherwise."""
    exe = shutil.which("mergekit-moe")
    if exe is None:
        return None
    cfg = out.parent / "mergekit-moe.yml"
    cfg.write_text(json.dumps({"base_model": str(dense), "gate_mode": "random", "dtype": "bfloat16",
                               "experts": [{"source_model": str(dense), "positive_prompts": [""]}] * experts}))
    t = timed([exe, str(cfg), str(out)], sync=out)
    shutil.rmtree(out)
    return t


def writer_threads(workers: int | None, folder: Path) -> int:
    from mergekit_lite.io.pool import default_workers

    return workers or default_workers(folder)


def alternating_rounds(cmd: list[str], source: Path, out: Path, copy: Path, threads: int,
                       args: argparse.Namespace) -> tuple[list[float], list[float], list[float], list[float], int, int]:
    """`args.rounds` rounds of (cmd writing `out`, `cp -r` of it + sync, the write probe of its bytes through the
    page cache, the same probe direct), alternating so a burst of a neighbour's load hits all alike; returns (cmd,
    cp, probe, direct probe) seconds per round (NaN for a skipped cp, and for the direct probe where the OS has
    no O_DIRECT), the peak anonymous
    memory of `cmd` (interpreter start-up and imports included: a user waits for them) and output bytes."""
    runs, cps, probes, directs, anon, out_bytes = [], [], [], [], 0, 0
    for _ in range(args.rounds):
        settle(args.settle)
        if not args.warm:
            evict(source)
        t, peak = run_sampled(cmd)
        runs.append(t)
        anon = max(anon, peak)
        out_bytes = sum(os.path.getsize(f) for f in files(out))
        cps.append(NAN)
        if args.cp:
            settle(args.settle)
            cps[-1] = timed(["cp", "-r", str(out), str(copy)], sync=copy)
            shutil.rmtree(copy)
        shutil.rmtree(out)
        settle(args.settle)
        probes.append(write_probe(out.parent / "probe", out_bytes, threads, zeros=args.probe_zeros))
        directs.append(NAN)
        if hasattr(os, "O_DIRECT"):
            settle(args.settle)
            directs[-1] = write_probe(out.parent / "probe", out_bytes, threads, zeros=args.probe_zeros, direct=True)
    return runs, cps, probes, directs, anon, out_bytes


def add_round_args(ap: argparse.ArgumentParser, command: str) -> None:
    """The options of `alternating_rounds`, for this script and bench_graft.py."""
    ap.add_argument("--rounds", type=int, default=3, help=f"alternating ({command}, cp, probes) rounds; medians shown")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait after a sync before each timed "
                                                                "command (default 3; see `settle`)")
    ap.add_argument("--probe-zeros", action="store_true", help="the probe writes zeros (its first version; see "
                                                                 "`write_probe`) instead of random bytes")
    ap.add_argument("--no-cp", dest="cp", action="store_false", help="skip the `cp -r` of the output (the output "
                                                                      "written direct is not in the page cache, so "
                                                                      "cp reads it back from the disk: slow)")
    ap.add_argument("--warm", action="store_true", help="leave the source in the page cache (default: evict it)")


def bench(size: float, workdir: Path, args: argparse.Namespace) -> dict:
    hidden, inter, layers = SHAPES[size]
    dense = workdir / f"dense-{size}"
    largest = build_dense(dense, hidden, inter, layers)
    subprocess.run(["sync", *files(dense)], check=True)
    recipe = workdir / f"recipe-{size}.yaml"
    recipe.write_text(f"source: {dense}\narchitecture: {args.architecture}\nnum_experts: {args.experts}\n"
                      "experts_per_token: 2\nrouter: {init: random}\ndtype: source\n"
                      + (f"workers: {args.workers}\n" if args.workers else ""))
    out, copy = workdir / f"moe-{size}", workdir / f"copy-{size}"
    threads = writer_threads(args.workers, workdir)
    cmd = [sys.executable, "-m", "mergekit_lite", "upcycle", str(recipe), "-o", str(out),
           *(["--shard-size", args.shard_size] if args.shard_size else [])]
    ups, cps, probes, directs, anon, out_bytes = alternating_rounds(cmd, dense, out, copy, threads, args)
    t_mk = mergekit_moe(dense, workdir / "mergekit-out", args.experts) if args.mergekit else None
    # interpreter + torch/transformers import, a fixed cost that matters only for small models
    t_start = timed([sys.executable, "-c", "import mergekit_lite.ops.upcycle, transformers.models.mixtral"])
    shutil.rmtree(dense)
    up, cp, probe, direct = (statistics.median(x) for x in (ups, cps, probes, directs))
    return {"size_B": size, "out_GB": out_bytes / 1e9, "threads": threads, "upcycle_s": up, "cp_s": cp,
            "probe_s": probe, "direct_s": direct, "start_s": t_start, "rounds": list(zip(ups, cps, probes)),
            "directs": directs, "mergekit_s": t_mk,
            "peak_anon_GB": anon / 1e9, "largest_tensor_GB": largest / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.1], choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--architecture", default="auto", help="upcycle target family (mixtral, qwen2_moe, glm4_moe, "
                                                            "granitemoe, ...; default: auto, the recipe's own)")
    ap.add_argument("--workers", type=int, default=None, help="writer threads (default: moemerge's own default)")
    ap.add_argument("--shard-size", default=None, help="the upcycle's --shard-size (default: moemerge's, 5GB); more "
                                                         "shards let more writer threads write at once")
    add_round_args(ap, "upcycle")
    ap.add_argument("--no-mergekit", dest="mergekit", action="store_false", help="skip mergekit-moe if installed")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = [bench(s, Path(tmp), args) for s in args.sizes]
    print(f"{'dense':>6} {'out GB':>7} {'threads':>7} {'upcycle s':>9} {'cp s':>6} {'probe s':>7} {'/cp':>6} "
          f"{'/probe':>6} {'w/o start':>9} {'anon GB':>8} {'largest GB':>10}")
    for r in rows:
        print(f"{r['size_B']:>5}B {r['out_GB']:7.2f} {r['threads']:7d} {r['upcycle_s']:9.2f} {r['cp_s']:6.2f} "
              f"{r['probe_s']:7.2f} {r['upcycle_s'] / r['cp_s']:5.2f}x {r['upcycle_s'] / r['probe_s']:5.2f}x "
              f"{(r['upcycle_s'] - r['start_s']) / r['probe_s']:8.2f}x {r['peak_anon_GB']:8.2f} "
              f"{r['largest_tensor_GB']:10.2f}")
        rounds = "; ".join(f"{u:.1f}, {c:.1f}, {p:.1f}" for u, c, p in r["rounds"])
        print(f"       rounds (upcycle, cp, probe) s: {rounds}; interpreter + imports {r['start_s']:.1f} s")
        if not math.isnan(r["direct_s"]):
            directs = ", ".join(f"{d:.1f}" for d in r["directs"])
            print(f"       direct probe (O_DIRECT, no page cache) s: {directs}; upcycle / direct probe "
                  f"{r['upcycle_s'] / r['direct_s']:.2f}x, w/o start-up "
                  f"{(r['upcycle_s'] - r['start_s']) / r['direct_s']:.2f}x")
        mk = r["mergekit_s"]
        print(f"       mergekit-moe: {f'{mk:.1f} s' if mk is not None else 'not installed (pip install mergekit)'}")
    print(f"(cores: {os.cpu_count()}; medians of {args.rounds} alternating rounds; source "
          f"{'warm' if args.warm else 'evicted from the page cache'} before each upcycle; targets: upcycle <= 1.5x "
          "the probe, anon <= 1.2 GB)")


if __name__ == "__main__":
    main()

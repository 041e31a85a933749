"""Benchmark `moemerge upcycle` against a plain durable copy, and measure its memory.

Builds a synthetic Llama-shaped bf16 checkpoint (2 shards) in a temporary folder, upcycles it to
8 experts in a child process, then copies the output folder with `cp -r`; both are followed by
`sync`, so both are durable writes of the same bytes. Prints, measured side by side in one run:

  * wall(upcycle) / wall(cp of the output)           target <= 1.3x
  * peak anonymous memory of the upcycle process     target <= start-up + 2 x largest output tensor

for each requested model size, so you can see that memory does not grow with the model.

    python scripts/bench_upcycle.py                 # ~1B and ~0.5B dense params (needs ~30 GB free disk)
    python scripts/bench_upcycle.py --sizes 0.25    # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# Llama-shaped layouts (hidden, intermediate, layers) giving roughly N billion dense parameters.
SHAPES = {1.0: (2048, 5632, 16), 0.5: (1536, 4096, 14), 0.25: (1024, 2816, 16)}
VOCAB = 32000


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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
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
        raise SystemExit(f"{cmd} failed with {rc}")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0, peak


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def bench(size: float, workdir: Path, experts: int) -> dict:
    hidden, inter, layers = SHAPES[size]
    dense = workdir / f"dense-{size}"
    largest = build_dense(dense, hidden, inter, layers)
    subprocess.run(["sync"], check=True)
    recipe = workdir / f"recipe-{size}.yaml"
    recipe.write_text(f"source: {dense}\narchitecture: mixtral\nnum_experts: {experts}\nexperts_per_token: 2\n"
                      "router: {init: random}\ndtype: source\n")
    out, copy = workdir / f"moe-{size}", workdir / f"copy-{size}"
    # the import of torch/transformers is part of what a user waits for, so it is timed too
    t_up, anon = run_sampled([sys.executable, "-m", "mergekit_lite", "upcycle", str(recipe), "-o", str(out)])
    t_cp = timed(["cp", "-r", str(out), str(copy)])
    out_bytes = sum(f.stat().st_size for f in out.iterdir())
    # interpreter + torch/transformers import, a fixed cost that matters only for small models
    t_start = timed([sys.executable, "-c", "import mergekit_lite.ops.upcycle, transformers.models.mixtral"])
    row = {"size_B": size, "out_GB": out_bytes / 1e9, "upcycle_s": t_up, "cp_s": t_cp, "ratio": t_up / t_cp,
           "ratio_no_startup": (t_up - t_start) / t_cp,
           "peak_anon_GB": anon / 1e9, "largest_tensor_GB": largest / 1e9}
    for p in (dense, out, copy):
        shutil.rmtree(p)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 0.5], choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = [bench(s, Path(tmp), args.experts) for s in args.sizes]
    print(f"{'dense':>6} {'out GB':>7} {'upcycle s':>9} {'cp s':>6} {'ratio':>6} {'w/o start':>9} "
          f"{'anon GB':>8} {'largest GB':>10}")
    for r in rows:
        print(f"{r['size_B']:>5}B {r['out_GB']:7.2f} {r['upcycle_s']:9.2f} {r['cp_s']:6.2f} {r['ratio']:5.2f}x {r['ratio_no_startup']:8.2f}x "
              f"{r['peak_anon_GB']:8.2f} {r['largest_tensor_GB']:10.2f}")
    print(f"(cores: {os.cpu_count()}; ratio target <= 1.3x; anon target <= start-up + 2 x largest output tensor (tests/test_memory.py))")


if __name__ == "__main__":
    main()

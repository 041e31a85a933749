"""Training tokens/s with torch's own thread settings vs moemerge's default, on a quiet or a loaded CPU.

Each setting runs in its own process (OpenMP reads its settings once, at start), the settings interleaved
round by round so a change in the machine's load hits all of them alike:

  torch default   OMP_NUM_THREADS / OMP_WAIT_POLICY unset: torch's pool has one thread per core
  moemerge        what `moemerge` sets before torch starts (mergekit_lite/threads.py)
  1 thread        OMP_NUM_THREADS=1

With --neighbour, a process that burns one core (`while True: pass`) runs during the measurement and is
stopped after. The step is forward + cross-entropy + backward + AdamW of a small random Llama.

    python scripts/bench_threads.py                # quiet machine
    python scripts/bench_threads.py --neighbour    # one core taken by another process
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

STEP = r"""
import sys, time
if sys.argv[1] == "moemerge":
    from mergekit_lite.threads import apply_default_threads
    apply_default_threads()
import torch, torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
model = LlamaForCausalLM(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
steps, B, T = int(sys.argv[2]), 8, 256
ids = torch.randint(0, 2048, (B, T))
for s in range(steps + 1):  # step 0 is warm-up (allocations)
    if s == 1:
        t0 = time.perf_counter()
    logits = model(input_ids=ids).logits                                   # (B, T, V)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad()
print(B * T * steps / (time.perf_counter() - t0), torch.get_num_threads())
"""

SETTINGS = {"torch default": {}, "moemerge": {}, "1 thread": {"OMP_NUM_THREADS": "1"}}
OMP_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def run(name: str, steps: int) -> tuple[float, int]:
    """(tokens/s, torch threads) of one fresh process with setting `name`."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS} | SETTINGS[name]
    out = subprocess.run([sys.executable, "-c", STEP, "moemerge" if name == "moemerge" else "plain", str(steps)],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--neighbour", action="store_true", help="burn one core in another process meanwhile")
    args = ap.parse_args()
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.neighbour else None
    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    threads: dict[str, int] = {}
    try:
        for _ in range(args.rounds):
            for name in SETTINGS:
                tps, threads[name] = run(name, args.steps)
                results[name].append(tps)
    finally:
        if burner is not None:
            burner.kill()
    print(f"load average {os.getloadavg()[0]:.2f}; neighbour burning a core: {'yes' if burner else 'no'}; "
          f"usable cores {len(os.sched_getaffinity(0))}")
    base = sum(results["torch default"]) / args.rounds
    for name, values in results.items():
        mean = sum(values) / len(values)
        each = " / ".join(f"{v:.0f}" for v in values)
        print(f"  {name:<14} {threads[name]} thread(s)  {mean:8.0f} tokens/s  ({each})  "
              f"x{mean / base:.2f} of torch default")


if __name__ == "__main__":
    main()

"""PEER and MH-MoE blocks (issue 27): how PEER's cost grows with N, and both blocks against a dense FFN.

One run, side by side (calls interleaved, medians), on one device:

  1. PEER forward at N = 4,096 (64^2) vs N = 1,048,576 (1024^2), same hidden size, heads and top-k: product keys
     score 2 x sqrt(N) sub-keys per head, so the ratio should stay far below 256 (what scoring every expert would
     cost); the goal is <= 32x.
  2. tokens/s (forward + backward) of a PEER block and an MH-MoE block against a dense gated FFN whose parameters
     equal the block's *active* parameters per token (query / head and merge projections included).
  3. peak memory of one forward + backward of each (CUDA: max_memory_allocated; CPU: the peak RSS of a fresh
     process running it, minus that process's RSS before the first call).

    python scripts/bench_peer.py                      # CPU, ~3 min on 2 cores (the N = 1M tables take 2 GB)
    python scripts/bench_peer.py --device cuda --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

HIDDEN, HEADS, TOP_K, KEY_DIM = 256, 8, 16, 128


def text_config(hidden: int, intermediate: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=32).to_dict()


def peer_block(n_experts: int, device: str) -> nn.Module:
    from mergekit_lite.models.moemerge.configuration_moemerge import MoemergeConfig
    from mergekit_lite.models.moemerge.modeling_moemerge import MoemergePeerBlock

    cfg = MoemergeConfig(text_config=text_config(HIDDEN, 4 * HIDDEN), num_experts=n_experts,
                         num_experts_per_tok=TOP_K, block_kind="peer", block_heads=HEADS, peer_key_dim=KEY_DIM)
    block = MoemergePeerBlock(cfg).to(device)
    with torch.no_grad():
        for p in (block.retrieval.sub_keys, block.expert_up, block.expert_down):
            p.normal_(0, 0.02)
    return block


def mh_moe_block(device: str) -> nn.Module:
    from mergekit_lite.models.moemerge.configuration_moemerge import MoemergeConfig
    from mergekit_lite.models.moemerge.modeling_moemerge import MoemergeMultiHeadBlock

    cfg = MoemergeConfig(text_config=text_config(HIDDEN, 4 * HIDDEN), num_experts=8, num_experts_per_tok=2,
                         block_kind="mh_moe", block_heads=4, moe_intermediate_size=HIDDEN)
    block = MoemergeMultiHeadBlock(cfg).to(device)
    for p in block.parameters():
        nn.init.normal_(p, 0, 0.02)
    return block


def active_params(kind: str, block: nn.Module) -> int:
    """Parameters a token's output depends on: PEER's query + heads x k experts (2 x hidden each); MH-MoE's head and
    merge projections, router and k experts per sub-token (heads x k x 3 x (hidden / heads) x expert size)."""
    if kind == "peer":
        return block.retrieval.query.weight.numel() + HEADS * TOP_K * 2 * HIDDEN
    expert = sum(p.numel() for p in block.experts[0].parameters())
    return 2 * HIDDEN * HIDDEN + block.gate.weight.numel() + block.heads * block.gate.top_k * expert


def dense_ffn(params: int, device: str) -> nn.Module:
    from mergekit_lite.models.moemerge.modeling_moemerge import MoemergeExpert

    ffn = MoemergeExpert(HIDDEN, max(1, round(params / (3 * HIDDEN))), "silu").to(device)
    for p in ffn.parameters():
        nn.init.normal_(p, 0, 0.02)
    return ffn


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, device: str, reps: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (one warm-up each)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    return {k: statistics.median(v) for k, v in times.items()}


def forward(block, x):
    def run():
        with torch.no_grad():
            block(x)
    return run


def train_step(block, x):
    def run():
        block.zero_grad(set_to_none=True)
        block(x).square().mean().backward()
    return run


def make(kind: str, device: str):
    if kind.startswith("peer"):
        return peer_block(int(kind.split("-")[1]), device)
    if kind == "mh_moe":
        return mh_moe_block(device)
    base = "peer" if kind == "dense-peer" else "mh_moe"
    return dense_ffn(active_params(base, make(f"peer-{4096}" if base == "peer" else base, device)), device)


def peak_memory(kind: str, tokens: int, device: str) -> float:
    """Bytes of peak memory of one forward + backward of `kind` beyond what was held before it."""
    if device.startswith("cuda"):
        block = make(kind, device)
        x = torch.randn(tokens, HIDDEN, device=device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(block, x)()
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run([sys.executable, __file__, "--peak-of", kind, "--tokens", str(tokens)],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["bytes"])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_child(kind: str, tokens: int) -> None:
    """CPU: peak RSS (VmHWM, reset by exec, unlike ru_maxrss) during one forward + backward, minus the RSS once the
    block is built."""
    block = make(kind, "cpu")
    x = torch.randn(tokens, HIDDEN)
    before = _status_kb("VmRSS")
    train_step(block, x)()
    print(json.dumps({"bytes": max(0, _status_kb("VmHWM") - before) * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per call")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_of:
        return _peak_child(args.peak_of, args.tokens)
    dev = args.device
    torch.manual_seed(0)
    x = torch.randn(args.tokens, HIDDEN, device=dev)
    print(f"device {dev}, {args.tokens} tokens, hidden {HIDDEN}; PEER {HEADS} heads x top-{TOP_K}, key_dim {KEY_DIM}")

    small, large = peer_block(64 ** 2, dev), peer_block(1024 ** 2, dev)
    t = interleaved({"N=4096": forward(small, x), "N=1048576": forward(large, x)}, dev, args.reps)
    del large
    print("\n1. PEER forward, N = 4,096 vs 1,048,576 (goal <= 32x; scoring every expert would be 256x)\n")
    print("| N | ms / call | tokens/s |\n|---|---|---|")
    for k, s in t.items():
        print(f"| {k[2:]} | {1e3 * s:.1f} | {args.tokens / s:,.0f} |")
    print(f"\nratio 1,048,576 / 4,096: {t['N=1048576'] / t['N=4096']:.2f}x")

    mh = mh_moe_block(dev)
    blocks = {"peer (N=4096)": small, "dense = peer active": dense_ffn(active_params("peer", small), dev),
              "mh_moe (h=4, E=8, k=2)": mh, "dense = mh_moe active": dense_ffn(active_params("mh_moe", mh), dev)}
    t = interleaved({k: train_step(b, x) for k, b in blocks.items()}, dev, args.reps)
    print("\n2. forward + backward tokens/s against a dense FFN with the same active parameters\n")
    print("| block | active params | tokens/s | vs its dense FFN |\n|---|---|---|---|")
    names = list(blocks)
    for i, k in enumerate(names):
        ref = names[i + 1] if i % 2 == 0 else k
        active = sum(p.numel() for p in blocks[k].parameters()) if i % 2 else (
            active_params("peer" if i == 0 else "mh_moe", blocks[k]))
        print(f"| {k} | {active:,} | {args.tokens / t[k]:,.0f} | {t[ref] / t[k]:.2f}x |")

    print("\n3. peak memory of one forward + backward beyond the weights (gradients of the tables included)\n")
    print("| block | weights MB | peak MB |\n|---|---|---|")
    for kind in ("peer-4096", "peer-1048576", "mh_moe", "dense-peer", "dense-mh_moe"):
        weights = sum(p.numel() * p.element_size() for p in make(kind, "meta").parameters())
        print(f"| {kind} | {weights / 1e6:,.0f} | {peak_memory(kind, args.tokens, dev) / 1e6:,.0f} |")


if __name__ == "__main__":
    main()

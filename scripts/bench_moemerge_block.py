"""Benchmark the project's MoE block (`architecture: moemerge`) against transformers' own Qwen3-MoE sparse block.

Both blocks get the same shapes and the same weights (our per-expert Linear modules are loaded from the
Qwen3-MoE fused 3-D tensors), are checked to compute the same output, and are then timed side by side in
one run, call by call alternately (fastest of each), on forward and on forward + backward. Qwen3-MoE runs
with transformers' default experts implementation (`grouped_mm`) and with `eager`. Prints tokens/s and the
ratio ours / theirs (goal >= 0.9).

    python scripts/bench_moemerge_block.py                        # CPU (or the GPU accelerate picks)
    python scripts/bench_moemerge_block.py --tokens 8192 --hidden 1024 --inter 512 --experts 16 --top-k 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(hidden: int, inter: int, experts: int, top_k: int, device: torch.device):
    """(qwen3-moe block, moemerge block) with equal weights, fp32, on `device`."""
    from transformers import Qwen3Config, Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from mergekit_lite.models.moemerge.configuration_moemerge import MoemergeConfig
    from mergekit_lite.models.moemerge.modeling_moemerge import MoemergeSparseBlock

    qcfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                          num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=1)
    theirs = Qwen3MoeSparseMoeBlock(qcfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.05)
    text = Qwen3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1).to_dict()
    ours = MoemergeSparseBlock(MoemergeConfig(text_config=text, num_experts=experts, num_experts_per_tok=top_k,
                                              moe_intermediate_size=inter))
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.gate.weight)
        for e, expert in enumerate(ours.experts):
            gate, up = theirs.experts.gate_up_proj[e].chunk(2, dim=0)  # (2I, H) -> (I, H), (I, H)
            expert.gate_proj.weight.copy_(gate)
            expert.up_proj.weight.copy_(up)
            expert.down_proj.weight.copy_(theirs.experts.down_proj[e])
    return theirs.to(device), ours.to(device)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def race(a, b, repeats: int) -> tuple[float, float]:
    """Fastest seconds of `a()` and of `b()`, called alternately `repeats` times each after a warm-up: on a shared,
    noisy machine the minimum of interleaved calls compares the two under the same load."""
    a(), b()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for j, fn in enumerate((a, b)):
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            best[j] = min(best[j], time.perf_counter() - t)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    if a.device:
        device = torch.device(a.device)
    else:
        from accelerate import PartialState

        device = PartialState().device
    theirs, ours = build(a.hidden, a.inter, a.experts, a.top_k, device)
    x = torch.randn(1, a.tokens, a.hidden, device=device, generator=None)
    target = torch.randn_like(x)
    with torch.no_grad():
        delta = (theirs(x) - ours(x)).abs().max().item()
    rows = {"device": str(device), "shape": vars(a), "max_abs_diff": delta}

    def fwd(block):
        def run():
            with torch.no_grad():
                block(x)
        return run

    def fwd_bwd(block):
        def run():
            block.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(block(x), target).backward()  # a real loss: grouped_mm's backward on
            # CPU refuses an expanded gradient (see /work/shared/FACTS.md)
        return run

    for impl in ("grouped_mm", "eager"):
        theirs.experts.config._experts_implementation = impl  # read by @use_experts_implementation per call
        for name, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
            th, ou = race(make(theirs), make(ours), a.repeats)
            rows[f"{impl} {name}"] = {"qwen3_moe_tok_s": round(a.tokens / th), "moemerge_tok_s": round(a.tokens / ou),
                                      "ratio": round(th / ou, 3)}
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

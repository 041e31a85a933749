"""Benchmark `moemerge train`: loop overhead, MoE cost, and where an MoE layer spends its time.

Measured side by side in one run (the machine is noisy; compare within a run), printing ratios:

  (a) loop overhead  tokens/s of `moemerge train` (data, router losses, router statistics, logging every
                     step, no checkpoints; from its per-step metrics after 2 warm-up steps) / a bare
                     loop of forward + cross-entropy + backward + AdamW on the same model and batch
                     shape.                                                        target >= 0.9
  (b) MoE cost       tokens/s of an upcycled 8-expert top-2 model / a dense model with the same *active*
                     parameters (FFN intermediate size x 2), both in bare loops.    target >= 0.8
  (c) MoE layer time split: router (gate matmul, softmax, top-k), dispatch + combine (sort tokens by
                     expert, gathers, un-permute), expert matmuls (grouped_mm), elementwise (activation,
                     routing weights), from torch.profiler self times over forward+backward of one MoE
                     block (aten ops and autograd backward nodes, charged to their outermost stage).
  (d) MFU            model TFLOP/s (6 x active parameters x steady tokens/s) of `moemerge train` and, on a
                     GPU in the loop's peak table (mergekit_lite/train/loop.py), MFU against its dense bf16
                     peak; bf16 autocast by default on a GPU (--precision); on CPU the MFU says n/a.

    python scripts/bench_train.py                  # CPU (or the GPU accelerate picks)
    python scripts/bench_train.py --steps 10 --hidden 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml


def build_models(root: Path, hidden: int, inter: int, layers: int) -> tuple[Path, Path, Path]:
    """(dense, upcycled 8x top-2 MoE, dense with the MoE's active FFN size) model folders."""
    from mergekit_lite.ops.upcycle import run_upcycle
    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.train.corpus import stdlib_docstrings

    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64 or 1,
                 num_key_value_heads=hidden // 64 or 1, max_position_embeddings=1024)
    texts = stdlib_docstrings()
    dense = build_pico_model("llama", root / "dense", texts=texts, intermediate_size=inter, **shape)
    wide = build_pico_model("llama", root / "dense-2x", texts=texts, intermediate_size=2 * inter, **shape)
    (root / "up.yaml").write_text(yaml.safe_dump({"source": str(dense), "num_experts": 8, "experts_per_token": 2,
                                                  "dtype": "float32"}))
    run_upcycle(root / "up.yaml", root / "moe", echo=lambda s: None)
    return dense, root / "moe", wide


def bare_loop(model_dir: Path, batch: int, seq: int, steps: int, device: torch.device, precision: str) -> float:
    """tokens/s of forward + CE + backward + AdamW, nothing else (first 2 steps are warm-up); fp32 master
    weights, under bf16 autocast when `precision` is bf16 (what accelerate does for the train loop)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    t0 = None
    for s in range(steps + 2):
        if s == 2:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    _sync(device)
    return batch * seq * steps / (time.perf_counter() - t0)


def moemerge_loop(root: Path, model_dir: Path, batch: int, seq: int, steps: int,
                  precision: str) -> tuple[float, dict]:
    """(steady tokens/s that `moemerge train` reports for the same model and batch shape, its run summary)."""
    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.corpus import write_corpus
    from mergekit_lite.train.loop import train

    train_txt, val_txt = write_corpus(root / "corpus")
    r = validate_recipe({"model": str(model_dir), "data": {"train": [str(train_txt)], "validation": [str(val_txt)]},
                         "seq_len": seq, "micro_batch_size": batch, "max_steps": steps, "learning_rate": 1e-4,
                         "eval_batches": 1, "output": str(root / "run"), "log_every": 1,
                         "mixed_precision": precision}, TrainRecipe)
    summary = train(r, echo=lambda s: None)
    # per-step throughput after the same 2 warm-up steps the bare loop skips (first steps allocate state)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_tps = [row["tokens_per_s"] for row in rows if row["type"] == "train" and row["step"] > 2]
    per_step = batch * seq
    return per_step * len(steps_tps) / sum(per_step / t for t in steps_tps), summary


def mfu_line(ours: float, summary: dict, device: torch.device) -> str:
    """Model TFLOP/s and MFU at the steady tokens/s `ours` (the summary's figures average in the warm-up steps;
    both scale linearly with tokens/s, so they are rescaled rather than recomputed)."""
    scale = ours / summary["tokens_per_s"]
    tflops = summary["model_tflops_per_s"] * scale
    if summary.get("mfu") is None:
        where = "CPU" if device.type != "cuda" else f"{torch.cuda.get_device_name(device)} (not in the peak table)"
        return f"(d) moemerge train: {tflops:.3g} model TFLOP/s; MFU n/a on {where}"
    return (f"(d) moemerge train: {tflops:.1f} model TFLOP/s; MFU {100 * summary['mfu'] * scale:.1f}% of "
            f"{torch.cuda.get_device_name(device)}'s dense bf16 peak")


# Stage of an MoE block by op name (aten ops and autograd backward nodes); an op is charged to the stage of
# its OUTERMOST matching ancestor, so the per-group aten::mm calls that grouped_mm makes on CPU count as expert
# matmuls, while the router's linear is the block's only other matmul. Dispatch (sort tokens by expert, gather)
# and combine (un-permute gather, sum over top-k) use the same aten::index ops, so they share one bucket.
STAGES = (("loss (not the block)", ("mse_loss",)),
          ("expert matmuls", ("grouped_mm", "groupedmm")),
          ("router", ("linear", "addmm", "mmbackward", "softmax", "topk")),
          ("dispatch + combine", ("sort", "histc", "cumsum", "aten::index", "indexbackward", "indexputbackward")))
OTHER = "elementwise (activation, weighting)"


def stage_of(chain: list[str]) -> str:
    """Stage for an op, given the names from its outermost ancestor down to itself."""
    for name in chain:
        low = name.lower()
        for stage, keys in STAGES:
            if any(k in low for k in keys):
                return stage
    return OTHER


def layer_split(model_dir: Path, batch: int, seq: int, device: torch.device, reps: int = 5) -> dict:
    """Milliseconds per forward+backward of one MoE block, by stage, from torch.profiler's self times.

    The block runs alone on (batch*seq, hidden) inputs with an MSE loss (a real loss: grouped_mm's CPU backward
    rejects the stride-0 gradient of `.sum()`).
    """
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).train()
    block = next(m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, model.config.hidden_size, generator=g).to(device).requires_grad_()
    target = torch.randn(x.shape, generator=g).to(device)

    def step():
        F.mse_loss(block(x), target).backward()

    step()  # warm-up: first call allocates
    on_gpu = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            step()
        _sync(device)
    spent: dict[str, float] = {}
    for ev in prof.events():
        chain, up = [], ev
        while up is not None:
            chain.insert(0, up.name)
            up = up.cpu_parent
        stage = stage_of(chain)
        us = ev.self_device_time_total if on_gpu else ev.self_cpu_time_total
        spent[stage] = spent.get(stage, 0.0) + us / 1e3 / reps
    spent.pop("loss (not the block)", None)
    impl = getattr(model.config, "_experts_implementation", None) or "grouped_mm (transformers default)"
    return {"ms": spent, "impl": impl}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--precision", choices=["auto", "no", "bf16"], default="auto",
                    help="auto: bf16 autocast on a GPU, fp32 on CPU (bf16 on CPU is slow)")
    args = ap.parse_args()
    from mergekit_lite.verify import default_device

    device = default_device()
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, moe, wide = build_models(root, args.hidden, args.intermediate, args.layers)
        tokens = args.batch * args.seq
        bare_moe = bare_loop(moe, args.batch, args.seq, args.steps, device, precision)
        ours, summary = moemerge_loop(root, moe, args.batch, args.seq, args.steps, precision)
        bare_dense = bare_loop(wide, args.batch, args.seq, args.steps, device, precision)
        split = layer_split(moe, args.batch, args.seq, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}); precision {precision}; {tokens} tokens per step; "
          f"experts implementation: {split['impl']}")
    print(f"(a) loop overhead: moemerge train {ours:9.0f} tok/s  bare loop {bare_moe:9.0f} tok/s  "
          f"ratio {ours / bare_moe:.2f} (target >= 0.9)")
    print(f"(b) MoE cost:      MoE 8x top-2 {bare_moe:9.0f} tok/s  dense, same active {bare_dense:9.0f} tok/s  "
          f"ratio {bare_moe / bare_dense:.2f} (target >= 0.8)")
    total = sum(split["ms"].values())
    parts = "  ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in sorted(split["ms"].items(),
                                                                                  key=lambda kv: -kv[1]))
    print(f"(c) one MoE block, forward+backward on {tokens} tokens ({total:.2f} ms, profiler self time): {parts}")
    print(mfu_line(ours, summary, device))

if __name__ == "__main__":
    main()

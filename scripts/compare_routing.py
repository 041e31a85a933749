"""Compare training-time routing policies (`moe.routing`, issue 15) on one upcycled model.

Builds the quickstart's dense Llama (briefly pretrained on the stdlib-docstring corpus), upcycles it once
into an 8-expert top-2 Mixtral, then trains that same model with each policy on the same data, steps and
seed, and prints one table:

  val loss     validation loss of the saved model (plain top-k routing, what `final/` will do)
  max/mean     expert load of the busiest expert over the mean, averaged over layers (1.0 = even), over the
               last fifth of the run
  dead         experts that got no assignment in that window, summed over layers
  dropped      share of assignments dropped for expert capacity (mean over layers)
  tok/s rel    training tokens/s relative to `topk` (one machine, one run: noisy on a shared machine)

    python scripts/compare_routing.py                       # ~5 min on 2 CPU cores
    python scripts/compare_routing.py --steps 200 --capacity 1.0 --workdir /tmp/routing
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

POLICIES = {  # name -> the recipe's moe section
    "topk": {},
    "noisy_topk": {"routing": "noisy_topk"},
    "switch": {"routing": "switch", "train_top_k": 1},
    "gshard": {"routing": "gshard"},
    "topk + capacity": {"capacity_factor": None},  # filled from --capacity
    "gshard + capacity": {"routing": "gshard", "capacity_factor": None},
}


def build_model(work: Path, pretrain_steps: int) -> Path:
    """The quickstart's dense Llama, pretrained, upcycled once into its 8-expert top-2 Mixtral."""
    from mergekit_lite.ops.upcycle import run_upcycle
    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.quickstart import DENSE_SHAPE, QUICKSTART_RECIPE
    from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus

    write_corpus(work / "corpus")
    build_pico_model("llama", work / "dense-init", texts=stdlib_docstrings(), **DENSE_SHAPE)
    train_once(work, work / "dense-init", "pretrain", pretrain_steps, {}, lr=3e-3)
    (work / "runs" / "pretrain" / "final").rename(work / "dense")
    (work / "upcycle.yaml").write_text(QUICKSTART_RECIPE)
    run_upcycle(work / "upcycle.yaml", work / "moe", echo=lambda s: None)
    return work / "moe"


def train_once(work: Path, model: Path, name: str, steps: int, moe: dict, lr: float = 2e-3) -> dict:
    """One `moemerge train` run with the quickstart's settings; returns its summary and last router record."""
    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.loop import train

    out = work / "runs" / name.replace(" ", "")
    body = {"model": str(model), "data": {"train": [str(work / "corpus" / "train.txt")],
                                          "validation": [str(work / "corpus" / "val.txt")]},
            "seq_len": 128, "micro_batch_size": 8, "max_steps": steps, "learning_rate": lr,
            "warmup_steps": max(1, steps // 10), "eval_batches": 8, "log_every": max(1, steps // 5), "seed": 0,
            "moe": moe, "output": str(out)}
    summary = train(validate_recipe(body, TrainRecipe), progress=True, progress_label=name, echo=lambda s: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**summary, "router": next((r for r in reversed(rows) if r["type"] == "router"), None)}


def row(name: str, s: dict, base_tps: float) -> str:
    r = s["router"]
    n = len(r["max_over_mean"])
    return (f"| {name:<17} | {s['final_val_loss']:8.4f} | {sum(r['max_over_mean']) / n:8.2f} | {sum(r['dead']):4d} "
            f"| {sum(r.get('dropped', [0.0])) / n:7.1%} | {s['tokens_per_s'] / base_tps:9.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="training steps per policy")
    ap.add_argument("--pretrain-steps", type=int, default=150, help="dense pretraining steps before upcycling")
    ap.add_argument("--capacity", type=float, default=1.0, help="capacity_factor of the '+ capacity' rows")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the models and runs here (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = build_model(work, args.pretrain_steps)
        results = {}
        for name, moe in POLICIES.items():
            moe = {k: (args.capacity if k == "capacity_factor" else v) for k, v in moe.items()}
            results[name] = train_once(work, model, name, args.steps, moe)
        print(f"\n{args.steps} steps x 1024 tokens, quickstart Mixtral 8 experts top-2, capacity_factor "
              f"{args.capacity} in the '+ capacity' rows\n")
        print("| policy            | val loss | max/mean | dead | dropped | tok/s rel |")
        print("|-------------------|----------|----------|------|---------|-----------|")
        for name, s in results.items():
            print(row(name, s, results["topk"]["tokens_per_s"]))
        print("\n" + yaml.safe_dump({n: {k: s[k] for k in ("final_val_loss", "tokens_per_s")}
                                     for n, s in results.items()}, sort_keys=False))


if __name__ == "__main__":
    main()

"""Compare how to continue a dense model (issue 27): as dense, as a top-k MoE, with PEER added, with MH-MoE added.

Builds the quickstart's dense Llama (briefly pretrained on the stdlib-docstring corpus), then continues it on the
same data, steps, seed and validation batches as:

  dense                 the dense model itself (trainable: all)
  top-k MoE             `architecture: moemerge`, 8 copied experts, top-2 (trainable: all)
  PEER added, added     `block: {kind: peer, mode: add}`, trainable: added (the source stays bit-identical)
  PEER added, all       the same upcycle, trainable: all
  MH-MoE added          `block: {kind: mh_moe, mode: add}`, 4 heads, 8 experts, top-2 per sub-token (trainable: all)

and prints one table: validation loss of the saved model at equal tokens, training tokens/s (one machine, one run:
noisy on a shared machine), total and active parameters per token (PEER: heads x k of N experts; MH-MoE: k experts
per sub-token).

    python scripts/compare_blocks.py                        # ~10 min on 2 CPU cores
    python scripts/compare_blocks.py --steps 200 --peer-experts 1048576 --workdir /tmp/blocks
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml


def variants(peer_experts: int) -> dict[str, tuple[dict | None, str]]:
    """name -> (upcycle recipe fields, or None for the dense model; trainable)."""
    peer = {"num_experts": peer_experts, "experts_per_token": 16, "block": {"kind": "peer", "heads": 8}}
    return {
        "dense": (None, "all"),
        "top-k MoE (8, top-2)": ({"num_experts": 8, "experts_per_token": 2}, "all"),
        "PEER added, trainable added": (peer, "added"),
        "PEER added, trainable all": (peer, "all"),
        "MH-MoE added (h=4, 8, top-2)": ({"num_experts": 8, "experts_per_token": 2,
                                          "block": {"kind": "mh_moe", "heads": 4}}, "all"),
    }


def build_dense(work: Path, pretrain_steps: int) -> Path:
    """The quickstart's dense Llama, pretrained on the corpus."""
    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.quickstart import DENSE_SHAPE
    from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus

    write_corpus(work / "corpus")
    build_pico_model("llama", work / "dense-init", texts=stdlib_docstrings(), **DENSE_SHAPE)
    train_once(work, work / "dense-init", "pretrain", pretrain_steps, "all", lr=3e-3)
    (work / "runs" / "pretrain" / "final").rename(work / "dense")
    return work / "dense"


def upcycle(work: Path, dense: Path, name: str, fields: dict) -> Path:
    from mergekit_lite.ops.upcycle import run_upcycle

    slug = "".join(c for c in name if c.isalnum())
    path = work / f"{slug}.yaml"
    path.write_text(yaml.safe_dump({"source": str(dense), "architecture": "moemerge", "dtype": "float32", "seed": 0,
                                    **fields}))
    if not (work / slug).exists():
        run_upcycle(path, work / slug, echo=lambda s: None, progress=False)
    return work / slug


def train_once(work: Path, model: Path, name: str, steps: int, trainable: str, lr: float = 2e-3) -> dict:
    """One `moemerge train` run with the quickstart's settings; returns its summary."""
    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.loop import train

    out = work / "runs" / "".join(c for c in name if c.isalnum())
    body = {"model": str(model), "data": {"train": [str(work / "corpus" / "train.txt")],
                                          "validation": [str(work / "corpus" / "val.txt")]},
            "seq_len": 128, "micro_batch_size": 8, "max_steps": steps, "learning_rate": lr,
            "warmup_steps": max(1, steps // 10), "eval_batches": 8, "log_every": max(1, steps // 5), "seed": 0,
            "trainable": trainable, "output": str(out)}
    summary = train(validate_recipe(body, TrainRecipe), progress=True, progress_label=name, echo=lambda s: None)
    return {**summary, "out": out}


def params(folder: Path) -> tuple[int, int]:
    """(total, active per token) of a saved model."""
    import torch

    from mergekit_lite.arch.params import model_param_counts
    from mergekit_lite.models import load_causal_lm

    counts = model_param_counts(load_causal_lm(folder, dtype=torch.float32))  # as inspect and train count them
    return counts.total, counts.active


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps per variant (1024 tokens each)")
    ap.add_argument("--pretrain-steps", type=int, default=100, help="dense pretraining steps before continuing")
    ap.add_argument("--peer-experts", type=int, default=256 ** 2, help="PEER's N (a perfect square)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the models and runs here (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        dense = build_dense(work, args.pretrain_steps)
        results = {}
        for name, (fields, trainable) in variants(args.peer_experts).items():
            model = dense if fields is None else upcycle(work, dense, name.split(",")[0], fields)
            s = train_once(work, model, name, args.steps, trainable)
            total, active = params(s["out"] / "final")
            results[name] = {"val_loss": s["final_val_loss"], "tokens_per_s": s["tokens_per_s"], "total": total,
                             "active": active}
        base = results["dense"]["tokens_per_s"]
        print(f"\n{args.steps} steps x 1024 tokens after {args.pretrain_steps} dense pretraining steps; quickstart "
              f"Llama (hidden 128, 4 layers); PEER N = {args.peer_experts}, 8 heads x top-16\n")
        print("| continued as | val loss | tok/s | tok/s vs dense | total params | active params |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['val_loss']:.4f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | "
                  f"{r['total'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M |")
        print("\n" + json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

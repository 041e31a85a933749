"""`moemerge quickstart`: the whole story offline, on a model built on the spot.

dense model (briefly pretrained on English text) -> upcycle (parity shown) -> continued training of
the MoE and of the dense model for the same steps -> a table of validation losses, a one-line
conclusion, files, plots (compare.png: both validation curves against tokens seen).
Each phase shows a progress bar on stderr (tqdm, as `moemerge train` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.folders import RunFolder
from mergekit_lite.io.safety import ANY, MODEL_FOLDER, OLD_TAG, TMP_TAG, remove_own_entries

QUICKSTART_RECIPE = """\
# Quickstart recipe: the small dense Llama beside this file, upcycled into an 8-expert, top-2 Mixtral.
source: dense
architecture: mixtral
num_experts: 8
experts_per_token: 2
router: {init: random}
dtype: float32
seed: 0
"""

# Everything run_quickstart writes into its workdir (plots go under runs/): all --overwrite may remove.
# A folder's value lists what it holds: a user's corpus/ with other files in it is not ours.
QUICKSTART_PRODUCTS = {"corpus": ("train.txt", "val.txt"), "dense-init": MODEL_FOLDER, "dense": MODEL_FOLDER,
                       "moe": MODEL_FOLDER, "runs": ("pretrain", "dense", "moe", "compare.png", ".*.moemerge-*"),
                       "upcycle.yaml": None, "train-pretrain.yaml": None, "train-dense.yaml": None,
                       "train-moe.yaml": None, f".*.{TMP_TAG}-*": ANY, f".*.{OLD_TAG}-*": ANY, ".*.moemerge-lock": None}

DENSE_SHAPE: dict[str, Any] = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2)


def _train(workdir: Path, model: Path, name: str, steps: int, lr: float, label: str, echo) -> dict:
    """One `moemerge train` run on the quickstart corpus; returns its summary plus the step-0 val loss."""
    import json

    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.loop import train

    body = {"model": str(model), "data": {"train": [str(workdir / "corpus" / "train.txt")],
                                          "validation": [str(workdir / "corpus" / "val.txt")]},
            "seq_len": 128, "micro_batch_size": 8, "max_steps": steps, "learning_rate": 2e-3,
            "warmup_steps": max(1, steps // 10), "eval_batches": 8, "log_every": max(1, steps // 20),
            # a validation point every tenth of the run (every other step for short runs; plus start and end): the
            # curves in the plots are measured, not drawn between two points
            "eval_every": max(2, steps // 10), "output": str(workdir / "runs" / name)}
    (workdir / f"train-{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    summary = train(validate_recipe(body, TrainRecipe), progress=True, progress_label=label, echo=echo)
    rows = [json.loads(line) for line in RunFolder(workdir / "runs" / name).metrics.read_text().splitlines()]
    summary["initial_val_loss"] = next(r["val_loss"] for r in rows if r["type"] == "val" and r["step"] == 0)
    return summary


def run_quickstart(workdir: Path, *, overwrite: bool = False, pretrain_steps: int = 150, steps: int = 100,
                   echo=print) -> dict:
    """Build, upcycle, verify, train both models; returns the figures it printed."""
    from mergekit_lite.inspect_model import describe
    from mergekit_lite.ops.upcycle import run_upcycle
    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus
    from mergekit_lite.verify import compare_logits, record_parity

    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not overwrite and (workdir / "runs" / "moe" / "final" / "model.safetensors").is_file():
            # a newcomer following the README runs it twice: the finished one is the answer, not an error
            echo(f"{workdir} already holds a finished quickstart (models in {workdir / 'dense'}, {workdir / 'moe'}, "
                 f"runs in {workdir / 'runs'}); pass --overwrite to run it again")
            return {"already_done": True}
        if not overwrite:
            raise MoemergeError(f"{workdir} holds an unfinished or foreign quickstart; pass --overwrite to start "
                                "again (it removes only what quickstart writes) or choose --workdir")
        remove_own_entries(workdir, QUICKSTART_PRODUCTS, "moemerge quickstart")
    workdir.mkdir(parents=True, exist_ok=True)
    quiet = lambda s: None  # noqa: E731 - the sub-steps' own chatter is summarised below

    echo(f"1. corpus: the Python standard library's docstrings -> {workdir / 'corpus'}")
    write_corpus(workdir / "corpus")
    echo(f"2. a small dense Llama, pretrained for {pretrain_steps} steps -> {workdir / 'dense'}")
    build_pico_model("llama", workdir / "dense-init", texts=stdlib_docstrings(), **DENSE_SHAPE)
    _train(workdir, workdir / "dense-init", "pretrain", pretrain_steps, 3e-3, "pretrain", quiet)
    (workdir / "runs" / "pretrain" / "final").rename(workdir / "dense")

    recipe = workdir / "upcycle.yaml"
    recipe.write_text(QUICKSTART_RECIPE)
    echo(f"3. moemerge upcycle {recipe} -o {workdir / 'moe'}")
    run_upcycle(recipe, workdir / "moe", progress=True, echo=quiet)
    report = compare_logits(workdir / "moe", workdir / "dense")
    record_parity(workdir / "moe", workdir / "dense", report)
    verdict = "PASS" if report.max_abs <= 1e-4 else "FAIL"
    echo(f"   step-0 parity {verdict}: max |Δlogits| {report.max_abs:.2e}, top-1 agreement "
         f"{100 * report.top1_agreement:.1f}% (fp32 target <= 1e-4)")

    echo(f"4. continued training, {steps} steps each, same data and learning rate")
    runs = {"dense": _train(workdir, workdir / "dense", "dense", steps, 2e-3, "train dense", quiet),
            "moe": _train(workdir, workdir / "moe", "moe", steps, 2e-3, "train MoE", quiet)}
    echo("")
    echo(f"   {'model':<22} {'params':>8} {'active':>8} {'val loss start':>15} {'val loss end':>13} {'tok/s':>7}")
    for name, label in (("dense", "dense Llama"), ("moe", "Mixtral 8 experts top-2")):
        d, s = describe(workdir / "runs" / name / "final"), runs[name]
        echo(f"   {label:<22} {d['total_params'] / 1e6:7.2f}M {d['active_params'] / 1e6:7.2f}M "
             f"{s['initial_val_loss']:15.4f} {s['final_val_loss']:13.4f} {s['tokens_per_s']:7.0f}")
    plots = _plots(workdir, echo)
    echo("")
    echo(conclusion(runs["dense"], runs["moe"]))
    echo(f"next: open {workdir / 'runs' / 'compare.png'}; moemerge inspect {workdir / 'runs' / 'moe' / 'final'}; "
         "then upcycle your own model with a recipe from recipes/upcycle/ (docs/upcycle.md)")
    echo("files: " + ", ".join(str(p) for p in _files(workdir)))
    return {"parity_max_abs": report.max_abs, "runs": runs, "plots": plots}


def conclusion(dense: dict, moe: dict) -> str:
    """One line from the two summaries: which model reached the lower validation loss, by how much, and the
    price in training speed (tokens/s)."""
    d, m = dense["final_val_loss"], moe["final_val_loss"]
    better, worse = ("the upcycled MoE", "the dense model") if m < d else ("the dense model", "the upcycled MoE")
    speed = moe["tokens_per_s"] / max(dense["tokens_per_s"], 1e-9)
    return (f"conclusion: {better} reached the lower validation loss, {min(d, m):.4f} vs {max(d, m):.4f} for "
            f"{worse} ({abs(d - m):.4f} nats/token, {100 * abs(d - m) / max(d, m):.1f}% lower), training at "
            f"{moe['tokens_per_s']:.0f} tokens/s vs the dense model's {dense['tokens_per_s']:.0f} "
            f"({speed:.2f}x the dense speed) for the same {moe['tokens']} tokens")


def _files(workdir: Path) -> list[Path]:
    """What the quickstart leaves for the user to open, all of it written by run_quickstart."""
    runs = workdir / "runs"
    return [workdir / "dense", workdir / "moe", RunFolder(runs / "dense").final, RunFolder(runs / "moe").final,
            RunFolder(runs / "dense").metrics, RunFolder(runs / "moe").metrics, runs / "compare.png"]


def _plots(workdir: Path, echo) -> list[Path]:
    """Loss/lr/expert-load PNGs of both runs (`moemerge plot`), then compare.png: the two validation curves."""
    from mergekit_lite.train.plot import plot_compare, plot_run

    paths: list[Path] = []
    for name in ("dense", "moe"):
        paths += plot_run(workdir / "runs" / name)
    runs = workdir / "runs"
    paths.append(plot_compare({"dense Llama": runs / "dense", "upcycled Mixtral, 8 experts top-2": runs / "moe"},
                              runs / "compare.png", title="continued training: dense vs upcycled MoE"))
    echo(f"plots: {', '.join(str(p) for p in paths)}")
    return paths

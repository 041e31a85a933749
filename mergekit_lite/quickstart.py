"""`moemerge quickstart`: the whole upcycling story offline, on a model built on the spot."""

from __future__ import annotations

import shutil
from pathlib import Path

from mergekit_lite.errors import MoemergeError

QUICKSTART_RECIPE = """\
# Quickstart recipe: the pico dense Llama beside this file, upcycled into an 8-expert, top-2 Mixtral.
source: dense
architecture: mixtral
num_experts: 8
experts_per_token: 2
router: {init: random}
dtype: float32
seed: 0
"""


def run_quickstart(workdir: Path, *, overwrite: bool = False, echo=print) -> None:
    from mergekit_lite.inspect_model import describe, describe_lines
    from mergekit_lite.ops.upcycle import run_upcycle
    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.verify import compare_logits

    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not overwrite:
            raise MoemergeError(f"{workdir} already exists; pass --overwrite or choose --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    echo(f"1. building a small dense Llama in {workdir / 'dense'}")
    build_pico_model("llama", workdir / "dense", hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    recipe = workdir / "upcycle.yaml"
    recipe.write_text(QUICKSTART_RECIPE)
    echo(f"2. moemerge upcycle {recipe} -o {workdir / 'moe'}")
    run_upcycle(recipe, workdir / "moe", echo=lambda s: echo("   " + s))
    echo(f"3. moemerge verify {workdir / 'moe'} --against {workdir / 'dense'}")
    report = compare_logits(workdir / "moe", workdir / "dense")
    for line in report.lines():
        echo("   " + line)
    echo(f"4. moemerge inspect {workdir / 'moe'}")
    for line in describe_lines(describe(workdir / "moe")):
        echo("   " + line)
    verdict = "PASS" if report.max_abs <= 1e-4 else "FAIL"
    echo(f"step-0 parity {verdict}: max |Δlogits| = {report.max_abs:.2e} (fp32 target <= 1e-4)")

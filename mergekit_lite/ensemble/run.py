"""`moemerge ensemble RECIPE [--score FILE] [--json]`: validate, check vocabularies, load, run, print."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from mergekit_lite.ensemble.decode import Answer, answer
from mergekit_lite.ensemble.members import load_members, prepare_members, read_prompts
from mergekit_lite.ensemble.score import score_file
from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import EnsembleRecipe, load_recipe


def run_ensemble(recipe_path: Path, *, score: Path | None = None, as_json: bool = False, device: str | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print,
                 raw: Callable[[str], None] = print) -> dict:
    """Run an ensemble recipe: answers for its prompts, or with `score` the loss table of members and ensemble.

    Everything the user can get wrong (recipe, prompts, score file, vocabularies, device) is refused before
    any weights are read.

    Args:
        recipe_path: the YAML recipe.
        score: a text file to score instead of answering prompts.
        as_json: print one JSON object (through `raw`) instead of text lines (through `echo`).
        device: cpu, cuda, cuda:1 ... (None: accelerate's choice, like `train`).
        progress: show a progress bar on stderr.

    Returns:
        {"outputs": [...]} or the score record, as printed with --json.
    """
    import torch

    from mergekit_lite.ops.router_init import check_device
    from mergekit_lite.verify import default_device

    recipe = load_recipe(recipe_path, EnsembleRecipe)
    check_device(device)
    prompts = None if score is not None else read_prompts(recipe.prompts, recipe_path)
    if score is not None and recipe.method == "vote":
        raise MoemergeError("--score needs method probs or logits (a vote picks answers, it has no "
                            "next-token distribution); set method: probs to score the probability ensemble")
    if score is not None and not Path(score).is_file():
        raise MoemergeError(f"--score {score}: file not found; give a .txt (one document per line) or .jsonl file")
    members, tokenizer, vocab = prepare_members(recipe, recipe_path)  # tokenizers only: no weights yet
    load_members(members, recipe.dtype, torch.device(device) if device else default_device(),
                 recipe.trust_remote_code)
    names, models = [m.name for m in members], [m.model for m in members]
    if score is not None:
        result = score_file(Path(score), recipe, names, models, tokenizer, members[0].folder, vocab, progress)
        record = {"members": result["members"], "ensemble": result["ensemble"]}
        if as_json:
            raw(json.dumps(record))
        else:
            for line in score_lines(result, recipe, Path(score)):
                echo(line)
        return record
    answers = _answer_all(prompts, recipe, names, models, tokenizer, vocab, progress)
    record = {"outputs": [a.as_json() for a in answers]}
    if as_json:
        raw(json.dumps(record, ensure_ascii=False))
    else:
        for i, a in enumerate(answers):
            for line in answer_lines(a, i, len(answers), recipe, names):
                echo(line)
    return record


def _answer_all(prompts, recipe, names, models, tokenizer, vocab, progress) -> list[Answer]:
    from tqdm.auto import tqdm

    bar = tqdm(prompts, desc=f"ensemble ({recipe.method})", unit="prompt", file=sys.stderr, disable=not progress)
    return [answer(p, i, recipe, names, models, tokenizer, vocab) for i, p in enumerate(bar)]


def _weights_text(recipe: EnsembleRecipe, a: Answer, names: list[str]) -> str:
    shown = ", ".join(f"{n} {w:.3f}" for n, w in zip(names, a.weights))
    if recipe.weights == "perplexity":
        ppl = ("; prompt perplexity " + ", ".join(f"{p:.2f}" for p in a.perplexities) if a.perplexities
               else " (one-token prompt: no perplexity, equal weights)")
        return f"  weights (perplexity, temperature {recipe.temperature_ppl:g}): {shown}{ppl}"
    return f"  weights: {shown}"


def answer_lines(a: Answer, i: int, n: int, recipe: EnsembleRecipe, names: list[str]) -> list[str]:
    """Human-readable lines for one prompt: the prompt, weights or vote candidates, the answer."""
    lines = [f"[{i + 1}/{n}] prompt: {a.prompt}"]
    if recipe.method == "vote":
        lines.append(f"  candidates ({recipe.similarity} summed over the others):")
        best = max(range(len(a.candidates)), key=lambda k: (a.candidates[k]["score"], -k))
        for k, c in enumerate(a.candidates):
            mark = "*" if k == best else " "
            lines.append(f"   {mark}[{k}] {c['model']} score {c['score']:.3f}: {c['text']!r}")
    else:
        lines.append(_weights_text(recipe, a, names))
    lines.append(f"  answer: {a.text}")
    return lines


def score_lines(result: dict, recipe: EnsembleRecipe, file: Path) -> list[str]:
    """The --score table: each member, the members' mean, the ensemble; loss in nats/token and perplexity."""
    rows = [(m["model"], m["loss"]) for m in result["members"]]
    mean = sum(loss for _, loss in rows) / len(rows)
    how = "perplexity weights" if recipe.weights == "perplexity" else (
        "weights " + ", ".join(f"{w:g}" for w in recipe.fixed_weights()) if recipe.fixed_weights() else "equal weights")
    rows += [("mean of the members", mean), (f"ensemble ({recipe.method}, {how})", result["ensemble"]["loss"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"score {file}: {result['blocks']} blocks of {recipe.score.seq_len} tokens, {result['tokens']} "
             "predicted tokens", f"  {'model':<{width}}  {'loss':>8}  {'ppl':>9}"]
    lines += [f"  {name:<{width}}  {loss:8.4f}  {math.exp(min(loss, 700)):9.2f}" for name, loss in rows]
    best = min(result["members"], key=lambda m: m["loss"])
    delta = result["ensemble"]["loss"] - best["loss"]
    lines.append(f"  the ensemble is {abs(delta):.4f} nats/token {'below' if delta < 0 else 'above'} its best member "
                 f"({best['model']})")
    return lines

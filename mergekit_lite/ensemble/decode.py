"""The decoding loop: every member keeps its own KV cache; each step feeds one token to each and combines.

After the prompt (one forward of T tokens per member), N new tokens cost N - 1 forwards of one token
per member: the last chosen token is never fed, since nothing reads its logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mergekit_lite.ensemble.combine import SIMILARITIES, combine, normalise, perplexity_weights, pick_token, vote
from mergekit_lite.recipe import EnsembleRecipe, Generation


@dataclass
class Answer:
    """One prompt's result: the text, the member weights used, and (vote) every candidate with its score."""

    prompt: str
    text: str
    tokens: list[int]
    weights: list[float]
    perplexities: list[float] | None = None
    candidates: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        """The `--json` record: exactly prompt, text, weights, candidates."""
        return {"prompt": self.prompt, "text": self.text, "weights": self.weights, "candidates": self.candidates}


@torch.no_grad()
def forward(model, ids: torch.Tensor, cache, vocab: int) -> torch.Tensor:
    """Logits [T, vocab] of ids [1, T] appended to `cache` (grown in place), cut to the shared vocabulary.

    transformers 5.24 names the KV-cache argument `cache` (`past_key_values` is deprecated).
    """
    return model(input_ids=ids, cache=cache, use_cache=True).logits[0, :, :vocab]


def prompt_nll(logits: torch.Tensor, ids: torch.Tensor) -> float | None:
    """Mean next-token NLL of the prompt from its own logits [T, V] (None for a one-token prompt)."""
    if ids.shape[-1] < 2:
        return None
    return F.cross_entropy(logits[:-1].float(), ids[0, 1:].to(logits.device)).item()


def generate(models: list, ids: torch.Tensor, *, method: str, weights: list[float] | None, vocab: int,
             generation: Generation, eos: set[int], temperature_ppl: float = 1.0,
             generator: torch.Generator | None = None, until: Callable[[list[int]], bool] | None = None
             ) -> tuple[list[int], list[float], list[float] | None]:
    """Decode from the combined next-token distribution of `models`.

    Args:
        models: loaded causal LMs sharing a vocabulary.
        ids: [1, T] prompt token ids.
        method: `probs` or `logits` (see `combine`).
        weights: one per model, or None for perplexity weights from the prompt.
        vocab: the shared vocabulary size (logit rows beyond it are padding).
        generation: max_new_tokens, do_sample, temperature, top_p.
        eos: token ids that end the answer (kept in the returned tokens).
        temperature_ppl: temperature of the perplexity weights.
        generator: the sampling RNG.
        until: called with the tokens so far after each step; True ends the answer (stop strings).

    Returns:
        (new token ids, the normalised weights used, each model's prompt perplexity or None).
    """
    from transformers import DynamicCache

    caches = [DynamicCache(config=m.config) for m in models]
    prefill = [forward(m, ids.to(m.device), c, vocab) for m, c in zip(models, caches)]  # each [T, V]
    ppl = None
    if weights is None:
        nll = [prompt_nll(p, ids) for p in prefill]
        if all(x is not None for x in nll):
            w, ppl = perplexity_weights(nll, temperature_ppl), [math.exp(x) for x in nll]
        else:  # a one-token prompt has no perplexity: equal weights
            w = normalise([1.0] * len(models))
    else:
        w = normalise(weights)
    last = torch.stack([p[-1].to(prefill[0].device) for p in prefill])  # [M, V]
    tokens: list[int] = []
    for step in range(generation.max_new_tokens):
        token = pick_token(combine(last, w, method), do_sample=generation.do_sample,
                           temperature=generation.temperature, top_p=generation.top_p, generator=generator)
        tokens.append(token)
        if token in eos or step == generation.max_new_tokens - 1 or (until is not None and until(tokens)):
            break
        last = torch.stack([forward(m, torch.tensor([[token]], device=m.device), c, vocab)[-1].to(last.device)
                            for m, c in zip(models, caches)])
    return tokens, w.tolist(), ppl


def eos_ids(tokenizer, model) -> set[int]:
    """Tokens that end an answer: the tokenizer's eos and the generation config's (an int or a list)."""
    found = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    return {i for i in found if i is not None}


def answer(prompt: str, index: int, recipe: EnsembleRecipe, names: list[str], models: list, tokenizer,
           vocab: int) -> Answer:
    """One prompt through the recipe's method: a combined decode, or one candidate per model and a vote."""
    device = models[0].device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    gen = recipe.generation
    eos = eos_ids(tokenizer, models[0])

    def rng() -> torch.Generator:  # prompt i samples from seed + i: answers do not depend on the prompts' order
        return torch.Generator().manual_seed(gen.seed + index)

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    if recipe.method != "vote":
        weights = None if recipe.weights == "perplexity" else recipe.fixed_weights() or [1.0] * len(models)
        tokens, w, ppl = generate(models, ids, method=recipe.method, weights=weights, vocab=vocab, generation=gen,
                                  eos=eos, temperature_ppl=recipe.temperature_ppl, generator=rng())
        return Answer(prompt, decode(tokens), tokens, w, ppl)
    outs = [generate([m], ids, method="probs", weights=[1.0], vocab=vocab, generation=gen, eos=eos,
                     generator=rng())[0] for m in models]
    # eos is dropped before comparing: it says where an answer ends, not what it says
    best, scores = vote([[t for t in o if t not in eos] for o in outs], SIMILARITIES[recipe.similarity])
    candidates = [{"model": n, "text": decode(o), "score": s} for n, o, s in zip(names, outs, scores)]
    return Answer(prompt, decode(outs[best]), outs[best], normalise([1.0] * len(models)).tolist(),
                  candidates=candidates)

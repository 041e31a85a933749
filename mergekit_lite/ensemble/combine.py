"""Pure functions of the ensemble: how member outputs become one distribution, one weight vector, one answer.

Shapes: M members, V vocabulary entries, T positions. Everything works on the last axis, so the same
function combines one decoding step ([M, V]) or every position of a scored block ([M, B, T, V]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def normalise(weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Weights scaled to sum to 1 (float64 tensor), so `[1, 3]` and `[0.25, 0.75]` are the same ensemble."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return w / w.sum(dim=0, keepdim=True)


def _expand(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Weights [M] or [M, ...] broadcast against stacked member outputs [M, ..., V]."""
    w = w.to(device=like.device, dtype=torch.float32)
    return w.reshape(w.shape + (1,) * (like.dim() - w.dim()))


def combine(logits: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """Ensemble log-probabilities from stacked member logits.

    Args:
        logits: [M, ..., V] raw logits of the M members (already cut to the shared vocabulary).
        weights: [M] (or [M, ...] per position) weights summing to 1 over M.
        method: `probs`: log Σ_m w_m softmax(l_m), a mixture of the members' distributions;
            `logits`: log_softmax(Σ_m w_m l_m), a weighted geometric mean of them.

    Returns:
        [..., V] log-probabilities (float32) that sum to 1 in probability space.
    """
    logits = logits.float()
    w = _expand(weights, logits)
    if method == "probs":
        # in log space: log Σ w p = logsumexp(log w + log p); a zero weight gives -inf and drops out
        return torch.logsumexp(torch.log(w) + torch.log_softmax(logits, dim=-1), dim=0)
    if method == "logits":
        return torch.log_softmax((w * logits).sum(dim=0), dim=-1)
    raise ValueError(f"unknown method {method!r}")


def perplexity_weights(nll: Sequence[float] | torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Pack-of-LLMs weights: softmax over members of -log(perplexity) / temperature.

    Args:
        nll: [M, ...] each member's mean next-token negative log-likelihood (log-perplexity) on the context.
        temperature: > 0; large values flatten the weights towards equal, small ones pick the best member.

    Returns:
        [M, ...] weights summing to 1 over the members (float64).
    """
    nll = torch.as_tensor(nll, dtype=torch.float64)
    return torch.softmax(-nll / temperature, dim=0)


def prefix_mean_nll(nll: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the positions *before* each one: [M, B, T] -> [M, B, T]; position 0 gets 0 (equal weights).

    Used by `--score` so a position's perplexity weights come from its context only, never from the token
    being scored.
    """
    before = torch.cumsum(nll, dim=-1) - nll  # sum over positions < t
    count = torch.arange(nll.shape[-1], device=nll.device).clamp_min(1)
    return before / count


def pick_token(logprobs: torch.Tensor, *, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
    """The next token from ensemble log-probabilities [V]: argmax, or a sample (temperature, then top-p)."""
    if not do_sample:
        return int(torch.argmax(logprobs))
    probs = torch.softmax(logprobs.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is below top_p: the first one always stays
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)·len(b)) time, O(len(b)) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _f1(overlap: float, len_a: int, len_b: int) -> float:
    if len_a == 0 and len_b == 0:
        return 1.0  # two empty answers agree
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len_a, overlap / len_b
    return 2 * precision * recall / (precision + recall)


def rouge_l(a: Sequence, b: Sequence) -> float:
    """ROUGE-L F1 of two token sequences: the LCS's harmonic mean of precision and recall (symmetric, in [0, 1])."""
    return _f1(lcs_length(a, b), len(a), len(b))


def token_f1(a: Sequence, b: Sequence) -> float:
    """Bag-of-tokens F1 (SQuAD style): order-free overlap of two token sequences."""
    from collections import Counter

    return _f1(sum((Counter(a) & Counter(b)).values()), len(a), len(b))


SIMILARITIES: dict[str, Callable[[Sequence, Sequence], float]] = {"rouge_l": rouge_l, "token_f1": token_f1}


def vote(candidates: Sequence[Sequence], similarity: Callable[[Sequence, Sequence], float] = rouge_l
         ) -> tuple[int, list[float]]:
    """Crowd vote: the candidate with the highest summed similarity to the other candidates.

    Args:
        candidates: N >= 2 token sequences (one per model).
        similarity: a symmetric function of two sequences.

    Returns:
        (index of the winner, the N scores); ties go to the lower index.
    """
    n = len(candidates)
    sim = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            sim[i][j] = sim[j][i] = similarity(candidates[i], candidates[j])
    scores = [math.fsum(sim[i][j] for j in range(n) if j != i) for i in range(n)]
    best = 0
    for i in range(1, n):
        if scores[i] > scores[best]:  # strict: an equal score never displaces a lower index
            best = i
    return best, scores

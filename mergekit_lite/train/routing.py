"""Training-time routing policies (`moe.routing`), as pure functions on one router's outputs.

Every function takes tensors of shape (tokens T, experts E) or (T, k) and returns new ones; randomness is
drawn by the caller (`RouterTap`, from torch's global RNG, which checkpoints restore) and passed in, so each
rule can be tested on hand-made inputs. A dropped or unsent assignment is written as expert index E (one
past the last) with weight 0: transformers' expert implementations treat an index >= E as "no expert"
(`eager` always, `grouped_mm` and `batched_mm` once `_is_expert_parallel` is set, see `RouterTap`).

`scores` are what the family ranks on (softmax probabilities, or DeepSeek-V3 sigmoid scores); `choice` is
`scores` plus any selection bias (aux-loss-free balancing): experts are *chosen* on `choice`, *weighted* from
`scores`, as transformers' routers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_lite.arch.specs import RouterSpec
from mergekit_lite.arch.tables import moe_counts
from mergekit_lite.errors import MoemergeError
from mergekit_lite.models import text_part

POLICIES = ("topk", "noisy_topk", "switch", "gshard")


@dataclass(frozen=True)
class Scoring:
    """How a router family turns logits into expert weights (from its `RouterSpec` and config fields)."""

    sigmoid: bool = False  # DeepSeek-V3 routers (glm4_moe, dots1): an independent sigmoid per expert
    renormalise: bool = True  # top-k weights divided by their sum (Mixtral always; Qwen with norm_topk_prob)
    scale: float = 1.0  # routed_scaling_factor

    @classmethod
    def of(cls, spec: RouterSpec, config: dict[str, Any]) -> "Scoring":
        """The scoring a family's router computes, from its `RouterSpec` and the model's config.json.

        The scoring is the spec's default, or the value of its `scoring_field` (moemerge's softmax | sigmoid);
        top-k weights are renormalised unless `norm_topk_prob` says otherwise (Qwen-MoE can turn it off;
        Mixtral, ERNIE and Granite always renormalise); `scaling_field` names the routed scaling factor.
        """
        fields = text_part(config)
        scale = fields.get(spec.scaling_field) if spec.scaling_field else None
        return cls(sigmoid=spec.scoring_of(fields) == "sigmoid",
                   renormalise=bool(fields.get("norm_topk_prob", True)),
                   scale=float(scale or 1.0))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, E) fp32 scores the family ranks and weights on."""
        return logits.float().sigmoid() if self.sigmoid else F.softmax(logits, dim=-1, dtype=torch.float)

    def normalised(self, logits: torch.Tensor) -> torch.Tensor:
        """(T, E) scores that sum to 1 per token: softmax, or sigmoid / its sum (DeepSeek-V3's balance loss)."""
        s = self.scores(logits)
        return s / (s.sum(-1, keepdim=True) + 1e-20) if self.sigmoid else s

    def combine(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(T, k) weights of the chosen experts, as the saved model computes them."""
        w = scores.gather(-1, idx)
        if self.renormalise:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scale if self.scale != 1.0 else w


def topk(scores: torch.Tensor, choice: torch.Tensor, k: int, scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain top-k: the k best experts on `choice`, weighted as the family does. Returns (weights, idx)."""
    idx = torch.topk(choice, k, dim=-1).indices  # (T, k)
    return scoring.combine(scores, idx), idx


def noisy_logits(logits: torch.Tensor, x: torch.Tensor, w_noise: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. (2017): H(x) = x·W_g + eps * softplus(x·W_noise), eps ~ N(0, 1) drawn by the caller.

    Args:
        logits: (T, E) x·W_g, the router's own logits.
        x: (T, H) the router input.
        w_noise: (E, H) the learned noise projection.
        eps: (T, E) standard normal draws.
    """
    return logits.float() + eps * F.softplus(F.linear(x.float(), w_noise.float()))


def switch(scores: torch.Tensor, choice: torch.Tensor, scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformer top-1: the best expert on `choice`, weighted by its raw score (not renormalised)."""
    idx = choice.argmax(-1, keepdim=True)  # (T, 1)
    return scores.gather(-1, idx) * scoring.scale, idx


def gshard(scores: torch.Tensor, choice: torch.Tensor, u: torch.Tensor,
           scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
    """GShard top-2 with random routing (Lepikhin et al., Algorithm 1).

    The two best experts' scores are renormalised to g1 + g2 = 1; the first expert is always used, the second
    only where 2·g2 > u (u ~ U[0, 1) drawn by the caller), so with probability 2·g2 <= 1. An unsent second
    assignment becomes index E with weight 0; g1 is left as it is, as in the paper.
    """
    n_exp = scores.shape[-1]
    idx = torch.topk(choice, 2, dim=-1).indices  # (T, 2)
    g = scores.gather(-1, idx)
    g = g / (g.sum(-1, keepdim=True) + 1e-20)
    send = 2 * g[:, 1].detach() > u  # (T,)
    weights = torch.stack([g[:, 0], torch.where(send, g[:, 1], torch.zeros_like(g[:, 1]))], dim=-1)
    idx = torch.stack([idx[:, 0], torch.where(send, idx[:, 1], torch.full_like(idx[:, 1], n_exp))], dim=-1)
    return weights * scoring.scale, idx


def capacity(tokens: int, k: int, n_experts: int, factor: float) -> int:
    """Assignments one expert takes per micro-batch: ceil(factor * tokens * k / E) (Megatron's formula)."""
    return math.ceil(factor * tokens * k / n_experts)


def drop_over_capacity(idx: torch.Tensor, weights: torch.Tensor, n_experts: int, cap: int,
                       policy: str, choices_first: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most `cap` assignments per expert; the rest become index E with weight 0.

    Args:
        idx: (T, k) chosen experts; entries equal to E are already unsent and take no room.
        weights: (T, k) their weights.
        n_experts: E.
        cap: assignments each expert keeps.
        policy: "position" keeps the earliest tokens (token order), "probs" the highest weights.
        choices_first: with "position", place every token's first choice before any second choice (GShard,
            Algorithm 1: a second choice takes only the room first choices left); else token by token (Megatron).

    Returns:
        (idx, weights, dropped): dropped is a (T, k) bool mask of the assignments removed here.
    """
    T, k = idx.shape
    if choices_first and policy == "position":  # queue order choice-major: (k, T) flattened, mapped back
        idx_t, w_t, d_t = drop_over_capacity(idx.t().contiguous(), weights.t().contiguous(), n_experts, cap, policy)
        return idx_t.t(), w_t.t(), d_t.t()
    flat = idx.reshape(-1)  # (T*k,) token-major: a token's own slots never share an expert
    valid = flat < n_experts
    hits = F.one_hot(flat.clamp(max=n_experts - 1), n_experts).bool() & valid[:, None]  # (T*k, E)
    if policy == "position":
        rank = hits.long().cumsum(0)  # 1-based rank of each assignment in its expert's queue, in token order
        keep = (rank * hits).sum(-1) <= cap
    elif policy == "probs":
        w = weights.detach().reshape(-1, 1).float().expand(-1, n_experts)
        ranked = torch.where(hits, w, torch.full_like(w, -math.inf))
        best = ranked.topk(min(cap, T * k), dim=0).indices  # (cap, E) rows kept per expert
        keep = (torch.zeros_like(hits).scatter(0, best, True) & hits).any(-1)
    else:
        raise ValueError(f"unknown drop policy {policy!r}")
    dropped = (valid & ~keep).view(T, k)
    idx = torch.where(dropped, torch.full_like(idx, n_experts), idx)
    weights = torch.where(dropped, torch.zeros_like(weights), weights)
    return idx, weights, dropped


def check_routing(moe: Any, cfg: dict[str, Any]) -> None:
    """Refuse, before training, a routing policy the model's config.json cannot take.

    Args:
        moe: the recipe's `moe` section (MoETraining).
        cfg: the model's config.json (text part for multimodal models).

    Raises:
        MoemergeError: naming the field, the value and the fix.
    """
    text = text_part(cfg)
    n_exp, k = moe_counts(text)
    if not n_exp or not k:
        return  # a dense model: the moe section is ignored
    need = {"switch": 1, "gshard": 2}.get(moe.routing)
    if need and moe.train_top_k is None and k != need:
        raise MoemergeError(f"moe.routing = {moe.routing!r} trains top-{need} but the model routes top-{k} "
                            f"(num_experts_per_tok); state `moe.train_top_k: {need}` to train it that way anyway "
                            f"(the saved model keeps routing top-{k}), or pick moe.routing: topk")
    if moe.train_top_k is not None and moe.train_top_k > n_exp:
        raise MoemergeError(f"moe.train_top_k = {moe.train_top_k} is more than the model's {n_exp} experts; "
                            f"set it to at most {n_exp}")
    if (text.get("n_group") or 1) > 1 and (moe.routing != "topk" or moe.train_top_k not in (None, k)):
        raise MoemergeError(f"moe.routing = {moe.routing!r} / moe.train_top_k on a model with grouped routing "
                            f"(n_group = {text['n_group']}): these policies choose among all experts, not within "
                            "groups; use moe.routing: topk without train_top_k, or a model with n_group: 1")


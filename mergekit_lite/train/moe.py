"""MoE training: router losses, auxiliary-loss-free balancing, jitter, and router statistics.

transformers' MoE blocks call a router module (`MixtralTopKRouter`, `Qwen2MoeTopKRouter`, ...) that
returns (logits, top-k weights, top-k indices). `RouterTap` replaces that forward on each router
instance with one that calls the original and (a) keeps the logits and indices for the losses and
statistics, so the router runs once and HF's `output_router_logits` is not needed, (b) optionally
adds a per-expert selection bias (DeepSeek-V3's auxiliary-loss-free balancing: the bias changes
which experts are chosen, never the weights), and (c) optionally applies router-input jitter during
training. Without the bias, the weights and indices are exactly those of transformers' own router.

The losses are added to the loss we back-propagate ourselves (see loop.py), so they are really
trained on, whatever HF's own `router_aux_loss_coef` says. Statistics stay on the device and are
read back only when a log line is written.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Router modules: a 2-D `weight` of (num_experts, hidden) plus `top_k` and `num_experts` attributes."""
    found = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "top_k") and hasattr(m, "num_experts") and isinstance(w, torch.Tensor) and w.dim() == 2:
            found.append((name, m))
    return found


def _tapped_forward(self, hidden_states: torch.Tensor):
    """HF's own router forward, plus the tap, jitter and (when in use) the selection bias.

    The router's own forward computes logits, weights and indices (so dtypes follow transformers:
    Mixtral keeps fp32 weights under bf16 autocast, Qwen2-MoE casts them to the logits' dtype), and
    without the bias that is what the model returns: training and inference route the same. With the
    bias, experts are re-chosen on probs + bias from the same fp32 probabilities.
    """
    tap: RouterTap = self._moemerge_tap
    if self.training and tap.jitter > 0:
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - tap.jitter, 1.0 + tap.jitter)
    logits, weights, idx = self._moemerge_forward(hidden_states)  # (tokens, E), (tokens, k), (tokens, k)
    probs = F.softmax(logits, dim=-1, dtype=torch.float)  # what HF's routers rank on; kept for the losses
    if tap.use_bias:
        idx = torch.topk(probs + tap.bias[self._moemerge_index], self.top_k, dim=-1).indices
        chosen = probs.gather(-1, idx)
        if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises; Qwen only with norm_topk_prob
            chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        weights = chosen.to(weights.dtype)
    tap.record(self._moemerge_index, logits, probs, idx)
    return logits, weights, idx


class RouterTap:
    """Hooks every router of a model; turns what they saw into losses and statistics."""

    def __init__(self, model: nn.Module, jitter: float = 0.0, bias_update_rate: float = 0.0):
        self.routers = [m for _, m in find_routers(model)]
        self.jitter, self.rate = jitter, bias_update_rate
        self.use_bias = bias_update_rate > 0
        self.active = True  # off during evaluation: validation batches are not training statistics
        n_exp = self.routers[0].num_experts if self.routers else 0
        device = self.routers[0].weight.device if self.routers else "cpu"
        self.bias = torch.zeros(len(self.routers), n_exp, device=device)
        self._seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(self.routers)
        self.load_sum = torch.zeros(len(self.routers), n_exp, device=device)  # tokens per expert since last read
        self.step_load = torch.zeros(len(self.routers), n_exp, device=device)  # ... since the last optimizer step
        self.entropy_sum = torch.zeros(len(self.routers), device=device)
        self.tokens = torch.zeros((), device=device)
        for i, r in enumerate(self.routers):
            r._moemerge_tap, r._moemerge_index = self, i
            r._moemerge_forward = r.forward  # the class's own forward, bound to this router
            r.forward = types.MethodType(_tapped_forward, r)

    @property
    def is_moe(self) -> bool:
        return bool(self.routers)

    def record(self, i: int, logits: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor) -> None:
        if not self.active:
            return
        self._seen[i] = (logits, probs, idx)
        with torch.no_grad():
            counts = torch.bincount(idx.reshape(-1), minlength=self.load_sum.shape[1]).float()
            self.load_sum[i] += counts
            self.step_load[i] += counts
            self.entropy_sum[i] += -(probs * probs.clamp_min(1e-20).log()).sum(-1).sum()
            if i == 0:
                self.tokens += probs.shape[0]

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss) averaged over MoE layers, from the last forward pass."""
        bal, z = [], []
        for seen in self._seen:
            if seen is None:
                continue
            logits, probs, idx = seen
            n_exp, k = probs.shape[-1], idx.shape[-1]
            # Switch/GShard: E * sum_i f_i * P_i, f_i = share of top-k assignments, P_i = mean probability
            f = torch.zeros(n_exp, device=probs.device).scatter_add_(
                0, idx.reshape(-1), torch.ones(idx.numel(), device=probs.device)) / (idx.shape[0] * k)
            bal.append(n_exp * (f * probs.mean(0)).sum())
            z.append(torch.logsumexp(logits.float(), dim=-1).pow(2).mean())  # ST-MoE router z-loss
        self._seen = [None] * len(self.routers)
        if not bal:
            zero = torch.zeros((), device=self.bias.device)
            return zero, zero
        return torch.stack(bal).mean(), torch.stack(z).mean()

    def update_bias(self, reduce=lambda t: t) -> None:
        """DeepSeek-V3: raise the bias of under-loaded experts, lower it for over-loaded ones.

        `reduce` sums the step's load over processes, so every process applies the same update.
        """
        if self.use_bias:
            load = reduce(self.step_load)
            self.bias += self.rate * torch.sign(load.mean(-1, keepdim=True) - load)
        self.step_load.zero_()

    def read_stats(self, reduce=lambda t: t) -> dict:
        """Router statistics since the last call (one host sync), then reset the counters.

        `reduce` sums the counters over processes (every process must call it), so the figures
        describe all the tokens of the run, not the main process's share.
        """
        load_sum, entropy_sum, tokens = (reduce(t) for t in (self.load_sum, self.entropy_sum, self.tokens))
        load = load_sum / load_sum.sum(-1, keepdim=True).clamp_min(1)
        stats = {"load": load.tolist(),
                 "max_over_mean": (load.max(-1).values * load.shape[-1]).tolist(),
                 "dead": (load_sum == 0).sum(-1).tolist(),
                 "entropy": (entropy_sum / tokens.clamp_min(1)).tolist()}
        self.load_sum.zero_()
        self.entropy_sum.zero_()
        self.tokens.zero_()
        return stats

    # accelerate.register_for_checkpointing: the selection bias is training state, and the statistics
    # gathered since the last log line belong to the next one (a checkpoint may fall between log lines)
    _STATE = ("bias", "load_sum", "entropy_sum", "tokens")

    def state_dict(self) -> dict:
        return {name: getattr(self, name).cpu() for name in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            if name in state:  # checkpoints written before the statistics were saved hold the bias only
                getattr(self, name).copy_(state[name].to(self.bias.device))

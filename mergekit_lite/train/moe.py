"""MoE training: router losses, balancing, routing policies and router statistics.

transformers' MoE blocks call a router module (`MixtralTopKRouter`, `Qwen2MoeTopKRouter`,
`Glm4MoeTopkRouter`, ...) that returns (logits, top-k weights, top-k indices). `RouterTap` puts a forward
hook (and a pre-hook for jitter) on each router instance, which
(a) keeps the logits and choices for the losses and statistics, so the router runs once and HF's
    `output_router_logits` is not needed;
(b) optionally balances without an auxiliary loss (DeepSeek-V3): a per-expert *selection* bias changes
    which experts are chosen, never the weights. Families that hold such a bias in the model
    (the family's `RouterSpec.bias`: glm4_moe, dots1, ernie4_5_moe, moemerge) get that very tensor moved, so the saved
    model routes as trained; for the others (Mixtral, Qwen) the bias is the tap's own and is not saved;
(c) during training only, applies the recipe's routing policy (`routing.py`: noisy top-k, Switch top-1,
    GShard top-2, expert capacity) and router-input jitter. Evaluation routes as the saved model does.
With none of these on, the weights and indices are exactly those of transformers' own router.

The losses are added to the loss we back-propagate ourselves (see loop.py), so they are really
trained on, whatever HF's own `router_aux_loss_coef` says. Statistics stay on the device and are
read back only when a log line is written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergekit_lite.arch.specs import RouterSpec
from mergekit_lite.arch.tables import MOE, model_type_of
from mergekit_lite.errors import MoemergeError
from mergekit_lite.train import compat, routing
from mergekit_lite.train.blocks import PeerUsage

# the learned noise projection of `routing: noisy_topk`, registered on each router: trained and checkpointed
# with the model, and left out of final/ (save.py), whose router is W_g alone
NOISE_PARAM = "moemerge_noise"


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Router modules: a 2-D `weight` of (num_experts, hidden) plus `top_k` and `num_experts` attributes."""
    found = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "top_k") and hasattr(m, "num_experts") and isinstance(w, torch.Tensor) and w.dim() == 2:
            found.append((name, m))
    return found


@dataclass
class TappedRouter:
    """One router as the tap sees it: the module, its row in the tap's tensors, how its family scores (from the
    family's `RouterSpec` and the config), and where the selection bias the model saves lives, if it has one."""

    module: Any
    index: int
    scoring: routing.Scoring
    sentinel_ok: bool  # its experts take index E as "no expert" (capacity drops, GShard's unsent second choice)
    bias_holder: nn.Module | None = None  # the module holding the saved selection bias ...
    bias_name: str = ""  # ... under this attribute

    def saved_bias(self) -> torch.Tensor | None:
        """The selection bias the model saves, as the model holds it ((E,), ERNIE's (1, E), a DTensor or ZeRO-3
        shard); looked up on each call, since sharding replaces the module's tensors."""
        return None if self.bias_holder is None else getattr(self.bias_holder, self.bias_name)


def router_family(config: dict[str, Any], has_routers: bool) -> RouterSpec:
    """The router spec of a model's family (arch/tables.py), which decides scoring and selection bias in training.

    Raises:
        MoemergeError: the model has routers but its family is not one the project describes.
    """
    fam = MOE.get(model_type_of(config))
    if fam is None and has_routers:
        raise MoemergeError(f"model_type {model_type_of(config)!r} is an MoE family moemerge does not describe, so "
                            f"training cannot tell how its router scores; supported: {', '.join(sorted(MOE))}")
    return fam.router_spec if fam is not None else RouterSpec()


def _bias_location(router: nn.Module, spec: RouterSpec) -> tuple[nn.Module | None, str]:
    """(holder module, attribute) of the family's saved selection bias in the loaded router, or (None, "")."""
    if spec.bias is None:
        return None, ""
    holder, _, attr = spec.bias_in_router.rpartition(".")
    return (router.get_submodule(holder) if holder else router), attr


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class RouterTap:
    """Hooks every router of a model; turns what they saw into losses and statistics.

    A forward pre-hook applies jitter to the router's input; a forward hook records the router's own
    (logits, weights, indices) and, during training, replaces them by the recipe's routing policy. The
    routers' classes and methods are left as transformers wrote them.

    Args:
        model: the model (before LoRA/accelerate wrapping); its routers are found by `find_routers`.
        jitter: multiplicative router-input noise in [1 - jitter, 1 + jitter] during training.
        bias_update_rate: aux-loss-free balancing step (0 = off).
        moe: the recipe's `moe` section; its routing policy, `train_top_k`, capacity and drop policy apply
            during training (default: transformers' own routing).
        config: the model's config.json (default: `model.config`); its family's `RouterSpec` and its fields
            decide the scoring and where a saved selection bias lives.
    """

    def __init__(self, model: nn.Module, jitter: float = 0.0, bias_update_rate: float = 0.0, moe=None,
                 config: dict[str, Any] | None = None):
        found = find_routers(model)
        if config is None:
            hf_config: Any = getattr(model, "config", None)
            config = hf_config.to_dict() if hf_config is not None else {}
        spec = router_family(config, bool(found))
        self.routers: list[Any] = [m for _, m in found]  # HF router modules, attributes read by name
        self.jitter, self.rate = jitter, bias_update_rate
        self.policy = getattr(moe, "routing", "topk")
        self.train_top_k = getattr(moe, "train_top_k", None)
        self.capacity_factor = getattr(moe, "capacity_factor", None)
        self.drop_policy = getattr(moe, "drop_policy", "position")
        self.use_bias = bias_update_rate > 0
        self.native_bias = bool(self.routers) and spec.bias is not None
        self.peer = PeerUsage(model)  # PEER layers' expert usage (none: empty, false)
        self.active = True  # off during evaluation: validation batches are not training statistics
        n_exp = self.routers[0].num_experts if self.routers else 0
        device = self.routers[0].weight.device if self.routers else torch.device("cpu")
        if device.type == "meta":  # a process that receives its weights when the model is sharded
            device = torch.device("cpu")
        n = len(self.routers)
        self.bias = torch.zeros(n, n_exp, device=device)  # the tap's own, for families without a native one
        self._seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * n
        self.load_sum = torch.zeros(n, n_exp, device=device)  # assignments per expert since last read (kept)
        self.step_load = torch.zeros(n, n_exp, device=device)  # ... since the last optimizer step
        self.entropy_sum = torch.zeros(n, device=device)
        self.tokens = torch.zeros((), device=device)
        self.assigned_sum = torch.zeros(n, device=device)  # assignments chosen, and dropped for capacity
        self.dropped_sum = torch.zeros(n, device=device)
        may_drop = self.capacity_factor is not None or self.policy == "gshard"
        scoring = routing.Scoring.of(spec, config)
        self.tapped: list[TappedRouter] = []
        self._hooks = []
        r: Any
        for i, (name, r) in enumerate(found):
            holder, attr = _bias_location(r, spec)
            t = TappedRouter(r, i, scoring, sentinel_ok=not may_drop or _allow_no_expert_index(model, name),
                             bias_holder=holder, bias_name=attr)
            self.tapped.append(t)
            self._hooks.append(r.register_forward_pre_hook(functools.partial(self._before, t), with_kwargs=True))
            self._hooks.append(r.register_forward_hook(functools.partial(self._after, t), with_kwargs=True))
            if self.policy == "noisy_topk":  # zero-initialised as Shazeer et al. do: noise std softplus(0) = ln 2
                r.register_parameter(NOISE_PARAM, nn.Parameter(torch.zeros_like(r.weight, dtype=torch.float32)))

    def _before(self, t: TappedRouter, router: nn.Module, args: tuple, kwargs: dict):
        """Router-input jitter during training (multiplicative, uniform in [1 - jitter, 1 + jitter])."""
        if not (router.training and self.jitter > 0):
            return None
        x = _hidden(args, kwargs)
        x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def _after(self, t: TappedRouter, router: nn.Module, args: tuple, kwargs: dict, output):
        """The router's own (logits, weights, indices), re-routed by the policy and capacity where they apply.

        The router computed them (so dtypes follow transformers: Mixtral keeps fp32 weights under bf16 autocast,
        Qwen2-MoE casts them to the logits' dtype), and unless something below re-routes, that is what the
        model gets: training and inference route the same.
        """
        logits, weights, idx = output  # (tokens, E), (tokens, k), (tokens, k)
        if self.reroutes(router):
            new_weights, idx = self.route(t, _hidden(args, kwargs), logits)
            weights = new_weights.to(weights.dtype)
        selected, dropped = idx, None
        if router.training and self.capacity_factor:
            n_exp = logits.shape[-1]
            cap = routing.capacity(idx.shape[0], idx.shape[-1], n_exp, self.capacity_factor)
            idx, weights, dropped = routing.drop_over_capacity(idx, weights, n_exp, cap, self.drop_policy,
                                                               choices_first=self.policy == "gshard")
        if router.training and not t.sentinel_ok:
            idx = idx.clamp(max=logits.shape[-1] - 1)  # experts without the "no expert" index: weight 0, costs compute
        self.record(t.index, logits, t.scoring.normalised(logits), selected, dropped)
        return logits, weights, idx

    def remove(self) -> None:
        """Take the hooks off the routers (the model then routes exactly as transformers' classes do)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def is_moe(self) -> bool:
        """True when the model has routers to tap (a dense model has none)."""
        return bool(self.routers)

    def _selection_bias(self, t: TappedRouter) -> torch.Tensor | None:
        own = t.saved_bias()
        if own is not None:
            return own.view(-1)
        return self.bias[t.index] if self.use_bias else None

    def reroutes(self, router: nn.Module) -> bool:
        """Whether this forward needs routing other than the router's own (policy, train_top_k, own bias)."""
        own_bias = self.use_bias and not self.native_bias
        if not router.training:
            return own_bias  # evaluation: the saved routing, plus our bias only when asked (val_loss_with_...)
        return own_bias or self.policy != "topk" or self.train_top_k not in (None, router.top_k)

    def route(self, t: TappedRouter, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, idx) of the training policy (or plain top-k with the selection bias at evaluation)."""
        router, scoring = t.module, t.scoring
        policy = self.policy if router.training else "topk"
        k: int = (self.train_top_k or router.top_k) if router.training else router.top_k
        bias = self._selection_bias(t)
        if policy == "noisy_topk":
            eps = torch.randn(logits.shape, device=logits.device)  # global RNG: checkpoints restore it
            logits = routing.noisy_logits(logits, x.reshape(-1, x.shape[-1]), getattr(router, NOISE_PARAM), eps)
        scores = scoring.scores(logits)
        choice = scores + bias if bias is not None else scores
        if policy == "switch":
            return routing.switch(scores, choice, scoring)
        if policy == "gshard":
            return routing.gshard(scores, choice, torch.rand(scores.shape[0], device=scores.device), scoring)
        return routing.topk(scores, choice, k, scoring)

    def record(self, i: int, logits: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor,
               dropped: torch.Tensor | None = None) -> None:
        """Keep one router call for the losses; count its kept assignments, entropy and drops.

        `idx` is what the policy selected (index E = unsent); `dropped` marks the ones capacity removed.
        """
        if not self.active:
            return
        self._seen[i] = (logits, probs, idx)
        n_exp = self.load_sum.shape[1]
        with torch.no_grad():
            kept = idx if dropped is None else idx.masked_fill(dropped, n_exp)
            counts = torch.bincount(kept.reshape(-1), minlength=n_exp + 1)[:n_exp].float()
            self.load_sum[i] += counts
            self.step_load[i] += counts
            self.entropy_sum[i] += -(probs * probs.clamp_min(1e-20).log()).sum(-1).sum()
            self.assigned_sum[i] += (idx < n_exp).sum()
            if dropped is not None:
                self.dropped_sum[i] += dropped.sum()
            if i == 0:
                self.tokens += probs.shape[0]

    def losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, z-loss) averaged over MoE layers, from the last forward pass.

        Balance: E * sum_i f_i * P_i (Switch/GShard), f_i = share of the assignments the policy selected
        (before capacity drops, as Megatron; under `gshard` the share of first choices, c_e / S, as the
        paper), P_i = mean normalised score: softmax probabilities, or for
        sigmoid routers the scores divided by their sum per token (DeepSeek-V3's auxiliary loss).
        """
        bal, z = [], []
        for seen in self._seen:
            if seen is None:
                continue
            logits, probs, idx = seen
            n_exp = probs.shape[-1]
            # GShard's auxiliary loss counts each token's first choice (c_e / S); the others all assignments
            flat = (idx[..., 0] if self.policy == "gshard" else idx).reshape(-1)
            f = torch.zeros(n_exp + 1, device=probs.device).scatter_add_(
                0, flat, torch.ones(flat.numel(), device=probs.device))[:n_exp]
            bal.append(n_exp * (f / f.sum().clamp_min(1) * probs.mean(0)).sum())
            z.append(torch.logsumexp(logits.float(), dim=-1).pow(2).mean())  # ST-MoE router z-loss
        self._seen = [None] * len(self.routers)
        if not bal:
            zero = torch.zeros((), device=self.bias.device)
            return zero, zero
        return torch.stack(bal).mean(), torch.stack(z).mean()

    @torch.no_grad()
    def update_bias(self, reduce=lambda t: t) -> None:
        """DeepSeek-V3: raise the bias of under-loaded experts, lower it for over-loaded ones.

        `reduce` sums the step's load over processes, so every process applies the same update. A model
        with its own `e_score_correction_bias` gets that tensor moved (it is saved with the model).
        """
        if self.use_bias:
            load = reduce(self.step_load)
            step = self.rate * torch.sign(load.mean(-1, keepdim=True) - load)
            if self.native_bias:
                for t, row in zip(self.tapped, step):
                    _add_to(t.saved_bias(), row)
            else:
                self.bias += step
        self.step_load.zero_()

    def read_stats(self, reduce=lambda t: t) -> dict:
        """Router statistics since the last call (one host sync), then reset the counters.

        `reduce` sums the counters over processes (every process must call it), so the figures
        describe all the tokens of the run, not the main process's share. `dropped` is the share of the
        selected assignments each layer dropped for capacity (0 without `capacity_factor`).
        """
        load_sum, entropy_sum, tokens, assigned, dropped = (
            reduce(t) for t in (self.load_sum, self.entropy_sum, self.tokens, self.assigned_sum, self.dropped_sum))
        load = load_sum / load_sum.sum(-1, keepdim=True).clamp_min(1)
        stats = {"load": load.tolist(),
                 "max_over_mean": (load.max(-1).values * load.shape[-1]).tolist(),
                 "dead": (load_sum == 0).sum(-1).tolist(),
                 "entropy": (entropy_sum / tokens.clamp_min(1)).tolist(),
                 "dropped": (dropped / assigned.clamp_min(1)).tolist()}
        for t in (self.load_sum, self.entropy_sum, self.tokens, self.assigned_sum, self.dropped_sum):
            t.zero_()
        return stats

    def to(self, device) -> "RouterTap":
        """Move the bias and counters to the device the prepared model runs on."""
        for name in self._STATE + ("step_load",):
            setattr(self, name, getattr(self, name).to(device))
        self.peer.to(device)
        return self

    # accelerate.register_for_checkpointing: the tap's own selection bias is training state, and the statistics
    # gathered since the last log line belong to the next one (a checkpoint may fall between log lines). A
    # native bias and W_noise live in the model and are checkpointed with it.
    _STATE = ("bias", "load_sum", "entropy_sum", "tokens", "assigned_sum", "dropped_sum")

    def state_dict(self, reduce=lambda t: t) -> dict:
        """The bias (equal on every process) and the statistics counters summed over processes by `reduce`
        (every process must call it)."""
        state = {name: (self.bias if name == "bias" else reduce(getattr(self, name))).cpu() for name in self._STATE}
        if self.peer:
            state["peer_counts"] = reduce(self.peer.counts).cpu()
        return state

    def load_state_dict(self, state: dict, counters: bool = True) -> None:
        """Restore the bias; the counters too where `counters` (one process of several gets the sums)."""
        for name in self._STATE:
            if name in state and (counters or name == "bias"):
                getattr(self, name).copy_(state[name].to(self.bias.device))
            elif name != "bias":
                getattr(self, name).zero_()
        if self.peer:
            counts = state.get("peer_counts")
            if counts is not None and counters:
                self.peer.counts.copy_(counts.to(self.peer.counts.device))
            else:
                self.peer.counts.zero_()


def _add_to(bias: torch.Tensor, row: torch.Tensor) -> None:
    """`bias += row` in place, also where `bias` is a DTensor shard (FSDP2 shards ERNIE's parameter): every
    process holds the same `row` and adds its own slice of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if hasattr(bias, "ds_id"):  # ZeRO-3: this process's slice of the flattened parameter (padded at the end), where
        # the optimizer keeps it
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        part = bias.ds_tensor  # type: ignore[attr-defined]  # (partition size,): set by DeepSpeed
        flat = row.to(part.device, part.dtype).reshape(-1)
        start = dist.get_rank() * part.numel()
        piece = torch.zeros_like(part)
        piece[:len(flat[start:start + part.numel()])] = flat[start:start + part.numel()]
        part.add_(piece)
        master = safe_get_local_fp32_param(bias) if getattr(bias, "_z3_optimizer", None) is not None else None
        if master is not None:  # in the optimizer: its fp32 master is copied over the partition after each step
            safe_set_local_fp32_param(bias, master + piece.to(master.dtype).view_as(master))
        if bias.data.numel() == flat.numel():  # a small ("persistent") parameter stays whole between steps too
            bias.data.add_(flat.view(bias.data.shape))
        return
    row = row.to(bias.device, bias.dtype).view(bias.shape)
    if isinstance(bias, DTensor):
        row = distribute_tensor(row, bias.device_mesh, bias.placements, src_data_rank=None)  # local slice only
    bias.add_(row)


def _allow_no_expert_index(model: nn.Module, router_name: str) -> bool:
    """Let the router's sibling experts take index E as "no expert"; False where they cannot (see
    `compat.experts_skip_index_e`). Only the in-memory module changes; the saved model is unchanged."""
    experts = getattr(model.get_submodule(router_name.rpartition(".")[0]), "experts", None)
    return experts is not None and compat.experts_skip_index_e(experts)

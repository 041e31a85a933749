"""`moemerge` models: a dense Hugging Face decoder whose FFNs became mixture-of-experts blocks.

Written by mergekit-lite into the model folder (with configuration_moemerge.py and an `auto_map` in
config.json), so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it
where only torch and transformers are installed.

The decoder is the dense family's own transformers model (`AutoModel.from_config(config.text_config)`):
attention, norms (Gemma3's pre/post feed-forward norms included), RoPE and embeddings are untouched.
In each MoE layer the FFN module `model.layers.{i}.mlp` is replaced by an MoE block, so the checkpoint
keys are the dense family's plus, per MoE layer:

    model.layers.{i}.mlp.gate.weight                          router, (num_experts, hidden)
    model.layers.{i}.mlp.gate.e_score_correction_bias         selection bias, (num_experts,), float32
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight         (moe_intermediate_size, hidden)
    model.layers.{i}.mlp.experts.{e}.up_proj.weight           (moe_intermediate_size, hidden)
    model.layers.{i}.mlp.experts.{e}.down_proj.weight         (hidden, moe_intermediate_size)
    model.layers.{i}.mlp.shared_expert.{gate,up,down}_proj.weight   only with shared_expert_intermediate_size > 0

Every expert is the family's gated FFN, down(act(gate(x)) * up(x)), with the family's activation
(SiLU for Llama/Mistral/Qwen, tanh-GELU for Gemma3).

Other block kinds (`config.block_kind`), with `P` = `model.layers.{i}.mlp.` (`block_mode: replace`) or
`model.layers.{i}.mlp.added.` (`block_mode: add`: the layer keeps its dense FFN `mlp.{gate,up,down}_proj.weight`
and adds the block's output to it):

    peer    P.retrieval.query.weight (heads * key_dim, hidden); P.retrieval.query_norm.* (optional);
            P.retrieval.sub_keys (heads, 2, n, key_dim / 2); P.expert_up, P.expert_down (num_experts, hidden)
    mh_moe  P.head_proj.weight, P.merge_proj.weight (hidden, hidden); P.gate.weight (num_experts, hidden / heads)
            and P.gate.e_score_correction_bias; P.experts.{e}.{gate,up,down}_proj.weight at width hidden / heads
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moemerge import MoemergeConfig


def family_activation(text_config) -> str:
    """The dense family's FFN activation name (Gemma3 spells the field `hidden_activation`)."""
    return getattr(text_config, "hidden_activation", None) or text_config.hidden_act


class MoemergeRouter(nn.Module):
    """Scores every expert and picks the top-k; returns (logits (T, E), weights (T, k), indices (T, k)).

    Experts are *chosen* on score + `e_score_correction_bias` (DeepSeek-V3's selection bias, zero at
    upcycling, moved by aux-loss-free balancing) and *weighted* by the scores alone. Scores are computed
    in float32 whatever the weights' dtype.
    """

    def __init__(self, config: MoemergeConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or config.text_config.hidden_size
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.scoring, self.norm_topk_prob = config.scoring, config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states.float(), self.weight.float())  # (T, E)
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        idx = torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1).indices  # (T, k)
        weights = scores.gather(-1, idx)  # (T, k)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * self.routed_scaling_factor, idx


class MoemergeExpert(nn.Module):
    """One gated FFN: down(act(gate(x)) * up(x)), the dense family's FFN at another width."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoemergeExperts(nn.ModuleList):
    """The routed experts of one layer, run on tokens grouped by expert (one sort, one matmul chain per expert).

    An index equal to the number of experts means "no expert" (a token dropped for capacity): it is
    sorted past the last expert and never computed.
    """

    # read by trainers that mark dropped assignments with index E (mergekit-lite's routing policies)
    _is_expert_parallel = True

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_exp, k = len(self), idx.shape[-1]
        flat = idx.reshape(-1)  # (T*k,) expert of each assignment
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        sizes = torch.bincount(flat, minlength=n_exp + 1)[:n_exp].tolist()  # one host sync per layer
        order = order[:sum(sizes)]  # drop the "no expert" assignments (sorted last)
        token = order // k  # (A,) token of each kept assignment
        xs = x.index_select(0, token)  # (A, H), grouped by expert
        ys = torch.cat([expert(part) for expert, part in zip(self, xs.split(sizes))])  # (A, H)
        ys = ys * weights.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)  # (T, H): sum over each token's experts


class MoemergeSparseBlock(nn.Module):
    """Router + routed experts (+ an ungated shared expert): the FFN of an MoE layer, (B, S, H) -> (B, S, H)."""

    def __init__(self, config: MoemergeConfig):
        super().__init__()
        text = config.text_config
        hidden, act = text.hidden_size, family_activation(text)
        self.gate = MoemergeRouter(config)
        self.experts = MoemergeExperts(
            MoemergeExpert(hidden, config.moe_intermediate_size, act) for _ in range(config.num_experts))
        size = config.shared_expert_intermediate_size
        self.shared_expert = MoemergeExpert(hidden, size, act) if size else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        _, weights, idx = self.gate(x)
        out = self.experts(x, idx, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.reshape(shape)


class MoemergeQueryNorm(nn.Module):
    """PEER's query BatchNorm: batch statistics while training (running mean/var updated, momentum 0.1), the running
    ones at inference. Float buffers only (no integer batch counter), so every tensor of the folder is a float."""

    def __init__(self, features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class MoemergePeerRetrieval(nn.Module):
    """PEER's product-key retrieval (He, 2024): per head, the top-k of N = n * n experts without scoring all N.

    The query (BatchNorm-ed) is split in two halves; each half scores its n sub-keys and keeps its top-k, the
    k * k sums of the two are the only candidates (the best k full scores are always among them), and the final
    top-k is taken over those. Returns (scores, indices), each (T, heads, k); expert id = i1 * n + i2.
    """

    def __init__(self, config: MoemergeConfig):
        super().__init__()
        hidden, d = config.text_config.hidden_size, config.peer_key_dim
        self.heads, self.top_k = config.block_heads, config.num_experts_per_tok
        self.n = math.isqrt(config.num_experts)
        self.query = nn.Linear(hidden, self.heads * d, bias=False)
        self.query_norm = MoemergeQueryNorm(self.heads * d) if config.peer_query_batchnorm else None
        self.sub_keys = nn.Parameter(torch.empty(self.heads, 2, self.n, d // 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, h, k, n = x.shape[0], self.heads, self.top_k, self.n
        q = self.query(x)  # (T, h * d)
        if self.query_norm is not None:
            q = self.query_norm(q)
        q = q.float().view(T, h, 2, -1)  # (T, h, 2 halves, d / 2)
        sub = torch.einsum("thcd,hcnd->thcn", q, self.sub_keys.float())  # (T, h, 2, n): sqrt(N) scores per half
        s, i = sub.topk(k, dim=-1)  # (T, h, 2, k)
        cand = s[:, :, 0, :, None] + s[:, :, 1, None, :]  # (T, h, k, k)
        ids = i[:, :, 0, :, None] * n + i[:, :, 1, None, :]  # (T, h, k, k)
        scores, pos = cand.flatten(2).topk(k, dim=-1)  # (T, h, k)
        return scores, ids.flatten(2).gather(-1, pos)


class MoemergePeerBlock(nn.Module):
    """PEER layer: sum over heads and the k retrieved experts of gate * act(up_e . x) * down_e, (B, S, H) -> (B, S, H).

    Experts are single neurons: rows of two (num_experts, hidden) tables. Only the retrieved rows are gathered
    (never an N-sized temporary per token); the down side is one `embedding_bag` weighted sum.
    """

    def __init__(self, config: MoemergeConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.retrieval = MoemergePeerRetrieval(config)
        self.expert_up = nn.Parameter(torch.empty(config.num_experts, hidden))
        self.expert_down = nn.Parameter(torch.empty(config.num_experts, hidden))
        self.act_fn = ACT2FN[config.peer_activation]
        self.score = config.peer_score

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        scores, idx = self.retrieval(x)  # (T, h, k)
        gates = scores.softmax(-1) if self.score == "softmax" else scores.sigmoid()  # per head
        flat = idx.reshape(x.shape[0], -1)  # (T, h * k)
        up = F.embedding(flat, self.expert_up)  # (T, h * k, H): the retrieved rows only
        act = self.act_fn(torch.bmm(up, x.unsqueeze(-1).to(up.dtype)).squeeze(-1))  # (T, h * k)
        coef = (act.float() * gates.reshape(flat.shape)).to(self.expert_down.dtype)
        out = F.embedding_bag(flat, self.expert_down, per_sample_weights=coef, mode="sum")  # (T, H)
        return out.to(hidden_states.dtype).reshape(shape)


class MoemergeMultiHeadBlock(nn.Module):
    """Multi-Head MoE (Huang et al., 2024): head projection, each token split into `heads` sub-tokens of H / heads
    routed on their own (top-k of num_experts), experts' outputs merged back and projected, (B, S, H) -> (B, S, H).

    The router and experts are the top-k block's classes at width H / heads, so training's router tap (losses,
    policies, statistics) sees every sub-token as a token.
    """

    def __init__(self, config: MoemergeConfig):
        super().__init__()
        text = config.text_config
        hidden, act = text.hidden_size, family_activation(text)
        self.heads = config.block_heads
        sub = hidden // self.heads
        self.head_proj = nn.Linear(hidden, hidden, bias=False)
        self.gate = MoemergeRouter(config, hidden=sub)
        self.experts = MoemergeExperts(
            MoemergeExpert(sub, config.moe_intermediate_size, act) for _ in range(config.num_experts))
        self.merge_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = self.head_proj(hidden_states.reshape(-1, shape[-1]))  # (T, H)
        x = x.reshape(-1, shape[-1] // self.heads)  # (T * heads, H / heads): the sub-tokens
        _, weights, idx = self.gate(x)
        y = self.experts(x, idx, weights).reshape(-1, shape[-1])  # (T, H): sub-tokens merged back
        return self.merge_proj(y).reshape(shape)


# MoE block classes by `config.block_kind`; each takes the config and maps (B, S, H) to (B, S, H).
BLOCKS: dict[str, type[nn.Module]] = {"topk": MoemergeSparseBlock, "peer": MoemergePeerBlock,
                                      "mh_moe": MoemergeMultiHeadBlock}


class MoemergeAddedBlock(MoemergeExpert):
    """`block_mode: add`: the layer's dense FFN (its own keys, `mlp.{gate,up,down}_proj`) plus a block whose output is
    added (`mlp.added`); with the block's output projection at zero the layer computes what the dense one did."""

    def __init__(self, config: MoemergeConfig):
        text = config.text_config
        super().__init__(text.hidden_size, text.intermediate_size, family_activation(text))
        self.added = BLOCKS[config.block_kind](config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.added(x)


class MoemergePreTrainedModel(PreTrainedModel):
    """Weight initialisation and capabilities shared by moemerge models."""

    config_class = MoemergeConfig
    config: MoemergeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.text_config.initializer_range
        if isinstance(module, MoemergeRouter):
            with torch.no_grad():
                module.weight.normal_(0.0, std)
                module.e_score_correction_bias.zero_()
        elif isinstance(module, MoemergeQueryNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        elif isinstance(module, MoemergePeerRetrieval):
            with torch.no_grad():
                module.sub_keys.normal_(0.0, std)
        elif isinstance(module, MoemergePeerBlock):
            with torch.no_grad():
                module.expert_up.normal_(0.0, std)
                module.expert_down.normal_(0.0, std)
        elif getattr(self, "model", None) is not None and module is not self:
            self.model._init_weights(module)  # the dense family's own rules (Gemma3 norms, scaled embeddings)


class MoemergeForCausalLM(MoemergePreTrainedModel, GenerationMixin):
    """The dense family's decoder with MoE blocks in `config.moe_layer_indices()`, plus the LM head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoemergeConfig):
        super().__init__(config)
        text = config.text_config
        self.model = AutoModel.from_config(text)
        self.vocab_size = text.vocab_size
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        block = MoemergeAddedBlock if config.block_mode == "add" else BLOCKS[config.block_kind]
        for i in config.moe_layer_indices():
            self.model.layers[i].mlp = block(config)
        self._no_split_modules = [type(self.model.layers[0]).__name__]
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        """The dense family's causal-LM forward (cache and attention arguments pass through)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        cap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)


__all__ = ["MoemergeForCausalLM", "MoemergePreTrainedModel"]

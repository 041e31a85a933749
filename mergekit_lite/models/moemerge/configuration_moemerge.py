"""Configuration of `moemerge` models: a dense Hugging Face decoder whose FFNs became mixture-of-experts blocks.

Written by mergekit-lite (`moemerge upcycle`, `architecture: moemerge`) into the model folder, so that
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` works where only torch and transformers
are installed. `text_config` is the dense family's own config (llama, mistral, qwen2, qwen3,
gemma3_text): attention, norms, RoPE and embeddings run that family's transformers code unchanged.
The fields below say which layers hold an MoE block and what the block computes.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MoemergeConfig(PreTrainedConfig):
    """A dense decoder (`text_config`) with MoE blocks in place of its FFNs.

    Args:
        text_config: the dense family's config (dict or config object); its `model_type` picks the decoder.
        num_experts: routed experts per MoE layer.
        num_experts_per_tok: experts each token is sent to (top-k).
        moe_intermediate_size: channels of one routed expert's FFN.
        mlp_only_layers: layer indices that keep the dense family's own FFN (empty: every layer is MoE).
        shared_expert_intermediate_size: channels of an ungated shared expert every token runs (0: none).
        scoring: "softmax" or "sigmoid" (DeepSeek-V3) router scores.
        norm_topk_prob: divide the top-k weights by their sum.
        routed_scaling_factor: factor on the (renormalised) top-k weights.
        block_kind: which MoE block class the layers use (`BLOCKS` in modeling_moemerge.py): "topk" (router +
            experts), "peer" (product-key retrieval over single-neuron experts) or "mh_moe" (multi-head MoE).
        block_mode: "replace" (the block is the layer's FFN) or "add" (the dense FFN stays; the block's output is
            added to it).
        block_heads: retrieval heads (peer) or sub-tokens per token (mh_moe).
        peer_key_dim: query / product-key dimension (peer; each half scores n = sqrt(num_experts) sub-keys).
        peer_query_batchnorm: batch-normalise the query (peer).
        peer_activation: activation of a single-neuron expert, act(up . x) * down (peer).
        peer_score: "softmax" or "sigmoid" over each head's top-k scores (peer).
        router_aux_loss_coef: weight of the load-balancing loss when `output_router_logits` is set.
        tie_word_embeddings: lm_head shares the embedding matrix.
    """

    model_type = "moemerge"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    mlp_only_layers: list[int] | None = None
    shared_expert_intermediate_size: int = 0
    scoring: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    block_kind: str = "topk"
    block_mode: str = "replace"
    block_heads: int = 1
    peer_key_dim: int = 128
    peer_query_batchnorm: bool = True
    peer_activation: str = "gelu"
    peer_score: str = "softmax"
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any):
        super().__post_init__(**kwargs)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.text_config.intermediate_size
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring={self.scoring!r}: use 'softmax' or 'sigmoid'")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                             f"num_experts={self.num_experts}")
        self._check_block()
        n = self.text_config.num_hidden_layers
        bad = [i for i in self.mlp_only_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"mlp_only_layers={self.mlp_only_layers}: layers {bad} do not exist ({n} layers)")

    def _check_block(self) -> None:
        if self.block_kind not in ("topk", "peer", "mh_moe") or self.block_mode not in ("replace", "add"):
            raise ValueError(f"block_kind={self.block_kind!r} / block_mode={self.block_mode!r}: use topk, peer or "
                             "mh_moe / replace or add")
        if self.block_kind == "peer":
            n = math.isqrt(self.num_experts)
            if n * n != self.num_experts or not 1 <= self.num_experts_per_tok <= n or self.peer_key_dim % 2:
                raise ValueError(f"peer: num_experts={self.num_experts} must be a perfect square n*n, "
                                 f"num_experts_per_tok={self.num_experts_per_tok} at most n, and peer_key_dim="
                                 f"{self.peer_key_dim} even")
            if self.peer_score not in ("softmax", "sigmoid"):
                raise ValueError(f"peer_score={self.peer_score!r}: use 'softmax' or 'sigmoid'")
        if self.block_kind == "mh_moe" and self.text_config.hidden_size % self.block_heads:
            raise ValueError(f"block_heads={self.block_heads} does not divide hidden_size="
                             f"{self.text_config.hidden_size}")

    def moe_layer_indices(self) -> list[int]:
        """Indices of the layers whose FFN is an MoE block."""
        dense = set(self.mlp_only_layers)
        return [i for i in range(self.text_config.num_hidden_layers) if i not in dense]


__all__ = ["MoemergeConfig"]

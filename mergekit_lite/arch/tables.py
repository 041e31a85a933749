"""Architectures as data: dense families we read, MoE families we write, and how they map.

Every decoder we handle stores its blocks under `model.layers.{i}.`; everything else (embeddings,
final norm, lm_head) is "global". A family entry only says what differs: where the FFN lives, which
attention tensors the target can hold, which config fields follow the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LAYER_PREFIX = "model.layers.{i}."
PROJS = ("gate", "up", "down")  # SwiGLU FFN: down(act(gate(x)) * up(x))

# Attention tensors (relative to the layer prefix) and which families carry them.
_QKVO = frozenset(f"self_attn.{p}_proj.weight" for p in "qkvo")
_QKV_BIAS = frozenset(f"self_attn.{p}_proj.bias" for p in "qkv")
_O_BIAS = frozenset({"self_attn.o_proj.bias"})
_QK_NORM = frozenset({"self_attn.q_norm.weight", "self_attn.k_norm.weight"})
_NORMS = frozenset({"input_layernorm.weight", "post_attention_layernorm.weight"})


@dataclass(frozen=True)
class DenseFamily:
    """A dense decoder family the project reads."""

    model_type: str
    mlp: dict[str, str] = field(default_factory=lambda: {p: f"mlp.{p}_proj.weight" for p in PROJS})
    # config fields that hold one entry per layer (lists) or refer to layer indices
    per_layer_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoEFamily:
    """A native Hugging Face MoE family the project writes (per-expert, Hub on-disk layout)."""

    model_type: str
    architecture: str
    sources: frozenset[str]                  # dense model_types it can be built from without loss
    expert: dict[str, str]                   # proj -> key template with {e}
    router: str
    dense_mlp: dict[str, str] | None         # FFN of a dense layer inside the MoE model (mlp_only_layers)
    layer_keys: frozenset[str]               # non-FFN per-layer tensors the class holds
    zero_fill: frozenset[str] = frozenset()  # tensors the class always has; zeros are exact when absent
    shared_expert: dict[str, str] | None = None
    shared_expert_gate: str | None = None
    experts_field: str = "num_experts"
    expert_size_field: str = "moe_intermediate_size"
    carry_fields: tuple[str, ...] = ()       # config fields kept beyond COMMON_FIELDS
    fixed_fields: dict = field(default_factory=dict)
    per_layer_fields: tuple[str, ...] = ()
    supports_dense_layers: bool = False
    plan_transforms: tuple[str, ...] = ()    # names in ops/plan_transforms.py, applied to the finished plan


DENSE: dict[str, DenseFamily] = {
    "llama": DenseFamily("llama"),
    "mistral": DenseFamily("mistral"),
    "qwen2": DenseFamily("qwen2", per_layer_fields=("layer_types", "max_window_layers")),
    "qwen3": DenseFamily("qwen3", per_layer_fields=("layer_types", "max_window_layers")),
    "gemma3_text": DenseFamily("gemma3_text", per_layer_fields=("layer_types",)),
}

# Config fields every target keeps from its dense source when present.
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "attention_dropout",
    "sliding_window",
)

_QWEN_MOE_FIXED = {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "output_router_logits": False, "router_aux_loss_coef": 0.001}

MOE: dict[str, MoEFamily] = {
    "mixtral": MoEFamily(
        model_type="mixtral", architecture="MixtralForCausalLM",
        sources=frozenset({"llama", "mistral"}),
        expert={"gate": "block_sparse_moe.experts.{e}.w1.weight", "down": "block_sparse_moe.experts.{e}.w2.weight",
                "up": "block_sparse_moe.experts.{e}.w3.weight"},
        router="block_sparse_moe.gate.weight", dense_mlp=None,
        layer_keys=_QKVO | _NORMS,
        experts_field="num_local_experts", expert_size_field="intermediate_size",
        # Mixtral always renormalises the top-k weights, which is what step-0 parity needs.
        fixed_fields={"output_router_logits": False, "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0},
    ),
    "qwen2_moe": MoEFamily(
        model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM",
        sources=frozenset({"qwen2", "llama", "mistral"}),
        expert={p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in PROJS},
        router="mlp.gate.weight", dense_mlp={p: f"mlp.{p}_proj.weight" for p in PROJS},
        layer_keys=_QKVO | _QKV_BIAS | _NORMS, zero_fill=_QKV_BIAS,
        shared_expert={p: f"mlp.shared_expert.{p}_proj.weight" for p in PROJS},
        shared_expert_gate="mlp.shared_expert_gate.weight",
        carry_fields=("use_sliding_window", "max_window_layers", "layer_types"),
        fixed_fields={**_QWEN_MOE_FIXED, "shared_expert_intermediate_size": 0},
        per_layer_fields=("layer_types", "max_window_layers", "mlp_only_layers", "decoder_sparse_step"),
        supports_dense_layers=True,
    ),
    "qwen3_moe": MoEFamily(
        model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM",
        sources=frozenset({"qwen3"}),
        expert={p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in PROJS},
        router="mlp.gate.weight", dense_mlp={p: f"mlp.{p}_proj.weight" for p in PROJS},
        layer_keys=_QKVO | _QKV_BIAS | _O_BIAS | _QK_NORM | _NORMS,
        carry_fields=("attention_bias", "use_sliding_window", "max_window_layers", "layer_types"),
        fixed_fields=dict(_QWEN_MOE_FIXED),
        per_layer_fields=("layer_types", "max_window_layers", "mlp_only_layers", "decoder_sparse_step"),
        supports_dense_layers=True,
    ),
}

# `architecture: auto` picks the target that keeps the source's tensors as they are.
AUTO_TARGET = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}

# Why a pair is refused, for the error message (anything not listed falls back to a generic reason).
LOSSY_REASONS = {
    ("qwen3", "mixtral"): "Mixtral has no q/k norms, so Qwen3's q_norm/k_norm would be lost",
    ("qwen3", "qwen2_moe"): "Qwen2-MoE has no q/k norms, so Qwen3's q_norm/k_norm would be lost",
    ("qwen2", "mixtral"): "Mixtral has no attention biases, so Qwen2's q/k/v biases would be lost",
    ("llama", "qwen3_moe"): "Qwen3-MoE normalises q and k (q_norm/k_norm), which the dense model does not do",
    ("mistral", "qwen3_moe"): "Qwen3-MoE normalises q and k (q_norm/k_norm), which the dense model does not do",
    ("qwen2", "qwen3_moe"): "Qwen3-MoE normalises q and k (q_norm/k_norm), which the dense model does not do",
}


def layer_key(i: int, rel: str) -> str:
    """Full tensor name of a per-layer tensor."""
    return LAYER_PREFIX.format(i=i) + rel


def split_layer_key(key: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> (3, 'mlp.up_proj.weight'); None for global tensors."""
    head = "model.layers."
    if not key.startswith(head):
        return None
    idx, _, rel = key[len(head):].partition(".")
    return (int(idx), rel) if idx.isdigit() else None


def model_type_of(config: dict) -> str:
    """The model_type of a config, looking inside `text_config` for multimodal wrappers."""
    mt = config.get("model_type")
    if mt is None and isinstance(config.get("text_config"), dict):
        mt = config["text_config"].get("model_type")
    return mt or "<missing model_type>"

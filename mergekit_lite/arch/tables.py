"""Architectures as data: dense families we read, MoE families we write, and how they map.

Every decoder we handle stores its blocks under `model.layers.{i}.`; everything else (embeddings,
final norm, lm_head) is "global". A family entry only says what differs: where the FFN lives, which
attention tensors the target can hold, which config fields follow the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mergekit_lite.arch.specs import (
    DenseLayers,
    DensePrefix,
    DenseSet,
    EveryLayerMoE,
    MoESpan,
    RouterSpec,
    SharedExpert,
)

LAYER_PREFIX = "model.layers.{i}."
PROJS = ("gate", "up", "down")  # SwiGLU FFN: down(act(gate(x)) * up(x))

# Attention tensors (relative to the layer prefix) and which families carry them.
_QKVO = frozenset(f"self_attn.{p}_proj.weight" for p in "qkvo")
_QKV_BIAS = frozenset(f"self_attn.{p}_proj.bias" for p in "qkv")
_O_BIAS = frozenset({"self_attn.o_proj.bias"})
_QK_NORM = frozenset({"self_attn.q_norm.weight", "self_attn.k_norm.weight"})
_NORMS = frozenset({"input_layernorm.weight", "post_attention_layernorm.weight"})
_GEMMA_FFN_NORMS = frozenset({"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"})


@dataclass(frozen=True)
class TensorGroup:
    """Per-layer tensors some families hold and others lack, named for the refusal of a lossy upcycle."""

    keys: frozenset[str]
    noun: str  # what a family without them lacks: "MoE X has no {noun}"
    names: str  # the tensors themselves: "so dense Y's {names} would be lost"
    computes: str | None = None  # what a class holding them computes that a source without them does not do


QK_NORMS = TensorGroup(_QK_NORM, "q/k norms", "q_norm/k_norm", "normalises q and k (q_norm/k_norm)")
QKV_BIASES = TensorGroup(_QKV_BIAS, "attention biases", "q/k/v biases")
FFN_NORMS = TensorGroup(_GEMMA_FFN_NORMS, "feed-forward norms", "pre/post feed-forward norms",
                        "normalises the feed-forward input and output")
TENSOR_GROUPS = (QK_NORMS, QKV_BIASES, FFN_NORMS)


@dataclass(frozen=True)
class DenseFamily:
    """A dense decoder family the project reads."""

    model_type: str
    name: str  # as users write it, in messages
    groups: tuple[TensorGroup, ...] = ()  # per-layer tensors beyond Llama's that its checkpoints hold
    mlp: dict[str, str] = field(default_factory=lambda: {p: f"mlp.{p}_proj.weight" for p in PROJS})
    # config fields that hold one entry per layer (lists) or refer to layer indices; which layers are MoE is
    # the dense-layer scheme's (MoEFamily.dense_layers)
    per_layer_fields: tuple[str, ...] = ()


_SOFTMAX = RouterSpec()
_DEEPSEEK_V3 = RouterSpec(scoring=("sigmoid",), bias="mlp.gate.e_score_correction_bias", fp32=True,
                          group_fields=("n_group", "topk_group"), scaling_field="routed_scaling_factor")


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
    name: str = ""                           # as users write it, in messages
    # why a dense family outside `sources` is refused, where its tensor groups do not say (see `lossy_reason`)
    source_notes: dict[str, str] = field(default_factory=dict)
    shared: SharedExpert | None = None       # the shared expert (tensors, gate, size field); None: the class has none
    experts_field: str = "num_experts"
    expert_size_field: str = "moe_intermediate_size"
    carry_fields: tuple[str, ...] = ()       # config fields kept beyond COMMON_FIELDS
    fixed_fields: dict = field(default_factory=dict)
    per_layer_fields: tuple[str, ...] = ()
    dense_layers: DenseLayers = EveryLayerMoE()  # which layers may keep a dense FFN, and the config fields saying so
    router_spec: RouterSpec = _SOFTMAX
    plan_transforms: tuple[str, ...] = ()    # names in ops/plan_transforms.py, applied to the finished plan
    # on-disk tensors made of per-expert ones (plan transform fuse_experts): fused key -> member keys in order;
    # members with {e} repeat for every expert (leading expert axis), e.g. input_linear = [gate_e; up_e]
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the config keeps the dense source's whole config under `text_config` (the project's own classes, which run
    # the dense family's decoder); the MoE fields sit beside it
    nests_text_config: bool = False

    @property
    def fused_expert_keys(self) -> frozenset[str]:
        """Per-layer keys of on-disk tensors that hold every routed expert at once (granitemoe's input_linear)."""
        return frozenset(rel for rel, members in self.fused.items() if any("{e}" in m for m in members))


DENSE: dict[str, DenseFamily] = {
    "llama": DenseFamily("llama", "Llama"),
    "mistral": DenseFamily("mistral", "Mistral"),
    "qwen2": DenseFamily("qwen2", "Qwen2", (QKV_BIASES,), per_layer_fields=("layer_types", "max_window_layers")),
    "qwen3": DenseFamily("qwen3", "Qwen3", (QK_NORMS,), per_layer_fields=("layer_types", "max_window_layers")),
    "gemma3_text": DenseFamily("gemma3_text", "Gemma3", (QK_NORMS, FFN_NORMS), per_layer_fields=("layer_types",)),
}

# Config fields every target keeps from its dense source when present.
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor", "attention_dropout",
    "sliding_window",
)

_QWEN_DENSE = DenseSet("mlp_only_layers", step_field="decoder_sparse_step")
_QWEN_MOE_FIXED = {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "output_router_logits": False, "router_aux_loss_coef": 0.001}

MOE: dict[str, MoEFamily] = {
    "mixtral": MoEFamily(
        model_type="mixtral", architecture="MixtralForCausalLM", name="Mixtral",
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
        model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", name="Qwen2-MoE",
        sources=frozenset({"qwen2", "llama", "mistral"}),
        expert={p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in PROJS},
        router="mlp.gate.weight", dense_mlp={p: f"mlp.{p}_proj.weight" for p in PROJS},
        layer_keys=_QKVO | _QKV_BIAS | _NORMS, zero_fill=_QKV_BIAS,
        shared=SharedExpert({p: f"mlp.shared_expert.{p}_proj.weight" for p in PROJS},
                            gate="mlp.shared_expert_gate.weight", size_field="shared_expert_intermediate_size"),
        carry_fields=("use_sliding_window", "max_window_layers", "layer_types"),
        fixed_fields={**_QWEN_MOE_FIXED, "shared_expert_intermediate_size": 0},
        per_layer_fields=("layer_types", "max_window_layers"),
        dense_layers=_QWEN_DENSE,
    ),
    "qwen3_moe": MoEFamily(
        model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", name="Qwen3-MoE",
        sources=frozenset({"qwen3"}),
        expert={p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in PROJS},
        router="mlp.gate.weight", dense_mlp={p: f"mlp.{p}_proj.weight" for p in PROJS},
        layer_keys=_QKVO | _QKV_BIAS | _O_BIAS | _QK_NORM | _NORMS,
        carry_fields=("attention_bias", "use_sliding_window", "max_window_layers", "layer_types"),
        fixed_fields=dict(_QWEN_MOE_FIXED),
        per_layer_fields=("layer_types", "max_window_layers"),
        dense_layers=_QWEN_DENSE,
    ),
}

# DeepSeek-V3-style targets (asked for by name). Their shared experts are ungated and their dense
# layers are a prefix (first_k_dense_replace, default 1 in glm4_moe: always written).
_DSV3_FIXED = {"norm_topk_prob": True, "output_router_logits": False, "n_group": 1, "topk_group": 1,
               "routed_scaling_factor": 1.0, "first_k_dense_replace": 0, "n_shared_experts": 0}
_UNGATED_SHARED = SharedExpert({p: f"mlp.shared_experts.{p}_proj.weight" for p in PROJS},
                               count_field="n_shared_experts")

MOE["glm4_moe"] = MoEFamily(
    model_type="glm4_moe", architecture="Glm4MoeForCausalLM", name="GLM-4.5",
    sources=frozenset({"llama", "mistral", "qwen2", "qwen3"}),
    expert={p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in PROJS},
    router="mlp.gate.weight", dense_mlp={p: f"mlp.{p}_proj.weight" for p in PROJS},
    # q/k/v biases (attention_bias) and per-head q/k norms (use_qk_norm) are optional; no o_proj bias
    layer_keys=_QKVO | _QKV_BIAS | _QK_NORM | _NORMS,
    shared=_UNGATED_SHARED, experts_field="n_routed_experts",
    carry_fields=("attention_bias",),  # then set from the source's tensors (plan transform attention_flags)
    # partial_rotary_factor defaults to 0.5 in glm4_moe (rotates half of each head): 1.0 is Llama's RoPE
    fixed_fields={**_DSV3_FIXED, "partial_rotary_factor": 1.0, "num_nextn_predict_layers": 0},
    dense_layers=DensePrefix("first_k_dense_replace"),
    router_spec=_DEEPSEEK_V3, plan_transforms=("attention_flags",),
)
MOE["dots1"] = MoEFamily(
    model_type="dots1", architecture="Dots1ForCausalLM", name="dots1",
    sources=frozenset({"qwen3"}),
    expert={p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in PROJS},
    router="mlp.gate.weight", dense_mlp={p: f"mlp.{p}_proj.weight" for p in PROJS},
    layer_keys=_QKVO | _QKV_BIAS | _O_BIAS | _QK_NORM | _NORMS,  # Qwen3's attention
    shared=_UNGATED_SHARED, experts_field="n_routed_experts",
    carry_fields=("attention_bias", "max_window_layers", "layer_types"),
    fixed_fields=dict(_DSV3_FIXED),  # dots1 defaults norm_topk_prob False, n_shared_experts None
    per_layer_fields=("layer_types", "max_window_layers"),
    dense_layers=DensePrefix("first_k_dense_replace"),
    router_spec=_DEEPSEEK_V3,
)

# ERNIE-4.5-MoE: Llama attention with an interleaved RoPE (plan transform ernie_layout permutes q/k rows),
# `use_bias` switching every projection's bias at once, MoE layers placed by start/end/interval, and
# a softmax router whose selection bias lives in `mlp.moe_statics` (shape [1, E]).
MOE["ernie4_5_moe"] = MoEFamily(
    model_type="ernie4_5_moe", architecture="Ernie4_5_MoeForCausalLM", name="ERNIE-4.5-MoE",
    sources=frozenset({"llama", "mistral", "qwen2"}),
    expert={p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in PROJS},
    router="mlp.gate.weight", dense_mlp={p: f"mlp.{p}_proj.weight" for p in PROJS},
    layer_keys=_QKVO | _QKV_BIAS | _O_BIAS | _NORMS,
    shared=replace(_UNGATED_SHARED, count_field="moe_num_shared_experts"), experts_field="moe_num_experts",
    fixed_fields={"moe_layer_start_index": 0, "moe_layer_interval": 1, "moe_num_shared_experts": 0,
                  "use_bias": False, "output_router_logits": False, "router_aux_loss_coef": 0.001},
    dense_layers=MoESpan("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"),
    router_spec=RouterSpec(bias="mlp.moe_statics.e_score_correction_bias", fp32=True, bias_shape="1E",
                           bias_in_router="moe_statics.e_score_correction_bias"),
    plan_transforms=("ernie_layout",),
)

# Granite-MoE: Llama attention scaled by `attention_multiplier`; experts FUSED on disk. The planner
# makes per-expert ops under the keys below, which plan transform fuse_experts collapses into
# input_linear [E, 2I, H] (gate then up) and output_linear [E, H, I]; the shared MLP is fused alike.
_GRANITE_EXPERT = {p: f"block_sparse_moe.experts.{{e}}.{p}_proj.weight" for p in PROJS}
_GRANITE_FUSED = {"block_sparse_moe.input_linear.weight": (_GRANITE_EXPERT["gate"], _GRANITE_EXPERT["up"]),
                  "block_sparse_moe.output_linear.weight": (_GRANITE_EXPERT["down"],)}
_GRANITE_FIXED = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
                  "output_router_logits": False, "router_aux_loss_coef": 0.001}
MOE["granitemoe"] = MoEFamily(
    model_type="granitemoe", architecture="GraniteMoeForCausalLM", name="Granite-MoE",
    source_notes={"qwen2": "Granite-MoE is written from Llama/Mistral only: Qwen2's q/k/v biases would need "
                           "attention_bias, which also adds an o_proj bias (not mapped)"},
    sources=frozenset({"llama", "mistral"}),
    expert=_GRANITE_EXPERT, router="block_sparse_moe.router.layer.weight", dense_mlp=None,
    layer_keys=_QKVO | _QKV_BIAS | _O_BIAS | _NORMS,  # attention_bias: all four biases or none, as Llama
    experts_field="num_local_experts", expert_size_field="intermediate_size",
    carry_fields=("attention_bias",), fixed_fields=_GRANITE_FIXED,
    fused=_GRANITE_FUSED, plan_transforms=("granite_config", "fuse_experts"),
)
_GRANITE_SHARED = {p: f"shared_mlp.{p}_proj.weight" for p in PROJS}
MOE["granitemoeshared"] = replace(
    MOE["granitemoe"], model_type="granitemoeshared", architecture="GraniteMoeSharedForCausalLM",
    shared=SharedExpert(_GRANITE_SHARED, size_field="shared_intermediate_size"),
    fixed_fields={**_GRANITE_FIXED, "shared_intermediate_size": 0},
    fused={**_GRANITE_FUSED, "shared_mlp.input_linear.weight": (_GRANITE_SHARED["gate"], _GRANITE_SHARED["up"]),
           "shared_mlp.output_linear.weight": (_GRANITE_SHARED["down"],)},
)

# The project's own classes (models/moemerge/, written into the folder as Hugging Face custom code): the dense
# family's decoder runs unchanged, every MoE layer's `mlp` becomes the project's block, so every dense family
# the project reads (Gemma3 included, with its pre/post feed-forward norms) maps exactly. Ungated shared
# expert; softmax or sigmoid scores, both with a saved selection bias; any set of dense layers.
MOE["moemerge"] = MoEFamily(
    model_type="moemerge", architecture="MoemergeForCausalLM", name="moemerge",
    sources=frozenset(DENSE),
    expert={p: f"mlp.experts.{{e}}.{p}_proj.weight" for p in PROJS},
    router="mlp.gate.weight", dense_mlp={p: f"mlp.{p}_proj.weight" for p in PROJS},
    layer_keys=_QKVO | _QKV_BIAS | _O_BIAS | _QK_NORM | _NORMS | _GEMMA_FFN_NORMS,  # the family's own decoder
    shared=SharedExpert({p: f"mlp.shared_expert.{p}_proj.weight" for p in PROJS},
                        size_field="shared_expert_intermediate_size"),
    fixed_fields={"norm_topk_prob": True, "block_kind": "topk", "shared_expert_intermediate_size": 0,
                  "output_router_logits": False, "router_aux_loss_coef": 0.001},
    dense_layers=DenseSet("mlp_only_layers"),
    router_spec=RouterSpec(scoring=("softmax", "sigmoid"), scoring_field="scoring",
                           bias="mlp.gate.e_score_correction_bias", scaling_field="routed_scaling_factor"),
    plan_transforms=("moemerge_code",), nests_text_config=True,
)

# `architecture: auto` picks the target that keeps the source's tensors as they are.
AUTO_TARGET = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}

# Why a pair is refused, for the error message (anything not listed falls back to a generic reason).
def lossy_reason(dense_type: str, target: str) -> str:
    """Why `target` cannot be built from `dense_type` without loss, from the tables: tensor groups the source
    holds and the target lacks, groups the target computes with that the source lacks, and the target's notes."""
    dense, fam = DENSE[dense_type], MOE[target]
    reasons = [fam.source_notes[dense_type]] if dense_type in fam.source_notes else []
    reasons += [f"{fam.name} has no {g.noun}, so {dense.name}'s {g.names} would be lost"
                for g in dense.groups if not g.keys <= fam.layer_keys]
    reasons += [f"{fam.name} {g.computes}, which the dense model does not do" for g in TENSOR_GROUPS
                if g.computes and g not in dense.groups and g.keys <= fam.layer_keys - fam.zero_fill]
    return "; ".join(reasons) or f"{target} cannot hold every {dense_type} tensor"

# Config spellings of the expert count and top-k across MoE families (first match wins).
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def moe_counts(config: dict) -> tuple[int | None, int | None]:
    """(routed experts per MoE layer, experts per token) of a config.json dict; (None, None) for a dense one.

    The family's own field (arch tables) is read first, then every spelling a known family uses, so
    inspect/card/check agree on every target family.
    """
    fam = MOE.get(model_type_of(config))
    names = ((fam.experts_field,) if fam else ()) + EXPERT_COUNT_FIELDS
    E = next((config[n] for n in names if isinstance(config.get(n), int) and config[n] > 0), None)
    k = config.get("num_experts_per_tok") or config.get("moe_k")
    return E, (k if E else None)


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


def router_summary(config: dict) -> str | None:
    """What a MoE config's router computes, in a few words (inspect, model card); None for other configs."""
    fam = MOE.get(model_type_of(config))
    if fam is None:
        return None
    spec = fam.router_spec
    parts = [f"{spec.scoring_of(config)} scores"]
    if spec.bias:
        parts.append(f"selection bias {spec.bias.rsplit('.', 1)[-1]}")
    if spec.group_fields and (config.get(spec.group_fields[0]) or 1) > 1:
        parts.append(f"{config[spec.group_fields[0]]} groups, {config.get(spec.group_fields[1])} kept per token")
    if spec.scaling_field and config.get(spec.scaling_field) not in (None, 1, 1.0):
        parts.append(f"routed scaling {config[spec.scaling_field]}")
    return ", ".join(parts)

"""The parts a MoE family is composed of: which layers stay dense, its shared expert, its router.

Each spec has one meaning and carries the functions that act on it, so upcycle, graft, inspect and training
ask the spec instead of branching on flags: a dense-layer scheme turns a list of MoE layers into config
fields (`encode`) and a config back into that list (`decode`); a shared-expert spec names its tensors,
its gate and the config field that sizes it; a router spec says how the class scores experts and which
config fields and tensors hold its options. No IO, no torch: pure data (arch/tables.py composes them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

# --- which layers keep a dense FFN ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EveryLayerMoE:
    """No dense layer: every decoder layer holds experts (Mixtral, Granite-MoE)."""

    any_dense: ClassVar[bool] = False  # some layers can keep the dense FFN
    free: ClassVar[bool] = False       # any set of MoE layers (the recipe's `moe_layers`), not only `dense_layers: k`
    fields_text: ClassVar[str] = ""    # the config fields, for messages
    pattern: ClassVar[str] = "MoE layers everywhere"

    def encode(self, moe: list[int], n_layers: int) -> dict[str, Any] | None:
        """Config fields saying that layers `moe` (sorted) of `n_layers` are MoE; None when the class cannot."""
        return {} if list(moe) == list(range(n_layers)) else None

    def decode(self, config: Mapping[str, Any], n_layers: int) -> list[int]:
        """The MoE layers a config (class defaults applied) makes."""
        return list(range(n_layers))


@dataclass(frozen=True)
class DenseSet:
    """Any set of dense layers, listed by index (`mlp_only_layers`); Qwen-MoE also reads a sparse step."""

    field: str = "mlp_only_layers"
    step_field: str | None = None  # Qwen-MoE's decoder_sparse_step: layer i is MoE only when (i + 1) % step == 0
    any_dense: ClassVar[bool] = True
    free: ClassVar[bool] = True
    pattern: ClassVar[str] = "any set of dense layers"

    @property
    def fields_text(self) -> str:
        """The config field, for messages."""
        return self.field

    def encode(self, moe: list[int], n_layers: int) -> dict[str, Any] | None:
        """Every layer not in `moe` listed dense; a sparse step, which would not survive layers moving, set to 1."""
        fields: dict[str, Any] = {self.field: sorted(set(range(n_layers)) - set(moe))}
        if self.step_field:
            fields[self.step_field] = 1
        return fields

    def decode(self, config: Mapping[str, Any], n_layers: int) -> list[int]:
        """Layers not listed dense (and on the sparse step, where the family has one)."""
        dense = set(config.get(self.field) or [])
        step = (config.get(self.step_field) or 1) if self.step_field else 1
        return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]


@dataclass(frozen=True)
class DensePrefix:
    """Only the first k layers dense, k in one field (DeepSeek-V3's `first_k_dense_replace`: glm4_moe, dots1)."""

    field: str = "first_k_dense_replace"
    any_dense: ClassVar[bool] = True
    free: ClassVar[bool] = False
    pattern: ClassVar[str] = "keeps dense FFNs only in its first layers"

    @property
    def fields_text(self) -> str:
        """The config field, for messages."""
        return self.field

    def encode(self, moe: list[int], n_layers: int) -> dict[str, Any] | None:
        """k = the leading dense layers; None when a dense layer follows a MoE layer."""
        k = n_layers - len(moe)
        return {self.field: k} if list(moe) == list(range(k, n_layers)) else None

    def decode(self, config: Mapping[str, Any], n_layers: int) -> list[int]:
        """Layers k..n-1."""
        return list(range(config.get(self.field) or 0, n_layers))


@dataclass(frozen=True)
class MoESpan:
    """MoE layers are those with start <= i <= end and (i + 1) % interval == 0 (ERNIE-4.5's placement)."""

    start: str = "moe_layer_start_index"
    end: str = "moe_layer_end_index"
    interval: str = "moe_layer_interval"
    any_dense: ClassVar[bool] = True
    free: ClassVar[bool] = True  # any set is asked for; `encode` refuses the sets no span gives

    @property
    def fields_text(self) -> str:
        """The three config fields, for messages."""
        return f"{self.start}/{self.end}/{self.interval}"

    @property
    def pattern(self) -> str:
        """The placement rule, for messages."""
        return f"places MoE layers every {self.interval} layers between a start and an end layer"

    def encode(self, moe: list[int], n_layers: int) -> dict[str, Any] | None:
        """(start, end, interval) giving exactly `moe` (sorted), or None when no such triple does."""
        if not moe:
            return {self.start: n_layers, self.end: n_layers - 1, self.interval: 1}  # no MoE layer
        lo, hi = moe[0], moe[-1]
        for interval in range(1, n_layers + 1):
            if [i for i in range(lo, hi + 1) if (i + 1) % interval == 0] == list(moe):
                return {self.start: lo, self.end: hi, self.interval: interval}
        return None

    def decode(self, config: Mapping[str, Any], n_layers: int) -> list[int]:
        """The layers the span selects."""
        lo, hi, every = config[self.start], config[self.end], config[self.interval]
        return [i for i in range(n_layers) if lo <= i <= hi and (i + 1) % every == 0]


DenseLayers = EveryLayerMoE | DenseSet | DensePrefix | MoESpan


# --- the shared expert --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedExpert:
    """An expert every token runs through, beside the routed ones.

    Sized in channels (`size_field`, Qwen2-MoE) or in routed-expert units (`count_field`, DeepSeek-V3 and
    ERNIE); gated by sigmoid(gate . x) (`gate`, Qwen2-MoE) or added as is.
    """

    mlp: Mapping[str, str]            # proj -> per-layer key of its gate/up/down matrices
    gate: str | None = None           # per-layer key of its [1, H] sigmoid gate; None: ungated
    size_field: str | None = None     # its intermediate size in channels
    count_field: str | None = None    # its size in routed-expert units

    @property
    def gated(self) -> bool:
        """The output is multiplied by a learned sigmoid gate (0.5 at a zero gate)."""
        return self.gate is not None

    def encode(self, size: int, expert_size: int) -> dict[str, Any]:
        """Config fields for a shared expert of `size` channels, routed experts being `expert_size` wide."""
        fields: dict[str, Any] = {}
        if self.size_field:
            fields[self.size_field] = size
        if self.count_field:
            fields[self.count_field] = size // expert_size
        return fields

    def down_scale(self, split: bool) -> float:
        """Factor on the shared down_proj that keeps step-0 parity: x 2 undoes a zero gate's 0.5 on a split FFN."""
        return 2.0 if split and self.gated else 1.0


# --- the router ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterSpec:
    """What a family's router computes and where its options live (config fields, extra tensors).

    Two kinds exist today: softmax over the logits (Mixtral, Qwen-MoE), and the DeepSeek-V3 kind
    (sigmoid scores, a per-expert selection bias saved in the checkpoint, optional grouped routing
    and a routed scaling factor: glm4_moe, dots1).
    """

    scoring: tuple[str, ...] = ("softmax",)   # scorings the class implements; the first is its default
    scoring_field: str | None = None           # config field choosing among several scorings (None: fixed)
    bias: str | None = None                    # selection-bias tensor (relative key): zeros, float32
    fp32: bool = False                         # transformers keeps the router weight in float32 (_keep_in_fp32)
    group_fields: tuple[str, str] | None = None  # (number of groups, groups kept per token)
    scaling_field: str | None = None           # factor on the renormalised top-k weights
    bias_shape: str = "E"                      # "E": [E]; "1E": [1, E] (ERNIE's moe_statics: one row per group)
    # the same tensor in the loaded model, relative to the router module (transformers may load a checkpoint key
    # elsewhere: ERNIE's mlp.moe_statics... lives in mlp.gate.moe_statics); what training moves
    bias_in_router: str = "e_score_correction_bias"

    def encode(self, scoring: str | None, groups: int | None, topk_groups: int | None,
               scaling: float | None) -> dict[str, Any]:
        """Config fields for the recipe's router options (None: the class default)."""
        fields: dict[str, Any] = {}
        if self.scoring_field:
            fields[self.scoring_field] = scoring or self.scoring[0]
        if self.group_fields:
            g = groups or 1
            fields.update(zip(self.group_fields, (g, topk_groups or g)))
        if self.scaling_field:
            fields[self.scaling_field] = float(scaling or 1.0)
        return fields

    def scoring_of(self, config: Mapping[str, Any]) -> str:
        """The scoring a saved config runs ("softmax" or "sigmoid")."""
        return (config.get(self.scoring_field) if self.scoring_field else None) or self.scoring[0]

    def bias_dims(self, num_experts: int) -> tuple[int, ...]:
        """Shape of the selection-bias tensor for `num_experts` experts."""
        return (1, num_experts) if self.bias_shape == "1E" else (num_experts,)

"""What a planner hands to the pure plan transforms: the dense source's shapes and a frozen target context.

A leaf module (it imports no other `ops` module), so `plan_transforms` and `upcycle_router` never import the
planners: the package has no import cycle. Both planners (upcycle and graft) build a `TargetContext`; a plan
transform is `(plan, context) -> new plan` and reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lite.arch.tables import MoEFamily
from mergekit_lite.recipe.upcycle import RouterInit


@dataclass(frozen=True)
class DenseShapes:
    """Hidden size, FFN width and layer count of the dense source, checked against every layer's FFN tensors."""

    hidden: int
    intermediate: int
    n_layers: int


@dataclass(frozen=True)
class TargetContext:
    """Everything a plan transform may read about the model being written (never the planner itself).

    Attributes:
        source: the folder of the model whose config is `source_config` (named in messages).
        source_config: that model's config.json (read only).
        family: the target family's table entry.
        moe_layers: output layers that hold experts, sorted.
        n_layers: decoder layers of the output.
        num_experts: routed experts per MoE layer (0 where the planner does not choose it: graft).
        expert_size: channels of one routed expert (0 where unknown).
        shared_size: channels of the shared expert (0: none).
        router: the recipe's router options (None: graft copies routers as they are).
    """

    source: Path
    source_config: Mapping[str, Any]
    family: MoEFamily
    moe_layers: tuple[int, ...]
    n_layers: int
    num_experts: int = 0
    expert_size: int = 0
    shared_size: int = 0
    router: RouterInit | None = field(default=None)

    @property
    def dense_layers(self) -> list[int]:
        """Output layers that keep a dense FFN."""
        return sorted(set(range(self.n_layers)) - set(self.moe_layers))

    def dense_layer_fields(self) -> dict[str, Any]:
        """The config fields saying which layers are MoE, by the family's dense-layer scheme.

        Raises:
            ValueError: the scheme cannot express these layers (planners refuse such layouts before this).
        """
        fields = self.family.dense_layers.encode(list(self.moe_layers), self.n_layers)
        if fields is None:
            raise ValueError(f"{self.family.model_type} cannot place MoE layers {list(self.moe_layers)}")
        return fields

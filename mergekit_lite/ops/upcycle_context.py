"""What the upcycle planner hands to its helpers: the source's shapes and a read-only view of the planner.

A leaf module (it imports no other `ops` module), so `plan_transforms` and `upcycle_router` can name the
planner's type without importing `ops/upcycle.py`, which imports them: the package has no import cycle.
`PlannerView` lists exactly the attributes they read; a frozen context record built by every planner is meant
to replace it (issue 25, item 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mergekit_lite.arch.tables import MoEFamily
from mergekit_lite.io.reader import CheckpointReader
from mergekit_lite.ops.upcycle_layout import Layout
from mergekit_lite.recipe import UpcycleRecipe


@dataclass
class DenseShapes:
    """Hidden size, FFN width and layer count of the dense source, checked against every layer's FFN tensors."""

    hidden: int
    intermediate: int
    n_layers: int


class PlannerView(Protocol):
    """The planner's attributes that plan transforms and config overrides read (and must not change)."""

    r: UpcycleRecipe               # the validated recipe
    fam: MoEFamily                 # the target family's table entry
    cfg: dict[str, Any]            # the base model's config.json
    base: CheckpointReader         # the base model's tensors (headers)
    sources: list[Path]            # resolved source folders, base first
    shapes: DenseShapes
    layout: Layout                 # expert, shared-expert and MoE-layer layout
    moe: set[int]                  # indices of the MoE layers

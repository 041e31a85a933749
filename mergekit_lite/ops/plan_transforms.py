"""Plan transforms: family-specific rewrites of a finished upcycle plan, named in the family's table entry.

A target family that stores something differently from the per-expert Hub layout (RoPE rows in
another order, experts fused into one tensor, extra config fields) lists transform names in
`MoEFamily.plan_transforms`; `UpcyclePlanner.build` applies them in order to the plan (ops and
config). The executor never learns about families: a transform only rewrites `TensorOp`s into
other `TensorOp`s whose `fn` is a pure tensor transform of `ops/transforms.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from mergekit_lite.ops.upcycle import UpcyclePlanner
    from mergekit_lite.plan import Plan

PlanTransform = Callable[["Plan", "UpcyclePlanner"], None]
PLAN_TRANSFORMS: dict[str, PlanTransform] = {}


def plan_transform(name: str) -> Callable[[PlanTransform], PlanTransform]:
    """Register a plan transform under the name a family's table entry uses."""
    def register(fn: PlanTransform) -> PlanTransform:
        PLAN_TRANSFORMS[name] = fn
        return fn
    return register


def apply_plan_transforms(plan: "Plan", planner: "UpcyclePlanner", names: tuple[str, ...]) -> None:
    """Apply the named transforms in order (an unknown name is a bug in the tables, not a user error)."""
    for name in names:
        PLAN_TRANSFORMS[name](plan, planner)

"""Router options of `moemerge upcycle` (scoring, grouped routing, scaling) and the MoE config fields.

The family tables (arch/tables.py, `MoEFamily.router_spec`) say what each target's router can do and
which config fields hold it; this module refuses what a target cannot do (before any weight is read),
turns the recipe into those config fields, and says in --dry-run what each option does to step-0 parity.

Why parity survives the DeepSeek-V3 router: with identical experts, any renormalised top-k mixture
of them is the dense FFN, whatever the scores, so sigmoid scoring with `norm_topk_prob: true`,
a zero selection bias and grouped routing all keep it (grouped routing keeps the G slices of a copy
in one group, so a token still gets whole copies). The routed scaling factor s multiplies the
renormalised weights (they sum to s): the routed experts' down_proj is multiplied by 1/s
(upcycle_layout.py), so the sum is the dense FFN again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mergekit_lite.arch.tables import MOE, MoEFamily, layer_key
from mergekit_lite.errors import MoemergeError
from mergekit_lite.plan import TensorOp

if TYPE_CHECKING:
    from mergekit_lite.ops.upcycle_context import TargetContext
    from mergekit_lite.recipe import UpcycleRecipe


def _families(test) -> str:
    return " / ".join(sorted(t for t, f in MOE.items() if test(f.router_spec)))


def check_router_options(r: "UpcycleRecipe", fam: MoEFamily) -> None:
    """Refuse router options the target family cannot express, naming the field and the families that can."""
    spec, ro = fam.router_spec, r.router
    if ro.scoring is not None and ro.scoring not in spec.scoring:
        raise MoemergeError(
            f"router.scoring={ro.scoring}: {fam.model_type} routers use {' or '.join(spec.scoring)} scores only; "
            f"remove router.scoring, or use architecture: {_families(lambda s: ro.scoring in s.scoring)}")
    if ro.groups not in (None, 1) and spec.group_fields is None:
        raise MoemergeError(f"router.groups={ro.groups}: {fam.model_type} has no grouped routing; remove "
                            f"router.groups/topk_groups, or use architecture: {_families(lambda s: s.group_fields)}")
    if ro.scaling not in (None, 1.0) and spec.scaling_field is None:
        raise MoemergeError(f"router.scaling={ro.scaling}: {fam.model_type} has no routed scaling factor; remove "
                            f"router.scaling, or use architecture: {_families(lambda s: s.scaling_field)}")


def moe_overrides(ctx: TargetContext) -> dict:
    """Config fields that follow the recipe, each from its spec: dense layers, shared expert size, router options."""
    fam, out = ctx.family, ctx.dense_layer_fields()
    if fam.shared:
        out.update(fam.shared.encode(ctx.shared_size, ctx.expert_size))
    ro = ctx.router
    if ro is not None:
        out.update(fam.router_spec.encode(ro.scoring, ro.groups, ro.topk_groups, ro.scaling))
    return out


def router_dtype(fam: MoEFamily, out_dtype: torch.dtype) -> torch.dtype:
    """transformers keeps some routers in float32 whatever the model dtype; write them so."""
    return torch.float32 if fam.router_spec.fp32 else out_dtype


def bias_ops(fam: MoEFamily, i: int, num_experts: int) -> list[TensorOp]:
    """The selection bias (e_score_correction_bias): zeros, so it changes no choice at step 0; float32."""
    if not fam.router_spec.bias:
        return []
    spec = fam.router_spec
    return [TensorOp(layer_key(i, spec.bias), spec.bias_dims(num_experts), torch.float32, "zeros", role="router")]


def router_notes(r: "UpcycleRecipe", fam: MoEFamily) -> list[str]:
    """What the router options do, and what step-0 parity they keep, for --dry-run."""
    spec, ro, notes = fam.router_spec, r.router, []
    scoring = ro.scoring or spec.scoring[0]
    if scoring == "sigmoid":
        notes.append(f"router: sigmoid scores, top-{r.experts_per_token} renormalised (norm_topk_prob), selection "
                     "bias e_score_correction_bias written as zeros (float32): identical experts keep parity")
    if ro.groups not in (None, 1):
        kg = ro.topk_groups or ro.groups
        notes.append(f"grouped routing: {ro.groups} groups of {r.num_experts // ro.groups} experts, {kg} kept per "
                     f"token (ranked by their two best scores); every copy's slices share a group: parity kept")
    if ro.scaling not in (None, 1.0):
        notes.append(f"routed scaling factor {ro.scaling}: the renormalised top-k weights sum to {ro.scaling}, so "
                     f"routed experts' down_proj is x 1/{ro.scaling}: step-0 parity kept (it holds only because the "
                     "weights are renormalised; training then learns with the factor in place)")
    return notes

"""Plan transforms: family-specific rewrites of a finished upcycle plan, named in the family's table entry.

A target family that stores something differently from the per-expert Hub layout (RoPE rows in
another order, experts fused into one tensor, extra config fields) lists transform names in
`MoEFamily.plan_transforms`; `UpcyclePlanner.build` applies them in order. Each is pure:
`(plan, target context) -> new plan`. It reads only the plan and the frozen `TargetContext`, never
the planner, and changes nothing it was given (new ops, a new config, `dataclasses.replace`). The
executor never learns about families: a transform only turns `TensorOp`s into other `TensorOp`s whose
`fn` is a pure tensor transform of `ops/transforms.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from mergekit_lite.arch.config import validate_config
from mergekit_lite.arch.tables import layer_key, split_layer_key
from mergekit_lite.errors import MoemergeError
from mergekit_lite.plan import TensorOp

if TYPE_CHECKING:
    from mergekit_lite.ops.upcycle_context import TargetContext
    from mergekit_lite.plan import Plan

PlanTransform = Callable[["Plan", "TargetContext"], "Plan"]
PLAN_TRANSFORMS: dict[str, PlanTransform] = {}


def plan_transform(name: str) -> Callable[[PlanTransform], PlanTransform]:
    """Register a plan transform under the name a family's table entry uses."""
    def register(fn: PlanTransform) -> PlanTransform:
        PLAN_TRANSFORMS[name] = fn
        return fn
    return register


def apply_plan_transforms(plan: "Plan", ctx: "TargetContext", names: tuple[str, ...]) -> "Plan":
    """The plan after the named transforms, in order (an unknown name is a bug in the tables, not a user error)."""
    for name in names:
        plan = PLAN_TRANSFORMS[name](plan, ctx)
    return plan


def _has(plan: "Plan", rel: str) -> bool:
    """The plan writes per-layer tensor `rel` (in layer 0: every layer has the same attention tensors)."""
    key = layer_key(0, rel)
    return any(op.key == key for op in plan.ops)


@plan_transform("attention_flags")
def _attention_flags(plan: "Plan", ctx: "TargetContext") -> "Plan":
    """glm4_moe: one attention class for Llama, Qwen2 and Qwen3 sources, switched by config flags.

    `attention_bias` is set when the source has q/k/v biases, `use_qk_norm` when it has per-head q/k norms;
    `head_dim` is written, and `partial_rotary_factor: 1.0` also inside `rope_parameters` (glm4_moe rotates half
    of each head by default). The class has no sliding window: a source whose window is shorter than its
    context is refused (before any weight is read), a longer one changes nothing and is dropped.
    """
    src = ctx.source_config
    _refuse_sliding_window(ctx)
    cfg = dict(plan.config)
    cfg.pop("sliding_window", None)
    cfg["attention_bias"] = _has(plan, "self_attn.q_proj.bias")
    cfg["use_qk_norm"] = _has(plan, "self_attn.q_norm.weight")
    cfg.setdefault("head_dim", src.get("head_dim") or src["hidden_size"] // src["num_attention_heads"])
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "partial_rotary_factor": 1.0}
    validate_config(cfg)
    return replace(plan, config=cfg)


def dense_layer_fields(plan: "Plan", ctx: "TargetContext") -> "Plan":
    """Write which layers are MoE into the config, by the family's dense-layer scheme (`mlp_only_layers`,
    `first_k_dense_replace` or ERNIE's start/end/interval). Graft applies it to the layers it stacked; upcycle
    writes the same fields through `upcycle_router.moe_overrides`, also from `ctx.dense_layer_fields()`."""
    return replace(plan, config={**plan.config, **ctx.dense_layer_fields()})


# --- ERNIE-4.5-MoE and Granite-MoE (issue 13): config fields and on-disk layouts of those targets ---

def _source_hf_config(ctx: "TargetContext"):
    from mergekit_lite.arch.layers import hf_config

    return hf_config(dict(ctx.source_config))


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _refuse_sliding_window(ctx: "TargetContext") -> None:
    """A target that always attends to the whole context cannot hold a source that slides (Mistral, Qwen2)."""
    cfg, target = ctx.source_config, ctx.family.model_type
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True) and window < cfg.get("max_position_embeddings", window + 1):
        raise MoemergeError(f"sliding_window={window} in {ctx.source}/config.json: {target} attends to the "
                            f"whole context, so every token past {window} would see more than the dense model did; "
                            "use architecture: mixtral or qwen2_moe (they keep sliding_window)")


def _explicit_fields(cfg: dict, ctx: "TargetContext") -> dict:
    """Write RoPE and tied embeddings as the source runs them: these targets' defaults differ
    (ERNIE: rope_theta 500000 and tie_word_embeddings true), so a field left out would change the model."""
    src = _source_hf_config(ctx)
    cfg = dict(cfg)
    cfg["rope_parameters"] = dict(src.rope_parameters)
    cfg.pop("rope_theta", None)
    cfg.pop("rope_scaling", None)
    cfg["tie_word_embeddings"] = bool(src.tie_word_embeddings)
    cfg.pop("sliding_window", None)  # refused above when shorter than the context: nothing to keep
    return cfg


def _drop_empty_shared(ops: list[TensorOp], ctx: "TargetContext") -> list[TensorOp]:
    """Without `shared_experts` these classes build no shared expert: size-0 tensors would be unexpected keys."""
    shared = set(ctx.family.shared.mlp.values()) if ctx.family.shared else set()
    if ctx.shared_size == 0 and shared:
        return [op for op in ops if not (_rel(op.key) in shared and op.numel == 0)]
    return ops


def _rel(key: str) -> str:
    parts = split_layer_key(key)
    return parts[1] if parts else key


def _zero_bias(weight: "TensorOp") -> "TensorOp":
    return TensorOp(weight.key.removesuffix(".weight") + ".bias", (weight.shape[0],), weight.dtype, "zeros",
                    role=weight.role)


_ROPE_ROWS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias")


@plan_transform("ernie_layout")
def ernie_layout(plan: "Plan", ctx: "TargetContext") -> "Plan":
    """ERNIE-4.5-MoE: interleaved RoPE rows, `use_bias`, `moe_k`, explicit defaults.

    `use_bias` gives every attention and MLP projection a bias (not the routed experts): a source with
    q/k/v biases (Qwen2) gets zero o_proj / dense-FFN / shared-expert biases, which are exact. The MoE layer
    span and the [1, E] selection bias come from the family's dense-layer scheme and router spec.
    """
    _refuse_sliding_window(ctx)
    fam = ctx.family
    cfg = _explicit_fields(plan.config, ctx)
    cfg["moe_k"] = cfg.pop("num_experts_per_tok")
    kept = _drop_empty_shared(plan.ops, ctx)
    use_bias = any(_rel(op.key) == "self_attn.q_proj.bias" for op in kept)
    cfg["use_bias"] = use_bias
    keys = {op.key for op in kept}
    biased = {"self_attn.o_proj.weight", *(fam.dense_mlp or {}).values(), *(fam.shared.mlp.values() if fam.shared
                                                                             else ())}
    d = _head_dim(cfg)
    ops = []
    for op in kept:
        rel = _rel(op.key)
        if rel in _ROPE_ROWS:
            op = replace(op, fn="rope_interleave", args={"of": op.fn, "of_args": op.args, "head_dim": d})
        ops.append(op)
        if use_bias and rel in biased and op.key.removesuffix(".weight") + ".bias" not in keys:
            ops.append(_zero_bias(op))
    if use_bias:  # the head is biased too, also when tied to the embeddings
        embed = next(op for op in ops if op.key == "model.embed_tokens.weight")
        ops.append(TensorOp("lm_head.bias", (embed.shape[0],), embed.dtype, "zeros", role="head"))
    validate_config(cfg)
    return replace(plan, ops=ops, config=cfg)


@plan_transform("granite_config")
def granite_config(plan: "Plan", ctx: "TargetContext") -> "Plan":
    """Granite-MoE scales attention by `attention_multiplier` (not 1/sqrt(head_dim)) and multiplies the
    embeddings, residual branches and logits: head_dim^-0.5 and ones are Llama's maths."""
    _refuse_sliding_window(ctx)
    cfg = _explicit_fields(plan.config, ctx)
    cfg["attention_multiplier"] = _head_dim(cfg) ** -0.5
    cfg["attention_bias"] = any(_rel(op.key) == "self_attn.q_proj.bias" for op in plan.ops)
    validate_config(cfg)
    return replace(plan, ops=_drop_empty_shared(plan.ops, ctx), config=cfg)


@plan_transform("fuse_experts")
def fuse_experts(plan: "Plan", ctx: "TargetContext") -> "Plan":
    """Collapse per-expert ops into the family's fused on-disk tensors (`MoEFamily.fused`), in place of the first.

    Every upcycle option keeps working: each member op (a copy, a channel slice with noise or drop ...)
    becomes one part of the fused op, computed and written in turn; a plain copy stays a view.
    """
    fam, E = ctx.family, ctx.num_experts
    by_key = {op.key: op for op in plan.ops}
    first: dict[str, TensorOp] = {}
    drop: set[str] = set()
    for i in ctx.moe_layers:
        for fused_rel, members in fam.fused.items():
            per_expert = any("{e}" in m for m in members)
            keys = [layer_key(i, m.format(e=e)) for e in range(E if per_expert else 1) for m in members]
            if not any(k in by_key for k in keys):
                continue  # e.g. no shared expert
            missing = [k for k in keys if k not in by_key]
            if missing:
                raise AssertionError(f"fuse_experts: {layer_key(i, fused_rel)} needs {missing[0]}, not in the plan")
            first[keys[0]] = _fused_op(layer_key(i, fused_rel), [by_key[k] for k in keys], per_expert, E)
            drop.update(keys[1:])
    return replace(plan, ops=[first.get(op.key, op) for op in plan.ops if op.key not in drop])


def _fused_op(key: str, members: list[TensorOp], per_expert: bool, n_experts: int) -> TensorOp:
    """One op whose `fused` transform returns the members' results as parts, in order."""
    dtypes = {op.dtype for op in members}
    tails = {tuple(op.shape[1:]) for op in members}
    if len(dtypes) != 1 or len(tails) != 1:
        raise AssertionError(f"{key}: members differ in dtype or trailing shape: {dtypes}, {tails}")
    srcs: list = []
    parts = []
    for op in members:
        idx = []
        for s in op.srcs:
            if s not in srcs:
                srcs.append(s)
            idx.append(srcs.index(s))
        parts.append({"fn": op.fn, "args": op.args, "srcs": idx, "shape": list(op.shape)})
    rows = sum(op.shape[0] for op in members)
    shape = (n_experts, rows // n_experts, *tails.pop()) if per_expert else (rows, *tails.pop())
    return TensorOp(key, shape, dtypes.pop(), "fused", tuple(srcs), {"parts": parts, "per_expert": per_expert},
                    role=members[0].role)


@plan_transform("moemerge_code")
def moemerge_code(plan: "Plan", ctx: "TargetContext") -> "Plan":
    """The project's own classes: write their custom code into the folder and name it in `auto_map`.

    Without `shared_experts` the block has no shared expert at all (no size-0 tensors to shard or load).
    """
    from mergekit_lite.models import AUTO_MAP, code_files

    cfg = {**plan.config, "auto_map": dict(AUTO_MAP)}
    validate_config(cfg)
    return replace(plan, ops=_drop_empty_shared(plan.ops, ctx), config=cfg,
                   extra_files={**plan.extra_files, **code_files()})

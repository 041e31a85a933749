"""Plan transforms: family-specific rewrites of a finished upcycle plan, named in the family's table entry.

A target family that stores something differently from the per-expert Hub layout (RoPE rows in
another order, experts fused into one tensor, extra config fields) lists transform names in
`MoEFamily.plan_transforms`; `UpcyclePlanner.build` applies them in order to the plan (ops and
config). The executor never learns about families: a transform only rewrites `TensorOp`s into
other `TensorOp`s whose `fn` is a pure tensor transform of `ops/transforms.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mergekit_lite.arch.config import validate_config
from mergekit_lite.arch.tables import layer_key, split_layer_key
from mergekit_lite.errors import MoemergeError
from mergekit_lite.plan import TensorOp

if TYPE_CHECKING:
    from mergekit_lite.ops.upcycle_context import PlannerView as UpcyclePlanner  # not ops.upcycle: no cycle
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


@plan_transform("attention_flags")
def _attention_flags(plan: "Plan", planner: "UpcyclePlanner") -> None:
    """glm4_moe: one attention class for Llama, Qwen2 and Qwen3 sources, switched by config flags.

    `attention_bias` is set when the source has q/k/v biases, `use_qk_norm` when it has per-head q/k norms;
    `head_dim` is written, and `partial_rotary_factor: 1.0` also inside `rope_parameters` (glm4_moe rotates half
    of each head by default). The class has no sliding window: a source whose window is shorter than its
    context is refused (before any weight is read), a longer one changes nothing and is dropped.
    """
    from mergekit_lite.arch.config import validate_config
    from mergekit_lite.arch.tables import layer_key

    cfg, src, base = plan.config, planner.cfg, planner.base
    _refuse_sliding_window(planner)
    cfg.pop("sliding_window", None)
    cfg["attention_bias"] = layer_key(0, "self_attn.q_proj.bias") in base
    cfg["use_qk_norm"] = layer_key(0, "self_attn.q_norm.weight") in base
    cfg.setdefault("head_dim", src.get("head_dim") or src["hidden_size"] // src["num_attention_heads"])
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "partial_rotary_factor": 1.0}
    validate_config(cfg)


# --- ERNIE-4.5-MoE and Granite-MoE (issue 13): config fields and on-disk layouts of those targets ---

def _source_hf_config(planner: "UpcyclePlanner"):
    from mergekit_lite.arch.layers import hf_config

    return hf_config(planner.cfg)


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _refuse_sliding_window(planner: "UpcyclePlanner") -> None:
    """A target that always attends to the whole context cannot hold a source that slides (Mistral, Qwen2)."""
    cfg, target = planner.cfg, planner.fam.model_type
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True) and window < cfg.get("max_position_embeddings", window + 1):
        raise MoemergeError(f"sliding_window={window} in {planner.sources[0]}/config.json: {target} attends to the "
                            f"whole context, so every token past {window} would see more than the dense model did; "
                            "use architecture: mixtral or qwen2_moe (they keep sliding_window)")


def _explicit_fields(plan: "Plan", planner: "UpcyclePlanner") -> None:
    """Write RoPE and tied embeddings as the source runs them: these targets' defaults differ
    (ERNIE: rope_theta 500000 and tie_word_embeddings true), so a field left out would change the model."""
    src = _source_hf_config(planner)
    plan.config["rope_parameters"] = dict(src.rope_parameters)
    plan.config.pop("rope_theta", None)
    plan.config.pop("rope_scaling", None)
    plan.config["tie_word_embeddings"] = bool(src.tie_word_embeddings)
    plan.config.pop("sliding_window", None)  # refused above when shorter than the context: nothing to keep


def _drop_empty_shared(plan: "Plan", planner: "UpcyclePlanner") -> None:
    """Without `shared_experts` these classes build no shared expert: size-0 tensors would be unexpected keys."""
    shared = set((planner.fam.shared_expert or {}).values())
    if planner.layout.shared_size == 0 and shared:
        plan.ops = [op for op in plan.ops if not (_rel(op.key) in shared and op.numel == 0)]


def _rel(key: str) -> str:
    parts = split_layer_key(key)
    return parts[1] if parts else key


def moe_span(layers: list[int], n_layers: int) -> tuple[int, int, int] | None:
    """(start, end, interval) such that layer i is MoE iff start <= i <= end and (i + 1) % interval == 0
    (ERNIE-4.5's placement), or None when no such triple gives exactly `layers` (sorted)."""
    if not layers:
        return n_layers, n_layers - 1, 1  # no MoE layer
    lo, hi = layers[0], layers[-1]
    for interval in range(1, n_layers + 1):
        if [i for i in range(lo, hi + 1) if (i + 1) % interval == 0] == layers:
            return lo, hi, interval
    return None


def _zero_bias(weight: "TensorOp") -> "TensorOp":
    return TensorOp(weight.key.removesuffix(".weight") + ".bias", (weight.shape[0],), weight.dtype, "zeros",
                    role=weight.role)


@plan_transform("ernie_layout")
def ernie_layout(plan: "Plan", planner: "UpcyclePlanner") -> None:
    """ERNIE-4.5-MoE: interleaved RoPE rows, `use_bias`, MoE layer span, [1, E] selection bias, explicit defaults.

    `use_bias` gives every attention and MLP projection a bias (not the routed experts): a source with
    q/k/v biases (Qwen2) gets zero o_proj / dense-FFN / shared-expert biases, which are exact.
    """
    _refuse_sliding_window(planner)
    cfg, E = plan.config, planner.r.num_experts
    _explicit_fields(plan, planner)
    cfg.pop("mlp_only_layers", None)
    span = moe_span(sorted(planner.moe), planner.shapes.n_layers)
    if span is None:
        raise MoemergeError(f"moe_layers={sorted(planner.moe)}: ernie4_5_moe places MoE layers every "
                            "moe_layer_interval layers between moe_layer_start_index and moe_layer_end_index, which "
                            "cannot give these; use dense_layers: k, moe_layers: {every: k} or a contiguous range")
    cfg.update(zip(planner.fam.moe_span_fields, span))
    cfg["moe_k"] = cfg.pop("num_experts_per_tok")
    _drop_empty_shared(plan, planner)
    use_bias = any(_rel(op.key) == "self_attn.q_proj.bias" for op in plan.ops)
    cfg["use_bias"] = use_bias
    keys = {op.key for op in plan.ops}
    biased = {"self_attn.o_proj.weight", *planner.fam.dense_mlp.values(), *planner.fam.shared_expert.values()}
    d = _head_dim(cfg)
    ops = []
    for op in plan.ops:
        rel = _rel(op.key)
        if rel == planner.fam.router_spec.bias:
            op.shape = (1, E)  # Ernie4_5_MoeStatics holds one row per expert group (one group)
        if rel in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias",
                   "self_attn.k_proj.bias"):
            op.args = {"of": op.fn, "of_args": op.args, "head_dim": d}
            op.fn = "rope_interleave"
        ops.append(op)
        if use_bias and rel in biased and op.key.removesuffix(".weight") + ".bias" not in keys:
            ops.append(_zero_bias(op))
    if use_bias:  # the head is biased too, also when tied to the embeddings
        embed = next(op for op in ops if op.key == "model.embed_tokens.weight")
        ops.append(TensorOp("lm_head.bias", (embed.shape[0],), embed.dtype, "zeros", role="head"))
    if plan.active_params is not None:  # the added biases always run
        plan.active_params += sum(op.numel for op in ops) - sum(op.numel for op in plan.ops)
    plan.ops = ops
    validate_config(cfg)


@plan_transform("granite_config")
def granite_config(plan: "Plan", planner: "UpcyclePlanner") -> None:
    """Granite-MoE scales attention by `attention_multiplier` (not 1/sqrt(head_dim)) and multiplies the
    embeddings, residual branches and logits: head_dim^-0.5 and ones are Llama's maths."""
    _refuse_sliding_window(planner)
    cfg = plan.config
    _explicit_fields(plan, planner)
    cfg["attention_multiplier"] = _head_dim(cfg) ** -0.5
    cfg["attention_bias"] = any(_rel(op.key) == "self_attn.q_proj.bias" for op in plan.ops)
    _drop_empty_shared(plan, planner)
    validate_config(cfg)


@plan_transform("fuse_experts")
def fuse_experts(plan: "Plan", planner: "UpcyclePlanner") -> None:
    """Collapse per-expert ops into the family's fused on-disk tensors (`MoEFamily.fused`), in place of the first.

    Every upcycle option keeps working: each member op (a copy, a channel slice with noise or drop ...)
    becomes one part of the fused op, computed and written in turn; a plain copy stays a view.
    """
    fam, E = planner.fam, planner.r.num_experts
    by_key = {op.key: op for op in plan.ops}
    first: dict[str, TensorOp] = {}
    drop: set[str] = set()
    for i in sorted(planner.moe):
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
    plan.ops = [first.get(op.key, op) for op in plan.ops if op.key not in drop]


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
def moemerge_code(plan: "Plan", planner: "UpcyclePlanner") -> None:
    """The project's own classes: write their custom code into the folder and name it in `auto_map`.

    Without `shared_experts` the block has no shared expert at all (no size-0 tensors to shard or load).
    """
    from mergekit_lite.models import AUTO_MAP, code_files

    _drop_empty_shared(plan, planner)
    plan.config["auto_map"] = dict(AUTO_MAP)
    plan.extra_files.update(code_files())
    validate_config(plan.config)

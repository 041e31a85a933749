"""Upcycle plans for the block kinds beyond top-k (`block:` under `architecture: moemerge`): PEER and Multi-Head MoE.

A `block.kind: topk` upcycle copies the dense FFN into routed experts (ops/upcycle.py). PEER (He, 2024: product-key
retrieval over N single-neuron experts) and MH-MoE (Huang et al., 2024: sub-tokens routed on their own) cannot hold
copies of the dense FFN: their experts are new weights. `block.mode: add` grows the model without changing its
function (as LLaMA-Pro grows blocks): the layer keeps its dense FFN under its own keys and the block's output is added,
with the block's output projection at zero (PEER's `expert_down`, MH-MoE's `merge_proj`), so step-0 logits equal the
dense model's. `block.mode: replace` puts the block in the FFN's place (no parity).

How each tensor starts (std = the source's initializer_range; `P` = `mlp.added.` (add) or `mlp.` (replace)):
  PEER    P.retrieval.query.weight, P.retrieval.sub_keys, P.expert_up: normal(std); P.expert_down: zeros (add) or
          normal(std) (replace); P.retrieval.query_norm: BatchNorm at rest (weight 1, bias 0, running mean 0, var 1)
  MH-MoE  P.head_proj: identity; P.merge_proj: zeros (add) or identity (replace); P.gate: the recipe's router.init
          at width hidden / heads; P.experts.{e}.*: normal(std)
Every op here has role "added" (or "router"): what `trainable: added` trains (its keys go to the sidecar).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mergekit_lite.arch.tables import DENSE, PROJS, layer_key
from mergekit_lite.errors import MoemergeError
from mergekit_lite.ops.transforms import transform
from mergekit_lite.ops.upcycle_router import bias_ops
from mergekit_lite.plan import TensorOp, derive_seed

if TYPE_CHECKING:
    from mergekit_lite.arch.tables import MoEFamily
    from mergekit_lite.io import CheckpointReader
    from mergekit_lite.ops.upcycle_context import DenseShapes
    from mergekit_lite.plan import Plan
    from mergekit_lite.recipe import UpcycleRecipe


class UpcyclePlanner(Protocol):
    """The planner as this module uses it (ops/upcycle.py's `UpcyclePlanner`, not imported: no cycle)."""

    r: UpcycleRecipe               # the validated recipe
    fam: MoEFamily                 # the target family's table entry
    cfg: dict[str, Any]            # the base model's config.json
    base: CheckpointReader         # the base model's tensors (headers)
    shapes: DenseShapes
    moe: set[int]                  # indices of the MoE layers
    dense_type: str

    def out_dtype(self, src_dtype: torch.dtype) -> torch.dtype:
        """The output dtype of a tensor stored as `src_dtype`."""

    def non_expert(self, key: str, role: str, out_key: str | None = None) -> TensorOp:
        """An op carrying a dense tensor over (base model, or averaged)."""

    def router_op(self, i: int) -> TensorOp:
        """The router op of MoE layer `i`, initialised as the recipe says."""

# the paper's PEER defaults (8 heads, keys of 128, BatchNorm-ed query, softmax over each head's top-k); 4 MH-MoE heads
DEFAULTS: dict[str, dict[str, Any]] = {
    "peer": {"heads": 8, "key_dim": 128, "query_batchnorm": True, "activation": "gelu", "score": "softmax"},
    "mh_moe": {"heads": 4},
}
ADDED_ROLES = ("added", "router")  # the tensors an upcycle creates rather than copies


@transform("ones")
def _ones(xs, shape, dtype, args):
    return torch.ones(shape, dtype=dtype)


@transform("eye")
def _eye(xs, shape, dtype, args):
    return torch.eye(*shape, dtype=dtype)


def kind(r: "UpcycleRecipe") -> str:
    """The recipe's block kind (topk without `block:`)."""
    return r.block.kind if r.block else "topk"


def has_block(r: "UpcycleRecipe") -> bool:
    """Whether MoE layers get a PEER or MH-MoE block (planned here) rather than copied top-k experts."""
    return kind(r) != "topk"


def mode(r: "UpcycleRecipe") -> str:
    """add or replace (default: add for peer and mh_moe, replace for topk)."""
    return (r.block.mode if r.block else None) or ("add" if has_block(r) else "replace")


def field(r: "UpcycleRecipe", name: str) -> Any:
    """A block field as the recipe gives it, else the kind's default."""
    value = getattr(r.block, name, None) if r.block else None
    return DEFAULTS.get(kind(r), {}).get(name) if value is None else value


def layout_recipe(r: "UpcycleRecipe") -> "UpcycleRecipe":
    """The recipe the expert layout is built from: a block's experts are no FFN copies, so one stand-in expert
    (a PEER layer's million experts would otherwise be a million layout records)."""
    return r.model_copy(update={"num_experts": 1, "experts_per_token": 1}) if has_block(r) else r


def expert_size(p: UpcyclePlanner) -> int:
    """MH-MoE expert width: `block.expert_size`, default the dense intermediate size / heads."""
    return field(p.r, "expert_size") or max(1, p.shapes.intermediate // field(p.r, "heads"))


def check_block_shapes(p: UpcyclePlanner) -> None:
    """What needs the source's sizes: MH-MoE heads dividing the hidden size."""
    h, H = field(p.r, "heads"), p.shapes.hidden
    if kind(p.r) == "mh_moe" and H % h:
        divisors = [d for d in range(1, min(H, 64) + 1) if H % d == 0]
        raise MoemergeError(f"block.heads={h} does not divide the source's hidden_size {H} (each token is split into "
                            f"{h} sub-tokens of equal width); use one of {divisors}")


def block_config(p: UpcyclePlanner) -> dict[str, Any]:
    """The moemerge config fields of the recipe's block."""
    r, k = p.r, kind(p.r)
    out: dict[str, Any] = {"block_kind": k, "block_mode": mode(r)}
    if k == "peer":
        out |= {"block_heads": field(r, "heads"), "peer_key_dim": field(r, "key_dim"),
                "peer_query_batchnorm": field(r, "query_batchnorm"), "peer_activation": field(r, "activation"),
                "peer_score": field(r, "score")}
    elif k == "mh_moe":
        out |= {"block_heads": field(r, "heads"), "moe_intermediate_size": expert_size(p)}
    return out


def _prefix(p: UpcyclePlanner) -> str:
    return "mlp.added." if mode(p.r) == "add" else "mlp."


def _new(p: UpcyclePlanner, i: int, rel: str, shape: tuple[int, ...], dtype: torch.dtype, init: str) -> TensorOp:
    """A new tensor of the block of layer `i`: zeros, ones, eye or normal(initializer_range), seeded by its key."""
    key = layer_key(i, _prefix(p) + rel)
    if init != "normal":
        return TensorOp(key, shape, dtype, init, role="added")
    std = float(p.cfg.get("initializer_range", 0.02))
    return TensorOp(key, shape, dtype, "normal", args={"std": std, "seed": derive_seed(p.r.seed, "block", key)},
                    role="added")


def block_layer_ops(p: UpcyclePlanner, i: int) -> list[TensorOp]:
    """The FFN ops of MoE layer `i`: the dense FFN kept (add) and the block's new tensors."""
    mlp = DENSE[p.dense_type].mlp
    dtype = p.out_dtype(p.base.info(layer_key(i, mlp["gate"])).dtype)
    ops = [p.non_expert(layer_key(i, mlp[q]), "dense_ffn", layer_key(i, f"mlp.{q}_proj.weight")) for q in PROJS] \
        if mode(p.r) == "add" else []
    return ops + (_peer_ops(p, i, dtype) if kind(p.r) == "peer" else _mh_moe_ops(p, i, dtype))


def _peer_ops(p: UpcyclePlanner, i: int, dtype: torch.dtype) -> list[TensorOp]:
    r, H, N = p.r, p.shapes.hidden, p.r.num_experts
    h, d, n = field(r, "heads"), field(r, "key_dim"), round(N ** 0.5)
    ops = [_new(p, i, "retrieval.query.weight", (h * d, H), dtype, "normal"),
           _new(p, i, "retrieval.sub_keys", (h, 2, n, d // 2), dtype, "normal")]
    if field(r, "query_batchnorm"):
        ops += [_new(p, i, "retrieval.query_norm.weight", (h * d,), dtype, "ones"),
                _new(p, i, "retrieval.query_norm.bias", (h * d,), dtype, "zeros"),
                _new(p, i, "retrieval.query_norm.running_mean", (h * d,), dtype, "zeros"),
                _new(p, i, "retrieval.query_norm.running_var", (h * d,), dtype, "ones")]
    down = "zeros" if mode(r) == "add" else "normal"
    return ops + [_new(p, i, "expert_up", (N, H), dtype, "normal"), _new(p, i, "expert_down", (N, H), dtype, down)]


def _mh_moe_ops(p: UpcyclePlanner, i: int, dtype: torch.dtype) -> list[TensorOp]:
    r, H, E = p.r, p.shapes.hidden, p.r.num_experts
    sub, u = H // field(r, "heads"), expert_size(p)
    router = p.router_op(i)  # the recipe's router.init, at the sub-token width
    ops = [_new(p, i, "head_proj.weight", (H, H), dtype, "eye"),
           dataclasses.replace(router, key=layer_key(i, _prefix(p) + "gate.weight"), shape=(E, sub)),
           *[dataclasses.replace(b, key=layer_key(i, _prefix(p) + "gate.e_score_correction_bias"))
             for b in bias_ops(p.fam, i, E)]]
    shapes = {"gate": (u, sub), "up": (u, sub), "down": (sub, u)}
    for e in range(E):
        ops += [_new(p, i, f"experts.{e}.{q}_proj.weight", shapes[q], dtype, "normal") for q in PROJS]
    merge = "zeros" if mode(r) == "add" else "eye"
    return ops + [_new(p, i, "merge_proj.weight", (H, H), dtype, merge)]


def block_notes(p: UpcyclePlanner) -> list[str]:
    """What --dry-run says about the block: what it is, how it is initialised, and step-0 parity."""
    r, k, m = p.r, kind(p.r), mode(p.r)
    h = field(r, "heads")
    if k == "peer":
        what = (f"block: peer, {r.num_experts} single-neuron experts per MoE layer (product keys: 2 x "
                f"{round(r.num_experts ** 0.5)} sub-keys x {h} heads, key_dim {field(r, 'key_dim')}), top-"
                f"{r.experts_per_token} per head; query, sub-keys and expert_up random normal(initializer_range)")
        out = "expert_down"
    else:
        what = (f"block: mh_moe, {h} sub-tokens of {p.shapes.hidden // h} per token, {r.num_experts} experts of "
                f"{expert_size(p)} channels, top-{r.experts_per_token} per sub-token; head_proj identity, experts "
                f"random normal(initializer_range), router {r.router.init}")
        out = "merge_proj"
    if m == "add":
        return [what, f"mode add: the dense FFN stays; {out} is zero, so step-0 logits equal the dense model's "
                      "(check with `moemerge verify`)"]
    init = "random normal" if k == "peer" else "identity"
    return [what, f"mode replace: the block takes the dense FFN's place (its weights are not kept), {out} {init}: "
                  "no step-0 parity; train it (e.g. trainable: added)"]


def added_keys(plan: "Plan") -> list[str]:
    """Keys of the tensors the upcycle created (block tensors, routers): what `trainable: added` trains."""
    return [op.key for op in plan.ops if op.role in ADDED_ROLES]

"""`moemerge upcycle` recipes: a dense checkpoint (or several) into a native Hugging Face MoE checkpoint."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from mergekit_lite.arch.tables import MOE
from mergekit_lite.recipe.base import ByteSize, DType, Strict

# `auto` keeps the source's tensors as they are (mixtral / qwen2_moe / qwen3_moe); the others are asked by name.
# `moemerge` is the project's own classes (Hugging Face custom code written into the folder; any dense family).
# The choices are the family table's keys (arch/tables.py): a new family is a new choice without an edit here.
if TYPE_CHECKING:
    Target = str
else:
    Target = Literal[tuple([*MOE, "auto"])]



# Routed experts per MoE layer: 4096 is 8x today's largest released MoE layers (DeepSeek-V3 256, Qwen3-Next 512);
# a typo such as 1000000000 would otherwise build a plan of billions of tensors before failing.
MAX_EXPERTS = 4096
# PEER's single-neuron experts: the paper's 1024^2 = 1,048,576, with room for 2048^2 (tables of N x hidden)
MAX_PEER_EXPERTS = 2048 * 2048

class RouterInit(Strict):
    """How fresh router (gate) weights are initialised."""

    init: Literal["random", "zeros", "uniform", "hidden"] = "random"
    """random: normal with `router.std`; zeros; uniform in +-`router.bound`; hidden: rows from prompts run through the
    base model"""
    std: float | None = Field(None, gt=0, le=100,
                              description="normal std for `random`; default: the source's initializer_range")
    bound: float | None = Field(None, gt=0, le=100,
                                description="half-width for `uniform`; default: 1/sqrt(hidden_size)")
    prompts: list[list[str]] | None = Field(
        None, description="`hidden`: one list of prompts per expert copy (num_experts / granularity lists); "
                          "with `experts:` give them per expert instead")
    negative_prompts: list[list[str]] | None = Field(
        None, description="`hidden`: optional, same length as `prompts`; their mean hidden state is subtracted")
    batch_size: int = Field(8, ge=1, description="`hidden`: prompts run through the base model per batch")
    max_length: int = Field(512, ge=1, description="`hidden`: prompts are truncated to this many tokens")
    # What the router computes (families differ; the planner refuses what the target cannot do).
    scoring: Literal["softmax", "sigmoid"] | None = Field(
        None, description="softmax (Mixtral, Qwen-MoE) or sigmoid (DeepSeek-V3 style: glm4_moe, dots1); "
                          "default: the target's own")
    groups: int | None = Field(None, ge=1, description="grouped routing: experts split into this many groups "
                                                       "(n_group); each group needs >= 2 experts")
    topk_groups: int | None = Field(None, ge=1, description="grouped routing: groups kept per token (topk_group)")
    scaling: float | None = Field(None, gt=0, description="routed_scaling_factor on the renormalised top-k weights; "
                                                          "routed down_proj x 1/scaling keeps step-0 parity")


class BlockSpec(Strict):
    """`block:` (architecture: moemerge): which MoE block each MoE layer gets, and whether it replaces the FFN."""

    kind: Literal["topk", "peer", "mh_moe"] = "topk"
    """topk (router + copied experts), peer (product-key retrieval over num_experts single-neuron experts) or mh_moe
    (multi-head MoE: each token split into `heads` sub-tokens routed on their own)"""
    mode: Literal["add", "replace"] | None = Field(
        None, description="add: the dense FFN stays and the block's output (output projection at zero) is added, "
                          "step-0 parity; replace: the block takes the FFN's place (no parity). Default: add for "
                          "peer and mh_moe, replace for topk (the only mode it has)")
    heads: int | None = Field(None, ge=1, le=64, description="peer: retrieval heads (default 8); mh_moe: sub-tokens "
                                                             "per token (default 4), dividing the hidden size")
    key_dim: int | None = Field(None, ge=2, le=4096, description="peer: query and product-key dimension, even "
                                                                 "(default 128)")
    query_batchnorm: bool | None = Field(None, description="peer: BatchNorm on the query, as the paper (default true)")
    activation: Literal["gelu", "relu", "silu", "gelu_pytorch_tanh"] | None = Field(
        None, description="peer: each single-neuron expert's activation (default gelu)")
    score: Literal["softmax", "sigmoid"] | None = Field(
        None, description="peer: gate over each head's top-k scores (default softmax)")
    expert_size: int | None = Field(None, ge=1, description="mh_moe: channels of one expert (default: the dense "
                                                            "intermediate size / heads)")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> "BlockSpec":
        own = {"peer": {"heads", "key_dim", "query_batchnorm", "activation", "score"},
               "mh_moe": {"heads", "expert_size"}, "topk": set()}[self.kind]
        foreign = sorted(f for f in self.model_fields_set - {"kind", "mode"} if f not in own)
        if foreign:
            raise ValueError(f"block.{foreign[0]} does not apply to block.kind: {self.kind}; remove it")
        if self.kind == "topk" and self.mode == "add":
            raise ValueError("block.mode: add needs kind peer or mh_moe (a top-k block beside the dense FFN is "
                             "shared_experts: 1 with shared_split); use mode: replace or another kind")
        if self.key_dim is not None and self.key_dim % 2:
            raise ValueError(f"block.key_dim={self.key_dim} must be even (the query is split in two halves)")
        return self


class ExpertSource(Strict):
    """One entry of `experts:` (Branch-Train-MiX / mergekit-moe style): a dense model giving one expert copy."""

    source: str = Field(description="dense model whose FFNs become this expert (same architecture and shapes)")
    revision: str | None = Field(None, description="Hub revision when `source` is a Hub id")
    noise: float | None = Field(None, ge=0, le=10, description="overrides the top-level `noise` for this expert")
    drop_ratio: float | None = Field(None, ge=0, lt=1, description="overrides the top-level `drop_ratio`")
    prompts: list[str] | None = Field(None, description="`router.init: hidden`: prompts this expert should get")
    negative_prompts: list[str] | None = Field(None, description="`router.init: hidden`: prompts it should not get")


class MoEEvery(Strict):
    """`moe_layers: {every: k}`: layers i with (i + 1) % k == 0 are MoE (transformers' decoder_sparse_step)."""

    every: int = Field(ge=1)
    """layers i with (i + 1) mod every = 0 are MoE"""


class UpcycleRecipe(Strict):
    """`moemerge upcycle`: a dense checkpoint into a native Hugging Face MoE checkpoint."""

    source: str | None = Field(None, description="dense model: a local Hugging Face folder, or a Hub id when online "
                                                  "(required unless `experts:` is given)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `source` is a Hub id")
    architecture: Target = "auto"
    """target class: mixtral, qwen2_moe, qwen3_moe, glm4_moe, dots1, ernie4_5_moe, granitemoe, granitemoeshared, or auto
    (Llama/Mistral -> mixtral, Qwen2 -> qwen2_moe, Qwen3 -> qwen3_moe)"""
    num_experts: int | None = Field(None, ge=1, le=MAX_PEER_EXPERTS,
                                    description="fine experts per MoE layer (at most 4096; block.kind: peer up to "
                                                "2048^2, a perfect square); with `experts:` it defaults to "
                                                "len(experts) * granularity")
    experts_per_token: int = Field(ge=1, le=MAX_EXPERTS)
    """top-k: experts per token, at most num_experts; with granularity G a multiple of G (whole copies)"""
    router: RouterInit = RouterInit()
    """how the routers start and what they compute (the router.* fields)"""
    block: BlockSpec | None = None
    """architecture: moemerge only: the block kind and mode (the block.* fields); default topk"""
    # Advanced upcycling (docs/upcycle.md); the defaults reproduce plain sparse upcycling.
    granularity: int = Field(1, ge=1, le=MAX_EXPERTS,
                             description="split each FFN into this many fine experts (slices of I/G)")
    drop_ratio: float = Field(0.0, ge=0, lt=1, description="Drop-Upcycling: fraction of channels re-initialised")
    noise: float = Field(0.0, ge=0, le=10, description="relative gaussian noise per expert (times each matrix's std)")
    shared_experts: int = Field(0, ge=0, description="shared expert size in units of one routed expert "
                                                     "(qwen2_moe, glm4_moe, dots1)")
    shared_split: bool = Field(False, description="split the dense FFN between shared and routed experts (parity)")
    moe_layers: Literal["all"] | MoEEvery | list[int] = Field("all", description="all | {every: k} | [indices]")
    dense_layers: int = Field(0, ge=0, description="the first k layers keep the dense FFN (first_k_dense_replace, "
                                                   "or mlp_only_layers for Qwen-MoE)")
    experts: list[ExpertSource] | None = Field(None, min_length=1, description="one expert copy per dense model")
    base: str | None = Field(None, description="with `experts:`: model giving config, tokenizer and non-expert "
                                               "weights (default: the first expert's source)")
    non_expert: Literal["base", "average"] = Field("base", description="with `experts:`: attention/norms/embeddings "
                                                                       "from `base`, or averaged over the experts")
    dtype: DType = "source"
    """float32, float16, bfloat16, or source (keep each tensor's stored dtype: exact step-0 parity)"""
    seed: int = 0
    """seeds every random choice; each tensor's seed is derived from it and the tensor's name, so a recipe gives
    byte-identical files"""
    output: str | None = None
    """output folder; -o/--output on the command line wins"""
    shard_size: ByteSize = "5GB"
    """shard cap: 500MB, 2GiB, 5G or bytes (GB = 10^9, GiB = 2^30); a larger single tensor gets its own shard;
    --shard-size wins"""
    workers: int | None = Field(None, ge=1, description="writer threads (default: from the cores and the output disk)")

    @model_validator(mode="after")
    def _topk(self) -> "UpcycleRecipe":
        _check_advanced(self)
        _check_block(self)
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} is larger than num_experts={self.num_experts}; "
                f"set experts_per_token to at most {self.num_experts}"
            )
        return self


def _check_advanced(r: "UpcycleRecipe") -> None:
    """Cross-field rules of the advanced upcycling options (checks needing the source config are in the planner)."""
    if r.experts is None:
        if not r.source:
            raise ValueError("`source` is missing: give the dense model (or an `experts:` list)")
        if r.base is not None or r.non_expert != "base":
            raise ValueError("`base` and `non_expert` only apply with an `experts:` list; remove them")
        if r.num_experts is None:
            raise ValueError("`num_experts` is missing: add the number of experts per MoE layer")
    else:
        if r.source:
            raise ValueError("give either `source` or `experts:`, not both; with `experts:` name the model for "
                             "attention, norms and embeddings with `base:`")
        copies = len(r.experts)
        if r.num_experts is None:
            r.num_experts = copies * r.granularity
        elif r.num_experts != copies * r.granularity:
            raise ValueError(f"num_experts={r.num_experts} but {copies} `experts:` x granularity {r.granularity} "
                             f"give {copies * r.granularity}; set num_experts: {copies * r.granularity} or drop it")
    G = r.granularity
    if r.num_experts % G:
        raise ValueError(f"num_experts={r.num_experts} is not a multiple of granularity={G}: every FFN slice needs "
                         f"the same number of copies; use a multiple of {G}")
    if r.experts_per_token % G:
        raise ValueError(f"experts_per_token={r.experts_per_token} is not a multiple of granularity={G}: step-0 "
                         f"parity needs whole groups of {G} slices per token; use a multiple of {G}")
    if G > 1 and r.router.init == "zeros":
        raise ValueError("router.init=zeros with granularity > 1 ties every expert, so top-k may pick incomplete "
                         "slice groups; use random, uniform or hidden")
    if r.shared_split and not r.shared_experts:
        raise ValueError("shared_split: true needs shared_experts >= 1")
    if r.dense_layers and r.moe_layers != "all":
        raise ValueError(f"dense_layers={r.dense_layers} and moe_layers={r.moe_layers} both choose the dense layers; "
                         "keep one of them")
    _check_groups(r)
    if isinstance(r.moe_layers, list) and (not r.moe_layers or min(r.moe_layers) < 0
                                           or len(set(r.moe_layers)) != len(r.moe_layers)):
        raise ValueError(f"moe_layers={r.moe_layers} must be distinct layer indices >= 0 (and at least one)")
    _check_prompts(r)


def _check_block(r: "UpcycleRecipe") -> None:
    """`block:` only on moemerge; PEER's N = n * n with top-k <= n; options that copy or split the dense FFN into
    experts only with topk (peer and mh_moe experts are new weights)."""
    b = r.block
    kind = b.kind if b else "topk"
    if kind != "peer" and r.num_experts is not None and r.num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts={r.num_experts} is more than {MAX_EXPERTS}; only block.kind: peer takes more")
    if b is None:
        return
    if r.architecture != "moemerge":
        raise ValueError(f"`block` needs architecture: moemerge (the project's own classes); {r.architecture} is a "
                         "native target with its own block; set architecture: moemerge or remove `block`")
    if kind == "topk":
        return
    if kind == "peer":
        n = math.isqrt(r.num_experts or 0)
        if n * n != r.num_experts:
            raise ValueError(f"block.kind: peer needs num_experts = n * n (product keys: n sub-keys per half); "
                             f"{r.num_experts} is not a perfect square, use {n * n} or {(n + 1) ** 2}")
        if r.experts_per_token > n:
            raise ValueError(f"experts_per_token={r.experts_per_token} is above n = sqrt(num_experts) = {n}: each "
                             f"half's top-k is taken over n sub-keys; use experts_per_token <= {n}")
    copying = {"granularity": r.granularity != 1, "shared_experts": r.shared_experts != 0,
               "drop_ratio": r.drop_ratio != 0, "noise": r.noise != 0, "experts": r.experts is not None,
               "router.init: hidden": r.router.init == "hidden", "router.groups": r.router.groups is not None}
    if kind == "peer":
        copying |= {"router.scoring": r.router.scoring is not None, "router.scaling": r.router.scaling is not None,
                    f"router.init: {r.router.init}": r.router.init != "random"}
    bad = [name for name, on in copying.items() if on]
    if bad:
        raise ValueError(f"{bad[0]} does not apply to block.kind: {kind} (its experts are new weights, not copies of "
                         "the dense FFN); remove it")


def _check_groups(r: "UpcycleRecipe") -> None:
    """Grouped routing: whole groups of >= 2 experts, whole expert copies per group, enough experts kept.

    The router ranks a group by the sum of its two best scores, so a group needs two experts; the G slices
    of one copy must share a group, or a token could get part of a copy and lose step-0 parity.
    """
    g, kg, E, k, G = r.router.groups, r.router.topk_groups, r.num_experts, r.experts_per_token, r.granularity
    if g is None:
        if kg is not None:
            raise ValueError(f"router.topk_groups={kg} needs router.groups (the number of expert groups)")
        return
    if E % g:
        raise ValueError(f"router.groups={g} does not divide num_experts={E}; use a divisor of {E} "
                         "with at least 2 experts per group")
    size = E // g
    if size < 2:
        raise ValueError(f"router.groups={g}: each group would hold {size} expert of {E}, but a group is ranked by "
                         f"its two best experts; use router.groups <= {E // 2}")
    if size % G:
        raise ValueError(f"router.groups={g}: groups of {size} experts split the {G} slices of a copy "
                         f"(granularity={G}); use groups of a multiple of {G} experts (groups dividing {E // G})")
    kg = g if kg is None else kg
    if kg > g:
        raise ValueError(f"router.topk_groups={kg} is larger than router.groups={g}; use at most {g}")
    if kg * size < k:
        raise ValueError(f"router.topk_groups={kg} x {size} experts per group < experts_per_token={k}: a token "
                         f"could not find {k} experts; raise topk_groups to {-(-k // size)} or more")


def _check_prompts(r: "UpcycleRecipe") -> None:
    """`router.init: hidden` needs positive prompts for every expert copy, in exactly one place."""
    per_expert = r.experts is not None and any(e.prompts or e.negative_prompts for e in r.experts)
    if per_expert and (r.router.prompts or r.router.negative_prompts):
        raise ValueError("prompts are given both under `router:` and under `experts:`; keep one place")
    has_router_prompts = r.router.prompts is not None or r.router.negative_prompts is not None
    if r.router.init != "hidden":
        if per_expert or has_router_prompts:
            raise ValueError(f"prompts are only used with router.init=hidden (got init={r.router.init}); "
                             "set router.init: hidden or remove them")
        return
    copies = r.num_experts // r.granularity
    if per_expert:
        missing = [j for j, e in enumerate(r.experts) if not e.prompts]
        if missing:
            raise ValueError(f"router.init=hidden: experts {missing} have no `prompts`; give each expert a list")
        return
    if not r.router.prompts:
        raise ValueError("router.init=hidden needs prompts: `router.prompts` (one list per expert copy) or "
                         "`prompts:` on every `experts:` entry")
    for name in ("prompts", "negative_prompts"):
        lists = getattr(r.router, name)
        if lists is not None and (len(lists) != copies or not all(lists) and name == "prompts"):
            raise ValueError(f"router.{name} needs {copies} non-empty lists (num_experts / granularity = "
                             f"{r.num_experts} / {r.granularity}), got {len(lists)}")

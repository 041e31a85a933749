"""Plan builder for `moemerge upcycle`: a dense checkpoint into a native Hugging Face MoE.

Sparse upcycling (Komatsuzaki et al., 2023): every layer's FFN is copied into each expert and a
fresh router is added; attention, norms and embeddings are carried over unchanged. The plan is
built from headers only; `run_upcycle` preflights it and hands it to the executor.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_lite.arch.config import moe_config
from mergekit_lite.arch.params import param_counts
from mergekit_lite.arch.tables import (
    AUTO_TARGET,
    DENSE,
    MOE,
    PROJS,
    MoEFamily,
    layer_key,
    lossy_reason,
    model_type_of,
    split_layer_key,
)
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import CheckpointReader, resolve_model_path
from mergekit_lite.ops import upcycle_blocks as blocks
from mergekit_lite.ops.plan_transforms import apply_plan_transforms
from mergekit_lite.ops.upcycle_context import DenseShapes, TargetContext
from mergekit_lite.ops.upcycle_layout import ExpertSpec, Layout, make_layout, parity_notes
from mergekit_lite.ops.upcycle_router import bias_ops, check_router_options, moe_overrides, router_dtype, router_notes
from mergekit_lite.plan import DTYPES, Plan, Src, TensorOp, derive_seed
from mergekit_lite.provenance import recipe_record
from mergekit_lite.recipe import UpcycleRecipe
from mergekit_lite.recipe.paths import resolve_relative


def choose_target(architecture: str, dense_type: str) -> MoEFamily:
    """The MoE family to write, refusing pairs that would lose tensors or change the maths."""
    if dense_type not in DENSE:
        raise MoemergeError(
            f"source architecture {dense_type!r} is not supported; upcycle reads {', '.join(AUTO_TARGET)}")
    native = [t for t, f in MOE.items() if dense_type in f.sources and not f.nests_text_config]
    if not native and (architecture == "auto" or dense_type not in MOE.get(architecture, MOE["moemerge"]).sources):
        asked = "" if architecture == "auto" else f" ({architecture} cannot hold its tensors)"
        raise MoemergeError(
            f"{dense_type} has no native Hugging Face MoE class to upcycle into{asked}; use architecture: moemerge "
            f"(the project's own classes, loaded with trust_remote_code=True), or graft it (`moemerge graft`)")
    target = AUTO_TARGET[dense_type] if architecture == "auto" else architecture
    if target not in MOE:
        raise MoemergeError(f"architecture: {target} is not available in this version; use one of "
                            f"{', '.join(t for t, f in MOE.items() if dense_type in f.sources)} (or auto)")
    fam = MOE[target]
    if dense_type not in fam.sources:
        why = lossy_reason(dense_type, target)
        ok = sorted(t for t, f in MOE.items() if dense_type in f.sources)
        raise MoemergeError(
            f"cannot upcycle {dense_type} into {target}: {why}; use architecture: {' or '.join(ok)} (or auto)")
    return fam


def check_dense_tensors(reader: CheckpointReader, fam: MoEFamily) -> DenseShapes:
    """Every FFN tensor present with SwiGLU shapes, and no tensor the target class cannot hold."""
    cfg = reader.config
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise MoemergeError(f"{reader.path}/config.json has no valid num_hidden_layers")
    mlp = DENSE[model_type_of(cfg)].mlp
    hidden, inter = cfg.get("hidden_size"), cfg.get("intermediate_size")
    source = "config.json"
    if not (isinstance(hidden, int) and isinstance(inter, int)):  # sizes from layer 0 where the config lacks them
        key0 = layer_key(0, mlp["gate"])
        if key0 not in reader:
            raise MoemergeError(f"tensor {key0!r} is missing from {reader.path}; the checkpoint is incomplete")
        (inter, hidden), source = reader.info(key0).shape, "layer 0"
    expect = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    for i in range(n):
        for p in PROJS:
            key = layer_key(i, mlp[p])
            if key not in reader:
                raise MoemergeError(f"tensor {key!r} is missing from {reader.path}; the checkpoint is incomplete")
            got = reader.info(key).shape
            if got != expect[p]:
                flipped = " (transposed?)" if tuple(got) == tuple(reversed(expect[p])) else ""
                raise MoemergeError(f"tensor {key!r} has shape {list(got)}, expected {list(expect[p])}{flipped} "
                                    f"(hidden {hidden}, intermediate {inter} from {source})")
    mlp_rel = set(mlp.values())
    for key in reader.keys():
        parts = split_layer_key(key)
        if parts is None:
            continue
        i, rel = parts
        if i >= n:
            raise MoemergeError(f"tensor {key!r} belongs to layer {i}, but config.json says {n} layers")
        if rel.startswith("mlp.") and rel not in mlp_rel:
            raise MoemergeError(f"unexpected FFN tensor {key!r}: {model_type_of(cfg)}'s FFN here is not the bias-free "
                                f"gated FFN (gate/up/down) that {fam.model_type} experts copy; it cannot be upcycled")
        if rel not in mlp_rel and rel not in fam.layer_keys:
            raise MoemergeError(f"{fam.model_type} has no place for {key!r}; writing it would change the model "
                                f"(pick another architecture or a source without this tensor)")
    return DenseShapes(hidden=hidden, intermediate=inter, n_layers=n)


class UpcyclePlanner:
    """Builds the tensor plan; each kind of tensor has one small method, so options slot in as data.

    `readers[0]` is the base model (config, tokenizer, non-expert weights); `copy_models[c]` is the index of
    the reader whose FFNs give expert copy c (all 0 for a single `source`).
    """

    def __init__(self, recipe: UpcycleRecipe, readers: list[CheckpointReader], sources: list[Path],
                 copy_models: list[int] | None = None):
        self.r, self.readers, self.sources = recipe, readers, sources
        self.base = readers[0]
        self.cfg = self.base.config
        self.dense_type = model_type_of(self.cfg)
        self.fam = choose_target(recipe.architecture, self.dense_type)
        self.shapes = check_dense_tensors(self.base, self.fam)
        check_router_options(recipe, self.fam)
        copy_models = copy_models or [0] * (recipe.num_experts // recipe.granularity)
        self.mean_models = sorted(set(copy_models)) if recipe.non_expert == "average" else [0]
        for m in sorted(set(copy_models) | set(self.mean_models)):
            self._check_same_shapes(m)
        blocks.check_block_shapes(self)
        self.layout: Layout = make_layout(blocks.layout_recipe(recipe), self.fam, self.shapes.intermediate,
                                          self.shapes.n_layers, copy_models, self.dense_type)
        self.experts = self.layout.experts
        self.moe = set(self.layout.moe_layers)

    def _check_same_shapes(self, m: int) -> None:
        """An expert (or averaged) source must match the base: same family, FFN shapes and, to average, tensors."""
        if m == 0:
            return
        rd, where = self.readers[m], self.sources[m]
        mt = model_type_of(rd.config)
        if mt != self.dense_type:
            raise MoemergeError(f"experts: {where} is {mt} but the base {self.sources[0]} is {self.dense_type}; "
                                "every expert source must share the base's architecture")
        shapes = check_dense_tensors(rd, self.fam)
        if shapes != self.shapes:
            raise MoemergeError(f"experts: {where} has hidden/intermediate/layers {shapes.hidden}/"
                                f"{shapes.intermediate}/{shapes.n_layers}, the base {self.sources[0]} has "
                                f"{self.shapes.hidden}/{self.shapes.intermediate}/{self.shapes.n_layers}; "
                                "experts must have identical shapes")
        if m in self.mean_models:
            for key in self.base.keys():
                got = rd.tensors.get(key)
                if got is None or got.shape != self.base.info(key).shape:
                    shown = "missing" if got is None else f"shape {list(got.shape)}"
                    raise MoemergeError(f"non_expert: average needs the same tensors: {key!r} is {shown} in {where} "
                                        f"but {list(self.base.info(key).shape)} in the base; use non_expert: base")

    def out_dtype(self, src_dtype: torch.dtype) -> torch.dtype:
        """The output dtype of a tensor stored as `src_dtype` (`dtype: source` keeps it)."""
        return src_dtype if self.r.dtype == "source" else DTYPES[self.r.dtype]

    def copy(self, key: str, role: str, out_key: str | None = None, model: int = 0) -> TensorOp:
        """An op copying `key` of model `model` unchanged (under `out_key` when renamed)."""
        info = self.readers[model].info(key)
        return TensorOp(out_key or key, info.shape, self.out_dtype(info.dtype), "copy", (Src(model, key),), role=role)

    def non_expert(self, key: str, role: str, out_key: str | None = None) -> TensorOp:
        """Attention, norms, embeddings, dense FFNs: from the base, or the mean over the expert sources."""
        if len(self.mean_models) == 1:
            return self.copy(key, role, out_key, self.mean_models[0])
        info = self.base.info(key)
        return TensorOp(out_key or key, info.shape, self.out_dtype(info.dtype), "mean",
                        tuple(Src(m, key) for m in self.mean_models), role=role)

    def router_op(self, i: int) -> TensorOp:
        """The router of MoE layer `i`: shape, dtype (float32 where the target keeps it so) and init from the recipe."""
        r, h, G = self.r.router, self.shapes.hidden, self.r.granularity
        ffn_dtype = self.base.info(layer_key(i, DENSE[self.dense_type].mlp["gate"])).dtype
        shape, dtype = (self.r.num_experts, h), router_dtype(self.fam, self.out_dtype(ffn_dtype))
        key = layer_key(i, self.fam.router)
        if r.init == "hidden":  # rows are computed from prompts just before writing (router_init.py)
            return TensorOp(key, shape, dtype, "router_rows", args={"layer": i, "groups": G, "rows": None},
                            role="router")
        if r.init == "zeros":
            return TensorOp(key, shape, dtype, "zeros", role="router")
        seed = derive_seed(self.r.seed, "router", key)
        args: dict[str, Any]
        if r.init == "uniform":
            fn, args = "uniform", {"bound": r.bound or 1 / math.sqrt(h), "seed": seed}
        else:
            fn, args = "normal", {"std": r.std or float(self.cfg.get("initializer_range", 0.02)), "seed": seed}
        if G > 1:  # identical rows for the G slices of a copy: their scores tie, top-k takes whole copies
            fn, args = "router_groups", {**args, "init": fn, "groups": G}
        return TensorOp(key, shape, dtype, fn, args=args, role="router")

    def ffn_part(self, i: int, proj: str, out_key: str, spec: ExpertSpec, tag: str, role: str) -> TensorOp:
        """One matrix of an expert: a channel range of a source FFN, with scale, Drop-Upcycling and noise."""
        key = layer_key(i, DENSE[self.dense_type].mlp[proj])
        if spec.is_plain_copy(self.shapes.intermediate):
            return self.copy(key, role, out_key, spec.model)  # zero-copy: shares the source memory
        info = self.readers[spec.model].info(key)
        axis = 1 if proj == "down" else 0  # the intermediate axis: gate/up (I, H), down (H, I)
        shape = list(info.shape)
        shape[axis] = spec.size
        args: dict[str, Any] = {"axis": axis, "start": spec.start, "size": spec.size,
                                "scale": spec.scale if proj == "down" else 1.0}
        if spec.drop_ratio:  # same channels in gate/up/down: the channel seed does not depend on proj
            args["drop"] = {"ratio": spec.drop_ratio, "channel_seed": derive_seed(self.r.seed, "drop", tag),
                            "value_seed": derive_seed(self.r.seed, "drop-values", out_key)}
        if spec.noise:
            args["noise"] = {"sigma": spec.noise, "seed": derive_seed(self.r.seed, "noise", out_key)}
        return TensorOp(out_key, tuple(shape), self.out_dtype(info.dtype), "ffn_part", (Src(spec.model, key),),
                        args, role)

    def expert_ops(self, i: int, e: int, spec: ExpertSpec) -> list[TensorOp]:
        """The gate/up/down ops of expert `e` in layer `i`, cut and scaled as `spec` says."""
        return [self.ffn_part(i, p, layer_key(i, self.fam.expert[p].format(e=e)), spec, f"{i}/{e}", "expert")
                for p in PROJS]

    def shared_ops(self, i: int, dtype: torch.dtype) -> list[TensorOp]:
        """Qwen2-MoE, glm4_moe, dots1 always have a shared expert; size 0 (no `shared_experts`) adds nothing."""
        if not self.fam.shared:
            return []
        h, se, gate_key = self.shapes.hidden, self.fam.shared.mlp, self.fam.shared.gate
        gate = [TensorOp(layer_key(i, gate_key), (1, h), dtype, "zeros", role="shared")] if gate_key else []
        spec = self.layout.shared
        if spec is None:
            shapes = {"gate": (0, h), "up": (0, h), "down": (h, 0)}
            return [TensorOp(layer_key(i, se[p]), shapes[p], dtype, "zeros", role="shared") for p in PROJS] + gate
        return [self.ffn_part(i, p, layer_key(i, se[p]), spec, f"{i}/shared", "shared") for p in PROJS] + gate

    def layer_ops(self, i: int) -> list[TensorOp]:
        """Every op of decoder layer `i`: attention and norms, then a dense FFN or router, experts and shared expert."""
        mlp = DENSE[self.dense_type].mlp
        mlp_rel = set(mlp.values())
        ops = [self.non_expert(k, "norm" if "norm" in k else "attn") for k in self.base.keys()
               if (p := split_layer_key(k)) and p[0] == i and p[1] not in mlp_rel]
        qdtype = self.base.info(layer_key(i, "self_attn.q_proj.weight")).dtype
        for rel in sorted(self.fam.zero_fill):
            key = layer_key(i, rel)
            if key not in self.base:  # e.g. Llama -> Qwen2-MoE: zero q/k/v biases are exact
                proj = self.base.info(layer_key(i, rel.replace(".bias", ".weight")))
                ops.append(TensorOp(key, (proj.shape[0],), self.out_dtype(qdtype), "zeros", role="attn"))
        if i not in self.moe:  # partial MoE: a dense layer keeps its FFN (mlp_only_layers)
            return ops + [self.non_expert(layer_key(i, mlp[p]), "dense_ffn", layer_key(i, self.fam.dense_mlp[p]))
                          for p in PROJS]
        if blocks.has_block(self.r):  # PEER / MH-MoE: new weights (beside the dense FFN in mode add)
            return ops + blocks.block_layer_ops(self, i)
        ops += [self.router_op(i), *bias_ops(self.fam, i, self.r.num_experts)]
        for e, spec in enumerate(self.experts):
            ops += self.expert_ops(i, e, spec)
        return ops + self.shared_ops(i, self.out_dtype(self.base.info(layer_key(i, mlp["gate"])).dtype))

    def build(self) -> Plan:
        """The whole plan (embeddings, layers, head) before the family's plan transforms; no tensor is read."""
        glob = [k for k in self.base.keys() if split_layer_key(k) is None]
        head = [k for k in glob if not k.startswith("model.embed")]
        ops = [self.non_expert(k, "embed") for k in glob if k.startswith("model.embed")]
        for i in range(self.shapes.n_layers):
            ops += self.layer_ops(i)
        ops += [self.non_expert(k, "head") for k in head]
        self._check_head()
        ctx = self.context()
        config, dropped = moe_config(self.cfg, self.fam, num_experts=ctx.num_experts, top_k=self.r.experts_per_token,
                                     expert_size=ctx.expert_size, dtype=self._dtype_name(ops),
                                     overrides={**moe_overrides(ctx), **blocks.block_config(self)})
        plan = Plan("upcycle", self.sources, ops, config, self.sources[0], notes=self._notes(dropped))
        plan = apply_plan_transforms(plan, ctx, self.fam.plan_transforms)
        return replace(plan, active_params=param_counts(plan.numels(), plan.config).active)

    def context(self) -> TargetContext:
        """What the family's plan transforms may read about this upcycle (frozen; never the planner)."""
        return TargetContext(source=self.sources[0], source_config=self.cfg, family=self.fam,
                             moe_layers=tuple(self.layout.moe_layers), n_layers=self.shapes.n_layers,
                             num_experts=self.r.num_experts, expert_size=self.layout.expert_size,
                             shared_size=self.layout.shared_size, router=self.r.router)

    def _check_head(self) -> None:
        if not self.cfg.get("tie_word_embeddings", False) and "lm_head.weight" not in self.base:
            raise MoemergeError(f"tensor 'lm_head.weight' is missing from {self.base.path} "
                                "(and tie_word_embeddings is false)")
        for key in ("model.embed_tokens.weight", "model.norm.weight"):
            self.base.info(key)

    def _dtype_name(self, ops: list[TensorOp]) -> str:
        if self.r.dtype != "source":
            return self.r.dtype
        return str(ops[0].dtype).removeprefix("torch.")

    def _notes(self, dropped: list[str]) -> list[str]:
        notes = []
        E = self.r.num_experts
        if E & (E - 1):
            notes.append(f"num_experts={E} is not a power of two: llama.cpp's converter and kernels may refuse it")
        if dropped:
            notes.append(f"config fields not used by {self.fam.model_type}: {', '.join(dropped)}")
        if blocks.has_block(self.r):
            return notes + blocks.block_notes(self)
        return notes + router_notes(self.r, self.fam) + parity_notes(
            self.r, self.layout, self.shapes.n_layers, self._narrowing(), self.fam)

    def _narrowing(self) -> str | None:
        """"float32 -> bfloat16" when the output dtype is less precise than the source's, else None."""
        src = self.base.info("model.embed_tokens.weight").dtype
        dst = self.out_dtype(src)
        if not (src.is_floating_point and dst.is_floating_point) or torch.finfo(dst).eps <= torch.finfo(src).eps:
            return None
        return f"{str(src).removeprefix('torch.')} -> {str(dst).removeprefix('torch.')}"

    def record(self) -> dict:
        """How the experts were built, for the sidecar (`moemerge inspect` prints it)."""
        r, lay = self.r, self.layout
        copies = [{"source": str(self.sources[x.model]), "noise": x.noise, "drop_ratio": x.drop_ratio}
                  for x in lay.experts if x.slice == 0]
        return {"granularity": r.granularity, "expert_size": lay.expert_size, "drop_ratio": r.drop_ratio,
                "noise": r.noise, "shared_experts": r.shared_experts, "shared_split": r.shared_split,
                "shared_expert_size": lay.shared_size, "moe_layers": lay.moe_layers, "router_init": r.router.init,
                "router": {"scoring": r.router.scoring or self.fam.router_spec.scoring[0], "groups": r.router.groups,
                           "topk_groups": r.router.topk_groups, "scaling": r.router.scaling},
                "base": str(self.sources[0]), "non_expert": r.non_expert, "copies": copies}


def open_sources(recipe: UpcycleRecipe) -> tuple[list[Path], list[int] | None]:
    """Resolve the base and expert sources: (distinct model folders, base first; copy -> folder index)."""
    if not recipe.experts:
        return [resolve_model_path(recipe.source, recipe.revision)], None
    first = recipe.experts[0]
    base = resolve_model_path(recipe.base or first.source, recipe.revision if recipe.base else first.revision)
    paths, copy_models = [base], []
    for item in recipe.experts:
        p = resolve_model_path(item.source, item.revision)
        known = [q.resolve() for q in paths]
        if p.resolve() not in known:
            paths.append(p)
            known.append(p.resolve())
        copy_models.append(known.index(p.resolve()))
    return paths, copy_models


def plan_upcycle(recipe: UpcycleRecipe, recipe_text: str | None = None) -> tuple[Plan, list[CheckpointReader]]:
    """Open the source(s) and build the plan (headers only, no weight bytes read).

    `recipe_text` is the recipe file as the user wrote it (kept verbatim in the output's provenance).
    """
    paths, copy_models = open_sources(recipe)
    readers = [CheckpointReader(p) for p in paths]
    for reader in readers:
        reader.require_plain_weights()
    planner = UpcyclePlanner(recipe, readers, paths, copy_models)
    plan = planner.build()
    recipe_yaml = recipe_text or yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    plan.record = recipe_record("upcycle", recipe_yaml, paths, {
        "target": plan.config["model_type"], "num_experts": recipe.num_experts,
        "experts_per_token": recipe.experts_per_token, "router_init": recipe.router.init, "seed": recipe.seed,
        "total_params": plan.total_params, "active_params": plan.active_params, "upcycle": planner.record(),
        "added": blocks.added_keys(plan)})
    return plan, readers


def run_upcycle(recipe_path: str | Path, output: str | Path | None = None, *, dry_run: bool = False,
                overwrite: bool = False, verbose: bool = False, device: str | None = None,
                shard_size: str | None = None, progress: bool = True, echo=print, workers: int | None = None) -> Plan:
    """`moemerge upcycle`: validate, preflight, print the plan, then write (unless `dry_run`).

    `device` runs the base model for `router.init: hidden` (default: accelerate's choice); `shard_size`
    (e.g. "2GB") wins over the recipe's; `progress`
    shows a bar over the output bytes (stderr) while the tensors are written.
    """
    from mergekit_lite.ops.execute import run_plan_job
    from mergekit_lite.recipe import load_recipe

    recipe = load_recipe(recipe_path, UpcycleRecipe)
    recipe = resolve_recipe_paths(recipe, recipe_path)
    if recipe.router.init == "hidden":  # the base model runs on `device`: refuse a missing one before any work
        from mergekit_lite.ops.router_init import check_device

        check_device(device)
    if shard_size is not None:  # --shard-size wins over the recipe's, as in graft
        from mergekit_lite.recipe import parse_size

        try:
            recipe = recipe.model_copy(update={"shard_size": parse_size(shard_size)})
        except ValueError as e:
            raise MoemergeError(f"--shard-size {shard_size!r}: {e}") from None
    out = Path(output or recipe.output or "") if (output or recipe.output) else None

    def prompt_router(plan: Plan) -> None:  # router.init: hidden runs the base model, only when writing
        from mergekit_lite.ops.router_init import fill_prompt_router

        fill_prompt_router(plan, recipe, device, echo)

    return run_plan_job("upcycle", out, recipe_inputs(recipe, recipe_path),
                        lambda: plan_upcycle(recipe, Path(recipe_path).read_text()),
                        shard_size=int(recipe.shard_size), workers=workers or recipe.workers,  # --workers wins
                        dry_run=dry_run, overwrite=overwrite, verbose=verbose, progress=progress, echo=echo,
                        before_write=prompt_router)


def recipe_inputs(recipe: UpcycleRecipe, recipe_path: str | Path) -> list[tuple[str, str | None]]:
    """Everything upcycle reads, as (what, path) for `refuse_overlap`; Hub ids are skipped there."""
    inputs = [("the recipe file", str(recipe_path)), ("the recipe's source", recipe.source),
              ("the recipe's base", recipe.base)]
    return inputs + [(f"the recipe's experts[{i}].source", e.source) for i, e in enumerate(recipe.experts or [])]


def resolve_recipe_paths(recipe: UpcycleRecipe, recipe_path: str | Path) -> UpcycleRecipe:
    """`source`, `base` and every `experts[].source`, made relative to the recipe where needed."""
    fix: dict[str, Any] = {k: resolve_relative(getattr(recipe, k), recipe_path)
                           for k in ("source", "base") if getattr(recipe, k)}
    if recipe.experts:
        fix["experts"] = [e.model_copy(update={"source": resolve_relative(e.source, recipe_path)})
                          for e in recipe.experts]
    return recipe.model_copy(update=fix)

"""Plan builder for `moemerge graft`: decoder layers of one or more models stacked into a new model.

Three ways to say which layers go where, all turned into one list of slices:

* SOLAR depth up-scaling (`drop: m`, Kim et al., 2023): layers 0..n-m-1 of the model, then
  layers m..n-1 of a copy, 2(n-m) layers in all.
* LLaMA-Pro expansion (`expand: k`, Wu et al., 2024): the n blocks in k groups, each followed by an
  identity copy of its last block. A copy is an identity because its residual updates are zero:
  the attention output projection and every FFN down projection are zeroed (Gemma3's extra
  post-norms map a zero vector to zero, so they keep it zero).
* General slices: half-open layer ranges `[start, end)` from any compatible models.

The plan is built from headers only; the shared executor writes it. Repeated layers are written
entry by entry, so each copy owns its bytes on disk.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_lite.arch.config import validate_config
from mergekit_lite.arch.layers import config_mismatch, moe_layers_of, remap_layers
from mergekit_lite.arch.params import param_counts
from mergekit_lite.arch.tables import DENSE, MOE, MoEFamily, layer_key, model_type_of, split_layer_key
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import CheckpointReader, resolve_model_path
from mergekit_lite.models import text_part
from mergekit_lite.ops.plan_transforms import dense_layer_fields
from mergekit_lite.ops.upcycle_context import TargetContext
from mergekit_lite.plan import DTYPES, Plan, Src, TensorOp
from mergekit_lite.provenance import recipe_record
from mergekit_lite.recipe import GraftRecipe, GraftSlice

Layer = tuple[int, int, bool]  # (model index, source layer, identity copy) of one output layer


def solar_slices(source: str, n: int, m: int) -> list[GraftSlice]:
    """SOLAR: the first n-m layers, then the last n-m layers of a copy."""
    if m >= n:
        raise MoemergeError(f"--drop {m}: the model has only {n} layers; drop must be smaller than {n} "
                            f"(SOLAR used drop 8 on 32 layers)")
    return [GraftSlice(model=source, layers=(0, n - m)), GraftSlice(model=source, layers=(m, n))]


def expand_slices(source: str, n: int, k: int) -> list[GraftSlice]:
    """LLaMA-Pro: k groups of about n/k blocks, each followed by an identity copy of its last block."""
    if k > n:
        raise MoemergeError(f"--expand {k}: the model has only {n} layers, so at most {n} identity blocks "
                            f"can be spread one per group; use --expand {n} or fewer")
    slices, start = [], 0
    for g in range(k):
        end = (g + 1) * n // k  # strictly increasing since n/k >= 1; the last group ends at n
        slices += [GraftSlice(model=source, layers=(start, end)),
                   GraftSlice(model=source, layers=(end - 1, end), identity=True)]
        start = end
    return slices


def identity_zero_patterns(model_type: str) -> list[re.Pattern]:
    """Per-layer tensors that write into the residual stream: zeroing them makes the block an identity."""
    rels = ["self_attn.o_proj.weight"]
    if model_type in DENSE:
        rels.append(DENSE[model_type].mlp["down"])
    else:
        fam = MOE[model_type]
        rels += [fam.expert["down"], "mlp.experts.down_proj"]  # per-expert layout, and v5's fused 3-D layout
        rels += [t["down"] for t in (fam.dense_mlp, fam.shared.mlp if fam.shared else None) if t]
        # experts fused on disk (granitemoe's output_linear): the fused tensors holding a down projection
        rels += [rel for rel, members in fam.fused.items() if set(members) & set(rels)]
    pats = []
    for rel in rels:
        stem = re.escape(rel.removesuffix(".weight")).replace(re.escape("{e}"), r"\d+")
        pats.append(re.compile(stem + r"(\.weight|\.bias)?"))  # a bias adds to the residual too
    return pats


class GraftPlanner:
    """Checks the inputs (headers only) and lists every output tensor."""

    def __init__(self, recipe: GraftRecipe, readers: list[CheckpointReader], slice_models: list[int],
                 embed_model: int, head_model: int):
        self.r, self.readers = recipe, readers
        self.slice_models, self.embed_model, self.head_model = slice_models, embed_model, head_model
        self.model_type = model_type_of(readers[slice_models[0]].config)
        if self.model_type not in DENSE and self.model_type not in MOE:
            raise MoemergeError(f"architecture {self.model_type!r} is not supported by graft; it reads "
                                f"{', '.join([*DENSE, *MOE])}")
        self.layers = self._layers()
        self.by_layer = [self._layer_index(rd) for rd in readers]
        self._check_compatible()

    def _layers(self) -> list[Layer]:
        out = []
        for s, (sl, m) in enumerate(zip(self.r.slices, self.slice_models)):
            n = text_part(self.readers[m].config).get("num_hidden_layers")
            if not isinstance(n, int) or n < 1:
                raise MoemergeError(f"{self.readers[m].path}/config.json has no valid num_hidden_layers")
            start, end = sl.layers
            if end > n:
                raise MoemergeError(f"slices[{s}].layers = [{start}, {end}]: {sl.model} has {n} layers, so the "
                                    f"range must end at {n} or before (ranges are half-open: [start, end))")
            out += [(m, i, sl.identity) for i in range(start, end)]
        return out

    @staticmethod
    def _layer_index(reader: CheckpointReader) -> dict[int, list[tuple[str, str]]]:
        """layer -> [(relative name, full key)], in the reader's order."""
        index: dict[int, list[tuple[str, str]]] = {}
        for key in reader.keys():
            if (parts := split_layer_key(key)) is not None:
                index.setdefault(parts[0], []).append((parts[1], key))
        return index

    def _check_compatible(self) -> None:
        """Same architecture, same config, same tensor shapes: name the first difference."""
        ref = self.readers[self.slice_models[0]]
        ref_shapes = self._shapes(ref)
        for rd in self.readers:
            if model_type_of(rd.config) != self.model_type:
                raise MoemergeError(f"{rd.path} is {model_type_of(rd.config)}, {ref.path} is {self.model_type}: "
                                    "slices must come from models of one architecture")
            if (diff := config_mismatch(ref.config, rd.config)) is not None:
                raise MoemergeError(f"{rd.path} and {ref.path} are not compatible: {diff}")
            for key in rd.keys():
                self._check_tensor(rd, key, ref, ref_shapes)
        for m, i, _ in self.layers:
            if i not in self.by_layer[m]:
                n = text_part(self.readers[m].config)["num_hidden_layers"]
                raise MoemergeError(f"{self.readers[m].path} has no tensors for layer {i} "
                                    f"(config.json says {n} layers)")

    @staticmethod
    def _generic(key: str) -> str:
        """Layer tensors are compared by role: `model.layers.7.mlp.up.weight` -> `model.layers.*.mlp.up.weight`."""
        parts = split_layer_key(key)
        return key if parts is None else "model.layers.*." + parts[1]

    def _shapes(self, rd: CheckpointReader) -> dict[str, tuple]:
        """Shape and dtype by generic name, from the first tensor of each name."""
        out: dict[str, tuple] = {}
        for key in rd.keys():
            info = rd.info(key)
            out.setdefault(self._generic(key), (info.shape, info.dtype))
        return out

    def _check_tensor(self, rd: CheckpointReader, key: str, ref: CheckpointReader, ref_shapes: dict) -> None:
        info, want = rd.info(key), ref_shapes.get(self._generic(key))
        if want is None:
            return
        if want[0] != info.shape:
            raise MoemergeError(f"{rd.path}: tensor {key!r} has shape {list(info.shape)}, {ref.path} has "
                                f"{list(want[0])} for {self._generic(key)!r}; slices need identical shapes")
        if want[1] != info.dtype and self.r.dtype == "source":
            raise MoemergeError(f"{rd.path}: tensor {key!r} is {info.dtype}, {ref.path} has {want[1]}; set "
                                "`dtype: bfloat16` (or float16/float32) to write one dtype")

    def out_dtype(self, src: torch.dtype) -> torch.dtype:
        """The output dtype of a tensor stored as `src` (`dtype: source` keeps it)."""
        return src if self.r.dtype == "source" else DTYPES[self.r.dtype]

    def copy(self, model: int, key: str, out_key: str, role: str, zero: bool = False) -> TensorOp:
        """An op copying `key` of model `model` to `out_key`, or zeros for an identity block's residual writers."""
        info = self.readers[model].info(key)
        if zero:
            return TensorOp(out_key, info.shape, self.out_dtype(info.dtype), "zeros", role="identity-zero")
        return TensorOp(out_key, info.shape, self.out_dtype(info.dtype), "copy", (Src(model, key),), role=role)

    def layer_ops(self, o: int, m: int, i: int, identity: bool) -> list[TensorOp]:
        """Ops for output layer `o` taken from layer `i` of model `m`; `identity` zeroes its residual writers."""
        zero = identity_zero_patterns(self.model_type) if identity else []
        ops = []
        for rel, key in self.by_layer[m][i]:
            role = "expert" if ".experts." in rel else "norm" if "norm" in rel else rel.partition(".")[0]
            ops.append(self.copy(m, key, layer_key(o, rel), role, any(p.fullmatch(rel) for p in zero)))
        zeroed = [op.key for op in ops if op.fn == "zeros"]
        if identity and not (any("o_proj" in k for k in zeroed) and any("o_proj" not in k for k in zeroed)):
            raise MoemergeError(f"layer {i} of {self.readers[m].path} lacks self_attn.o_proj or an FFN down "
                                "projection, so it cannot be made an identity block")
        return ops

    def build(self, sources: list[Path]) -> Plan:
        """The whole plan: embeddings, every output layer in order, final norm and head, with notes."""
        emb, head = self.readers[self.embed_model], self.readers[self.head_model]
        ops = [self.copy(self.embed_model, k, k, "embed") for k in emb.keys()
               if split_layer_key(k) is None and k.startswith("model.embed")]
        for o, (m, i, identity) in enumerate(self.layers):
            ops += self.layer_ops(o, m, i, identity)
        ops += [self.copy(self.head_model, k, k, "head") for k in head.keys()
                if split_layer_key(k) is None and not k.startswith("model.embed")]
        plan = Plan("graft", sources, ops, self._config(ops), sources[self.slice_models[0]], notes=self._notes())
        fam = MOE.get(self.model_type)
        if fam is None:  # dense: nothing is routed
            return plan
        # the same dense-layer rewriting as upcycle's: the family's scheme writes which output layers are MoE
        plan = dense_layer_fields(plan, self.context(sources[self.slice_models[0]], fam))
        return replace(plan, active_params=param_counts(plan.numels(), plan.config).active)

    def context(self, source: Path, fam: MoEFamily) -> TargetContext:
        """The output as a target: its family and the layers that hold experts (checked against every source)."""
        moe = self._moe_layers(fam)
        if fam.dense_layers.encode(moe, len(self.layers)) is None:
            self._refuse_layout(fam, moe)
        return TargetContext(source=source, source_config=self.readers[self.slice_models[0]].config, family=fam,
                             moe_layers=tuple(moe), n_layers=len(self.layers))

    def _config(self, ops: list[TensorOp]) -> dict:
        config = remap_layers([rd.config for rd in self.readers], [(m, i) for m, i, _ in self.layers])
        config["dtype"] = self.r.dtype if self.r.dtype != "source" else str(ops[0].dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        validate_config(config)
        return config

    def _moe_layers(self, fam: MoEFamily) -> list[int]:
        """Output layers that hold experts, from each layer's tensors; every source layer must be the kind its
        own config makes it (the family's dense-layer scheme, class defaults included)."""
        dense_rel = fam.dense_mlp["gate"] if fam.dense_mlp else None
        scheme_moe = {m: set(moe_layers_of(self.readers[m].config) or []) for m in set(self.slice_models)}
        moe = []
        for o, (m, i, _) in enumerate(self.layers):
            dense = any(rel == dense_rel for rel, _ in self.by_layer[m][i])
            if dense == (i in scheme_moe[m]):
                kind = "dense" if i not in scheme_moe[m] else "MoE"
                raise MoemergeError(f"{self.readers[m].path}: config.json makes layer {i} a {kind} layer "
                                    f"({fam.dense_layers.fields_text}), but its tensors "
                                    f"{'do not ' if kind == 'dense' else ''}hold {dense_rel!r}; the checkpoint does "
                                    "not match its config")
            if not dense:
                moe.append(o)
        return moe

    def _refuse_layout(self, fam: MoEFamily, moe: list[int]) -> None:
        """The family's config cannot say which output layers are MoE: name them and the first misplaced dense one."""
        field = fam.dense_layers.fields_text.split("/")[0]
        late = [o for o in range(moe[0], len(self.layers)) if o not in moe] if moe else []
        where = ""
        if late:  # the first dense layer after an MoE layer
            m, i, _ = self.layers[late[0]]
            where = (f", and dense layer {i} of {self.readers[m].path} at output layer {late[0]} after MoE "
                     f"layer {moe[0]}")
        raise MoemergeError(f"{field}: {self.model_type} {fam.dense_layers.pattern}, but this graft puts MoE layers at "
                            f"output layers {moe}{where}; order the slices so they follow that pattern, or leave "
                            "that layer out")

    def _notes(self) -> list[str]:
        notes = []
        if any(identity for *_, identity in self.layers):
            notes.append("identity blocks: logits equal the source's (check with `moemerge verify OUT --against SRC`)")
        if self.embed_model != self.head_model and text_part(self.readers[self.embed_model].config).get(
                "tie_word_embeddings"):
            notes.append("tied embeddings: lm_head is the embedding matrix, so head_from only picks the final norm")
        return notes

    def new_layers(self) -> list[int]:
        """Output indices of the identity blocks, recorded so that `trainable: new_layers` can find them."""
        return [o for o, (*_, identity) in enumerate(self.layers) if identity]

    def slice_record(self, sources: list[Path]) -> list[str]:
        """The output's layers as compact runs, e.g. `A: layers [0, 24)` (half-open, like the recipe)."""
        runs: list[list] = []
        for m, i, identity in self.layers:
            if runs and runs[-1][0] == m and runs[-1][2] == i and runs[-1][3] == identity:
                runs[-1][2] = i + 1
            else:
                runs.append([m, i, i + 1, identity])
        return [f"{sources[m]}: layers [{a}, {b}){' identity' if idy else ''}" for m, a, b, idy in runs]

def _shorthand_slices(recipe: GraftRecipe, reader: CheckpointReader) -> tuple[list[GraftSlice], list[str]]:
    """`drop` / `expand` as explicit slices, plus the notes they call for."""
    n = text_part(reader.config).get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise MoemergeError(f"{reader.path}/config.json has no valid num_hidden_layers")
    if recipe.expand is not None:
        return expand_slices(recipe.source, n, recipe.expand), []
    m = recipe.drop
    notes = [f"SOLAR depth up-scaling: {n} -> {2 * (n - m)} layers (0..{n - m - 1}, then {m}..{n - 1}); the output "
             "deviates from the source until it is trained (`moemerge verify` reports how much)"]
    if 2 * (n - m) <= n:
        notes.append(f"warning: --drop {m} on {n} layers gives {2 * (n - m)} layers, not deeper than the source; "
                     f"use --drop {max(0, (n - 1) // 2)} or less to grow the model")
    return solar_slices(recipe.source, n, m), notes


def plan_graft(recipe: GraftRecipe, recipe_text: str | None = None) -> tuple[Plan, list[CheckpointReader]]:
    """Open the models and build the plan (headers only, no weight bytes read)."""
    paths: list[Path] = []
    readers: list[CheckpointReader] = []

    def index_of(model: str) -> int:
        p = resolve_model_path(model)
        if p.resolve() not in [q.resolve() for q in paths]:
            paths.append(p)
            readers.append(CheckpointReader(p))
            readers[-1].require_plain_weights()
        return [q.resolve() for q in paths].index(p.resolve())

    notes: list[str] = []
    if recipe.slices is None:
        base = index_of(recipe.source)
        slices, notes = _shorthand_slices(recipe, readers[base])
        recipe = recipe.model_copy(update={"slices": slices})
    slice_models = [index_of(sl.model) for sl in recipe.slices]
    pick = {"first": slice_models[0], "last": slice_models[-1]}
    embed = pick.get(recipe.embeddings_from) if recipe.embeddings_from in pick else index_of(recipe.embeddings_from)
    head = pick.get(recipe.head_from) if recipe.head_from in pick else index_of(recipe.head_from)
    planner = GraftPlanner(recipe, readers, slice_models, embed, head)
    plan = planner.build(paths)
    plan.notes = notes + plan.notes
    recipe_yaml = recipe_text or yaml.safe_dump(
        recipe.model_dump(mode="json", exclude_defaults=True, exclude={"slices"} if recipe.source else set()),
        sort_keys=False)
    plan.record = recipe_record("graft", recipe_yaml, paths, {
        "new_layers": planner.new_layers(), "slices": planner.slice_record(paths),
        "total_params": plan.total_params, "active_params": plan.active_params})
    return plan, readers


def load_graft_recipe(target: str | Path, drop: int | None, expand: int | None) -> tuple[GraftRecipe, str | None]:
    """A recipe file, or a model folder with `--drop` / `--expand`; returns (recipe, recipe text or None)."""
    from mergekit_lite.recipe import load_recipe, validate_recipe
    from mergekit_lite.recipe.paths import resolve_relative

    target = Path(target)
    hub_id = not target.exists() and target.suffix not in (".yaml", ".yml") and (drop is not None or expand is not None)
    if target.is_dir() or hub_id:  # a local model folder, or a Hub id resolved when the plan opens it
        if (drop is None) == (expand is None):
            raise MoemergeError(f"{target} is a model folder: pass exactly one of --drop M (SOLAR depth up-scaling) "
                                "or --expand K (identity blocks), or give a graft recipe YAML instead")
        fields = {"source": str(target), **({"drop": drop} if drop is not None else {"expand": expand})}
        return validate_recipe(fields, GraftRecipe, "(from the command line)"), None
    if drop is not None or expand is not None:
        raise MoemergeError(f"--drop/--expand apply to a model folder, but {target} is a recipe file; "
                            "write `drop:` or `expand:` in the recipe instead")
    if not target.exists():
        raise MoemergeError(f"{target} is neither a model folder nor a graft recipe file")
    recipe = load_recipe(target, GraftRecipe)
    fix: dict[str, Any] = {"source": resolve_relative(recipe.source, target) if recipe.source else None}
    if recipe.slices:
        fix["slices"] = [sl.model_copy(update={"model": resolve_relative(sl.model, target)}) for sl in recipe.slices]
    for name in ("embeddings_from", "head_from"):
        value = getattr(recipe, name)
        fix[name] = value if value in ("first", "last") else resolve_relative(value, target)
    return recipe.model_copy(update=fix), target.read_text()


def graft_inputs(recipe: GraftRecipe, recipe_path: str | Path | None) -> list[tuple[str, str | Path | None]]:
    """Everything graft reads, as (what, path) for `refuse_overlap`; Hub ids are skipped there."""
    inputs = [("the recipe file", recipe_path and str(recipe_path)), ("the graft source", recipe.source)]
    inputs += [(f"slices[{i}].model", sl.model) for i, sl in enumerate(recipe.slices or [])]
    return inputs + [(name, getattr(recipe, name)) for name in ("embeddings_from", "head_from")
                     if getattr(recipe, name) not in ("first", "last")]


def run_graft(target: str | Path, output: str | Path | None = None, *, drop: int | None = None,
              expand: int | None = None, dry_run: bool = False, overwrite: bool = False,
              shard_size: str | None = None, verbose: bool = False, progress: bool = True,
              echo=print, workers: int | None = None) -> Plan:
    """`moemerge graft`: validate, preflight, print the plan, then write (unless `dry_run`); `progress` shows
    a bar over the output bytes (stderr) while the tensors are written."""
    from mergekit_lite.ops.execute import run_plan_job
    from mergekit_lite.recipe import parse_size

    recipe, text = load_graft_recipe(target, drop, expand)
    out = Path(output) if output else Path(recipe.output) if recipe.output else None
    try:
        size = parse_size(shard_size) if shard_size is not None else int(recipe.shard_size)
    except ValueError as e:
        raise MoemergeError(f"--shard-size {shard_size!r}: {e}") from None
    return run_plan_job("graft", out, graft_inputs(recipe, None if text is None else target),
                        lambda: plan_graft(recipe, text), shard_size=size,
                        workers=workers or recipe.workers,  # --workers wins over the recipe's
                        dry_run=dry_run, overwrite=overwrite, verbose=verbose, progress=progress, echo=echo)

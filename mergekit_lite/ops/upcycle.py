"""Plan builder for `moemerge upcycle`: a dense checkpoint into a native Hugging Face MoE.

Sparse upcycling (Komatsuzaki et al., 2023): every layer's FFN is copied into each expert and a
fresh router is added; attention, norms and embeddings are carried over unchanged. The plan is
built from headers only; `run_upcycle` preflights it and hands it to the executor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mergekit_lite.arch.config import moe_config
from mergekit_lite.arch.tables import AUTO_TARGET, DENSE, LOSSY_REASONS, MOE, PROJS, MoEFamily, layer_key, \
    model_type_of, split_layer_key
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import CheckpointReader, resolve_model_path
from mergekit_lite.io.writer import preflight_disk
from mergekit_lite.plan import Plan, Src, TensorOp, derive_seed
from mergekit_lite.provenance import recipe_record
from mergekit_lite.recipe import UpcycleRecipe

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ExpertSpec:
    """Where one expert's weights come from (a source model's FFN, transformed as listed)."""

    model: int = 0  # index into Plan.sources


@dataclass
class DenseShapes:
    hidden: int
    intermediate: int
    n_layers: int


def choose_target(architecture: str, dense_type: str) -> MoEFamily:
    """The MoE family to write, refusing pairs that would lose tensors or change the maths."""
    if dense_type not in DENSE:
        raise MoemergeError(
            f"source architecture {dense_type!r} is not supported; upcycle reads {', '.join(AUTO_TARGET)}")
    if dense_type not in AUTO_TARGET:
        raise MoemergeError(
            f"{dense_type} has no native Hugging Face MoE class to upcycle into; "
            f"it can still be grafted (`moemerge graft`)")
    target = AUTO_TARGET[dense_type] if architecture == "auto" else architecture
    fam = MOE[target]
    if dense_type not in fam.sources:
        why = LOSSY_REASONS.get((dense_type, target), f"{target} cannot hold every {dense_type} tensor")
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
    gate0 = reader.info(layer_key(0, mlp["gate"]))
    inter, hidden = gate0.shape
    expect = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    for i in range(n):
        for p in PROJS:
            key = layer_key(i, mlp[p])
            if key not in reader:
                raise MoemergeError(f"tensor {key!r} is missing from {reader.path}; the checkpoint is incomplete")
            got = reader.info(key).shape
            if got != expect[p]:
                raise MoemergeError(f"tensor {key!r} has shape {list(got)}, expected {list(expect[p])} "
                                    f"(hidden {hidden}, intermediate {inter} from layer 0)")
    mlp_rel = set(mlp.values())
    for key in reader.keys():
        parts = split_layer_key(key)
        if parts is None:
            continue
        i, rel = parts
        if i >= n:
            raise MoemergeError(f"tensor {key!r} belongs to layer {i}, but config.json says {n} layers")
        if rel not in mlp_rel and rel not in fam.layer_keys:
            raise MoemergeError(f"{fam.model_type} has no place for {key!r}; writing it would change the model "
                                f"(pick another architecture or a source without this tensor)")
        if rel.startswith("mlp.") and rel not in mlp_rel:
            raise MoemergeError(f"unexpected FFN tensor {key!r} (FFN biases are not supported by MoE experts)")
    return DenseShapes(hidden=hidden, intermediate=inter, n_layers=n)


class UpcyclePlanner:
    """Builds the tensor plan; each kind of tensor has one small method, so options slot in as data."""

    def __init__(self, recipe: UpcycleRecipe, readers: list[CheckpointReader], sources: list[Path]):
        self.r, self.readers, self.sources = recipe, readers, sources
        self.base = readers[0]
        self.cfg = self.base.config
        self.dense_type = model_type_of(self.cfg)
        self.fam = choose_target(recipe.architecture, self.dense_type)
        self.shapes = check_dense_tensors(self.base, self.fam)
        self.experts = [ExpertSpec(0) for _ in range(recipe.num_experts)]

    def out_dtype(self, src_dtype: torch.dtype) -> torch.dtype:
        return src_dtype if self.r.dtype == "source" else DTYPES[self.r.dtype]

    def copy(self, key: str, role: str, out_key: str | None = None, model: int = 0) -> TensorOp:
        info = self.readers[model].info(key)
        return TensorOp(out_key or key, info.shape, self.out_dtype(info.dtype), "copy", (Src(model, key),), role=role)

    def router_op(self, i: int) -> TensorOp:
        r, h = self.r.router, self.shapes.hidden
        ffn_dtype = self.base.info(layer_key(i, DENSE[self.dense_type].mlp["gate"])).dtype
        shape, dtype = (self.r.num_experts, h), self.out_dtype(ffn_dtype)
        key = layer_key(i, self.fam.router)
        if r.init == "zeros":
            return TensorOp(key, shape, dtype, "zeros", role="router")
        seed = derive_seed(self.r.seed, "router", key)
        if r.init == "uniform":
            bound = r.bound or 1 / math.sqrt(h)
            return TensorOp(key, shape, dtype, "uniform", args={"bound": bound, "seed": seed}, role="router")
        std = r.std or float(self.cfg.get("initializer_range", 0.02))
        return TensorOp(key, shape, dtype, "normal", args={"std": std, "seed": seed}, role="router")

    def expert_ops(self, i: int, e: int, spec: ExpertSpec) -> list[TensorOp]:
        mlp = DENSE[self.dense_type].mlp
        return [self.copy(layer_key(i, mlp[p]), "expert", layer_key(i, self.fam.expert[p].format(e=e)), spec.model)
                for p in PROJS]

    def shared_ops(self, i: int, dtype: torch.dtype) -> list[TensorOp]:
        """Qwen2-MoE always has a shared expert; size 0 makes it contribute exactly nothing."""
        if not self.fam.shared_expert:
            return []
        h, se = self.shapes.hidden, self.fam.shared_expert
        shapes = {"gate": (0, h), "up": (0, h), "down": (h, 0)}
        ops = [TensorOp(layer_key(i, se[p]), shapes[p], dtype, "zeros", role="shared") for p in PROJS]
        return ops + [TensorOp(layer_key(i, self.fam.shared_expert_gate), (1, h), dtype, "zeros", role="shared")]

    def layer_ops(self, i: int) -> list[TensorOp]:
        mlp_rel = set(DENSE[self.dense_type].mlp.values())
        ops = [self.copy(k, "norm" if "norm" in k else "attn") for k in self.base.keys()
               if (p := split_layer_key(k)) and p[0] == i and p[1] not in mlp_rel]
        qdtype = self.base.info(layer_key(i, "self_attn.q_proj.weight")).dtype
        for rel in sorted(self.fam.zero_fill):
            key = layer_key(i, rel)
            if key not in self.base:  # e.g. Llama -> Qwen2-MoE: zero q/k/v biases are exact
                proj = self.base.info(layer_key(i, rel.replace(".bias", ".weight")))
                ops.append(TensorOp(key, (proj.shape[0],), self.out_dtype(qdtype), "zeros", role="attn"))
        router = self.router_op(i)
        ops.append(router)
        for e, spec in enumerate(self.experts):
            ops += self.expert_ops(i, e, spec)
        return ops + self.shared_ops(i, router.dtype)

    def build(self) -> Plan:
        glob = [k for k in self.base.keys() if split_layer_key(k) is None]
        head = [k for k in glob if not k.startswith("model.embed")]
        ops = [self.copy(k, "embed") for k in glob if k.startswith("model.embed")]
        for i in range(self.shapes.n_layers):
            ops += self.layer_ops(i)
        ops += [self.copy(k, "head") for k in head]
        self._check_head()
        E, k, I, H = self.r.num_experts, self.r.experts_per_token, self.shapes.intermediate, self.shapes.hidden
        config, dropped = moe_config(self.cfg, self.fam, num_experts=E, top_k=k, expert_size=I,
                                     dtype=self._dtype_name(ops))
        plan = Plan("upcycle", self.sources, ops, config, self.sources[0])
        plan.active_params = plan.total_params - self.shapes.n_layers * (E - k) * 3 * H * I
        plan.notes += self._notes(dropped)
        return plan

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
        notes.append("identical experts: step-0 logits equal the dense model's (check with `moemerge verify`)")
        return notes


def plan_upcycle(recipe: UpcycleRecipe, recipe_text: str | None = None) -> tuple[Plan, list[CheckpointReader]]:
    """Open the source(s) and build the plan (headers only, no weight bytes read).

    `recipe_text` is the recipe file as the user wrote it (kept verbatim in the output's provenance).
    """
    src = resolve_model_path(recipe.source, recipe.revision)
    readers = [CheckpointReader(src)]
    plan = UpcyclePlanner(recipe, readers, [src]).build()
    recipe_yaml = recipe_text or yaml.safe_dump(recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    plan.record = recipe_record("upcycle", recipe_yaml, [src], {
        "target": plan.config["model_type"], "num_experts": recipe.num_experts,
        "experts_per_token": recipe.experts_per_token, "router_init": recipe.router.init, "seed": recipe.seed,
        "total_params": plan.total_params, "active_params": plan.active_params})
    return plan, readers


def run_upcycle(recipe_path: str | Path, output: str | Path | None = None, *, dry_run: bool = False,
                overwrite: bool = False, verbose: bool = False, echo=print) -> Plan:
    """`moemerge upcycle`: validate, preflight, print the plan, then write (unless `dry_run`)."""
    from mergekit_lite.io.writer import check_output
    from mergekit_lite.ops.execute import execute
    from mergekit_lite.recipe import load_recipe

    recipe = load_recipe(recipe_path, UpcycleRecipe)
    recipe = recipe.model_copy(update={"source": resolve_relative(recipe.source, recipe_path)})
    out = Path(output or recipe.output or "") if (output or recipe.output) else None
    if out is None and not dry_run:
        raise MoemergeError("no output folder: pass -o/--output or set `output:` in the recipe")
    if out is not None:
        check_output(out, overwrite)
    plan, readers = plan_upcycle(recipe, Path(recipe_path).read_text())
    for line in plan.summary_lines(max_tensors=len(plan.ops) if verbose else 0):
        echo(line)
    if dry_run:
        return plan
    preflight_disk(out, plan.nbytes)
    execute(plan, readers, out, shard_size=recipe.shard_size, overwrite=overwrite,
            progress=lambda n, total: echo(f"  wrote shard {n}/{total}"))
    echo(f"wrote {out}")
    return plan


def resolve_relative(source: str, recipe_path: str | Path) -> str:
    """A relative source path is taken from the working directory, else from the recipe's folder."""
    p = Path(source).expanduser()
    if p.is_absolute() or p.exists():
        return source
    beside = Path(recipe_path).parent / p
    return str(beside) if beside.exists() else source

"""Families composed of specs, pure plan transforms, and one parameter count.

* Every command counts parameters the same way: upcycle's plan (dry run and sidecar), graft's plan, `inspect`
  (safetensors headers) and train's header (the live transformers module) agree on total and active
  parameters for every target family and every option set it accepts (targets and options from the tables).
* Each dense-layer scheme's `decode` inverts its `encode`, and refuses what its class cannot hold.
* A plan transform returns a new plan and leaves the plan and context it was given unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_lite.arch.params import model_param_counts, param_counts
from mergekit_lite.arch.specs import DensePrefix, DenseSet, EveryLayerMoE, MoESpan
from mergekit_lite.arch.tables import MOE
from mergekit_lite.inspect_model import describe
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.ops.graft import run_graft
from mergekit_lite.ops.plan_transforms import PLAN_TRANSFORMS
from mergekit_lite.ops.upcycle import plan_upcycle, run_upcycle
from mergekit_lite.recipe import UpcycleRecipe, load_recipe

DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3)
BUILDABLE = ("llama", "qwen2", "qwen3", "gemma3_text", "mistral")  # pico families, in order of preference


def source_of(target: str) -> str:
    """The first dense family (in BUILDABLE order) the target is written from without loss."""
    return next(f for f in BUILDABLE if f in MOE[target].sources)


def options_of(target: str) -> dict[str, dict]:
    """Option sets the family's specs accept: shared expert, dense layers and a grouped/scaled router only
    where the family has them."""
    fam = MOE[target]
    opts: dict[str, dict] = {"plain": {}, "granular": {"granularity": 2, "num_experts": 8, "experts_per_token": 4}}
    if fam.shared:
        opts["shared_split"] = {"shared_experts": 1, "shared_split": True}
        opts["shared_added"] = {"shared_experts": 2}
    if fam.dense_layers.any_dense:
        opts["dense_first"] = {"dense_layers": 1}
    if fam.router_spec.group_fields:
        opts["grouped_scaled"] = {"granularity": 2, "num_experts": 8, "experts_per_token": 4,
                                  "router": {"groups": 2, "topk_groups": 1, "scaling": 2.5}}
    return opts


CASES = [(t, o) for t in MOE for o in options_of(t)]


def quiet(_line: str) -> None:
    pass


def write_recipe(tmp_path: Path, **fields) -> Path:
    body = {"num_experts": 4, "experts_per_token": 2, "dtype": "float32", "seed": 5, **fields}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("target,option", CASES, ids=[f"{t}-{o}" for t, o in CASES])
def test_every_command_counts_the_same_parameters(tmp_path, pico_factory, target, option):
    from transformers import AutoModelForCausalLM

    dense = pico_factory(source_of(target), **DIMS)
    recipe = write_recipe(tmp_path, source=str(dense), architecture=target, **options_of(target)[option])
    out = tmp_path / "moe"
    plan = run_upcycle(recipe, out, echo=quiet, progress=False)
    upcycled = (plan.total_params, plan.active_params)
    assert upcycled[1] < upcycled[0], "routed experts run k of E: fewer parameters per token than in all"
    built = read_sidecar(out)
    assert (built["total_params"], built["active_params"]) == upcycled
    seen = describe(out)
    assert (seen["total_params"], seen["active_params"]) == upcycled
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert tuple(model_param_counts(model)) == upcycled
    graft_recipe = tmp_path / "g.yaml"  # every layer once, in order: the same model, counted by graft
    graft_recipe.write_text(yaml.safe_dump({"slices": [{"model": str(out), "layers": [0, 3]}], "dtype": "source"}))
    grafted = run_graft(graft_recipe, dry_run=True, echo=quiet, progress=False)
    assert (grafted.total_params, grafted.active_params) == upcycled


def test_param_counts_of_a_dense_and_a_fused_model():
    dense = param_counts([("model.layers.0.mlp.up_proj.weight", 100), ("lm_head.weight", 10)],
                         {"model_type": "llama"})
    assert dense == (110, 110)
    fused = param_counts([("model.layers.0.block_sparse_moe.input_linear.weight", 800),   # 4 experts, fused
                          ("model.layers.0.block_sparse_moe.router.layer.weight", 16),
                          ("model.layers.0.shared_mlp.input_linear.weight", 200)],         # not routed
                         {"model_type": "granitemoeshared", "num_local_experts": 4, "num_experts_per_tok": 1})
    assert fused == (1016, 1016 - 800 + 200)


# --- dense-layer schemes ---------------------------------------------------------------------------------------

SCHEMES = [EveryLayerMoE(), DenseSet("mlp_only_layers"), DenseSet("mlp_only_layers", "decoder_sparse_step"),
           DensePrefix("first_k_dense_replace"), MoESpan()]
LAYOUTS = [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [3, 4, 5], [1, 3, 5], [0, 2, 4], [2, 3], [0, 5], []]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("moe", LAYOUTS, ids=str)
def test_scheme_decode_inverts_encode(scheme, moe):
    fields = scheme.encode(moe, 6)
    if fields is None:  # the class cannot hold it: say so only where the scheme's rule excludes it
        assert not scheme.free or isinstance(scheme, MoESpan), "a free set takes any layers"
        return
    assert scheme.decode(fields, 6) == moe


def test_schemes_refuse_what_their_class_cannot_hold():
    assert EveryLayerMoE().encode([1, 2], 3) is None
    assert DensePrefix().encode([0, 2], 3) is None and DensePrefix().encode([1, 2], 3) == {"first_k_dense_replace": 1}
    assert MoESpan().encode([0, 5], 6) is None and MoESpan().encode([1, 3, 5], 6)["moe_layer_interval"] == 2
    assert DenseSet("mlp_only_layers", "decoder_sparse_step").encode([0, 2], 3) == {
        "mlp_only_layers": [1], "decoder_sparse_step": 1}


def test_every_family_declares_a_scheme_its_config_class_reads(pico_factory, tmp_path):
    """For each family the fields its scheme encodes are the ones transformers' config class holds."""
    from mergekit_lite.arch.layers import hf_config

    for name, fam in MOE.items():
        fields = fam.dense_layers.encode([1, 2], 3) or {}
        if name == "moemerge":
            continue  # the project's own config class: covered by test_moemerge_target
        obj = hf_config({"model_type": name, "num_hidden_layers": 3, **fields})
        assert all(getattr(obj, k) == v for k, v in fields.items()), name


# --- pure plan transforms ---------------------------------------------------------------------------------------

TRANSFORMING = sorted({t for t, f in MOE.items() if f.plan_transforms})


@pytest.mark.parametrize("target", TRANSFORMING)
def test_plan_transforms_leave_their_inputs_unchanged(tmp_path, pico_factory, monkeypatch, target):
    """Each transform returns a new plan; the plan and context it was given compare equal before and after."""
    import mergekit_lite.ops.upcycle as upcycle_module

    monkeypatch.setattr(upcycle_module, "apply_plan_transforms", lambda plan, ctx, names: plan)  # the plan before
    dense = pico_factory(source_of(target), **DIMS)
    recipe = load_recipe(write_recipe(tmp_path, source=str(dense), architecture=target, shared_experts=1,
                                      shared_split=True) if MOE[target].shared else
                         write_recipe(tmp_path, source=str(dense), architecture=target), UpcycleRecipe)
    from mergekit_lite.io import CheckpointReader
    from mergekit_lite.ops.upcycle import UpcyclePlanner

    planner = UpcyclePlanner(recipe, [CheckpointReader(dense)], [Path(dense)])
    ctx = planner.context()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.n_layers = 1  # type: ignore[misc]
    plan = planner.build()
    for name in MOE[target].plan_transforms:
        snapshot = (copy.deepcopy(plan.ops), json.dumps(plan.config, sort_keys=True, default=str),
                    dict(plan.extra_files), copy.deepcopy(ctx))
        new = PLAN_TRANSFORMS[name](plan, ctx)
        assert new is not plan and (new.ops, new.config, new.extra_files) != (plan.ops, plan.config, plan.extra_files)
        assert (plan.ops, json.dumps(plan.config, sort_keys=True, default=str), plan.extra_files, ctx) == snapshot, name
        plan = new


def test_plan_upcycle_runs_the_transforms_once(tmp_path, pico_factory):
    """ERNIE's RoPE interleave wraps the q/k rows exactly once (a mutating transform run twice would nest it)."""
    dense = pico_factory("llama", **DIMS)
    plan, _ = plan_upcycle(load_recipe(write_recipe(tmp_path, source=str(dense), architecture="ernie4_5_moe"),
                                       UpcycleRecipe))
    q = next(op for op in plan.ops if op.key == "model.layers.0.self_attn.q_proj.weight")
    assert q.fn == "rope_interleave" and q.args["of"] == "copy"
    assert next(op for op in plan.ops if op.key.endswith("moe_statics.e_score_correction_bias")).shape == (1, 4)


def test_every_refused_pair_gets_its_reason_from_the_tables():
    """A dense family outside a target's `sources` is refused with what would be lost, derived from the tensor
    groups both tables declare (and the target's notes), never the generic fallback."""
    from mergekit_lite.arch.tables import DENSE, lossy_reason

    refused = [(d, t) for d in DENSE for t, fam in MOE.items() if d not in fam.sources]
    assert len(refused) >= 20
    for d, t in refused:
        assert "cannot hold every" not in lossy_reason(d, t), (d, t)
    assert lossy_reason("qwen3", "mixtral") == "Mixtral has no q/k norms, so Qwen3's q_norm/k_norm would be lost"
    assert lossy_reason("qwen2", "mixtral") == ("Mixtral has no attention biases, so Qwen2's q/k/v biases would be "
                                                "lost")
    assert lossy_reason("llama", "qwen3_moe") == ("Qwen3-MoE normalises q and k (q_norm/k_norm), which the dense "
                                                  "model does not do")
    assert lossy_reason("qwen2", "granitemoeshared").startswith("Granite-MoE is written from Llama/Mistral only")
    assert "Gemma3's pre/post feed-forward norms would be lost" in lossy_reason("gemma3_text", "qwen3_moe")

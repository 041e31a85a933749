"""Upcycling into the DeepSeek-V3-style families (glm4_moe, dots1): step-0 parity for every (source, target) pair
with each router / layout option, the config fields and tensors the writer sets on purpose, bad inputs refused
before any weight is read, and the other commands (check, inspect, card, push --dry-run, graft) on the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_lite.arch.tables import MOE
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import CheckpointReader
from mergekit_lite.ops.upcycle import plan_upcycle, run_upcycle
from mergekit_lite.recipe import UpcycleRecipe, load_recipe
from mergekit_lite.verify import compare_logits

DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3)
# every (source, target) pair the tables allow for the DeepSeek-V3-style targets
PAIRS = [(s, t) for t in ("glm4_moe", "dots1") for s in ("llama", "mistral", "qwen2", "qwen3") if s in MOE[t].sources]
# E experts, top-k; G = granularity; shared units split off the dense FFN; dense prefix; grouped + scaled router
OPTIONS = {
    "plain": {},
    "shared": {"shared_experts": 1, "shared_split": True},
    "dense_layers": {"dense_layers": 1},
    "granular": {"granularity": 2, "num_experts": 8, "experts_per_token": 4},
    "grouped_scaled": {"granularity": 2, "num_experts": 8, "experts_per_token": 4,
                       "router": {"groups": 2, "topk_groups": 1, "scaling": 2.5}},
    "everything": {"granularity": 2, "num_experts": 8, "experts_per_token": 4, "shared_experts": 2,
                   "shared_split": True, "dense_layers": 1,
                   "router": {"scoring": "sigmoid", "groups": 2, "topk_groups": 1, "scaling": 2.5}},
}
TOL = 1e-4


def quiet(_line: str) -> None:
    pass


def recipe(tmp_path: Path, name: str = "r", **fields) -> Path:
    body = {"num_experts": 4, "experts_per_token": 2, "dtype": "float32", **fields}
    body["source"] = str(body["source"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def upcycle(tmp_path: Path, name: str = "out", **fields) -> Path:
    out = tmp_path / name
    run_upcycle(recipe(tmp_path, name, **fields), out, echo=quiet, progress=False)
    return out


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture
def no_heavy_io(monkeypatch):
    """Any attempt to read tensor bytes fails: errors must come from headers and configs only."""
    def boom(self, key):
        raise AssertionError(f"tensor bytes of {key} were read before the error")
    monkeypatch.setattr(CheckpointReader, "get", boom)


# --- parity ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("family,target", PAIRS, ids=[f"{f}-{t}" for f, t in PAIRS])
def test_parity(tmp_path, pico_factory, family, target, option):
    """fp32 step-0 logits of the written folder (AutoModelForCausalLM) equal the dense source's."""
    dense = pico_factory(family, **DIMS)
    fields = OPTIONS[option]
    out = upcycle(tmp_path, source=dense, architecture=target, seed=7, **fields)
    cfg = config_of(out)
    assert cfg["model_type"] == target and cfg["norm_topk_prob"] is True
    assert cfg["first_k_dense_replace"] == fields.get("dense_layers", 0)
    assert cfg["n_shared_experts"] == fields.get("shared_experts", 0)
    router = fields.get("router", {})
    assert (cfg["n_group"], cfg["topk_group"], cfg["routed_scaling_factor"]) == (
        router.get("groups", 1), router.get("topk_groups", router.get("groups", 1)), router.get("scaling", 1.0))
    report = compare_logits(out, dense, device="cpu")
    assert report.max_abs <= TOL, (family, target, option, report.max_abs)
    assert report.top1_agreement == 1.0


def test_tied_scores_keep_parity(tmp_path, pico_factory):
    """router.init zeros: every sigmoid score is 0.5 and every group ties; any k identical experts still sum to
    the dense FFN (granularity 1; with granularity > 1 the schema refuses zeros, a tie could split a copy)."""
    dense = pico_factory("llama", **DIMS)
    out = upcycle(tmp_path, source=dense, architecture="glm4_moe", num_experts=8, experts_per_token=2,
                  router={"init": "zeros", "groups": 4, "topk_groups": 2})
    assert compare_logits(out, dense, device="cpu").max_abs <= TOL


@pytest.mark.parametrize("family,fields", [("llama", {}), ("qwen2", {}), ("qwen3", {})])
def test_glm4_moe_attention_fields(tmp_path, pico_factory, family, fields):
    """glm4_moe's attention flags follow the source's tensors; RoPE covers whole heads; no MTP layer."""
    dense = pico_factory(family, **DIMS)
    out = upcycle(tmp_path, source=dense, architecture="glm4_moe")
    cfg = config_of(out)
    assert cfg["attention_bias"] is (family == "qwen2")
    assert cfg["use_qk_norm"] is (family == "qwen3")
    assert cfg["head_dim"] == (16 if family == "qwen3" else 8)  # pico Qwen3 keeps head_dim 16 at hidden 32
    assert cfg["num_nextn_predict_layers"] == 0
    assert cfg["partial_rotary_factor"] == 1.0 and cfg["rope_parameters"]["partial_rotary_factor"] == 1.0


# Each field the writer sets on purpose: with it changed back to what transformers would assume, parity is lost.
MUTATIONS = [
    ("llama", "glm4_moe", {}, "partial_rotary_factor"),
    ("qwen2", "glm4_moe", {}, "attention_bias"),
    ("qwen3", "glm4_moe", {}, "use_qk_norm"),
    ("llama", "glm4_moe", {}, "first_k_dense_replace"),
    ("qwen3", "dots1", {"num_experts": 8, "experts_per_token": 4}, "norm_topk_prob"),
    ("qwen3", "dots1", {"router": {"scaling": 2.5}}, "routed_scaling_factor"),
    ("qwen3", "dots1", {"shared_experts": 1, "shared_split": True}, "n_shared_experts"),
]


def _mutate(cfg: dict, name: str) -> None:
    if name == "partial_rotary_factor":  # glm4_moe's default is 0.5
        cfg.pop(name)
        cfg["rope_parameters"].pop(name)
    elif name == "first_k_dense_replace":  # glm4_moe's default is 1
        cfg.pop(name)
    elif name == "n_shared_experts":
        cfg[name] = 0
    elif name == "routed_scaling_factor":
        cfg[name] = 1.0
    else:
        cfg[name] = not cfg[name]


def assert_parity_lost(out: Path, dense: Path, cfg: dict, name: str) -> None:
    """With `cfg` written as the folder's config, the model no longer matches the dense one (or is refused)."""
    (out / "config.json").write_text(json.dumps(cfg))
    try:
        delta = compare_logits(out, dense, device="cpu").max_abs
    except MoemergeError:  # transformers refuses the folder (shape mismatch): also a lost model
        return
    assert delta > 1e-3, (name, delta)


@pytest.mark.parametrize("family,target,fields,name", MUTATIONS, ids=[m[3] for m in MUTATIONS])
def test_each_written_field_is_needed(tmp_path, pico_factory, family, target, fields, name):
    dense = pico_factory(family, **DIMS)
    out = upcycle(tmp_path, source=dense, architecture=target, **fields)
    assert compare_logits(out, dense, device="cpu").max_abs <= TOL
    cfg = config_of(out)
    _mutate(cfg, name)
    assert_parity_lost(out, dense, cfg, name)


def test_router_tensors_float32_in_a_bf16_output(tmp_path, pico_factory):
    """The router weight and the zero selection bias are float32 (transformers keeps them so); experts bf16."""
    out = upcycle(tmp_path, source=pico_factory("qwen3", **DIMS), architecture="dots1", dtype="bfloat16",
                  shared_experts=1, shared_split=True, dense_layers=1)
    w = load_file(next(out.glob("*.safetensors")))
    bias = w["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.shape == (4,) and not bias.any()
    assert w["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert w["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.bfloat16
    assert w["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (32, 32)  # 1 unit of I / (1 + 1)
    assert "model.layers.0.mlp.up_proj.weight" in w and "model.layers.0.mlp.gate.weight" not in w
    assert not any(".shared_expert_gate." in k for k in w)  # ungated


def test_dry_run_notes_say_what_parity_the_router_keeps(tmp_path, pico_factory):
    lines: list[str] = []
    run_upcycle(recipe(tmp_path, source=pico_factory("llama", **DIMS), architecture="glm4_moe", granularity=2,
                       num_experts=8, experts_per_token=4, router={"groups": 2, "scaling": 2.5}, dense_layers=1),
                None, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert "sigmoid scores" in text and "e_score_correction_bias" in text
    assert "routed experts' down_proj is x 1/2.5: step-0 parity kept" in text
    assert "grouped routing: 2 groups of 4 experts, 2 kept per token" in text
    assert "dense FFN kept in layers [0] (first_k_dense_replace)" in text


def test_expert_down_proj_carries_granularity_over_scaling(tmp_path, pico_factory):
    dense = pico_factory("qwen3", **DIMS)
    out = upcycle(tmp_path, source=dense, architecture="dots1", granularity=2, num_experts=8, experts_per_token=4,
                  router={"scaling": 2.5})
    src, w = load_file(next(dense.glob("*.safetensors"))), load_file(next(out.glob("*.safetensors")))
    down = src["model.layers.2.mlp.down_proj.weight"]  # (H, I)
    got = w["model.layers.2.mlp.experts.3.down_proj.weight"]  # copy 1, slice 1: channels [32, 64)
    torch.testing.assert_close(got, down[:, 32:] * (2 / 2.5))


# --- bad inputs --------------------------------------------------------------------------------------------------

BAD = [
    ("llama", {"architecture": "dots1"}, ["llama into dots1", "q_norm/k_norm", "glm4_moe"]),
    ("mistral", {"architecture": "dots1"}, ["mistral into dots1", "glm4_moe"]),
    ("gemma3_text", {"architecture": "glm4_moe"}, ["gemma3_text has no native", "graft"]),
    ("llama", {"architecture": "glm4_moe", "num_experts": 6, "router": {"groups": 4}},
     ["router.groups=4 does not divide num_experts=6"]),
    ("llama", {"architecture": "glm4_moe", "router": {"groups": 4}}, ["router.groups=4", "1 expert", "<= 2"]),
    ("llama", {"architecture": "glm4_moe", "granularity": 4, "num_experts": 8, "experts_per_token": 4,
               "router": {"groups": 4}}, ["router.groups=4", "slices of a copy", "granularity=4"]),
    ("llama", {"architecture": "glm4_moe", "num_experts": 8, "experts_per_token": 4,
               "router": {"groups": 4, "topk_groups": 1}}, ["router.topk_groups=1", "experts_per_token=4"]),
    ("llama", {"architecture": "glm4_moe", "router": {"topk_groups": 1}}, ["router.topk_groups=1 needs router.groups"]),
    ("llama", {"architecture": "glm4_moe", "dense_layers": 3}, ["dense_layers=3", "3 layers", "between 0 and 2"]),
    ("qwen3", {"architecture": "dots1", "dense_layers": 5}, ["dense_layers=5", "3 layers"]),
    ("qwen3", {"architecture": "qwen3_moe", "dense_layers": 3}, ["dense_layers=3"]),
    ("llama", {"architecture": "mixtral", "dense_layers": 1}, ["dense_layers=1", "mixtral has no dense layers",
                                                               "glm4_moe"]),
    ("llama", {"architecture": "glm4_moe", "moe_layers": [1, 2]}, ["moe_layers=[1, 2]", "dense_layers: k"]),
    ("llama", {"architecture": "glm4_moe", "dense_layers": 1, "moe_layers": [1, 2]}, ["keep one of them"]),
    ("llama", {"architecture": "mixtral", "router": {"scoring": "sigmoid"}},
     ["router.scoring=sigmoid", "mixtral routers use softmax", "dots1 / glm4_moe"]),
    ("qwen2", {"architecture": "qwen2_moe", "router": {"scoring": "sigmoid"}}, ["router.scoring=sigmoid", "qwen2_moe"]),
    ("qwen3", {"architecture": "qwen3_moe", "router": {"scoring": "sigmoid"}}, ["router.scoring=sigmoid", "qwen3_moe"]),
    ("qwen3", {"architecture": "dots1", "router": {"scoring": "softmax"}}, ["router.scoring=softmax", "sigmoid"]),
    ("llama", {"architecture": "mixtral", "router": {"groups": 2}}, ["router.groups=2", "no grouped routing"]),
    ("qwen3", {"architecture": "qwen3_moe", "router": {"scaling": 2.0}}, ["router.scaling=2.0", "glm4_moe"]),
    ("llama", {"architecture": "glm4_moe", "router": {"scaling": 0}}, ["scaling"]),
]


@pytest.mark.parametrize("family,fields,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_inputs_refused_before_any_weight_is_read(tmp_path, pico_factory, no_heavy_io, family, fields, words):
    body = {"source": pico_factory(family, **DIMS), **fields}
    with pytest.raises(MoemergeError) as e:
        run_upcycle(recipe(tmp_path, **body), tmp_path / "never", echo=quiet)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "never").exists()


def test_short_sliding_window_refused_for_glm4_moe(tmp_path, pico_factory, no_heavy_io):
    """glm4_moe has no sliding window: a window shorter than the context would change the maths."""
    src = pico_factory("mistral", **DIMS, sliding_window=16)
    with pytest.raises(MoemergeError, match="sliding_window=16.*mixtral"):
        run_upcycle(recipe(tmp_path, source=src, architecture="glm4_moe"), tmp_path / "never", echo=quiet)


# --- the other commands on the new families ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def glm_out(tmp_path_factory, pico_factory):
    tmp = tmp_path_factory.mktemp("glm")
    return upcycle(tmp, source=pico_factory("llama", **DIMS), architecture="glm4_moe", dense_layers=1,
                   shared_experts=1, shared_split=True)


def test_check_inspect_card_push_know_glm4_moe(glm_out):
    from mergekit_lite.check import check_folder
    from mergekit_lite.hub import push_folder
    from mergekit_lite.inspect_model import describe, describe_lines

    assert "Glm4MoeForCausalLM" in check_folder(glm_out).lines()[1]
    d = describe(glm_out)
    assert (d["experts"], d["experts_per_token"]) == (4, 2)
    # active: everything but the 2 idle routed experts of each of the 2 MoE layers (3 matrices of 32 x 32)
    assert d["active_params"] == d["total_params"] - 2 * 2 * 3 * 32 * 32
    text = "\n".join(describe_lines(d))
    assert "4 per MoE layer, top-2" in text and "router         sigmoid scores, selection bias" in text
    assert "router options: scoring sigmoid" in text  # from the sidecar record
    card = (glm_out / "README.md").read_text()
    assert "4 per MoE layer" in card and "- moe" in card and "sigmoid" in card
    lines: list[str] = []
    push_folder(glm_out, "me/glm-pico", dry_run=True, echo=lines.append)
    assert lines[-1].startswith("dry run: nothing was sent") and any("config.json" in x for x in lines)


def test_check_catches_a_missing_selection_bias(tmp_path, glm_out):
    import shutil

    from mergekit_lite.check import check_folder

    broken = tmp_path / "broken"
    shutil.copytree(glm_out, broken)
    shard = next(broken.glob("*.safetensors"))
    with safe_open(shard, "pt") as f:
        meta = f.metadata()
    w = load_file(shard)
    del w["model.layers.2.mlp.gate.e_score_correction_bias"]
    save_file(w, shard, metadata=meta)
    index = broken / "model.safetensors.index.json"
    if index.exists():
        body = json.loads(index.read_text())
        body["weight_map"].pop("model.layers.2.mlp.gate.e_score_correction_bias")
        index.write_text(json.dumps(body))
    with pytest.raises(MoemergeError, match=r"e_score_correction_bias"):
        check_folder(broken)


def test_recipe_schema_round_trip():
    r = UpcycleRecipe.model_validate({"source": "x", "architecture": "glm4_moe", "num_experts": 8,
                                      "experts_per_token": 2, "dense_layers": 1,
                                      "router": {"scoring": "sigmoid", "groups": 4, "topk_groups": 2}})
    assert (r.router.groups, r.router.topk_groups, r.dense_layers) == (4, 2, 1)


def test_plan_reads_no_weight_bytes(tmp_path, pico_factory, no_heavy_io):
    path = recipe(tmp_path, source=pico_factory("qwen3", **DIMS), architecture="dots1", dense_layers=1)
    plan, readers = plan_upcycle(load_recipe(path, UpcycleRecipe))
    assert plan.config["first_k_dense_replace"] == 1
    assert sum(1 for op in plan.ops if op.key.endswith("e_score_correction_bias")) == 2


# --- graft of a glm4_moe: first_k_dense_replace keeps meaning "the first k layers are dense" ------------------------

def _graft(tmp_path: Path, name: str, slices: list) -> Path:
    from mergekit_lite.ops.graft import run_graft

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"slices": [{"model": str(m), "layers": list(r), "identity": idy}
                                               for m, r, idy in slices], "dtype": "float32"}))
    out = tmp_path / name
    run_graft(path, out, echo=quiet, progress=False)
    return out


def test_graft_glm4_moe_keeps_the_dense_prefix(tmp_path, glm_out):
    from mergekit_lite.check import check_folder

    # glm_out: layer 0 dense, layers 1-2 MoE; SOLAR-like 0,1 + 1,2 -> one dense layer first
    solar = _graft(tmp_path, "solar", [(glm_out, (0, 2), False), (glm_out, (1, 3), False)])
    assert config_of(solar)["first_k_dense_replace"] == 1 and config_of(solar)["num_hidden_layers"] == 4
    check_folder(solar)  # the class built from the config expects exactly the tensors written
    # an identity copy of the dense layer 0 right after it: two dense layers, and the logits do not move
    grown = _graft(tmp_path, "grown", [(glm_out, (0, 1), False), (glm_out, (0, 1), True), (glm_out, (1, 3), False)])
    assert config_of(grown)["first_k_dense_replace"] == 2
    check_folder(grown)
    assert compare_logits(grown, glm_out, device="cpu").max_abs <= TOL


def test_graft_refuses_a_dense_layer_after_moe_layers(tmp_path, glm_out, no_heavy_io):
    with pytest.raises(MoemergeError, match=r"first_k_dense_replace: glm4_moe keeps dense FFNs only in its first "
                                            r"layers.*dense layer 0 .* at output layer 2"):
        _graft(tmp_path, "bad", [(glm_out, (1, 3), False), (glm_out, (0, 1), False)])
    assert not (tmp_path / "bad").exists()


RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "upcycle"
SHIPPED = {"llama-to-glm4moe.yaml": "llama", "qwen3-to-dots1.yaml": "qwen3", "qwen3-to-dots1-deepseek.yaml": "qwen3"}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_recipes_keep_parity_on_a_pico_source(tmp_path, pico_factory, name):
    """The shipped glm4_moe / dots1 recipes, pointed at a pico model of their source family, give parity."""
    body = yaml.safe_load((RECIPES / name).read_text())
    dense = pico_factory(SHIPPED[name])
    out = upcycle(tmp_path, **{**body, "source": dense, "dtype": "float32"})
    assert compare_logits(out, dense, device="cpu").max_abs <= TOL

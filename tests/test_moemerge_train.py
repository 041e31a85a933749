"""`moemerge train` and `moemerge graft` on `architecture: moemerge` folders (issue 26): validation loss drops, router
losses and routing policies act on the project's router, aux-loss-free balancing moves the saved selection bias
(softmax and sigmoid scoring), LoRA reaches the routed experts, and the final/ and grafted folders are moemerge
folders again (own custom code, same key layout) that load where the parity promises say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import die_at_first_checkpoint
from safetensors.torch import load_file

from mergekit_lite.models import code_status, load_causal_lm
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.pico import build_pico_model
from mergekit_lite.recipe import TrainRecipe, validate_recipe
from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus
from mergekit_lite.train.loop import train
from mergekit_lite.train.moe import RouterTap, find_routers

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def mworld(tmp_path_factory):
    """A corpus, a dense pico Gemma3 with a tokenizer trained on it, and its moemerge upcycles (noise: experts
    differ, so routing matters to the loss), softmax and sigmoid."""
    root = tmp_path_factory.mktemp("mtrain")
    train_txt, val_txt = write_corpus(root / "corpus")
    dense = build_pico_model("gemma3_text", root / "dense", texts=stdlib_docstrings(), head_dim=8, **SMALL)
    out = {"root": root, "dense": dense, "train": str(train_txt), "val": str(val_txt)}
    for scoring in ("softmax", "sigmoid"):
        (root / f"{scoring}.yaml").write_text(yaml.safe_dump({
            "source": str(dense), "architecture": "moemerge", "num_experts": 4, "experts_per_token": 2,
            "dtype": "float32", "seed": 3, "noise": 0.3, "router": {"scoring": scoring}}))
        run_upcycle(root / f"{scoring}.yaml", root / scoring, echo=quiet, progress=False)
        out[scoring] = root / scoring
    return out


def recipe(w, out: Path, model: Path, **kw) -> TrainRecipe:
    body = {"model": str(model), "data": {"train": [w["train"]], "validation": [w["val"]]}, "seq_len": 32,
            "micro_batch_size": 8, "max_steps": 12, "learning_rate": 3e-3, "warmup_steps": 2, "eval_batches": 4,
            "output": str(out), **kw}
    return validate_recipe(body, TrainRecipe)


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_router_found_and_scoring_read(mworld):
    model = load_causal_lm(mworld["sigmoid"], dtype=torch.float32)
    assert [n for n, _ in find_routers(model)] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    tap = RouterTap(model)
    assert tap.native_bias and all(t.scoring.sigmoid for t in tap.tapped)
    soft = RouterTap(load_causal_lm(mworld["softmax"], dtype=torch.float32))
    assert soft.native_bias and not any(t.scoring.sigmoid for t in soft.tapped)


def test_val_loss_drops_and_final_is_a_moemerge_folder(mworld, tmp_path):
    out = tmp_path / "run"
    summary = train(recipe(mworld, out, mworld["softmax"], max_steps=20, eval_every=10,
                           moe={"balance_coef": 0.01, "z_coef": 0.001}), echo=quiet)
    vals = records(out, "val")
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.3
    final = out / "final"
    assert code_status(final) == "own"
    assert set(load_file(final / "model.safetensors")) == set(load_file(mworld["softmax"] / "model.safetensors"))
    # the saved folder is the trained model: its validation loss is the one train reported
    assert records(out, "train")[-1]["balance"] > 0 and records(out, "train")[-1]["z"] > 0
    model = load_causal_lm(final, dtype=torch.float32)
    from transformers import AutoTokenizer

    from mergekit_lite.train.loaders import build_loaders
    from mergekit_lite.train.loop import causal_lm_loss

    class One:
        num_processes, is_main_process = 1, True

        @staticmethod
        def wait_for_everyone():
            pass

    r = recipe(mworld, out, final)
    _, val_dl = build_loaders(r, AutoTokenizer.from_pretrained(str(final)), final, One, 1)
    with torch.no_grad():
        losses = [causal_lm_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"])
                  for _, b in zip(range(4), val_dl)]
    assert abs(torch.stack(losses).mean().item() - summary["final_val_loss"]) < 1e-4


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_balancing_moves_the_saved_selection_bias(mworld, tmp_path, scoring):
    out = tmp_path / "run"
    train(recipe(mworld, out, mworld[scoring], max_steps=6, learning_rate=1e-2,
                 moe={"balance_coef": 0.0, "bias_update_rate": 0.05}), echo=quiet)
    state = load_file(out / "final" / "model.safetensors")
    biases = {k: v for k, v in state.items() if k.endswith("e_score_correction_bias")}
    # sign steps of 0.05 (they may cancel out on a layer whose load happens to balance)
    assert len(biases) == 2 and any(v.abs().sum() > 0 for v in biases.values()), biases
    assert all(torch.allclose(v / 0.05, (v / 0.05).round(), atol=1e-4) for v in biases.values())


@pytest.mark.parametrize("moe", [{"routing": "switch", "train_top_k": 1, "capacity_factor": 1.0},
                                 {"routing": "gshard", "capacity_factor": 1.0, "drop_policy": "probs"},
                                 {"routing": "noisy_topk"}], ids=["switch-capacity", "gshard", "noisy"])
def test_routing_policies_train(mworld, tmp_path, moe):
    out = tmp_path / "run"
    summary = train(recipe(mworld, out, mworld["softmax"], max_steps=4, moe=moe), echo=quiet)
    assert torch.isfinite(torch.tensor(summary["final_val_loss"]))
    router = records(out, "router")[-1]
    if "capacity_factor" in moe:
        assert max(router["dropped"]) > 0  # capacity 1.0 drops some assignments of a skewed router
    state = load_file(out / "final" / "model.safetensors")
    assert not any("moemerge_noise" in k for k in state)  # W_noise is training-only


def test_lora_on_routed_experts(mworld, tmp_path):
    out = tmp_path / "run"
    train(recipe(mworld, out, mworld["softmax"], max_steps=4, learning_rate=1e-2, trainable="lora",
                 lora={"r": 2, "alpha": 4, "target_modules": ["gate_proj", "up_proj", "down_proj"]}), echo=quiet)
    before = load_file(mworld["softmax"] / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert set(after) == set(before)
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert not torch.equal(after[key], before[key])  # the adapter on the expert was merged
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(after[q], before[q])


def test_routers_plus_experts_freezes_attention(mworld, tmp_path):
    out = tmp_path / "run"
    train(recipe(mworld, out, mworld["softmax"], max_steps=3, trainable="routers+experts"), echo=quiet)
    before = load_file(mworld["softmax"] / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(after[k], before[k])
    assert not torch.equal(after["model.layers.0.mlp.gate.weight"], before["model.layers.0.mlp.gate.weight"])
    assert not torch.equal(after["model.layers.0.mlp.experts.0.up_proj.weight"],
                           before["model.layers.0.mlp.experts.0.up_proj.weight"])


def test_resume_is_bit_for_bit(mworld, tmp_path, monkeypatch):
    """Killed at a checkpoint and resumed: losses, router load, the moved selection bias and final/ are the
    uninterrupted run's, bit for bit (jitter and noisy routing on, so the RNG state matters too)."""
    from mergekit_lite.errors import MoemergeError

    kw = dict(max_steps=6, checkpoint_every=3, log_every=2, moe={"jitter": 0.5, "bias_update_rate": 0.05,
                                                                 "routing": "noisy_topk"})
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(recipe(mworld, full, mworld["sigmoid"], **kw), echo=quiet)
    die_at_first_checkpoint(monkeypatch, lambda: train(recipe(mworld, cut, mworld["sigmoid"], **kw), echo=quiet))
    with pytest.raises(MoemergeError, match="--resume"):
        train(recipe(mworld, cut, mworld["sigmoid"], **kw), echo=quiet)
    train(recipe(mworld, cut, mworld["sigmoid"], **kw), resume=True, echo=quiet)

    def rows(out, kind):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(out, kind)]

    for kind in ("train", "router", "val"):
        assert rows(full, kind) == rows(cut, kind), kind
    a, b = (load_file(d / "final" / "model.safetensors") for d in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("e_score_correction_bias"))


def test_edited_model_refused_before_training(mworld, tmp_path):
    import shutil

    from mergekit_lite.errors import MoemergeError

    edited = tmp_path / "edited"
    shutil.copytree(mworld["softmax"], edited)
    (edited / "modeling_moemerge.py").write_text((edited / "modeling_moemerge.py").read_text() + "\n# edited\n")
    with pytest.raises(MoemergeError, match="trust_remote_code: true"):
        train(recipe(mworld, tmp_path / "run", edited, max_steps=3), echo=quiet)
    assert not (tmp_path / "run").exists()


def sliced_moe(tmp_path: Path, moe: Path) -> Path:
    """A 3-layer moemerge model (dense, MoE, MoE) grafted from the 2-layer one."""
    from mergekit_lite.ops.graft import run_graft

    recipe_path = tmp_path / "three.yaml"
    recipe_path.write_text(yaml.safe_dump({"slices": [{"model": str(moe), "layers": [0, 2]},
                                                      {"model": str(moe), "layers": [1, 2]}]}))
    run_graft(recipe_path, tmp_path / "three", echo=quiet, progress=False)
    return tmp_path / "three"


# --- graft -----------------------------------------------------------------------------------------------------------

def test_graft_expand_drop_and_slices_on_moemerge_folders(mworld, tmp_path):
    """--expand keeps the logits (identity blocks zero o_proj, every expert's and the dense FFN's down_proj);
    --drop and slices write moemerge folders whose nested config follows the layers (Gemma3 layer_types,
    mlp_only_layers), with the custom code carried along."""
    from mergekit_lite.check import check_folder
    from mergekit_lite.ops.graft import run_graft
    from mergekit_lite.verify import compare_logits

    src = tmp_path / "src.yaml"  # layer 0 dense, 1 MoE with a shared expert: every kind of FFN
    src.write_text(yaml.safe_dump({"source": str(mworld["dense"]), "architecture": "moemerge", "num_experts": 4,
                                   "experts_per_token": 2, "dtype": "float32", "noise": 0.3, "dense_layers": 1,
                                   "shared_experts": 1, "shared_split": True}))
    moe = tmp_path / "moe"
    run_upcycle(src, moe, echo=quiet, progress=False)
    expanded = tmp_path / "expanded"
    run_graft(moe, expanded, expand=2, echo=quiet, progress=False)
    cfg = json.loads((expanded / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 4 and cfg["mlp_only_layers"] == [0, 1]
    assert len(cfg["text_config"]["layer_types"]) == 4 and "num_hidden_layers" not in cfg
    assert code_status(expanded) == "own"
    assert compare_logits(expanded, moe, device="cpu").max_abs <= 1e-4
    check_folder(expanded)
    dropped = tmp_path / "dropped"
    run_graft(sliced_moe(tmp_path, moe), dropped, drop=1, echo=quiet, progress=False)  # 0, 1, 2 then 1, 2
    cfg = json.loads((dropped / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0] and cfg["text_config"]["num_hidden_layers"] == 4
    check_folder(dropped)
    model = load_causal_lm(dropped, dtype=torch.float32)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["Gemma3MLP"] + ["MoemergeSparseBlock"] * 3
    sliced = tmp_path / "slices.yaml"  # MoE layer first, then the dense one
    sliced.write_text(yaml.safe_dump({"slices": [{"model": str(moe), "layers": [1, 2]},
                                                 {"model": str(moe), "layers": [0, 1]}]}))
    run_graft(sliced, tmp_path / "sliced", echo=quiet, progress=False)
    assert json.loads((tmp_path / "sliced" / "config.json").read_text())["mlp_only_layers"] == [1]
    check_folder(tmp_path / "sliced")


def test_routers_only_on_identical_experts_warns(tmp_path, mworld):
    """A plain upcycle (identical per-expert modules) is recognised: `trainable: routers` would change nothing."""
    from mergekit_lite.train.model import identical_expert_layers, routers_only_note

    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"source": str(mworld["dense"]), "architecture": "moemerge",
                                                          "num_experts": 4, "experts_per_token": 2}))
    run_upcycle(tmp_path / "plain.yaml", tmp_path / "plain", echo=quiet, progress=False)
    assert identical_expert_layers(load_causal_lm(tmp_path / "plain")) == 2
    assert routers_only_note(load_causal_lm(tmp_path / "plain"), "routers").startswith("warning: 2 MoE layer(s)")
    assert identical_expert_layers(load_causal_lm(mworld["softmax"])) == 0  # noise: experts differ

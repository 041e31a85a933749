"""LoRA on MoE models: the FFN names reach the fused routed experts, merge = base + adapter, bad names refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_lite.errors import MoemergeError
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.pico import build_pico_model
from mergekit_lite.recipe import LoraSettings, TrainRecipe, validate_recipe
from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus
from mergekit_lite.train.loop import train
from mergekit_lite.train.model import lora_targets

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FFN = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dense pico Llama and its 4-expert upcycles to Mixtral and Qwen2-MoE (empty shared expert)."""
    root = tmp_path_factory.mktemp("lora")
    train_txt, val_txt = write_corpus(root / "corpus")
    dense = build_pico_model("llama", root / "dense", texts=stdlib_docstrings(), **SMALL)
    w = {"dense": dense, "train": str(train_txt), "val": str(val_txt)}
    for arch in ("mixtral", "qwen2_moe"):
        (root / f"{arch}.yaml").write_text(yaml.safe_dump({"source": str(dense), "architecture": arch,
                                                           "num_experts": 4, "experts_per_token": 2,
                                                           "dtype": "float32", "seed": 3}))
        run_upcycle(root / f"{arch}.yaml", root / arch, echo=lambda s: None)
        w[arch] = root / arch
    return w


def recipe(world, model: Path, out: Path, **kw) -> TrainRecipe:
    body = {"model": str(model), "data": {"train": [world["train"]], "validation": [world["val"]]},
            "seq_len": 32, "micro_batch_size": 8, "max_steps": 4, "learning_rate": 3e-2, "eval_batches": 1,
            "trainable": "lora", "output": str(out), **kw}
    return validate_recipe(body, TrainRecipe)


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def quiet(*_):
    pass


@pytest.mark.parametrize("arch,expert", [("mixtral", ".block_sparse_moe.experts."), ("qwen2_moe", ".mlp.experts.")])
def test_lora_on_routed_experts_changes_them_and_final_is_base_plus_adapter(world, tmp_path, arch, expert):
    from peft import PeftModel

    out = tmp_path / arch
    train(recipe(world, world[arch], out, lora={"r": 2, "alpha": 4, "target_modules": FFN}), echo=quiet)
    base = load_file(str(world[arch] / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))
    assert final.keys() == base.keys()
    routed = [k for k in base if expert in k]
    assert len(routed) == 2 * 4 * 3  # layers x experts x (gate, up, down), per expert on disk
    changed = {k for k in base if not torch.equal(base[k], final[k])}
    assert changed == set(routed)  # every routed expert matrix moved; attention, norms, routers did not
    assert min((final[k] - base[k]).abs().max().item() for k in routed) > 1e-4
    # OUTPUT/final is exactly the reloaded base with the saved adapter merged in
    merged = PeftModel.from_pretrained(load(world[arch]), str(out / "adapter")).merge_and_unload().state_dict()
    saved = load(out / "final").state_dict()
    assert saved.keys() == merged.keys()
    assert max((saved[k] - merged[k]).abs().max().item() for k in saved if saved[k].numel()) <= 1e-5


def test_names_resolve_per_family(world):
    mixtral, qwen, dense = load(world["mixtral"]), load(world["qwen2_moe"]), load(world["dense"])
    experts = ["experts.down_proj", "experts.gate_up_proj"]
    lora = LoraSettings(target_modules=["q_proj", "w1", "w3", "w2"])
    assert lora_targets(mixtral, lora) == {"target_modules": ["q_proj"], "target_parameters": experts}
    # Qwen2-MoE: the upcycle's zero-sized shared expert is left out, the routed experts are reached
    assert lora_targets(qwen, LoraSettings(target_modules=FFN)) == {"target_modules": [], "target_parameters": experts}
    assert lora_targets(qwen, LoraSettings(target_modules=["gate_up_proj"]))["target_parameters"] == ["gate_up_proj"]
    assert lora_targets(dense, LoraSettings(target_modules=FFN)) == {"target_modules": FFN, "target_parameters": None}


@pytest.mark.parametrize("arch,names,extra,needle", [
    ("mixtral", ["q_proj", "gate"], {}, r"'gate' matches nothing in this model; valid names: Linear modules "
                                        r"\['k_proj', 'lm_head', 'o_proj', 'q_proj', 'v_proj'\]; fused expert "
                                        r"parameters \['experts.down_proj', 'experts.gate_up_proj'\]"),
    ("qwen2_moe", ["shared_expert.gate_proj"], {}, r"matches only zero-sized modules \(model.layers.0.mlp."
                                                   r"shared_expert.gate_proj: \(0, 32\)\)"),
    ("mixtral", ["gate_proj", "down_proj"], {}, "'gate_proj' and 'up_proj' are one fused tensor"),
    ("qwen2_moe", FFN, {"dropout": 0.1}, r"lora.dropout = 0.1: peft cannot apply dropout to fused expert"),
])
def test_bad_target_modules_refused_before_training(world, tmp_path, arch, names, extra, needle):
    out = tmp_path / "bad"
    with pytest.raises(MoemergeError, match=needle):
        train(recipe(world, world[arch], out, lora={"target_modules": names, **extra}), echo=quiet)
    assert not (out / "metrics.jsonl").exists()

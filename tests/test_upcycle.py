"""`moemerge upcycle`: every supported pair loads in transformers and reproduces the dense logits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.verify import compare_logits

PAIRS = [
    ("llama", "mixtral", {}),
    ("mistral", "mixtral", {"sliding_window": 8}),
    ("llama", "qwen2_moe", {}),
    ("mistral", "qwen2_moe", {"sliding_window": 8}),
    ("qwen2", "qwen2_moe", {}),
    ("qwen3", "qwen3_moe", {}),
]


def write_recipe(tmp_path: Path, **fields) -> Path:
    body = {"num_experts": 4, "experts_per_token": 2, "router": {"init": "random"}, "dtype": "float32", **fields}
    body["source"] = str(body["source"])
    path = tmp_path / f"recipe-{hashlib.md5(repr(sorted(body.items())).encode()).hexdigest()[:6]}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def upcycle(tmp_path: Path, source: Path, out_name: str = "out", **fields) -> Path:
    out = tmp_path / out_name
    run_upcycle(write_recipe(tmp_path, source=source, **fields), out, echo=lambda s: None)
    return out


def keys_of(folder: Path) -> dict[str, tuple]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


@pytest.mark.parametrize("family,target,extra", PAIRS, ids=[f"{a}->{b}" for a, b, _ in PAIRS])
def test_parity_every_pair(tmp_path, pico_factory, family, target, extra):
    dense = pico_factory(family, **extra)
    out = upcycle(tmp_path, dense, architecture=target, num_experts=4, experts_per_token=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == target
    report = compare_logits(out, dense, device="cpu")
    assert report.max_abs <= 1e-4, report.lines()
    assert report.top1_agreement == 1.0


def test_auto_target_and_hub_key_layout(tmp_path, pico_llama):
    out = upcycle(tmp_path, pico_llama, architecture="auto", num_experts=4, experts_per_token=2)
    keys = keys_of(out)
    h, i = 64, 128
    assert keys["model.layers.0.block_sparse_moe.gate.weight"] == (4, h)
    for e in range(4):
        assert keys[f"model.layers.3.block_sparse_moe.experts.{e}.w1.weight"] == (i, h)
        assert keys[f"model.layers.3.block_sparse_moe.experts.{e}.w2.weight"] == (h, i)
        assert keys[f"model.layers.3.block_sparse_moe.experts.{e}.w3.weight"] == (i, h)
    assert not any(".mlp." in k for k in keys), "dense FFN keys must not survive"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (4, 2, i)


def test_experts_are_exact_copies_and_router_std(tmp_path, pico_llama):
    out = upcycle(tmp_path, pico_llama, num_experts=4, experts_per_token=1, router={"init": "random", "std": 0.5})
    with safe_open(str(pico_llama / "model.safetensors"), "pt") as d, safe_open(str(out / "model.safetensors"), "pt") as m:
        for e in range(4):
            for w, p in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
                assert torch.equal(m.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"),
                                   d.get_tensor(f"model.layers.1.mlp.{p}_proj.weight"))
        assert torch.equal(m.get_tensor("model.layers.2.self_attn.q_proj.weight"),
                           d.get_tensor("model.layers.2.self_attn.q_proj.weight"))
        router = torch.cat([m.get_tensor(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(4)])
    assert 0.4 < router.std().item() < 0.6


def test_router_inits(tmp_path, pico_llama):
    zeros = upcycle(tmp_path, pico_llama, "z", router={"init": "zeros"})
    uni = upcycle(tmp_path, pico_llama, "u", router={"init": "uniform", "bound": 0.25})
    with safe_open(str(zeros / "model.safetensors"), "pt") as z, safe_open(str(uni / "model.safetensors"), "pt") as u:
        assert torch.count_nonzero(z.get_tensor("model.layers.0.block_sparse_moe.gate.weight")) == 0
        r = u.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert r.abs().max() <= 0.25 and r.abs().max() > 0.2


def test_same_seed_byte_identical_other_seed_differs(tmp_path, pico_llama):
    a = upcycle(tmp_path, pico_llama, "a", seed=7)
    b = upcycle(tmp_path, pico_llama, "b", seed=7)
    c = upcycle(tmp_path, pico_llama, "c", seed=8)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


def test_sharded_input_bf16_and_sharded_output(tmp_path, pico_factory):
    dense = pico_factory("llama", dtype=torch.bfloat16, max_shard_size="40KB")
    assert (dense / "model.safetensors.index.json").exists()
    out = upcycle(tmp_path, dense, dtype="source", shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(
        torch.tensor(s).prod().item() * 2 for s in keys_of(out).values())
    for s in shards:  # size cap holds (a single tensor larger than the cap would get its own shard)
        assert s.stat().st_size <= 200_000 + 10_000
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ref = upcycle(tmp_path, dense, "fp32", dtype="float32")
    assert compare_logits(ref, dense, device="cpu").max_abs <= 1e-4
    assert compare_logits(out, dense, device="cpu").max_abs <= 1e-4  # both sides upcast from the same bf16


def test_dtype_conversion_fp16_source_to_bf16(tmp_path, pico_factory):
    dense = pico_factory("llama", dtype=torch.float16)
    out = upcycle(tmp_path, dense, dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as m, safe_open(str(dense / "model.safetensors"), "pt") as d:
        t = m.get_tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight")
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, d.get_tensor("model.layers.0.mlp.down_proj.weight").to(torch.bfloat16))
        assert m.get_tensor("model.layers.0.block_sparse_moe.gate.weight").dtype == torch.bfloat16


def test_tied_embeddings(tmp_path, pico_factory):
    dense = pico_factory("qwen2", tied=True)
    out = upcycle(tmp_path, dense, architecture="qwen2_moe")
    assert "lm_head.weight" not in keys_of(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert compare_logits(out, dense, device="cpu").max_abs <= 1e-4


def test_config_carried_and_side_files(tmp_path, pico_factory):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    dense = pico_factory("qwen3", rope_parameters=rope, max_position_embeddings=512)
    (dense / "chat_template.jinja").write_text("{{ messages }}")
    out = upcycle(tmp_path, dense)
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((dense / "config.json").read_text())
    assert cfg["rope_parameters"] == src["rope_parameters"]
    for k in ("max_position_embeddings", "rms_norm_eps", "head_dim", "bos_token_id", "eos_token_id",
              "tie_word_embeddings", "attention_bias", "num_key_value_heads"):
        assert cfg[k] == src[k], k
    assert cfg["norm_topk_prob"] is True and cfg["num_experts"] == 4 and cfg["moe_intermediate_size"] == 128
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (dense / name).read_bytes()
    assert compare_logits(out, dense, device="cpu").max_abs <= 1e-4


def test_bin_checkpoint_weights_only(tmp_path, pico_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(pico_llama))
    legacy = tmp_path / "legacy"
    model.save_pretrained(legacy, safe_serialization=False) if _supports_bin() else _save_bin(model, legacy)
    out = upcycle(tmp_path, legacy)
    assert compare_logits(out, pico_llama, device="cpu").max_abs <= 1e-4


def _supports_bin() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _save_bin(model, folder: Path) -> None:
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_dry_run_writes_nothing(tmp_path, pico_llama):
    lines: list[str] = []
    plan = run_upcycle(write_recipe(tmp_path, source=pico_llama, num_experts=8),
                       tmp_path / "never", dry_run=True, echo=lines.append)
    assert not (tmp_path / "never").exists()
    text = "\n".join(lines)
    assert "active per token" in text and "output bytes" in text
    h, i, n = 64, 128, 4
    assert plan.total_params - plan.active_params == n * (8 - 2) * 3 * h * i

"""`moemerge graft`: SOLAR depth up-scaling, layer slices, identity expansion, config rewriting, bad inputs."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergekit_lite.arch.layers import remap_layers
from mergekit_lite.cli import app
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.ops.graft import run_graft
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.verify import compare_logits

PICO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=8)
MOE_KW = {  # pico MoE sources of every family the project writes, with dense layers where the family allows
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, decoder_sparse_step=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1, 2]),
}


def quiet(*_):
    pass


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def layer(sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    head = f"model.layers.{i}."
    return {k[len(head):]: v for k, v in sd.items() if k.startswith(head)}


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def llama8(pico_factory):
    return pico_factory("llama", **PICO)


@pytest.fixture(scope="module")
def gemma8(pico_factory):
    return pico_factory("gemma3_text", **PICO)


def test_solar_layers_config_and_load(tmp_path, llama8):
    out = tmp_path / "solar"
    plan = run_graft(llama8, out, drop=2, echo=quiet)
    assert plan.config["num_hidden_layers"] == 12 and config(out)["num_hidden_layers"] == 12
    src, got = tensors(llama8), tensors(out)
    expected = [*range(0, 6), *range(2, 8)]  # first n-m layers, then the last n-m of the copy
    for o, i in enumerate(expected):
        a, b = layer(got, o), layer(src, i)
        assert a.keys() == b.keys(), o
        for rel in a:
            assert torch.equal(a[rel], b[rel]), f"output layer {o} {rel} != source layer {i}"
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[k], src[k])
    assert len(got) == len(layer(src, 0)) * 12 + 3
    record = read_sidecar(out)
    assert record["kind"] == "graft" and record["new_layers"] == [] and record["slices"] == [
        f"{llama8}: layers [0, 6)", f"{llama8}: layers [2, 8)"]
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    report = compare_logits(out, llama8, device="cpu")  # loads in transformers despite 12 vs 8 layers
    assert 0 < report.max_abs < float("inf")


def test_repeated_layers_own_their_bytes(tmp_path, llama8):
    """SOLAR repeats layers 2..5; each repeat must be separate data in the file, not an alias."""
    out = tmp_path / "solar"
    run_graft(llama8, out, drop=2, echo=quiet)
    raw = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two entries share bytes"
    key = "model.layers.{}.self_attn.q_proj.weight"
    assert header[key.format(2)]["data_offsets"] != header[key.format(6)]["data_offsets"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    w2, w6 = model.model.layers[2].self_attn.q_proj.weight, model.model.layers[6].self_attn.q_proj.weight
    assert torch.equal(w2, w6) and w2.data_ptr() != w6.data_ptr()
    with torch.no_grad():
        w2.add_(1.0)
    assert not torch.equal(w2, w6), "editing one repeat changed the other"


def test_expand_dense_parity_and_new_layers(tmp_path, llama8):
    out = tmp_path / "pro"
    plan = run_graft(llama8, out, expand=2, echo=quiet)
    assert config(out)["num_hidden_layers"] == 10
    new = read_sidecar(out)["new_layers"]
    assert new == [4, 9]  # groups [0,4) and [4,8), each followed by a copy of its last block
    got, src = tensors(out), tensors(llama8)
    for o, i in ((4, 3), (9, 7)):
        blk = layer(got, o)
        assert not blk["self_attn.o_proj.weight"].any() and not blk["mlp.down_proj.weight"].any()
        assert torch.equal(blk["self_attn.q_proj.weight"], layer(src, i)["self_attn.q_proj.weight"])
    assert {op.role for op in plan.ops if op.fn == "zeros"} == {"identity-zero"}
    report = compare_logits(out, llama8, device="cpu")
    assert report.max_abs <= 1e-5 and report.top1_agreement == 1.0


def test_gemma3_layer_types_follow_and_identity_holds(tmp_path, gemma8):
    src_types = config(gemma8)["layer_types"]
    assert len(set(src_types)) == 2  # a sliding/full pattern, not uniform
    run_graft(gemma8, tmp_path / "solar", drop=2, echo=quiet)
    assert config(tmp_path / "solar")["layer_types"] == src_types[:6] + src_types[2:]
    run_graft(gemma8, tmp_path / "pro", expand=4, echo=quiet)
    want = [t for j in range(0, 8, 2) for t in (src_types[j], src_types[j + 1], src_types[j + 1])]
    assert config(tmp_path / "pro")["layer_types"] == want
    # the sandwich post-norms of a zero update stay zero: identity blocks are exact in Gemma3 too
    report = compare_logits(tmp_path / "pro", gemma8, device="cpu")
    assert report.max_abs <= 1e-5 and report.top1_agreement == 1.0
    assert compare_logits(tmp_path / "solar", gemma8, device="cpu").max_abs > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_expand_moe_parity(tmp_path, pico_factory, family):
    if family == "mixtral":  # the Mixtral the project writes: upcycled from a dense Llama
        dense = pico_factory("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4)
        src = tmp_path / "moe"
        recipe = tmp_path / "up.yaml"
        recipe.write_text(yaml.safe_dump({"source": str(dense), "num_experts": 4, "experts_per_token": 2}))
        run_upcycle(recipe, src, echo=quiet)
    else:
        src = pico_factory(family, hidden_size=32, intermediate_size=64, num_hidden_layers=4, **MOE_KW[family])
    out = tmp_path / "pro"
    plan = run_graft(src, out, expand=2, echo=quiet)
    blk = layer(tensors(out), 2)  # identity copy of layer 1
    zeroed = sorted(k for k, v in blk.items() if not v.any() and v.numel())
    if family == "qwen3_moe":  # layer 1 is dense there (mlp_only_layers)
        assert zeroed == ["mlp.down_proj.weight", "self_attn.o_proj.weight"]
        assert config(out)["mlp_only_layers"] == [1, 2, 3]
    else:
        downs = [k for k in blk if k.endswith(("w2.weight", "experts.0.down_proj.weight", "experts.1.down_proj.weight",
                                               "experts.2.down_proj.weight", "experts.3.down_proj.weight",
                                               "shared_expert.down_proj.weight"))]
        assert set(downs) <= set(zeroed) and len(downs) >= 4
    if family == "qwen2_moe":  # step 2 made layers 0 and 2 dense; now explicit for the moved layers
        assert config(out)["mlp_only_layers"] == [0, 3] and config(out)["decoder_sparse_step"] == 1
    assert plan.active_params < plan.total_params
    if family == "mixtral":  # upcycle then graft: the sidecar keeps both steps
        assert [s["step"] for s in read_sidecar(out)["lineage"]] == ["source", "upcycle", "graft"]
    report = compare_logits(out, src, device="cpu")
    assert report.max_abs <= 1e-5 and report.top1_agreement == 1.0


def test_graft_then_upcycle_keeps_dense_logits(tmp_path, pico_factory):
    dense = pico_factory("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4, tied=True)
    pro = tmp_path / "pro"
    run_graft(dense, pro, expand=1, echo=quiet)
    assert "lm_head.weight" not in tensors(pro)  # tied: the head is the embedding matrix
    recipe = tmp_path / "up.yaml"
    recipe.write_text(yaml.safe_dump({"source": str(pro), "num_experts": 4, "experts_per_token": 2}))
    run_upcycle(recipe, tmp_path / "moe", echo=quiet)
    assert config(tmp_path / "moe")["num_hidden_layers"] == 5
    report = compare_logits(tmp_path / "moe", dense, device="cpu")
    assert report.max_abs <= 1e-4 and report.top1_agreement == 1.0


def test_two_model_slices_recipe(tmp_path, pico_factory, llama8):
    other = pico_factory("llama", seed=7, **PICO)
    recipe = tmp_path / "slices.yaml"
    recipe.write_text(yaml.safe_dump({
        "slices": [{"model": str(llama8), "layers": [0, 4]}, {"model": str(other), "layers": [2, 8]}],
        "embeddings_from": "first", "head_from": "last", "shard_size": "100KB"}))
    out = tmp_path / "grafted"
    result = CliRunner().invoke(app, ["graft", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    a, b, got = tensors(llama8), tensors(other), tensors(out)
    for o, (sd, i) in enumerate([(a, 0), (a, 1), (a, 2), (a, 3), *[(b, j) for j in range(2, 8)]]):
        assert all(torch.equal(v, layer(sd, i)[rel]) for rel, v in layer(got, o).items()), o
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert read_sidecar(out)["recipe"] == recipe.read_text()


def test_remap_per_layer_fields():
    """Qwen2 sliding-window boundary and Qwen-MoE sparse steps become explicit per-layer values."""
    qwen2 = {"model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
             "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}
    cfg = remap_layers([qwen2], [(0, 0), (0, 1), (0, 2), (0, 1), (0, 3)])
    assert cfg["layer_types"] == ["full_attention"] * 2 + ["sliding_attention", "full_attention", "sliding_attention"]
    assert cfg["max_window_layers"] == 2 and cfg["num_hidden_layers"] == 5
    moe = {"model_type": "qwen3_moe", "num_hidden_layers": 6, "hidden_size": 32, "num_attention_heads": 4,
           "num_experts": 4, "decoder_sparse_step": 3, "mlp_only_layers": [2]}
    cfg = remap_layers([moe], [(0, i) for i in (0, 1, 2, 3, 4, 5, 5)])  # sparse: layers 2 and 5 by step; 2 is listed
    assert cfg["mlp_only_layers"] == [0, 1, 2, 3, 4] and cfg["decoder_sparse_step"] == 1


def test_dry_run_writes_nothing(tmp_path, llama8):
    lines: list[str] = []
    plan = run_graft(llama8, tmp_path / "o", expand=4, dry_run=True, echo=lines.append)
    assert not (tmp_path / "o").exists() and plan.config["num_hidden_layers"] == 12
    assert any("identity-zero" in s for s in lines)


def fails(tmp_path: Path, target, *needles: str, **kw) -> None:
    out = kw.pop("output", tmp_path / "out")
    existed = out.exists()
    with pytest.raises(MoemergeError) as exc:
        run_graft(target, out, echo=quiet, **kw)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)
    assert out.exists() == existed and not list(out.parent.glob(f".{out.name}.moemerge-tmp-*"))


def slices_recipe(tmp_path: Path, slices: list, **extra) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"slices": [{"model": str(m), "layers": r} for m, r in slices], **extra}))
    return path


def test_bad_inputs(tmp_path, llama8, pico_factory):
    fails(tmp_path, llama8, "--drop 8", "smaller than 8", drop=8)
    fails(tmp_path, llama8, "at most 8", expand=9)
    fails(tmp_path, llama8, "exactly one of --drop", drop=2, expand=2)
    fails(tmp_path, llama8, "exactly one of --drop")
    fails(tmp_path, slices_recipe(tmp_path, [(llama8, [4, 9])]), "slices[0].layers = [4, 9]", "8 layers")
    fails(tmp_path, slices_recipe(tmp_path, [(llama8, [3, 3])]), "slices.0.layers", "empty")
    fails(tmp_path, slices_recipe(tmp_path, [(llama8, [-1, 3])]), "negative")
    fails(tmp_path, slices_recipe(tmp_path, []), "slices", "at least 1")
    wide = pico_factory("llama", hidden_size=48, intermediate_size=64, num_hidden_layers=8)
    fails(tmp_path, slices_recipe(tmp_path, [(llama8, [0, 4]), (wide, [4, 8])]), "not compatible", "hidden_size")
    qwen = pico_factory("qwen3", **PICO)
    fails(tmp_path, slices_recipe(tmp_path, [(llama8, [0, 4]), (qwen, [4, 8])]), "one architecture")
    shaped = pico_factory("llama", intermediate_size=96, hidden_size=32, num_hidden_layers=8)
    fails(tmp_path, slices_recipe(tmp_path, [(llama8, [0, 4]), (shaped, [4, 8])]), "intermediate_size")
    edited = tmp_path / "edited"
    shutil.copytree(llama8, edited)
    sd = tensors(edited)
    sd["model.layers.5.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(sd, str(edited / "model.safetensors"), metadata={"format": "pt"})
    fails(tmp_path, slices_recipe(tmp_path, [(llama8, [0, 4]), (edited, [4, 8])]),
          "'model.layers.5.mlp.up_proj.weight' has shape [65, 32]", "identical shapes")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    fails(tmp_path, llama8, "already exists", "--overwrite", drop=2, output=tmp_path / "taken")
    fails(tmp_path, slices_recipe(tmp_path, [(llama8, [0, 4])]), "recipe file", drop=2)
    fails(tmp_path, tmp_path / "no-such-thing", "neither a model folder nor a graft recipe")
    quantized = tmp_path / "quantized"
    shutil.copytree(llama8, quantized)
    cfg = config(quantized)
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (quantized / "config.json").write_text(json.dumps(cfg))
    fails(tmp_path, quantized, "quantized checkpoint", "gguf", expand=1)


def test_drop_warns_when_not_deeper_and_overwrite(tmp_path, llama8):
    out = tmp_path / "o"
    run_graft(llama8, out, expand=1, echo=lambda s: None)  # an earlier graft: --overwrite replaces it
    lines: list[str] = []
    run_graft(llama8, out, drop=5, overwrite=True, echo=lines.append)
    assert any("warning" in s and "not deeper" in s for s in lines)
    assert config(out)["num_hidden_layers"] == 6


def test_cli_error_is_one_line(tmp_path, llama8):
    result = CliRunner().invoke(app, ["graft", str(llama8), "--drop", "8", "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and isinstance(result.exception, MoemergeError)

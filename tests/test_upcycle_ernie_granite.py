"""Upcycling into ernie4_5_moe, granitemoe and granitemoeshared: step-0 parity (fp32, AutoModelForCausalLM on
the written folder) for every (source, target) pair and option, the exact tensors behind the interleaved RoPE
and the fused expert layout, the config fields written on purpose, and the pairs refused before any weight
is read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from helpers import weights
from test_upcycle_families import assert_parity_lost

from mergekit_lite.arch import tables
from mergekit_lite.arch.tables import MOE
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import CheckpointReader
from mergekit_lite.ops.upcycle import run_upcycle

DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3)  # 4 heads of 8, 2 kv heads
TOL = 1e-4
# every (source, target) pair the tables allow for these targets
PAIRS = [(s, t) for t in ("ernie4_5_moe", "granitemoe", "granitemoeshared") for s in ("llama", "mistral", "qwen2", "qwen3")
         if s in MOE[t].sources]
OPTIONS = {
    "plain": {},
    "shared": {"shared_experts": 1, "shared_split": True},
    "granular": {"granularity": 2, "num_experts": 8, "experts_per_token": 4},
    "granular_shared": {"granularity": 2, "num_experts": 4, "experts_per_token": 2, "shared_experts": 2,
                        "shared_split": True},
    "dense_layers": {"dense_layers": 1},
    "every_2": {"moe_layers": {"every": 2}},
}
# what each target cannot hold: no shared expert (granitemoe), no dense layers (both Granite classes)
UNSUPPORTED = {("granitemoe", "shared"), ("granitemoe", "granular_shared"), ("granitemoe", "dense_layers"),
               ("granitemoe", "every_2"), ("granitemoeshared", "dense_layers"), ("granitemoeshared", "every_2")}
CASES = [(f, t, o) for f, t in PAIRS for o in OPTIONS if (t, o) not in UNSUPPORTED]


def quiet(_line: str) -> None:
    pass


def upcycle(tmp_path: Path, name: str = "out", **fields) -> Path:
    body = {"num_experts": 4, "experts_per_token": 2, "dtype": "float32", "seed": 3, **fields}
    body["source"] = str(body["source"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    run_upcycle(path, tmp_path / name, echo=quiet, progress=False)
    return tmp_path / name


def max_delta(out: Path, dense: Path) -> float:
    """max |logits(out) - logits(dense)| in fp32 on random ids; the output must load with no missing or unused key."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (dense, out):
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (folder, info)
        with torch.no_grad():
            logits.append(model.eval()(ids).logits)
    return (logits[0] - logits[1]).abs().max().item()


@pytest.fixture
def no_heavy_io(monkeypatch):
    """Any attempt to read tensor bytes fails: errors must come from headers and configs only."""
    def boom(self, key):
        raise AssertionError(f"tensor bytes of {key} were read before the error")
    monkeypatch.setattr(CheckpointReader, "get", boom)


# --- parity ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,target,option", CASES, ids=[f"{f}-{t}-{o}" for f, t, o in CASES])
def test_parity(tmp_path, pico_factory, family, target, option):
    dense = pico_factory(family, **DIMS)
    out = upcycle(tmp_path, source=dense, architecture=target, **OPTIONS[option])
    assert json.loads((out / "config.json").read_text())["model_type"] == target
    assert max_delta(out, dense) <= TOL


def test_tied_source_stays_tied(tmp_path, pico_factory):
    """ERNIE ties by default and Granite does not: the source's choice is written, both ways."""
    dense = pico_factory("llama", tied=True, **DIMS)
    for target in ("ernie4_5_moe", "granitemoe"):
        out = upcycle(tmp_path, target, source=dense, architecture=target)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
        assert "lm_head.weight" not in weights(out)
        assert max_delta(out, dense) <= TOL


# --- the tensors behind the parity -----------------------------------------------------------------------------

def test_ernie_q_k_rows_interleaved_per_head(tmp_path, pico_factory):
    """Row 2j of every q/k head is the source's row j, row 2j+1 its row j + d/2 (weights and Qwen2's biases);
    v/o are untouched, ERNIE's extra biases are zero, the selection bias is [1, E] float32 zeros."""
    dense = pico_factory("qwen2", **DIMS)
    src, w = weights(dense), weights(upcycle(tmp_path, source=dense, architecture="ernie4_5_moe"))
    d = 8
    perm = [r for j in range(d // 2) for r in (j, j + d // 2)]  # 0, 4, 1, 5, 2, 6, 3, 7
    for name in ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias"):
        key = f"model.layers.1.self_attn.{name}"
        heads = src[key].reshape(-1, d, *src[key].shape[1:])  # (heads, d, ...)
        assert torch.equal(w[key], heads[:, perm].reshape(src[key].shape)), key
        assert not torch.equal(w[key], src[key])
    for name in ("v_proj.weight", "v_proj.bias", "o_proj.weight"):
        assert torch.equal(w[f"model.layers.1.self_attn.{name}"], src[f"model.layers.1.self_attn.{name}"])
    assert not w["model.layers.1.self_attn.o_proj.bias"].any() and not w["lm_head.bias"].any()
    bias = w["model.layers.1.mlp.moe_statics.e_score_correction_bias"]
    assert bias.shape == (1, 4) and bias.dtype == torch.float32 and not bias.any()


def test_granite_experts_fused_gate_then_up(tmp_path, pico_factory):
    """input_linear[e] = [gate; up], output_linear[e] = down, shared_mlp alike; no per-expert key on disk."""
    dense = pico_factory("llama", **DIMS)
    src = weights(dense)
    w = weights(upcycle(tmp_path, source=dense, architecture="granitemoeshared", shared_experts=1,
                        shared_split=True))
    p = "model.layers.2."
    gate, up, down = (src[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
    fused_in, fused_out = w[p + "block_sparse_moe.input_linear.weight"], w[p + "block_sparse_moe.output_linear.weight"]
    assert fused_in.shape == (4, 64, 32) and fused_out.shape == (4, 32, 32)  # routed: channels [32, 64)
    for e in range(4):
        assert torch.equal(fused_in[e], torch.cat([gate[32:], up[32:]]))
        assert torch.equal(fused_out[e], down[:, 32:])
    assert torch.equal(w[p + "shared_mlp.input_linear.weight"], torch.cat([gate[:32], up[:32]]))
    assert torch.equal(w[p + "shared_mlp.output_linear.weight"], down[:, :32])  # ungated: no x 2
    assert w[p + "block_sparse_moe.router.layer.weight"].shape == (4, 32)
    assert not any(".experts." in k or "_proj" in k and "mlp" in k for k in w)


@pytest.mark.parametrize("fields", [{"noise": 0.05}, {"noise": 0.05, "drop_ratio": 0.25, "granularity": 2}],
                         ids=["noise", "noise_drop_granular"])
def test_fused_tensor_equals_the_per_expert_tensors(tmp_path, pico_factory, monkeypatch, fields):
    """With random per-expert options the fused tensor is exactly the per-expert tensors the unfused plan
    writes (same recipe, same seed), gate then up; and the experts do differ from each other."""
    dense = pico_factory("llama", **DIMS)
    fused = weights(upcycle(tmp_path, "fused", source=dense, architecture="granitemoe", **fields))
    unfused_fam = replace(tables.MOE["granitemoe"], plan_transforms=("granite_config",))
    monkeypatch.setitem(tables.MOE, "granitemoe", unfused_fam)
    per = weights(upcycle(tmp_path, "per_expert", source=dense, architecture="granitemoe", **fields))
    for i in range(3):
        p = f"model.layers.{i}.block_sparse_moe."
        fin, fout = fused[p + "input_linear.weight"], fused[p + "output_linear.weight"]
        for e in range(4):
            gate, up, down = (per[p + f"experts.{e}.{x}_proj.weight"] for x in ("gate", "up", "down"))
            assert torch.equal(fin[e], torch.cat([gate, up])) and torch.equal(fout[e], down), (i, e)
        assert not torch.equal(fin[0], fin[2])  # noise per expert


# Each field the writer sets on purpose: put back to what transformers assumes when it is absent, parity is lost.
MUTATIONS = [
    ("llama", "ernie4_5_moe", {}, "rope_parameters"),          # ERNIE's default rope_theta is 500000
    ("llama_tied", "granitemoe", {}, "tie_word_embeddings"),   # Granite's default is false: lm_head missing
    ("llama", "ernie4_5_moe", {}, "moe_layer_start_index"),    # ERNIE's default is 1
    ("qwen2", "ernie4_5_moe", {}, "use_bias"),                 # default false: Qwen2's q/k/v biases ignored
    ("llama", "ernie4_5_moe", {"shared_experts": 1, "shared_split": True}, "moe_num_shared_experts"),
    ("llama", "granitemoe", {}, "attention_multiplier"),       # Granite's default is 1.0
    ("llama", "granitemoeshared", {"shared_experts": 1, "shared_split": True}, "shared_intermediate_size"),
]


@pytest.mark.parametrize("family,target,fields,name", MUTATIONS, ids=[m[3] for m in MUTATIONS])
def test_each_written_field_is_needed(tmp_path, pico_factory, family, target, fields, name):
    dense = pico_factory(family.removesuffix("_tied"), tied=family.endswith("_tied"), **DIMS)
    out = upcycle(tmp_path, source=dense, architecture=target, **fields)
    cfg = json.loads((out / "config.json").read_text())
    assert name in cfg
    cfg.pop(name)
    if name == "moe_num_shared_experts":  # ERNIE's default is 2: zero says the routed experts are alone
        cfg[name] = 0
    assert_parity_lost(out, dense, cfg, name)


# --- refused before any weight is read ---------------------------------------------------------------------------

BAD = [
    ("qwen3", {"architecture": "ernie4_5_moe"}, ["qwen3 into ernie4_5_moe", "q_norm/k_norm", "architecture:"]),
    ("qwen2", {"architecture": "granitemoe"}, ["qwen2 into granitemoe", "o_proj bias", "ernie4_5_moe"]),
    ("qwen2", {"architecture": "granitemoeshared"}, ["qwen2 into granitemoeshared", "qwen2_moe"]),
    ("qwen3", {"architecture": "granitemoe"}, ["qwen3 into granitemoe", "q_norm/k_norm"]),
    ("gemma3_text", {"architecture": "ernie4_5_moe"}, ["gemma3_text has no native", "graft"]),
    ("gemma3_text", {"architecture": "granitemoe"}, ["gemma3_text has no native", "graft"]),
    ("llama", {"architecture": "ernie4_5_moe", "moe_layers": [0, 2]},
     ["moe_layers=[0, 2]", "moe_layer_interval", "dense_layers: k"]),
    ("llama", {"architecture": "granitemoe", "shared_experts": 1}, ["shared_experts=1", "granitemoeshared"]),
    ("llama", {"architecture": "granitemoe", "dense_layers": 1}, ["dense_layers=1", "granitemoe has no dense"]),
    ("llama", {"architecture": "ernie4_5_moe", "router": {"scoring": "sigmoid"}},
     ["router.scoring=sigmoid", "ernie4_5_moe routers use softmax"]),
]


@pytest.mark.parametrize("family,fields,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_inputs_refused_before_any_weight_is_read(tmp_path, pico_factory, no_heavy_io, family, fields, words):
    body = {"source": str(pico_factory(family, **DIMS)), "num_experts": 4, "experts_per_token": 2, **fields}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(MoemergeError) as e:
        run_upcycle(path, tmp_path / "never", echo=quiet)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("target", ["ernie4_5_moe", "granitemoe"])
def test_short_sliding_window_refused(tmp_path, pico_factory, no_heavy_io, target):
    """Neither class slides: a Mistral window shorter than the context would change the attention."""
    body = {"source": str(pico_factory("mistral", sliding_window=16, **DIMS)), "architecture": target,
            "num_experts": 4, "experts_per_token": 2}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(MoemergeError, match="sliding_window=16.*mixtral"):
        run_upcycle(path, tmp_path / "never", echo=quiet)


@pytest.mark.parametrize("family,target", [("llama", "granitemoeshared"), ("qwen2", "ernie4_5_moe")])
def test_inspect_counts_active_parameters_like_the_plan(tmp_path, pico_factory, family, target):
    """inspect counts fused expert tensors as experts, and the plan counts ERNIE's added zero biases."""
    from mergekit_lite.inspect_model import describe

    out = upcycle(tmp_path, source=pico_factory(family, **DIMS), architecture=target, shared_experts=1,
                  shared_split=True)
    d = describe(out)
    # every routed expert matrix is 32 x 32 (2 units of 32 channels: 1 shared, 1 routed); 2 of 4 experts idle
    assert d["active_params"] == d["total_params"] - 3 * 2 * 3 * 32 * 32 == d["built_by"]["active_params"]


# --- llama.cpp's converter (slow: needs the converter and sentencepiece, which the project does not install) ----

def _llama_cpp_dir() -> Path | None:
    """A llama.cpp source tree: $MOEMERGE_LLAMA_CPP, e.g. the `vendor/llama.cpp` folder of the llama-cpp-python
    sdist (`pip download llama-cpp-python --no-deps --no-binary :all:`)."""
    import os

    path = Path(os.environ.get("MOEMERGE_LLAMA_CPP", "/nonexistent"))
    return path if (path / "convert_hf_to_gguf.py").is_file() else None


def _sentencepiece_llama(folder: Path) -> Path:
    """A pico Llama with a SentencePiece tokenizer.model, which the converter reads (it refuses unknown BPEs)."""
    import io

    import sentencepiece as spm

    from mergekit_lite.pico import SAMPLE_TEXT, build_pico_model

    build_pico_model("llama", folder, **DIMS)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([SAMPLE_TEXT] * 8 + SAMPLE_TEXT.split()), model_writer=buf,
                                   vocab_size=128, model_type="bpe", hard_vocab_limit=False, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=3)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())  # the converter pads the vocabulary to vocab_size
    return folder


GGUF_CASES = {  # target, recipe fields, GGUF arch, tensors of block 1 as (name, torch-order shape)
    "granitemoe": ({}, "granitemoe", {"ffn_gate_exps.weight": (4, 64, 32), "ffn_up_exps.weight": (4, 64, 32),
                                      "ffn_down_exps.weight": (4, 32, 64), "ffn_gate_inp.weight": (4, 32)}),
    "granitemoeshared": ({"shared_experts": 1, "shared_split": True}, "granitemoe",
                         {"ffn_gate_exps.weight": (4, 32, 32), "ffn_gate_shexp.weight": (32, 32),
                          "ffn_up_shexp.weight": (32, 32), "ffn_down_shexp.weight": (32, 32)}),
    "ernie4_5_moe": ({}, "ernie4_5-moe", {"ffn_gate_exps.weight": (4, 64, 32), "ffn_down_exps.weight": (4, 32, 64),
                                          "exp_probs_b.bias": (1, 4), "attn_q.weight": (32, 32)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(GGUF_CASES))
def test_llama_cpp_converter_reads_the_output(tmp_path, target):
    """convert_hf_to_gguf.py turns the written folder into a GGUF of its own MoE architecture: experts split back
    out of Granite's fused input_linear (gate, up), the ERNIE selection bias kept, Granite's attention scale set."""
    import subprocess
    import sys

    root = _llama_cpp_dir()
    if root is None:
        pytest.skip("set MOEMERGE_LLAMA_CPP to a llama.cpp source tree (with convert_hf_to_gguf.py)")
    pytest.importorskip("sentencepiece")
    fields, arch, expected = GGUF_CASES[target]
    out = upcycle(tmp_path, source=_sentencepiece_llama(tmp_path / "dense"), architecture=target, **fields)
    gguf_file = tmp_path / "model.gguf"
    run = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(out), "--outfile", str(gguf_file),
                          "--outtype", "f32"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    sys.path.insert(0, str(root / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(root / "gguf-py"))
    reader = GGUFReader(gguf_file)
    assert reader.fields["general.architecture"].contents() == arch
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}  # GGUF lists dims reversed
    for name, shape in expected.items():
        assert shapes[f"blk.1.{name}"] == shape, name
    if arch == "granitemoe":
        assert reader.fields["granitemoe.attention.scale"].contents() == pytest.approx(8 ** -0.5)


@pytest.mark.parametrize("target,fields", [("granitemoeshared", {}), ("ernie4_5_moe", {}),
                                           ("ernie4_5_moe", {"dense_layers": 1})])
def test_graft_expand_keeps_the_upcycled_model(tmp_path, pico_factory, target, fields):
    """Identity blocks of a graft zero what writes into the residual stream, fused Granite tensors included, and
    ERNIE's MoE-layer span follows the layers (a dense layer 0 and its copy: MoE from output layer 2)."""
    from mergekit_lite.ops.graft import run_graft
    from mergekit_lite.verify import compare_logits

    src = upcycle(tmp_path, source=pico_factory("llama", **DIMS), architecture=target, shared_experts=1,
                  shared_split=True, **fields)
    run_graft(src, tmp_path / "pro", expand=3, echo=quiet)  # each layer followed by a zeroed copy of itself
    if target == "ernie4_5_moe":
        cfg = json.loads((tmp_path / "pro" / "config.json").read_text())
        start = 2 if fields else 0
        assert (cfg["moe_layer_start_index"], cfg["moe_layer_end_index"], cfg["moe_layer_interval"]) == (start, 5, 1)
    w = weights(tmp_path / "pro")
    zeroed = sorted(k.split(".", 3)[3] for k, v in w.items() if k.startswith("model.layers.1.") and not v.any())
    assert "self_attn.o_proj.weight" in zeroed
    report = compare_logits(tmp_path / "pro", src, device="cpu")
    assert report.max_abs <= 1e-5 and report.top1_agreement == 1.0, zeroed


def test_dry_run_names_ernie_fields(tmp_path, pico_factory):
    """--dry-run says which ERNIE fields hold the dense layers, and that the experts are identical."""
    body = {"source": str(pico_factory("qwen2", **DIMS)), "architecture": "ernie4_5_moe", "num_experts": 4,
            "experts_per_token": 2, "dense_layers": 1}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    lines: list[str] = []
    run_upcycle(path, None, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert "dense FFN kept in layers [0] (moe_layer_start_index/moe_layer_end_index/moe_layer_interval)" in text
    assert "rope_interleave" in text and "identical experts" in text

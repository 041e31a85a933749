"""`moemerge train`: losses drop, router losses act, frozen means frozen, LoRA merges, resume is exact."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_lite.errors import MoemergeError
from mergekit_lite.ops.graft import run_graft
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.pico import build_pico_model
from mergekit_lite.recipe import TrainRecipe, validate_recipe
from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus
from mergekit_lite.train.loop import train

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("train"))


def build_world(root: Path) -> dict:
    """A corpus of real English, a dense pico Llama with a tokenizer trained on it, and its 4-expert Mixtral."""
    train_txt, val_txt = write_corpus(root / "corpus")
    dense = build_pico_model("llama", root / "dense", texts=stdlib_docstrings(), **SMALL)
    (root / "up.yaml").write_text(yaml.safe_dump({"source": str(dense), "num_experts": 4, "experts_per_token": 2,
                                                  "dtype": "float32", "seed": 3}))
    run_upcycle(root / "up.yaml", root / "moe", echo=lambda s: None)
    return {"root": root, "dense": dense, "moe": root / "moe", "train": str(train_txt), "val": str(val_txt)}


def recipe(world, out: Path, model: Path | None = None, **kw) -> TrainRecipe:
    body = {"model": str(model or world["moe"]), "data": {"train": [world["train"]], "validation": [world["val"]]},
            "seq_len": 32, "micro_batch_size": 8, "max_steps": 12, "learning_rate": 3e-3, "warmup_steps": 2,
            "eval_batches": 4, "output": str(out), **kw}
    return validate_recipe(body, TrainRecipe)


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def quiet(*_):
    pass


def test_val_loss_drops_and_final_model_is_the_trained_one(world, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    summary = train(recipe(world, out, max_steps=25, eval_every=10), echo=quiet)
    vals = records(out, "val")
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 25
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.3
    router = records(out, "router")[-1]
    assert len(router["load"]) == 2 and abs(sum(router["load"][0]) - 1) < 1e-5
    # the saved folder (per-expert Hub layout) holds exactly the trained weights: same validation loss
    final = out / "final"
    keys = load_file(str(final / "model.safetensors"))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    from mergekit_lite.train.loaders import build_loaders
    from mergekit_lite.train.loop import causal_lm_loss

    class One:  # the loader helper only needs these from an Accelerator
        num_processes, is_main_process = 1, True

        @staticmethod
        def wait_for_everyone():
            pass

    from transformers import AutoTokenizer

    r = recipe(world, out)
    _, val_dl = build_loaders(r, AutoTokenizer.from_pretrained(str(final)), world["moe"], One, 1)
    with torch.no_grad():
        losses = [causal_lm_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"]) for _, b in
                  zip(range(4), val_dl)]
    assert abs(torch.stack(losses).mean().item() - summary["final_val_loss"]) < 1e-4
    card = (final / "README.md").read_text()
    assert "## Training" in card and "trained" in card
    lineage = [s["step"] for s in json.loads((final / "moemerge.json").read_text())["lineage"]]
    assert lineage == ["source", "upcycle", "train"]


def test_balance_loss_evens_expert_load(world, tmp_path):
    def imbalance(coef: float) -> float:
        out = tmp_path / f"bal{coef}"
        train(recipe(world, out, max_steps=20, learning_rate=1e-2, moe={"balance_coef": coef, "z_coef": 0.0}),
              echo=quiet)
        return sum(sum(r["max_over_mean"]) for r in records(out, "router")[-5:])

    assert imbalance(1.0) < 0.9 * imbalance(0.0)


def test_z_loss_lowers_router_logits(world, tmp_path):
    def z_of(coef: float) -> float:
        out = tmp_path / f"z{coef}"
        train(recipe(world, out, max_steps=15, moe={"z_coef": coef, "balance_coef": 0.0}), echo=quiet)
        return sum(r["z"] for r in records(out, "train")[-3:])

    assert z_of(1.0) < 0.9 * z_of(0.0)


def test_routers_only_keeps_everything_else_bit_identical(world, tmp_path):
    out = tmp_path / "routers"
    train(recipe(world, out, trainable="routers", max_steps=5), echo=quiet)
    before = load_file(str(world["moe"] / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    for k, t in before.items():
        if k.endswith("block_sparse_moe.gate.weight"):
            assert not torch.equal(t, after[k]), k
        else:
            assert torch.equal(t, after[k]), k


def test_new_layers_only(world, tmp_path):
    pro = tmp_path / "pro"
    run_graft(world["dense"], pro, expand=1, echo=quiet)
    new = json.loads((pro / "moemerge.json").read_text())["new_layers"]
    out = tmp_path / "newl"
    train(recipe(world, out, model=pro, trainable="new_layers", max_steps=4), echo=quiet)
    before, after = load_file(str(pro / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    prefixes = tuple(f"model.layers.{i}." for i in new)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(prefixes) for k in changed)


def test_lora_merge_equals_base_plus_adapter(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train(recipe(world, out, trainable="lora", max_steps=6, lora={"r": 4, "alpha": 8}), echo=quiet)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(world["moe"]), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "adapter"))
    ids = torch.arange(5, 37).unsqueeze(0)
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(world["moe"]), dtype=torch.float32)(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - plain).abs().max() > 1e-3  # the adapter did change the model


def test_dense_model_trains_without_router_records(world, tmp_path):
    out = tmp_path / "dense"
    train(recipe(world, out, model=world["dense"], max_steps=4), echo=quiet)
    assert not records(out, "router") and records(out, "train")[-1]["balance"] == 0.0


@pytest.mark.parametrize("edit,needle", [
    (lambda b: b["data"].update(train=["/no/such/file.txt"]), "not a file, folder or matching glob"),
    (lambda b: b.update(seq_len=4096), "max_position_embeddings"),
    (lambda b: b.update(tracker="neptune"), "tracker"),
    (lambda b: b.update(trainable="new_layers"), "records no new layers"),
])
def test_bad_recipes_fail_before_training(world, tmp_path, edit, needle):
    body = recipe(world, tmp_path / "bad").model_dump(mode="json")
    edit(body)
    with pytest.raises(MoemergeError, match=needle):
        train(validate_recipe(body, TrainRecipe), echo=quiet)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_issue_recipe_shape_and_cli(world, tmp_path):
    r = tmp_path / "cpt.yaml"
    r.write_text(yaml.safe_dump({"model": str(world["moe"]), "data": {"train": [world["train"]],
                 "validation": [world["val"]]}, "seq_len": 32, "micro_batch_size": 8,
                 "gradient_accumulation_steps": 1, "max_steps": 4, "learning_rate": 1.0e-3, "warmup_steps": 1,
                 "checkpoint_every": 2, "output": str(tmp_path / "runs")}))
    proc = subprocess.run([sys.executable, "-m", "mergekit_lite", "train", str(r)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final val loss" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "runs" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_lineage_upcycle_graft_train_in_card(world, tmp_path):
    from mergekit_lite.card import parse_front_matter

    pro = tmp_path / "moe-pro"
    run_graft(world["moe"], pro, expand=1, echo=quiet)
    out = tmp_path / "run"
    train(recipe(world, out, model=pro, max_steps=3), echo=quiet)
    final = out / "final"
    lineage = [s["step"] for s in json.loads((final / "moemerge.json").read_text())["lineage"]]
    assert lineage == ["source", "upcycle", "graft", "train"]
    card = (final / "README.md").read_text()
    front = parse_front_matter(card)
    assert {"mergekit-lite", "moe", "upcycled", "depth-up-scaled", "trained"} <= set(front["tags"])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert card.count("recipe `") >= 3  # each step names its recipe hash


def test_jsonl_parquet_held_out_split_and_streaming(world, tmp_path):
    import datasets

    docs = stdlib_docstrings()
    (tmp_path / "corpus").mkdir()
    with (tmp_path / "corpus" / "a.jsonl").open("w") as f:
        for d in docs[:300]:
            f.write(json.dumps({"body": d}) + "\n")
    datasets.Dataset.from_dict({"body": docs[300:]}).to_parquet(str(tmp_path / "b.parquet"))
    base = {"model": str(world["moe"]), "seq_len": 32, "micro_batch_size": 4, "max_steps": 4,
            "learning_rate": 1e-3, "eval_batches": 2}
    # a folder of .jsonl, no validation files: a held-out fraction of the packed blocks
    r = validate_recipe({**base, "data": {"train": [str(tmp_path / "corpus")], "text_field": "body"},
                         "output": str(tmp_path / "jsonl")}, TrainRecipe)
    assert train(r, echo=quiet)["steps"] == 4
    cached = list((tmp_path / "jsonl" / "cache").glob("packed-train-*"))
    assert len(cached) == 1  # tokenised once, reused by a resumed run
    # parquet, streamed (validation = the first blocks of the stream)
    r = validate_recipe({**base, "data": {"train": [str(tmp_path / "b.parquet")], "text_field": "body",
                                          "streaming": True, "validation_blocks": 4},
                         "output": str(tmp_path / "stream")}, TrainRecipe)
    summary = train(r, echo=quiet)
    assert summary["steps"] == 4 and summary["final_val_loss"] < 10
    assert not list((tmp_path / "stream" / "cache").glob("packed-*"))  # streaming caches nothing
    with pytest.raises(MoemergeError, match="no column 'text'"):
        train(validate_recipe({**base, "data": {"train": [str(tmp_path / "b.parquet")]},
                               "output": str(tmp_path / "nocol")}, TrainRecipe), echo=quiet)


def test_lr_schedule_logged_is_warmup_then_cosine_to_floor(world, tmp_path):
    out = tmp_path / "lr"
    train(recipe(world, out, max_steps=10, warmup_steps=2, learning_rate=1e-3, min_lr_ratio=0.1), echo=quiet)
    lrs = [r["lr"] for r in records(out, "train")]
    # transformers' schedule, as step s (0-based) uses it: warmup s/2 of the peak (from 0), then cosine from the
    # peak at s = 2 toward the 1e-4 floor, which step s = 10 would reach
    floor = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert lrs == pytest.approx([0.0, 5e-4] + [1e-3 * f for f in floor], rel=1e-6)


def test_global_batch_size_sets_accumulation_per_process_count(world, tmp_path):
    r = recipe(world, tmp_path / "g", micro_batch_size=4, global_batch_size=24)
    assert [r.accumulation(p) for p in (1, 2, 3, 6)] == [6, 3, 2, 1]
    assert r.global_batch(2) == 24
    with pytest.raises(MoemergeError, match=r"^global_batch_size = 24 is not a multiple of micro_batch_size x "
                                            r"processes = 4 x 4 = 16; set it to 16 or 32, or change micro_batch_size$"):
        r.accumulation(4)
    with pytest.raises(Exception, match="one of gradient_accumulation_steps or global_batch_size, not both"):
        recipe(world, tmp_path / "g", global_batch_size=16, gradient_accumulation_steps=2)
    with pytest.raises(Exception, match="global_batch_size = 10 is not a multiple of micro_batch_size = 4"):
        recipe(world, tmp_path / "g", micro_batch_size=4, global_batch_size=10)
    classic = recipe(world, tmp_path / "g", micro_batch_size=4, gradient_accumulation_steps=2)
    assert classic.global_batch(1) == 8 and classic.global_batch(2) == 16  # accumulation fixed, batch grows


def test_empty_linears_are_parked_as_buffers_with_the_same_output():
    from mergekit_lite.train.model import EmptyLinear, park_empty_linears

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 0, bias=False), torch.nn.Linear(0, 8, bias=False),
                                torch.nn.Linear(8, 8))
    x = torch.randn(3, 5, 8)
    before = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    want = [block[0](x), block[1](x[..., :0]), block[2](x)]
    assert park_empty_linears(block) == 2
    assert isinstance(block[0], EmptyLinear) and isinstance(block[1], EmptyLinear) and type(block[2]) is torch.nn.Linear
    assert [n for n, _ in block.named_parameters()] == ["2.weight", "2.bias"]  # nothing empty left to shard
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == before  # still saved, same names
    got = [block[0](x), block[1](x[..., :0]), block[2](x)]
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(want, got))


def test_routers_only_on_identical_experts_warns_that_nothing_can_change(world, tmp_path):
    said: list[str] = []
    train(recipe(world, tmp_path / "r", trainable="routers", max_steps=3), echo=said.append)
    assert any(s.startswith("warning: 2 MoE layer(s) hold identical experts") for s in said), said
    said.clear()
    train(recipe(world, tmp_path / "all", max_steps=3), echo=said.append)
    assert not any("identical experts" in s for s in said)


def test_attention_kernel_and_precision_defaults(world, tmp_path):
    """sdpa (default) and eager attention train to the same numbers on CPU, where the default precision is fp32;
    flash_attention_2 without flash-attn is one line before anything loads."""
    import importlib.util

    from mergekit_lite.train.engine import default_precision

    assert default_precision(None) == ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                                       else "no")
    assert default_precision("fp16") == "fp16"
    said: list[str] = []
    sdpa = train(recipe(world, tmp_path / "sdpa", max_steps=3), echo=said.append)
    eager = train(recipe(world, tmp_path / "eager", max_steps=3, attn_implementation="eager"), echo=quiet)
    assert abs(sdpa["final_val_loss"] - eager["final_val_loss"]) < 1e-4
    assert sdpa["mixed_precision"] == "no" and any(
        s.startswith("  precision: no (the default on this device), attention: sdpa") for s in said), said
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(MoemergeError, match=r"attn_implementation = 'flash_attention_2' needs the flash-attn"):
            train(recipe(world, tmp_path / "fa", attn_implementation="flash_attention_2"), echo=quiet)
        assert not (tmp_path / "fa").exists()


def test_compiled_layers_train_as_the_eager_ones(world, tmp_path):
    """`compile: true` compiles each decoder layer in place: dynamo captures graphs, the losses of a few steps of
    the MoE (jitter on, so the taps run inside the compiled layers) match eager ones and the saved model has the
    same keys and nearly the same values (inductor reorders float sums)."""
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"c{compiled}"
        lines: list[str] = []
        counters.clear()
        train(recipe(world, out, world["moe"], max_steps=4, compile=compiled, moe={"jitter": 0.1}),
              echo=lines.append)
        assert (counters["stats"]["unique_graphs"] > 0) is compiled
        runs[compiled] = ([r["loss"] for r in records(out, "train")], load_file(out / "final" / "model.safetensors"))
        assert any("decoder layers compiled in place" in s for s in lines) is compiled
    (eager, w_eager), (comp, w_comp) = runs[False], runs[True]
    assert comp == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert w_comp.keys() == w_eager.keys()
    assert max((w_comp[k] - w_eager[k]).abs().max().item() for k in w_eager) < 1e-3


def test_a_run_is_assembled_once_then_fit_trains_exactly_what_it_holds(world, tmp_path):
    """`assemble` builds the whole run (engine, model, taps, trainable set, optimizer, loaders) before a step;
    `fit` trains that very object: what it holds is what is trained and saved."""
    from mergekit_lite.train.loop import fit
    from mergekit_lite.train.run import Run, assemble

    out = tmp_path / "run"
    r = recipe(world, out, trainable="routers+experts", max_steps=4, micro_batch_size=4,
               gradient_accumulation_steps=2, moe={"jitter": 0.1})
    run = assemble(r, resume=False, overwrite=False, echo=quiet)
    assert isinstance(run, Run) and run.start.step == 0 and run.start.checkpoint is None
    assert (run.max_steps, run.accumulation, run.tokens_per_step) == (4, 2, 32 * 4 * 2)
    assert len(run.tap.routers) == 2 and run.tap.jitter == 0.1
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all(".experts." in n or ".gate." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    router_before = run.tap.routers[0].weight.detach().clone()
    summary = fit(run, progress=False)
    assert summary["steps"] == 4 and summary["tokens"] == 4 * run.tokens_per_step
    assert all(torch.equal(p, frozen[n]) for n, p in run.model.named_parameters() if n in frozen)
    assert not torch.equal(run.tap.routers[0].weight, router_before)  # the held router is the trained one
    saved = load_file(out / "final" / "model.safetensors")
    assert torch.equal(saved["model.layers.0.block_sparse_moe.gate.weight"], run.tap.routers[0].weight.detach())

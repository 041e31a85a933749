"""Long work shows progress and says what happened: upcycle's byte bar, Ctrl-C messages, train's header,
`--resume` of a finished run, DDP's unused-parameter search only for models with experts."""

from __future__ import annotations

import json
import re
import struct
import sys

import pytest
import yaml
from tqdm import tqdm

import mergekit_lite.train.loop as loop
import mergekit_lite.train.run as train_run
from mergekit_lite.cli import main
from mergekit_lite.ops.execute import execute
from mergekit_lite.ops.upcycle import plan_upcycle, run_upcycle
from mergekit_lite.pico import build_pico_model
from mergekit_lite.recipe import TrainRecipe, UpcycleRecipe, load_recipe, validate_recipe
from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus
from mergekit_lite.train.preflight import has_experts


def tensor_bytes(path) -> int:
    """Tensor bytes of a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def upcycle_recipe(tmp_path, source, shard_size: str = "5GB"):
    path = tmp_path / "up.yaml"
    path.write_text(yaml.safe_dump({"source": str(source), "num_experts": 4, "experts_per_token": 2,
                                    "dtype": "float32", "seed": 0, "shard_size": shard_size}))
    return path


def test_upcycle_bar_ends_at_the_output_bytes(tmp_path, pico_llama, capsys):
    plan = run_upcycle(upcycle_recipe(tmp_path, pico_llama), tmp_path / "moe", echo=lambda _: None)
    total = tensor_bytes(tmp_path / "moe" / "model.safetensors")
    assert total == plan.nbytes
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    size = tqdm.format_sizeof(total, "B", 1000)  # the plan prints decimal units too
    assert re.match(rf"upcycle: 100%\|.*\| {re.escape(size)}/{re.escape(size)} ", last), last


def test_bytes_reported_are_the_bytes_in_the_files(tmp_path, pico_llama):
    """Several shards: at each finished shard, the bytes reported so far are exactly those of the shards written
    (in order with one writer; with several, shards finish in any order and each tensor is reported once)."""
    recipe = validate_recipe(yaml.safe_load(upcycle_recipe(tmp_path, pico_llama, "200KB").read_text()),
                             UpcycleRecipe)
    plan, readers = plan_upcycle(recipe)
    reported: list[int] = []
    at_shard: list[tuple[int, int]] = []
    out = execute(plan, readers, tmp_path / "moe", shard_size=recipe.shard_size, written=reported.append,
                  progress=lambda n, total: at_shard.append((n, sum(reported))), workers=1)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == len(at_shard) > 2
    sizes = [tensor_bytes(p) for p in shards]
    assert [done for _, done in at_shard] == [sum(sizes[:i + 1]) for i in range(len(sizes))]
    assert sum(reported) == plan.nbytes and all(n > 0 for n in reported)
    assert len(reported) == sum(1 for op in plan.ops if op.nbytes)  # one report per tensor
    reported.clear()
    at_shard.clear()
    execute(plan, readers, tmp_path / "moe4", shard_size=recipe.shard_size, written=reported.append,
            progress=lambda n, total: at_shard.append((n, total)), workers=4)
    assert sorted(reported) == sorted(op.nbytes for op in plan.ops if op.nbytes)
    assert at_shard == [(i + 1, len(shards)) for i in range(len(shards))]


def run_main(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["moemerge", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["upcycle", "graft"])
def test_ctrl_c_in_upcycle_or_graft_says_nothing_written(tmp_path, monkeypatch, capsys, command):
    import mergekit_lite.ops.graft as graft
    import mergekit_lite.ops.upcycle as upcycle

    monkeypatch.setattr(upcycle, "run_upcycle", interrupt)
    monkeypatch.setattr(graft, "run_graft", interrupt)
    (tmp_path / "x.yaml").write_text("source: m\nnum_experts: 4\nexperts_per_token: 2\n")  # upcycle validates first
    code, _, err = run_main(monkeypatch, capsys, command, str(tmp_path / "x.yaml"), "-o", str(tmp_path / "o"))
    assert code == 130 and err.strip() == "interrupted, nothing written"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run of a dense pico Llama (checkpoint at step 2): its recipe file, output, echo lines
    and the DDP kwargs the accelerator was built with."""
    root = tmp_path_factory.mktemp("progress")
    train_txt, val_txt = write_corpus(root / "corpus")
    dense = build_pico_model("llama", root / "dense", texts=stdlib_docstrings(), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    recipe = root / "train.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(dense), "data": {"train": [str(train_txt)], "validation": [str(val_txt)]}, "seq_len": 32,
        "micro_batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-3, "eval_batches": 1,
        "output": str(root / "run")}))
    handlers, lines = [], []
    real = train_run.make_accelerator
    mp = pytest.MonkeyPatch()
    mp.setattr(train_run, "make_accelerator", lambda **kw: handlers.extend(kw["kwargs_handlers"]) or real(**kw))
    try:
        summary = loop.train(load_recipe(recipe, TrainRecipe), progress=False, echo=lines.append)
    finally:
        mp.undo()
    return {"recipe": recipe, "out": root / "run", "lines": lines, "handlers": handlers, "summary": summary,
            "dense": dense}


def test_train_starts_with_a_header(finished):
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(finished["dense"])).parameters())
    head = finished["lines"][:4]
    assert head[0] == (f"train {finished['dense']}: {n / 1e6:.2f}M parameters, {n / 1e6:.2f}M active per token "
                       "(all trainable)")
    assert re.fullmatch(r"  data: \d+ train / \d+ validation blocks of 32 tokens; 128 tokens per step x 2 steps",
                        head[1]), head[1]
    blocks = int(head[1].split()[1])
    kept, total, dropped = map(int, re.fullmatch(r"  train tokens: (\d+) kept in blocks of (\d+) \((\d+) dropped: "
                                                 r"the last partial block\)", head[2]).groups())
    assert kept == 32 * blocks and 0 <= dropped == total - kept < 32  # every token but one partial block
    assert head[3] == f"  output: {finished['out']}"


def test_ddp_searches_unused_parameters_only_where_one_can_miss_its_gradient(finished, pico_factory):
    """transformers 5 fuses each layer's experts into one parameter that always takes part: no search (DDP warns
    when it searches and finds nothing); experts as separate modules would need it."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_lite.train.model import unused_parameters_possible

    (kw,) = finished["handlers"]
    assert kw.find_unused_parameters is False
    fused = AutoModelForCausalLM.from_pretrained(str(pico_factory("mixtral")))
    assert not unused_parameters_possible(fused)
    per_expert = torch.nn.Module()
    per_expert.mlp = torch.nn.Module()
    per_expert.mlp.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    assert unused_parameters_possible(per_expert)
    per_expert.requires_grad_(False)  # frozen experts cannot miss a gradient they never get
    assert not unused_parameters_possible(per_expert)
    assert has_experts({"num_local_experts": 8}) and has_experts({"text_config": {"num_experts": 4}})


def test_resume_of_a_finished_run_says_so_and_exits_0(finished, monkeypatch, capsys):
    mtime = (finished["out"] / "metrics.jsonl").stat().st_mtime_ns
    code, out, err = run_main(monkeypatch, capsys, "train", str(finished["recipe"]), "--resume")
    assert code == 0, err
    s = finished["summary"]
    assert out.replace("\n", "") == (
        f"{finished['out']} already finished (step 2, final val loss {s['final_val_loss']:.4f}; model in "
        f"{finished['out'] / 'final'}): nothing to resume. To train again, pass --overwrite or choose another output")
    assert "tokens/s" not in out and (finished["out"] / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_ctrl_c_in_train_says_which_checkpoints_remain(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "train", interrupt)
    code, _, err = run_main(monkeypatch, capsys, "train", str(finished["recipe"]))
    ckpt = finished["out"] / "checkpoints" / "step-0000002"
    assert code == 130 and err.replace("\n", "") == (
        f"interrupted; checkpoints already written remain (latest {ckpt}); continue with --resume")
    code, _, err = run_main(monkeypatch, capsys, "train", str(finished["recipe"]), "-o", str(tmp_path / "fresh"))
    assert code == 130 and err.replace("\n", "") == f"interrupted; no checkpoint or final model written in " \
                                                     f"{tmp_path / 'fresh'}"


def test_the_header_says_when_the_run_repeats_its_data(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    from mergekit_lite.train.run import run_header

    class Blocks:  # a loader over 10 blocks
        dataset = list(range(10))

    r = load_recipe(finished["recipe"], TrainRecipe)
    model = AutoModelForCausalLM.from_pretrained(str(finished["dense"]))
    lines = run_header(model, finished["dense"], Blocks, Blocks, r, tokens_per_step=32 * 4, max_steps=5)
    assert "  note: the run sees its training data 2.0 times (20 blocks from 10); add data or shorten the run" in \
        "\n".join(lines)
    once = run_header(model, finished["dense"], Blocks, Blocks, r, tokens_per_step=32 * 2, max_steps=5)
    assert not any("note:" in ln for ln in once)

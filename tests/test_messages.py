"""What a user reads: one-line preflight errors, recipe hints, inspect's table, --help, upcycle --shard-size."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergekit_lite.check import check_folder
from mergekit_lite.cli import app
from mergekit_lite.errors import MoemergeError
from mergekit_lite.hub import push_folder
from mergekit_lite.io.sidefiles import read_sidecar, write_sidecar
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.recipe import TrainRecipe, UpcycleRecipe, validate_recipe

runner = CliRunner()
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot run")


def _recipe(tmp_path, source, **kw):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"source": str(source), "num_experts": 4, "experts_per_token": 2, **kw}))
    return p


@no_cuda
def test_hidden_router_on_missing_cuda_fails_before_the_plan(tmp_path, pico_llama):
    router = {"init": "hidden", "prompts": [["def f(x):"], ["The cat"], ["1 + 2 ="], ["import os"]]}
    lines: list[str] = []
    out = tmp_path / "moe"
    with pytest.raises(MoemergeError) as e:
        run_upcycle(_recipe(tmp_path, pico_llama, router=router), out, device="cuda", echo=lines.append)
    assert "--device cuda" in str(e.value) and "\n" not in str(e.value)
    assert lines == []  # no plan printed, and nothing written
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "r.yaml"]


@no_cuda
def test_verify_on_missing_cuda_is_one_line(tmp_path, pico_llama):
    result = runner.invoke(app, ["verify", str(pico_llama), "--against", str(pico_llama), "--device", "cuda:1"])
    assert isinstance(result.exception, MoemergeError), result.output
    assert str(result.exception).startswith("--device cuda:1:") and "\n" not in str(result.exception)


def _run_folder(tmp_path, pico_llama, finished: bool):
    run = tmp_path / "runs" / "cpt"
    run.mkdir(parents=True)
    (run / "moemerge-run.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    if finished:
        shutil.copytree(pico_llama, run / "final")
    return run


@pytest.mark.parametrize("finished", [True, False])
def test_push_and_check_of_a_run_folder_point_at_final(tmp_path, pico_llama, finished):
    run = _run_folder(tmp_path, pico_llama, finished)
    for call in (lambda: check_folder(run), lambda: push_folder(run, "org/name", dry_run=True, echo=print)):
        with pytest.raises(MoemergeError) as e:
            call()
        msg = str(e.value)
        assert "run folder" in msg and str(run / "final") in msg and "config.json" not in msg
        assert ("its model is in" in msg) == finished
    if finished:
        assert check_folder(run / "final").architecture == "LlamaForCausalLM"


def _error(data, model) -> str:
    with pytest.raises(MoemergeError) as e:
        validate_recipe(data, model)
    return str(e.value)


TRAIN = {"model": "m", "data": {"train": ["a.txt"]}, "seq_len": 8, "micro_batch_size": 1, "max_steps": 5,
         "learning_rate": 1e-3, "output": "o"}


def test_recipe_hints_suggest_the_meant_key_only():
    msg = _error({**TRAIN, "lr": 3}, TrainRecipe)
    assert "lr = 3: unknown key (did you mean 'learning_rate'?)" in msg and "lora" not in msg
    assert "did you mean 'learning_rate'?" in _error({**TRAIN, "learnig_rate": 1}, TrainRecipe)  # a typo
    assert "did you mean 'r'?" in _error({**TRAIN, "lora": {"rank": 4}}, TrainRecipe)  # alias inside a section
    # inside a list of sections (experts: [...]) the section's own keys are offered
    up = {"source": "s", "num_experts": 4, "experts_per_token": 2}
    assert "did you mean 'prompts'?" in _error({**up, "experts": [{"source": "a", "promts": ["x"]}]}, UpcycleRecipe)
    # nothing close: no guess (`lrate` is as near to `lora` as `lr` was), the known keys instead
    for key in ("zzz", "lrate"):
        msg = _error({**TRAIN, key: 1}, TrainRecipe)
        assert "remove it; known keys here:" in msg and "did you mean" not in msg


def test_router_as_a_string_says_what_a_mapping_looks_like():
    msg = _error({"source": "s", "num_experts": 4, "experts_per_token": 2, "router": "random"}, UpcycleRecipe)
    assert "router = 'random': must be a mapping" in msg and "`router: {init: random}`" in msg
    assert "RouterInit" not in msg


def test_inspect_prints_a_table(tmp_path, pico_llama):
    out = tmp_path / "moe"
    run_upcycle(_recipe(tmp_path, pico_llama, dtype="float32"), out, echo=lambda s: None)
    assert runner.invoke(app, ["verify", str(out), "--against", str(pico_llama), "--device", "cpu"]).exit_code == 0
    record = read_sidecar(out)
    record["training"] = {"steps": 6, "tokens_per_s": 3695.27, "mfu": None, "data": ["a.txt", "b.txt"]}
    write_sidecar(out, record)
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "{" not in text and "None" not in text and "'" not in text, text
    assert re.search(r"^ {6}max_abs +\d\.\d+e-\d\d$", text, re.M), text  # aligned row, readable number
    assert re.search(r"^ {6}tokens_per_s +3,695$", text, re.M) and "mfu" not in text
    assert re.search(r"^ {6}data +a\.txt, b\.txt$", text, re.M)
    rows = [line for line in text.splitlines() if line.startswith("      ") and not line.startswith("       ")]
    assert len({len(line) - len(line.split()[-1]) for line in rows if len(line.split()) == 2}) == 1  # one column


@pytest.mark.parametrize("command", ["upcycle", "train", "graft", "push"])
def test_help_has_names_not_type_noise(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=120)
    assert result.exit_code == 0
    text = result.output
    assert "<bool>" not in text and "{recipe}" not in text and "{model}" not in text, text
    if command in ("upcycle", "train"):
        assert "RECIPE" in text
    if command == "upcycle":
        assert "--shard-size" in text


def test_upcycle_shard_size_flag_wins_over_recipe(tmp_path, pico_llama):
    recipe = _recipe(tmp_path, pico_llama, dtype="float32", shard_size="5GB")
    result = runner.invoke(app, ["upcycle", str(recipe), "-o", str(tmp_path / "small"), "--shard-size", "200KB"])
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "small").glob("*.safetensors"))
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert runner.invoke(app, ["upcycle", str(recipe), "-o", str(tmp_path / "one")]).exit_code == 0
    assert len(list((tmp_path / "one").glob("*.safetensors"))) == 1
    bad = runner.invoke(app, ["upcycle", str(recipe), "-o", str(tmp_path / "x"), "--shard-size", "lots"])
    assert isinstance(bad.exception, MoemergeError) and "--shard-size 'lots'" in str(bad.exception)
    assert not (tmp_path / "x").exists()

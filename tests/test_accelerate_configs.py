"""The shipped accelerate configs, read the way `accelerate launch` reads them (accelerate 1.15's own code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.dataclasses import get_module_class_from_name
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
EXPECTED = {"cpu-2proc.yaml": DistributedType.MULTI_GPU, "ddp.yaml": DistributedType.MULTI_GPU,
            "fsdp.yaml": DistributedType.FSDP, "deepspeed-zero2.yaml": DistributedType.DEEPSPEED,
            "deepspeed-zero3.yaml": DistributedType.DEEPSPEED}


def launch_env(name: str) -> tuple[object, dict[str, str]]:
    """(parsed launch args, worker environment) exactly as `accelerate launch --config_file NAME x.py` builds them."""
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / name), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def meta_model(family: str):
    """A pico model of `family` on the meta device (class structure only, no weights allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_lite.pico import pico_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(pico_config(family, 64))


def test_every_shipped_config_is_listed():
    assert sorted(p.name for p in ROOT.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_says_how_to_launch(name):
    cfg = load_config_from_file(str(ROOT / name))
    assert cfg.distributed_type == EXPECTED[name]
    text = (ROOT / name).read_text()
    assert text.startswith("#")
    assert f"accelerate launch --config_file recipes/accelerate/{name} -m mergekit_lite train" in text


def test_cpu_2proc_goes_through_torchrun_with_two_workers():
    """MULTI_CPU would go to accelerate's simple launcher: one process unless mpirun is configured."""
    args, env = launch_env("cpu-2proc.yaml")
    assert args.multi_gpu and args.use_cpu and args.nproc_per_node == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_fsdp_wraps_each_family_decoder_layer():
    """No class list in the file: accelerate's TRANSFORMER_BASED_WRAP then wraps the model's `_no_split_modules`
    (a listed class the model lacks would raise), so one file serves Mixtral, Qwen-MoE and dense families."""
    _, env = launch_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"  # FSDP2: the only one that runs on CPU
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"  # only the main process reads the weights
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    for family, layer in [("mixtral", "MixtralDecoderLayer"), ("qwen2_moe", "Qwen2MoeDecoderLayer"),
                          ("qwen3_moe", "Qwen3MoeDecoderLayer"), ("llama", "LlamaDecoderLayer")]:
        model = meta_model(family)
        assert set(model._no_split_modules) == {layer}
        assert get_module_class_from_name(model, layer) is type(model.model.layers[0])


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_leave_batch_clipping_and_moe_classes_to_the_recipe(stage):
    """The batch, clipping and precision come from the recipe (engine.configure_deepspeed) and the ZeRO-3 leaves
    from the model, so no value here can silently disagree with the recipe or name a class a family lacks."""
    _, env = launch_env(f"deepspeed-zero{stage}.yaml")
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    for name in ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING",
                 "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES"):
        assert name not in env, name
    if stage == 3:
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"


def test_deepspeed_not_installed_is_one_line(monkeypatch):
    import importlib.util

    from mergekit_lite.errors import MoemergeError
    from mergekit_lite.train.engine import make_accelerator

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(MoemergeError, match=r"asks for DeepSpeed, which is not installed; pip install deepspeed"):
        make_accelerator()


def test_deepspeed_clipping_of_its_own_is_refused_and_the_batch_is_the_recipes():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mergekit_lite.errors import MoemergeError
    from mergekit_lite.train.engine import configure_deepspeed

    cfg = {"gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": "auto"}
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=4,
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=cfg)))
    with pytest.raises(MoemergeError, match=r"gradient_clipping: 0.5 but the recipe's max_grad_norm is 1.0"):
        configure_deepspeed(acc, 2, 3, 1.0)
    cfg["gradient_clipping"] = "auto"
    configure_deepspeed(acc, 2, 3, 1.0)
    assert cfg == {"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
                   "train_batch_size": 24}


PROBE = """
import json, os, sys, torch
from accelerate import Accelerator
from mergekit_lite.train.engine import wants_cpu_processes
# the train loop's rule: under torchrun without CUDA, ask accelerate for CPU processes (gloo)
acc = Accelerator(cpu=wants_cpu_processes())
total = acc.reduce(torch.tensor([acc.process_index + 1.0]), "sum").item()
with open(os.path.join(sys.argv[1], f"rank{acc.process_index}.json"), "w") as f:
    json.dump({"world": acc.num_processes, "type": str(acc.distributed_type), "sum": total}, f)
# leaving with the gloo group alive aborts a worker now and then ("terminate called without an active exception")
acc.wait_for_everyone()
acc.end_training()
"""


def test_cpu_2proc_really_starts_two_communicating_processes(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "cpu-2proc.yaml"), str(tmp_path / "probe.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r == {"world": 2, "type": "DistributedType.MULTI_CPU", "sum": 3.0} for r in ranks)


def test_fsdp1_on_cpu_processes_is_refused_with_the_fix(monkeypatch):
    """torch's FSDP1 rejects accelerate's CPU device ('Inconsistent compute device and `device_id`'): say so first."""
    from mergekit_lite.errors import MoemergeError
    from mergekit_lite.train.engine import make_accelerator

    for k, v in {"ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(MoemergeError, match="fsdp_version: 1 .* set `fsdp_version: 2`"):
        make_accelerator()

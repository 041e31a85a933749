"""The shipped accelerate configs load with accelerate's own config reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
EXPECTED = {"ddp.yaml": DistributedType.MULTI_GPU, "fsdp.yaml": DistributedType.FSDP,
            "deepspeed-zero3.yaml": DistributedType.DEEPSPEED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    cfg = load_config_from_file(str(ROOT / name))
    assert cfg.distributed_type == EXPECTED[name]
    assert (ROOT / name).read_text().startswith("#")


def test_fsdp_wraps_decoder_layers_and_deepspeed_registers_moe_leaves():
    fsdp = load_config_from_file(str(ROOT / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    ds = load_config_from_file(str(ROOT / "deepspeed-zero3.yaml")).deepspeed_config
    assert ds["zero_stage"] == 3
    assert "MixtralSparseMoeBlock" in ds["deepspeed_moe_layer_cls_names"]


def test_moe_model_names_its_decoder_layer(tmp_path):
    """What FSDP's wrap policy uses when the config names no class: the model's own `_no_split_modules`."""
    from transformers import AutoModelForCausalLM

    from mergekit_lite.pico import pico_config

    model = AutoModelForCausalLM.from_config(pico_config("mixtral", 64, num_local_experts=2))
    assert "MixtralDecoderLayer" in model._no_split_modules

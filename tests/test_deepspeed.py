"""`moemerge train` under DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes (CPU over gloo; GPUs where there are 2).

Marked `distributed`, like tests/test_distributed.py, whose helpers launch the runs: the shipped
recipes/accelerate/deepspeed-zero{2,3}.yaml, a 6-step recipe with `global_batch_size: 8`, compared with one
process of the same recipe. Needs `deepspeed` (in the `test` extra); DeepSpeed's shared-memory op is not built.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_distributed import (  # noqa: F401  (world is a fixture)
    CONFIGS,
    KILL_AFTER_CHECKPOINT,
    LAUNCH,
    assert_same_run,
    env_for,
    final_weights,
    launch,
    records,
    reference,
    world,
)

pytest.importorskip("deepspeed", reason="pip install deepspeed (the test extra has it)")
pytestmark = pytest.mark.distributed


def zero(stage: int) -> list[str]:
    return [*LAUNCH, "--config_file", str(CONFIGS / f"deepspeed-zero{stage}.yaml")]


def assert_deepspeed(out, stage: int) -> None:
    s = records(out, "summary")[-1]
    assert s["distributed_type"] == "DEEPSPEED" and s["zero_stage"] == stage and s["processes"] == 2, s


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_zero_two_processes_match_one(world, model, stage):
    two = launch(world, f"zero{stage}-{model}", model, [*zero(stage), "-m", "mergekit_lite"], "cpu")
    assert_deepspeed(two, stage)
    assert_same_run(reference(world, model, "cpu"), two)


@pytest.mark.parametrize("family", ["glm4_moe", "ernie4_5_moe", "moemerge_gemma3"])
def test_zero3_moves_the_saved_selection_bias_as_one_process(world, family):
    """glm4_moe holds size-0 shared experts and a bias buffer; ERNIE's bias is a parameter ZeRO-3 partitions."""
    fields = {"moe": {"bias_update_rate": 0.5}}
    two = launch(world, f"zero3-{family}", family, [*zero(3), "-m", "mergekit_lite"], "cpu", **fields)
    assert_deepspeed(two, 3)
    one = reference(world, family, "cpu", **fields)
    assert_same_run(one, two)
    bias = {k: v for k, v in final_weights(two).items() if k.endswith("e_score_correction_bias")}
    assert len(bias) == 2, bias


def test_zero3_lora_saves_the_merged_model_and_the_adapter(world):
    fields = {"trainable": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "w1", "w3",
                                                                                       "w2"]}}
    two = launch(world, "zero3-lora", "moe", [*zero(3), "-m", "mergekit_lite"], "cpu", **fields)
    assert_same_run(reference(world, "moe", "cpu", **fields), two)
    assert (two / "adapter" / "adapter_model.safetensors").is_file()


def test_zero3_killed_after_a_checkpoint_resumes_bit_for_bit_and_only_on_as_many_processes(world):
    (world["root"] / "kill.py").write_text(KILL_AFTER_CHECKPOINT)
    whole = launch(world, "zero3-whole", "moe", [*zero(3), "-m", "mergekit_lite"], "cpu")
    cut = launch(world, "zero3-cut", "moe", [*zero(3), str(world["root"] / "kill.py")], "cpu", check=False)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-0000003"]
    # DeepSpeed's partitions are per process: one process is refused in one line, before anything is loaded
    alone = subprocess.run([sys.executable, "-m", "mergekit_lite", "train", str(world["root"] / "zero3-cut.yaml"),
                            "--resume"], capture_output=True, text=True, timeout=300, env=env_for("cpu"))
    assert alone.returncode != 0 and "checkpoint format deepspeed-zero3-2 -> dcp" in alone.stderr, alone.stderr[-2000:]
    assert "Traceback" not in alone.stderr
    launch(world, "zero3-cut", "moe", [*zero(3), "-m", "mergekit_lite"], "cpu", "--resume")
    assert [r["loss"] for r in records(cut, "train")] == [r["loss"] for r in records(whole, "train")]
    a, b = final_weights(whole), final_weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

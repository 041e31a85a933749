"""PEER and MH-MoE upcycles (issue 27) trained on 2 CPU processes (DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 over gloo)
with `trainable: added`:
the same run as one process accumulating two micro-batches (marker `distributed`, launched as a user launches them).

One known difference, by design of BatchNorm: each process updates the query BatchNorm's running statistics from its
own micro-batch (rank 0's are saved), where one process updates them once per micro-batch. Training losses use batch
statistics and match; the running statistics and the validation loss (which uses them) agree only approximately.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_deepspeed import assert_deepspeed, zero
from test_distributed import ONE, assert_engine, engine_cmd, env_for, final_weights, launch, records
from test_train import build_world

from mergekit_lite.ops.upcycle import run_upcycle

pytestmark = pytest.mark.distributed

BLOCKS = {"peer": {"num_experts": 256, "experts_per_token": 4, "block": {"kind": "peer", "heads": 2, "key_dim": 8}},
          "mh_moe": {"num_experts": 4, "experts_per_token": 2, "block": {"kind": "mh_moe", "heads": 2}}}
RUN = {"trainable": "added", "learning_rate": 1e-2}


@pytest.fixture(scope="module")
def bworld(tmp_path_factory):
    world = {**build_world(tmp_path_factory.mktemp("dist-blocks")), "refs": {}}
    for kind, fields in BLOCKS.items():
        recipe = world["root"] / f"up-{kind}.yaml"
        recipe.write_text(yaml.safe_dump({"source": str(world["dense"]), "architecture": "moemerge",
                                          "dtype": "float32", "seed": 3, **fields}))
        run_upcycle(recipe, world["root"] / kind, echo=lambda _: None)
        world[kind] = world["root"] / kind
    return world


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("kind", BLOCKS)
def test_blocks_train_the_same_on_two_processes(bworld, kind, engine):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="pip install deepspeed (the test extra has it)")
    if kind not in bworld["refs"]:
        bworld["refs"][kind] = launch(bworld, f"one-{kind}", kind, ONE, "cpu", **RUN)
    one = bworld["refs"][kind]
    if engine.startswith("zero"):  # DeepSpeed ZeRO-2/3 over gloo, the shipped launch configs
        stage = int(engine[-1])
        if (kind, stage) == ("mh_moe", 3):  # refused in one line on every process, before any step
            out = launch(bworld, f"{engine}-{kind}", kind, ["true"], "cpu", **RUN)  # writes the recipe only
            run = subprocess.run([*zero(stage), "-m", "mergekit_lite", "train", str(out) + ".yaml"],
                                 capture_output=True, text=True, timeout=300, env=env_for("cpu"))
            assert run.returncode != 0 and "mh_moe cannot train under DeepSpeed ZeRO-3" in run.stderr, run.stderr[-2000:]
            assert "[rank0]: Traceback" not in run.stderr and "[rank1]: Traceback" not in run.stderr  # one line each
            assert not (out / "final").exists()  # (the launcher's own ChildFailedError trace follows the lines)
            return
        two = launch(bworld, f"{engine}-{kind}", kind, [*zero(stage), "-m", "mergekit_lite"], "cpu", **RUN)
        assert_deepspeed(two, stage)
    else:
        two = launch(bworld, f"{engine}-{kind}", kind, engine_cmd("cpu", engine), "cpu", **RUN)
        assert_engine(two, engine, "cpu")
    a = [r["loss"] for r in records(one, "train")]
    b = [r["loss"] for r in records(two, "train")]
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    for kind_ in ("router", "peer"):  # statistics count every process's tokens
        for ra, rb in zip(records(one, kind_), records(two, kind_), strict=True):
            field = "load" if kind_ == "router" else "used"
            assert torch.allclose(torch.tensor(ra[field]), torch.tensor(rb[field]), atol=1e-6), (ra, rb)
    va, vb = records(one, "val")[-1]["val_loss"], records(two, "val")[-1]["val_loss"]
    assert abs(va - vb) <= (1e-5 if kind == "mh_moe" else 1e-3), (va, vb)
    ref, got = final_weights(one), final_weights(two)
    assert ref.keys() == got.keys()
    source = load_file(str(bworld[kind] / "model.safetensors"))
    for k in ref:
        if "query_norm.running_" in k:
            continue  # per-process BatchNorm statistics (module docstring)
        assert (got[k] - ref[k]).abs().max() <= 1e-5, k
        if k in source and ".added." not in k and not k.endswith("gate.weight"):
            assert torch.equal(got[k], source[k]), k  # trainable: added leaves the source bit-identical

"""PEER and MH-MoE upcycles (issue 27) trained on 2 CPU processes (DDP and FSDP2 over gloo) with `trainable: added`:
the same run as one process accumulating two micro-batches (marker `distributed`, launched as a user launches them).

One known difference, by design of BatchNorm: each process updates the query BatchNorm's running statistics from its
own micro-batch (rank 0's are saved), where one process updates them once per micro-batch. Training losses use batch
statistics and match; the running statistics and the validation loss (which uses them) agree only approximately.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import ONE, assert_engine, engine_cmd, final_weights, launch, records
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


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", BLOCKS)
def test_blocks_train_the_same_on_two_processes(bworld, kind, engine):
    if kind not in bworld["refs"]:
        bworld["refs"][kind] = launch(bworld, f"one-{kind}", kind, ONE, "cpu", **RUN)
    one = bworld["refs"][kind]
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

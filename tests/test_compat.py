"""Why each private attribute in train/compat.py is written, on the versions installed: each test shows the
behaviour the write works around, so an upgrade that changes it fails here."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from mergekit_lite.train import compat


def _experts(impl: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    experts = MixtralExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    return experts


def test_batched_mm_experts_need_the_flag_to_take_index_e_as_no_expert():
    x = torch.randn(6, 8)
    idx, w = torch.tensor([[0, 4]] * 6), torch.tensor([[1.0, 0.0]] * 6)  # second choice unsent: index E = 4
    experts = _experts("batched_mm")
    with pytest.raises(IndexError):  # what training would hit on its first capacity drop without the flag
        experts(x, idx, w)
    assert compat.experts_skip_index_e(experts)
    assert torch.equal(experts(x, idx, w), experts(x, idx[:, :1], w[:, :1]))  # index E computes nothing
    eager = _experts("eager")  # eager skips it on its own: the flag changes nothing there
    assert torch.equal(eager(x, idx, w), eager(x, idx[:, :1], w[:, :1]))
    assert not compat.experts_skip_index_e(torch.nn.Linear(2, 2))  # not an experts module: refused, untouched


ACCELERATE_PROBE = textwrap.dedent("""
    import os
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    plain = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin()).distributed_type.value
    AcceleratorState._reset_state(True)
    from mergekit_lite.train.engine import make_accelerator
    ours = make_accelerator().distributed_type.value
    print("TYPES", plain, ours)
""")


def test_accelerate_turns_an_fsdp_launch_on_cpu_processes_into_ddp_unless_marked(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(ACCELERATE_PROBE)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(script)],
                         capture_output=True, text=True, timeout=300)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("TYPES")), run.stdout + run.stderr)
    assert line == "TYPES MULTI_CPU FSDP"  # accelerate alone: plain DDP; make_accelerator: FSDP (mark_fsdp)


def test_deepspeed_cpu_backend_builds_its_shm_op_at_start_unless_skipped():
    pytest.importorskip("deepspeed")
    import inspect

    import deepspeed.comm.torch  # noqa: F401

    module = sys.modules["deepspeed.comm.torch"]
    assert "build_shm_op()" in inspect.getsource(module.TorchBackend.__init__)  # what compiles C++ at start-up
    real = module.build_shm_op
    try:
        compat.skip_deepspeed_shm_build()
        assert module.build_shm_op() is None
    finally:
        module.build_shm_op = real

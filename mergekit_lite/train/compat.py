"""Every private attribute of transformers, accelerate or DeepSpeed that training still writes, one function each.

Each says why the public API does not reach it and which version needs it; tests/test_compat.py checks the
behaviour each one works around, so an upgrade that makes one unnecessary (or breaks it) shows up as a failure
there rather than as a silently different run.
"""

from __future__ import annotations

import sys
from typing import Any


def experts_skip_index_e(experts: Any) -> bool:
    """Make a transformers experts module treat index E (one past the last expert) as "no expert"; returns
    whether it can.

    Capacity drops and GShard's unsent second choice write index E with weight 0. transformers 5.x's `eager`
    experts skip any index >= E by themselves; `grouped_mm` and `batched_mm` do so only when the module's
    `_is_expert_parallel` is set (the flag its expert parallelism sets for the same purpose): grouped_mm then
    sorts those rows past the last expert and computes nothing for them; batched_mm computes them with weight 0.
    Without the flag batched_mm fails with an IndexError, and grouped_mm leaves the rows past the last expert
    to whatever its kernel makes of them (transformers 5.25). No public option sets it.
    """
    if not hasattr(experts, "_is_expert_parallel"):
        return False
    experts._is_expert_parallel = True
    return True


def mark_fsdp(accelerator: Any, plugin: Any) -> None:
    """Set an Accelerator built with `cpu=True` to FSDP, as `AcceleratorState.__init__` does on a GPU machine.

    accelerate 1.10 to 1.16 only turns a launch into FSDP from its GPU/XPU/NPU distributed types, so on CPU
    processes (gloo) an FSDP launch config silently trains plain DDP; torch's FSDP2 runs there all the same.
    The state is shared by every `PartialState`, so its shared dict is set too.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def skip_deepspeed_shm_build() -> None:
    """Keep DeepSpeed 0.16 to 0.19's CPU backend from compiling its shared-memory all-reduce op at start-up.

    `deepspeed.comm.torch.TorchBackend` builds `deepspeed_shm_comm` (minutes of C++ on first start) whenever
    the CPU accelerator is in use; the op serves inference all-reduce only, never training over gloo.
    """
    import deepspeed.comm.torch  # noqa: F401  (the module, not torch, which deepspeed.comm also names `torch`)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]

"""Which accelerate engine a training run gets (one process, DDP, FSDP2), on GPUs or on CPU processes.

Under torchrun on a machine without GPUs, processes can only talk over gloo, and accelerate 1.15 asks for
`Accelerator(cpu=True)` for that. Its `AcceleratorState` then settles on MULTI_CPU and never reaches the branch
that turns a run into FSDP (that branch is taken from MULTI_GPU/MULTI_XPU/... only), so an FSDP launch config
silently trains plain DDP. torch's FSDP2 (`fully_shard`) does run on CPU over gloo, so on such a machine we
build the FSDP plugin from the launcher's environment, exactly as accelerate would, and mark the state FSDP the
way `AcceleratorState` does on a GPU machine; `accelerator.prepare` then shards the model with `fully_shard`.
FSDP1 cannot run there: torch's FSDP1 rejects accelerate's CPU device (`Inconsistent compute device and
device_id on rank 0: cpu vs cpu:0`), so it is refused with the fix.
"""

from __future__ import annotations

import os

from mergekit_lite.errors import MoemergeError


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def is_main_process() -> bool:
    """True on the process that prints: rank 0 under torchrun/`accelerate launch` (they set RANK), or a lone one.

    Read from the launcher's environment, so it holds before the Accelerator exists and in the CLI's error path.
    """
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def wants_cpu_processes() -> bool:
    """True when this run's processes must use the CPU: torchrun without CUDA, or ACCELERATE_USE_CPU set."""
    import torch  # here, not at the top: the CLI imports this module for is_main_process on every command

    return ("LOCAL_RANK" in os.environ and not torch.cuda.is_available()) or _flag("ACCELERATE_USE_CPU")


def make_accelerator(**kwargs):
    """`accelerate.Accelerator(**kwargs)`, with FSDP2 honoured on CPU processes (gloo) as well as on GPUs.

    Args:
        **kwargs: passed to `Accelerator` (everything but `cpu` and `fsdp_plugin`, which are decided here).

    Returns:
        The Accelerator; its `distributed_type` is FSDP whenever the launch environment asks for FSDP.
    """
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    cpu = wants_cpu_processes()
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise MoemergeError("this launch config asks for DeepSpeed, which `moemerge train` does not drive yet; "
                            "use recipes/accelerate/fsdp.yaml (FSDP2 shards parameters, gradients and optimizer "
                            "state as ZeRO-3 does) or ddp.yaml")
    plugin = FullyShardedDataParallelPlugin() if cpu and _flag("ACCELERATE_USE_FSDP") else None  # reads FSDP_*
    if plugin is not None and plugin.fsdp_version != 2:
        raise MoemergeError(f"fsdp_version: {plugin.fsdp_version} cannot run on CPU processes (torch's FSDP1 "
                            "needs an accelerator device); set `fsdp_version: 2` in the accelerate config")
    accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin, **kwargs)
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # what AcceleratorState.__init__ does for FSDP on a GPU machine; the device (cpu) and the gloo process
        # group stay as accelerate set them up
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def load_model(model_dir, accelerator):
    """The model in fp32 (master weights). Under FSDP2 with `fsdp_cpu_ram_efficient_loading`, only the main
    process reads the weights: the others build the model on the meta device (buffers computed, e.g. RoPE's
    inv_freq) and receive their shards from it at `prepare`, so no process but one holds the model whole."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    plugin = accelerator.state.fsdp_plugin if uses_fsdp(accelerator) else None
    if plugin is not None and plugin.cpu_ram_efficient_loading and not accelerator.is_main_process:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)), dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def prepare_sharding(accelerator, model) -> None:
    """Keep FSDP2 off modules whose parameters are all empty (an upcycle's size-0 shared expert: torch's
    `fully_shard` fails on them with `_chunk_cat expects non-empty tensor`). They hold no number to shard or
    reduce, so leaving them out changes nothing; a module mixing empty and non-empty parameters is refused."""
    if not uses_fsdp(accelerator):
        return
    empty = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        sizes = [p.numel() for p in own]
        if own and not any(sizes):
            empty.append(module)
        elif 0 in sizes:
            raise MoemergeError(f"{name} holds empty and non-empty parameters; FSDP2 can shard neither way. "
                                "Train it with DDP (recipes/accelerate/ddp.yaml)")
    if empty:
        plugin = accelerator.state.fsdp_plugin
        if isinstance(plugin.ignored_modules, str):
            raise MoemergeError("fsdp_ignored_modules is set in the launch config; moemerge sets it itself for the "
                                "model's empty modules: remove it from the config")
        plugin.ignored_modules = [*(plugin.ignored_modules or []), *empty]


def describe_engine(accelerator, model) -> dict:
    """What actually trains the model: accelerate's distributed type, processes, FSDP version, sharded tensors.

    Fails loudly when FSDP was asked for but `prepare` left the parameters whole (no DTensor), since the run
    would then silently be something other than what the launch config says.
    """
    from accelerate.utils import DistributedType

    dtype = accelerator.distributed_type
    info = {"distributed_type": dtype.value, "processes": accelerator.num_processes}
    if dtype == DistributedType.FSDP:
        from torch.distributed.tensor import DTensor

        params = [p for p in model.parameters() if p.numel()]  # empty ones are left out (prepare_sharding)
        sharded = sum(isinstance(p, DTensor) for p in params)
        plugin = accelerator.state.fsdp_plugin
        version = plugin.fsdp_version
        if version == 2 and sharded != len(params):
            raise RuntimeError(f"FSDP2 left {len(params) - sharded} of {len(params)} parameters unsharded "
                               f"(model type {type(model).__name__})")
        mp = plugin.mixed_precision_policy
        info |= {"fsdp_version": version, "sharded_params": sharded,
                 "reshard_after_forward": bool(plugin.reshard_after_forward),
                 "sharded_loading": bool(plugin.cpu_ram_efficient_loading),
                 "param_dtype": str(getattr(mp, "param_dtype", None) or "float32").removeprefix("torch."),
                 "reduce_dtype": str(getattr(mp, "reduce_dtype", None) or getattr(mp, "param_dtype", None)
                                     or "float32").removeprefix("torch.")}
    info["mixed_precision"] = accelerator.mixed_precision
    return info

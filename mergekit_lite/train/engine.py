"""Which accelerate engine a training run gets (one process, DDP, FSDP2, DeepSpeed), on GPUs or on CPU processes.

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

from mergekit_lite.errors import MoemergeError, PeerWaitError, first_line


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
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from mergekit_lite.train import compat

    cpu = wants_cpu_processes()
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return _deepspeed_accelerator(cpu, **kwargs)
    plugin = FullyShardedDataParallelPlugin() if cpu and _flag("ACCELERATE_USE_FSDP") else None  # reads FSDP_*
    if plugin is not None and plugin.fsdp_version != 2:
        raise MoemergeError(f"fsdp_version: {plugin.fsdp_version} cannot run on CPU processes (torch's FSDP1 "
                            "needs an accelerator device); set `fsdp_version: 2` in the accelerate config")
    accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin, **kwargs)
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        compat.mark_fsdp(accelerator, plugin)  # the device (cpu) and the gloo group stay as accelerate set them
    return accelerator


def _deepspeed_accelerator(cpu: bool, **kwargs):
    """An Accelerator whose state is DEEPSPEED, on GPUs or on CPU processes.

    accelerate's `cpu=True` never becomes DEEPSPEED (it settles on MULTI_CPU: a silent DDP run), so CPU
    processes are started as non-CPU ones with a gloo process group, which DeepSpeed's CPU accelerator uses.
    DeepSpeed's shared-memory all-reduce op (`deepspeed_shm_comm`) is not built there: it serves inference
    all-reduce only, and building it compiles C++ for minutes on first start.
    """
    import importlib.util

    from accelerate import Accelerator, InitProcessGroupKwargs

    if importlib.util.find_spec("deepspeed") is None:
        raise MoemergeError("this launch config asks for DeepSpeed, which is not installed; pip install deepspeed "
                            "(or pip install 'mergekit-lite[deepspeed]'), or launch with recipes/accelerate/fsdp.yaml")
    if cpu:
        from mergekit_lite.train import compat

        compat.skip_deepspeed_shm_build()
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(cpu=False, **kwargs)


def default_precision(requested: str | None) -> str:
    """The recipe's mixed precision, or by default bf16 on a CUDA GPU that supports it and fp32 elsewhere
    (a recipe copied onto GPUs should not train in fp32 by accident; CPU bf16 autocast is slow)."""
    import torch

    if requested is not None:
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def allow_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs (fp32 master weights keep fp32 storage; the matmuls use
    TF32's 10-bit mantissa, the common training default); nothing elsewhere."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def check_attention(name: str) -> None:
    """Refuse an attention kernel that is not installed, in one line, before anything loads."""
    import importlib.util

    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise MoemergeError("attn_implementation = 'flash_attention_2' needs the flash-attn package (pip install "
                            "flash-attn, on a CUDA GPU); or use attn_implementation: sdpa")


def uses_deepspeed(accelerator) -> bool:
    """True when accelerate set the run up for DeepSpeed."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage, or None when the run does not use DeepSpeed."""
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else None


def configure_deepspeed(accelerator, micro_batch_size: int, accumulation: int, max_grad_norm: float) -> None:
    """Hand DeepSpeed the recipe's batch and clipping (its config cannot read them from a loader built from a
    batch sampler, and a clipping value of its own would silently differ from the recipe's)."""
    if not uses_deepspeed(accelerator):
        return
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    clip = cfg.get("gradient_clipping", "auto")
    if clip not in ("auto", None) and float(clip) != float(max_grad_norm):
        raise MoemergeError(f"the launch config sets DeepSpeed gradient_clipping: {clip} but the recipe's "
                            f"max_grad_norm is {max_grad_norm}; remove gradient_clipping from the launch config "
                            "(moemerge sets it from the recipe)")
    cfg.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=accumulation,
               train_batch_size=micro_batch_size * accumulation * accelerator.num_processes,
               gradient_clipping=max_grad_norm)


def uses_fsdp(accelerator) -> bool:
    """True when accelerate set the run up for FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def load_model(model_dir, accelerator, attn_implementation: str = "sdpa", trust_remote_code: bool = False):
    """The model in fp32 (master weights). Under FSDP2 with `fsdp_cpu_ram_efficient_loading`, only the main
    process reads the weights: the others build the model on the meta device (buffers computed, e.g. RoPE's
    inv_freq) and receive their shards from it at `prepare`, so no process but one holds the model whole."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from mergekit_lite.models import load_causal_lm, load_config, trust_for

    trust = trust_for(model_dir, trust_remote_code, "model")  # own moemerge code comes from this package

    plugin = accelerator.state.fsdp_plugin if uses_fsdp(accelerator) else None
    if plugin is not None and plugin.cpu_ram_efficient_loading and not accelerator.is_main_process:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(load_config(model_dir, trust_remote_code=trust),
                                                    dtype=torch.float32, attn_implementation=attn_implementation,
                                                    trust_remote_code=trust)
    ds = accelerator.state.deepspeed_plugin if uses_deepspeed(accelerator) else None
    if ds is not None and zero_stage(accelerator) == 3 and not ds.zero3_init_flag:
        # accelerate registers the ZeRO-3 config with transformers, whose from_pretrained then loads under
        # zero.Init even with zero3_init_flag false: load whole (as the launch config says), shard at prepare
        from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            return load_causal_lm(model_dir, trust_remote_code=trust, dtype=torch.float32,
                                  attn_implementation=attn_implementation)
        finally:
            set_hf_deepspeed_config(ds.dschf)
    return load_causal_lm(model_dir, trust_remote_code=trust, dtype=torch.float32,
                          attn_implementation=attn_implementation)


def prepare_sharding(accelerator, model) -> None:
    """What an engine needs from the model before `prepare`: ZeRO-3 leaves for the MoE blocks.

    Raises:
        MoemergeError: an MH-MoE model under ZeRO-3, whose backward reads an expert parameter ZeRO-3 has already
            released (DeepSpeed 0.19, on every process at once, before any step); ZeRO-2, DDP and FSDP2 train it.
    """
    if zero_stage(accelerator) == 3:
        if getattr(getattr(model, "config", None), "block_kind", None) == "mh_moe":
            raise MoemergeError("block kind mh_moe cannot train under DeepSpeed ZeRO-3 yet (its backward reads an "
                                "expert parameter ZeRO-3 has released); launch with recipes/accelerate/"
                                "deepspeed-zero2.yaml or fsdp.yaml")
        _zero3_leaves(model)


def _zero3_leaves(model) -> None:
    """Make every MoE block (the module holding a router) a ZeRO-3 leaf: its experts are fetched as one unit,
    so processes whose tokens chose different experts never wait on each other's parameter fetches. Read from
    the model itself, so every family gets its own block class (a launch config naming one class fails on
    the others)."""
    from deepspeed.utils import set_z3_leaf_modules

    from mergekit_lite.train.moe import find_routers

    blocks = {type(model.get_submodule(name.rpartition(".")[0])) for name, _ in find_routers(model)}
    if blocks:
        set_z3_leaf_modules(model, sorted(blocks, key=lambda c: c.__name__))


def compile_layers(model) -> int:
    """`torch.compile` every decoder layer in place (`nn.Module.compile`); returns how many.

    Regional compilation: the layers share one class, so one compilation serves them all (compiling the whole
    model takes minutes more). In place rather than `torch.compile(model)`, whose wrapper renames every
    parameter (`_orig_mod.`) and bypasses the module hooks FSDP2 and the router taps rely on. The layer
    classes are the model's `_no_split_modules`, which transformers keeps for every family.
    """
    classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise MoemergeError(f"compile: true, but {type(model).__name__} names no decoder layer class "
                            "(_no_split_modules); set compile: false")
    for layer in layers:
        layer.compile()
    return len(layers)


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

        params = list(model.parameters())
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
    if dtype == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin
        zero = ds.deepspeed_config.get("zero_optimization", {})
        info |= {"zero_stage": ds.zero_stage, "zero3_init": bool(ds.zero3_init_flag),
                 "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
                 "offload_param": zero.get("offload_param", {}).get("device", "none")}
    info["mixed_precision"] = accelerator.mixed_precision
    return info


def main_builds(accelerator, what: str, build, timeout_minutes: float):
    """Run `build()` on the main process while the others wait, at most `timeout_minutes`, then return its result
    on every process (the others call `build()` too once it is done: it then only reads what the main one wrote).

    A plain barrier waits for the process group's own timeout (30 minutes on gloo, 10 on NCCL) and then fails
    without saying for what; and when the main process fails (a data error), the others hang until then. Here
    the main process sends its outcome on a gloo group of its own with the run's timeout: a failure is raised on
    every process with the main one's message, and a wait that runs out names `what` it waited for.
    """
    import datetime

    import torch.distributed as dist

    if accelerator.num_processes == 1 or not dist.is_initialized():
        return build()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            result = build()
        except MoemergeError as e:
            outcome = [str(e)]
            _send(outcome, group, what, timeout_minutes)
            raise
        _send(outcome, group, what, timeout_minutes)
        dist.destroy_process_group(group)
        return result
    try:
        dist.broadcast_object_list(outcome, src=0, group=group)
    except Exception as e:  # noqa: BLE001 - gloo reports a timeout or a lost peer as a RuntimeError of its own
        raise PeerWaitError(f"process {accelerator.process_index} waited for the main process to {what} and gave "
                            f"up ({first_line(e)[:200]}); the main process may have failed or still be working: see "
                            f"its output, or raise data.wait_minutes (now {timeout_minutes:g})") from None
    dist.destroy_process_group(group)
    if outcome[0] is not None:
        raise MoemergeError(outcome[0])
    return build()


def _send(outcome: list, group, what: str, timeout_minutes: float) -> None:
    """The main process's side of `main_builds`: its outcome to the others, who may have stopped waiting."""
    import torch.distributed as dist

    try:
        dist.broadcast_object_list(outcome, src=0, group=group)
    except Exception as e:  # noqa: BLE001 - as above
        raise PeerWaitError(f"the other processes stopped waiting for the main process to {what} "
                            f"({first_line(e)[:200]}); raise data.wait_minutes (now {timeout_minutes:g}) and rerun: "
                            "the finished part is cached") from None

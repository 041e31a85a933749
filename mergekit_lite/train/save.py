"""The final plain Hugging Face model of a training run (checkpoints: `checkpoint.py`).

The final model goes through the project's one model writer (`io.write_model_folder`: size-capped
shards streamed one tensor at a time, atomic folder; then config/tokenizer/sidecar/card), in the
per-expert Hub layout: transformers v5 holds fused 3-D expert tensors in memory, and
`revert_weight_conversion` (what its `save_pretrained` uses) maps them back to the on-disk names.
Both saves check free disk first, so a full disk fails before anything is written.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mergekit_lite.card import write_card
from mergekit_lite.io import TensorEntry, write_model_folder
from mergekit_lite.io.folders import RunFolder
from mergekit_lite.io.sidefiles import finish_folder
from mergekit_lite.io.writer import preflight_disk
from mergekit_lite.plan import DTYPES
from mergekit_lite.provenance import recipe_record
from mergekit_lite.train.moe import NOISE_PARAM


def hub_state_dict(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory names (fused experts) -> the Hub's per-expert on-disk names."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers keep the on-disk names in memory
        return state
    return revert_weight_conversion(model, state)


def save_final(accelerator, model, tokenizer_dir: Path, config: dict[str, Any], out: Path, *, lora: bool,
               save_dtype: str, shard_size: int, recipe_text: str, training: dict,
               echo: Callable[[str], None] = print, workers: int | None = None) -> Path | None:
    """Write OUTPUT/final: a plain HF folder (LoRA merged; the adapter also in OUTPUT/adapter), with a card.

    Streamed on every engine: the tensors are gathered one at a time (under FSDP2 each process takes part in
    every gather, in the same order) and the main process writes each one as it comes, so no process holds
    the whole model. `workers` writer threads (None: the writer's default for the disk).
    """
    dtype = None if save_dtype == "source" else DTYPES[save_dtype]
    dtype = dtype or DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)
    model = accelerator.unwrap_model(model)  # FSDP2 shards in place: the same module, its tensors DTensors
    hf = model.get_base_model() if lora else model
    tied = bool(config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"))
    sources = final_sources(model, lora, tied)
    # the Hub's per-expert names and shapes, from the in-memory shapes alone (meta tensors: nothing gathered)
    plan = [(name, [(k, tuple(v.shape)) for k, v in hub_state_dict(hf, {name: _meta(t)}).items()])
            for name, t, _ in sources]
    entries_bytes = sum(math.prod(shape) for _, outs in plan for _, shape in outs) * dtype.itemsize
    preflight_disk(RunFolder(out).final, entries_bytes)  # every process: all raise together, before any gather
    if lora:
        adapter = {k: _full(v) for k, v in model.state_dict().items() if ".lora_" in k}  # small: gathered whole
        if accelerator.is_main_process:
            model.save_pretrained(str(RunFolder(out).adapter), state_dict=adapter)
    sharded = any(_is_shard(t) for _, t, _ in sources)
    if sharded and not accelerator.is_main_process:
        for _ in _gathered(hf, sources, dtype):  # take part in every gather the main process's writer asks for
            pass
        return None
    if not accelerator.is_main_process:
        return None
    if sharded:  # gathers are collectives: the writer asks in declaration order (one dtype, interleave=False)
        stream = _gathered(hf, sources, dtype)

        def make(key: str) -> torch.Tensor:
            got, tensor = next(stream)
            while tensor.numel() == 0:  # empty tensors are made apart (below), on whatever thread writes them
                got, tensor = next(stream)
            if got != key:
                raise AssertionError(f"save_final: the writer asked for {key}, the gather stream holds {got}")
            return tensor
    else:  # whole tensors in this process: any order, made on the writer's threads for several shards at once
        made: dict[str, dict[str, torch.Tensor]] = {}  # source name -> its Hub tensors not yet taken
        lock = threading.Lock()

        def make(key: str) -> torch.Tensor:
            src = by_key[key]
            with lock:
                if src[0] not in made:
                    made[src[0]] = dict(_gathered(hf, [src], dtype))
                outs = made[src[0]]
                tensor = outs.pop(key)
                if not outs:
                    del made[src[0]]
            return tensor

        by_key = {k: src for src, (_, outs) in zip(sources, plan) for k, _ in outs}
    # a tensor already whole, on the CPU, in the save dtype is written from the model's own memory
    free = {k for src, (_, outs) in zip(sources, plan) for k, _ in outs
            if not sharded and not src[2] and src[1].dtype == dtype and src[1].device.type == "cpu"}
    entries = [TensorEntry(k, shape, dtype, partial(torch.empty, shape, dtype=dtype) if 0 in shape else
                           partial(make, k), cost=0 if k in free else None)
               for _, outs in plan for k, shape in outs]
    config = {**config, "dtype": str(dtype).removeprefix("torch.")}
    record = recipe_record("train", recipe_text, [tokenizer_dir], {"training": training})

    def finish(tmp: Path) -> None:
        finish_folder(tmp, config, tokenizer_dir, record)
        write_card(tmp, record, config, tokenizer_dir)

    return write_model_folder(RunFolder(out).final, entries, shard_size=shard_size, overwrite=True, finish=finish,
                              echo=echo, workers=workers, interleave=not sharded)


def final_sources(model, lora: bool, tied: bool) -> list[tuple[str, torch.Tensor, list]]:
    """(in-memory HF name, the model's tensor (a DTensor shard under FSDP2), LoRA layers adding to it), in
    state-dict order: training-only parameters (W_noise), LoRA factors and a tied lm_head left out."""
    deltas: dict[int, list] = {}
    if lora:
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer):
                target = (module.get_param() if hasattr(module, "get_param")
                          else module.get_base_layer().weight)
                deltas.setdefault(id(target), []).append(module)
    sources = []
    for key, t in model.state_dict(keep_vars=True).items():
        name = key.removeprefix("base_model.model.").replace(".base_layer", "") if lora else key
        if ".lora_" in key or name.endswith(NOISE_PARAM) or (tied and name == "lm_head.weight"):
            continue
        sources.append((name, t, deltas.get(id(t), [])))
    return sources


def _gathered(hf, sources, dtype: torch.dtype):
    """Yield (Hub key, CPU tensor in `dtype`) for every source in order, LoRA merged; one source whole at a time.

    Every process runs it to the end: each gather is a collective under FSDP2."""
    for name, t, layers in sources:
        full = _full(t).detach()
        for layer in layers:
            full = full + _lora_delta(layer).to(full.dtype)
        for key, v in hub_state_dict(hf, {name: full}).items():
            yield key, v.to("cpu", dtype).contiguous()
        del full


def _lora_delta(layer) -> torch.Tensor:
    """peft's own `get_delta_weight` of one LoRA layer, run on gathered (whole) factors: a stand-in holding
    them replaces the layer, whose factors may be FSDP2 shards."""
    adapter = layer.active_adapters[0]
    whole = SimpleNamespace(**{attr: getattr(layer, attr) for attr in
                               ("fan_in_fan_out", "num_experts", "_did_swap_in_out_features", "scaling")
                               if hasattr(layer, attr)})
    whole.lora_A = {adapter: SimpleNamespace(weight=_full(layer.lora_A[adapter].weight))}
    whole.lora_B = {adapter: SimpleNamespace(weight=_full(layer.lora_B[adapter].weight))}
    if hasattr(layer, "get_param"):
        param = _meta(layer.get_param())
        whole.get_param = lambda: SimpleNamespace(dtype=param.dtype, device=torch.device("cpu"))
    return type(layer).get_delta_weight(whole, adapter)


def _is_shard(t: torch.Tensor) -> bool:
    """A part of a tensor spread over processes: an FSDP2 DTensor, or a parameter ZeRO-3 partitioned."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) or hasattr(t, "ds_id")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when it is a shard (a collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor()
    if hasattr(t, "ds_id"):  # ZeRO-3: gathered for the duration of the block, copied out
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.data.detach().clone()
    return t


def _meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of `t`'s whole shape (a DTensor's shape is the whole one; ZeRO-3 keeps it in ds_shape)."""
    return torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta")

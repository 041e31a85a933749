"""Checkpoints (accelerate state, written atomically) and the final plain Hugging Face model.

The final model goes through the project's one model writer (`io.write_model_folder`: size-capped
shards streamed one tensor at a time, atomic folder; then config/tokenizer/sidecar/card), in the
per-expert Hub layout: transformers v5 holds fused 3-D expert tensors in memory, and
`revert_weight_conversion` (what its `save_pretrained` uses) maps them back to the on-disk names.
Both saves check free disk first, so a full disk fails before anything is written.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from mergekit_lite.card import write_card
from mergekit_lite.io import TensorEntry, write_model_folder
from mergekit_lite.io.sidefiles import finish_folder
from mergekit_lite.io.writer import preflight_disk
from mergekit_lite.plan import DTYPES
from mergekit_lite.provenance import recipe_record
from mergekit_lite.train.moe import NOISE_PARAM


def save_checkpoint(accelerator, out: Path, step: int, state: dict, keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed when complete; keeps the last `keep`."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    preflight_disk(final, checkpoint_bytes(accelerator))  # every process: all raise together, none waits
    if accelerator.is_main_process:  # this step's, and any a killed run left (a .tmp is never resumed from)
        for stale in (out / "checkpoints").glob("step-???????.tmp"):
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        tmp.rename(final)
        for old in sorted((out / "checkpoints").glob("step-???????"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def checkpoint_bytes(accelerator) -> int:
    """Estimated size of `save_state`: each prepared model's parameters and buffers in their dtype,
    two fp32 Adam moments per trainable parameter, and 1 MB for RNG, scheduler and sampler states."""
    total = 1_000_000
    for model in accelerator._models:  # what save_state itself walks (no public accessor)
        for p in model.parameters():
            total += p.numel() * (p.element_size() + (8 if p.requires_grad else 0))
        total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


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

    `workers` writer threads (None: the writer's default for the disk); tensors already on the CPU in the
    save dtype are written from the model's own memory, so any number of them go at once.
    """
    state = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards onto the main process
    # training-only parameters (noisy top-k's W_noise) are not part of the saved HF class
    state = {k: v for k, v in state.items() if not k.endswith(NOISE_PARAM)}
    if not accelerator.is_main_process:
        return None
    dtype = None if save_dtype == "source" else DTYPES[save_dtype]
    src_dtype = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)
    dtype = dtype or src_dtype
    target = out / "final"
    # Before the adapter is written: the unmerged state (base + LoRA) in the save dtype covers both folders.
    preflight_disk(target, sum(v.numel() for v in state.values()) * dtype.itemsize)
    base = accelerator.unwrap_model(model)
    if lora:
        base.save_pretrained(str(out / "adapter"))  # the LoRA adapter alone, before it is merged
        base = base.merge_and_unload()
        state = base.state_dict()
    state = hub_state_dict(base, state)
    if config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    config = {**config, "dtype": str(dtype).removeprefix("torch.")}
    # Each tensor is moved/cast only when the writer reaches it: one tensor at a time, not a model copy.
    entries = [TensorEntry(k, tuple(v.shape), dtype, partial(_to_cpu, v, dtype), cost=_new_bytes(v, dtype))
               for k, v in state.items()]
    record = recipe_record("train", recipe_text, [tokenizer_dir], {"training": training})

    def finish(tmp: Path) -> None:
        finish_folder(tmp, config, tokenizer_dir, record)
        write_card(tmp, record, config, tokenizer_dir)

    return write_model_folder(target, entries, shard_size=shard_size, overwrite=True, finish=finish, echo=echo,
                              workers=workers)


def _to_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype)


def _new_bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """Memory `_to_cpu` allocates: none when the tensor already is a contiguous CPU tensor in `dtype`."""
    same = t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
    return 0 if same else t.numel() * dtype.itemsize

"""Checkpoints (accelerate state, written atomically) and the final plain Hugging Face model.

The final model goes through the project's own writer (size-capped zero-copy shards, atomic
folder, config/tokenizer/sidecar/card), in the per-expert Hub layout: transformers v5 holds fused
3-D expert tensors in memory, and `revert_weight_conversion` (what its `save_pretrained` uses)
maps them back to the on-disk names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.io import AtomicDir, assign_shards, shard_names, write_index, write_shard
from mergekit_lite.io.sidefiles import finish_folder
from mergekit_lite.plan import DTYPES
from mergekit_lite.provenance import recipe_record


def save_checkpoint(accelerator, out: Path, step: int, state: dict, keep: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed when complete; keeps the last `keep`."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
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


def hub_state_dict(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory names (fused experts) -> the Hub's per-expert on-disk names."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers keep the on-disk names in memory
        return state
    return revert_weight_conversion(model, state)


def save_final(accelerator, model, tokenizer_dir: Path, config: dict[str, Any], out: Path, *, lora: bool,
               save_dtype: str, shard_size: int, recipe_text: str, training: dict) -> Path | None:
    """Write OUTPUT/final: a plain HF folder (LoRA merged; the adapter also in OUTPUT/adapter), with a card."""
    state = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards onto the main process
    if not accelerator.is_main_process:
        return None
    base = accelerator.unwrap_model(model)
    if lora:
        base.save_pretrained(str(out / "adapter"))  # the LoRA adapter alone, before it is merged
        base = base.merge_and_unload()
        state = base.state_dict()
    state = hub_state_dict(base, state)
    if config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    dtype = None if save_dtype == "source" else DTYPES[save_dtype]
    src_dtype = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.float32)
    tensors = {k: v.detach().to("cpu", dtype or src_dtype).contiguous() for k, v in state.items()}
    config = {**config, "dtype": str((dtype or src_dtype)).removeprefix("torch.")}
    shards = assign_shards([(k, t.numel() * t.element_size()) for k, t in tensors.items()], shard_size)
    names = shard_names(len(shards))
    target = out / "final"
    with AtomicDir(target, overwrite=True) as tmp:
        for name, keys in zip(names, shards):
            write_shard(tmp / name, {k: tensors[k] for k in keys})
        if len(names) > 1:
            write_index(tmp, {k: n for n, keys in zip(names, shards) for k in keys},
                        sum(t.numel() * t.element_size() for t in tensors.values()))
        record = recipe_record("train", recipe_text, [tokenizer_dir], {"training": training})
        finish_folder(tmp, config, tokenizer_dir, record)
    return target

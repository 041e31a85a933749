"""Everything `train` decides before the first step: preflight checks, trainable set, data loaders, LR."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.recipe import TrainRecipe
from mergekit_lite.train.data import batch_order, packed_dataset, resolve_files, StreamedBlocks

_TRACKER_CHECK = {"tensorboard": "is_tensorboard_available", "mlflow": "is_mlflow_available",
                  "wandb": "is_wandb_available"}


def preflight(r: TrainRecipe, model_dir: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Fail before any training on what the user can fix; returns the model's config.json."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise MoemergeError(f"model: {model_dir} has no config.json; is this a Hugging Face model folder?")
    cfg = json.loads(cfg_path.read_text())
    max_pos = (cfg.get("text_config") or cfg).get("max_position_embeddings")
    if max_pos and r.seq_len > max_pos:
        raise MoemergeError(f"seq_len = {r.seq_len} is larger than the model's max_position_embeddings "
                            f"({max_pos}); set seq_len to at most {max_pos}")
    for field, specs in (("train", r.data.train), ("validation", r.data.validation)):
        if specs:
            resolve_files(specs, field)  # raises on a missing file/folder/glob
    if r.tracker != "none":
        import accelerate.utils as au

        if not getattr(au, _TRACKER_CHECK[r.tracker])():
            raise MoemergeError(f"tracker = {r.tracker!r} but its package is not installed; "
                                f"pip install {r.tracker}, or set tracker: none")
    if r.trainable == "new_layers" and not (read_sidecar(model_dir) or {}).get("new_layers"):
        raise MoemergeError(f"trainable = 'new_layers' but {model_dir}/moemerge.json records no new layers; "
                            "make the model with `moemerge graft --expand`, or pick another trainable mode")
    out = Path(r.output)
    started = (out / "checkpoints").exists() or (out / "metrics.jsonl").exists()
    if started and not resume:
        if not overwrite:
            raise MoemergeError(f"output {out} already holds a run; pass --resume to continue it "
                                "or --overwrite to start again")
        shutil.rmtree(out)
    if resume and not latest_checkpoint(out):
        raise MoemergeError(f"--resume: no checkpoint under {out / 'checkpoints'}; run without --resume first")
    return cfg


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return ckpts[-1] if ckpts else None


def trainable_parameters(model: nn.Module, mode: str, routers: list[nn.Module], new_layers: list[int]) -> list:
    """Freeze everything outside `mode` and return the parameters left trainable."""
    if mode in ("all", "lora"):  # peft has already frozen the base for lora
        return [p for p in model.parameters() if p.requires_grad]
    router_ids = {id(p) for r in routers for p in r.parameters()}
    prefixes = tuple(f"model.layers.{i}." for i in new_layers)
    keep = []
    for name, p in model.named_parameters():
        if mode == "routers":
            on = id(p) in router_ids
        elif mode == "routers+experts":
            on = id(p) in router_ids or ".experts." in name or ".shared_expert" in name
        else:  # new_layers
            on = name.startswith(prefixes)
        p.requires_grad_(on)
        if on:
            keep.append(p)
    if not keep:
        raise MoemergeError(f"trainable = {mode!r} selects no parameter of this model (is it an MoE model?)")
    return keep


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and other 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(r: TrainRecipe, step: int, max_steps: int) -> float:
    """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio` at max_steps."""
    if step < r.warmup_steps:
        return r.learning_rate * (step + 1) / r.warmup_steps
    progress = (step - r.warmup_steps) / max(1, max_steps - r.warmup_steps)
    floor = r.min_lr_ratio
    return r.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_loaders(r: TrainRecipe, tokenizer, model_dir: Path, accelerator, max_steps: int):
    """(train loader yielding every micro-batch of the run in order, validation loader)."""
    cache = Path(r.output) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    micro_batches = max_steps * r.gradient_accumulation_steps * accelerator.num_processes
    collate = _collate
    if r.data.streaming:
        train = StreamedBlocks(r.data.train, "train", r.data, tokenizer, r.seq_len,
                               skip=0 if r.data.validation else r.data.validation_blocks)
        val = (StreamedBlocks(r.data.validation, "validation", r.data, tokenizer, r.seq_len) if r.data.validation
               else StreamedBlocks(r.data.train, "train", r.data, tokenizer, r.seq_len, limit=r.data.validation_blocks))
        train_dl = torch.utils.data.DataLoader(train, batch_size=r.micro_batch_size, collate_fn=collate)
        val_dl = torch.utils.data.DataLoader(val, batch_size=r.micro_batch_size, collate_fn=collate)
        return train_dl, val_dl

    def packed(specs, field):
        return packed_dataset(specs, field, r.data, tokenizer, model_dir, r.seq_len, cache,
                              accelerator.is_main_process, accelerator.wait_for_everyone)

    train = packed(r.data.train, "train")
    if r.data.validation:
        val = packed(r.data.validation, "validation")
    else:
        split = train.train_test_split(test_size=r.data.validation_fraction, seed=r.seed, shuffle=True)
        train, val = split["train"], split["test"]
    if len(train) < r.micro_batch_size:
        raise MoemergeError(f"data.train packs into {len(train)} blocks of {r.seq_len} tokens, fewer than "
                            f"micro_batch_size={r.micro_batch_size}; add text or lower seq_len/micro_batch_size")
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < micro_batches:  # the whole run's batch order, fixed by the seed: exact resume
        batches += batch_order(len(train), r.micro_batch_size, r.seed, epoch)
        epoch += 1
    train_dl = torch.utils.data.DataLoader(train, batch_sampler=batches[:micro_batches], collate_fn=collate)
    val_dl = torch.utils.data.DataLoader(val, batch_size=r.micro_batch_size, shuffle=False, collate_fn=collate)
    return train_dl, val_dl


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([torch.as_tensor(row["input_ids"]) for row in rows])}


def steps_for(r: TrainRecipe, num_processes: int) -> int:
    """max_steps, or enough optimizer steps to see max_tokens."""
    if r.max_steps is not None:
        return r.max_steps
    per_step = r.seq_len * r.micro_batch_size * r.gradient_accumulation_steps * num_processes
    return max(1, math.ceil(r.max_tokens / per_step))

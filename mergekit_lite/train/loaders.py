"""The run's data loaders: every micro-batch of the run in a fixed order (cached, blended or streamed), and the
held-out validation blocks."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.folders import RunFolder
from mergekit_lite.recipe import TrainRecipe
from mergekit_lite.train.data import batch_order, blend_order, packed_dataset
from mergekit_lite.train.engine import main_builds
from mergekit_lite.train.stream import StreamedBlocks


def build_loaders(r: TrainRecipe, tokenizer, model_dir: Path, accelerator, max_steps: int):
    """(train loader yielding every micro-batch of the run in order, validation loader).

    The train order is one list of micro-batches for the whole run, a function of the seed only; accelerate
    deals micro-batch j to process j % N, so each optimizer step takes the same `global_batch` sequences in
    the same micro-batches on any process count. The validation loader is left unprepared: `evaluate`
    splits its batches over the processes itself, so validation does not depend on the process count.
    """
    cache = RunFolder(Path(r.output)).cache
    cache.mkdir(parents=True, exist_ok=True)
    micro_batches = max_steps * r.global_batch(accelerator.num_processes) // r.micro_batch_size
    collate = _collate
    if r.data.streaming:
        train = StreamedBlocks(r.data.train, "train", r.data, tokenizer, r.seq_len,
                               skip=0 if r.data.validation else r.data.validation_blocks,
                               shuffle=r.data.shuffle_buffer, seed=r.seed, weights=r.data.weights)
        val = (StreamedBlocks(r.data.validation, "validation", r.data, tokenizer, r.seq_len) if r.data.validation
               else StreamedBlocks(r.data.train, "train", r.data, tokenizer, r.seq_len, limit=r.data.validation_blocks,
                                   weights=r.data.weights))
        train_dl = torch.utils.data.DataLoader(train, batch_size=r.micro_batch_size, collate_fn=collate,
                                               generator=_own_rng(r.seed))
        val_dl = torch.utils.data.DataLoader(val, batch_size=r.micro_batch_size, collate_fn=collate,
                                             generator=_own_rng(r.seed))
        return train_dl, val_dl

    def packed(specs, field, part=None):
        return packed_dataset(specs, field, r.data, tokenizer, model_dir, r.seq_len, cache,
                              accelerator.is_main_process, on_main, part=part, seed=r.seed)

    def on_main(what, build):
        return main_builds(accelerator, what, build, r.data.wait_minutes)

    if r.data.weights:  # a blend: each entry packed on its own, blocks drawn in the weights' shares
        return _blended_loaders(r, packed, micro_batches, collate)
    if r.data.validation:
        train, val = packed(r.data.train, "train"), packed(r.data.validation, "validation")
    else:  # held-out documents, split before packing: no document on both sides
        train, val = packed(r.data.train, "train", "train"), packed(r.data.train, "train", "validation")
    if len(train) < r.micro_batch_size:
        raise MoemergeError(f"data.train packs into {len(train)} blocks of {r.seq_len} tokens, fewer than "
                            f"micro_batch_size={r.micro_batch_size}; add text or lower seq_len/micro_batch_size")
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < micro_batches:  # the whole run's batch order, fixed by the seed: exact resume
        batches += batch_order(len(train), r.micro_batch_size, r.seed, epoch)
        epoch += 1
    train_dl = torch.utils.data.DataLoader(train, batch_sampler=batches[:micro_batches], collate_fn=collate,
                                           generator=_own_rng(r.seed))
    val_dl = torch.utils.data.DataLoader(val, batch_size=r.micro_batch_size, shuffle=False, collate_fn=collate,
                                         generator=_own_rng(r.seed))
    return train_dl, val_dl


def _blended_loaders(r: TrainRecipe, packed, micro_batches: int, collate):
    """Loaders for a weighted blend of `data.train` entries (see `data.blend_order`)."""
    import datasets

    parts = [packed([spec], "train", None if r.data.validation else "train") for spec in r.data.train]
    vals = ([packed(r.data.validation, "validation")] if r.data.validation
            else [packed([spec], "train", "validation") for spec in r.data.train])
    train = datasets.concatenate_datasets(parts).with_format("torch")
    val = vals[0] if len(vals) == 1 else datasets.concatenate_datasets(vals).with_format("torch")
    counts = [getattr(p, "moemerge_counts", {}) for p in parts]
    train.moemerge_counts = {k: sum(c.get(k, 0) for c in counts) for k in ("tokens", "kept", "documents")}
    train.moemerge_sources = [(spec, len(p), w / sum(r.data.weights)) for spec, p, w in
                              zip(r.data.train, parts, r.data.weights)]
    order = blend_order([len(p) for p in parts], r.data.weights, micro_batches * r.micro_batch_size, r.seed)
    batches = [order[i:i + r.micro_batch_size] for i in range(0, len(order), r.micro_batch_size)]
    train_dl = torch.utils.data.DataLoader(train, batch_sampler=batches, collate_fn=collate,
                                           generator=_own_rng(r.seed))
    val_dl = torch.utils.data.DataLoader(val, batch_size=r.micro_batch_size, shuffle=False, collate_fn=collate,
                                         generator=_own_rng(r.seed))
    return train_dl, val_dl


def _own_rng(seed: int) -> torch.Generator:
    """A loader's own generator: starting a DataLoader draws a seed, which would otherwise come from the
    global RNG that jitter and dropout use, and shift them on a resumed run (which starts one more loader)."""
    return torch.Generator().manual_seed(seed)


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([torch.as_tensor(row["input_ids"]) for row in rows])}


def steps_for(r: TrainRecipe, num_processes: int) -> int:
    """max_steps, or enough optimizer steps to see max_tokens."""
    if r.max_steps is not None:
        return r.max_steps
    per_step = r.seq_len * r.global_batch(num_processes)
    return max(1, math.ceil(r.max_tokens / per_step))

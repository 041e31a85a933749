"""The executor: the only code that reads and writes tensor bytes.

It walks the plan shard by shard. Inside a shard, each source tensor is read (memory-mapped) and
cast at most once, and transforms that return their input unchanged (copies) make several output
entries point at the same memory, which `write_shard` writes without duplicating it. Peak memory
is therefore bounded by one output shard of *newly computed* tensors, however many experts copy
the same FFN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mergekit_lite.io import AtomicDir, CheckpointReader, assign_shards, shard_names, write_index, write_shard
from mergekit_lite.io.sidefiles import finish_folder
from mergekit_lite.ops.transforms import TRANSFORMS
from mergekit_lite.plan import Plan, Src, TensorOp


def materialize(op: TensorOp, readers: list[CheckpointReader], cache: dict) -> torch.Tensor:
    """Compute one output tensor; source reads are cached per (source, dtype) for the current shard."""
    inputs = []
    for src in op.srcs:
        ck = (src, op.dtype)
        if ck not in cache:
            cache[ck] = readers[src.model].get(src.key).to(op.dtype)
        inputs.append(cache[ck])
    out = TRANSFORMS[op.fn](inputs, op.shape, op.dtype, op.args)
    if tuple(out.shape) != tuple(op.shape):
        raise AssertionError(f"{op.key}: transform {op.fn} gave shape {tuple(out.shape)}, plan says {op.shape}")
    return out


def execute(plan: Plan, readers: list[CheckpointReader], output: str | Path, *, shard_size: int,
            overwrite: bool = False, finalize: Callable[[Path], None] | None = None,
            progress: Callable[[int, int], None] | None = None,
            echo: Callable[[str], None] | None = None) -> Path:
    """Write the plan's model folder atomically; returns the final path.

    `finalize(tmp_dir)` runs last, inside the temporary folder (model card, extra files). `echo` hears
    about temporary folders of killed runs that are cleaned up.
    """
    by_key = {op.key: op for op in plan.ops}
    shards = assign_shards([(op.key, op.nbytes) for op in plan.ops], shard_size)
    names = shard_names(len(shards))
    with AtomicDir(output, overwrite, echo=echo) as tmp:
        weight_map: dict[str, str] = {}
        for n, (name, keys) in enumerate(zip(names, shards)):
            cache: dict[tuple[Src, torch.dtype], torch.Tensor] = {}
            tensors = {k: materialize(by_key[k], readers, cache) for k in keys}
            write_shard(tmp / name, tensors)
            weight_map.update(dict.fromkeys(keys, name))
            del tensors, cache
            if progress:
                progress(n + 1, len(names))
        if len(names) > 1:
            write_index(tmp, weight_map, plan.nbytes)
        finish_folder(tmp, plan.config, plan.side_files_from, plan.record)
        if finalize:
            finalize(tmp)
    return Path(output)

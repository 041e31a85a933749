"""The executor: the only code that reads source tensor bytes for upcycle and graft.

Every op of the plan becomes a `TensorEntry` of the one model writer (`io.write_model_folder`),
which computes, writes and frees the tensors one at a time. Copies stay memory-mapped source views
and cost no RAM: several expert entries point at the same view. Source tensors cast to another
dtype are kept in a small cache so E experts copying one FFN cast it once; the cache holds at most
one largest output tensor of casts, so peak anonymous memory stays under about two largest output
tensors (one cached cast, one tensor being computed) whatever the model size, shard size or expert
count (tests/test_memory.py measures it).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from mergekit_lite.card import write_card
from mergekit_lite.io import CheckpointReader, TensorEntry, write_model_folder
from mergekit_lite.io.sidefiles import finish_folder
from mergekit_lite.ops.transforms import TRANSFORMS
from mergekit_lite.plan import Plan, Src, TensorOp


class SourceCache:
    """Source tensors in an op's dtype, reused by the ops that read them (E experts copy one FFN).

    A memory-mapped view in its stored dtype costs nothing and is always kept; casts allocate, so
    they are kept only up to `budget` bytes, least recently used evicted first (before the next
    cast is made, so old and new never sum above the budget).
    """

    def __init__(self, readers: list[CheckpointReader], budget: int):
        self.readers, self.budget, self.used = readers, budget, 0
        self.items: OrderedDict[tuple[Src, torch.dtype], tuple[torch.Tensor, int]] = OrderedDict()

    def get(self, src: Src, dtype: torch.dtype) -> torch.Tensor:
        key = (src, dtype)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        raw = self.readers[src.model].get(src.key)
        cost = 0 if raw.dtype == dtype else raw.numel() * dtype.itemsize
        while self.items and self.used + cost > self.budget:
            _, (_, freed) = self.items.popitem(last=False)
            self.used -= freed
        t = raw.to(dtype)
        if self.used + cost <= self.budget:
            self.items[key] = (t, cost)
            self.used += cost
        return t


def materialize(op: TensorOp, cache: SourceCache) -> torch.Tensor:
    """Compute one output tensor from its (cached) sources."""
    out = TRANSFORMS[op.fn]([cache.get(src, op.dtype) for src in op.srcs], op.shape, op.dtype, op.args)
    # a transform may return parts whose bytes, back to back, are the tensor (fused experts: E views of one
    # source, never stacked); gate and up of one expert are two parts (1, I, H) of a (E, 2I, H) tensor
    if isinstance(out, list):
        if sum(p.numel() for p in out) != op.numel:
            got = " + ".join(str(tuple(p.shape)) for p in out)
            raise AssertionError(f"{op.key}: transform {op.fn} gave parts {got}, plan says {op.shape}")
    elif tuple(out.shape) != tuple(op.shape):
        raise AssertionError(f"{op.key}: transform {op.fn} gave shape {tuple(out.shape)}, plan says {op.shape}")
    return out


def execute(plan: Plan, readers: list[CheckpointReader], output: str | Path, *, shard_size: int,
            overwrite: bool = False, finalize: Callable[[Path], None] | None = None,
            progress: Callable[[int, int], None] | None = None,
            written: Callable[[int], None] | None = None,
            echo: Callable[[str], None] | None = None) -> Path:
    """Write the plan's model folder atomically; returns the final path.

    Weights first, then config, side files and sidecar, then the model card (it reads the shards'
    headers), then `finalize(tmp_dir)` (extra files), all inside the temporary folder. `progress(done,
    total)` hears of each shard written, `written(nbytes)` of tensor bytes as they reach the file, and
    `echo` of temporary folders of killed runs that are cleaned up.
    """
    cache = SourceCache(readers, budget=max((op.nbytes for op in plan.ops), default=0))
    entries = [TensorEntry(op.key, tuple(op.shape), op.dtype, partial(materialize, op, cache)) for op in plan.ops]
    if written is not None:
        entries, shard_done = _counting(entries, written)
        progress = partial(_both, shard_done, progress)

    def finish(tmp: Path) -> None:
        finish_folder(tmp, plan.config, plan.side_files_from, plan.record)
        write_card(tmp, plan.record, plan.config, plan.side_files_from)
        if finalize:
            finalize(tmp)

    return write_model_folder(output, entries, shard_size=shard_size, overwrite=overwrite, finish=finish,
                              progress=progress, echo=echo)


def _counting(entries: list[TensorEntry], written: Callable[[int], None]):
    """Entries that report bytes written: the writer computes a tensor right after writing the one before
    it, and finishes a shard after its last tensor, so each report is exactly the bytes now in the file."""
    pending = [0]

    def flush() -> None:
        if pending[0]:
            written(pending[0])
        pending[0] = 0

    def make(entry: TensorEntry) -> "torch.Tensor":
        flush()  # the tensor before this one is in the file
        pending[0] = entry.nbytes
        return entry.make()

    return [TensorEntry(e.key, e.shape, e.dtype, partial(make, e)) for e in entries], flush


def _both(shard_done: Callable[[], None], progress: Callable[[int, int], None] | None, n: int, total: int) -> None:
    shard_done()
    if progress:
        progress(n, total)


@contextmanager
def byte_bar(total: int, label: str = "write", enabled: bool = True):
    """A tqdm bar over `total` output bytes (stderr); yields the `written(nbytes)` callback for `execute`."""
    from tqdm.auto import tqdm

    # decimal units, as the plan prints its output bytes; "B" after both counts ("1.20GB/3.70GB")
    fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1000, bar_format=fmt,
              disable=not enabled) as bar:
        yield bar.update

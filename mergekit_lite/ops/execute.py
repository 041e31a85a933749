"""The executor: the only code that reads source tensor bytes for upcycle and graft.

Every op of the plan becomes a `TensorEntry` of the one model writer (`io.write_model_folder`),
which computes, writes and frees the tensors with a bounded pool of writer threads. Copies stay
memory-mapped source views and cost no RAM: several expert entries point at the same view, and
any number of them are written at once. Source tensors cast to another dtype are kept in a small
cache so E experts copying one FFN cast it once. Peak anonymous memory stays under about two
largest output tensors whatever the model size, shard size, expert count or worker count
(tests/test_memory.py measures it): the cache holds at most one largest output tensor of casts,
and the writer admits computed tensors (each costed with the casts it holds, cached or evicted)
only while their bytes in flight stay under one largest output tensor.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from mergekit_lite.io import CheckpointReader, TensorEntry, write_model_folder
from mergekit_lite.io.pool import release_freed_memory
from mergekit_lite.io.sidefiles import finish_folder
from mergekit_lite.ops.transforms import TRANSFORMS
from mergekit_lite.plan import Plan, Src, TensorOp


class SourceCache:
    """Source tensors in an op's dtype, reused by the ops that read them (E experts copy one FFN).

    A memory-mapped view in its stored dtype costs nothing and is always kept; casts allocate, so
    they are kept only up to `budget` bytes, least recently used evicted first (before the next
    cast is made, so old and new never sum above the budget). Thread-safe: writer threads share it,
    and a cast is made once while the others wanting it wait. A cast evicted while a writer still
    uses it lives on in that writer, whose admission cost counts it (`op_cost`).
    """

    def __init__(self, readers: list[CheckpointReader], budget: int):
        self.readers, self.budget, self.used = readers, budget, 0
        self.items: OrderedDict[tuple[Src, torch.dtype], tuple[torch.Tensor, int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, src: Src, dtype: torch.dtype) -> torch.Tensor:
        """The source tensor cast to `dtype`, cached so that E experts cast their FFN once."""
        key = (src, dtype)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key][0]
            raw = self.readers[src.model].get(src.key)
            cost = 0 if raw.dtype == dtype else raw.numel() * dtype.itemsize
            evicted = False
            while self.items and self.used + cost > self.budget:
                _, (_, freed) = self.items.popitem(last=False)
                self.used -= freed
                evicted = True
            if evicted:  # casts under glibc's mmap threshold free into the heap: hand them back before the next
                release_freed_memory()  # (measured: a full cache of 11 MB casts + a 131 MB cast = 2x the budget)
            t = raw.to(dtype)
            if self.used + cost <= self.budget:
                self.items[key] = (t, cost)
                self.used += cost
            return t


def op_cost(op: TensorOp, readers: list[CheckpointReader]) -> int:
    """New memory an op's tensor may hold while it is made and written (the writer's admission cost).

    A copy (or a fused tensor of copies) costs its casts only (none: views of the memory map). Computed
    transforms work in float32: counted as two float32 copies of the output (drawn values, result)
    plus each source in float32.
    """
    casts = src_fp32 = 0
    for src in op.srcs:
        info = readers[src.model].info(src.key)
        casts += 0 if info.dtype == op.dtype else info.numel * op.dtype.itemsize
        src_fp32 += info.numel * 4
    return casts if _is_view(op) else casts + 8 * op.numel + src_fp32


def _is_view(op: TensorOp) -> bool:
    """A copy, or a fused tensor of copies: parts that are views of the sources (or of their casts)."""
    parts = op.args.get("parts") if op.fn == "fused" else None
    return op.fn == "copy" or (parts is not None and all(p["fn"] == "copy" for p in parts))


def prefetch(op: TensorOp, readers: list[CheckpointReader]) -> None:
    """Ask the OS to start reading an op's sources (they are written a little later)."""
    for src in op.srcs:
        readers[src.model].prefetch(src.key)


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
            overwrite: bool = False, finalize: Callable[[Path], object] | None = None,
            progress: Callable[[int, int], None] | None = None,
            written: Callable[[int], None] | None = None,
            echo: Callable[[str], None] | None = None, workers: int | None = None) -> Path:
    """Write the plan's model folder atomically; returns the final path.

    Weights first, then config, side files and sidecar, then `finalize(tmp_dir)` (the command's model card,
    rendered by `card.write_card`: it reads the shards' headers), all inside the temporary folder. `progress(done,
    total)` hears of each shard written, `written(nbytes)` of tensor bytes as they reach the file, and
    `echo` of temporary folders of killed runs that are cleaned up. `workers` writer threads (None:
    the writer's default for the output's disk); the bytes do not depend on it.
    """
    cache = SourceCache(readers, budget=max((op.nbytes for op in plan.ops), default=0))
    entries = [TensorEntry(op.key, tuple(op.shape), op.dtype, partial(materialize, op, cache),
                           cost=op_cost(op, readers), prefetch=partial(prefetch, op, readers)) for op in plan.ops]

    def finish(tmp: Path) -> None:
        finish_folder(tmp, plan.config, plan.side_files_from, plan.record)
        for name, data in plan.extra_files.items():
            (tmp / name).write_bytes(data)
        if finalize:
            finalize(tmp)

    # shards are written side by side unless sources are cast: the cast cache holds one tensor, and E
    # experts cast from one FFN must come one after another to share it
    casts = any(readers[s.model].info(s.key).dtype != op.dtype for op in plan.ops for s in op.srcs)
    return write_model_folder(output, entries, shard_size=shard_size, overwrite=overwrite, finish=finish,
                              progress=progress, echo=echo, workers=workers, written=written, interleave=not casts)


def run_plan_job(label: str, out: Path | None, inputs: list, make_plan: Callable[[], tuple[Plan, list]], *,
                 shard_size: int, workers: int | None, dry_run: bool, overwrite: bool, verbose: bool,
                 progress: bool, echo: Callable[[str], None],
                 before_write: Callable[[Plan], None] | None = None) -> Plan:
    """The one path of a plan-then-write command (`upcycle`, `graft`); returns the plan.

    Refuses an output that overlaps an input or holds what the tool did not write, then plans (`make_plan`
    returns the plan and its readers), prints the plan, stops there on `dry_run`, checks free disk, runs
    `before_write(plan)` (upcycle's prompt-based router), and writes the folder atomically: tensors, config,
    side files, sidecar and the model card (`card.write_card`).

    Args:
        label: the progress bar's name.
        out: the output folder (None only with `dry_run`).
        inputs: (what, path) of everything the command reads, for `refuse_overlap`.
        make_plan: builds (plan, readers) once the output is known to be writable.
        shard_size: largest shard in bytes.
        workers: writer threads (None: the writer's default for the output's disk).
        dry_run: print the plan and write nothing.
        overwrite: replace an output folder this tool wrote.
        verbose: list every output tensor in the printed plan.
        progress: show a bar over the output bytes (stderr).
        echo: where lines are printed.
        before_write: runs on the plan after the disk check, before any byte is written.
    """
    from mergekit_lite.card import write_card
    from mergekit_lite.errors import MoemergeError
    from mergekit_lite.io import refuse_overlap
    from mergekit_lite.io.writer import check_output, preflight_disk

    if out is None and not dry_run:
        raise MoemergeError("no output folder: pass -o/--output or set `output:` in the recipe")
    if out is not None:
        refuse_overlap(out, inputs)
        check_output(out, overwrite)
    plan, readers = make_plan()
    for line in plan.summary_lines(max_tensors=len(plan.ops) if verbose else 0):
        echo(line)
    if dry_run or out is None:
        return plan
    preflight_disk(out, plan.nbytes)
    if before_write is not None:
        before_write(plan)
    with byte_bar(plan.nbytes, label, enabled=progress) as written:  # bytes of tensors in the files
        execute(plan, readers, out, shard_size=shard_size, overwrite=overwrite, written=written, echo=echo,
                workers=workers,
                finalize=partial(write_card, record=plan.record, config=plan.config, source=plan.side_files_from))
    echo(f"wrote {out}")
    return plan


@contextmanager
def byte_bar(total: int, label: str = "write", enabled: bool = True):
    """A tqdm bar over `total` output bytes (stderr); yields the `written(nbytes)` callback for `execute`."""
    from tqdm.auto import tqdm

    # decimal units, as the plan prints its output bytes; "B" after both counts ("1.20GB/3.70GB")
    fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1000, bar_format=fmt,
              disable=not enabled) as bar:
        yield bar.update

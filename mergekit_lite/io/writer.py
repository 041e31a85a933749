"""Size-capped safetensors shards written zero-copy into a folder that appears only when complete.

`write_shard` hands `safetensors.serialize_file` raw pointers (`TensorSpec`), so entries that
share memory (E experts copied from one memory-mapped dense FFN) cost no extra RAM and each
tensor is one large `write`. `AtomicDir` builds the output in a hidden temporary folder beside
the target and renames it at the end: a crash or Ctrl-C never leaves a folder that looks like a
finished model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import TensorSpec, serialize_file

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.safety import OLD_TAG, TMP_TAG, clear_stale_temps, temp_path
from mergekit_lite.plan import format_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class AtomicDir:
    """Context manager yielding a temporary folder that is renamed to `target` on success only."""

    def __init__(self, target: str | Path, overwrite: bool = False, echo: Callable[[str], None] | None = None):
        self.target = Path(target).resolve()
        self.overwrite = overwrite
        self.echo = echo  # told about temporary folders of killed runs removed on entry
        check_output(self.target, overwrite)
        self.tmp = temp_path(self.target, TMP_TAG)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_temps(self.target, self.echo)  # a kill -9 leaves them; their PID tells they are dead
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _fsync_dir(self.tmp)
        if self.target.exists():  # overwrite was allowed by check_output
            old = temp_path(self.target, OLD_TAG)
            self.target.rename(old)
            self.tmp.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.target)
        _fsync_dir(self.target.parent)


def check_output(target: str | Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless `overwrite`; refuse a file in its place always."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise MoemergeError(f"output {target} exists and is a file; choose another output path")
    if target.exists() and not overwrite and any(target.iterdir()):
        raise MoemergeError(f"output folder {target} already exists; pass --overwrite to replace it")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def assign_shards(sizes: list[tuple[str, int]], shard_size: int) -> list[list[str]]:
    """Greedy, order-preserving split of (key, nbytes) into shards of at most `shard_size` bytes.

    A tensor larger than `shard_size` gets a shard of its own (as in transformers).
    """
    shards: list[list[str]] = [[]]
    used = 0
    for key, nbytes in sizes:
        if shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """Hugging Face file names: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_shard(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write tensors (any device, any layout) as one safetensors file; returns the bytes of tensor data.

    Tensors that already live contiguous on the CPU (memory-mapped source views included) are
    written straight from their memory; others are moved/compacted first.
    """
    specs, alive, total = {}, [], 0
    for key, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.to("cpu").contiguous()
        alive.append(t)  # serialize_file needs the memory alive until it returns
        nbytes = t.numel() * t.element_size()
        total += nbytes
        specs[key] = TensorSpec(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                                data_ptr=t.data_ptr(), data_len=nbytes)
    serialize_file(specs, str(path), metadata={"format": "pt", **(metadata or {})})
    _fsync_file(path)
    del alive
    return total


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_index(folder: str | Path, weight_map: dict[str, str], total_size: int, extra: dict | None = None) -> None:
    """Write `model.safetensors.index.json` (only meaningful when there are several shards)."""
    meta = {"total_size": total_size, **(extra or {})}
    body = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_FILE).write_text(json.dumps(body, indent=2) + "\n")


def preflight_disk(output: Path, nbytes: int) -> None:
    """Refuse before writing when the output's filesystem cannot hold the estimated output."""
    probe = output.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(nbytes * 1.02) + 1_000_000
    if free < need:
        raise MoemergeError(f"not enough free disk for {output}: need about {format_bytes(need)}, "
                            f"{format_bytes(free)} free on {probe}")

"""Size-capped safetensors shards, streamed one tensor at a time into a folder that appears only when complete.

`write_model_folder` is the one writer of model weights (upcycle, graft, the training save). Every
tensor is declared (name, shape, dtype) before any is computed, so each shard's header is written
first and then the tensors are computed, written and freed: peak memory is about one largest
tensor, not one shard. A tensor is written straight from its own memory, so entries that share
memory (E experts copied from one memory-mapped dense FFN) cost no RAM at all. Tensors are written
at their offsets by a bounded pool of threads (`io.pool`: several streams, reads announced ahead),
so the bytes are those of one stream writing them in order. `safetensors` cannot do this itself:
`serialize_file` needs a pointer to every tensor of the file at once.
`AtomicDir` builds the output in a hidden temporary folder beside the target and renames it at
the end: a crash or Ctrl-C never leaves a folder that looks like a finished model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.pool import ShardFile, TensorPool, default_workers, direct_io_wanted
from mergekit_lite.io.safety import (
    EDITED,
    OLD_TAG,
    TMP_TAG,
    clear_stale_temps,
    find_debris,
    record_written,
    restore_interrupted_swap,
    temp_path,
    written_record,
)
from mergekit_lite.io.sidefiles import SIDE_FILES, SIDECAR
from mergekit_lite.plan import format_bytes

LOCK_TAG = "moemerge-lock"

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
        self.lock = OutputLock(self.target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # a second command writing the same output fails here, in one line
        try:
            restore_interrupted_swap(self.target, self.echo)  # before the check: the folder is back, as it was
            check_output(self.target, self.overwrite)  # again, under the lock
            clear_stale_temps(self.target, self.echo)  # a kill -9 leaves them; their PID tells they are dead
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except BaseException:
            self.lock.release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type)
        finally:
            self.lock.release()

    def _finish(self, exc_type) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        record_written(self.tmp)
        _fsync_dir(self.tmp)
        try:  # whatever appeared at the target while we wrote (a user's folder) is never removed unasked
            check_output(self.target, self.overwrite)
        except MoemergeError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise MoemergeError(f"{e} (it appeared while this command was writing; nothing of it was touched)"
                                ) from None
        if self.target.exists():  # overwrite was allowed by check_output
            old = temp_path(self.target, OLD_TAG)
            self.target.rename(old)
            self.tmp.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.target)
        _fsync_dir(self.target.parent)


class OutputLock:
    """An exclusive OS lock (`flock`) on `.NAME.moemerge-lock` beside an output, held while a command writes it.

    The kernel drops it when the process dies (kill -9 included), so a lock file a killed run left never blocks
    anyone; a finished command removes its own.
    """

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.{LOCK_TAG}"
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or fail at once naming the output (another command is writing it)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MoemergeError(f"another moemerge command is writing {self.target} right now; wait for it to end, "
                                "or choose another output") from None
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file while still holding it, then drop the lock."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: no one else has it
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def check_output(target: str | Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless `overwrite`; refuse a file in its place always.

    `--overwrite` replaces only a model folder moemerge wrote (its `moemerge.json` is there) that holds
    nothing but what the writer puts in one, so `-o ~/models --overwrite` cannot wipe a folder of
    other work; the first foreign entry is named.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise MoemergeError(f"output {target} exists and is a file; choose another output path")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise MoemergeError(f"output folder {target} already exists; pass --overwrite to replace it")
    if not (target / SIDECAR).is_file():
        raise MoemergeError(f"--overwrite: {target} was not written by moemerge (no {SIDECAR}); it replaces only "
                            "model folders moemerge wrote: choose another output or move that folder away")
    # by name and kind: a user's folder named like a shard (model-bk.safetensors/) is not ours; and, where the
    # folder records what moemerge wrote, by that record: a user's model-backup.safetensors is not ours either
    written = written_record(target)
    foreign = sorted(p.name for p in target.iterdir()
                     if not is_model_folder_file(p.name) or p.is_dir() or p.is_symlink()
                     or (written is not None and p.name not in EDITED and written.get(p.name) != p.stat().st_size))
    if foreign:
        raise MoemergeError(f"--overwrite: {target} holds {target / foreign[0]} ({len(foreign)} entries in all) "
                            "that moemerge did not write (or that changed since); move them away or choose another "
                            "output")


def is_model_folder_file(name: str) -> bool:
    """True for the top-level names the writer puts in a model folder (weights, index, config, side files, card)."""
    return (name in SIDE_FILES or name in (SIDECAR, "config.json", "README.md", INDEX_FILE, *OWN_CODE)
            or (name.startswith("model") and name.endswith(".safetensors")))


OWN_CODE = ("configuration_moemerge.py", "modeling_moemerge.py")  # models.CODE_FILES: `architecture: moemerge`


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


# torch dtype -> the dtype names of the safetensors header
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the output: declared up front, computed only when its turn to be written comes."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # returns the tensor (any device), or a list of parts whose bytes written back to back are the tensor
    # (a fused [E, ...] tensor of E copies of one source is E views, never a stacked copy); called once
    make: Callable[[], "torch.Tensor | list[torch.Tensor]"]
    # new memory `make()` may allocate (None: nbytes; 0 for a view of a source): bounds the tensors in flight
    cost: int | None = None
    # announces the sources `make()` will read, so the OS reads them while earlier tensors are written
    prefetch: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the tensor will occupy in its shard."""
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def write_model_folder(target: str | Path, entries: Sequence[TensorEntry], *, shard_size: int,
                       overwrite: bool = False, finish: Callable[[Path], None] | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       echo: Callable[[str], None] | None = None, workers: int | None = None,
                       written: Callable[[int], None] | None = None, interleave: bool = True) -> Path:
    """Write `entries` as size-capped shards (+ index) into a folder that appears only when complete.

    Args:
        target: the output folder.
        entries: every output tensor, in the order they go into the shards.
        shard_size: cap on one file's tensor bytes (a larger single tensor gets a shard of its own).
        overwrite: replace an existing `target` (refused otherwise).
        finish: `finish(tmp)` writes the rest (config, side files, card) into the temporary folder.
        progress: `progress(done, total)` after each shard is complete and fsynced.
        echo: told about temporary folders of killed runs that are cleaned up.
        workers: writer threads (None: `io.pool.default_workers`); 1 writes in order on this thread.
            The bytes written do not depend on it.
        written: `written(nbytes)` after each non-empty tensor is in its file.
        interleave: hand out the tensors of up to `workers` shards in turn (a file takes one writer at a
            time); False keeps declaration order, for callers whose `make()`s share a cache that wants
            consecutive tensors to read the same sources.

    Returns:
        The final folder.

    Raises:
        MoemergeError: a shard could not be written (one line with the OS error and the path); nothing
            is left at `target` and the temporary folder is removed.
    """
    by_key = {e.key: e for e in entries}
    if len(by_key) != len(entries):
        raise AssertionError("write_model_folder: duplicate tensor names")
    shards = assign_shards([(e.key, e.nbytes) for e in entries], shard_size)
    names = shard_names(len(shards))
    done = [0]

    def shard_done() -> None:
        done[0] += 1
        if progress:
            progress(done[0], len(names))

    budget = max((e.nbytes for e in entries), default=0)  # computed tensors in flight: one largest, as in order
    n_workers = workers or default_workers(Path(target).parent)
    direct_io_wanted()  # a misspelt MOEMERGE_DIRECT_IO is refused before the output is touched
    with AtomicDir(target, overwrite, echo=echo) as tmp:
        try:
            with TensorPool(n_workers, budget, written, shard_done) as pool:
                files = [_ShardLayout([by_key[k] for k in keys]) for keys in shards]
                # a file takes one writer at a time (ext4 holds the inode lock through a buffered write:
                # measured 4 threads into one file 2.0 s per GB, into four files 1.3 s), so the tensors of
                # up to `n_workers` shards are handed out in turn
                order = list(_interleave([f.order for f in files], n_workers if interleave else 1))
                pool.ahead = [e for _, e in order]
                opened: dict[int, ShardFile] = {}
                for i, e in order:
                    if i not in opened:
                        opened[i] = files[i].open(pool, tmp / names[i])
                    pool.submit(opened[i], e, files[i].offset(e))
                pool.drain()
        except OSError as e:  # a full disk, a path made unwritable: one line, and AtomicDir removes tmp
            raise MoemergeError(f"writing {target} failed: {e}; nothing was left there (check free space and "
                                f"write permission in {Path(target).resolve().parent})") from None
        if len(names) > 1:
            write_index(tmp, {k: name for name, keys in zip(names, shards) for k in keys},
                        sum(e.nbytes for e in entries))
        if finish:
            finish(tmp)
    return Path(target)


def _layout(entries: Sequence[TensorEntry]) -> tuple[list[TensorEntry], dict]:
    """Tensors by decreasing element size, so each starts aligned to its dtype (as safetensors' own writer
    does; stable: declaration order within a size), and the header giving their offsets."""
    order = sorted(entries, key=lambda e: -e.dtype.itemsize)
    header: dict = {}
    offset = 0
    for e in order:
        header[e.key] = {"dtype": ST_DTYPES[e.dtype], "shape": list(e.shape),
                         "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    return order, header


class _ShardLayout:
    """One safetensors file as declared: its tensors in file order, their offsets, and the header bytes."""

    def __init__(self, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None):
        self.order, self.layout = _layout(entries)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}, **self.layout}
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # pad with spaces so the data starts 8-byte aligned
        self.head, self.start = struct.pack("<Q", len(head)) + head, 8 + len(head)

    def open(self, pool: TensorPool, path: Path):
        return pool.open(path, self.head, len(self.order))

    def offset(self, e: TensorEntry) -> int:
        return self.start + self.layout[e.key]["data_offsets"][0]


def _interleave(files: list[list[TensorEntry]], width: int):
    """(file index, tensor) in submission order: files `width` at a time, their tensors taken in turn."""
    for first in range(0, len(files), max(1, width)):
        group = list(range(first, min(first + width, len(files))))
        for row in range(max(len(files[i]) for i in group)):
            yield from ((i, files[i][row]) for i in group if row < len(files[i]))


def write_shard(path: str | Path, entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None,
                pool: TensorPool | None = None) -> int:
    """Write one safetensors file, computing each tensor only when it is written; returns its tensor bytes.

    The header (names, dtypes, shapes, offsets) comes from the declarations and is written first. Without
    `pool` the tensors are written in order on this thread and the file is fsynced before returning; with
    one, they are handed to its threads, and the file is fsynced when its last tensor is in.
    """
    shard = _ShardLayout(entries, metadata)
    with (TensorPool(1, 0) if pool is None else nullcontext(pool)) as p:
        f = shard.open(p, Path(path))
        for e in shard.order:
            p.submit(f, e, shard.offset(e))
    return sum(e.nbytes for e in shard.order)


def write_index(folder: str | Path, weight_map: dict[str, str], total_size: int, extra: dict | None = None) -> None:
    """Write `model.safetensors.index.json` (only meaningful when there are several shards)."""
    meta = {"total_size": total_size, **(extra or {})}
    body = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_FILE).write_text(json.dumps(body, indent=2) + "\n")


def preflight_disk(output: Path, nbytes: int) -> None:
    """Refuse before writing when the output's filesystem cannot hold the estimated output.

    The temporary folders that killed runs left for this output count as free: the writer removes them
    before it writes (a run killed mid-write and started again must not be refused for its own debris).
    A folder moved aside by a swap that never finished does not: with no output in its place, it is put back.
    """
    probe = output.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    restored = not output.exists()  # then `restore_interrupted_swap` renames the old-tag folder back
    debris = sum(d.nbytes for d in find_debris(output) if not d.alive and not (restored and OLD_TAG in d.path.name))
    need = int(nbytes * 1.02) + 1_000_000
    if free + debris < need:
        also = f" (and {format_bytes(debris)} in temporary folders of interrupted runs)" if debris else ""
        raise MoemergeError(f"not enough free disk for {output}: need about {format_bytes(need)}, "
                            f"{format_bytes(free)} free on {probe}{also}")

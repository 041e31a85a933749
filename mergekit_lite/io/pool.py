"""Concurrent tensor writes: a bounded pool of threads writing declared tensors at their file offsets.

Every tensor's place in its shard is known before any is computed (the header comes from the
declarations), so tensors of one shard, and of several shards, can be written at once with
`os.pwrite`, each from its own memory. Threads, not processes: the writes are system calls that
release the GIL (measured: a Python thread kept running, pauses <= 0.05 s, during a 0.4-3 s
`os.pwrite` of 512 MiB, and the same for `safetensors.serialize_file`), and threads share the
memory-mapped sources, so E experts copied from one FFN still cost no RAM. `serialize_file` was
not used: it needs every tensor of a file in memory at once, writes one file with one stream and
lays tensors out in its own order (the output bytes would change).

Memory stays flat: a tensor whose `make()` allocates (a cast, noise, a slice) is admitted only while
the bytes of such tensors in flight stay under `budget` (one largest tensor, as when writing one at
a time); memory-mapped copies cost nothing and run `workers` at a time.

Bytes bypass the page cache where the filesystem allows (`O_DIRECT`, Linux): the whole 4 KiB blocks of a
tensor are copied into a page-aligned buffer of the writer's own (`DIRECT_CHUNK`, one per thread, with the
GIL released) and written from it straight to the disk; the partial blocks at a tensor's two ends go
through the page cache as before, so no block is ever written both ways. Measured on this project's 2-core
VM, 12.9 GB by 8 threads: through the page cache 19.6-20.3 s with 36-37 s of system CPU (the kernel's copy
into cache pages and their write-back), direct 7.6-7.7 s with 0.3-0.4 s. The bytes written are the same
either way; a filesystem that refuses `O_DIRECT` (tmpfs before Linux 6.6, some FUSE) gets the page-cache
path, and `MOEMERGE_DIRECT_IO=0` asks for it everywhere.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from mergekit_lite.errors import MoemergeError

CHUNK = 64 * 2**20  # bytes per pwrite: a stop request (Ctrl-C, another worker's error) is seen within one chunk
PREFETCH_AHEAD = 512 * 2**20  # output bytes whose sources are announced to the kernel before their turn
BLOCK = 4096  # direct writes start and end on multiples of this (file offsets, buffer address, length)
DIRECT_CHUNK = 8 * 2**20  # bytes per direct write, and the size of each writer thread's aligned buffer
DIRECT_MIN = 1 * 2**20  # a tensor with fewer whole blocks than this goes through the page cache


def direct_io_wanted() -> bool:
    """False when `MOEMERGE_DIRECT_IO` is 0/false/no/off (every byte through the page cache), True when it is
    unset, empty or 1/true/yes/on; any other value is refused in one line rather than guessed."""
    value = os.environ.get("MOEMERGE_DIRECT_IO", "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise MoemergeError(f"MOEMERGE_DIRECT_IO={value[:20]!r} is not understood; set it to 0 (write through the "
                        "page cache) or 1 (the default: whole blocks direct where the filesystem allows)")


def default_workers(folder: str | Path) -> int:
    """Writer threads for `folder`: 2 on a spinning disk, else 4 per core, between 4 and 8.

    Measured on a 2-core cloud VM (a pure-write probe of 3 GB + fsync, others' jobs running): 1 stream
    6.5-14.4 s, 2 streams 2.9-4.8 s, 4 streams 3.1-4.5 s, 8 streams 2.3-2.9 s; virtual disks and NVMe
    reward queue depth, and writer threads mostly wait in the kernel, so they may outnumber the cores.
    A real spinning disk pays a seek per stream switch, so it gets 2.
    """
    if _spinning(Path(folder)):
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(4, 4 * cores))


def _spinning(folder: Path) -> bool:
    """True when `folder`'s block device says it spins and is not a virtual disk (Linux sysfs).

    Virtual disks (virtio, Xen, Hyper-V) report `rotational` 1 whatever backs them (this project's VM
    does), so their word is not taken; False when it cannot tell.
    """
    probe = folder.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        dev = os.stat(probe).st_dev
        base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
        if any(v in str(base) for v in ("virtio", "xen", "vmbus", "nvme")):
            return False
        for flag in (base / "queue" / "rotational", base.parent / "queue" / "rotational"):  # disk, partition
            if flag.is_file():
                return flag.read_text().strip() == "1"
    except (OSError, ValueError):
        pass
    return False


class Stopped(Exception):
    """A worker left its tensor unfinished because the write as a whole is stopping."""


class ShardFile:
    """One open output file: header written at once; fsynced and closed by whoever writes its last tensor.

    With `buffers` (a pool's aligned buffers) and a filesystem that takes `O_DIRECT`, a second descriptor
    writes the whole blocks of each tensor around the page cache (`write`).
    """

    def __init__(self, path: Path, header: bytes, n_tensors: int, buffers: "DirectBuffers | None" = None):
        self.path = path
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
        self.dfd: int | None = _open_direct(path) if buffers is not None else None
        self.refused: int | None = None  # a direct descriptor the filesystem turned down mid-way, closed at the end
        self.buffers = buffers
        self.left = n_tensors
        self.lock = threading.Lock()
        pwrite_all(self.fd, memoryview(header), 0)
        if n_tensors == 0:
            self.finish()

    def write(self, data: memoryview, offset: int, stop: threading.Event | None = None) -> None:
        """Write `data` at `offset`: its whole blocks direct when this file can, its partial end blocks cached.

        Two tensors share a partial block only through the page cache, so no block is written both ways.
        """
        first = offset + (-offset % BLOCK)  # the first block boundary at or after `offset`
        last = (offset + len(data)) // BLOCK * BLOCK  # the last one at or before its end
        if self.dfd is None or last - first < DIRECT_MIN:
            pwrite_all(self.fd, data, offset, stop)
            return
        head, tail = first - offset, last - offset
        pwrite_all(self.fd, data[:head], offset, stop)
        self._write_direct(data, head, tail, first, stop)
        pwrite_all(self.fd, data[tail:], last, stop)

    def _write_direct(self, data: memoryview, start: int, end: int, offset: int,
                      stop: threading.Event | None) -> None:
        """Write `data[start:end]` (whole blocks) at `offset` through an aligned buffer, a chunk at a time."""
        source = np.frombuffer(data, dtype=np.uint8)  # a view, for the address; read-only memory maps too
        address = source.ctypes.data
        buf = self.buffers.take()
        try:
            pos = start
            while pos < end:
                if stop is not None and stop.is_set():
                    raise Stopped
                n = min(DIRECT_CHUNK, end - pos)
                ctypes.memmove(buf.address, address + pos, n)  # releases the GIL; faults in a cold source
                dfd = self.dfd
                done = 0
                if dfd is not None:
                    try:
                        done = os.pwrite(dfd, buf.view[:n], offset + pos - start)
                    except OSError as e:
                        if e.errno != errno.EINVAL:  # a full disk, an I/O error: as through the cache
                            raise
                        self.refuse_direct(dfd)  # the filesystem takes no direct writes after all
                if done < n:  # refused, or a short write: the rest through the page cache
                    pwrite_all(self.fd, data[pos + done:pos + n], offset + pos - start + done, stop)
                pos += n
        finally:
            self.buffers.give(buf)

    def refuse_direct(self, dfd: int) -> None:
        """Stop writing this file direct; `dfd` is closed with the file, never under another thread's write."""
        with self.lock:
            if self.dfd == dfd:
                self.dfd, self.refused = None, dfd

    def tensor_done(self) -> bool:
        """Count one tensor written; the last one makes the file durable. True when the file is complete."""
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.finish()
        return last

    def finish(self) -> None:
        """Flush the shard to disk and close it; called once its last tensor is written."""
        os.fsync(self.fd)  # the data written through either descriptor: fsync is per file, not per descriptor
        self._close_direct()
        os.close(self.fd)
        self.fd = None

    def abort(self) -> None:
        """Close the file without syncing (a failed or interrupted write); safe to call twice."""
        with self.lock:
            self._close_direct()
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def _close_direct(self) -> None:
        for fd in (self.dfd, self.refused):
            if fd is not None:
                os.close(fd)
        self.dfd = self.refused = None


def _open_direct(path: Path) -> int | None:
    """A second, `O_DIRECT` descriptor on `path`, or None where the platform or the filesystem has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | getattr(os, "O_NOFOLLOW", 0))  # the file just made, never a link
    except OSError:  # EINVAL: this filesystem does not do direct I/O (tmpfs before Linux 6.6)
        return None


class AlignedBuffer:
    """`DIRECT_CHUNK` bytes of page-aligned anonymous memory (a private map), its address and a view."""

    def __init__(self):
        self.map = mmap.mmap(-1, DIRECT_CHUNK)
        self.view = memoryview(self.map)
        self.address = np.frombuffer(self.map, dtype=np.uint8).ctypes.data

    def close(self) -> None:
        """Unmap the memory (kept mapped, and freed with its last view, if a view is still held)."""
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a view is still held somewhere: the map goes with it
            pass


class DirectBuffers:
    """The aligned buffers of one pool: made on demand (one per thread writing at a time), freed at its end."""

    def __init__(self):
        self.free: queue.SimpleQueue[AlignedBuffer] = queue.SimpleQueue()
        self.made: list[AlignedBuffer] = []
        self.lock = threading.Lock()

    def take(self) -> AlignedBuffer:
        """A free buffer, or a new one when all are in use."""
        try:
            return self.free.get_nowait()
        except queue.Empty:
            buf = AlignedBuffer()
            with self.lock:
                self.made.append(buf)
            return buf

    def give(self, buf: AlignedBuffer) -> None:
        """Hand a buffer back for the next direct write."""
        self.free.put(buf)

    def close(self) -> None:
        """Unmap every buffer made (the pool is done writing)."""
        with self.lock:
            for buf in self.made:
                buf.close()
            self.made.clear()


def pwrite_all(fd: int, data: memoryview, offset: int, stop: threading.Event | None = None) -> None:
    """Write all of `data` at `offset` in chunks (a write may be partial; a chunk bounds the stop latency)."""
    write = getattr(os, "pwrite", None) or _seek_write  # Windows has no pwrite
    pos = 0
    while pos < len(data):
        if stop is not None and stop.is_set():
            raise Stopped
        pos += write(fd, data[pos:pos + CHUNK], offset + pos)


_SEEK_LOCK = threading.Lock()


def _seek_write(fd: int, data: memoryview, offset: int) -> int:
    with _SEEK_LOCK:  # the file position is shared by the threads writing one file
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


class TensorPool:
    """Writes tensors at their offsets with up to `workers` threads; `workers=1` writes inline, in order.

    Used as a context manager: on any exception (a worker's error, Ctrl-C in the main thread) every worker
    stops within one chunk, queued tensors are dropped and open files closed before the exception goes on.
    `written(nbytes)` hears of each tensor in its file and `shard_done()` of each complete (fsynced) file,
    both on the calling thread.
    """

    def __init__(self, workers: int, budget: int, written: Callable[[int], None] | None = None,
                 shard_done: Callable[[], None] | None = None):
        self.workers, self.budget = max(1, workers), budget
        self.written, self.shard_done = written, shard_done
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(self.workers, "moemerge-write") if self.workers > 1 else None
        self.inflight: dict[Future, int] = {}  # future -> the anonymous bytes its tensor may allocate
        self.cost = 0
        self.files: list[ShardFile] = []
        self.buffers = DirectBuffers() if direct_io_wanted() else None
        self.ahead: list = []  # entries in write order, for read-ahead
        self.next_prefetch = self.submitted = self.ahead_bytes = 0

    def open(self, path: Path, header: bytes, n_tensors: int) -> ShardFile:
        """Create a shard file with its header written and register it; an empty shard is done at once."""
        shard = ShardFile(path, header, n_tensors, self.buffers)
        self.files.append(shard)
        if n_tensors == 0 and self.shard_done:
            self.shard_done()
        return shard

    def submit(self, shard: ShardFile, entry, offset: int) -> None:
        """Write `entry` at `offset` of `shard`; waits first while `workers` tensors or `budget` bytes are in flight."""
        self._prefetch()
        cost = entry.nbytes if entry.cost is None else entry.cost
        if self.pool is None:
            self._report(*self._job(shard, entry, offset, cost))
            return
        while self.inflight and (len(self.inflight) >= self.workers or self.cost + cost > self.budget):
            self._collect()
        # computed tensors are made here, in order, and only written by the workers: made on many threads,
        # their temporaries spread over glibc's per-thread heaps (measured: +45-120 MB peak with 8 workers)
        # handed over in a box the job empties: the executor keeps a job's arguments until after its result is
        # out, and this thread, woken by that result, would make the next tensor with this one still alive
        box = [tensor_bytes(entry)] if cost else []
        future = self.pool.submit(self._job, shard, entry, offset, cost, box)
        del box
        self.inflight[future] = cost
        self.cost += cost

    def drain(self) -> None:
        """Wait for every tensor submitted; raises the first worker error."""
        while self.inflight:
            self._collect()

    def _collect(self) -> None:
        # a timeout keeps the main thread responsive to Ctrl-C whatever the platform's lock waits do
        done, _ = wait(list(self.inflight), timeout=0.2, return_when=FIRST_COMPLETED)
        for future in done:
            self.cost -= self.inflight.pop(future)
            self._report(*future.result())  # the first failed tensor's error goes up from here

    def _report(self, nbytes: int, shard_complete: bool) -> None:
        if self.written and nbytes:
            self.written(nbytes)
        if shard_complete and self.shard_done:
            self.shard_done()

    def _job(self, shard: ShardFile, entry, offset: int, cost: int,
             box: list[list[memoryview]] | None = None) -> tuple[int, bool]:
        made = box.pop() if box else None  # `box` is empty from here on: the tensor lives in `made` alone
        if self.stop.is_set():
            raise Stopped
        try:
            for part in made if made is not None else tensor_bytes(entry):
                shard.write(part, offset, self.stop)
                offset += len(part)
            made = part = None  # the tensor is freed before the heap is trimmed
            if cost:
                release_freed_memory()
            return entry.nbytes, shard.tensor_done()  # the last tensor of a file fsyncs it
        except OSError as e:  # pwrite's and fsync's errors (a full disk) do not name the file
            raise OSError(e.errno, e.strerror, str(shard.path)) from None

    def _prefetch(self) -> None:
        """Announce the sources of the tensors coming next, so reading them overlaps writing these."""
        i, self.submitted = self.submitted, self.submitted + 1  # `ahead[i]` is the tensor submitted now
        if i < self.next_prefetch:
            self.ahead_bytes -= self.ahead[i].nbytes  # announced earlier: no longer ahead
        else:
            self.next_prefetch = i + 1
        while self.next_prefetch < len(self.ahead) and self.ahead_bytes < PREFETCH_AHEAD:
            e = self.ahead[self.next_prefetch]
            if e.prefetch is not None:
                e.prefetch()
            self.ahead_bytes += e.nbytes
            self.next_prefetch += 1

    def __enter__(self) -> "TensorPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.stop.set()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for f in self.files:
            f.abort()
        if self.buffers is not None:
            self.buffers.close()


def tensor_bytes(entry) -> list[memoryview]:
    """Compute one declared tensor; its bytes as views of its own memory (a mmap view stays a view).

    `make()` may return parts (leading-axis slices of the declared tensor, in order); each is a view of
    its own memory, so a fused tensor of E copies of one memory-mapped source costs no RAM.
    """
    made = entry.make()
    parts = [p.detach() for p in made] if isinstance(made, (list, tuple)) else [made.detach()]
    if any(p.dtype != entry.dtype for p in parts) or sum(p.numel() for p in parts) * entry.dtype.itemsize \
            != entry.nbytes or (len(parts) == 1 and tuple(parts[0].shape) != tuple(entry.shape)):
        got = " + ".join(f"{tuple(p.shape)} {p.dtype}" for p in parts)
        raise AssertionError(f"{entry.key}: got {got}, declared {tuple(entry.shape)} {entry.dtype}")
    views = []
    for t in parts:
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.to("cpu").contiguous()
        if t.numel():
            views.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return views


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; elsewhere a no-op).

    glibc raises its mmap threshold after large frees, so the many 1-30 MB temporaries of computed
    tensors land in the heap, where freed holes stay counted in RSS: measured, a noisy upcycle grew
    by ~300 MB over 8 layers without this, and stayed flat with it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of `threshold` bytes or more with its own mmap, returned to the OS when freed
    (glibc only; elsewhere a no-op). Fixing the threshold also stops glibc from raising it after large frees.

    For training on CPU processes: FSDP2 all-gathers each layer's weights (and sharded loading receives
    each whole tensor) into temporaries of 1-70 MB; served from the heap, their freed holes stayed resident
    (measured, 2 FSDP2 processes of a 269M model: +0.9 GB per process after one validation pass).
    """
    if _MALLOPT is not None:
        _MALLOPT(-3, threshold)  # M_MMAP_THRESHOLD


def _libc_malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def _libc_mallopt():
    import ctypes

    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return None


_MALLOPT = _libc_mallopt()

"""The concurrent writer: same bytes as one worker, a failed shard leaves nothing, Ctrl-C stops every worker."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergekit_lite.io.pool as pool_mod
import mergekit_lite.io.writer as writer
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import CheckpointReader, TensorEntry, write_model_folder
from mergekit_lite.io.pool import default_workers
from mergekit_lite.ops.graft import run_graft
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.recipe import UpcycleRecipe, validate_recipe


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every weight file and the index, by name (the card and config do not depend on the writer)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}


def random_entries(seed: int) -> tuple[list[TensorEntry], dict[str, torch.Tensor]]:
    """Mixed dtypes and sizes, shared memory, empty tensors and a tensor made of parts, drawn from a seed."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    want: dict[str, torch.Tensor] = {}
    for i in range(40):
        dtype = [torch.float32, torch.bfloat16, torch.float16, torch.int64][int(torch.randint(4, (1,), generator=g))]
        rows = int(torch.randint(0, 200, (1,), generator=g))
        want[f"t{i:02d}"] = (torch.randn(rows, 33, generator=g) * 100).to(dtype)
    want["copy.a"], want["copy.b"] = shared, shared
    want["fused"] = torch.stack([shared] * 4)
    entries = [TensorEntry(k, tuple(v.shape), v.dtype, lambda v=v: v, cost=0) for k, v in want.items()
               if k != "fused"]
    entries.append(TensorEntry("fused", (4, 64, 96), torch.bfloat16, lambda: [shared] * 4, cost=0))
    return entries, want


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_concurrent_writer_writes_the_bytes_of_one_worker(tmp_path, workers):
    entries, want = random_entries(seed=int(time.time()))  # randomness on: any draw must give identical files
    one = write_model_folder(tmp_path / "one", entries, shard_size=40_000, workers=1)
    many = write_model_folder(tmp_path / "many", entries, shard_size=40_000, workers=workers)
    assert len(folder_bytes(one)) > 5  # several shards, written at once
    assert folder_bytes(many) == folder_bytes(one)
    got = {}
    for shard in many.glob("model-*.safetensors"):
        got.update(load_file(str(shard)))
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_upcycle_and_graft_with_many_workers_write_the_bytes_of_one(tmp_path, pico_llama):
    """Computed tensors too (casts, noise, Drop-Upcycling, granular experts), with a seed drawn now."""
    seed = int(time.time()) % 10_000
    body = {"source": str(pico_llama), "num_experts": 4, "experts_per_token": 2, "dtype": "bfloat16",
            "granularity": 2, "noise": 0.01, "drop_ratio": 0.5, "seed": seed, "shard_size": "100KB"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(body))
    quiet = {"echo": lambda _: None, "progress": False}
    for workers in (1, 4):
        run_upcycle(recipe, tmp_path / f"up{workers}", workers=workers, **quiet)
        run_graft(pico_llama, tmp_path / f"graft{workers}", drop=1, shard_size="50KB", workers=workers, **quiet)
    assert len(folder_bytes(tmp_path / "up1")) > 3 and len(folder_bytes(tmp_path / "graft1")) > 3
    assert folder_bytes(tmp_path / "up4") == folder_bytes(tmp_path / "up1")
    assert folder_bytes(tmp_path / "graft4") == folder_bytes(tmp_path / "graft1")


@pytest.mark.parametrize("workers", [1, 4])
def test_a_shard_path_made_unwritable_midway_leaves_nothing_and_says_so_in_one_line(tmp_path, workers):
    """The first tensor's make() puts a folder where the last shard goes: that shard cannot be opened."""
    target = tmp_path / "m"
    t = torch.ones(1000)

    def sabotage():
        tmp = next(tmp_path.glob(".m.moemerge-tmp-*"))
        (tmp / "model-00008-of-00008.safetensors").mkdir()
        return t

    def slow():
        time.sleep(0.02)  # the sabotage runs before the shards after the workers' window are opened
        return t

    entries = [TensorEntry(f"t{i}", (1000,), torch.float32, sabotage if i == 0 else slow, cost=0) for i in range(8)]
    with pytest.raises(MoemergeError) as exc:
        write_model_folder(target, entries, shard_size=4000, workers=workers)
    msg = str(exc.value)
    assert "\n" not in msg and "model-00008-of-00008.safetensors" in msg and "Is a directory" in msg, msg
    assert f"writing {target} failed" in msg
    assert list(tmp_path.iterdir()) == []  # no folder that looks finished, no temporary folder


def test_a_full_disk_in_a_worker_is_reported_with_its_file(tmp_path):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    entries = [TensorEntry(f"t{i}", (1000,), torch.float32, full if i == 5 else (lambda: torch.ones(1000)), cost=0)
               for i in range(8)]
    with pytest.raises(MoemergeError, match=r"No space left on device: '.*/model-00006-of-00008\.safetensors'"):
        write_model_folder(tmp_path / "m", entries, shard_size=4000, workers=4)
    assert list(tmp_path.iterdir()) == []


CHILD = textwrap.dedent("""
    import fcntl, os, signal, sys, threading, time, torch
    import mergekit_lite.io.pool as pool
    from mergekit_lite.io import TensorEntry, write_model_folder

    log = open(sys.argv[2], "a", buffering=1)
    lock = threading.Lock()
    real = os.pwrite

    def slow_pwrite(fd, data, offset):  # a slow disk: 20 ms a chunk, each logged (direct ones as such)
        time.sleep(0.02)
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)
        with lock:
            log.write("direct\\n" if direct else "pwrite\\n")
        return real(fd, data, offset)

    def on_sigint(*_):
        with lock:
            log.write("SIGINT\\n")
        raise KeyboardInterrupt

    pool.CHUNK = pool.DIRECT_CHUNK = 64 * 1024  # direct writes too, when this filesystem takes them
    pool.DIRECT_MIN = pool.BLOCK
    pool.os.pwrite = slow_pwrite
    signal.signal(signal.SIGINT, on_sigint)
    t = torch.ones(2**20, dtype=torch.uint8)  # 1 MiB = 16 chunks a tensor
    entries = [TensorEntry(f"t{i}", (2**20,), torch.uint8, lambda: t, cost=0) for i in range(200)]
    write_model_folder(sys.argv[1], entries, shard_size=4 * 2**20, workers=4)
""")


@pytest.mark.parametrize("direct", ["0", "1"])
def test_ctrl_c_stops_every_worker_within_one_chunk(tmp_path, direct):
    if direct == "1":
        skip_without_direct_io(tmp_path)
    target, log = tmp_path / "m", tmp_path / "log"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(log)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MOEMERGE_DIRECT_IO": direct})
    deadline = time.monotonic() + 60
    while len(log.read_text().split()) < 40:  # mid-write: a few tensors of several shards in
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    stopped_in = time.monotonic() - t0
    lines = log.read_text().split()
    after = lines[lines.index("SIGINT") + 1:]
    assert ("direct" in lines) == (direct == "1"), lines[:10]  # the path asked for is the path taken
    # each of the 4 workers finishes at most the chunk it is in (and one it started as the signal came)
    assert len(after) <= 8, f"{len(after)} chunks written after Ctrl-C; a worker kept going"
    assert "KeyboardInterrupt" in err and proc.returncode != 0
    assert stopped_in < 5, f"took {stopped_in:.1f} s to stop"
    assert list(tmp_path.iterdir()) == [log]  # no folder that looks finished, no temporary folder


def test_workers_come_from_the_flag_then_the_recipe_then_the_default(tmp_path, pico_llama, monkeypatch):
    seen: list[int] = []
    real = writer.TensorPool

    class Spy(real):
        def __init__(self, workers, *a, **kw):
            seen.append(workers)
            super().__init__(workers, *a, **kw)

    monkeypatch.setattr(writer, "TensorPool", Spy)
    monkeypatch.setattr(writer, "default_workers", lambda folder: 5)
    recipe = tmp_path / "r.yaml"
    quiet = {"echo": lambda _: None, "progress": False}
    recipe.write_text(yaml.safe_dump({"source": str(pico_llama), "num_experts": 2, "experts_per_token": 1}))
    run_upcycle(recipe, tmp_path / "a", **quiet)
    recipe.write_text(yaml.safe_dump({"source": str(pico_llama), "num_experts": 2, "experts_per_token": 1,
                                      "workers": 3}))
    run_upcycle(recipe, tmp_path / "b", **quiet)
    run_upcycle(recipe, tmp_path / "c", workers=2, **quiet)
    assert seen == [5, 3, 2]
    with pytest.raises(MoemergeError, match="workers"):
        validate_recipe({"source": "x", "num_experts": 2, "experts_per_token": 1, "workers": 0}, UpcycleRecipe)


def test_default_workers_from_cores_and_the_disk(tmp_path, monkeypatch):
    import mergekit_lite.io.pool as pool

    monkeypatch.setattr(pool, "_spinning", lambda folder: False)
    for cores, want in ((1, 4), (2, 8), (16, 8)):
        monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_workers(tmp_path) == want
    assert not pool._spinning(Path("/this/does/not/exist"))
    monkeypatch.setattr(pool, "_spinning", lambda folder: True)
    assert default_workers(tmp_path) == 2


def test_sources_are_announced_before_they_are_read(tmp_path, pico_llama, monkeypatch):
    """Read-ahead: each tensor's prefetch comes before its make(), up to the look-ahead window."""
    events: list[tuple[str, int]] = []
    t = torch.ones(256)
    entries = [TensorEntry(f"t{i}", (256,), torch.float32, lambda i=i: events.append(("make", i)) or t,
                           prefetch=lambda i=i: events.append(("prefetch", i))) for i in range(20)]
    write_model_folder(tmp_path / "m", entries, shard_size=4096, workers=1)
    order = {e: n for n, e in enumerate(events)}
    assert all(order[("prefetch", i)] < order[("make", i)] for i in range(1, 20))
    assert order[("prefetch", 19)] < order[("make", 1)]  # 20 KB fit in the window: all announced at the start

    # the reader's hint names the tensor's own bytes in its file
    calls: list[tuple[int, int, int]] = []
    import mergekit_lite.io.reader as reader_mod

    monkeypatch.setattr(reader_mod.os, "posix_fadvise", lambda fd, off, n, advice: calls.append((fd, off, n)),
                        raising=False)
    r = CheckpointReader(pico_llama)
    key = "model.layers.0.mlp.down_proj.weight"
    r.prefetch(key)
    (fd, off, n), = calls
    raw = (Path(pico_llama) / r.info(key).file).read_bytes()[off:off + n]
    assert raw == r.get(key).contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    r.close()


def test_index_and_shards_are_complete_whatever_the_order_shards_finish(tmp_path):
    entries, want = random_entries(seed=1)
    out = write_model_folder(tmp_path / "m", entries, shard_size=40_000, workers=8)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    assert not list(tmp_path.glob(".m.moemerge-*"))
    assert os.listdir(tmp_path) == ["m"]


def test_shards_are_written_side_by_side_unless_the_caller_keeps_order(tmp_path):
    """A file takes one writer at a time (the inode lock), so with N workers the tensors of N shards go out in
    turn; `interleave=False` (casts sharing one cache slot) keeps declaration order. Bytes are the same."""
    made: list[str] = []
    t = torch.ones(256)
    entries = [TensorEntry(f"t{i}", (256,), torch.float32, lambda i=i: made.append(f"t{i}") or t, cost=0)
               for i in range(7)]
    side = write_model_folder(tmp_path / "side", entries, shard_size=2048, workers=2)  # shards t0-1 t2-3 t4-5 t6
    assert made == ["t0", "t2", "t1", "t3", "t4", "t6", "t5"]
    made.clear()
    kept = write_model_folder(tmp_path / "kept", entries, shard_size=2048, workers=2, interleave=False)
    assert made == [f"t{i}" for i in range(7)]
    assert folder_bytes(side) == folder_bytes(kept)


def test_an_upcycle_that_casts_casts_each_source_once(tmp_path, pico_llama, monkeypatch):
    """dtype float32 from bf16/fp16 sources: E experts of one FFN are made one after another and share the cast."""
    import mergekit_lite.ops.execute as execute

    casts: list[str] = []
    real_get = execute.SourceCache.get

    def counting_get(self, src, dtype):
        if (src, dtype) not in self.items and self.readers[src.model].info(src.key).dtype != dtype:
            casts.append(src.key)
        return real_get(self, src, dtype)

    monkeypatch.setattr(execute.SourceCache, "get", counting_get)
    source_dtype = CheckpointReader(pico_llama).info("model.layers.0.mlp.up_proj.weight").dtype
    dtype = "float16" if source_dtype == torch.float32 else "float32"
    body = {"source": str(pico_llama), "num_experts": 4, "experts_per_token": 2, "dtype": dtype,
            "shard_size": "20KB", "output": str(tmp_path / "out")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(body))
    run_upcycle(tmp_path / "r.yaml", workers=4, progress=False, echo=lambda *_: None)
    assert casts and len(casts) == len(set(casts)), "a source was cast again: experts of one FFN were split up"


# ---- one rule for every write (issue 23, item 1) --------------------------------------------------------------
def _entries():
    return [TensorEntry("w", (4,), torch.float32, lambda: torch.ones(4))]


def test_a_folder_that_appears_at_the_output_while_writing_is_never_removed(tmp_path):
    out = tmp_path / "out"

    def user_makes_it(tmp):  # the user (or another command) creates the output while we write
        (out / "thesis").mkdir(parents=True)
        (out / "thesis" / "thesis.tex").write_text("years of work")

    with pytest.raises(MoemergeError, match=r"output folder .*out already exists; pass --overwrite .*\(it appeared "
                                            r"while this command was writing; nothing of it was touched\)"):
        write_model_folder(out, _entries(), shard_size=1 << 20, finish=user_makes_it, workers=1)
    assert (out / "thesis" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our temporary folder and lock are gone


def test_a_second_command_on_the_same_output_fails_at_once(tmp_path):
    out = tmp_path / "out"
    held = writer.OutputLock(out.resolve())
    held.acquire()
    try:
        with pytest.raises(MoemergeError, match=r"another moemerge command is writing .*out right now"):
            write_model_folder(out, _entries(), shard_size=1 << 20, workers=1)
    finally:
        held.release()
    write_model_folder(out, _entries(), shard_size=1 << 20, workers=1)  # free again: the lock left with its holder
    assert not any(p.name.endswith("moemerge-lock") for p in tmp_path.iterdir())


def test_overwrite_knows_its_files_by_kind_too(tmp_path):
    out = tmp_path / "out"
    write_model_folder(out, _entries(), shard_size=1 << 20, workers=1,
                       finish=lambda tmp: (tmp / "moemerge.json").write_text("{}"))
    (out / "model-bk.safetensors").mkdir()  # a user's folder named like a shard
    (out / "model-bk.safetensors" / "thesis.tex").write_text("mine")
    with pytest.raises(MoemergeError, match=r"--overwrite: .*model-bk.safetensors .* that moemerge did not write"):
        write_model_folder(out, _entries(), shard_size=1 << 20, overwrite=True, workers=1)
    assert (out / "model-bk.safetensors" / "thesis.tex").read_text() == "mine"


def test_two_trains_into_one_output_the_second_fails_before_any_check(tmp_path):
    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.loop import train

    out = tmp_path / "run"
    held = writer.OutputLock(out.resolve())
    held.acquire()
    try:
        r = validate_recipe({"model": str(tmp_path / "nowhere"), "data": {"train": ["x.txt"]}, "seq_len": 32,
                             "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "output": str(out)},
                            TrainRecipe)
        with pytest.raises(MoemergeError, match=r"another moemerge command is writing .*run right now"):
            train(r, echo=lambda *_: None)
    finally:
        held.release()


# -- direct writes (O_DIRECT): the whole blocks of each tensor around the page cache --------------------------------

def skip_without_direct_io(folder: Path) -> None:
    """Skip where `folder`'s filesystem (or the OS) takes no O_DIRECT: there the writer never writes direct."""
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        (folder / "probe").unlink()
    except (AttributeError, OSError):
        pytest.skip(f"{folder} takes no O_DIRECT")


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


@pytest.fixture
def direct_writes(tmp_path, monkeypatch) -> list[int]:
    """The sizes of the direct writes the kernel took, each checked to start and end on a block; skipped where
    this filesystem takes no O_DIRECT (then the writer never tries)."""
    skip_without_direct_io(tmp_path)
    sizes: list[int] = []
    real = os.pwrite

    def counting(fd, data, offset):
        n = real(fd, data, offset)  # a write the kernel refused (EINVAL) is not counted
        if _is_direct(fd):
            assert offset % pool_mod.BLOCK == 0 and len(data) % pool_mod.BLOCK == 0, (offset, len(data))
            sizes.append(n)
        return n

    monkeypatch.setattr(pool_mod.os, "pwrite", counting)
    return sizes


@pytest.fixture
def small_direct(direct_writes, monkeypatch) -> list[int]:
    """`direct_writes` for any tensor with one whole block, in chunks of two blocks, so pico tensors take the
    path a 1B model's do."""
    monkeypatch.setattr(pool_mod, "DIRECT_MIN", pool_mod.BLOCK)
    monkeypatch.setattr(pool_mod, "DIRECT_CHUNK", 2 * pool_mod.BLOCK)
    return direct_writes


def blocky_entries(seed: int) -> tuple[list[TensorEntry], dict[str, torch.Tensor]]:
    """Tensors of 0 to ~40 KiB at every phase against the 4 KiB blocks, copies of one source, a fused tensor of
    parts, and a source whose own bytes start off any block (a slice of a bigger tensor)."""
    g = torch.Generator().manual_seed(seed)
    want: dict[str, torch.Tensor] = {}
    for i in range(30):
        dtype = [torch.float32, torch.bfloat16, torch.uint8][i % 3]
        n = int(torch.randint(0, 10_000, (1,), generator=g))
        want[f"t{i:02d}"] = (torch.randn(n, generator=g) * 100).to(dtype)
    big = torch.randn(40_001, generator=g)
    shifted = big[7:7 + 9000]  # its address is 28 bytes past an allocation: never aligned
    want["shifted.a"], want["shifted.b"] = shifted, shifted
    want["fused"] = torch.stack([shifted] * 3)
    entries = [TensorEntry(k, tuple(v.shape), v.dtype, lambda v=v: v, cost=0) for k, v in want.items()
               if k != "fused"]
    entries.append(TensorEntry("fused", (3, 9000), torch.float32, lambda: [shifted] * 3, cost=0))
    return entries, want


@pytest.mark.parametrize("workers", [1, 4])
def test_direct_writes_give_the_bytes_of_the_page_cache_path(tmp_path, monkeypatch, small_direct, workers):
    entries, want = blocky_entries(seed=int(time.time()))  # randomness on: sizes and phases drawn now
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "0")
    cached = write_model_folder(tmp_path / "cached", entries, shard_size=60_000, workers=workers)
    assert small_direct == []  # MOEMERGE_DIRECT_IO=0: every byte through the page cache
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "1")
    direct = write_model_folder(tmp_path / "direct", entries, shard_size=60_000, workers=workers)
    total = sum(e.nbytes for e in entries)
    assert sum(small_direct) > total // 2, small_direct  # most bytes went direct, in chunks of two blocks
    assert max(small_direct) == 2 * pool_mod.BLOCK
    assert len(folder_bytes(direct)) > 3 and folder_bytes(direct) == folder_bytes(cached)
    got = {}
    for shard in direct.glob("model-*.safetensors"):
        got.update(load_file(str(shard)))
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_an_upcycle_written_direct_is_the_upcycle_written_through_the_cache(tmp_path, pico_llama, monkeypatch,
                                                                             small_direct):
    body = {"source": str(pico_llama), "num_experts": 4, "experts_per_token": 2, "dtype": "bfloat16",
            "noise": 0.01, "seed": int(time.time()) % 10_000, "shard_size": "100KB"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(body))
    for mode in ("0", "1"):
        monkeypatch.setenv("MOEMERGE_DIRECT_IO", mode)
        run_upcycle(recipe, tmp_path / f"up{mode}", workers=4, echo=lambda _: None, progress=False)
    assert sum(small_direct) > 0
    assert folder_bytes(tmp_path / "up1") == folder_bytes(tmp_path / "up0")


def test_a_filesystem_that_refuses_direct_writes_midway_gets_the_page_cache_path(tmp_path, monkeypatch,
                                                                                small_direct):
    """EINVAL from a direct write (a filesystem that opens O_DIRECT but will not write it): that chunk and the
    rest of the file go through the cache, same bytes, and the refused descriptor is closed with the file."""
    entries, _ = blocky_entries(seed=int(time.time()))
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "0")
    cached = write_model_folder(tmp_path / "cached", entries, shard_size=60_000, workers=4)
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "1")
    counting, refused = pool_mod.os.pwrite, []

    def refusing(fd, data, offset):
        if _is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return counting(fd, data, offset)

    monkeypatch.setattr(pool_mod.os, "pwrite", refusing)
    fds_before = len(os.listdir("/proc/self/fd"))
    direct = write_model_folder(tmp_path / "direct", entries, shard_size=60_000, workers=4)
    assert refused and folder_bytes(direct) == folder_bytes(cached)
    assert len(os.listdir("/proc/self/fd")) == fds_before  # no descriptor left open


def test_a_full_disk_in_a_direct_write_is_reported_with_its_file(tmp_path, monkeypatch, small_direct):
    counting = pool_mod.os.pwrite

    def full(fd, data, offset):
        if _is_direct(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return counting(fd, data, offset)

    monkeypatch.setattr(pool_mod.os, "pwrite", full)
    big = torch.randn(50_000)
    entries = [TensorEntry(f"t{i}", (50_000,), torch.float32, lambda: big, cost=0) for i in range(4)]
    with pytest.raises(MoemergeError, match=r"No space left on device: '.*/model-0000\d-of-00004\.safetensors'"):
        write_model_folder(tmp_path / "m", entries, shard_size=200_000, workers=4)
    assert list(tmp_path.iterdir()) == []


def test_direct_writes_at_the_real_sizes_give_the_page_cache_bytes(tmp_path, monkeypatch, direct_writes):
    """The constants as shipped (1 MiB minimum, 8 MiB chunks): tensors past one chunk at odd offsets, and one
    just under the minimum, through both paths."""
    direct = direct_writes
    g = torch.Generator().manual_seed(int(time.time()))
    sizes = [3, 2**20 + 4099, 9 * 2**20 + 123, 2**20 - 1, 17 * 2**20]
    want = {f"t{i}": torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for i, n in enumerate(sizes)}
    entries = [TensorEntry(k, tuple(v.shape), v.dtype, lambda v=v: v, cost=0) for k, v in want.items()]
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "0")
    cached = write_model_folder(tmp_path / "cached", entries, shard_size=2**30, workers=4)
    assert direct == []
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "1")
    written = write_model_folder(tmp_path / "direct", entries, shard_size=2**30, workers=4)
    assert direct and max(direct) == pool_mod.DIRECT_CHUNK and sum(direct) > 26 * 2**20  # all but the partial end blocks
    assert folder_bytes(written) == folder_bytes(cached)


def test_a_misspelt_direct_io_switch_is_refused_before_the_output_is_touched(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMERGE_DIRECT_IO", "O")  # the letter, for a zero
    entries = [TensorEntry("t", (10,), torch.float32, lambda: torch.ones(10))]
    with pytest.raises(MoemergeError, match=r"^MOEMERGE_DIRECT_IO='o' is not understood; set it to 0 .* or 1 "):
        write_model_folder(tmp_path / "m", entries, shard_size=10**6)
    assert list(tmp_path.iterdir()) == []
    for value, direct in (("", True), (" On ", True), ("FALSE", False), ("0", False)):
        monkeypatch.setenv("MOEMERGE_DIRECT_IO", value)
        assert pool_mod.direct_io_wanted() is direct

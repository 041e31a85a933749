"""The one model writer (streamed shards), io/ importing nothing above it, and disk preflight for training."""

from __future__ import annotations

import ast
import gc
import json
import os
import re
import subprocess
import sys
import weakref
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import mergekit_lite
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.writer import TensorEntry, write_model_folder, write_shard

IO_DIR = Path(mergekit_lite.__file__).parent / "io"


# --- the streamed safetensors writer ---------------------------------------------------------------------

def test_shard_is_valid_safetensors_with_mixed_dtypes_shared_and_empty_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 5, generator=g).to(torch.bfloat16)  # one memory, two entries (expert copies)
    want = {"b.bf16": shared, "a.f32": torch.randn(3, 7, generator=g), "c.copy": shared,
            "d.empty": torch.zeros(0, 4, dtype=torch.float16), "e.i64": torch.arange(5),
            "f.odd": torch.randn(3, generator=g).to(torch.float16), "g.scalar": torch.tensor(2.5)}
    entries = [TensorEntry(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in want.items()]
    nbytes = write_shard(tmp_path / "x.safetensors", entries, metadata={"note": "hi"})
    assert nbytes == sum(v.numel() * v.element_size() for v in want.values())
    got = load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0  # data starts 8-byte aligned ...
    for k, v in want.items():  # ... and each tensor at a multiple of its element size
        assert header[k]["data_offsets"][0] % v.element_size() == 0, k


def test_a_tensor_made_of_parts_is_written_as_their_concatenation(tmp_path):
    """Fused experts: E views of one (memory-mapped) source, written back to back, equal the stacked tensor."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=g).to(torch.bfloat16)
    tail = torch.randn(2, 4, 3, generator=g).to(torch.bfloat16)
    parts = [w[None], w[None], tail]  # leading-axis slices of a [4, 4, 3] tensor
    entries = [TensorEntry("fused", (4, 4, 3), torch.bfloat16, lambda: parts),
               TensorEntry("after", (2,), torch.float32, lambda: torch.tensor([1.0, 2.0]))]
    write_shard(tmp_path / "x.safetensors", entries)
    got = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(got["fused"], torch.cat(parts))
    assert torch.equal(got["after"], torch.tensor([1.0, 2.0]))
    short = [TensorEntry("fused", (4, 4, 3), torch.bfloat16, lambda: parts[:2])]
    with pytest.raises(AssertionError, match="fused"):
        write_shard(tmp_path / "y.safetensors", short)


def test_tensors_are_computed_one_at_a_time_and_freed(tmp_path):
    """The header is known up front; each tensor is made only when written and dropped before the next."""
    alive: list[weakref.ref] = []
    made: list[str] = []

    def make(key):
        gc.collect()
        assert all(r() is None for r in alive), f"{key}: an earlier tensor is still held"
        made.append(key)
        t = torch.full((256, 256), float(len(made)))
        alive.append(weakref.ref(t))
        return t

    keys = [f"t{i}" for i in range(6)]
    entries = [TensorEntry(k, (256, 256), torch.float32, lambda k=k: make(k)) for k in keys]
    out = write_model_folder(tmp_path / "m", entries, shard_size=256 * 256 * 4 * 2 + 1, workers=1)
    assert made == keys  # each made exactly once, in order
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 6 * 256 * 256 * 4
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert load_file(str(out / "model-00003-of-00003.safetensors"))["t5"].eq(6.0).all()


def test_a_tensor_that_breaks_its_declaration_fails_and_leaves_nothing(tmp_path):
    entries = [TensorEntry("w", (2, 3), torch.float32, lambda: torch.zeros(3, 2))]
    with pytest.raises(AssertionError, match=r"w: got \(3, 2\).*declared \(2, 3\)"):
        write_model_folder(tmp_path / "m", entries, shard_size=10**9)
    assert list(tmp_path.iterdir()) == []


# --- io/ depends on nothing above it (no io -> card -> inspect_model -> io circle) -------------------------

ALLOWED = re.compile(r"^mergekit_lite\.(io(\..+)?|errors|plan)$")  # errors and plan import no package module


def _package_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m.startswith("mergekit_lite")]


def test_io_imports_only_io_errors_and_plan():
    for path in sorted(IO_DIR.glob("*.py")):
        bad = [m for m in _package_imports(path) if not ALLOWED.match(m)]
        assert not bad, f"{path.name} imports {bad}"
    pkg = IO_DIR.parent
    assert _package_imports(pkg / "errors.py") == [] and _package_imports(pkg / "plan.py") == []


def test_io_works_with_every_module_above_it_unimportable(tmp_path):
    """Poison card, inspect_model, ops and train in sys.modules, then import all of io/ and finish a folder."""
    modules = ", ".join(repr(f"mergekit_lite.io.{p.stem}") for p in IO_DIR.glob("*.py") if p.stem != "__init__")
    code = f"""
import importlib, json, sys
for name in ("mergekit_lite.card", "mergekit_lite.inspect_model", "mergekit_lite.ops", "mergekit_lite.train",
             "mergekit_lite.hub", "mergekit_lite.check", "mergekit_lite.cli", "mergekit_lite.verify"):
    sys.modules[name] = None  # importing it now raises ImportError
for m in ("mergekit_lite.io", {modules}):
    importlib.import_module(m)
from mergekit_lite.io.sidefiles import finish_folder, read_sidecar
finish_folder({str(tmp_path)!r}, {{"model_type": "llama"}}, None, {{"kind": "upcycle"}})
print(json.dumps(read_sidecar({str(tmp_path)!r})))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"kind": "upcycle"}
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "README.md").exists()


# --- disk preflight for training ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from mergekit_lite.ops.upcycle import run_upcycle
    from mergekit_lite.pico import build_pico_model
    from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus

    root = tmp_path_factory.mktemp("disk")
    train_txt, val_txt = write_corpus(root / "corpus")
    dense = build_pico_model("llama", root / "dense", texts=stdlib_docstrings(), hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    (root / "up.yaml").write_text(yaml.safe_dump({"source": str(dense), "num_experts": 4, "experts_per_token": 2,
                                                  "dtype": "float32"}))
    run_upcycle(root / "up.yaml", root / "moe", echo=lambda s: None)
    return root / "moe", str(train_txt), str(val_txt)


def _train(tiny_moe, out: Path, **kw):
    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.loop import train

    model, train_txt, val_txt = tiny_moe
    body = {"model": str(model), "data": {"train": [train_txt], "validation": [val_txt]}, "seq_len": 32,
            "micro_batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "eval_batches": 1, "output": str(out), **kw}
    return train(validate_recipe(body, TrainRecipe), echo=lambda *a: None)


def _little_disk(monkeypatch, free: int = 1000):
    import mergekit_lite.io.writer as writer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - free, free))


def test_checkpoint_estimate_counts_parameters_and_adam_moments():
    from mergekit_lite.train.checkpoint import checkpoint_bytes

    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5, bias=False).to(torch.bfloat16))
    model[0].weight.requires_grad_(False)  # frozen: stored once, no optimizer moments
    model.register_buffer("bias_E", torch.zeros(8))
    trainable_fp32 = 20 + 100  # model[0].bias + model[1].weight (its moments are fp32 whatever its dtype)
    want = 1_000_000 + (200 + 20) * 4 + 100 * 2 + 8 * trainable_fp32 + 8 * 4
    assert checkpoint_bytes(model) == want


def test_checkpoint_refused_on_a_full_disk_with_the_figure(tiny_moe, tmp_path, monkeypatch):
    import mergekit_lite.train.checkpoint as checkpoint
    from mergekit_lite.plan import format_bytes

    seen = {}
    real = checkpoint.checkpoint_bytes
    monkeypatch.setattr(checkpoint, "checkpoint_bytes", lambda model: seen.setdefault("n", real(model)))
    _little_disk(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(MoemergeError, match=r"not enough free disk for .*step-0000001: need about [\d.]+ [KM]B, "
                                            r"1.00 KB free") as e:
        _train(tiny_moe, out, checkpoint_every=1)
    assert f"need about {format_bytes(int(seen['n'] * 1.02) + 1_000_000)}," in str(e.value)
    n_params = sum(t.numel() for t in load_file(str(tiny_moe[0] / "model.safetensors")).values())
    # fp32 weights + two fp32 Adam moments per parameter + 1 MB (RNG, scheduler; buffers are a few KB)
    assert 12 * n_params + 1_000_000 <= seen["n"] <= 12 * n_params + 1_100_000
    ckpts = out / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())  # nothing half-written
    assert not (out / "final").exists()


def test_final_save_refused_on_a_full_disk_with_the_figure(tiny_moe, tmp_path, monkeypatch):
    _little_disk(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(MoemergeError, match=r"not enough free disk for .*final: need about [\d.]+ [KMG]B"):
        _train(tiny_moe, out)
    assert not (out / "final").exists() and not list(out.glob(".final.moemerge-*"))


def test_final_model_goes_through_the_shared_writer_in_shards(tiny_moe, tmp_path):
    out = tmp_path / "run"
    _train(tiny_moe, out, shard_size=200_000)
    final = out / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((final / s).is_file() for s in shards)
    sizes = {s: sum(t.numel() * t.element_size() for t in load_file(str(final / s)).values()) for s in shards}
    assert sum(sizes.values()) == index["metadata"]["total_size"]
    assert (final / "README.md").is_file() and (final / "moemerge.json").is_file()


def test_preflight_counts_the_debris_of_a_killed_run_as_free(tmp_path, monkeypatch):
    """A run killed mid-write and started again: its own temporary folder, removed before writing, is not
    held against it; a live process's folder is."""
    from test_safety import dead_pid

    from mergekit_lite.io.writer import preflight_disk

    target = tmp_path / "m"
    _little_disk(monkeypatch, free=500_000)  # the estimate for 1000 bytes is 1,001,020: short by about 0.5 MB
    with pytest.raises(MoemergeError, match=r"need about 1.00 MB, 500.00 KB free on \S+$"):
        preflight_disk(target, 1000)
    moved = tmp_path / f".m.moemerge-old-{dead_pid()}"  # a swap killed midway: put back, so not free either
    moved.mkdir()
    (moved / "model.safetensors").write_bytes(bytes(600_000))
    with pytest.raises(MoemergeError, match=r"500.00 KB free on \S+$"):
        preflight_disk(target, 1000)
    (moved / "model.safetensors").unlink()
    moved.rmdir()
    live = tmp_path / f".m.moemerge-tmp-{os.getppid()}"  # alive, not ours: never removed, so not free either
    live.mkdir()
    (live / "model.safetensors").write_bytes(bytes(600_000))
    with pytest.raises(MoemergeError, match=r"500.00 KB free on \S+$"):
        preflight_disk(target, 1000)
    dead = tmp_path / f".m.moemerge-tmp-{dead_pid()}"
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(bytes(300_000))
    with pytest.raises(MoemergeError, match=r"500.00 KB free on \S+ \(and 300.00 KB in temporary folders of "
                                            r"interrupted runs\)$"):
        preflight_disk(target, 1000)
    (dead / "model-00002-of-00002.safetensors").write_bytes(bytes(300_000))
    preflight_disk(target, 1000)  # 500 KB free + 600 KB of a dead run's debris
    write_model_folder(target, [TensorEntry("t", (250,), torch.float32, lambda: torch.ones(250))], shard_size=10**6)
    assert not dead.exists() and live.exists() and (target / "model.safetensors").is_file()

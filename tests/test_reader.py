"""The lazy reader reads only what belongs to the model folder (index entries, links, Hub cache snapshots)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import mergekit_lite.io.reader as reader_mod
from mergekit_lite.check import check_folder
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import CheckpointReader
from mergekit_lite.ops.upcycle import run_upcycle

INDEX = "model.safetensors.index.json"


def hub_cache_snapshot(model: Path, where: Path, repo: str = "models--org--name", rev: str = "abc") -> Path:
    """`model` laid out as the Hub cache stores it: files in blobs/, the snapshot made of relative links."""
    blobs, snap = where / repo / "blobs", where / repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (where / repo / "refs").mkdir()
    (where / repo / "refs" / "main").write_text(rev)
    for n, f in enumerate(sorted(p for p in model.rglob("*") if p.is_file())):
        blob = blobs / f"{n:04d}deadbeef"
        shutil.copyfile(f, blob)
        link = snap / f.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


def escaping_index(model: Path, where: Path) -> tuple[Path, Path]:
    """A copy of `model` whose index names `../outside.safetensors`, a real shard one level up."""
    d = where / "escape"
    shutil.copytree(model, d)
    outside = where / "outside.safetensors"
    (d / "model.safetensors").rename(outside)
    from safetensors import safe_open

    with safe_open(str(outside), framework="pt") as f:
        keys = list(f.keys())
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": 0},
                                       "weight_map": {k: "../outside.safetensors" for k in keys}}))
    return d, outside


def _spy_safe_open(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = reader_mod.safe_open

    def spy(path, *a, **k):
        opened.append(os.path.realpath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(reader_mod, "safe_open", spy)
    return opened


@pytest.mark.parametrize("name", ["../outside.safetensors", "/abs/model.safetensors", "sub/../../x.safetensors"])
def test_index_names_outside_the_folder_are_refused_before_any_read(pico_llama, tmp_path, monkeypatch, name):
    d, outside = escaping_index(pico_llama, tmp_path)
    if name != "../outside.safetensors":
        body = json.loads((d / INDEX).read_text())
        body["weight_map"] = {k: name for k in body["weight_map"]}
        (d / INDEX).write_text(json.dumps(body))
    opened = _spy_safe_open(monkeypatch)
    with pytest.raises(MoemergeError) as e:
        CheckpointReader(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{INDEX} entry '") and repr(name) in msg and "fix the entry" in msg
    assert opened == []  # refused before the first shard header was read


def test_check_and_upcycle_refuse_an_escaping_index(pico_llama, tmp_path, monkeypatch):
    d, outside = escaping_index(pico_llama, tmp_path)
    opened = _spy_safe_open(monkeypatch)
    with pytest.raises(MoemergeError, match=r"'\.\./outside\.safetensors', which is not a plain relative path"):
        check_folder(d)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {d}\narchitecture: mixtral\nnum_experts: 2\nexperts_per_token: 1\n")
    with pytest.raises(MoemergeError, match=r"\.\./outside\.safetensors"):
        run_upcycle(recipe, tmp_path / "out", echo=lambda s: None)
    assert str(outside) not in opened and opened == []
    assert not (tmp_path / "out").exists()


def test_bin_index_names_outside_the_folder_are_refused_before_torch_load(pico_llama, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "bin"
    shutil.copytree(pico_llama, d)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "outside.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: "../outside.bin" for k in sd}}))
    loaded: list[str] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(str(a[0])))
    with pytest.raises(MoemergeError, match=r"^pytorch_model\.bin\.index\.json entry '.*' names '\.\./outside\.bin'"):
        CheckpointReader(d)
    assert loaded == []


def test_link_leaving_the_folder_is_refused(pico_llama, tmp_path):
    d = tmp_path / "linked"
    shutil.copytree(pico_llama, d)
    elsewhere = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(elsewhere)
    (d / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(MoemergeError, match=r"resolves to .*elsewhere\.safetensors, outside .*cp -L"):
        CheckpointReader(d)


def test_hub_cache_snapshot_links_are_readable(pico_factory, tmp_path):
    model = pico_factory("llama", max_shard_size="40KB")
    snap = hub_cache_snapshot(model, tmp_path / "hub")
    assert all(p.is_symlink() for p in snap.iterdir())
    with CheckpointReader(snap) as r, CheckpointReader(model) as plain:
        assert r.keys() == plain.keys() and r.total_bytes() == plain.total_bytes()
        k = r.keys()[0]
        assert r.get(k).equal(plain.get(k))
    assert check_folder(snap).tensors == 39


def test_link_from_a_snapshot_out_of_the_cache_is_refused(pico_factory, tmp_path):
    snap = hub_cache_snapshot(pico_factory("llama", max_shard_size="40KB"), tmp_path / "hub")
    index = json.loads((snap / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    stolen = tmp_path / "stolen.safetensors"
    shutil.copyfile(snap / shard, stolen)
    (snap / shard).unlink()
    (snap / shard).symlink_to(stolen)
    with pytest.raises(MoemergeError, match=r"outside .* and its Hub cache"):
        CheckpointReader(snap)


# ---- sizes (shard_size, --shard-size): one parser, pydantic's ByteSize ---------------------------
@pytest.mark.parametrize("text,bytes_", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (1024, 1024),
                                         ("1.5GB", 15 * 10**8), ("5G", 5 * 10**9), ("3 kib", 3 * 1024)])
def test_sizes_are_read_by_pydantic_bytesize(text, bytes_):
    from pydantic import ByteSize, TypeAdapter

    from mergekit_lite.recipe import parse_size

    assert parse_size(text) == bytes_ == TypeAdapter(ByteSize).validate_python(text)


@pytest.mark.parametrize("bad", ["lots", "0", 0, "5XB", -1])
def test_bad_sizes_give_the_clear_error(bad):
    from mergekit_lite.recipe import parse_size

    with pytest.raises(ValueError, match=r"^(cannot read size .*; write e\.g\. 5GB, 500MB, 2GiB|size must be positive)"):
        parse_size(bad)


# ---- one rule for every read, no write through a link (issue 23, item 2) ------------------------------------
def _leaky(pico_llama, tmp_path, name: str) -> tuple[Path, Path]:
    """A copy of the pico model whose `name` is a link to a file outside it; (folder, the outside file)."""
    d = tmp_path / "leaky"
    shutil.copytree(pico_llama, d)
    outside = tmp_path / f"outside-{name}"
    if (d / name).exists():
        (d / name).rename(outside)
    else:
        outside.write_text("private: not part of any model")
    (d / name).symlink_to(outside)
    return d, outside


def test_side_files_are_copied_only_from_inside_the_source(pico_llama, tmp_path):
    import yaml

    d, outside = _leaky(pico_llama, tmp_path, "LICENSE")
    (tmp_path / "up.yaml").write_text(yaml.safe_dump({"source": str(d), "num_experts": 4, "experts_per_token": 2}))
    with pytest.raises(MoemergeError, match=r"side file .*LICENSE names 'LICENSE', which resolves to .*outside-LICENSE"):
        run_upcycle(tmp_path / "up.yaml", tmp_path / "out", echo=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_verify_train_and_ensemble_refuse_a_weights_link_leaving_the_folder(pico_llama, tmp_path):
    import torch

    from mergekit_lite.recipe import TrainRecipe, validate_recipe
    from mergekit_lite.train.preflight import preflight
    from mergekit_lite.verify import load_model

    d, outside = _leaky(pico_llama, tmp_path, "model.safetensors")
    with pytest.raises(MoemergeError, match=r"^verify: the link .*model\.safetensors names .* outside"):
        load_model(d, torch.float32, torch.device("cpu"))
    (tmp_path / "t.txt").write_text("some text\n")
    r = validate_recipe({"model": str(d), "data": {"train": [str(tmp_path / "t.txt")]}, "seq_len": 8,
                         "micro_batch_size": 1, "max_steps": 1, "learning_rate": 1e-3,
                         "output": str(tmp_path / "run")}, TrainRecipe)
    with pytest.raises(MoemergeError, match=r"^model: the link .*model\.safetensors names .* outside"):
        preflight(r, d, resume=False, overwrite=False)


def test_nothing_is_written_through_a_link_in_a_model_folder(pico_llama, tmp_path):
    from mergekit_lite.io.sidefiles import write_sidecar

    d, outside = _leaky(pico_llama, tmp_path, "moemerge.json")
    with pytest.raises(MoemergeError, match=r"moemerge\.json is a link; moemerge does not write through links"):
        write_sidecar(d, {"kind": "upcycle"})
    assert outside.read_text() == "private: not part of any model"


@pytest.mark.parametrize("text, says", [("[1, 2]", "holds a JSON list, not an object of settings"),
                                        ("{broken", "is not valid JSON"), (b"\xff\xfe{}", "is not valid JSON")])
def test_a_config_that_is_not_a_json_object_is_one_line_everywhere(pico_llama, tmp_path, text, says):
    from mergekit_lite.check import check_folder

    d = tmp_path / "cfg"
    shutil.copytree(pico_llama, d)
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    for call, needle in ((lambda: CheckpointReader(d), says), (lambda: check_folder(d), "config.json")):
        with pytest.raises(MoemergeError, match=needle) as e:
            call()
        assert "\n" not in str(e.value)

"""`--resume` loads nothing (accelerate.load_state unpickles) from a folder `moemerge train` did not make."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from mergekit_lite.errors import MoemergeError
from mergekit_lite.pico import build_pico_model
from mergekit_lite.recipe import TrainRecipe, validate_recipe
from mergekit_lite.train.corpus import stdlib_docstrings, write_corpus
from mergekit_lite.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run of a dense pico Llama with a checkpoint at step 2, and its recipe."""
    root = tmp_path_factory.mktemp("guard")
    train_txt, val_txt = write_corpus(root / "corpus")
    dense = build_pico_model("llama", root / "dense", texts=stdlib_docstrings(), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)

    def recipe(out, **kw) -> TrainRecipe:
        return validate_recipe({"model": str(dense), "data": {"train": [str(train_txt)], "validation": [str(val_txt)]},
                                "seq_len": 32, "micro_batch_size": 4, "max_steps": 2, "checkpoint_every": 2,
                                "learning_rate": 1e-3, "eval_batches": 1, "output": str(out), **kw}, TrainRecipe)

    train(recipe(root / "run"), echo=lambda *_: None)
    return root / "run", recipe


@pytest.fixture
def no_load_state(monkeypatch):
    import mergekit_lite.train.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError("load_state was called")

    monkeypatch.setattr(loop, "load_checkpoint", refuse)


def copy_of(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run[0], out)
    shutil.rmtree(out / "final")  # as if killed before the end: --resume of a finished run loads nothing at all
    return out


def test_a_run_records_itself(run):
    record = json.loads((run[0] / "moemerge-run.json").read_text())
    assert record["tool"] == "moemerge train" and len(record["recipe_sha256"]) == 16
    assert (run[0] / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()


def test_resume_needs_the_run_record(run, tmp_path, no_load_state):
    out = copy_of(run, tmp_path)
    (out / "moemerge-run.json").unlink()  # e.g. a folder of accelerate checkpoints from elsewhere
    with pytest.raises(MoemergeError, match=r"^--resume: .* has no moemerge-run.json from `moemerge train`") as e:
        train(run[1](out), resume=True, echo=lambda *_: None)
    assert "\n" not in str(e.value)


def test_resume_needs_the_checkpoints_trainer_state(run, tmp_path, no_load_state):
    out = copy_of(run, tmp_path)
    (out / "checkpoints" / "step-0000002" / "trainer_state.json").unlink()
    with pytest.raises(MoemergeError, match=r"^--resume: .*step-0000002 has no readable trainer_state.json") as e:
        train(run[1](out), resume=True, echo=lambda *_: None)
    assert "\n" not in str(e.value)


def test_with_both_load_state_is_reached(run, tmp_path, no_load_state):
    out = copy_of(run, tmp_path)  # the guard, not the patch, is what stopped the two runs above
    with pytest.raises(AssertionError, match="load_state was called"):
        train(run[1](out), resume=True, echo=lambda *_: None)


def test_resume_refuses_every_field_that_changes_the_run(run, tmp_path, no_load_state):
    out = copy_of(run, tmp_path)
    edited = run[1](out, learning_rate=2e-3, seq_len=16, micro_batch_size=2, trainable="routers",
                    data={"train": [str(run[0].parent / "corpus" / "val.txt")],
                          "validation": [str(run[0].parent / "corpus" / "val.txt")]})
    with pytest.raises(MoemergeError) as e:
        train(edited, resume=True, echo=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--resume: the recipe changes the run")
    for field in ("learning_rate 0.001 -> 0.002", "seq_len 32 -> 16", "micro_batch_size 4 -> 2",
                  "trainable 'all' -> 'routers'", "data.train", "global batch 4 -> 2"):
        assert field in msg, (field, msg)


def test_resume_refuses_a_shorter_run_and_a_new_global_batch(run, tmp_path, no_load_state):
    out = copy_of(run, tmp_path)
    with pytest.raises(MoemergeError, match=r"max_steps 2 -> 1"):
        train(run[1](out, max_steps=1, warmup_steps=0), resume=True, echo=lambda *_: None)
    with pytest.raises(MoemergeError, match=r"global batch 4 -> 8 sequences per step .* global_batch_size: 4"):
        train(run[1](out, gradient_accumulation_steps=2), resume=True, echo=lambda *_: None)


def test_resume_accepts_what_only_extends_or_observes_the_run(run, tmp_path):
    out = copy_of(run, tmp_path)
    said: list[str] = []
    # the same global batch given the other way, a longer run, other logging: accepted, and said
    summary = train(run[1](out, max_steps=3, global_batch_size=4, log_every=2, eval_every=3, keep_checkpoints=3),
                    resume=True, echo=said.append)
    assert summary["steps"] == 3
    notes = [line for line in said if line.startswith("--resume: accepted change")]
    assert any("max_steps 2 -> 3 (the run is extended)" in n for n in notes), said
    assert any("log_every 1 -> 2" in n for n in notes) and not any("global_batch" in n for n in notes), said


def test_a_damaged_checkpoint_is_one_line(run, tmp_path):
    out = copy_of(run, tmp_path)
    shard = next((out / "checkpoints" / "step-0000002" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # a disk that filled mid-write, a bad copy
    with pytest.raises(MoemergeError, match=r"^--resume: .*step-0000002 cannot be loaded \(.*\); it is damaged or "
                                            r"was written for another model") as e:
        train(run[1](out), resume=True, echo=lambda *_: None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["dcp-metadata", "deepspeed-file"])
def test_a_checkpoint_that_would_run_code_is_refused_before_anything_is_unpickled(tmp_path, where):
    """DCP reads `.metadata` with plain pickle and DeepSpeed its files with weights_only=False: a crafted
    checkpoint is refused in one line and its code never runs; real metadata passes."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from mergekit_lite.train.checkpoint import MODEL_STATE, refuse_code_in_checkpoint

    ckpt = tmp_path / "step-0000003"
    dcp.save({"model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)}},
             checkpoint_id=str(ckpt / MODEL_STATE))
    refuse_code_in_checkpoint(ckpt)  # what DCP writes is data only
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    if where == "dcp-metadata":
        (ckpt / MODEL_STATE / ".metadata").write_bytes(pickle.dumps(Payload()))
        bad = ckpt / MODEL_STATE / ".metadata"
    else:
        (ckpt / MODEL_STATE / "zero").mkdir()
        bad = ckpt / MODEL_STATE / "zero" / "mp_rank_00_model_states.pt"
        torch.save({"module": {}, "evil": Payload()}, bad)
    with pytest.raises(MoemergeError) as e:
        refuse_code_in_checkpoint(ckpt)
    assert str(e.value) == (f"--resume: {bad} names posix.system, which no checkpoint holds (it would run code "
                            "when loaded); it was not written by moemerge: delete that checkpoint")
    assert not marker.exists()
    from mergekit_lite.train.checkpoint import EXTRA, load_checkpoint

    torch.save({}, ckpt / EXTRA)
    with pytest.raises(MoemergeError, match="names posix.system"):  # --resume checks before it loads
        load_checkpoint(None, None, None, None, None, ckpt)
    assert not marker.exists()

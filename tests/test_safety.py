"""Data safety: no command writes over an input, `--overwrite` removes only the command's own files, and
temporary folders of killed runs are cleaned up (and reported by `check`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import refuse_overlap
from mergekit_lite.ops.graft import run_graft
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.pico import build_pico_model
from mergekit_lite.recipe import TrainRecipe, validate_recipe


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` with a hash of its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def src(tmp_path, pico_llama) -> Path:
    """A private copy of a pico model with a user file in it (the thing that must survive)."""
    d = tmp_path / "src"
    shutil.copytree(pico_llama, d)
    (d / "my-notes.txt").write_text("mine")
    return d


def up_recipe(where: Path, **fields) -> Path:
    body = {"num_experts": 4, "experts_per_token": 2, "dtype": "float32", **fields}
    where.mkdir(parents=True, exist_ok=True)
    (where / "r.yaml").write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in body.items()}))
    return where / "r.yaml"


def refused(call, keep: Path, *needles: str) -> str:
    """`call()` raises MoemergeError naming every needle, and `keep` is byte-identical afterwards."""
    before = snapshot(keep)
    with pytest.raises(MoemergeError) as exc:
        call()
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert snapshot(keep) == before, f"{keep} was modified"
    return msg


# ---- 1. an output never overlaps an input -------------------------------------------------------
def test_upcycle_refuses_output_that_is_the_source(tmp_path, src):
    r = up_recipe(tmp_path / "recipes", source=src)
    refused(lambda: run_upcycle(r, src, overwrite=True, echo=print), src,
            f"output {src} is the recipe's source {src}", "choose another output")


def test_upcycle_refuses_the_source_through_a_symlink(tmp_path, src):
    link = tmp_path / "link"
    link.symlink_to(src)
    r = up_recipe(tmp_path / "recipes", source=src)
    refused(lambda: run_upcycle(r, link, overwrite=True, echo=print), src,
            f"output {link} is the recipe's source {src}", f"{link} -> {src}")


def test_upcycle_refuses_output_containing_the_source(tmp_path, pico_llama):
    out = tmp_path / "out"
    shutil.copytree(pico_llama, out / "src")
    r = up_recipe(tmp_path / "recipes", source=out / "src")
    refused(lambda: run_upcycle(r, out, overwrite=True, echo=print), out,
            f"output {out} contains the recipe's source {out / 'src'}", "choose an output outside it")


def test_upcycle_refuses_output_inside_the_source_without_overwrite(tmp_path, src):
    r = up_recipe(tmp_path / "recipes", source=src)
    refused(lambda: run_upcycle(r, src / "moe", echo=print), src,
            f"output {src / 'moe'} lies inside the recipe's source {src}")
    alias = tmp_path / "alias"  # the output does not exist yet and its parent is a link to the source
    alias.symlink_to(src)
    refused(lambda: run_upcycle(r, alias / "moe", echo=print), src,
            f"output {alias / 'moe'} lies inside the recipe's source {src}", f"-> {src / 'moe'}")


def test_upcycle_refuses_expert_source_base_and_recipe(tmp_path, src, pico_llama):
    r = up_recipe(tmp_path / "recipes", experts=[{"source": str(pico_llama)}, {"source": str(src)}],
                  num_experts=None, base=str(pico_llama))
    refused(lambda: run_upcycle(r, src, overwrite=True, echo=print), src, "the recipe's experts[1].source")
    r = up_recipe(tmp_path / "recipes", experts=[{"source": str(pico_llama)}], num_experts=None,
                  experts_per_token=1, base=str(src))
    refused(lambda: run_upcycle(r, src / "out", echo=print), src, "lies inside the recipe's base")
    r = up_recipe(tmp_path / "recipes", source=pico_llama)
    refused(lambda: run_upcycle(r, tmp_path, overwrite=True, echo=print), src,
            f"output {tmp_path} contains the recipe file {r}")


def test_upcycle_dry_run_with_output_inside_source_is_refused_too(tmp_path, src):
    r = up_recipe(tmp_path / "recipes", source=src)
    refused(lambda: run_upcycle(r, src / "moe", dry_run=True, echo=print), src, "lies inside the recipe's source")


def test_graft_expand_onto_its_own_source_is_refused(tmp_path, src):
    refused(lambda: run_graft(src, src, expand=2, overwrite=True, echo=print), src,
            f"output {src} is the graft source {src}")


def test_graft_refuses_slice_model_and_head_from_inside_output(tmp_path, pico_llama):
    out = tmp_path / "out"
    shutil.copytree(pico_llama, out / "b")
    recipe = tmp_path / "g.yaml"
    recipe.write_text(yaml.safe_dump({"slices": [{"model": str(pico_llama), "layers": [0, 2]},
                                                 {"model": str(out / "b"), "layers": [0, 2]}]}))
    refused(lambda: run_graft(recipe, out, overwrite=True, echo=print), out,
            f"output {out} contains slices[1].model {out / 'b'}")
    recipe.write_text(yaml.safe_dump({"slices": [{"model": str(pico_llama), "layers": [0, 2]}],
                                      "head_from": str(out / "b")}))
    refused(lambda: run_graft(recipe, out, overwrite=True, echo=print), out, f"contains head_from {out / 'b'}")


def test_hub_ids_and_unrelated_paths_pass(tmp_path, src):
    refuse_overlap(tmp_path / "out", [("the recipe's source", "org/model"), ("the recipe's base", None),
                                      ("the recipe's source", src)])
    refuse_overlap(tmp_path / "src-moe", [("the recipe's source", src)])  # a shared name prefix is no overlap


# ---- train and quickstart: output vs inputs, and --overwrite removes only their own files ---------
@pytest.fixture
def train_world(tmp_path, pico_llama):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("Some text to train on.\n" * 50)
    return {"data": data, "model": pico_llama}


def train_recipe(world, out: Path, model: Path | None = None, data: Path | None = None) -> TrainRecipe:
    return validate_recipe({"model": str(model or world["model"]), "data": {"train": [str(data or world["data"])]},
                            "seq_len": 16, "micro_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
                            "output": str(out)}, TrainRecipe)


def fake_run(out: Path) -> None:
    """What an earlier `train` leaves in its output folder (and a plot)."""
    (out / "checkpoints" / "step-0000002").mkdir(parents=True)
    (out / "checkpoints" / "step-0000002" / "trainer_state.json").write_text("{}")
    (out / "metrics.jsonl").write_text("{}\n")
    for d, name in (("cache", "packed-train-0123"), ("final", "model.safetensors"),
                    ("adapter", "adapter_config.json")):
        (out / d).mkdir()
        (out / d / name).write_text("x")
    (out / "loss.png").write_bytes(b"png")
    (out / f".final.moemerge-tmp-{dead_pid()}").mkdir()


def test_train_refuses_output_holding_the_model_before_deleting(tmp_path, train_world, pico_llama):
    from mergekit_lite.train.loop import train

    run = tmp_path / "run"
    fake_run(run)
    shutil.rmtree(run / "final")
    shutil.copytree(pico_llama, run / "final")  # model: run/final, output: run (the reported data loss)
    refused(lambda: train(train_recipe(train_world, run, model=run / "final"), overwrite=True, echo=print), run,
            f"output {run} contains the model {run / 'final'}")


def test_train_refuses_output_that_is_the_data_folder(tmp_path, train_world):
    from mergekit_lite.train.loop import train

    data = train_world["data"]
    refused(lambda: train(train_recipe(train_world, data), overwrite=True, echo=print), data,
            f"output {data} is data.train {data}")
    refused(lambda: train(train_recipe(train_world, tmp_path, data=data / "train.txt"), echo=print), data,
            f"output {tmp_path} contains data.train {data / 'train.txt'}")


def test_train_overwrite_refuses_a_foreign_file_and_removes_only_its_own(tmp_path, train_world):
    from mergekit_lite.train.preflight import preflight

    run = tmp_path / "run"
    fake_run(run)
    (run / "notes.md").write_text("my notes")
    r = train_recipe(train_world, run)
    refused(lambda: preflight(r, train_world["model"], resume=False, overwrite=True), run,
            f"--overwrite: {run} holds {run / 'notes.md'}", "moemerge train")
    (run / "notes.md").unlink()
    preflight(r, train_world["model"], resume=False, overwrite=True)
    assert run.is_dir() and not list(run.iterdir())


def test_train_overwrite_refuses_a_users_file_inside_its_own_folders_before_training(tmp_path, train_world):
    from mergekit_lite.train.preflight import preflight

    run = tmp_path / "run"
    fake_run(run)
    (run / "final" / "thesis.tex").write_text("mine")  # used to be found only after the whole run, at the save
    r = train_recipe(train_world, run)
    refused(lambda: preflight(r, train_world["model"], resume=False, overwrite=True), run,
            f"--overwrite: {run} holds {run / 'final' / 'thesis.tex'}")
    (run / "final" / "thesis.tex").unlink()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()  # our file's name, but a folder: the user's
    refused(lambda: preflight(r, train_world["model"], resume=False, overwrite=True), run,
            f"--overwrite: {run} holds {run / 'metrics.jsonl'}")
    (run / "metrics.jsonl").rmdir()
    (run / "metrics.jsonl").write_text("")
    # final/ recording what the writer put there: a user's shard-named file in it is theirs (names alone pass it)
    (run / "final" / "moemerge.json").write_text('{"written": {"model.safetensors": 4}}')
    (run / "final" / "model.safetensors").write_bytes(b"1234")
    (run / "final" / "model-mine.safetensors").write_bytes(b"mine")
    refused(lambda: preflight(r, train_world["model"], resume=False, overwrite=True), run,
            f"--overwrite: {run} holds {run / 'final' / 'model-mine.safetensors'}")
    (run / "final" / "model-mine.safetensors").unlink()
    preflight(r, train_world["model"], resume=False, overwrite=True)
    assert not list(run.iterdir())


def test_resume_ignores_a_half_written_checkpoint(tmp_path):
    from mergekit_lite.train.preflight import latest_checkpoint

    (tmp_path / "checkpoints" / "step-0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000004.tmp").mkdir()  # killed while saving step 4
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-0000002"


def test_checkpoint_save_removes_a_killed_runs_half_written_checkpoints(tmp_path):
    import torch

    from mergekit_lite.train.checkpoint import save_checkpoint

    class OneProcess:  # the part of accelerate.Accelerator that save_checkpoint uses
        is_main_process, num_processes, process_index, scaler, distributed_type = True, 1, 0, None, "NO"

        def wait_for_everyone(self):
            pass

    class Tap:
        def state_dict(self, reduce):
            return {}

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    stale = tmp_path / "checkpoints" / "step-0000004.tmp"  # kill -9 while step 4 was being saved
    stale.mkdir(parents=True)
    (stale / "optimizer.bin").write_bytes(b"x" * 100)
    save_checkpoint(OneProcess(), model, optimizer, scheduler, Tap(), tmp_path, 6, {"step": 6, "tokens": 0}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000006"]


def test_quickstart_overwrite_removes_only_its_own_products(tmp_path, monkeypatch):
    import mergekit_lite.train.corpus as corpus
    from mergekit_lite.quickstart import run_quickstart

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    monkeypatch.setattr(corpus, "write_corpus", stop)  # the first thing quickstart writes: stop right there
    work = tmp_path / "qs"
    for d in ("corpus", "dense", "moe", "runs/moe/final"):
        (work / d).mkdir(parents=True)
    (work / "upcycle.yaml").write_text("source: dense\n")
    (work / "thesis.tex").write_text("mine")
    refused(lambda: run_quickstart(work, overwrite=True, echo=print), work,
            f"--overwrite: {work} holds {work / 'thesis.tex'}", "moemerge quickstart")
    (work / "thesis.tex").unlink()
    (work / "corpus" / "my-corpus.txt").write_text("a user's corpus/, matched by its name alone before")
    refused(lambda: run_quickstart(work, overwrite=True, echo=print), work,
            f"--overwrite: {work} holds {work / 'corpus' / 'my-corpus.txt'}")
    (work / "corpus" / "my-corpus.txt").unlink()
    with pytest.raises(Stop):
        run_quickstart(work, overwrite=True, echo=lambda s: None)
    assert work.is_dir() and not list(work.iterdir())


# ---- 3. temporary folders of killed runs --------------------------------------------------------
def dead_pid() -> int:
    """The id of a process that has exited and been reaped (so it no longer exists)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_removed_live_ones_kept(tmp_path, pico_llama):
    out = tmp_path / "out"
    recipe = up_recipe(tmp_path / "recipes", source=pico_llama)
    run_upcycle(recipe, out, echo=lambda _: None)  # the old-tag folder of a finished swap is debris beside it
    dead = dead_pid()
    stale = [tmp_path / f".out.moemerge-tmp-{dead}", tmp_path / f".out.moemerge-old-{dead}"]
    live = tmp_path / f".out.moemerge-tmp-{os.getppid()}"  # alive, but not ours
    other = tmp_path / f".other.moemerge-tmp-{dead}"  # another target's: not this run's business
    for d in (*stale, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 3000)
    lines: list[str] = []
    run_upcycle(recipe, out, overwrite=True, echo=lines.append)
    assert not any(d.exists() for d in stale) and live.exists() and other.exists()
    removed = [line for line in lines if "left by an interrupted run" in line]
    assert len(removed) == 2 and all(f"process {dead} has ended" in line for line in removed)
    assert f"removed {stale[0]} (3.00 KB)" in "\n".join(removed)


def test_check_reports_debris_beside_the_folder(tmp_path, pico_llama):
    from mergekit_lite.check import check_folder

    dead = dead_pid()
    (tmp_path / f".m.moemerge-tmp-{dead}").mkdir()
    (tmp_path / f".m.moemerge-tmp-{dead}" / "model.safetensors").write_bytes(b"x" * 5000)
    with pytest.raises(MoemergeError, match=rf"m is not a folder \(temporary folder beside it: .*-{dead} \(5.00 KB"):
        check_folder(tmp_path / "m")
    shutil.copytree(pico_llama, tmp_path / "m")
    notes = check_folder(tmp_path / "m").notes
    assert notes == [f"temporary folder beside it: {tmp_path}/.m.moemerge-tmp-{dead} (5.00 KB, process {dead} has "
                     "ended); left by an interrupted write, delete it (the next write of this folder does)"]


def test_kill_9_mid_write_then_rerun_cleans_up(tmp_path):
    """A real `kill -9` of `moemerge upcycle` while it writes, then the next run removes its temp folder."""
    dense = build_pico_model("llama", tmp_path / "dense", hidden_size=128, intermediate_size=1024,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    r = up_recipe(tmp_path / "recipes", source=dense, num_experts=8, shard_size="1MB", noise=0.01)
    out = tmp_path / "out"
    log = tmp_path / "upcycle.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "mergekit_lite", "upcycle", str(r), "-o", str(out)],
                                stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    tmp = tmp_path / f".out.moemerge-tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (tmp.is_dir() and any(tmp.glob("*.safetensors"))):  # mid-write: at least one shard on disk
        assert proc.poll() is None, f"upcycle ended before it could be killed: {log.read_text()[-2000:]!r}"
        assert time.monotonic() < deadline, "upcycle never started writing"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and not out.exists(), "the kill came too late: nothing was left half-written"
    lines: list[str] = []
    run_upcycle(r, out, echo=lines.append)
    assert not tmp.exists() and (out / "config.json").is_file()
    assert any(f"removed {tmp} (" in line and f"process {proc.pid} has ended" in line for line in lines), lines
    assert not list(tmp_path.glob(".out.moemerge-*"))


def test_train_final_save_reports_the_stale_temp_folder_it_removes(tmp_path, train_world):
    from mergekit_lite.train.loop import train

    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".final.moemerge-tmp-{dead_pid()}"  # a run killed while writing final/
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    lines: list[str] = []
    train(train_recipe(train_world, out), echo=lines.append, progress=False)
    assert not stale.exists() and (out / "final" / "config.json").is_file()
    assert any(str(stale.name) in line and "removed" in line for line in lines), lines


# ---- upcycle/graft --overwrite replaces only a model folder moemerge wrote ---------------------------
def test_overwrite_replaces_only_a_moemerge_folder_holding_nothing_else(tmp_path, src):
    recipe = up_recipe(tmp_path / "r", source=src)
    work = tmp_path / "work"  # a folder of other work, pointed at by mistake
    work.mkdir()
    (work / "thesis.tex").write_text("years")
    refused(lambda: run_upcycle(recipe, work, overwrite=True, echo=lambda s: None), work,
            str(work), "not written by moemerge")
    out = tmp_path / "out"
    run_upcycle(recipe, out, echo=lambda s: None)
    (out / "eval-results.json").write_text("{}")  # the user added a file to the model folder
    refused(lambda: run_upcycle(recipe, out, overwrite=True, echo=lambda s: None), out,
            str(out / "eval-results.json"), "did not write")
    (out / "eval-results.json").unlink()
    (out / "README.md").write_text((out / "README.md").read_text() + "\nmy notes\n")  # the card is ours to rebuild
    run_upcycle(recipe, out, overwrite=True, echo=lambda s: None)
    assert (out / "config.json").is_file() and "my notes" in (out / "README.md").read_text()
    refused(lambda: run_graft(src, work, expand=1, overwrite=True, echo=lambda s: None), work,
            "not written by moemerge")


def test_overwrite_goes_by_the_record_of_what_moemerge_wrote(tmp_path, src):
    """The sidecar records the files the writer put in the folder (name -> bytes): --overwrite refuses a user's
    file named like ours (a backup shard) or one of ours the user replaced; a re-run replaces its own output,
    and verify's edits of the card and sidecar do not count as foreign."""
    import json

    r, out = up_recipe(tmp_path / "r", source=src), tmp_path / "out"
    run_upcycle(r, out, echo=lambda _: None)
    written = json.loads((out / "moemerge.json").read_text())["written"]
    assert set(written) == {p.name for p in out.iterdir()} - {"moemerge.json", "README.md"}
    assert written["model.safetensors"] == (out / "model.safetensors").stat().st_size
    (out / "README.md").write_text("edited by hand\n")
    run_upcycle(r, out, overwrite=True, echo=lambda _: None)  # its own folder: replaced

    (out / "model-backup.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    refused(lambda: run_upcycle(r, out, overwrite=True, echo=print), out,
            f"--overwrite: {out} holds {out / 'model-backup.safetensors'} (1 entries in all) that moemerge did not "
            "write")
    (out / "model-backup.safetensors").unlink()
    (out / "tokenizer.json").write_text("{}")  # a user's edit of a file moemerge wrote
    refused(lambda: run_upcycle(r, out, overwrite=True, echo=print), out, "holds", "tokenizer.json")


KILL_BETWEEN_RENAMES = """
import os, pathlib, signal, sys
from mergekit_lite.ops.upcycle import run_upcycle

real = pathlib.Path.rename

def rename(self, target):  # the first rename of the swap (target -> .NAME.moemerge-old-PID), then a kill -9
    out = real(self, target)
    if ".moemerge-old-" in str(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return out

pathlib.Path.rename = rename
run_upcycle(sys.argv[1], sys.argv[2], overwrite=True, echo=lambda _: None, progress=False)
"""


def test_a_run_killed_between_the_two_renames_of_an_overwrite_gets_the_old_folder_back(tmp_path, pico_llama):
    out = tmp_path / "out"
    run_upcycle(up_recipe(tmp_path / "recipes", source=pico_llama), out, echo=lambda _: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = up_recipe(tmp_path / "recipes2", source=pico_llama, num_experts=2)
    proc = subprocess.Popen([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(again), str(out)], stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not out.exists() and list(tmp_path.glob(f".out.moemerge-old-{proc.pid}"))  # killed mid-swap
    lines: list[str] = []
    with pytest.raises(MoemergeError, match="already exists; pass --overwrite"):  # the old folder is back
        run_upcycle(again, out, echo=lines.append)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert any(f"restored {out} from .out.moemerge-old-{proc.pid}" in line for line in lines), lines
    run_upcycle(again, out, overwrite=True, echo=lines.append)  # and replaced when asked; the debris goes too
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipes", "recipes2"]

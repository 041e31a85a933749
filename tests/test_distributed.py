"""`moemerge train` on 2 processes: DDP and FSDP2 equal one process with double gradient accumulation.

Marked `distributed` (CI runs them as a second command: `pytest -q -m distributed`). Every test runs on two CPU
processes over gloo (the shipped accelerate configs, launched the way a user launches them), and again on two
GPUs over NCCL where the machine has them (skipped, with the reason, elsewhere). The reference is one process of
the same kind with `gradient_accumulation_steps: 2`: same samples per optimizer step, same order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_train import build_world

pytestmark = pytest.mark.distributed

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", "0"]
DEVICES = [pytest.param("cpu", id="cpu-gloo"),
           pytest.param("cuda", id="cuda-nccl", marks=pytest.mark.skipif(
               torch.cuda.device_count() < 2, reason=f"needs 2 CUDA GPUs, this machine has "
                                                     f"{torch.cuda.device_count()}"))]
# the engine config per (device, engine): DDP on CPU needs the torchrun launcher (see cpu-2proc.yaml's header)
ENGINES = {("cpu", "ddp"): "cpu-2proc.yaml", ("cuda", "ddp"): "ddp.yaml",
           ("cpu", "fsdp"): "fsdp.yaml", ("cuda", "fsdp"): "fsdp.yaml"}
# run by the resume test instead of `-m mergekit_lite`: every process dies (SIGKILL) right after the first checkpoint
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import mergekit_lite.train.loop as loop
real = loop.save_checkpoint
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
loop.save_checkpoint = save_then_die
from mergekit_lite.cli import main
sys.argv = ["moemerge", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real-English corpus, a dense pico Llama with its tokenizer, its 4-expert top-2 Mixtral, cached runs."""
    return {**build_world(tmp_path_factory.mktemp("dist")), "refs": {}}


def env_for(device: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a 2-core CI machine
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even on a GPU machine
    return env


def launch(world, name: str, model: str, accum: int, cmd: list[str], device: str, *extra: str,
           check: bool = True) -> Path:
    """Write a 6-step recipe (checkpoint at step 3) for `model` and run `cmd RECIPE *extra`; returns OUTPUT."""
    out = world["root"] / name
    recipe = world["root"] / f"{name}.yaml"
    if not recipe.exists():
        recipe.write_text(yaml.safe_dump({
            "model": str(world[model]), "data": {"train": [world["train"]], "validation": [world["val"]]},
            "seq_len": 32, "micro_batch_size": 4, "gradient_accumulation_steps": accum, "max_steps": 6,
            "learning_rate": 3e-3, "warmup_steps": 2, "eval_batches": 4, "checkpoint_every": 3, "output": str(out)}))
    proc = subprocess.run([*cmd, "train", str(recipe), *extra], capture_output=True, text=True, timeout=300,
                          env=env_for(device))
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def reference(world, model: str, device: str) -> Path:
    """One process, gradient_accumulation_steps 2 (cached per model and device)."""
    key = (model, device)
    if key not in world["refs"]:
        world["refs"][key] = launch(world, f"one-{model}-{device}", model, 2, [sys.executable, "-m", "mergekit_lite"],
                                    device)
    return world["refs"][key]


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def assert_same_run(one: Path, two: Path) -> None:
    """Per-step losses within 1e-4 and OUTPUT/final a plain HF folder equal to the reference's (<= 1e-5)."""
    a = [(r["step"], r["loss"]) for r in records(one, "train")]
    b = [(r["step"], r["loss"]) for r in records(two, "train")]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4, (a, b)
    # router statistics count every process's tokens: the expert load matches the one-process run's
    for ra, rb in zip(records(one, "router"), records(two, "router"), strict=True):
        assert torch.allclose(torch.tensor(ra["load"]), torch.tensor(rb["load"]), atol=1e-6), (ra["step"], ra, rb)
    ref, got = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape and (got[k] - ref[k]).abs().max() <= 1e-5, k
    assert json.loads((two / "final" / "config.json").read_text()) == json.loads(
        (one / "final" / "config.json").read_text())


def assert_engine(out: Path, engine: str, device: str) -> None:
    """The run says (from inside the loop) which engine trained it; under FSDP every parameter was a DTensor."""
    s = records(out, "summary")[-1]
    assert s["processes"] == 2
    if engine == "fsdp":
        assert s["distributed_type"] == "FSDP" and s["fsdp_version"] == 2 and s["sharded_params"] > 0
    else:
        assert s["distributed_type"] == ("MULTI_CPU" if device == "cpu" else "MULTI_GPU")


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_two_processes_match_one_with_double_accumulation(world, device):
    one = reference(world, "moe", device)
    two = launch(world, f"ddp-moe-{device}", "moe", 1,
                 [*LAUNCH, "--config_file", str(CONFIGS / ENGINES[device, "ddp"]), "-m", "mergekit_lite"], device)
    assert_engine(two, "ddp", device)
    assert_same_run(one, two)


def fsdp_run(world, model: str, device: str) -> Path:
    """Two processes under recipes/accelerate/fsdp.yaml, uninterrupted (cached per model and device)."""
    key = ("fsdp", model, device)
    if key not in world["refs"]:
        world["refs"][key] = launch(world, f"fsdp-{model}-{device}", model, 1, [
            *LAUNCH, "--config_file", str(CONFIGS / ENGINES[device, "fsdp"]), "-m", "mergekit_lite"], device)
    return world["refs"][key]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["moe", "dense"])
def test_fsdp2_two_processes_match_one_with_double_accumulation(world, model, device):
    two = fsdp_run(world, model, device)
    assert_engine(two, "fsdp", device)
    assert_same_run(reference(world, model, device), two)


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp2_killed_after_a_checkpoint_resumes_to_the_same_run(world, device):
    (world["root"] / "kill.py").write_text(KILL_AFTER_CHECKPOINT)
    fsdp = [*LAUNCH, "--config_file", str(CONFIGS / ENGINES[device, "fsdp"])]
    cut = launch(world, f"fsdp-cut-{device}", "moe", 1, [*fsdp, str(world["root"] / "kill.py")], device,
                 check=False)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-0000003"]
    assert not (cut / "final").exists() and [r["step"] for r in records(cut, "train")] == [1, 2, 3]
    launch(world, f"fsdp-cut-{device}", "moe", 1, [*fsdp, "-m", "mergekit_lite"], device, "--resume")
    assert_engine(cut, "fsdp", device)
    assert_same_run(reference(world, "moe", device), cut)
    # and the very same run as the uninterrupted FSDP one: bit-identical on CPU (gloo reduces in a fixed order;
    # NCCL need not, so GPUs get the tolerance above)
    whole = fsdp_run(world, "moe", device)
    if device == "cpu":
        assert [r["loss"] for r in records(cut, "train")] == [r["loss"] for r in records(whole, "train")]
        a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, cut))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_rank_zero_speaks(world):
    """Two DDP processes of a dense model: the header, the summary, a user error and the finished-run note appear
    once; every process exits with the same status; DDP is not asked to search for unused parameters."""
    out = world["root"] / "rank0"
    recipe = world["root"] / "rank0.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(world["dense"]), "data": {"train": [world["train"]], "validation": [world["val"]]},
        "seq_len": 32, "micro_batch_size": 4, "max_steps": 2, "learning_rate": 3e-3, "warmup_steps": 1,
        "eval_batches": 2, "output": str(out)}))
    cmd = [*LAUNCH, "--config_file", str(CONFIGS / ENGINES["cpu", "ddp"]), "-m", "mergekit_lite", "train", str(recipe)]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300, env=env_for("cpu"))

    first = run()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert first.stdout.count("  output: ") == 1 and first.stdout.count("final val loss") == 1, first.stdout
    assert "find_unused_parameters=True" not in first.stderr  # torch's warning when the search finds nothing
    again = run()  # the output holds a run: a user error on every process, printed once
    assert again.returncode != 0 and again.stderr.count("already holds a run") == 1, again.stderr[-3000:]
    done = run("--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("already finished") == 1 and "tokens/s" not in done.stdout, done.stdout

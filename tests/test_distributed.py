"""`moemerge train` on 2 processes: DDP and FSDP2 equal one process, for every family the project writes.

Marked `distributed` (CI runs them as a second command: `pytest -q -m distributed`). Every test runs on two CPU
processes over gloo (the shipped accelerate configs, launched the way a user launches them), and again on two
GPUs over NCCL where the machine has them (skipped, with the reason, elsewhere). Recipes fix the global batch
(`global_batch_size: 8`, micro-batches of 4): one process accumulates 2 micro-batches, two processes 1 each, the
same samples in the same micro-batches, so losses, validation and final weights must agree. Validation takes 3
batches, which 2 processes split unevenly.
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
from test_train import SMALL, build_world

from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.pico import build_pico_model
from mergekit_lite.train.checkpoint import model_tensors
from mergekit_lite.train.corpus import stdlib_docstrings

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


def launch(world, name: str, model: str, cmd: list[str], device: str, *extra: str, check: bool = True,
           **fields) -> Path:
    """Write a 6-step recipe (checkpoint at step 3) for `model` and run `cmd RECIPE *extra`; returns OUTPUT."""
    out = world["root"] / name
    recipe = world["root"] / f"{name}.yaml"
    if not recipe.exists():
        recipe.write_text(yaml.safe_dump({
            "model": str(model_path(world, model)), "data": {"train": [world["train"]], "validation": [world["val"]]},
            "seq_len": 32, "micro_batch_size": 4, "global_batch_size": 8, "max_steps": 6,
            "learning_rate": 3e-3, "warmup_steps": 2, "eval_batches": 3, "checkpoint_every": 3, "output": str(out),
            **fields}))
    proc = subprocess.run([*cmd, "train", str(recipe), *extra], capture_output=True, text=True, timeout=300,
                          env=env_for(device))
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


ONE = [sys.executable, "-m", "mergekit_lite"]


def engine_cmd(device: str, engine: str) -> list[str]:
    return [*LAUNCH, "--config_file", str(CONFIGS / ENGINES[device, engine]), "-m", "mergekit_lite"]


def model_path(world, model: str) -> Path:
    """`dense`/`moe` (Llama, Mixtral), or an upcycle of the dense pico model into `model` (built once): a
    Qwen3 source for dots1 and qwen3_moe, which need its q/k norms."""
    if model not in world:
        src, arch = world["dense"], "moemerge" if model in MOEMERGE_SOURCES else model
        if model in MOEMERGE_SOURCES and MOEMERGE_SOURCES[model] != "llama":
            family = MOEMERGE_SOURCES[model]
            src = world.get(family) or build_pico_model(family, world["root"] / family, texts=stdlib_docstrings(),
                                                        head_dim=8, **SMALL)
            world[family] = src
        if model in ("dots1", "qwen3_moe"):
            src = world.get("qwen3") or build_pico_model("qwen3", world["root"] / "qwen3", texts=stdlib_docstrings(),
                                                         head_dim=8, **SMALL)
            world["qwen3"] = src
        (world["root"] / f"up-{model}.yaml").write_text(yaml.safe_dump({
            "source": str(src), "architecture": arch, "num_experts": 4, "experts_per_token": 2, "dtype": "float32",
            "seed": 3}))
        run_upcycle(world["root"] / f"up-{model}.yaml", world["root"] / model, echo=lambda _: None)
        world[model] = world["root"] / model
    return world[model]


# `architecture: moemerge` (the project's own classes, custom code in the folder) upcycled from these dense families
MOEMERGE_SOURCES = {"moemerge_llama": "llama", "moemerge_gemma3": "gemma3_text"}


def reference(world, model: str, device: str, **fields) -> Path:
    """One process, the same recipe (cached per model, device and fields)."""
    key = (model, device, json.dumps(fields, sort_keys=True))
    if key not in world["refs"]:
        world["refs"][key] = launch(world, f"one-{model}-{device}-{len(world['refs'])}", model, ONE, device,
                                    **fields)
    return world["refs"][key]


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def assert_same_run(one: Path, two: Path, weights_tol: float = 1e-5) -> None:
    """Per-step losses within 1e-4, validation within 1e-5, OUTPUT/final a plain HF folder equal to the
    reference's (<= 1e-5 by default)."""
    a = [(r["step"], r["loss"]) for r in records(one, "train")]
    b = [(r["step"], r["loss"]) for r in records(two, "train")]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4, (a, b)
    # router statistics count every process's tokens: the expert load matches the one-process run's
    for ra, rb in zip(records(one, "router"), records(two, "router"), strict=True):
        assert torch.allclose(torch.tensor(ra["load"]), torch.tensor(rb["load"]), atol=1e-6), (ra["step"], ra, rb)
    va, vb = records(one, "val"), records(two, "val")
    assert [r["step"] for r in va] == [r["step"] for r in vb] == [0, 6]
    assert max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(va, vb)) <= 1e-5, (va, vb)
    ref, got = final_weights(one), final_weights(two)
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape and (got[k].numel() == 0 or (got[k] - ref[k]).abs().max() <= weights_tol), k
    assert json.loads((two / "final" / "config.json").read_text()) == json.loads(
        (one / "final" / "config.json").read_text())


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


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
    two = launch(world, f"ddp-moe-{device}", "moe", engine_cmd(device, "ddp"), device)
    assert_engine(two, "ddp", device)
    assert_same_run(one, two)


def fsdp_run(world, model: str, device: str) -> Path:
    """Two processes under recipes/accelerate/fsdp.yaml, uninterrupted (cached per model and device)."""
    key = ("fsdp", model, device)
    if key not in world["refs"]:
        world["refs"][key] = launch(world, f"fsdp-{model}-{device}", model, engine_cmd(device, "fsdp"), device)
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
    cut = launch(world, f"fsdp-cut-{device}", "moe", [*fsdp, str(world["root"] / "kill.py")], device, check=False)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-0000003"]
    assert not (cut / "final").exists() and [r["step"] for r in records(cut, "train")] == [1, 2, 3]
    launch(world, f"fsdp-cut-{device}", "moe", [*fsdp, "-m", "mergekit_lite"], device, "--resume")
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


# Every family the project writes, with aux-loss-free balancing on: glm4_moe, dots1 and ernie4_5_moe move the
# model's own e_score_correction_bias (ERNIE's a parameter, FSDP2 shards it); Mixtral and Qwen2-MoE the tap's
# training-only bias (as Qwen3-MoE and Granite). qwen2_moe, glm4_moe and dots1 upcycles hold size-0 shared experts;
# granitemoe(shared) stores its experts fused on disk.
FAMILIES = ["moe", "qwen2_moe", "qwen3_moe", "glm4_moe", "dots1", "ernie4_5_moe", "granitemoe", "granitemoeshared",
            "moemerge_llama", "moemerge_gemma3"]
SAVED_BIAS = {"glm4_moe", "dots1", "ernie4_5_moe", "moemerge_llama", "moemerge_gemma3"}


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_the_same_on_two_processes(world, family, engine):
    fields = {"moe": {"bias_update_rate": 0.5}}
    one = reference(world, family, "cpu", **fields)
    two = launch(world, f"{engine}-{family}", family, engine_cmd("cpu", engine), "cpu", **fields)
    assert_engine(two, engine, "cpu")
    assert_same_run(one, two)
    if family in SAVED_BIAS:  # moved (+-0.5 a step: seen at the odd step 3), saved, equal to one process's
        a, b = (model_tensors(d / "checkpoints" / "step-0000003") for d in (one, two))
        bias = {k: v for k, v in b.items() if k.endswith("e_score_correction_bias")}
        assert len(bias) == 2 and all(v.abs().sum() > 0 and torch.equal(v, a[k]) for k, v in bias.items()), bias
    else:  # the tap's own bias moved routing the same way on both: the biased validation agrees too
        a, b = records(one, "summary")[-1], records(two, "summary")[-1]
        assert abs(a["final_val_loss_with_selection_bias"] - b["final_val_loss_with_selection_bias"]) <= 1e-5


def blend_data(world, streaming: bool) -> dict:
    """Two weighted sources (3:1), shuffled through a buffer when streamed."""
    return {"data": {"train": [{"path": world["train"], "weight": 3}, {"path": world["val"], "weight": 1}],
                     "validation": [world["val"]], "streaming": streaming, "shuffle_buffer": 16}}


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
@pytest.mark.parametrize("data", ["blend", "streamed-blend"])
def test_weighted_and_streamed_data_train_the_same_on_two_processes(world, data, engine):
    """A weighted blend, cached or streamed through the shuffle buffer: two processes take the same samples per
    step as one (losses, router load, validation and final weights agree)."""
    fields = blend_data(world, data == "streamed-blend")
    one = reference(world, "moe", "cpu", **fields)
    two = launch(world, f"{engine}-{data}", "moe", engine_cmd("cpu", engine), "cpu", **fields)
    assert_engine(two, engine, "cpu")
    assert_same_run(one, two)


def test_compiled_layers_under_fsdp2_train_as_one_eager_process(world):
    """compile: true under FSDP2 (layers compiled in place before fully_shard, so its hooks still gather each
    layer): the run matches one eager process's."""
    one = reference(world, "moe", "cpu")
    two = launch(world, "fsdp-compiled", "moe", engine_cmd("cpu", "fsdp"), "cpu", compile=True)
    assert_engine(two, "fsdp", "cpu")
    assert_same_run(one, two, weights_tol=1e-4)


def test_lora_under_fsdp2_saves_the_merged_model_and_the_adapter(world):
    """LoRA on attention and on the fused experts (peft target_parameters), sharded: final/ (merged) and
    adapter/ equal one process's."""
    fields = {"trainable": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "w1", "w3",
                                                                                       "w2"]}}
    one = reference(world, "moe", "cpu", **fields)
    two = launch(world, "fsdp-lora", "moe", engine_cmd("cpu", "fsdp"), "cpu", **fields)
    assert_engine(two, "fsdp", "cpu")
    assert_same_run(one, two)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys() and any("experts" in k for k in a) and any("q_proj" in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    base = load_file(str(world["moe"] / "model.safetensors"))
    merged = final_weights(two)
    assert not torch.equal(merged["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                           base["model.layers.0.block_sparse_moe.experts.1.w2.weight"])  # the expert delta is in


def test_routers_with_gradient_checkpointing_and_switch_capacity_under_fsdp2(world):
    fields = {"trainable": "routers+experts", "gradient_checkpointing": True,
              "moe": {"routing": "switch", "train_top_k": 1, "capacity_factor": 1.0}}
    one = reference(world, "moe", "cpu", **fields)
    two = launch(world, "fsdp-switch", "moe", engine_cmd("cpu", "fsdp"), "cpu", **fields)
    assert_same_run(one, two)
    assert max(d for r in records(two, "router") for d in r["dropped"]) > 0  # capacity really dropped work


def test_new_layers_under_fsdp2(world):
    from mergekit_lite.ops.graft import run_graft

    if "pro" not in world:
        run_graft(world["dense"], world["root"] / "pro", expand=1, echo=lambda _: None)
        world["pro"] = world["root"] / "pro"
    one = reference(world, "pro", "cpu", trainable="new_layers")
    two = launch(world, "fsdp-pro", "pro", engine_cmd("cpu", "fsdp"), "cpu", trainable="new_layers")
    assert_same_run(one, two)


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
@pytest.mark.parametrize("direction", ["1-to-2", "2-to-1"])
def test_resume_on_another_process_count_continues_the_same_run(world, engine, direction):
    """Killed right after the step-3 checkpoint on one process count, resumed on the other: the run ends as the
    uninterrupted one-process run (same samples per step; DCP reshards the checkpoint)."""
    (world["root"] / "kill.py").write_text(KILL_AFTER_CHECKPOINT)
    many = [*LAUNCH, "--config_file", str(CONFIGS / ENGINES["cpu", engine])]
    first, then = ([sys.executable], many) if direction == "1-to-2" else (many, [sys.executable])
    name = f"recount-{engine}-{direction}"
    cut = launch(world, name, "moe", [*first, str(world["root"] / "kill.py")], "cpu", check=False)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-0000003"]
    launch(world, name, "moe", [*then, "-m", "mergekit_lite"], "cpu", "--resume")
    assert_same_run(reference(world, "moe", "cpu"), cut)


@pytest.mark.parametrize("direction", ["1-to-2", "2-to-1"])
def test_a_streamed_blend_resumes_in_place_on_another_process_count(world, direction):
    """A streamed, shuffled blend killed after the step-3 checkpoint and resumed on the other process count: the
    main process saved (or reads) where the stream stood, the resume starts there, and the run ends as one
    uninterrupted process's."""
    (world["root"] / "kill.py").write_text(KILL_AFTER_CHECKPOINT)
    many = [*LAUNCH, "--config_file", str(CONFIGS / ENGINES["cpu", "ddp"])]
    first, then = ([sys.executable], many) if direction == "1-to-2" else (many, [sys.executable])
    name = f"recount-stream-{direction}"
    fields = blend_data(world, True)
    cut = launch(world, name, "moe", [*first, str(world["root"] / "kill.py")], "cpu", check=False, **fields)
    assert torch.load(cut / "checkpoints" / "step-0000003" / "extra.pt", weights_only=True)["stream"]["blocks"] == 24
    launch(world, name, "moe", [*then, "-m", "mergekit_lite"], "cpu", "--resume", **fields)
    assert_same_run(reference(world, "moe", "cpu", **fields), cut)


def test_fsdp2_peak_memory_per_process_is_well_under_one_process(tmp_path):
    """scripts/bench_memory.py at a test size (a ~60M-parameter Llama, 3 steps, a checkpoint, the final save):
    every FSDP2 rank's peak anonymous memory <= 0.8 x one process's (docs/benchmarks.md: 0.59 at 269M)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_memory

    model = bench_memory.build(tmp_path / "dense", hidden=768, layers=8, ffn=2048)
    peaks = bench_memory.compare(model, tmp_path)
    assert sorted(peaks["fsdp2"]) == [0, 1]
    ratios = {rank: peak / peaks["one"] for rank, peak in peaks["fsdp2"].items()}
    assert all(r <= 0.8 for r in ratios.values()), (peaks, ratios)


def test_moemerge_lora_on_experts_under_fsdp2(world):
    """The project's own classes keep experts as per-expert Linear modules: LoRA on each of them, sharded, gives
    final/ (merged) and adapter/ equal to one process's, and final/ is a moemerge folder with its code."""
    from mergekit_lite.models import code_status

    fields = {"trainable": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "gate_proj", "up_proj",
                                                                                       "down_proj"]}}
    one = reference(world, "moemerge_gemma3", "cpu", **fields)
    two = launch(world, "fsdp-lora-moemerge", "moemerge_gemma3", engine_cmd("cpu", "fsdp"), "cpu", **fields)
    assert_engine(two, "fsdp", "cpu")
    assert_same_run(one, two)
    assert code_status(two / "final") == "own" and (two / "adapter" / "adapter_model.safetensors").is_file()

"""A training run assembled once, by named steps, before its first step: `assemble` returns a `Run`, which the
loop (loop.py) reads and never builds on.

The steps, in order: check (preflight.py), engine (engine.py: accelerate, DeepSpeed's batch, the run record),
model (model.py: load, router taps, LoRA, trainable set), data (loaders.py), optimizer and schedule (model.py),
prepare (sharding, compilation, accelerate's wrapping), start (a fresh run, or where a checkpoint left off).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lite.arch.params import model_param_counts
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import resolve_model_path
from mergekit_lite.io.folders import RunFolder
from mergekit_lite.io.pool import map_large_allocations
from mergekit_lite.recipe import TrainRecipe
from mergekit_lite.train.checkpoint import check_resume, checkpoint_format, data_state
from mergekit_lite.train.engine import (
    allow_tf32,
    check_attention,
    compile_layers,
    configure_deepspeed,
    default_precision,
    describe_engine,
    is_main_process,
    make_accelerator,
    prepare_sharding,
)
from mergekit_lite.train.loaders import build_loaders, steps_for
from mergekit_lite.train.model import active_params, build_model, build_optimizer
from mergekit_lite.train.moe import RouterTap
from mergekit_lite.train.preflight import finished_run, latest_checkpoint, preflight, write_run_record


@dataclass
class Start:
    """Where the loop begins: step 0 of a fresh run, or a checkpoint's step with its log sums and the
    checkpoint whose weights, optimizer and RNG the loop restores just before its first step."""

    step: int = 0
    tokens: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # the checkpoint's trainer_state.json
    checkpoint: Path | None = None


@dataclass
class Run:
    """Everything one training run uses, built by `assemble` (model, optimizer and loaders already prepared)."""

    recipe: TrainRecipe
    out: Path
    model_dir: Path
    config: dict[str, Any]  # the model's config.json, written again into final/
    accelerator: Any
    accumulation: int  # micro-batches per process in one optimizer step
    model: Any
    tap: RouterTap
    optimizer: Any
    scheduler: Any
    train_dl: Any
    val_dl: Any  # unprepared: evaluate() splits its batches over the processes itself
    max_steps: int
    tokens_per_step: int
    engine: dict[str, Any]  # what trains the model (describe_engine), for the summary
    start: Start
    say: Callable[[str], Any]  # the main process's voice; silent on the others


def assemble(recipe: TrainRecipe, *, resume: bool, overwrite: bool, echo=print) -> Run | dict:
    """Build the run the recipe describes, or return the stored summary of a run `--resume` finds finished.

    Raises:
        MoemergeError: anything the user can fix, before the model is loaded where it can be told earlier.
    """
    r = recipe
    out = Path(r.output)
    say = echo if is_main_process() else (lambda _: None)  # one voice under torchrun / accelerate launch
    if resume and (done := finished_run(out)) is not None:
        say(f"{out} already finished (step {done['steps']}, final val loss {done['final_val_loss']:.4f}; model in "
            f"{out / 'final'}): nothing to resume. To train again, pass --overwrite or choose another output")
        return {**done, "already_finished": True}
    model_dir = resolve_model_path(r.model, r.revision)
    check_attention(r.attn_implementation)
    config = preflight(r, model_dir, resume, overwrite)
    accelerator, accumulation = open_engine(r, out, resume, say)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.eos_token_id is None:
        raise MoemergeError(f"the tokenizer in {model_dir} has no eos token; documents cannot be joined")
    allow_tf32()
    model, tap = build_model(r, model_dir, accelerator, config, say)
    max_steps = steps_for(r, accelerator.num_processes)
    optimizer, scheduler = build_optimizer(model, r, max_steps)
    train_dl, val_dl = build_loaders(r, tokenizer, model_dir, accelerator, max_steps)
    tokens_per_step = r.seq_len * r.global_batch(accelerator.num_processes)
    for line in run_header(model, model_dir, train_dl, val_dl, r, tokens_per_step, max_steps):
        say(line)
    default = " (the default on this device)" if r.mixed_precision is None else ""
    say(f"  precision: {accelerator.mixed_precision}{default}, attention: {r.attn_implementation}")

    prepare_sharding(accelerator, model)  # ZeRO-3: MoE blocks as leaves
    if r.compile:
        say(f"  compile: {compile_layers(model)} decoder layers compiled in place (the first steps compile)")
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    engine = describe_engine(accelerator, model)  # raises if FSDP was asked for and the model is not sharded
    tap.to(accelerator.device)
    if r.tracker != "none":
        accelerator.init_trackers("moemerge", config=json.loads(r.model_dump_json()))
    start = Start()
    if resume:
        start, train_dl = resume_point(r, out, accelerator, train_dl, accumulation, say)
    return Run(recipe=r, out=out, model_dir=model_dir, config=config, accelerator=accelerator,
               accumulation=accumulation, model=model, tap=tap, optimizer=optimizer, scheduler=scheduler,
               train_dl=train_dl, val_dl=val_dl, max_steps=max_steps, tokens_per_step=tokens_per_step,
               engine=engine, start=start, say=say)


def open_engine(r: TrainRecipe, out: Path, resume: bool, say) -> tuple[Any, int]:
    """(The Accelerator of this launch, micro-batches per process per step); seeds the run and writes its record.

    A resume that would change the run is refused here, before anything is loaded.
    """
    from accelerate import DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    accelerator = make_accelerator(  # CPU processes over gloo under torchrun without GPUs; FSDP2 there too
        mixed_precision=default_precision(r.mixed_precision),
        log_with=None if r.tracker == "none" else r.tracker, project_dir=str(out),
        # one scheduler step per optimizer step (the loop calls it after each): accelerate's default steps it
        # num_processes times per call, which fits a schedule counted in per-process batches, not ours
        step_scheduler_with_optimizer=False,
        # decided once the model is loaded (unused_parameters_possible): DDP warns when it searches for nothing
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    if accelerator.device.type == "cpu":  # training state lives in host memory: give freed tensors back
        map_large_allocations()
    # the recipe's global batch (or its accumulation) over this run's processes; refused when it does not divide
    accelerator.gradient_accumulation_steps = accum = r.accumulation(accelerator.num_processes)
    configure_deepspeed(accelerator, r.micro_batch_size, accum, r.max_grad_norm)
    if resume:
        for note in check_resume(latest_checkpoint(out), r, accelerator.num_processes, checkpoint_format(accelerator)):
            say(f"--resume: accepted change {note}")
    set_seed(r.seed)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_run_record(out, r, accelerator.is_main_process)  # what --resume requires
    return accelerator, accum


def resume_point(r: TrainRecipe, out: Path, accelerator, train_dl, accumulation: int, say) -> tuple[Start, Any]:
    """(Where the latest checkpoint left off, the train loader moved there).

    A streamed corpus continues in place from the position the checkpoint stored; otherwise the micro-batches
    already trained (step x global batch in all, dealt j -> process j % N) are skipped.
    """
    ckpt = latest_checkpoint(out)
    assert ckpt is not None  # preflight refused a resume without one
    state = json.loads((ckpt / RunFolder.TRAINER_STATE).read_text())
    start = Start(step=state["step"], tokens=state["tokens"], state=state, checkpoint=ckpt)
    if r.data.streaming and (where := data_state(ckpt)) is not None:
        train_dl.dataset.resume_from(where)  # in place: the stream is not read again up to there
        say(f"resumed from {ckpt} at step {start.step} (the stream continues after block {where['blocks']})")
    else:
        train_dl = accelerator.skip_first_batches(train_dl, start.step * accumulation)
        say(f"resumed from {ckpt} at step {start.step}")
    return start, train_dl


def run_header(model, model_dir: Path, train_dl, val_dl, r: TrainRecipe, tokens_per_step: int,
               max_steps: int) -> list[str]:
    """What a run is about to do: model, parameters (total/active), data blocks, tokens per step, output."""
    total = model_param_counts(model).total

    def blocks(dl) -> str:
        return f"{len(dl.dataset)}" if hasattr(dl.dataset, "__len__") else "streamed"

    lines = [f"train {model_dir}: {total / 1e6:.2f}M parameters, {active_params(model) / 1e6:.2f}M active per "
             f"token ({r.trainable} trainable)",
             f"  data: {blocks(train_dl)} train / {blocks(val_dl)} validation blocks of {r.seq_len} tokens; "
             f"{tokens_per_step} tokens per step x {max_steps} steps"]
    for spec, n_blocks, share in getattr(train_dl.dataset, "moemerge_sources", []):
        size = "streamed" if n_blocks is None else f"{n_blocks} blocks ({n_blocks * r.seq_len} tokens)"
        lines.append(f"  blend: {spec}: {size}, {100 * share:.1f}% of the samples")
    counts = getattr(train_dl.dataset, "moemerge_counts", None)
    if counts:
        dropped = counts["tokens"] - counts["kept"]
        lines.append(f"  train tokens: {counts['kept']} kept in blocks of {counts['tokens']} "
                     f"({dropped} dropped: the last partial block)")
    if hasattr(train_dl.dataset, "__len__") and len(train_dl.dataset):
        epochs = tokens_per_step * max_steps / (r.seq_len * len(train_dl.dataset))
        if epochs > 1:  # repeated data is a choice to make knowingly, not a surprise
            needed = max_steps * tokens_per_step // r.seq_len
            lines.append(f"  note: the run sees its training data {epochs:.1f} times ({needed} blocks from "
                         f"{len(train_dl.dataset)}); add data or shorten the run to see it once")
    return [*lines, f"  output: {r.output}"]

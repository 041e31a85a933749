"""`moemerge train`: continued pretraining with accelerate, top to bottom.

The model code stays single-device; accelerate wraps it for CPU, one GPU, DDP, FSDP or DeepSpeed
(chosen by `accelerate launch --config_file ...`). The loss we back-propagate is ours:
next-token cross-entropy + balance_coef * load-balancing loss + z_coef * router z-loss, so the
router losses are trained on whatever the HF config says.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io import resolve_model_path
from mergekit_lite.io.folders import RunFolder
from mergekit_lite.io.pool import map_large_allocations
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.io.writer import OutputLock
from mergekit_lite.recipe import TrainRecipe
from mergekit_lite.train.checkpoint import check_resume, checkpoint_format, data_state, load_checkpoint, save_checkpoint
from mergekit_lite.train.engine import (
    allow_tf32,
    check_attention,
    compile_layers,
    configure_deepspeed,
    default_precision,
    describe_engine,
    is_main_process,
    load_model,
    make_accelerator,
    prepare_sharding,
)
from mergekit_lite.train.moe import RouterTap
from mergekit_lite.train.save import save_final
from mergekit_lite.train.setup import (
    build_loaders,
    finished_run,
    latest_checkpoint,
    lora_targets,
    param_groups,
    park_empty_linears,
    preflight,
    routers_only_note,
    steps_for,
    trainable_parameters,
    unused_parameters_possible,
    write_run_record,
)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # dense bf16


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V), ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class Metrics:
    """metrics.jsonl on the main process (always), plus accelerate's trackers when configured."""

    def __init__(self, accelerator, path: Path, keep_until: int | None):
        self.acc, self.path = accelerator, path
        if accelerator.is_main_process and keep_until is not None and path.exists():
            rows = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= keep_until]
            path.write_text("".join(r + "\n" for r in rows))  # a resumed run rewrites what came after

    def log(self, kind: str, step: int, **values) -> None:
        """Append one record to `metrics.jsonl` (main process) and send its numbers to the tracker."""
        if self.acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"type": kind, "step": step, **values}) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if scalars:
            self.acc.log(scalars, step=step)


def block_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each block; logits (B, T, V), ids (B, T) -> (B,)."""
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return per_token.view(ids.shape[0], -1).mean(1)  # (B, T - 1) -> (B,)


@torch.no_grad()
def evaluate(model, loader, tap: RouterTap, accelerator, max_batches: int, *, selection_bias: bool = False) -> float:
    """Mean validation cross-entropy per block over the first `max_batches` batches of `loader`, whatever the
    process count: process p takes batches p, p + N, ... and the block losses are summed over processes.

    Processes with one batch fewer run one more forward whose result is dropped (FSDP2 gathers in every
    forward, so all processes must run as many). Routing follows the saved model (plain top-k, no noise, no
    capacity; no tap-held selection bias unless `selection_bias`); the model's train/eval mode and the tap's
    settings are restored on the way out.
    """
    was_training, was_active, had_bias = model.training, tap.active, tap.use_bias
    model.eval()
    tap.active, tap.use_bias = False, had_bias and selection_bias
    total = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    rank, procs = accelerator.process_index, accelerator.num_processes
    try:
        seen, first = 0, None
        for n, batch in enumerate(loader):
            if n >= max_batches:
                break
            seen, first = n + 1, first if first is not None else batch
            if n % procs == rank:
                ids = batch["input_ids"].to(accelerator.device)
                losses = block_losses(model(input_ids=ids).logits, ids)
                total += losses.sum()
                count += losses.numel()
        mine = len(range(rank, seen, procs))
        for _ in range(-(-seen // procs) - mine):  # as many forwards as the busiest process
            model(input_ids=first["input_ids"].to(accelerator.device))
    finally:
        model.train(was_training)
        tap.active, tap.use_bias = was_active, had_bias
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp_min(1)).item()


def validate(model, loader, tap: RouterTap, accelerator, max_batches: int) -> dict[str, float]:
    """`val_loss`: the model as saved, routed as the saved class routes (no noise, no capacity). Families
    with `e_score_correction_bias` hold the trained selection bias in the model, so it is in `val_loss`;
    for the others (Mixtral, Qwen) the tap's own bias is not saved, and with it on `val_loss_with_selection_bias`
    gives the loss under the bias training used."""
    vals = {"val_loss": evaluate(model, loader, tap, accelerator, max_batches)}
    if tap.use_bias and not tap.native_bias:
        vals["val_loss_with_selection_bias"] = evaluate(model, loader, tap, accelerator, max_batches,
                                                        selection_bias=True)
    return vals


def active_params(model) -> int:
    """Parameters one token runs through: routed experts count k/E of their size."""
    from mergekit_lite.train.blocks import active_params as block_active_params

    if (blocks := block_active_params(model)) is not None:  # PEER / MH-MoE blocks
        return blocks
    cfg = model.config.get_text_config()
    n_exp = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    total = expert = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    return total - expert + (expert * k // n_exp if n_exp and k else expert)


def train(recipe: TrainRecipe, recipe_text: str | None = None, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, progress_label: str = "train", echo=print) -> dict:
    """Run the recipe; returns a summary (steps, tokens, losses, tokens/s, MFU where known).

    Only the main process echoes. `--resume` of a run that already finished returns its stored summary with
    `already_finished: True` and trains nothing. `progress_label` names the progress bar. The main process
    holds a lock on OUTPUT for the whole run: a second `train` into it fails at once, before any check.
    """
    lock = OutputLock(Path(recipe.output).resolve())
    if is_main_process():
        lock.acquire()
    try:
        return _train(recipe, recipe_text, resume=resume, overwrite=overwrite, progress=progress,
                      progress_label=progress_label, echo=echo)
    finally:
        lock.release()


def _train(recipe: TrainRecipe, recipe_text: str | None, *, resume: bool, overwrite: bool, progress: bool,
           progress_label: str, echo) -> dict:
    from accelerate import DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup

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
    accelerator = make_accelerator(  # CPU processes over gloo under torchrun without GPUs; FSDP2 there too
        mixed_precision=default_precision(r.mixed_precision),
        log_with=None if r.tracker == "none" else r.tracker, project_dir=str(out),
        # one scheduler step per optimizer step (we call it after each): accelerate's default steps it
        # num_processes times per call, which fits a schedule counted in per-process batches, not ours
        step_scheduler_with_optimizer=False,
        # decided once the model is loaded (unused_parameters_possible): DDP warns when it searches for nothing
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    if accelerator.device.type == "cpu":  # training state lives in host memory: give freed tensors back
        map_large_allocations()
    # the recipe's global batch (or its accumulation) over this run's processes; refused when it does not divide
    accelerator.gradient_accumulation_steps = accum = r.accumulation(accelerator.num_processes)
    configure_deepspeed(accelerator, r.micro_batch_size, accum, r.max_grad_norm)
    if resume:  # a resume that changes the run is refused before anything is loaded
        for note in check_resume(latest_checkpoint(out), r, accelerator.num_processes, checkpoint_format(accelerator)):
            say(f"--resume: accepted change {note}")
    set_seed(r.seed)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_run_record(out, r, accelerator.is_main_process)  # what --resume requires

    # --- model, what to train, optimizer ------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.eos_token_id is None:
        raise MoemergeError(f"the tokenizer in {model_dir} has no eos token; documents cannot be joined")
    allow_tf32()
    # fp32 master weights; under FSDP2 read by the main process only
    model = load_model(model_dir, accelerator, r.attn_implementation, r.trust_remote_code)
    if r.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    tap = RouterTap(model, jitter=r.moe.jitter, bias_update_rate=r.moe.bias_update_rate, moe=r.moe)
    if r.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(model, r.lora)  # refuses names that reach nothing (or only empty modules)
        model = get_peft_model(model, LoraConfig(r=r.lora.r, lora_alpha=r.lora.alpha, lora_dropout=r.lora.dropout,
                                                 task_type="CAUSAL_LM", **targets))
    if (note := routers_only_note(model, r.trainable)) is not None:
        say(note)
    park_empty_linears(model)  # size-0 shared experts: no engine can shard an empty parameter
    if accelerator.ddp_handler is not None:
        accelerator.ddp_handler.find_unused_parameters = unused_parameters_possible(model)
    new_layers = (read_sidecar(model_dir) or {}).get("new_layers", [])
    added = (read_sidecar(model_dir) or {}).get("added") if r.trainable == "added" else None
    trainable_parameters(model, r.trainable, tap.routers, new_layers, added)
    optimizer = torch.optim.AdamW(param_groups(model, r.weight_decay), lr=r.learning_rate, betas=r.adam_betas)

    # --- data -----------------------------------------------------------------------------------
    max_steps = steps_for(r, accelerator.num_processes)
    train_dl, val_dl = build_loaders(r, tokenizer, model_dir, accelerator, max_steps)
    tokens_per_step = r.seq_len * r.global_batch(accelerator.num_processes)
    for line in run_header(model, model_dir, train_dl, val_dl, r, tokens_per_step, max_steps):
        say(line)
    default = " (the default on this device)" if r.mixed_precision is None else ""
    say(f"  precision: {accelerator.mixed_precision}{default}"
        f", attention: {r.attn_implementation}")
    # linear warmup from 0 over warmup_steps, then cosine to learning_rate * min_lr_ratio at max_steps;
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, r.warmup_steps, max_steps,
                                                            min_lr_rate=r.min_lr_ratio)
    prepare_sharding(accelerator, model)  # ZeRO-3: MoE blocks as leaves
    if r.compile:
        say(f"  compile: {compile_layers(model)} decoder layers compiled in place (the first steps compile)")
    # the validation loader stays unprepared: evaluate() splits its batches over the processes
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    engine = describe_engine(accelerator, model)  # raises if FSDP was asked for and the model is not sharded
    tap.to(accelerator.device)
    if r.tracker != "none":
        accelerator.init_trackers("moemerge", config=json.loads(r.model_dump_json()))

    # --- resume ---------------------------------------------------------------------------------
    step, tokens, state = 0, 0, {}
    if resume:
        ckpt = latest_checkpoint(out)
        state = json.loads((ckpt / RunFolder.TRAINER_STATE).read_text())
        step, tokens = state["step"], state["tokens"]
        if r.data.streaming and (where := data_state(ckpt)) is not None:
            train_dl.dataset.resume_from(where)  # in place: the stream is not read again up to there
            say(f"resumed from {ckpt} at step {step} (the stream continues after block {where['blocks']})")
        else:  # micro-batches per process already trained: step x global batch in all, dealt j -> process j % N
            train_dl = accelerator.skip_first_batches(train_dl, step * accum)
            say(f"resumed from {ckpt} at step {step}")
    metrics = Metrics(accelerator, RunFolder(out).metrics, keep_until=step if resume else None)
    if step == 0:
        metrics.log("val", 0, **validate(model, val_dl, tap, accelerator, r.eval_batches))

    # --- the loop -------------------------------------------------------------------------------
    # ce, balance, z summed over processes since the last log line (a checkpoint between log lines keeps them)
    sums = torch.zeros(3, device=accelerator.device)
    if accelerator.is_main_process and "log_sums" in state:
        sums += torch.tensor(state["log_sums"], device=accelerator.device)
    # micro-steps per process since the last log line
    micro = state.get("log_micro_batches", 0) // accelerator.num_processes
    show = progress and accelerator.is_local_main_process
    bar = tqdm(total=max_steps, initial=step, disable=not show, desc=progress_label, unit="step")
    t_log, t_start, tokens_start, steps_timed = time.perf_counter(), time.perf_counter(), tokens, 0
    batches = iter(train_dl)
    if resume:
        # last thing before the first step: the RNG states (jitter, dropout) are the checkpoint's, whatever
        # starting the data loader drew. A loader that skips batches of a stream starts only at its first
        # batch (and may draw from the global RNG then), so that batch is taken before the restore.
        first = next(batches, None)
        batches = itertools.chain([] if first is None else [first], batches)
        load_checkpoint(accelerator, model, optimizer, scheduler, tap, ckpt)
    model.train()  # from_pretrained returns eval mode; evaluate() restores the mode it found
    for batch in batches:
        ids = batch["input_ids"]
        if not model.training:
            raise AssertionError("the model is in eval mode inside the training loop")
        with accelerator.accumulate(model):
            logits = model(input_ids=ids).logits
            ce = causal_lm_loss(logits, ids)
            balance, z = tap.losses()
            loss = ce + r.moe.balance_coef * balance + r.moe.z_coef * z
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and r.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), r.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        sums += torch.stack([ce.detach(), balance.detach(), z.detach()])
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        steps_timed += 1
        tokens += tokens_per_step
        tap.update_bias(reduce=lambda t: accelerator.reduce(t, "sum"))
        lr = scheduler.get_last_lr()[0]  # the rate this step used (logged), then the next step's
        scheduler.step()
        bar.update(1)
        if step % r.log_every == 0 or step == max_steps:
            ce_m, bal_m, z_m = (accelerator.reduce(sums, "sum") / (micro * accelerator.num_processes)).tolist()
            now = time.perf_counter()
            tps = steps_timed * tokens_per_step / max(now - t_log, 1e-9)  # the steps this process timed
            metrics.log("train", step, tokens=tokens, loss=ce_m + r.moe.balance_coef * bal_m + r.moe.z_coef * z_m,
                        ce=ce_m, balance=bal_m, z=z_m, lr=lr, tokens_per_s=tps,
                        grad_norm=float(grad_norm) if grad_norm is not None else None)
            if tap.is_moe:
                metrics.log("router", step, **tap.read_stats(reduce=lambda t: accelerator.reduce(t, "sum")))
            if tap.peer:  # PEER expert usage since the last log line (train/blocks.py)
                metrics.log("peer", step, **tap.peer.read(reduce=lambda t: accelerator.reduce(t, "sum")))
            bar.set_postfix(loss=f"{ce_m:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            sums.zero_()
            micro, t_log, steps_timed = 0, now, 0
        if r.eval_every and step % r.eval_every == 0 and step != max_steps:
            metrics.log("val", step, **validate(model, val_dl, tap, accelerator, r.eval_batches))
        if r.checkpoint_every and step % r.checkpoint_every == 0:
            state = {"step": step, "tokens": tokens, "log_sums": accelerator.reduce(sums, "sum").tolist(),
                     "log_micro_batches": micro * accelerator.num_processes,
                     "global_batch": r.global_batch(accelerator.num_processes),
                     "recipe": json.loads(r.model_dump_json())}
            where = (train_dl.dataset.state_after(step * r.global_batch(accelerator.num_processes))
                     if r.data.streaming and accelerator.is_main_process else None)  # the main one reads it
            save_checkpoint(accelerator, model, optimizer, scheduler, tap, out, step, state, r.keep_checkpoints,
                            data_state=where)
        if step >= max_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - t_start

    # --- the end: validation, final model, summary ------------------------------------------------
    vals = validate(model, val_dl, tap, accelerator, r.eval_batches)
    metrics.log("val", step, **vals)
    tps = (tokens - tokens_start) / max(elapsed, 1e-9)
    flops = 6 * active_params(accelerator.unwrap_model(model)) * tps
    summary = {"steps": step, "tokens": tokens, "final_val_loss": vals["val_loss"], "tokens_per_s": tps,
               "model_tflops_per_s": flops / 1e12, "mfu": _mfu(flops, accelerator),
               "data": r.data.train, "trainable": r.trainable, "seq_len": r.seq_len, **engine}
    counts = getattr(train_dl.dataset, "moemerge_counts", None) or {}
    if counts:  # what the packed training corpus kept: every token but its last partial block
        summary |= {"data_tokens": counts["tokens"], "data_tokens_in_blocks": counts["kept"]}
    if "val_loss_with_selection_bias" in vals:  # training's routing, which the saved model cannot reproduce
        summary["final_val_loss_with_selection_bias"] = vals["val_loss_with_selection_bias"]
    text = recipe_text or yaml.safe_dump(json.loads(r.model_dump_json()), sort_keys=False)
    save_final(accelerator, model, model_dir, config, out, lora=r.trainable == "lora", save_dtype=r.save_dtype,
               shard_size=int(r.shard_size), recipe_text=text, training=summary, echo=say, workers=r.workers)
    metrics.log("summary", step, **{k: v for k, v in summary.items() if k != "data"})
    # leave together: a rank tearing gloo down while the main one still writes final/ left a process hanging
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def run_header(model, model_dir: Path, train_dl, val_dl, r: TrainRecipe, tokens_per_step: int,
               max_steps: int) -> list[str]:
    """What a run is about to do: model, parameters (total/active), data blocks, tokens per step, output."""
    total = sum(p.numel() for p in model.parameters())

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


def _mfu(flops_per_s: float, accelerator) -> float | None:
    """Model FLOPs utilisation against the GPU's dense bf16 peak, where the GPU is known."""
    if accelerator.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return flops_per_s / (peak * 1e12 * accelerator.num_processes) if peak else None

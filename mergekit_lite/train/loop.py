"""`moemerge train`: continued pretraining with accelerate. `assemble` (run.py) builds the run once; `fit` trains
it top to bottom.

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

from mergekit_lite.io.folders import RunFolder
from mergekit_lite.io.writer import OutputLock
from mergekit_lite.recipe import TrainRecipe
from mergekit_lite.train.checkpoint import load_checkpoint, save_checkpoint
from mergekit_lite.train.engine import is_main_process
from mergekit_lite.train.model import active_params
from mergekit_lite.train.moe import RouterTap
from mergekit_lite.train.run import Run, assemble
from mergekit_lite.train.save import save_final

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
        run = assemble(recipe, resume=resume, overwrite=overwrite, echo=echo)
        if isinstance(run, dict):  # --resume of a finished run: its stored summary
            return run
        return fit(run, recipe_text, progress=progress, progress_label=progress_label)
    finally:
        lock.release()


def fit(run: Run, recipe_text: str | None = None, *, progress: bool = True, progress_label: str = "train") -> dict:
    """Train an assembled run to its last step, validate, save final/; returns the summary."""
    from tqdm.auto import tqdm

    r, acc, model, tap = run.recipe, run.accelerator, run.model, run.tap
    optimizer, scheduler = run.optimizer, run.scheduler
    step, tokens, state = run.start.step, run.start.tokens, run.start.state
    metrics = Metrics(acc, RunFolder(run.out).metrics, keep_until=step if run.start.checkpoint else None)
    if step == 0:
        metrics.log("val", 0, **validate(model, run.val_dl, tap, acc, r.eval_batches))

    # ce, balance, z summed over processes since the last log line (a checkpoint between log lines keeps them)
    sums = torch.zeros(3, device=acc.device)
    if acc.is_main_process and "log_sums" in state:
        sums += torch.tensor(state["log_sums"], device=acc.device)
    micro = state.get("log_micro_batches", 0) // acc.num_processes  # micro-steps per process since the last line
    bar = tqdm(total=run.max_steps, initial=step, disable=not (progress and acc.is_local_main_process),
               desc=progress_label, unit="step")
    t_log, t_start, tokens_start, steps_timed = time.perf_counter(), time.perf_counter(), tokens, 0
    batches = iter(run.train_dl)
    if run.start.checkpoint is not None:
        # last thing before the first step: the RNG states (jitter, dropout) are the checkpoint's, whatever
        # starting the data loader drew. A loader that skips batches of a stream starts only at its first
        # batch (and may draw from the global RNG then), so that batch is taken before the restore.
        first = next(batches, None)
        batches = itertools.chain([] if first is None else [first], batches)
        load_checkpoint(acc, model, optimizer, scheduler, tap, run.start.checkpoint)
    model.train()  # from_pretrained returns eval mode; evaluate() restores the mode it found
    for batch in batches:
        ids = batch["input_ids"]
        if not model.training:
            raise AssertionError("the model is in eval mode inside the training loop")
        with acc.accumulate(model):
            logits = model(input_ids=ids).logits
            ce = causal_lm_loss(logits, ids)
            balance, z = tap.losses()
            loss = ce + r.moe.balance_coef * balance + r.moe.z_coef * z
            acc.backward(loss)
            grad_norm = None
            if acc.sync_gradients and r.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(model.parameters(), r.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        sums += torch.stack([ce.detach(), balance.detach(), z.detach()])
        micro += 1
        if not acc.sync_gradients:
            continue
        step += 1
        steps_timed += 1
        tokens += run.tokens_per_step
        tap.update_bias(reduce=lambda t: acc.reduce(t, "sum"))
        lr = scheduler.get_last_lr()[0]  # the rate this step used (logged), then the next step's
        scheduler.step()
        bar.update(1)
        if step % r.log_every == 0 or step == run.max_steps:
            ce_m, bal_m, z_m = (acc.reduce(sums, "sum") / (micro * acc.num_processes)).tolist()
            now = time.perf_counter()
            tps = steps_timed * run.tokens_per_step / max(now - t_log, 1e-9)  # the steps this process timed
            metrics.log("train", step, tokens=tokens, loss=ce_m + r.moe.balance_coef * bal_m + r.moe.z_coef * z_m,
                        ce=ce_m, balance=bal_m, z=z_m, lr=lr, tokens_per_s=tps,
                        grad_norm=float(grad_norm) if grad_norm is not None else None)
            if tap.is_moe:
                metrics.log("router", step, **tap.read_stats(reduce=lambda t: acc.reduce(t, "sum")))
            if tap.peer:  # PEER expert usage since the last log line (train/blocks.py)
                metrics.log("peer", step, **tap.peer.read(reduce=lambda t: acc.reduce(t, "sum")))
            bar.set_postfix(loss=f"{ce_m:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            sums.zero_()
            micro, t_log, steps_timed = 0, now, 0
        if r.eval_every and step % r.eval_every == 0 and step != run.max_steps:
            metrics.log("val", step, **validate(model, run.val_dl, tap, acc, r.eval_batches))
        if r.checkpoint_every and step % r.checkpoint_every == 0:
            state = {"step": step, "tokens": tokens, "log_sums": acc.reduce(sums, "sum").tolist(),
                     "log_micro_batches": micro * acc.num_processes,
                     "global_batch": r.global_batch(acc.num_processes),
                     "recipe": json.loads(r.model_dump_json())}
            where = (run.train_dl.dataset.state_after(step * r.global_batch(acc.num_processes))
                     if r.data.streaming and acc.is_main_process else None)  # the main one reads it
            save_checkpoint(acc, model, optimizer, scheduler, tap, run.out, step, state, r.keep_checkpoints,
                            data_state=where)
        if step >= run.max_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - t_start

    # --- the end: validation, final model, summary ------------------------------------------------
    vals = validate(model, run.val_dl, tap, acc, r.eval_batches)
    metrics.log("val", step, **vals)
    tps = (tokens - tokens_start) / max(elapsed, 1e-9)
    flops = 6 * active_params(acc.unwrap_model(model)) * tps
    summary = {"steps": step, "tokens": tokens, "final_val_loss": vals["val_loss"], "tokens_per_s": tps,
               "model_tflops_per_s": flops / 1e12, "mfu": _mfu(flops, acc),
               "data": r.data.train, "trainable": r.trainable, "seq_len": r.seq_len, **run.engine}
    counts = getattr(run.train_dl.dataset, "moemerge_counts", None) or {}
    if counts:  # what the packed training corpus kept: every token but its last partial block
        summary |= {"data_tokens": counts["tokens"], "data_tokens_in_blocks": counts["kept"]}
    if "val_loss_with_selection_bias" in vals:  # training's routing, which the saved model cannot reproduce
        summary["final_val_loss_with_selection_bias"] = vals["val_loss_with_selection_bias"]
    text = recipe_text or yaml.safe_dump(json.loads(r.model_dump_json()), sort_keys=False)
    save_final(acc, model, run.model_dir, run.config, run.out, lora=r.trainable == "lora", save_dtype=r.save_dtype,
               shard_size=int(r.shard_size), recipe_text=text, training=summary, echo=run.say, workers=r.workers)
    metrics.log("summary", step, **{k: v for k, v in summary.items() if k != "data"})
    # leave together: a rank tearing gloo down while the main one still writes final/ left a process hanging
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def _mfu(flops_per_s: float, accelerator) -> float | None:
    """Model FLOPs utilisation against the GPU's dense bf16 peak, where the GPU is known."""
    if accelerator.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(accelerator.device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return flops_per_s / (peak * 1e12 * accelerator.num_processes) if peak else None

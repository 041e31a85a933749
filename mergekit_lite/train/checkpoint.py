"""Training checkpoints: sharded, written by every process, resumable on any process count.

One format for every engine but DeepSpeed (one process, DDP, FSDP2): torch's distributed checkpoint (DCP) holds the
model and the optimizer state; each process writes only the tensors (or shards of them) it owns, so no process
gathers the model or the optimizer state, and a checkpoint written by N processes loads on M (DCP reshards
on load: FSDP2 shards of 2 processes load into one plain model, and back). DeepSpeed keeps its ZeRO
partitions in its engine, so its checkpoints are the engine's own (same stage, same process count to resume;
`check_resume` says so in one line). Beside it, small files hold what
is not a model tensor: the scheduler, the router tap (its selection bias and the statistics since the last
log line, summed over processes), the RNG state of each process, and `trainer_state.json` (step, tokens,
the resolved recipe and batch the run was trained with), written last: a checkpoint without it is not whole.

The folder is built as `step-N.tmp` and renamed when every process has written its part.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.folders import RunFolder
from mergekit_lite.io.writer import preflight_disk
from mergekit_lite.train.engine import uses_deepspeed, zero_stage

MODEL_STATE = "state"  # the DCP folder inside a checkpoint
EXTRA = "extra.pt"  # scheduler, tap, scaler (main process)
TRAINER_STATE = RunFolder.TRAINER_STATE
DS_TAG = "zero"  # DeepSpeed's checkpoint tag (a sub-folder of MODEL_STATE)


def checkpoint_format(accelerator) -> str:
    """`dcp` (any engine but DeepSpeed; loads on any process count) or `deepspeed-zeroN-P` (DeepSpeed's own
    per-process partitions: they load under the same stage on the same number of processes)."""
    if uses_deepspeed(accelerator):
        return f"deepspeed-zero{zero_stage(accelerator)}-{accelerator.num_processes}"
    return "dcp"


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def _model_and_optim(model, optimizer) -> dict:
    """The model and optimizer state as DCP sees them (DTensor shards under FSDP2, plain tensors otherwise)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _raw(optimizer))
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(accelerator, model, optimizer, scheduler, tap, out: Path, step: int, state: dict,
                    keep: int, data_state: dict | None = None) -> Path:
    """Write OUTPUT/checkpoints/step-N on every process; keeps the last `keep`. Returns the folder.

    `data_state`: where a streamed training set stands after this step's blocks (main process; see
    `train.stream`), so `--resume` starts there instead of re-reading the stream.
    """
    import torch.distributed.checkpoint as dcp

    final = RunFolder(out).checkpoint(step)
    tmp = final.with_name(final.name + ".tmp")
    preflight_disk(final, checkpoint_bytes(model) // accelerator.num_processes)  # every process: all raise together
    if accelerator.is_main_process:  # this step's, and any a killed run left (a .tmp is never resumed from)
        for stale in RunFolder(out).checkpoints.glob("step-???????.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if uses_deepspeed(accelerator):  # ZeRO partitions live in the engine: its own per-process files
        model.save_checkpoint(str(tmp / MODEL_STATE), tag=DS_TAG)
    else:
        with _one_process_is_fine():
            dcp.save(_model_and_optim(model, optimizer), checkpoint_id=str(tmp / MODEL_STATE))
    torch.save(_rng_state(), tmp / _rng_file(accelerator.process_index))
    tap_state = tap.state_dict(reduce=lambda t: accelerator.reduce(t, "sum"))  # every process takes part
    if accelerator.is_main_process:
        scaler = getattr(accelerator, "scaler", None)
        torch.save({"scheduler": scheduler.state_dict(), "tap": tap_state, "stream": data_state,
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / EXTRA)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps({**state, "processes": accelerator.num_processes,
                                                     "format": checkpoint_format(accelerator)}, indent=2))
        tmp.rename(final)
        for old in RunFolder(out).checkpoint_folders()[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, optimizer, scheduler, tap, ckpt: Path) -> None:
    """Restore the model, optimizer, scheduler, tap and RNG from `ckpt`, whatever process count wrote it.

    RNG streams are per process: a resume on the process count that wrote the checkpoint restores each one
    (jitter and dropout continue exactly); on another count each process starts a stream of its own, seeded
    from the checkpoint's step and its rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (ckpt / MODEL_STATE).is_dir() or not (ckpt / EXTRA).is_file():
        raise MoemergeError(f"--resume: {ckpt} is not a checkpoint of this moemerge version (no {MODEL_STATE}/ "
                            f"or {EXTRA}); resume it with the version that wrote it, or start again")
    refuse_code_in_checkpoint(ckpt)
    try:
        if uses_deepspeed(accelerator):
            path, _ = model.load_checkpoint(str(ckpt / MODEL_STATE), tag=DS_TAG, load_lr_scheduler_states=False)
            if path is None:
                raise ValueError(f"no DeepSpeed checkpoint under {ckpt / MODEL_STATE}")
        else:
            state = _model_and_optim(model, optimizer)
            with _one_process_is_fine():
                dcp.load(state, checkpoint_id=str(ckpt / MODEL_STATE))
            set_state_dict(model, _raw(optimizer), model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP and DeepSpeed wrap the real error (missing
        # key, shape, a damaged file) in their own; DCP's CheckpointException derives from BaseException
        last = ([line for line in str(e).strip().splitlines() if line.strip()] or [""])[-1][:200]
        raise MoemergeError(f"--resume: {ckpt} cannot be loaded ({type(e).__name__}: {last}); it is damaged or was "
                            "written for another model: delete it to resume from the one before, or start again"
                            ) from None
    extra = torch.load(ckpt / EXTRA, weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and extra.get("scaler") is not None:
        scaler.load_state_dict(extra["scaler"])
    # summed counters go to the main process only, so the next reduce-sum gives the checkpoint's totals
    tap.load_state_dict(extra["tap"], counters=accelerator.is_main_process)
    written = json.loads((ckpt / TRAINER_STATE).read_text())
    rng = ckpt / _rng_file(accelerator.process_index)
    if written.get("processes", 1) == accelerator.num_processes and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        seed = (written["step"] * 1_000_003 + accelerator.process_index) % 2**31
        random.seed(seed)
        torch.manual_seed(seed)


# What a checkpoint's pickles may name: the data classes of DCP's metadata and of DeepSpeed's state, torch's
# dtypes and sizes, containers and paths. Anything else (os.system, builtins.eval, ...) is code, never data.
_DATA_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
               ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
               ("builtins", "complex"), ("builtins", "bytearray"), ("argparse", "Namespace")}
_DATA_CLASS_MODULES = ("torch.distributed.checkpoint.", "deepspeed.runtime.", "deepspeed.utils.",
                       "deepspeed.checkpoint.")


def _allowed(module: str, name: str) -> bool:
    """True for a name a checkpoint's pickle may build: listed above, a torch dtype, or a class of DCP's or
    DeepSpeed's state modules (a class, never a function: functions are what a crafted pickle calls)."""
    import importlib
    import inspect

    if (module, name) in _DATA_NAMES:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if not module.startswith(_DATA_CLASS_MODULES):
        return False
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return inspect.isclass(obj)


def refuse_code_in_checkpoint(ckpt: Path) -> None:
    """Refuse, before anything is unpickled, a checkpoint whose pickles name anything but data classes.

    torch's DCP reads its `.metadata` with plain `pickle.load`, and DeepSpeed reads its state files with
    `torch.load(weights_only=False)`: a crafted checkpoint would run code on `--resume`. Each pickle is read
    here first without building anything it names (a restricted unpickler for `.metadata`, torch's own
    `get_unsafe_globals_in_checkpoint` for torch files)."""
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if not _allowed(module, name):
                raise pickle.UnpicklingError(f"{module}.{name}")
            return super().find_class(module, name)

    for path in sorted(p for p in (ckpt / MODEL_STATE).rglob("*") if p.is_file()):
        named: list[str] = []
        try:
            if path.name == ".metadata":
                with open(path, "rb") as f:
                    Restricted(f).load()
            elif path.suffix == ".pt":
                named = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                         if not _allowed(*g.rsplit(".", 1))]
        except pickle.UnpicklingError as e:
            named = [str(e)]
        except Exception:  # noqa: BLE001 - a damaged file: the load below names it
            continue
        if named:
            raise MoemergeError(f"--resume: {path} names {named[0]}, which no checkpoint holds (it would run code "
                                "when loaded); it was not written by moemerge: delete that checkpoint")


def data_state(ckpt: Path) -> dict | None:
    """Where the checkpoint's streamed training set stood (None: a cached corpus, or an older checkpoint)."""
    return torch.load(ckpt / EXTRA, weights_only=True).get("stream")


def model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, whole, by in-memory name (for inspection; reads every shard)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(ckpt / MODEL_STATE), f"{tmp}/state.pt")
        state = torch.load(f"{tmp}/state.pt", weights_only=True)
    return state["model"]


def checkpoint_bytes(model) -> int:
    """Estimated size of a checkpoint: the parameters and buffers in their dtype (full sizes, not shards),
    two fp32 Adam moments per trainable parameter, and 1 MB for the small files."""
    total = 1_000_000
    for p in model.parameters():
        total += getattr(p, "ds_numel", p.numel()) * (p.element_size() + (8 if p.requires_grad else 0))
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total


@contextmanager
def _one_process_is_fine():
    """DCP warns on every save and load of a run without a process group (one process); that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Recipe fields a resumed run may change: they observe the run or say how it is written, never what it trains.
# max_steps / max_tokens may only grow (the run is extended; the cosine schedule is re-read for the new length).
OBSERVING = ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "tracker", "workers", "output")
EXTENDING = ("max_steps", "max_tokens")
BATCH = ("gradient_accumulation_steps", "global_batch_size")  # compared as the resolved global batch


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(ckpt: Path, recipe, processes: int, fmt: str = "dcp") -> list[str]:
    """Refuse, in one line naming each field with old -> new, a resume whose recipe changes the run the
    checkpoint belongs to; returns notes on the accepted changes (observing or extending fields).

    The batch is compared as sequences per optimizer step over all processes, so a run may resume on
    another process count when `global_batch_size` keeps the batch (accumulation is derived again).
    """
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    if "recipe" not in state:
        raise MoemergeError(f"--resume: {ckpt} records no recipe (written by an older moemerge); resume it with "
                            "the version that wrote it, or start again")
    old, new = _flat(state["recipe"]), _flat(json.loads(recipe.model_dump_json()))
    changed, notes = [], []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a == b or key in BATCH:
            continue
        line = f"{key} {a!r} -> {b!r}"
        if key in OBSERVING:
            notes.append(line)
        elif key in EXTENDING and a is not None and b is not None and b >= a:
            notes.append(line + " (the run is extended)")
        else:
            changed.append(line)
    global_batch = recipe.global_batch(processes)
    if global_batch != state["global_batch"]:
        changed.append(f"global batch {state['global_batch']} -> {global_batch} sequences per step (on {processes} "
                       f"process(es)); set global_batch_size: {state['global_batch']} to keep it on any count")
    if state.get("format", "dcp") != fmt:
        changed.append(f"checkpoint format {state.get('format', 'dcp')} -> {fmt} (DeepSpeed's partitions resume "
                       "under the same ZeRO stage on as many processes; other engines' checkpoints resume anywhere "
                       "but under DeepSpeed)")
    if changed:
        raise MoemergeError(f"--resume: the recipe changes the run in {ckpt}: {'; '.join(changed)}. Put them back, "
                            "or train into a new output")
    return notes

"""What `train` checks and records before anything loads: the recipe against the model and data, OUTPUT's state,
the run record `--resume` requires, and which checkpoint a resume may load."""

from __future__ import annotations

import glob
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from mergekit_lite.arch.tables import moe_counts
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.folders import RunFolder
from mergekit_lite.io.reader import read_config, refuse_leaving_links
from mergekit_lite.io.safety import refuse_overlap, remove_own_entries
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.recipe import TrainRecipe
from mergekit_lite.train.data import check_repo_options, resolve_files
from mergekit_lite.train.routing import check_routing

_TRACKER_CHECK = {"tensorboard": "is_tensorboard_available", "mlflow": "is_mlflow_available",
                  "wandb": "is_wandb_available"}


# What `train` writes into its output folder: all that `--overwrite` may remove (see io/folders.py).
TRAIN_PRODUCTS = RunFolder.PRODUCTS


def train_inputs(r: TrainRecipe, model_dir: Path) -> list[tuple[str, str | Path]]:
    """The model folder and every data file/folder (glob matches included), for `refuse_overlap`."""
    inputs: list[tuple[str, str | Path]] = [("the model", model_dir)]
    for field, specs in (("train", r.data.train), ("validation", r.data.validation)):
        for spec in specs or []:
            matches = glob.glob(spec, recursive=True) if any(ch in spec for ch in "*?[") else [spec]
            inputs += [(f"data.{field}", m) for m in matches]
    return inputs


def preflight(r: TrainRecipe, model_dir: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Fail before any training on what the user can fix; returns the model's config.json."""
    refuse_overlap(r.output, train_inputs(r, model_dir))  # before anything below can delete
    refuse_leaving_links(model_dir, "model")  # transformers would follow a link anywhere
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise MoemergeError(f"model: {model_dir} has no config.json; is this a Hugging Face model folder?")
    from mergekit_lite.models import text_part, trust_for

    trust_for(model_dir, r.trust_remote_code, "model")  # foreign custom code refused before any work
    cfg = read_config(model_dir)
    max_pos = text_part(cfg).get("max_position_embeddings")
    if max_pos and r.seq_len > max_pos:
        raise MoemergeError(f"seq_len = {r.seq_len} is larger than the model's max_position_embeddings "
                            f"({max_pos}); set seq_len to at most {max_pos}")
    check_routing(r.moe, cfg)  # a policy the model's top-k or grouped routing cannot take
    for field, specs in (("train", r.data.train), ("validation", r.data.validation)):
        for entries in ([[s] for s in specs] if field == "train" and r.data.weights else [specs]) if specs else []:
            resolve_files(entries, field)  # raises on a missing file/folder/glob
    check_repo_options(r.data)
    if r.tracker != "none":
        import accelerate.utils as au

        if not getattr(au, _TRACKER_CHECK[r.tracker])():
            raise MoemergeError(f"tracker = {r.tracker!r} but its package is not installed; "
                                f"pip install {r.tracker}, or set tracker: none")
    if r.trainable == "added":  # refused when the folder records nothing the upcycle added
        from mergekit_lite.train.blocks import added_keys

        added_keys(model_dir)
    if r.trainable == "new_layers" and not (read_sidecar(model_dir) or {}).get("new_layers"):
        raise MoemergeError(f"trainable = 'new_layers' but {model_dir}/moemerge.json records no new layers; "
                            "make the model with `moemerge graft --expand`, or pick another trainable mode")
    out = Path(r.output)
    started = RunFolder(out).started()
    if started and not resume:
        if not overwrite:
            raise MoemergeError(f"output {out} already holds a run; pass --resume to continue it "
                                "or --overwrite to start again")
        remove_own_entries(out, TRAIN_PRODUCTS, "moemerge train")
    if resume:
        resumable_checkpoint(out)  # before accelerate.load_state unpickles anything
    return cfg


RUN_RECORD = RunFolder.RECORD  # OUTPUT/RUN_RECORD: this folder holds a run `moemerge train` started


def write_run_record(out: Path, r: TrainRecipe, is_main: bool) -> None:
    """Mark OUTPUT as a `moemerge train` run (what `--resume` requires), with the validated recipe's hash."""
    if is_main:
        digest = hashlib.sha256(r.model_dump_json().encode()).hexdigest()[:16]
        record = {"tool": "moemerge train", "recipe_sha256": digest, "model": r.model,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def resumable_checkpoint(out: Path) -> Path:
    """The checkpoint `--resume` loads, refused unless OUTPUT is a run `train` made and the checkpoint is whole.

    `accelerate.load_state` unpickles (custom state with weights_only=False), so nothing is loaded from a
    folder without our run record and the checkpoint's own trainer_state.json.
    """
    try:
        own = json.loads((out / RUN_RECORD).read_text()).get("tool") == "moemerge train"
    except (OSError, ValueError, AttributeError):
        own = False
    if not own:
        raise MoemergeError(f"--resume: {out} has no {RUN_RECORD} from `moemerge train`, so it is not a run this "
                            "tool started; resume only runs you made here, or start again without --resume")
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise MoemergeError(f"--resume: no checkpoint under {RunFolder(out).checkpoints}; run without --resume first")
    try:
        state = json.loads((ckpt / RunFolder.TRAINER_STATE).read_text())
        if not isinstance(state.get("step"), int):
            raise ValueError("no step")
    except (OSError, ValueError, AttributeError):
        raise MoemergeError(f"--resume: {ckpt} has no readable trainer_state.json, so `moemerge train` did not "
                            "finish writing it; delete that checkpoint folder to resume from the one before") from None
    return ckpt


def has_experts(cfg: dict[str, Any]) -> bool:
    """Whether a config.json (text part for multimodal ones) describes routed experts."""
    from mergekit_lite.models import text_part

    return moe_counts(text_part(cfg))[0] is not None


def finished_run(out: Path) -> dict[str, Any] | None:
    """The summary record of a run in OUTPUT that ran to its end (final/ written), else None."""
    path = RunFolder(out).metrics
    if not RunFolder(out).final.is_dir() or not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next((r for r in reversed(rows) if r.get("type") == "summary"), None)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest `checkpoints/step-NNNNNNN` folder of a run, or None."""
    ckpts = RunFolder(out).checkpoint_folders()
    return ckpts[-1] if ckpts else None

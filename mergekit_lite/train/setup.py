"""Everything `train` decides before the first step: preflight checks, trainable set, data loaders."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_lite.arch.tables import moe_counts
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.folders import RunFolder
from mergekit_lite.io.reader import read_config, refuse_leaving_links
from mergekit_lite.io.safety import refuse_overlap, remove_own_entries
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.recipe import LoraSettings, TrainRecipe
from mergekit_lite.train.data import batch_order, blend_order, check_repo_options, packed_dataset, resolve_files
from mergekit_lite.train.engine import main_builds
from mergekit_lite.train.routing import check_routing
from mergekit_lite.train.stream import StreamedBlocks

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


def trainable_parameters(model: nn.Module, mode: str, routers: list[nn.Module], new_layers: list[int],
                         added: list[str] | None = None) -> list:
    """Freeze everything outside `mode` and return the parameters left trainable.

    ERNIE's selection bias (a parameter, not a buffer) is never trained: it gets no gradient, and the
    balancing rule moves it (RouterTap.update_bias). Left trainable, DeepSpeed would decay it like a weight
    (ZeRO treats a missing gradient as zero; torch's AdamW skips the parameter)."""
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            p.requires_grad_(False)
    if mode in ("all", "lora"):  # peft has already frozen the base for lora
        return [p for p in model.parameters() if p.requires_grad]
    if mode == "added":  # the tensors the upcycle created, recorded in its moemerge.json (train/blocks.py)
        from mergekit_lite.train.blocks import select_added

        if keep := select_added(model, added or []):
            return keep
        raise MoemergeError("trainable = 'added' selects no parameter of this model (its moemerge.json names tensors "
                            "the model does not hold)")
    router_ids = {id(p) for r in routers for p in r.parameters()}
    prefixes = tuple(f"model.layers.{i}." for i in new_layers)
    keep = []
    for name, p in model.named_parameters():
        in_router = id(p) in router_ids and not name.endswith("e_score_correction_bias")  # ERNIE's: not trained
        if mode == "routers":
            on = in_router
        elif mode == "routers+experts":
            on = in_router or ".experts." in name or ".shared_expert" in name
        else:  # new_layers
            on = name.startswith(prefixes)
        p.requires_grad_(on)
        if on:
            keep.append(p)
    if not keep:
        raise MoemergeError(f"trainable = {mode!r} selects no parameter of this model (is it an MoE model?)")
    return keep


# transformers 5 fuses routed experts into 3-D parameters; the per-expert FFN names users know reach them
EXPERT_ALIASES = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "w1": "gate_up_proj", "w3": "gate_up_proj",
                  "down_proj": "down_proj", "w2": "down_proj"}
_FUSED_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))  # one tensor in memory: adapting half of it is impossible


def _matches(key: str, name: str) -> bool:
    return key == name or key.endswith("." + name)  # peft's own rule for target_modules / target_parameters


def lora_targets(model: nn.Module, lora: LoraSettings) -> dict[str, Any]:
    """Check `lora.target_modules` against the loaded model; returns peft `LoraConfig` target arguments.

    A name may match Linear modules (peft `target_modules`) or fused 3-D expert parameters such as
    `experts.gate_up_proj` (peft `target_parameters`); on an MoE model `gate_proj`/`up_proj`/`w1`/`w3` and
    `down_proj`/`w2` also reach the routed experts. A name that matches nothing, or only zero-sized
    modules (an upcycled Qwen2-MoE's empty shared expert), is refused naming the valid names.
    """
    linear = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fused = {n for n, p in model.named_parameters() if p.dim() == 3}  # (E, out, in) expert stacks
    valid = sorted({n.rsplit(".", 1)[-1] for n, size in linear.items() if size})
    fused_names = sorted({".".join(n.split(".")[-2:]) for n in fused})
    hint = (f"valid names: Linear modules {valid}; fused expert parameters {fused_names}"
            + (" (gate_proj/up_proj/w1/w3 and down_proj/w2 reach them)" if fused_names else ""))
    modules, params = [], set()
    for name in dict.fromkeys(lora.target_modules):
        hits = [n for n in linear if _matches(n, name)]
        param = (next((p for p in fused_names if p.endswith("." + EXPERT_ALIASES.get(name, "-"))), None)
                 or next((name for n in fused if _matches(n, name)), None))
        if any(linear[n] for n in hits):
            modules.append(name)
        if param:
            params.add(param)
        elif not hits:
            raise MoemergeError(f"lora.target_modules: {name!r} matches nothing in this model; {hint}")
        elif not any(linear[n] for n in hits):
            raise MoemergeError(f"lora.target_modules: {name!r} matches only zero-sized modules ({hits[0]}: "
                                f"{tuple(model.get_submodule(hits[0]).weight.shape)}), nothing to train; {hint}")  # type: ignore[arg-type]
    names = set(lora.target_modules)
    for a, b in _FUSED_PAIRS:
        if fused_names and (a in names) != (b in names) and any(p.endswith(".gate_up_proj") for p in params):
            raise MoemergeError(f"lora.target_modules: {a!r} and {b!r} are one fused tensor in this model's routed "
                                f"experts (experts.gate_up_proj); list both or neither")
    if params and lora.dropout:
        raise MoemergeError(f"lora.dropout = {lora.dropout}: peft cannot apply dropout to fused expert parameters "
                            f"{sorted(params)}; set lora.dropout: 0, or leave the expert names out of target_modules")
    return {"target_modules": modules, "target_parameters": sorted(params) or None}


class EmptyLinear(nn.Module):
    """Stands in for an `nn.Linear` with no weights (an upcycle's size-0 shared expert): the same zeros out, its
    size-0 tensors kept as buffers, so the saved model still holds them, and no engine has to shard, partition
    or reduce an empty parameter (FSDP2's `fully_shard` fails on one with `_chunk_cat expects non-empty tensor`,
    ZeRO-3's fetch with `torch.cat(): expected a non-empty list`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach())  # (out, in), one of them 0
        if linear.bias is not None:
            self.register_buffer("bias", linear.bias.detach())
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zeros of the output width: what a Linear with a size-0 weight computes."""
        return x.new_zeros(*x.shape[:-1], self.out_features)  # x @ W.T with W (out, 0) or (0, in)


def park_empty_linears(model) -> int:
    """Replace every `nn.Linear` holding no weight by an `EmptyLinear`; returns how many. Before the optimizer
    is built (its parameters must be the model's) and before any engine wraps the model."""
    empty = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and m.weight.numel() == 0 and not hasattr(m.weight, "ds_id")]
    for name in empty:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, EmptyLinear(getattr(holder, child)))
    return len(empty)


def unused_parameters_possible(model: nn.Module) -> bool:
    """Whether a trainable parameter can miss its gradient in a step, so DDP must search for unused ones: experts
    kept as separate modules (an expert no token chose gets none). transformers 5 fuses each layer's experts into
    one 3-D parameter, which always takes part, so its MoE models need no search (DDP warns when it finds none)."""
    return any(re.search(r"\.experts\.\d+\.", name) for name, p in model.named_parameters() if p.requires_grad)


def identical_expert_layers(model: nn.Module) -> int:
    """MoE layers whose routed experts are all equal (a fresh upcycle without noise or Drop-Upcycling): fused 3-D
    experts (transformers' classes), or per-expert modules `...experts.{e}.gate_proj` (moemerge's own classes)."""
    count = 0
    per_expert: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        if p.dim() == 3 and name.endswith(("experts.gate_up_proj", "experts.w1", "input_linear.weight")) \
                and p.shape[0] > 1:
            w = p.detach()  # (E, out, in)
            count += bool(all(torch.equal(w[0], w[e]) for e in range(1, w.shape[0])))
        elif (m := re.fullmatch(r"(.*\.experts)\.\d+\.gate_proj\.weight", name)) is not None:
            per_expert.setdefault(m.group(1), []).append(p.detach())
    for ws in per_expert.values():
        count += len(ws) > 1 and all(torch.equal(ws[0], w) for w in ws[1:])
    return count


def routers_only_note(model: nn.Module, mode: str) -> str | None:
    """Why `trainable: routers` on identical experts changes nothing: every expert computes the same function,
    so the language-model loss gives the routers no gradient until experts differ."""
    if mode != "routers":
        return None
    n = identical_expert_layers(model)
    if not n:
        return None
    return (f"warning: {n} MoE layer(s) hold identical experts, so the language-model loss gives the routers no "
            "gradient (every choice computes the same function): trainable: routers cannot change the loss. "
            "Upcycle with noise or drop_ratio, or train the experts too (trainable: routers+experts or all)")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and other 1-D parameters."""
    def dims(p) -> int:  # a parameter partitioned by ZeRO-3's zero.Init is 1-D in memory; ds_shape is its own
        return len(getattr(p, "ds_shape", p.shape))

    decay = [p for p in model.parameters() if p.requires_grad and dims(p) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and dims(p) < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups, and the scheduler must count the same


def build_loaders(r: TrainRecipe, tokenizer, model_dir: Path, accelerator, max_steps: int):
    """(train loader yielding every micro-batch of the run in order, validation loader).

    The train order is one list of micro-batches for the whole run, a function of the seed only; accelerate
    deals micro-batch j to process j % N, so each optimizer step takes the same `global_batch` sequences in
    the same micro-batches on any process count. The validation loader is left unprepared: `evaluate`
    splits its batches over the processes itself, so validation does not depend on the process count.
    """
    cache = RunFolder(Path(r.output)).cache
    cache.mkdir(parents=True, exist_ok=True)
    micro_batches = max_steps * r.global_batch(accelerator.num_processes) // r.micro_batch_size
    collate = _collate
    if r.data.streaming:
        train = StreamedBlocks(r.data.train, "train", r.data, tokenizer, r.seq_len,
                               skip=0 if r.data.validation else r.data.validation_blocks,
                               shuffle=r.data.shuffle_buffer, seed=r.seed, weights=r.data.weights)
        val = (StreamedBlocks(r.data.validation, "validation", r.data, tokenizer, r.seq_len) if r.data.validation
               else StreamedBlocks(r.data.train, "train", r.data, tokenizer, r.seq_len, limit=r.data.validation_blocks,
                                   weights=r.data.weights))
        train_dl = torch.utils.data.DataLoader(train, batch_size=r.micro_batch_size, collate_fn=collate,
                                               generator=_own_rng(r.seed))
        val_dl = torch.utils.data.DataLoader(val, batch_size=r.micro_batch_size, collate_fn=collate,
                                             generator=_own_rng(r.seed))
        return train_dl, val_dl

    def packed(specs, field, part=None):
        return packed_dataset(specs, field, r.data, tokenizer, model_dir, r.seq_len, cache,
                              accelerator.is_main_process, on_main, part=part, seed=r.seed)

    def on_main(what, build):
        return main_builds(accelerator, what, build, r.data.wait_minutes)

    if r.data.weights:  # a blend: each entry packed on its own, blocks drawn in the weights' shares
        return _blended_loaders(r, packed, micro_batches, collate)
    if r.data.validation:
        train, val = packed(r.data.train, "train"), packed(r.data.validation, "validation")
    else:  # held-out documents, split before packing: no document on both sides
        train, val = packed(r.data.train, "train", "train"), packed(r.data.train, "train", "validation")
    if len(train) < r.micro_batch_size:
        raise MoemergeError(f"data.train packs into {len(train)} blocks of {r.seq_len} tokens, fewer than "
                            f"micro_batch_size={r.micro_batch_size}; add text or lower seq_len/micro_batch_size")
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < micro_batches:  # the whole run's batch order, fixed by the seed: exact resume
        batches += batch_order(len(train), r.micro_batch_size, r.seed, epoch)
        epoch += 1
    train_dl = torch.utils.data.DataLoader(train, batch_sampler=batches[:micro_batches], collate_fn=collate,
                                           generator=_own_rng(r.seed))
    val_dl = torch.utils.data.DataLoader(val, batch_size=r.micro_batch_size, shuffle=False, collate_fn=collate,
                                         generator=_own_rng(r.seed))
    return train_dl, val_dl


def _blended_loaders(r: TrainRecipe, packed, micro_batches: int, collate):
    """Loaders for a weighted blend of `data.train` entries (see `data.blend_order`)."""
    import datasets

    parts = [packed([spec], "train", None if r.data.validation else "train") for spec in r.data.train]
    vals = ([packed(r.data.validation, "validation")] if r.data.validation
            else [packed([spec], "train", "validation") for spec in r.data.train])
    train = datasets.concatenate_datasets(parts).with_format("torch")
    val = vals[0] if len(vals) == 1 else datasets.concatenate_datasets(vals).with_format("torch")
    counts = [getattr(p, "moemerge_counts", {}) for p in parts]
    train.moemerge_counts = {k: sum(c.get(k, 0) for c in counts) for k in ("tokens", "kept", "documents")}
    train.moemerge_sources = [(spec, len(p), w / sum(r.data.weights)) for spec, p, w in
                              zip(r.data.train, parts, r.data.weights)]
    order = blend_order([len(p) for p in parts], r.data.weights, micro_batches * r.micro_batch_size, r.seed)
    batches = [order[i:i + r.micro_batch_size] for i in range(0, len(order), r.micro_batch_size)]
    train_dl = torch.utils.data.DataLoader(train, batch_sampler=batches, collate_fn=collate,
                                           generator=_own_rng(r.seed))
    val_dl = torch.utils.data.DataLoader(val, batch_size=r.micro_batch_size, shuffle=False, collate_fn=collate,
                                         generator=_own_rng(r.seed))
    return train_dl, val_dl


def _own_rng(seed: int) -> torch.Generator:
    """A loader's own generator: starting a DataLoader draws a seed, which would otherwise come from the
    global RNG that jitter and dropout use, and shift them on a resumed run (which starts one more loader)."""
    return torch.Generator().manual_seed(seed)


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([torch.as_tensor(row["input_ids"]) for row in rows])}


def steps_for(r: TrainRecipe, num_processes: int) -> int:
    """max_steps, or enough optimizer steps to see max_tokens."""
    if r.max_steps is not None:
        return r.max_steps
    per_step = r.seq_len * r.global_batch(num_processes)
    return max(1, math.ceil(r.max_tokens / per_step))

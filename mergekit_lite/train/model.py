"""The model a run trains: loaded, tapped, LoRA-wrapped, the trainable set chosen, the optimizer's groups."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_lite.arch.params import model_param_counts
from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.recipe import LoraSettings, TrainRecipe
from mergekit_lite.train.engine import load_model
from mergekit_lite.train.moe import RouterTap


def build_model(r: TrainRecipe, model_dir: Path, accelerator, config: dict[str, Any],
                say) -> tuple[nn.Module, RouterTap]:
    """Load the model (fp32 master weights; under FSDP2 read by the main process only), tap its routers, wrap it
    for LoRA, and freeze what the recipe does not train. Returns (model, tap), not yet prepared by accelerate."""
    model = load_model(model_dir, accelerator, r.attn_implementation, r.trust_remote_code)
    if r.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    tap = RouterTap(model, jitter=r.moe.jitter, bias_update_rate=r.moe.bias_update_rate, moe=r.moe, config=config)
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
    sidecar = read_sidecar(model_dir) or {}  # what graft --expand and the upcycle recorded as new
    new_layers = sidecar.get("new_layers", [])
    added = sidecar.get("added") if r.trainable == "added" else None
    trainable_parameters(model, r.trainable, tap.routers, new_layers, added)
    return model, tap


def build_optimizer(model: nn.Module, r: TrainRecipe, max_steps: int):
    """(AdamW over the trainable parameters, its schedule): linear warmup from 0 over `warmup_steps`, then cosine
    to `learning_rate * min_lr_ratio` at `max_steps`."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = torch.optim.AdamW(param_groups(model, r.weight_decay), lr=r.learning_rate, betas=r.adam_betas)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, r.warmup_steps, max_steps,
                                                            min_lr_rate=r.min_lr_ratio)
    return optimizer, scheduler


def active_params(model: nn.Module) -> int:
    """Parameters one token runs through: routed experts count k/E of their size (`arch.params`, as upcycle,
    graft and inspect count them)."""
    return model_param_counts(model).active


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

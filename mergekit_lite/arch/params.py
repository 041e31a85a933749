"""Parameter counts (total, and active per token) of a MoE or dense model: one definition for every command.

Upcycle's and graft's plans (`--dry-run`, the sidecar), `moemerge inspect` (safetensors headers) and the header
of `moemerge train` (the live module) all call `param_counts`, so the numbers they print agree.

A token runs through everything except the routed experts, of which it runs k of E. Routed-expert tensors are
those under an `.experts.` module (per-expert on disk, or transformers' fused 3-D `experts.gate_up_proj`), or
the family's fused on-disk tensors that hold every expert at once (granitemoe's `input_linear`). moemerge's
PEER and MH-MoE blocks run `heads` x k experts per token (at most all of them): PEER's experts are rows of its
`expert_up`/`expert_down` tables, MH-MoE's are its `.experts.`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from mergekit_lite.arch.tables import MOE, model_type_of, moe_counts

_PEER_TABLES = (".expert_up", ".expert_down")  # a PEER layer's single-neuron experts: one row of each per expert


class ParamCounts(NamedTuple):
    """Parameters of a model: all of them, and those one token runs through."""

    total: int
    active: int


def param_counts(numels: Iterable[tuple[str, int]], config: Mapping[str, Any]) -> ParamCounts:
    """Total and per-token parameters of tensors `(name, number of elements)` of a model with `config`.

    Args:
        numels: every tensor of the checkpoint once (tied weights once), as (full name, element count).
        config: its config.json dict (a moemerge config with its nested `text_config` works as is).

    Returns:
        (total, active): active counts routed experts k/E of their size; equal to total for a dense model.
    """
    fam = MOE.get(model_type_of(dict(config)))
    fused = tuple("." + rel for rel in fam.fused_expert_keys) if fam else ()
    fused += _PEER_TABLES if config.get("block_kind") == "peer" else ()
    total = expert = 0
    for name, n in numels:
        total += n
        if ".experts." in name or (fused and name.endswith(fused)):
            expert += n
    n_experts, top_k = moe_counts(dict(config))
    if config.get("block_kind") in ("peer", "mh_moe") and n_experts and top_k:  # each head routes on its own
        top_k = min(top_k * int(config.get("block_heads") or 1), n_experts)
    return ParamCounts(total, total - expert + (expert * top_k // n_experts if n_experts and top_k else expert))


def module_numels(model: Any) -> list[tuple[str, int]]:
    """(name, element count) of a live module's saved tensors: its parameters (tied ones once) and the buffers
    its state dict keeps (a DeepSeek-V3 router's selection bias is a buffer, yet saved and counted on disk)."""
    saved = set(model.state_dict(keep_vars=True))
    out = [(name, p.numel()) for name, p in model.named_parameters()]
    return out + [(name, b.numel()) for name, b in model.named_buffers() if name in saved]


def model_param_counts(model: Any) -> ParamCounts:
    """`param_counts` of a live transformers model (training's header), read from the module and its config."""
    return param_counts(module_numels(model), model.config.to_dict())

"""`moemerge inspect`: what a model folder holds, from headers and config only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mergekit_lite.arch.tables import MOE, model_type_of, moe_counts, router_summary, split_layer_key
from mergekit_lite.io import CheckpointReader
from mergekit_lite.io.sidefiles import read_sidecar
from mergekit_lite.plan import format_bytes, format_count

_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_PEER_TABLES = (".expert_up", ".expert_down")  # moemerge's PEER experts: rows of two tables


def describe(path: str | Path) -> dict[str, Any]:
    """Architecture, layers, experts, parameters (total / active per token), dtypes, shards, provenance."""
    from mergekit_lite.models import code_status, text_part

    reader = CheckpointReader(path)
    cfg = text_part(reader.config)
    total = expert = 0
    dtypes: dict[str, int] = {}
    fam = MOE.get(model_type_of(cfg))  # experts fused on disk (granitemoe: input_linear [E, 2I, H]) count too
    fused = {rel for rel, members in fam.fused.items() if any("{e}" in m for m in members)} if fam else set()
    for key, info in reader.tensors.items():
        total += info.numel
        name = str(info.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + info.numel
        if _EXPERT.search(key) or (split_layer_key(key) or (0, ""))[1] in fused or key.endswith(_PEER_TABLES):
            expert += info.numel
    n_experts, top_k = moe_counts(cfg)  # every family's spelling (arch tables)
    if cfg.get("block_kind") in ("peer", "mh_moe"):  # heads x top-k per token (moemerge's PEER / MH-MoE blocks)
        top_k = top_k and min(top_k * cfg.get("block_heads", 1), n_experts or 0)
    active = total - expert + (expert * top_k // n_experts if n_experts and top_k else expert)
    files = sorted({i.file for i in reader.tensors.values()})
    return {
        "path": str(path), "architecture": (cfg.get("architectures") or ["?"])[0],
        "model_type": cfg.get("model_type"), "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"), "experts": n_experts, "experts_per_token": top_k,
        "router": router_summary(cfg) if n_experts else None,
        "total_params": total, "active_params": active, "dtypes": dtypes, "shards": files,
        "bytes": reader.total_bytes(), "built_by": read_sidecar(path), "custom_code": code_status(path),
    }


def describe_lines(d: dict[str, Any]) -> list[str]:
    """Format `describe`'s record for the terminal: shape, experts, parameters, shards and build options."""
    lines = [
        f"{d['path']}",
        f"  architecture   {d['architecture']} ({d['model_type']})",
        f"  layers         {d['layers']}   hidden {d['hidden_size']}",
    ]
    says = {"own": "moemerge's own classes, this version's files (trust_remote_code=True to load elsewhere)",
            "foreign": "custom code NOT from this moemerge version: read it before trusting it"}
    code = says.get(d.get("custom_code"))
    if code:
        lines.append(f"  custom code    {code}")
    if d["experts"]:
        lines.append(f"  experts        {d['experts']} per MoE layer, top-{d['experts_per_token']}")
        if d.get("router"):
            lines.append(f"  router         {d['router']}")
    lines += [
        f"  parameters     total {format_count(d['total_params'])}   "
        f"active per token {format_count(d['active_params'])}",
        f"  dtype          {', '.join(f'{k} ({format_count(v)})' for k, v in d['dtypes'].items())}",
        f"  shards         {len(d['shards'])} file(s), {format_bytes(d['bytes'])}",
    ]
    built = d.get("built_by")
    if built:
        steps = " -> ".join(s.get("step", "?") for s in built.get("lineage", []))
        lines.append(f"  built by       moemerge {built.get('kind')}   lineage: {steps}")
        lines += record_lines(built)
    return lines


def record_lines(built: dict[str, Any]) -> list[str]:
    """The sidecar's figures as aligned `name  value` rows; a mapping (parity, training) gets its own block."""
    rows = {k: v for k, v in built.items() if k not in ("recipe", "lineage", "kind") and v is not None}
    subkeys = [k for v in rows.values() if isinstance(v, dict) for k in v]
    width = max([len(k) for k in rows] + [len(k) for k in subkeys], default=0)
    lines = []
    for k, v in rows.items():
        if k == "upcycle" and isinstance(v, dict):
            lines += upcycle_lines(v)
        elif isinstance(v, dict):
            lines.append(f"    {k}")
            lines += [f"      {sub:<{width}}  {value_text(x)}" for sub, x in v.items() if x is not None]
        else:
            lines.append(f"    {k:<{width + 2}}  {value_text(v)}")
    return lines


def value_text(v: Any) -> str:
    """A sidecar value as a person reads it: 4 significant digits, lists joined, no Python syntax."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(value_text(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {value_text(x)}" for k, x in v.items() if x is not None)
    return str(v)


def upcycle_lines(u: dict[str, Any]) -> list[str]:
    """How an upcycled model's experts were made (granularity, Drop-Upcycling, shared experts, sources)."""
    lines = [f"    experts made as: granularity {u.get('granularity')} (expert size {u.get('expert_size')}), "
             f"drop_ratio {u.get('drop_ratio')}, noise {u.get('noise')}, router {u.get('router_init')}",
             f"    shared experts: {u.get('shared_experts')} (size {u.get('shared_expert_size')}, "
             f"split {u.get('shared_split')})   MoE layers: {u.get('moe_layers')}",
             f"    non-expert weights: {u.get('non_expert')} (base {u.get('base')})"]
    if u.get("router"):  # scoring, groups, scaling as the recipe asked (absent in records before issue 13)
        lines.append(f"    router options: {value_text(u['router'])}")
    runs: list[list] = []  # consecutive identical copies shown as one line ("copies 0-7: ...")
    for c, item in enumerate(u.get("copies", [])):
        text = f"{item.get('source')}   noise {item.get('noise')}   drop_ratio {item.get('drop_ratio')}"
        if runs and runs[-1][2] == text:
            runs[-1][1] = c
        else:
            runs.append([c, c, text])
    for first, last, text in runs:
        lines.append(f"    copy {first}: {text}" if first == last else f"    copies {first}-{last}: {text}")
    return lines

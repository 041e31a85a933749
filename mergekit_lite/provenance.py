"""Provenance: what the sidecar (`moemerge.json`) records about how a model folder was built.

Keys every writer may set (the model card and `inspect` read them):
  kind           upcycle | graft | train
  recipe         the recipe YAML as the user wrote it
  lineage        list of steps, oldest first: {step, recipe_sha256, sources, tool}
  total_params, active_params
  parity         {max_abs, mean_abs, top1_agreement} when a step-0 check ran
  training       {steps, tokens, final_val_loss, data, ...} for trained models
  new_layers     output layer indices that are new (graft --expand); `train` can train only these
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mergekit_lite import __version__
from mergekit_lite.io.sidefiles import read_sidecar


def recipe_record(kind: str, recipe_yaml: str, sources: list[Path], extra: dict) -> dict:
    """Provenance for the output sidecar: the recipe verbatim, its hash, and the inputs' own lineage."""
    lineage = []
    for s in sources:
        prior = read_sidecar(s)
        if prior:
            lineage = prior.get("lineage", [])
            break
    named = [_name(s) for s in sources]
    step = {"step": kind, "recipe_sha256": hashlib.sha256(recipe_yaml.encode()).hexdigest()[:16],
            "sources": named, "tool": f"mergekit-lite {__version__}"}
    base = lineage or [{"step": "source", "model": named[0]}]
    return {"kind": kind, "recipe": recipe_yaml, "lineage": base + [step], **extra}


def _name(source: Path | str) -> str:
    """A local folder as its absolute path (a relative `org/name`-shaped path read later from another directory
    would pass for a Hub repo id on the card); a Hub id or cache snapshot path as given."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() and not p.is_absolute() else str(source)

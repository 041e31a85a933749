"""Hash what upcycle and graft write, to show a refactor changed no byte (issue 25's "done when").

Runs every shipped recipe under recipes/upcycle and recipes/graft with its sources pointed at pico models, then
every target x source x option upcycle and grafts (expand, drop, slices) of the MoE outputs, and stores the
sha256 of every output file, the dry-run summary, or the first line of the error, in WORKDIR/hashes.json.

    python scripts/hash_recipe_outputs.py WORKDIR            # run on one checkout; copy hashes.json aside
    python scripts/hash_recipe_outputs.py --compare A.json B.json

Use the same WORKDIR for both runs: the output folders' paths are recorded in the sidecars.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import yaml

from mergekit_lite.ops.graft import run_graft
from mergekit_lite.ops.upcycle import run_upcycle
from mergekit_lite.pico import build_pico_model


def compare(a_path: str, b_path: str) -> None:
    """Print every run whose files, summary or error differ, and the totals."""
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for k in diff:
        x, y = a.get(k) or {}, b.get(k) or {}
        files = sorted(f for f in set(x.get("files", {})) | set(y.get("files", {}))
                       if x.get("files", {}).get(f) != y.get("files", {}).get(f))
        print(k, "files:", files, "| error:", x.get("error"), "->", y.get("error"))
    print(f"identical {len(set(a) | set(b)) - len(diff)}, different {len(diff)}")


if sys.argv[1] == "--compare":
    compare(sys.argv[2], sys.argv[3])
    sys.exit(0)
ROOT = Path(__file__).resolve().parents[1]     # this checkout's recipes/ are run
WORK = Path(sys.argv[1]).resolve()             # fixed folder: models/ kept, runs/ rebuilt
WORK.mkdir(parents=True, exist_ok=True)
MODELS = WORK / "models"
RUNS = WORK / "runs"
shutil.rmtree(RUNS, ignore_errors=True)
RUNS.mkdir()

PICOS = {  # name -> (family, overrides)
    "llama": ("llama", {}), "llama_b": ("llama", {"seed": 1}), "llama_c": ("llama", {"seed": 2}),
    "llama16": ("llama", {"num_hidden_layers": 16}), "mistral24": ("mistral", {"num_hidden_layers": 24}),
    "mistral": ("mistral", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "gemma3": ("gemma3_text", {}),
}
for name, (fam, kw) in PICOS.items():
    if not (MODELS / name / "config.json").exists():
        build_pico_model(fam, MODELS / name, **kw)

SOURCES = {
    "moemerge-quickstart/dense": "llama", "models/llama": "llama", "models/llama-general": "llama",
    "models/llama-math": "llama_b", "models/llama-code": "llama_c", "models/qwen3": "qwen3",
    "mistralai/Mistral-7B-v0.1": "mistral", "Qwen/Qwen2-0.5B": "qwen2", "Qwen/Qwen3-0.6B": "qwen3",
    "gemma-3-270m": "gemma3", "path/to/model": "llama16", "path/to/llama": "llama16",
    "path/to/mistral-7b": "mistral24", "moemerge-quickstart/runs/dense/final": "llama_b",
}


def fix(obj):
    if isinstance(obj, dict):
        return {k: fix(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fix(v) for v in obj]
    if isinstance(obj, str) and obj in SOURCES:
        return str(MODELS / SOURCES[obj])
    return obj


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


results: dict[str, object] = {}


def run(name: str, kind: str, body: dict) -> None:
    rdir = RUNS / "recipes"
    rdir.mkdir(exist_ok=True)
    rpath = rdir / f"{name.replace('/', '__')}.yaml"
    rpath.write_text(yaml.safe_dump(body, sort_keys=False))
    out = RUNS / "out" / name.replace("/", "__")
    lines: list[str] = []
    try:
        if kind == "upcycle":
            run_upcycle(rpath, out, echo=lines.append, progress=False)
        else:
            run_graft(rpath, out, echo=lines.append, progress=False)
        results[name] = {"files": digest(out), "summary": [ln for ln in lines if not ln.startswith("wrote")]}
    except Exception as e:  # noqa: BLE001
        results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    print(name, "ERR " + results[name]["error"] if "error" in results[name] else len(results[name]["files"]),
          flush=True)


for kind in ("upcycle", "graft"):
    for p in sorted((ROOT / "recipes" / kind).glob("*.yaml")):
        body = fix(yaml.safe_load(p.read_text()))
        body.pop("output", None)
        run(f"shipped/{kind}/{p.stem}", kind, body)

# sweep: every target x every source x option set (errors recorded too)
TARGETS = ["mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "dots1", "ernie4_5_moe", "granitemoe",
           "granitemoeshared", "moemerge"]
OPTIONS = {
    "plain": {},
    "shared": {"shared_experts": 1, "shared_split": True},
    "dense1": {"dense_layers": 1},
    "every2": {"moe_layers": {"every": 2}},
    "list": {"moe_layers": [1, 3]},
    "list2": {"moe_layers": [0, 2]},
    "gran": {"granularity": 2, "num_experts": 8, "experts_per_token": 4},
    "router": {"router": {"scoring": "sigmoid", "groups": 2, "topk_groups": 1, "scaling": 2.5},
               "granularity": 2, "num_experts": 8, "experts_per_token": 4},
    "all": {"granularity": 2, "num_experts": 8, "experts_per_token": 4, "shared_experts": 2,
            "shared_split": True, "dense_layers": 1},
}
for tgt in TARGETS:
    for src in ("llama", "qwen2", "qwen3", "gemma3"):
        for oname, opts in OPTIONS.items():
            body = {"source": str(MODELS / src), "architecture": tgt, "num_experts": 4, "experts_per_token": 2,
                    "dtype": "float32", "seed": 3, **opts}
            run(f"sweep/{tgt}/{src}/{oname}", "upcycle", body)

# grafts of MoE outputs (dense-layer rewriting): drop 1 / expand 2 / slices
for name in sorted(n for n, r in results.items() if n.startswith("sweep/") and "files" in r
                   and n.split("/")[2] in ("llama", "qwen3") and n.split("/")[3] in ("plain", "dense1", "every2",
                                                                                   "list", "list2", "all")):
    src = RUNS / "out" / name.replace("/", "__")
    run(f"graft-{name}/expand", "graft", {"source": str(src), "expand": 2, "dtype": "source"})
    run(f"graft-{name}/slices", "graft", {"slices": [{"model": str(src), "layers": [0, 2]},
                                                     {"model": str(src), "layers": [1, 4]}], "dtype": "source"})
    run(f"graft-{name}/drop", "graft", {"source": str(src), "drop": 1, "dtype": "source"})

(WORK / "hashes.json").write_text(json.dumps(results, indent=1, sort_keys=True))
print("done", len(results))

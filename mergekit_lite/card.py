"""Model cards: README.md with Hugging Face Hub front matter, written by every command that writes a model.

The card is generated from the sidecar record (`moemerge.json`, see `provenance.py`) and the output
config. Our text lives between two HTML-comment markers; anything a user wrote outside them, and
any front-matter key we do not own, survives a rebuild (`--overwrite`) or a later step that writes
into the same folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from mergekit_lite.arch.tables import moe_counts, router_summary
from mergekit_lite.io.sidefiles import write_own_file
from mergekit_lite.models import is_moemerge, text_part
from mergekit_lite.plan import format_count

BEGIN = "<!-- moemerge:card:begin (generated; edits inside are replaced on the next build) -->"
END = "<!-- moemerge:card:end -->"
_BLOCK = re.compile(r"<!-- moemerge:card:begin[^\n]*-->.*?<!-- moemerge:card:end -->\n?", re.S)
_TMP = re.compile(r"^\.(?P<name>.+)\.moemerge-tmp-\d+$")
_HUB_CACHE = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")

STEP_TAGS = {"upcycle": ["moe", "upcycled"], "graft": ["depth-up-scaled"], "train": ["trained"]}
STEP_VERBS = {"upcycle": "upcycled into a Mixture-of-Experts", "graft": "depth-up-scaled / grafted",
              "train": "trained further"}
LICENSE_KEYS = ("license", "license_name", "license_link")


def final_name(folder: str | Path) -> str:
    """The folder's name once finished: `.NAME.moemerge-tmp-PID` (AtomicDir's temp folder) gives NAME."""
    m = _TMP.match(Path(folder).name)
    return m.group("name") if m else Path(folder).name


def hub_id(source: str) -> str | None:
    """The Hub repo id behind a source: a Hub cache snapshot path or an `org/name` string that is not a folder."""
    m = _HUB_CACHE.search(str(source))
    if m:
        return f"{m.group('org')}/{m.group('name')}"
    s = str(source)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists():
        return s
    return None


def lineage_sources(record: dict[str, Any]) -> list[str]:
    """Every input named in the lineage, oldest first: the original model(s), then each step's inputs."""
    seen: list[str] = []
    for step in record.get("lineage", []):
        for s in [step["model"]] if "model" in step else step.get("sources", []):
            if str(s) not in seen:
                seen.append(str(s))
    return seen


def front_matter(record: dict[str, Any], config: dict[str, Any], source: str | Path | None) -> dict[str, Any]:
    """Hub metadata: base model(s), library, tags, pipeline, licence carried from the source's card."""
    # The Hub rejects a base_model that is not a repo id, so local-only folders appear in the body only.
    bases = list(dict.fromkeys(h for s in lineage_sources(record) if (h := hub_id(s))))
    tags = ["mergekit-lite"]
    if moe_counts(config)[0]:
        tags.append("moe")
    if is_moemerge(config):
        tags.append("custom_code")  # the Hub's tag for folders that need trust_remote_code
    for step in record.get("lineage", []):
        tags += STEP_TAGS.get(step.get("step"), [])
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                             "tags": list(dict.fromkeys(tags))}
    if bases:
        front["base_model"] = bases
    front.update(source_license(record, source))
    return front


def source_license(record: dict[str, Any], source: str | Path | None) -> dict[str, Any]:
    """`license` (and `license_name`/`license_link` for `other`) from the nearest source card that has one."""
    for folder in [source, *reversed(lineage_sources(record))]:
        if folder is None or not (Path(folder) / "README.md").is_file():
            continue
        meta = read_card(Path(folder) / "README.md")[0]
        if meta.get("license"):
            return {k: meta[k] for k in LICENSE_KEYS if meta.get(k)}
    return {}


def read_card(path: Path) -> tuple[dict[str, Any], str]:
    """(front matter, body) of an existing card; a card with broken YAML keeps its body, loses its metadata."""
    card = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True)
    return card.data.to_dict(), card.text


def body_lines(name: str, record: dict[str, Any], config: dict[str, Any], folder: Path) -> list[str]:
    """The generated part of the card, between the markers."""
    lines = [BEGIN, f"# {name}", "", _summary(record, config), ""]
    lines += _model_table(record, config, folder)
    lines += _lineage(record)
    lines += _parity(record.get("parity"))
    lines += _training(record.get("training"), record.get("new_layers"))
    recipe = str(record.get("recipe", "")).rstrip()
    if recipe:
        lines += ["## Recipe", "", f"The `moemerge {record.get('kind', '')}` recipe, verbatim:", "",
                  "```yaml", recipe, "```", ""]
    lines += [*_how_to_load(name, is_moemerge(config)), END]
    return lines


def _summary(record: dict[str, Any], config: dict[str, Any]) -> str:
    """What this checkpoint is, and what was done to its source (in order), each said of what it applies to."""
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    lineage = record.get("lineage", [])
    steps = [STEP_VERBS.get(s.get("step"), s.get("step")) for s in lineage[1:]]
    made = (f"A `{arch}` checkpoint made with [mergekit-lite](https://pypi.org/project/mergekit-lite/) "
            f"(`moemerge {record.get('kind', '')}`).")
    if lineage and "model" in lineage[0] and steps:
        src = str(lineage[0]["model"])
        made += f" Its source, `{hub_id(src) or Path(src).name}`, was {', then '.join(steps)}."
    if is_moemerge(config):
        return made + (" Its MoE blocks are mergekit-lite's own classes, shipped as custom code in this folder "
                       "(`modeling_moemerge.py`): load it with `trust_remote_code=True` (mergekit-lite need not be "
                       "installed). vLLM and llama.cpp cannot read this architecture.")
    return made + " It loads with plain `transformers`; no custom code."


def _model_table(record: dict[str, Any], config: dict[str, Any], folder: Path) -> list[str]:
    total, active = record.get("total_params"), record.get("active_params")
    if total is None:
        total, active = _count_params(folder)
    config = text_part(config)
    experts = moe_counts(config)[0]
    rows = [("architecture", f"`{(config.get('architectures') or ['?'])[0]}` ({config.get('model_type')})"),
            ("layers", config.get("num_hidden_layers")), ("hidden size", config.get("hidden_size"))]
    if experts:
        rows.append(("experts", f"{experts} per MoE layer, top-{config.get('num_experts_per_tok')} routed per token"))
        rows.append(("router", router_summary(config) or "?"))
    if total is not None:
        rows.append(("parameters", f"{format_count(total)} total ({total:,})"))
    if active is not None and active != total:
        rows.append(("active per token", f"{format_count(active)} ({active:,})"))
    rows.append(("dtype", config.get("dtype") or config.get("torch_dtype") or "?"))
    return ["## Model", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _count_params(folder: Path) -> tuple[int | None, int | None]:
    """Fallback when the record has no counts: read them from the finished shards' headers."""
    from mergekit_lite.errors import MoemergeError
    from mergekit_lite.inspect_model import describe

    try:
        d = describe(folder)
    except MoemergeError:  # no weights yet (a card written before the shards): leave the row out
        return None, None
    return d["total_params"], d["active_params"]


def _lineage(record: dict[str, Any]) -> list[str]:
    steps = record.get("lineage", [])
    if not steps:
        return []
    lines = ["## Lineage", "", "Oldest first; each step names its recipe (sha256, first 16 hex digits).", ""]
    for n, step in enumerate(steps, 1):
        if "model" in step:
            lines.append(f"{n}. **{step.get('step', 'source')}**: {_where(step['model'])}")
        else:
            srcs = ", ".join(_where(s) for s in step.get("sources", []))
            lines.append(f"{n}. **{step.get('step')}** (recipe `{step.get('recipe_sha256', '?')}`, "
                         f"{step.get('tool', 'mergekit-lite')}) from {srcs}")
    return [*lines, ""]


def _where(source: str) -> str:
    h = hub_id(source)
    return f"[{h}](https://huggingface.co/{h})" if h else f"`{source}` (local folder)"


def _parity(parity: dict[str, Any] | None) -> list[str]:
    if not parity:
        return []
    top1 = parity.get("top1_agreement")
    # Pipes are escaped: a bare | would split the Markdown table cell.
    rows = [(r"max \|Δlogits\|", _num(parity.get("max_abs"))), (r"mean \|Δlogits\|", _num(parity.get("mean_abs"))),
            ("top-1 agreement", f"{top1:.2%}" if isinstance(top1, float) else _num(top1))]
    rows += [(k, _num(v)) for k, v in parity.items() if k not in ("max_abs", "mean_abs", "top1_agreement")]
    return ["## Step-0 parity", "", "Logits of this model against its source on sample text, before any training:",
            "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _training(training: dict[str, Any] | None, new_layers: list[int] | None) -> list[str]:
    lines: list[str] = []
    if training:
        lines += ["## Training", "", "| | |", "|---|---|",
                  *(f"| {k} | {_num(v)} |" for k, v in training.items() if not isinstance(v, (dict, list))), ""]
    if new_layers:
        lines += [f"New layers (not in the source): {', '.join(map(str, new_layers))}.", ""]
    return lines


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3e}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _how_to_load(name: str, custom_code: bool = False) -> list[str]:
    trust = ", trust_remote_code=True" if custom_code else ""
    note = (["The MoE blocks are custom code (`modeling_moemerge.py`, read it first): `trust_remote_code=True` is "
             "needed, and vLLM and llama.cpp cannot load this architecture.", ""] if custom_code else [])
    return ["## How to load", "", *note, "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model_id = "org/{name}"  # its Hub repo once pushed; or this folder\'s path, e.g. "./{name}"',
            "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            f'model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto"{trust})',
            'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))", "```", ""]


def write_card(folder: str | Path, record: dict[str, Any], config: dict[str, Any],
               source: str | Path | None = None, name: str | None = None) -> Path:
    """Write or update `folder/README.md` from the provenance record and the output config.

    Args:
        folder: the model folder, possibly AtomicDir's temporary `.NAME.moemerge-tmp-PID`.
        record: the sidecar record (kind, recipe, lineage, params, parity, training, new_layers).
        config: the output config.json as a dict.
        source: the folder side files were copied from; its card's licence is carried over.
        name: the card title; defaults to the final folder name.

    An existing card (in `folder`, or in the finished folder this one will replace) keeps the
    user's text outside our markers and every front-matter key we do not set; its `license` wins.
    """
    folder = Path(folder)
    name = name or final_name(folder)
    meta: dict[str, Any] = {}
    user_text = ""
    for existing in (folder / "README.md", folder.parent / name / "README.md"):
        if existing.is_file():
            meta, user_text = read_card(existing)
            user_text = _BLOCK.sub("", user_text).strip()
            break
    ours = front_matter(record, config, source)
    tags = list(dict.fromkeys([*(meta.get("tags") or []), *ours.pop("tags")]))
    merged = {**meta, **{k: v for k, v in ours.items() if not (k in LICENSE_KEYS and meta.get("license"))},
              "tags": tags}
    body = "\n".join(body_lines(name, record, config, folder))
    meta_yaml = ModelCardData(ignore_metadata_errors=True, **merged).to_yaml()
    text = f"---\n{meta_yaml}\n---\n\n{body}\n" + (f"\n{user_text}\n" if user_text else "")
    path = folder / "README.md"
    write_own_file(path, text)
    return path


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card as a dict (used by tests and `check`)."""
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text.split("\n---", 2)[0][4:]) or {}

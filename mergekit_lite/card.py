"""Model cards: README.md with Hugging Face Hub front matter, written by every command that writes a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TAGS = {"upcycle": ["moe", "upcycled"], "graft": ["depth-up-scaled"], "train": ["continued-pretraining"]}


def write_card(folder: str | Path, record: dict[str, Any], config: dict[str, Any],
               source: str | Path | None = None) -> None:
    """Write (or update) `folder/README.md` from the provenance record and the output config."""
    kind = record.get("kind", "model")
    bases = [s for step in record.get("lineage", []) for s in step.get("sources", [])][-1:] or []
    front = {"base_model": bases, "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["mergekit-lite", *TAGS.get(kind, [])]}
    body = [f"# {Path(folder).name}", "", f"Built with `moemerge {kind}`.", "", "## Recipe", "",
            "```yaml", str(record.get("recipe", "")).rstrip(), "```", ""]
    text = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)
    (Path(folder) / "README.md").write_text(text)

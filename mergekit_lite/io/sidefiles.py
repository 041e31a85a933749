"""Hugging Face side files: config.json, tokenizer, generation config, chat template, licence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mergekit_lite.io.safety import RECORD_FILE

# Files a model folder carries besides weights and config; copied verbatim when present.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
)


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer, generation config, chat template and licence files; returns their names."""
    from mergekit_lite.io.reader import file_in_folder

    src, dst = Path(src), Path(dst)
    copied = []
    for name in (*SIDE_FILES, *code_file_names(src)):
        if (src / name).is_file():  # a link leaving the source would copy a file from elsewhere: refused
            shutil.copy2(file_in_folder(src, name, f"side file {src / name}"), dst / name)
            copied.append(name)
    return copied


def code_file_names(folder: str | Path) -> list[str]:
    """The Python files config.json's `auto_map` names (custom code, e.g. moemerge's own classes), present in
    the folder. They travel with the model like the tokenizer; whether they may run is decided at load time
    (`mergekit_lite.models.trust_for`)."""
    folder = Path(folder)
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return []
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    names = {r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs}
    return sorted(n for n in names if (folder / n).is_file())


def write_config(folder: str | Path, config: dict[str, Any]) -> None:
    """Write config.json with sorted keys, as transformers does."""
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


SIDECAR = RECORD_FILE


def write_sidecar(folder: str | Path, record: dict[str, Any]) -> None:
    """How this folder was built (recipe, sources, options, lineage), read by `inspect` and cards."""
    write_own_file(Path(folder) / SIDECAR, json.dumps(record, indent=2, default=str) + "\n")


def write_own_file(path: Path, text: str) -> None:
    """Write a file of a model folder, never through a link (it could point anywhere on the machine)."""
    if path.is_symlink():
        from mergekit_lite.errors import MoemergeError

        raise MoemergeError(f"{path} is a link; moemerge does not write through links (it could change a file "
                            "outside the folder): replace it with a plain file (e.g. `cp --remove-destination`)")
    path.write_text(text, encoding="utf-8")


def finish_folder(folder: str | Path, config: dict[str, Any], side_files_from: str | Path | None,
                  record: dict[str, Any]) -> None:
    """Everything a model folder needs besides its weights and card: config, tokenizer & co, provenance.

    The commands write the model card (`card.write_card`) after this: io/ imports nothing above it.
    """
    write_config(folder, config)
    if side_files_from is not None:
        copy_side_files(side_files_from, folder)
    write_sidecar(folder, record)


def read_sidecar(folder: str | Path) -> dict[str, Any] | None:
    """The folder's `moemerge.json` record, or None when moemerge did not write it."""
    p = Path(folder) / SIDECAR
    return json.loads(p.read_text()) if p.is_file() else None

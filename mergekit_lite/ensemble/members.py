"""Member models of an ensemble: vocabularies checked from the tokenizers alone, then the weights loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import EnsembleRecipe


@dataclass
class Member:
    """One loaded member: its name as the recipe writes it, its folder and (once loaded) the model."""

    name: str
    folder: Path
    model: Any = None


def id_to_token(tokenizer) -> list[str | None]:
    """The tokenizer's vocabulary as a list indexed by token id (added tokens included; holes are None)."""
    vocab = tokenizer.get_vocab()
    table: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        table[i] = token
    return table


def first_difference(a: list[str | None], b: list[str | None]) -> int | None:
    """The first token id at which two vocabularies differ (a missing id counts), or None when equal."""
    for i in range(max(len(a), len(b))):
        if (a[i] if i < len(a) else None) != (b[i] if i < len(b) else None):
            return i
    return None


def check_vocabularies(names: list[str], tokenizers: list) -> int:
    """Refuse members whose tokenizers' vocabularies differ, naming the first differing token.

    Returns:
        The shared vocabulary size: logits are cut to it, so an embedding matrix padded beyond the
        tokenizer (to a multiple of 64, say) is fine.
    """
    ref = id_to_token(tokenizers[0])
    for j, tok in enumerate(tokenizers[1:], start=1):
        table = id_to_token(tok)
        i = first_difference(ref, table)
        if i is not None:
            theirs = repr(table[i]) if i < len(table) and table[i] is not None else "absent"
            ours = repr(ref[i]) if i < len(ref) and ref[i] is not None else "absent"
            raise MoemergeError(
                f"models[{j}] ({names[j]}): its vocabulary differs from models[0] ({names[0]}) at token id {i}: "
                f"{theirs} there, {ours} in models[0] ({len(table)} vs {len(ref)} ids); an ensemble needs one "
                "shared vocabulary: use models fine-tuned from one base")
    return len(ref)


def text_vocab_size(folder: Path) -> int | None:
    """`vocab_size` of a model folder's config.json (text part for multimodal ones)."""
    from mergekit_lite.io.reader import read_config

    from mergekit_lite.models import text_part

    return text_part(read_config(folder)).get("vocab_size")


def prepare_members(recipe: EnsembleRecipe, recipe_path: str | Path) -> tuple[list[Member], Any, int]:
    """Resolve every member and check tokenizers and configs, loading no weights.

    Returns:
        (members, the first member's tokenizer, the shared vocabulary size).
    """
    from transformers import AutoTokenizer

    from mergekit_lite.io import resolve_model_path
    from mergekit_lite.io.reader import refuse_leaving_links
    from mergekit_lite.ops.upcycle import resolve_relative

    members, tokenizers = [], []
    for j, (name, rev) in enumerate(zip(recipe.paths(), recipe.revisions())):
        folder = resolve_model_path(resolve_relative(name, recipe_path), rev)
        if not (folder / "config.json").is_file():
            raise MoemergeError(f"models[{j}]: {folder} has no config.json; point to a Hugging Face model folder")
        refuse_leaving_links(folder, f"models[{j}]")  # transformers would follow a link anywhere
        from mergekit_lite.models import trust_for

        trust_for(folder, recipe.trust_remote_code, f"models[{j}]")  # foreign custom code refused before any work
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(str(folder)))
        except Exception as e:  # noqa: BLE001 - any tokenizer failure is one user-facing line
            raise MoemergeError(f"models[{j}] ({name}): no usable tokenizer in {folder} ({type(e).__name__}); "
                                "the ensemble compares vocabularies through the tokenizers") from None
        members.append(Member(name, folder))
    vocab = check_vocabularies([m.name for m in members], tokenizers)
    for j, m in enumerate(members):
        size = text_vocab_size(m.folder)
        if size is not None and size < vocab:
            raise MoemergeError(f"models[{j}] ({m.name}): config vocab_size {size} is smaller than its tokenizer's "
                                f"{vocab} tokens; the model cannot score every token")
    return members, tokenizers[0], vocab


def load_members(members: list[Member], dtype: str, device: torch.device, trust_remote_code: bool = False) -> None:
    """Load each member's weights (eval mode) onto `device` in `dtype`."""
    from mergekit_lite.verify import load_model

    for m in members:
        m.model = load_model(m.folder, getattr(torch, dtype), device, trust_remote_code)


def read_prompts(spec: str | list[str] | None, recipe_path: str | Path) -> list[str]:
    """The prompts: a list from the recipe, a .jsonl file (`text` per line) or a text file (one per line)."""
    from mergekit_lite.ops.upcycle import resolve_relative

    if spec is None:
        raise MoemergeError("prompts: missing; add `prompts: prompts.txt` (one per line) or a list of strings, "
                            "or pass --score FILE")
    if isinstance(spec, list):
        prompts = [p for p in spec if p.strip()]
        where = "the list"
    else:
        path = Path(resolve_relative(spec, recipe_path))
        if not path.is_file():
            raise MoemergeError(f"prompts: file not found: {spec}; give a .txt (one prompt per line) or .jsonl file")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        prompts = [_jsonl_text(line, path, n) for n, line in enumerate(lines, 1)] if path.suffix == ".jsonl" else lines
        where = str(path)
    if not prompts:
        raise MoemergeError(f"prompts: {where} holds no prompt; write one prompt per line (or a `text` per JSONL row)")
    return prompts


def _jsonl_text(line: str, path: Path, n: int) -> str:
    try:
        row = json.loads(line)
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            return row["text"]
    except ValueError:
        pass
    raise MoemergeError(f"prompts: {path} line {n} is not a JSON object with a string `text`: {line[:60]!r}")

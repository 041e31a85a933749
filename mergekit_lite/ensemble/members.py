"""Member models of an ensemble: vocabularies checked from the tokenizers alone, then the weights loaded.

A member is a Hugging Face model folder (or Hub id), or a `.gguf` file (transformers dequantises it on load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import EnsembleMember, EnsembleRecipe
from mergekit_lite.recipe.ensemble import TEXT_METHODS


@dataclass
class Member:
    """One member: its name as the recipe writes it, its folder (and GGUF file), tokenizer and (once loaded) model."""

    name: str
    folder: Path
    gguf: str | None = None  # a GGUF file inside `folder`, read alone (config and tokenizer from it)
    tokenizer: Any = None
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


def resolve_member(spec: EnsembleMember, recipe_path: str | Path, where: str,
                   tokenizers: dict | None = None, trust_remote_code: bool = False) -> Member:
    """A member's folder (or GGUF file) found and checked, and its tokenizer loaded; no weights are read.

    Args:
        spec: the member as the recipe writes it.
        recipe_path: relative paths are taken from the working directory, else from beside the recipe.
        where: how errors name the member (`models[1]`, `fuser`).
        tokenizers: tokenizers already loaded, by folder and GGUF file (several members may name one model).
        trust_remote_code: run a folder's custom code that is not this version's own moemerge code.
    """
    from transformers import AutoTokenizer

    from mergekit_lite.io import resolve_model_path
    from mergekit_lite.io.reader import refuse_leaving_links
    from mergekit_lite.recipe.paths import resolve_relative

    resolved = resolve_relative(spec.model, recipe_path)
    given = Path(resolved).expanduser()
    if given.suffix == ".gguf" and given.is_file():
        member = Member(spec.model, given.parent, given.name)
    else:
        folder = resolve_model_path(resolved, spec.revision)
        if not (folder / "config.json").is_file():
            raise MoemergeError(f"{where}: {folder} has no config.json; point to a Hugging Face model folder "
                                "or a .gguf file")
        refuse_leaving_links(folder, where)  # transformers would follow a link anywhere
        from mergekit_lite.models import trust_for

        trust_for(folder, trust_remote_code, where)  # foreign custom code refused before any work
        member = Member(spec.model, folder)
    extra = {"gguf_file": member.gguf} if member.gguf else {}
    key = (member.folder.resolve(), member.gguf)
    tokenizers = {} if tokenizers is None else tokenizers
    try:
        if key not in tokenizers:
            tokenizers[key] = AutoTokenizer.from_pretrained(str(member.folder), **extra)
        member.tokenizer = tokenizers[key]
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is one user-facing line
        raise MoemergeError(f"{where} ({spec.model}): no usable tokenizer in {member.folder / (member.gguf or '')} "
                            f"({type(e).__name__}); the ensemble reads and writes text through it") from None
    if member.gguf is None:
        size = text_vocab_size(member.folder)
        if size is not None and size < len(member.tokenizer):
            raise MoemergeError(f"{where} ({spec.model}): config vocab_size {size} is smaller than its tokenizer's "
                                f"{len(member.tokenizer)} tokens; the model cannot score every token")
    return member


def prepare_members(recipe: EnsembleRecipe, recipe_path: str | Path, tokenizers: dict | None = None
                    ) -> tuple[list[Member], Any, int | None]:
    """Resolve every member and check tokenizers and configs, loading no weights.

    Methods that combine distributions (probs, logits) or compare token ids (vote) need one vocabulary;
    exchange and fuse pass text between the members, whose tokenizers may differ.

    Args:
        recipe: the validated ensemble recipe.
        recipe_path: the recipe file (relative member paths are also looked up beside it).
        tokenizers: filled with the tokenizers loaded, by folder and GGUF file (pass it on for the fuser).

    Returns:
        (members, the first member's tokenizer, the shared vocabulary size, or None for exchange and fuse).
    """
    tokenizers = {} if tokenizers is None else tokenizers
    members = [resolve_member(spec, recipe_path, f"models[{j}]", tokenizers, recipe.trust_remote_code)
               for j, spec in enumerate(recipe.models)]
    if recipe.method in TEXT_METHODS:
        return members, members[0].tokenizer, None
    vocab = check_vocabularies([m.name for m in members], [m.tokenizer for m in members])
    return members, members[0].tokenizer, vocab


def load_members(members: list[Member], dtype: str, device: torch.device, trust_remote_code: bool = False) -> None:
    """Load each member's weights (eval mode) onto `device` in `dtype`; members naming one model share it."""
    from mergekit_lite.verify import load_model

    loaded: dict[tuple[Path, str | None], Any] = {}
    for m in members:
        key = (m.folder.resolve(), m.gguf)
        if key not in loaded:  # one model asked with different seeds or system prompts is held once
            loaded[key] = load_model(m.folder, getattr(torch, dtype), device, gguf_file=m.gguf,
                                     trust_remote_code=trust_remote_code)
        m.model = loaded[key]


def read_prompts(spec: str | list[str] | None, recipe_path: str | Path) -> list[str]:
    """The prompts: a list from the recipe, a .jsonl file (`text` per line) or a text file (one per line)."""
    from mergekit_lite.recipe.paths import resolve_relative

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

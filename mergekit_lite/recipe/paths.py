"""Paths written in a recipe: relative ones are taken from the working directory, else from the recipe's folder.

One rule for every command (upcycle, graft, train, ensemble), so a recipe shipped beside its models runs from
anywhere while a path that already resolves from where the user stands keeps meaning what it meant. Absolute
paths, Hub ids and anything that resolves from neither place are returned unchanged (a Hub id is then fetched,
a missing path is reported by the command that reads it).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from mergekit_lite.recipe.train import TrainRecipe

_GLOB_CHARS = "*?["


def _exists(path: Path) -> bool:
    """A file or folder, or a glob pattern matching at least one (train's data entries may be globs)."""
    text = str(path)
    if any(ch in text for ch in _GLOB_CHARS):
        return bool(glob.glob(text, recursive=True))
    return path.exists()


def resolve_relative(source: str, recipe_path: str | Path) -> str:
    """A relative path that exists from the working directory is kept; else one beside the recipe wins.

    Args:
        source: the path (or Hub id, or glob) as written in the recipe.
        recipe_path: the recipe file it was read from.

    Returns:
        `source` itself, or the path joined to the recipe's folder when only that one exists.
    """
    p = Path(source).expanduser()
    if p.is_absolute() or _exists(p):
        return source
    beside = Path(recipe_path).parent / p
    return str(beside) if _exists(beside) else source


def resolve_train_paths(recipe: TrainRecipe, recipe_path: str | Path) -> TrainRecipe:
    """`model`, `data.train` and `data.validation` of a train recipe, resolved like upcycle's `source`.

    `output` stays relative to the working directory, as for every command (and `-o` overrides it).
    """
    data: dict[str, Any] = {"train": [resolve_relative(s, recipe_path) for s in recipe.data.train]}
    if recipe.data.validation:
        data["validation"] = [resolve_relative(s, recipe_path) for s in recipe.data.validation]
    return recipe.model_copy(update={"model": resolve_relative(recipe.model, recipe_path),
                                     "data": recipe.data.model_copy(update=data)})

"""A real English corpus available on every machine: the Python standard library's docstrings."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
           "json", "logging", "os", "pathlib", "random", "re", "shutil", "sqlite3", "statistics", "string",
           "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.request", "zipfile")


def stdlib_docstrings(modules: tuple[str, ...] = MODULES) -> list[str]:
    """Module, class and function docstrings (one paragraph-joined document each), in a fixed order."""
    docs: list[str] = []
    for name in modules:
        mod = importlib.import_module(name)
        # submodules are left out: which of them are attributes depends on what else the process imported,
        # and the corpus (hence the tokenizer and every test figure) must be the same in every process
        objs = [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if obj is mod or inspect.isclass(obj) or inspect.isroutine(obj) else None
            if doc and len(doc) > 80 and doc not in docs:
                docs.append(" ".join(doc.split()))
    return docs


def write_corpus(folder: str | Path, val_fraction: float = 0.1) -> tuple[Path, Path]:
    """train.txt and val.txt (one document per line), split by document."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = stdlib_docstrings()
    cut = int(len(docs) * (1 - val_fraction))
    train, val = folder / "train.txt", folder / "val.txt"
    train.write_text("\n".join(docs[:cut]) + "\n")
    val.write_text("\n".join(docs[cut:]) + "\n")
    return train, val

"""Helpers several test modules share (import them as `from helpers import ...`; tests/ is on the path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors shards, by key."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def die_at_first_checkpoint(monkeypatch: pytest.MonkeyPatch, start: Callable[[], object]) -> None:
    """Run `start()` (a `train` call) until its first checkpoint is on disk, then kill it there, as a Ctrl-C
    would; the real checkpoint writer is back in place afterwards, for the `--resume` that follows."""
    import mergekit_lite.train.loop as loop

    real = loop.save_checkpoint

    def crash(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        start()
    monkeypatch.setattr(loop, "save_checkpoint", real)

"""Training the blocks an upcycle grew (issue 27): `trainable: added`, PEER expert usage, active parameters.

`trainable: added` is the PEER paper's lifelong-learning recipe: freeze what exists, train what was added. The
upcycle records the keys it created rather than copied (block tensors and routers) in the folder's moemerge.json
(`added`); only those parameters train, so every source tensor stays bit-identical.

PEER's retrieval picks a few of up to a million experts per token; `PeerUsage` counts, per PEER layer, how often
each expert was retrieved since the last log line (a forward hook on the retrieval module, counted in place: no
N-sized temporary per call) and reports the share of the N experts retrieved at least once and the entropy of the
usage distribution (nats; log N when every expert is used equally).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.sidefiles import read_sidecar


def added_keys(model_dir: Path) -> list[str]:
    """The tensors the upcycle that made `model_dir` created; refused when it records none."""
    keys = (read_sidecar(model_dir) or {}).get("added") or []
    if not keys:
        raise MoemergeError(f"trainable = 'added' but {model_dir}/moemerge.json records no added tensors (a dense "
                            "model, or one not made by `moemerge upcycle`); upcycle it first (e.g. block: {kind: "
                            "peer}), or pick another trainable mode")
    return keys


def select_added(model: nn.Module, keys: list[str]) -> list[nn.Parameter]:
    """Freeze every parameter but the recorded added ones; returns those left trainable."""
    wanted = set(keys)
    keep = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            keep.append(p)
    return keep


def _peer_modules(model: nn.Module) -> list[nn.Module]:
    from mergekit_lite.models.moemerge.modeling_moemerge import MoemergePeerRetrieval

    return [m for m in model.modules() if isinstance(m, MoemergePeerRetrieval)]


class PeerUsage:
    """Per-expert retrieval counts of every PEER layer of a model, read (and reset) at each log line.

    Only training forwards count (the retrieval module in train mode): validation is not training usage.
    """

    def __init__(self, model: nn.Module):
        mods: list[Any] = _peer_modules(model)  # MoemergePeerRetrieval modules
        n = mods[0].n ** 2 if mods else 0
        device = mods[0].sub_keys.device if mods else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        self.counts = torch.zeros(len(mods), n, device=device)  # (PEER layers, N) retrievals since the last read
        for i, m in enumerate(mods):
            m.register_forward_hook(self._hook(i))

    def __bool__(self) -> bool:
        return self.counts.shape[0] > 0

    def _hook(self, i: int):
        def count(module: nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            if module.training:
                idx = output[1].detach().reshape(-1)  # (T * heads * k,)
                self.counts[i].index_add_(0, idx.to(self.counts.device),
                                          torch.ones(idx.numel(), device=self.counts.device))
        return count

    def read(self, reduce=lambda t: t) -> dict[str, list[float]]:
        """{used: share of the N experts retrieved at least once, entropy: usage entropy (nats)} per PEER layer since
        the last read, summed over processes by `reduce` (every process must call it); then reset."""
        counts = reduce(self.counts)
        p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        out = {"used": (counts > 0).float().mean(-1).tolist(), "entropy": entropy.tolist(),
               "retrievals": counts.sum(-1).tolist()}
        self.counts.zero_()
        return out

    def to(self, device) -> "PeerUsage":
        """Move the counts to the device the prepared model runs on."""
        self.counts = self.counts.to(device)
        return self


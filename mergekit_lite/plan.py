"""A tensor plan: what every output tensor is, made from which source tensors, by which pure transform.

Plan builders (`ops/upcycle.py`, `ops/graft.py`) only read headers and configs; the executor
(`ops/execute.py`) turns a plan into entries for the one model writer (`io/writer.py`), which
reads and writes the tensor bytes one tensor at a time. A plan is printable, so
`--dry-run` shows exactly what would be written.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# recipe `dtype` names -> torch dtypes (`source` keeps each tensor's stored dtype)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Src:
    """A tensor of one input model: `model` indexes `Plan.sources`."""

    model: int
    key: str


@dataclass
class TensorOp:
    """One output tensor = transform(fn)(source tensors, args)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fn: str
    srcs: tuple[Src, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)
    role: str = ""  # for summaries: embed, attn, norm, expert, router, shared, head ...

    @property
    def numel(self) -> int:
        """Number of elements (the product of the shape)."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes the output tensor will occupy."""
        return self.numel * self.dtype.itemsize


@dataclass
class Plan:
    """Everything needed to write one output folder."""

    kind: str                              # upcycle | graft
    sources: list[Path]                    # input model folders, indexed by Src.model
    ops: list[TensorOp]
    config: dict[str, Any]                 # the output config.json
    side_files_from: Path                  # tokenizer etc. are copied from here
    active_params: int | None = None       # per token; None when the model is dense
    notes: list[str] = field(default_factory=list)   # warnings and parity remarks shown to the user
    record: dict[str, Any] = field(default_factory=dict)  # provenance stored in the output sidecar
    extra_files: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes (custom code of moemerge)

    @property
    def nbytes(self) -> int:
        """Bytes the output tensor will occupy."""
        return sum(op.nbytes for op in self.ops)

    @property
    def total_params(self) -> int:
        """Parameters of the output model: the elements of every planned tensor."""
        return sum(op.numel for op in self.ops)

    def numels(self) -> list[tuple[str, int]]:
        """(output key, element count) of every planned tensor, for `arch.params.param_counts`."""
        return [(op.key, op.numel) for op in self.ops]

    def role_counts(self) -> Counter:
        """How many ops of each (role, transform) kind the plan holds, for the dry-run summary."""
        return Counter((op.role, op.fn) for op in self.ops)

    def summary_lines(self, max_tensors: int = 0) -> list[str]:
        """Human-readable plan: sizes, parameters, what each kind of tensor is made from."""
        active = self.active_params if self.active_params is not None else self.total_params
        text = self.config.get("text_config") or {}  # moemerge keeps the dense config nested
        lines = [
            f"plan: {self.kind} -> {self.config.get('architectures', ['?'])[0]}",
            f"  sources: {', '.join(str(s) for s in self.sources)}",
            f"  layers: {self.config.get('num_hidden_layers') or text.get('num_hidden_layers')}",
            f"  tensors: {len(self.ops)}   output bytes: {format_bytes(self.nbytes)}",
            f"  parameters: total {format_count(self.total_params)}   active per token {format_count(active)}",
        ]
        for (role, fn), n in sorted(self.role_counts().items()):
            lines.append(f"    {n:6d} x {role or 'tensor'} <- {fn}")
        for op in self.ops[:max_tensors]:
            src = ", ".join(f"{s.model}:{s.key}" for s in op.srcs) or "-"
            lines.append(f"    {op.key} {list(op.shape)} {str(op.dtype).removeprefix('torch.')} = {op.fn}({src})")
        if max_tensors and len(self.ops) > max_tensors:
            lines.append(f"    ... {len(self.ops) - max_tensors} more (use --verbose for all)")
        if self.extra_files:
            lines.append(f"  files: {', '.join(sorted(self.extra_files))}")
        lines += [f"  note: {n}" for n in self.notes]
        return lines


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one random choice, independent of the order tensors are written in."""
    h = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def format_bytes(n: float) -> str:
    """Bytes in decimal units as people read them (`1.23 GB`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def format_count(n: float) -> str:
    """A parameter count in K/M/B (`1.09M`)."""
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return str(n)

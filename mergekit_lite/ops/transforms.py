"""Pure tensor transforms a plan refers to by name: (inputs, shape, dtype, args) -> tensor.

They never do IO. Random transforms draw from a generator seeded by the op's own `seed` argument,
so the output is the same whatever order or process writes it. Random values are drawn in
float32 on the CPU and then cast, so a seed gives the same numbers on every machine and dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Transform = Callable[[list[torch.Tensor], tuple[int, ...], torch.dtype, dict[str, Any]], torch.Tensor]
TRANSFORMS: dict[str, Transform] = {}


def transform(name: str) -> Callable[[Transform], Transform]:
    def register(fn: Transform) -> Transform:
        TRANSFORMS[name] = fn
        return fn
    return register


def generator(args: dict[str, Any]) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(args["seed"]))
    return g


@transform("copy")
def _copy(xs, shape, dtype, args):
    return xs[0].to(dtype)  # no copy when the dtype already matches: shares the source memory


@transform("zeros")
def _zeros(xs, shape, dtype, args):
    return torch.zeros(shape, dtype=dtype)


@transform("normal")
def _normal(xs, shape, dtype, args):
    return (torch.randn(shape, generator=generator(args)) * args["std"]).to(dtype)


@transform("uniform")
def _uniform(xs, shape, dtype, args):
    b = args["bound"]
    return (torch.rand(shape, generator=generator(args)) * (2 * b) - b).to(dtype)

"""Pure tensor transforms a plan refers to by name: (inputs, shape, dtype, args) -> tensor.

They never do IO. Random transforms draw from a generator seeded by the op's own `seed` argument,
so the output is the same whatever order or process writes it. Random values are drawn in
float32 on the CPU and then cast, so a seed gives the same numbers on every machine and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergekit_lite.io.pool import release_freed_memory

Transform = Callable[[list[torch.Tensor], tuple[int, ...], torch.dtype, dict[str, Any]], torch.Tensor]
TRANSFORMS: dict[str, Transform] = {}


def transform(name: str) -> Callable[[Transform], Transform]:
    """Register a tensor transform under `name`, the name plan ops refer to (so plans stay printable data)."""
    def register(fn: Transform) -> Transform:
        TRANSFORMS[name] = fn
        return fn
    return register


def generator(args: dict[str, Any]) -> torch.Generator:
    """A CPU generator seeded from the op's args, so every tensor's random draw is reproducible on its own."""
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


# --- advanced upcycling (granular experts, Drop-Upcycling, noise, BTX averaging, prompt routers) ---

@transform("ffn_part")
def _ffn_part(xs, shape, dtype, args):
    """Channels [start, start+size) (mod I) of one FFN matrix, then drop / scale / noise.

    `axis` is the intermediate axis: 0 for gate/up (I, H), 1 for down (H, I). Drop-Upcycling re-draws
    `drop.ratio` of the taken channels from N(mean, std) of the *whole* source matrix; the channel choice is
    seeded per (layer, expert), so gate, up and down re-initialise the same channels.
    """
    w = xs[0]
    axis, n_total = args["axis"], xs[0].shape[args["axis"]]
    idx = (torch.arange(args["size"]) + args["start"]) % n_total
    part = w.index_select(axis, idx).float()  # (size, H) or (H, size)
    # in place where it computes the same numbers: one float32 temporary of the part at a time, not three
    # (fused experts compute E x 2 parts per tensor; tests/test_memory.py bounds the peak)
    drop = args.get("drop")
    if drop:
        n_drop = int(round(drop["ratio"] * args["size"]))
        chosen = torch.randperm(args["size"], generator=generator({"seed": drop["channel_seed"]}))[:n_drop]
        src = w.float()
        std, mean = src.std(), src.mean()
        del src  # the whole source matrix in float32: freed before the fresh values are drawn
        fresh_shape = (n_drop, part.shape[1]) if axis == 0 else (part.shape[0], n_drop)
        fresh = torch.randn(fresh_shape, generator=generator({"seed": drop["value_seed"]})).mul_(std).add_(mean)
        part.index_copy_(axis, chosen, fresh)
        del fresh
    if args.get("scale", 1.0) != 1.0:
        part.mul_(args["scale"])
    if args.get("noise"):
        sigma = args["noise"]["sigma"] * part.std()
        part.add_(torch.randn(part.shape, generator=generator(args["noise"])).mul_(sigma))
    return part.to(dtype)


@transform("router_groups")
def _router_groups(xs, shape, dtype, args):
    """Random router whose rows repeat in groups of `groups` (tied scores for the slices of one copy)."""
    G = args["groups"]
    rows = (shape[0] // G, shape[1])  # (copies, H)
    if args["init"] == "normal":
        r = torch.randn(rows, generator=generator(args)) * args["std"]
    else:
        r = torch.rand(rows, generator=generator(args)) * (2 * args["bound"]) - args["bound"]
    return r.repeat_interleave(G, dim=0).to(dtype)  # (copies * G, H)


@transform("router_rows")
def _router_rows(xs, shape, dtype, args):
    """Router rows computed before writing (prompt-based init), each repeated `groups` times."""
    rows = args.get("rows")
    if rows is None:
        raise AssertionError("router_rows: the prompt-based rows were not computed before execute()")
    return rows.float().repeat_interleave(args["groups"], dim=0).to(dtype)  # (copies, H) -> (E, H)


@transform("mean")
def _mean(xs, shape, dtype, args):
    """Element-wise mean of same-shaped tensors (Branch-Train-MiX averaging of non-expert weights)."""
    acc = torch.zeros(shape, dtype=torch.float32)
    for x in xs:
        acc += x.float()
    return (acc / len(xs)).to(dtype)


# --- target layouts that differ from the per-expert Hub layout (ops/plan_transforms.py writes these ops) ---

@transform("rope_interleave")
def _rope_interleave(xs, shape, dtype, args):
    """q/k rows (weight (heads*d, H) or bias (heads*d,)) reordered per head for an interleaved RoPE.

    Llama/Qwen rotate channel pairs (j, j + d/2) by frequency j; ERNIE-4.5 rotates (2j, 2j + 1). Row
    2j of a head takes row j, row 2j + 1 takes row j + d/2: the same rotation, so q.k is unchanged.
    `of`/`of_args` is the op this wraps (copy, mean ...).
    """
    w = TRANSFORMS[args["of"]](xs, shape, dtype, args["of_args"])
    d = args["head_dim"]
    half = torch.arange(d // 2)
    perm = torch.stack([half, half + d // 2], dim=1).reshape(-1)  # (d,): 0, d/2, 1, d/2+1, ...
    heads = w.shape[0] // d
    per_head = w.reshape(heads, d, *w.shape[1:])  # (heads*d, ...) -> (heads, d, ...)
    return per_head.index_select(1, perm).reshape(w.shape)


@transform("fused")
def _fused(xs, shape, dtype, args):
    """A fused tensor made of per-expert ops (`fn`, `args`, indices into `xs`), in order, never stacked.

    Plain copies come back as a list of parts written back to back: views of the memory-mapped source
    (or of its one cached cast), so E copies of one FFN cost no memory; with a leading expert axis
    (`per_expert`) each gets a leading 1: gate (I, H) -> (1, I, H). Computed parts (slices, noise,
    drop) are made one at a time straight into the output tensor, so their float32 temporaries are
    freed before the next part: holding every part until the write fragmented the heap (measured: 4x
    the tensor's size in anonymous memory).
    """
    def part(p):
        return TRANSFORMS[p["fn"]]([xs[j] for j in p["srcs"]], tuple(p["shape"]), dtype, p["args"])

    if all(p["fn"] == "copy" for p in args["parts"]):
        return [part(p).unsqueeze(0) if args["per_expert"] else part(p) for p in args["parts"]]
    out = torch.empty(shape, dtype=dtype)
    flat, pos = out.view(-1), 0
    for p in args["parts"]:
        t = part(p).reshape(-1)
        flat[pos:pos + t.numel()].copy_(t)
        pos += t.numel()
        del t
        release_freed_memory()  # this part's temporaries, before the next part's
    return out

"""Where every expert's channels come from: the advanced upcycling options as pure data.

No IO here. Given the recipe and the dense FFN size, `make_layout` decides which intermediate
channels of which source each expert (and the shared expert) takes, with what down-projection scale,
noise and drop ratio, and which layers become MoE. The planner turns that into tensor ops.

Channel maths (I = dense intermediate size, G = granularity, n = shared_experts, u = expert size):
  * without `shared_split`: u = I / G; fine expert e = copy c * G + slice s takes channels
    [s*u, (s+1)*u) of copy c's source FFN. With the G router rows of a copy identical, top-k with
    k = m*G selects m whole copies; the renormalised weights of a copy's G slices are equal and sum
    (over the m copies) to 1, so the output is (1/G) * sum_copies w_c * FFN(x): down_proj x G restores it.
  * with `shared_split`: the dense FFN is cut into n + G units of u = I / (n + G) channels; the first
    n units form the shared expert (down_proj x 2 cancels its sigmoid(0) = 0.5 gate), the other G the
    routed slices (down_proj x G as above). shared + routed = the dense FFN exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mergekit_lite.arch.tables import MOE, MoEFamily
from mergekit_lite.errors import MoemergeError
from mergekit_lite.recipe import MoEEvery, UpcycleRecipe


@dataclass(frozen=True)
class ExpertSpec:
    """Where one expert's weights come from: channels [start, start+size) (mod I) of a source model's FFN."""

    model: int = 0            # index into Plan.sources
    start: int = 0            # first intermediate channel taken from the dense FFN
    size: int | None = None   # channels taken; None: the whole FFN
    scale: float = 1.0        # factor on down_proj (compensates top-k sharing or a sigmoid gate)
    noise: float = 0.0        # relative gaussian noise (x each matrix's std)
    drop_ratio: float = 0.0   # Drop-Upcycling: fraction of this expert's channels re-initialised
    copy: int = 0             # which copy (experts: entry) this fine expert belongs to
    slice: int = 0            # which of the G slices

    def is_plain_copy(self, intermediate: int) -> bool:
        """True when the expert is the whole dense FFN unchanged, so it can be written as a view of the source."""
        return (self.start == 0 and self.size in (None, intermediate) and self.scale == 1.0
                and not self.noise and not self.drop_ratio)


@dataclass
class Layout:
    """The whole MoE layout of one upcycle: expert specs, shared expert, MoE layers."""

    intermediate: int              # dense FFN size I
    expert_size: int               # u: channels per routed expert
    experts: list[ExpertSpec]      # one per fine expert, e = copy * G + slice
    shared: ExpertSpec | None      # the Qwen2-MoE shared expert (None: none / size 0)
    moe_layers: list[int]          # layers that become MoE; the others keep a dense FFN

    @property
    def shared_size(self) -> int:
        """Intermediate channels of the shared expert (0 when there is none)."""
        return self.shared.size if self.shared else 0


def _families_with(test) -> str:
    return " / ".join(sorted(t for t, f in MOE.items() if test(f)))


def select_moe_layers(spec: Literal["all"] | MoEEvery | list[int], n_layers: int, fam: MoEFamily,
                      dense_layers: int = 0) -> list[int]:
    """The MoE layer indices for `moe_layers` / `dense_layers`, refusing what the target cannot express.

    The family's dense-layer scheme decides: whether any layer may stay dense (`any_dense`), whether any set
    may (`free`, else only `dense_layers: k`), and whether its config fields can say exactly these (`encode`).
    """
    scheme = fam.dense_layers
    if dense_layers:
        if not scheme.any_dense:
            raise MoemergeError(f"dense_layers={dense_layers}: {fam.model_type} has no dense layers (every layer is "
                                f"MoE); remove dense_layers, or use architecture: "
                                f"{_families_with(lambda f: f.dense_layers.any_dense)}")
        if dense_layers >= n_layers:
            raise MoemergeError(f"dense_layers={dense_layers}: the source has {n_layers} layers, so no layer would be "
                                f"MoE; use dense_layers between 0 and {n_layers - 1}")
        return list(range(dense_layers, n_layers))
    if spec == "all":
        return list(range(n_layers))
    if not scheme.any_dense:
        raise MoemergeError(f"moe_layers={_show(spec)}: {fam.model_type} has no dense layers (every layer is MoE); "
                            f"use moe_layers: all, or architecture: "
                            f"{_families_with(lambda f: f.dense_layers.free)} (mlp_only_layers)")
    if not scheme.free:
        raise MoemergeError(f"moe_layers={_show(spec)}: only the first layers can stay dense in "
                            f"{fam.model_type} ({scheme.fields_text}); use dense_layers: k instead")
    if isinstance(spec, MoEEvery):
        layers = [i for i in range(n_layers) if (i + 1) % spec.every == 0]
    else:
        bad = [i for i in spec if i >= n_layers]
        if bad:
            raise MoemergeError(f"moe_layers={spec}: layers {bad} do not exist (the source has {n_layers} layers, "
                                f"0..{n_layers - 1})")
        layers = sorted(spec)
    if not layers:
        raise MoemergeError(f"moe_layers={_show(spec)} selects no layer of {n_layers}; choose a smaller `every`")
    if scheme.encode(layers, n_layers) is None:
        raise MoemergeError(f"moe_layers={layers}: {fam.model_type} {scheme.pattern} ({scheme.fields_text}), which "
                            "cannot give these; use dense_layers: k, moe_layers: {every: k} or a contiguous range")
    return layers


def _show(spec) -> str:
    return f"{{every: {spec.every}}}" if isinstance(spec, MoEEvery) else str(spec)


def make_layout(r: UpcycleRecipe, fam: MoEFamily, intermediate: int, n_layers: int,
                copy_models: list[int], source_type: str | None = None) -> Layout:
    """Channel ranges, scales and per-expert options for every expert; `copy_models[c]` is copy c's source.
    `source_type` (the dense model_type) keeps hints to the targets that accept that source."""
    G, n, I = r.granularity, r.shared_experts, intermediate
    if n and not fam.shared:
        raise MoemergeError(f"shared_experts={n}: {fam.model_type} has no shared expert; use architecture: "
                            f"{_families_with(lambda f: f.shared and source_type in (None, *f.sources))}, "
                            "or remove shared_experts")
    units = G + n if r.shared_split else G
    if I % units:
        divisors = [d for d in range(1, min(I, 64) + 1) if I % d == 0]
        if r.shared_split:  # the field to change, and values that work with the other one kept
            fits = [d - G for d in divisors if d > G][:4]
            fix = (f"set shared_experts to one of {fits}" if fits else "lower granularity") + \
                  f" (granularity + shared_experts must divide {I}: {divisors})"
            what = f"granularity + shared_experts = {G} + {n} = {units}"
        else:
            fix, what = f"set granularity to one of {divisors}", f"granularity={G}"
        raise MoemergeError(f"{what} does not divide the source's intermediate_size {I}; {fix}")
    u = I // units
    routed_start = n * u if r.shared_split else 0
    experts = []
    for e in range(r.num_experts):
        c, s = divmod(e, G)
        item = r.experts[c] if r.experts else None
        noise = item.noise if item and item.noise is not None else r.noise
        drop = item.drop_ratio if item and item.drop_ratio is not None else r.drop_ratio
        # down x G restores the G slices' 1/G weights; x 1/scaling undoes routed_scaling_factor (renormalised)
        experts.append(ExpertSpec(model=copy_models[c], start=routed_start + s * u, size=u,
                                  scale=float(G) / (r.router.scaling or 1.0),
                                  noise=noise, drop_ratio=drop, copy=c, slice=s))
    shared = None
    if n and fam.shared:
        # split: units 0..n-1, down x2 against a gate of sigmoid(0) = 0.5 (an ungated shared expert needs no
        # factor); otherwise units j = slice j mod G, as is
        shared = ExpertSpec(model=0, start=0, size=n * u, scale=fam.shared.down_scale(r.shared_split))  # base model
    return Layout(I, u, experts, shared, select_moe_layers(r.moe_layers, n_layers, fam, r.dense_layers))


def parity_notes(r: UpcycleRecipe, lay: Layout, n_layers: int, narrowing: str | None = None,
                 fam: MoEFamily | None = None) -> list[str]:
    """What the options do to step-0 parity, in plain words for --dry-run.

    Args:
        r: the validated recipe (granularity, shared experts, noise, drop, layers).
        lay: the expert layout computed from it (expert and shared sizes).
        n_layers: decoder layers of the source, to tell a partial MoE from a full one.
        narrowing: "float32 -> bfloat16" when the output dtype is less precise than the source's; the parity
            promise then holds only against the source rounded to that dtype, and says so.
        fam: the target family (how its shared expert is gated, how it names dense layers).
    """
    G, notes = r.granularity, []
    gated = fam is None or bool(fam.shared and fam.shared.gated)
    if G > 1:
        notes.append(f"granularity {G}: {r.num_experts} fine experts = {r.num_experts // G} copies x {G} slices of "
                     f"{lay.expert_size} channels; router rows tied within a copy and down_proj x {G}, so top-"
                     f"{r.experts_per_token} picks {r.experts_per_token // G} whole copies")
    if lay.shared and r.shared_split and not gated:
        notes.append(f"shared expert: dense FFN split into {r.shared_experts} shared + {G} routed units of "
                     f"{lay.expert_size} channels; the shared expert is ungated (added as is), so no factor: "
                     "parity kept")
    elif lay.shared and r.shared_split:
        notes.append(f"shared expert: dense FFN split into {r.shared_experts} shared + {G} routed units of "
                     f"{lay.expert_size} channels; shared gate zero (sigmoid 0.5) and its down_proj x 2: parity kept")
    elif lay.shared:
        gate = "gate zero = sigmoid 0.5" if gated else "ungated"
        notes.append(f"shared expert ({lay.shared_size} channels copied from the dense FFN, {gate}) "
                     "is ADDED to the routed output: step-0 logits differ from the dense model; set "
                     "shared_split: true to keep parity")
    if len(lay.moe_layers) < n_layers:
        dense = sorted(set(range(n_layers)) - set(lay.moe_layers))
        field = fam.dense_layers.fields_text if fam else "mlp_only_layers"
        notes.append(f"partial MoE: MoE layers {lay.moe_layers}; dense FFN kept in layers {dense} ({field})")
    if r.router.init == "hidden":
        notes.append("router rows: mean hidden state at each FFN input over each expert's prompts (computed on "
                     "the base model when writing; use --device)")
    breakers = []
    if any(x.noise for x in lay.experts):
        breakers.append("expert noise")
    if any(x.drop_ratio for x in lay.experts):
        breakers.append("Drop-Upcycling")
    if len({x.model for x in lay.experts}) > 1:
        breakers.append("experts from different models")
    if r.non_expert == "average" and r.experts and len({x.model for x in lay.experts}) > 1:
        breakers.append("averaged attention/norms/embeddings")
    if r.num_experts == 1:
        notes.append("num_experts: 1: every token goes to the one expert, so this MoE computes the dense model with "
                     "a router that changes nothing and cannot learn to route; use 2 or more experts")
    if breakers:
        notes.append(f"{', '.join(breakers)}: experts are no longer identical, so step-0 logits differ from the "
                     "dense model (by design)")
    elif not (lay.shared and not r.shared_split):
        if narrowing:
            notes.append(f"identical experts, but weights rounded {narrowing}: step-0 logits equal those of the "
                         "dense model rounded the same way, not the source's own (`moemerge verify` against the "
                         "source shows the rounding; `dtype: source` keeps exact parity)")
        else:
            notes.append("identical experts: step-0 logits equal the dense model's (check with `moemerge verify`)")
    return notes

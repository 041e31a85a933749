"""`moemerge graft` recipes: layer slices of one or more models stacked into a new model."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from mergekit_lite.recipe.base import ByteSize, DType, Strict


class GraftSlice(Strict):
    """A run of consecutive decoder layers taken from one model."""

    model: str = Field(description="model folder (or Hub id) the layers come from")
    layers: tuple[int, int] = Field(description="half-open range [start, end): layers start .. end-1")
    identity: bool = Field(False, description="write these copies as identity blocks (o_proj and FFN down zeroed)")

    @field_validator("layers")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        start, end = v
        if start < 0:
            raise ValueError(f"start {start} is negative; layer indices start at 0")
        if end <= start:
            raise ValueError(f"range [{start}, {end}) is empty; ranges are half-open, write [{start}, {start + 1}] "
                             f"for layer {start} alone")
        return v


class GraftRecipe(Strict):
    """`moemerge graft`: layer slices of one or more models stacked into a new (usually deeper) model.

    Either `slices`, or `source` with one of `drop` (SOLAR depth up-scaling) or `expand`
    (LLaMA-Pro identity blocks), which the planner turns into slices once it knows the depth.
    """

    slices: list[GraftSlice] | None = Field(None, min_length=1)
    """layer runs stacked in order (instead of `source` with `drop`/`expand`)"""
    source: str | None = Field(None, description="the model for the `drop` / `expand` shorthands")
    drop: int | None = Field(None, ge=0, description="SOLAR: layers 0..n-m-1 of the model, then layers m..n-1")
    expand: int | None = Field(None, ge=1, description="LLaMA-Pro: insert this many identity blocks, spread evenly")
    embeddings_from: str = Field("first", description="first | last | a model path: where the embeddings come from")
    head_from: str = Field("last", description="first | last | a model path: final norm and lm_head")
    dtype: DType = "source"
    """float32, float16, bfloat16, or source (required when the models differ in dtype)"""
    output: str | None = None
    """output folder; -o/--output on the command line wins"""
    shard_size: ByteSize = "5GB"
    """shard cap, as for upcycle; --shard-size wins"""
    workers: int | None = Field(None, ge=1, description="writer threads (default: from the cores and the output disk)")

    @model_validator(mode="after")
    def _one_form(self) -> "GraftRecipe":
        if self.slices is not None:
            if self.source or self.drop is not None or self.expand is not None:
                raise ValueError("give either `slices`, or `source` with `drop` or `expand`, not both")
        elif not self.source or (self.drop is None) == (self.expand is None):
            raise ValueError("give `slices` (a list of {model, layers}), or `source` with exactly one of "
                             "`drop: m` or `expand: k`")
        return self

"""`moemerge ensemble` recipes: several models combined at inference instead of merged into one."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from mergekit_lite.recipe.base import Strict


class EnsembleMember(Strict):
    """One member model, with an optional fixed weight (`{model: path, weight: 0.7}`)."""

    model: str = Field(description="HF model folder (or Hub id when online)")
    weight: float | None = Field(None, ge=0, description="relative weight; normalised over the members")
    revision: str | None = None


class Generation(Strict):
    """How each answer is decoded from the combined next-token distribution."""

    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = Field(False, description="false: greedy (argmax); true: sample with temperature/top_p")
    temperature: float = Field(1.0, gt=0, description="divides the combined log-probabilities before sampling")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set holding top_p")
    seed: int = Field(0, description="sampling seed; prompt i uses seed + i, so answers do not depend on order")


class ScoreSettings(Strict):
    """`--score FILE`: how the text is packed (as `train` packs it) and batched."""

    seq_len: int = Field(128, ge=8, description="block length, as `seq_len` in a train recipe")
    batch_size: int = Field(8, ge=1, description="blocks per forward pass")
    text_field: str = Field("text", description="column holding the text in .jsonl/.parquet")


class EnsembleRecipe(Strict):
    """`moemerge ensemble`: probability / logit averaging, perplexity weights, or crowd vote."""

    models: list[EnsembleMember] = Field(min_length=1, description="paths/Hub ids or {model, weight}")
    method: Literal["probs", "logits", "vote"] = "probs"
    weights: Union[list[float], Literal["perplexity"], None] = Field(
        None, description="one number per model, or `perplexity` (softmax of -log ppl / temperature_ppl)")
    temperature_ppl: float = Field(1.0, gt=0, description="temperature of the perplexity weights")
    prompts: Union[str, list[str], None] = Field(None, description="a .txt file (one prompt a line), a .jsonl "
                                                                  "file (`text` per line), or a list of strings")
    generation: Generation = Generation()
    similarity: Literal["rouge_l", "token_f1"] = Field("rouge_l", description="vote: candidate similarity on tokens")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = Field(False, description="run custom code in member folders that is not this "
                                    "version's own moemerge code (read it first)")
    score: ScoreSettings = ScoreSettings()

    @field_validator("models", mode="before")
    @classmethod
    def _paths_are_members(cls, models: Any) -> Any:
        # a bare path is shorthand for {model: path}: one member type, so errors name `models.1.weight`
        return [{"model": m} if isinstance(m, str) else m for m in models] if isinstance(models, list) else models

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_spelling(cls, weights: Any) -> Any:
        if isinstance(weights, str) and weights != "perplexity":
            raise ValueError("write `perplexity` or a list of numbers, one per model")
        return weights

    @field_validator("models")
    @classmethod
    def _member_weights(cls, models: list) -> list:
        given = [m.weight is not None for m in models]
        if any(given) and not all(given):
            raise ValueError(f"{sum(given)} of {len(models)} models have a weight; give every model one, or none")
        return models

    @field_validator("method")
    @classmethod
    def _vote_needs_two(cls, method: str, info: ValidationInfo) -> str:
        if method == "vote" and len(info.data.get("models") or []) == 1:
            raise ValueError("'vote' needs at least 2 models (a lone candidate has no one to agree with); "
                             "add a model or use method: probs")
        return method

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights, info: ValidationInfo):
        models = info.data.get("models") or []
        if weights is not None and any(m.weight is not None for m in models):
            raise ValueError("weights are given per model too; keep one of the two")
        if weights is not None and info.data.get("method") == "vote":
            raise ValueError("'vote' counts every candidate equally; remove `weights`")
        if isinstance(weights, list):
            if models and len(weights) != len(models):
                raise ValueError(f"{len(weights)} weights for {len(models)} models; give one per model")
            if any(w < 0 for w in weights):
                raise ValueError("a weight is negative; weights must be >= 0")
            if sum(weights) <= 0:
                raise ValueError("the weights sum to 0; give at least one model a positive weight")
        return weights

    @model_validator(mode="after")
    def _inline_weights(self) -> "EnsembleRecipe":
        if self.method == "vote" and self.fixed_weights() is not None:
            raise ValueError("'vote' counts every candidate equally; remove the models' weights")
        if sum(self.fixed_weights() or [1.0]) <= 0:
            raise ValueError("the models' weights sum to 0; give at least one model a positive weight")
        return self

    def paths(self) -> list[str]:
        """The member models as written (paths or Hub ids), in order."""
        return [m.model for m in self.models]

    def revisions(self) -> list[str | None]:
        return [m.revision for m in self.models]

    def fixed_weights(self) -> list[float] | None:
        """The numeric weights (from `weights:` or per model), or None for equal / perplexity weights."""
        if isinstance(self.weights, list):
            return list(self.weights)
        inline = [m.weight for m in self.models]
        return [float(w) for w in inline] if all(w is not None for w in inline) else None

"""`moemerge ensemble` recipes: several models combined at inference instead of merged into one."""

from __future__ import annotations

import re
import string
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from mergekit_lite.recipe.base import Strict


class Generation(Strict):
    """How each answer is decoded from the combined next-token distribution."""

    max_new_tokens: int = Field(64, ge=1)
    """tokens generated per answer at most (an answer also ends at EOS)"""
    do_sample: bool = Field(False, description="false: greedy (argmax); true: sample with temperature/top_p")
    temperature: float = Field(1.0, gt=0, description="divides the combined log-probabilities before sampling")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set holding top_p")
    seed: int = Field(0, description="sampling seed; prompt i uses seed + i, so answers do not depend on order")
    stop: list[str] = Field([], description="exchange/fuse: a reply ends before the first of these strings "
                                                 "(after its leading whitespace)")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if "" in stop:
            raise ValueError("an empty stop string would end every reply at once; remove it")
        return stop


class EnsembleMember(Strict):
    """One member model, with an optional fixed weight (`{model: path, weight: 0.7}`).

    For `exchange` and `fuse`, where each member answers alone, a member may also carry its own `system` prompt
    and `generation` settings (only the keys written override the recipe's `generation`), so one model can be
    several members: `{model: gemma.gguf, system: "Check each step.", generation: {do_sample: true, seed: 1}}`.
    """

    model: str = Field(description="HF model folder, a .gguf file, or a Hub id when online")
    weight: float | None = Field(None, ge=0, description="relative weight; normalised over the members")
    revision: str | None = None
    """Hub revision when `model` is a Hub id"""
    system: str | None = Field(None, description="exchange/fuse: this member's system prompt")
    generation: Generation | None = Field(None, description="exchange/fuse: keys that override `generation`")

    def generation_over(self, base: Generation) -> Generation:
        """`base` with the keys this member's `generation` writes (and only those) replaced."""
        if self.generation is None:
            return base
        return base.model_copy(update={k: getattr(self.generation, k) for k in self.generation.model_fields_set})


# The prompt templates of `exchange` and `fuse` (recipe section `templates`): placeholders each may use, and
# those it must use (a member that never sees the question, or the peers, cannot take part).
TEMPLATE_FIELDS = {
    "question": ({"prompt"}, {"prompt"}),
    "revise": ({"prompt", "reply", "answer", "peers"}, {"prompt", "peers"}),
    "peer": ({"n", "model", "reply", "answer"}, set()),
    "peer_confidence": ({"n", "model", "reply", "answer", "confidence"}, set()),
    "fuse": ({"prompt", "candidates"}, {"prompt", "candidates"}),
    "candidate": ({"n", "model", "text"}, {"text"}),
}
_SAMPLE = {"prompt": "Q", "reply": "R", "answer": "A", "peers": "P", "n": 1, "model": "M", "confidence": 0.5,
           "candidates": "C", "text": "T"}


class Templates(Strict):
    """The text each member (and the fuser) is given; `{name}` placeholders, Python `str.format` syntax.

    A member's chat template, when its tokenizer has one, wraps the result as the user turn (after the
    member's `system` prompt); without one, the system prompt and a blank line go before it.
    """

    question: str = Field("{prompt}", description="what each member answers alone (round 0, fuse candidates)")
    revise: str = Field(
        "{prompt}\n\nYour previous answer:\n{reply}\n\nAnswers of other solvers:\n{peers}\n\n"
        "Considering their answers, solve the problem again and give your final answer.",
        description="exchange rounds 1..R: the question, this member's previous reply/answer, the peers it sees")
    peer: str = Field("Solver {n}: {reply}", description="one line of {peers} in round 1")
    peer_confidence: str = Field("Solver {n} (confidence {confidence:.2f}): {reply}",
                                 description="one line of {peers} from round 2 on")
    fuse: str = Field(
        "{prompt}\n\nCandidate answers from several solvers:\n{candidates}\n\n"
        "Using the candidates, write the single best final answer.",
        description="the fuser's prompt: the question and every candidate")
    candidate: str = Field("Candidate {n}: {text}", description="one line of {candidates}")

    @field_validator(*TEMPLATE_FIELDS)
    @classmethod
    def _placeholders(cls, text: str, info: ValidationInfo) -> str:
        allowed, needed = TEMPLATE_FIELDS[str(info.field_name)]
        hint = "write placeholders as {name} and a literal brace as {{ or }}"
        try:
            names = {re.split(r"[.\[!:]", f)[0] for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as e:
            raise ValueError(f"not a valid format string ({e}); {hint}") from None
        if names - allowed or "" in names:
            bad = sorted(names - allowed) or [""]
            raise ValueError(f"unknown placeholder {{{bad[0]}}}; this template may use "
                             + ", ".join(f"{{{a}}}" for a in sorted(allowed)))
        if needed - names:
            raise ValueError(f"lacks {{{sorted(needed - names)[0]}}}; this template must hold "
                             + ", ".join(f"{{{a}}}" for a in sorted(needed)))
        try:
            text.format(**_SAMPLE)
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
            raise ValueError(f"not a valid format string ({e}); {hint}") from None
        return text


class ExchangeSettings(Strict):
    """`method: exchange` (Exchange-of-Thought): members read each other's answers over rounds."""

    topology: Literal["memory", "report", "relay", "debate"] = Field(
        description="who sees whom: memory (everyone), report (0 <-> others), relay (i-1 -> i), "
                    "debate (0 sees all; the others see each other, not 0)")
    rounds: int = Field(3, ge=1, description="R: at most R rounds after round 0")
    answer_pattern: str | None = Field(None, description="regex: the answer is its first group, else the match, "
                                                         "else the whole reply")

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"the regular expression does not compile ({e}); check brackets and escapes "
                                 "(in YAML, quote it with single quotes)") from None
        return pattern


TEXT_METHODS = ("exchange", "fuse")  # members answer in text alone: vocabularies may differ


class ScoreSettings(Strict):
    """`--score FILE`: how the text is packed (as `train` packs it) and batched."""

    seq_len: int = Field(128, ge=8, description="block length, as `seq_len` in a train recipe")
    batch_size: int = Field(8, ge=1, description="blocks per forward pass")
    text_field: str = Field("text", description="column holding the text in .jsonl/.parquet")


class EnsembleRecipe(Strict):
    """`moemerge ensemble`: probability / logit averaging, perplexity weights, crowd vote, exchange, fuse."""

    models: list[EnsembleMember] = Field(min_length=1, description="paths/Hub ids or {model, weight}")
    method: Literal["probs", "logits", "vote", "exchange", "fuse"] = "probs"
    """probs (mixture of the next-token distributions), logits (softmax of the weighted logits), vote (crowd vote
    over whole answers), exchange (Exchange-of-Thought rounds) or fuse (a fuser model writes the answer)"""
    weights: list[float] | Literal["perplexity"] | None = Field(
        None, description="one number per model, or `perplexity` (softmax of -log ppl / temperature_ppl)")
    temperature_ppl: float = Field(1.0, gt=0, description="temperature of the perplexity weights")
    prompts: str | list[str] | None = Field(None, description="a .txt file (one prompt a line), a .jsonl "
                                                                  "file (`text` per line), or a list of strings")
    generation: Generation = Generation()
    """decoding (the generation.* fields)"""
    similarity: Literal["rouge_l", "token_f1"] = Field("rouge_l", description="vote: candidate similarity on tokens")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """float32, bfloat16 or float16; the device is accelerate's choice, or --device"""
    trust_remote_code: bool = Field(False, description="run custom code in member folders that is not this "
                                    "version's own moemerge code (read it first)")
    score: ScoreSettings = ScoreSettings()
    """how `--score FILE` packs and batches the text (the score.* fields)"""
    exchange: ExchangeSettings | None = Field(None, description="method exchange: topology, rounds, answer_pattern")
    fuser: EnsembleMember | None = Field(None, description="method fuse: the model that writes the final answer")
    templates: Templates = Templates()
    """exchange and fuse: the prompt templates (the templates.* fields)"""

    @field_validator("models", mode="before")
    @classmethod
    def _paths_are_members(cls, models: Any) -> Any:
        # a bare path is shorthand for {model: path}: one member type, so errors name `models.1.weight`
        return [{"model": m} if isinstance(m, str) else m for m in models] if isinstance(models, list) else models

    @field_validator("fuser", mode="before")
    @classmethod
    def _fuser_path(cls, fuser: Any) -> Any:
        return {"model": fuser} if isinstance(fuser, str) else fuser

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
        if method in ("vote", *TEXT_METHODS) and len(info.data.get("models") or []) == 1:
            raise ValueError(f"'{method}' needs at least 2 models (a lone candidate has no one to agree with); "
                             "add a model or use method: probs")
        return method

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights, info: ValidationInfo):
        models = info.data.get("models") or []
        if weights is not None and any(m.weight is not None for m in models):
            raise ValueError("weights are given per model too; keep one of the two")
        if weights is not None and info.data.get("method") in ("vote", *TEXT_METHODS):
            raise ValueError(f"'{info.data['method']}' counts every candidate equally; remove `weights`")
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
        if self.method in ("vote", *TEXT_METHODS) and self.fixed_weights() is not None:
            raise ValueError(f"'{self.method}' counts every candidate equally; remove the models' weights")
        if sum(self.fixed_weights() or [1.0]) <= 0:
            raise ValueError("the models' weights sum to 0; give at least one model a positive weight")
        return self

    @model_validator(mode="after")
    def _text_methods(self) -> "EnsembleRecipe":
        if self.method == "exchange" and self.exchange is None:
            raise ValueError("method 'exchange' needs `exchange: {topology: memory|report|relay|debate, rounds: R}`")
        if self.method != "exchange" and self.exchange is not None:
            raise ValueError(f"`exchange:` is read by method 'exchange' only, not '{self.method}'; remove it")
        if self.method == "fuse" and self.fuser is None:
            raise ValueError("method 'fuse' needs `fuser: MODEL`, the model that writes the final answer from "
                             "the candidates (it may be one of the members)")
        if self.method != "fuse" and self.fuser is not None:
            raise ValueError(f"`fuser:` is read by method 'fuse' only, not '{self.method}'; remove it")
        if self.fuser is not None and self.fuser.weight is not None:
            raise ValueError("fuser.weight: the fuser writes the answer, it has no weight; remove it")
        if self.exchange is not None and self.exchange.topology == "debate" and len(self.models) < 3:
            raise ValueError("topology 'debate' needs at least 3 models (with 2, member 1 sees no one); "
                             "add a model or use memory")
        if "templates" in self.model_fields_set and self.method not in TEXT_METHODS:
            raise ValueError(f"`templates:` is read by exchange and fuse only, not '{self.method}'; remove it")
        if self.generation.stop and self.method not in TEXT_METHODS:
            raise ValueError(f"generation.stop is read by exchange and fuse (replies in text), not '{self.method}'; "
                             "remove it")
        own = [j for j, m in enumerate(self.models) if m.system is not None or m.generation is not None]
        if own and self.method not in TEXT_METHODS:
            raise ValueError(f"models.{own[0]}: a member's own `system`/`generation` is read by exchange and fuse "
                             f"(members answer alone), not by '{self.method}'; remove it or set method")
        return self

    def paths(self) -> list[str]:
        """The member models as written (paths or Hub ids), in order."""
        return [m.model for m in self.models]

    def revisions(self) -> list[str | None]:
        """The Hub revision of each member (None for a local folder or the default branch)."""
        return [m.revision for m in self.models]

    def member_generation(self, member: EnsembleMember) -> Generation:
        """The decoding settings of one member (or the fuser): `generation` with the member's own keys over it."""
        return member.generation_over(self.generation)

    def fixed_weights(self) -> list[float] | None:
        """The numeric weights (from `weights:` or per model), or None for equal / perplexity weights."""
        if isinstance(self.weights, list):
            return list(self.weights)
        inline = [m.weight for m in self.models]
        return [float(w) for w in inline] if all(w is not None for w in inline) else None

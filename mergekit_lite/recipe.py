"""The one recipe schema: every YAML recipe `moemerge` reads is validated here.

Each recipe kind is a pydantic model with `extra="forbid"`, so a misspelled key is an error,
not a silently ignored setting. `load_recipe` turns YAML and validation problems into a
`MoemergeError` that names the field, the bad value and the fix.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic import ByteSize as PydanticByteSize
from pydantic import field_validator, model_validator

from mergekit_lite.errors import MoemergeError

DType = Literal["float32", "float16", "bfloat16", "source"]
Target = Literal["mixtral", "qwen2_moe", "qwen3_moe", "auto"]

# pydantic's ByteSize reads sizes in Hugging Face's units: GB = 10^9 bytes, GiB = 2^30 (KB/KiB, MB/MiB, TB/TiB...).
_BYTES = TypeAdapter(PydanticByteSize)


def parse_size(value: int | str) -> int:
    """Parse a byte size such as `5GB`, `500MB`, `2GiB` or a plain integer (pydantic `ByteSize`: GB = 10^9)."""
    try:
        n = int(_BYTES.validate_python(value))
    except ValidationError:
        raise ValueError(f"cannot read size {value!r}; write e.g. 5GB, 500MB, 2GiB or a number of bytes") from None
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


# A size in bytes written as `5GB`, `500MB`, `2GiB` or an integer; validated into an int.
ByteSize = Annotated[Union[int, str], AfterValidator(parse_size)]


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class RouterInit(Strict):
    """How fresh router (gate) weights are initialised."""

    init: Literal["random", "zeros", "uniform", "hidden"] = "random"
    std: float | None = Field(None, gt=0, description="normal std for `random`; default: the source's initializer_range")
    bound: float | None = Field(None, gt=0, description="half-width for `uniform`; default: 1/sqrt(hidden_size)")
    prompts: list[list[str]] | None = Field(
        None, description="`hidden`: one list of prompts per expert copy (num_experts / granularity lists); "
                          "with `experts:` give them per expert instead")
    negative_prompts: list[list[str]] | None = Field(
        None, description="`hidden`: optional, same length as `prompts`; their mean hidden state is subtracted")
    batch_size: int = Field(8, ge=1, description="`hidden`: prompts run through the base model per batch")
    max_length: int = Field(512, ge=1, description="`hidden`: prompts are truncated to this many tokens")


class ExpertSource(Strict):
    """One entry of `experts:` (Branch-Train-MiX / mergekit-moe style): a dense model giving one expert copy."""

    source: str = Field(description="dense model whose FFNs become this expert (same architecture and shapes)")
    revision: str | None = Field(None, description="Hub revision when `source` is a Hub id")
    noise: float | None = Field(None, ge=0, description="overrides the top-level `noise` for this expert")
    drop_ratio: float | None = Field(None, ge=0, lt=1, description="overrides the top-level `drop_ratio`")
    prompts: list[str] | None = Field(None, description="`router.init: hidden`: prompts this expert should get")
    negative_prompts: list[str] | None = Field(None, description="`router.init: hidden`: prompts it should not get")


class MoEEvery(Strict):
    """`moe_layers: {every: k}`: layers i with (i + 1) % k == 0 are MoE (transformers' decoder_sparse_step)."""

    every: int = Field(ge=1)


class UpcycleRecipe(Strict):
    """`moemerge upcycle`: a dense checkpoint into a native Hugging Face MoE checkpoint."""

    source: str | None = Field(None, description="dense model: a local Hugging Face folder, or a Hub id when online "
                                                  "(required unless `experts:` is given)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `source` is a Hub id")
    architecture: Target = "auto"
    num_experts: int | None = Field(None, ge=1, description="fine experts per MoE layer; with `experts:` it "
                                                            "defaults to len(experts) * granularity")
    experts_per_token: int = Field(ge=1)
    router: RouterInit = RouterInit()
    # Advanced upcycling (README "Advanced upcycling"); the defaults reproduce plain sparse upcycling.
    granularity: int = Field(1, ge=1, description="split each FFN into this many fine experts (slices of I/G)")
    drop_ratio: float = Field(0.0, ge=0, lt=1, description="Drop-Upcycling: fraction of channels re-initialised")
    noise: float = Field(0.0, ge=0, description="relative gaussian noise per expert (times each matrix's std)")
    shared_experts: int = Field(0, ge=0, description="Qwen2-MoE: shared expert size in units of one routed expert")
    shared_split: bool = Field(False, description="split the dense FFN between shared and routed experts (parity)")
    moe_layers: Literal["all"] | MoEEvery | list[int] = Field("all", description="all | {every: k} | [indices]")
    experts: list[ExpertSource] | None = Field(None, min_length=1, description="one expert copy per dense model")
    base: str | None = Field(None, description="with `experts:`: model giving config, tokenizer and non-expert "
                                               "weights (default: the first expert's source)")
    non_expert: Literal["base", "average"] = Field("base", description="with `experts:`: attention/norms/embeddings "
                                                                       "from `base`, or averaged over the experts")
    dtype: DType = "source"
    seed: int = 0
    output: str | None = None
    shard_size: ByteSize = "5GB"

    @model_validator(mode="after")
    def _topk(self) -> "UpcycleRecipe":
        _check_advanced(self)
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} is larger than num_experts={self.num_experts}; "
                f"set experts_per_token to at most {self.num_experts}"
            )
        return self


def _check_advanced(r: "UpcycleRecipe") -> None:
    """Cross-field rules of the advanced upcycling options (checks needing the source config are in the planner)."""
    if r.experts is None:
        if not r.source:
            raise ValueError("`source` is missing: give the dense model (or an `experts:` list)")
        if r.base is not None or r.non_expert != "base":
            raise ValueError("`base` and `non_expert` only apply with an `experts:` list; remove them")
        if r.num_experts is None:
            raise ValueError("`num_experts` is missing: add the number of experts per MoE layer")
    else:
        if r.source:
            raise ValueError("give either `source` or `experts:`, not both; with `experts:` name the model for "
                             "attention, norms and embeddings with `base:`")
        copies = len(r.experts)
        if r.num_experts is None:
            r.num_experts = copies * r.granularity
        elif r.num_experts != copies * r.granularity:
            raise ValueError(f"num_experts={r.num_experts} but {copies} `experts:` x granularity {r.granularity} "
                             f"give {copies * r.granularity}; set num_experts: {copies * r.granularity} or drop it")
    G = r.granularity
    if r.num_experts % G:
        raise ValueError(f"num_experts={r.num_experts} is not a multiple of granularity={G}: every FFN slice needs "
                         f"the same number of copies; use a multiple of {G}")
    if r.experts_per_token % G:
        raise ValueError(f"experts_per_token={r.experts_per_token} is not a multiple of granularity={G}: step-0 "
                         f"parity needs whole groups of {G} slices per token; use a multiple of {G}")
    if G > 1 and r.router.init == "zeros":
        raise ValueError("router.init=zeros with granularity > 1 ties every expert, so top-k may pick incomplete "
                         "slice groups; use random, uniform or hidden")
    if r.shared_split and not r.shared_experts:
        raise ValueError("shared_split: true needs shared_experts >= 1")
    if isinstance(r.moe_layers, list) and (not r.moe_layers or min(r.moe_layers) < 0
                                           or len(set(r.moe_layers)) != len(r.moe_layers)):
        raise ValueError(f"moe_layers={r.moe_layers} must be distinct layer indices >= 0 (and at least one)")
    _check_prompts(r)


def _check_prompts(r: "UpcycleRecipe") -> None:
    """`router.init: hidden` needs positive prompts for every expert copy, in exactly one place."""
    per_expert = r.experts is not None and any(e.prompts or e.negative_prompts for e in r.experts)
    if per_expert and (r.router.prompts or r.router.negative_prompts):
        raise ValueError("prompts are given both under `router:` and under `experts:`; keep one place")
    has_router_prompts = r.router.prompts is not None or r.router.negative_prompts is not None
    if r.router.init != "hidden":
        if per_expert or has_router_prompts:
            raise ValueError(f"prompts are only used with router.init=hidden (got init={r.router.init}); "
                             "set router.init: hidden or remove them")
        return
    copies = r.num_experts // r.granularity
    if per_expert:
        missing = [j for j, e in enumerate(r.experts) if not e.prompts]
        if missing:
            raise ValueError(f"router.init=hidden: experts {missing} have no `prompts`; give each expert a list")
        return
    if not r.router.prompts:
        raise ValueError("router.init=hidden needs prompts: `router.prompts` (one list per expert copy) or "
                         "`prompts:` on every `experts:` entry")
    for name in ("prompts", "negative_prompts"):
        lists = getattr(r.router, name)
        if lists is not None and (len(lists) != copies or not all(lists) and name == "prompts"):
            raise ValueError(f"router.{name} needs {copies} non-empty lists (num_experts / granularity = "
                             f"{r.num_experts} / {r.granularity}), got {len(lists)}")


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
    source: str | None = Field(None, description="the model for the `drop` / `expand` shorthands")
    drop: int | None = Field(None, ge=0, description="SOLAR: layers 0..n-m-1 of the model, then layers m..n-1")
    expand: int | None = Field(None, ge=1, description="LLaMA-Pro: insert this many identity blocks, spread evenly")
    embeddings_from: str = Field("first", description="first | last | a model path: where the embeddings come from")
    head_from: str = Field("last", description="first | last | a model path: final norm and lm_head")
    dtype: DType = "source"
    output: str | None = None
    shard_size: ByteSize = "5GB"

    @model_validator(mode="after")
    def _one_form(self) -> "GraftRecipe":
        if self.slices is not None:
            if self.source or self.drop is not None or self.expand is not None:
                raise ValueError("give either `slices`, or `source` with `drop` or `expand`, not both")
        elif not self.source or (self.drop is None) == (self.expand is None):
            raise ValueError("give `slices` (a list of {model, layers}), or `source` with exactly one of "
                             "`drop: m` or `expand: k`")
        return self


class TrainData(Strict):
    """Where the training text comes from (local files through the `datasets` library, or a Hub dataset)."""

    train: list[str] = Field(min_length=1, description="files, folders or globs (.txt, .jsonl, .json, .parquet), "
                                                      "or a Hub dataset name when online")
    validation: list[str] | None = Field(None, description="held-out files; default: a split of `train`")
    validation_fraction: float = Field(0.05, gt=0, lt=0.5,
                                       description="share of documents held out (split before packing)")
    text_field: str = Field("text", description="column holding the text in .jsonl/.parquet")
    streaming: bool = Field(False, description="stream corpora larger than memory (no tokenisation cache)")
    validation_blocks: int = Field(64, ge=1, description="with streaming and no `validation`: the first N blocks "
                                   "(their documents are left out of training)")


class MoETraining(Strict):
    """Router losses and balancing for MoE models (ignored for dense models)."""

    balance_coef: float = Field(0.01, ge=0, description="Switch/GShard load-balancing loss coefficient")
    z_coef: float = Field(0.001, ge=0, description="router z-loss coefficient (ST-MoE)")
    bias_update_rate: float = Field(0.0, ge=0, description="auxiliary-loss-free balancing (DeepSeek-V3): "
                                                           "per-expert selection bias step; 0 = off")
    jitter: float = Field(0.0, ge=0, lt=1, description="multiplicative router-input noise in [1-j, 1+j] (Switch)")


class LoraSettings(Strict):
    """LoRA adapters (peft), merged into the weights when the model is saved."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainRecipe(Strict):
    """`moemerge train`: continued pretraining with accelerate."""

    model: str = Field(description="HF model folder (or Hub id when online)")
    revision: str | None = None
    data: TrainData
    seq_len: int = Field(ge=8)
    micro_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="alternative to max_steps")
    learning_rate: float = Field(gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to learning_rate * min_lr_ratio")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 = off")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    trainable: Literal["all", "routers", "routers+experts", "new_layers", "lora"] = "all"
    lora: LoraSettings = LoraSettings()
    moe: MoETraining = MoETraining()
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = none")
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="steps between validations; 0 = only at the end")
    eval_batches: int = Field(16, ge=1, description="validation batches per evaluation (cap)")
    log_every: int = Field(1, ge=1)
    tracker: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    output: str
    save_dtype: DType = Field("source", description="dtype of the final model: source = the model's own")
    shard_size: ByteSize = "5GB"

    @model_validator(mode="after")
    def _length(self) -> "TrainRecipe":
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps or max_tokens")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be smaller than max_steps={self.max_steps}")
        return self


R = TypeVar("R", bound=BaseModel)


# Names people carry over from other trainers and from config.json, mapped to ours; suggested only when the
# target is a key of the section the unknown key sits in (so `lr` -> learning_rate, never `lora`).
_ALIASES = {"lr": "learning_rate", "batch_size": "micro_batch_size", "bs": "micro_batch_size",
            "per_device_train_batch_size": "micro_batch_size", "steps": "max_steps", "num_steps": "max_steps",
            "warmup": "warmup_steps", "grad_accum": "gradient_accumulation_steps",
            "gradient_accumulation": "gradient_accumulation_steps", "wd": "weight_decay",
            "grad_clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm", "precision": "mixed_precision",
            "max_seq_len": "seq_len", "seq_length": "seq_len", "block_size": "seq_len", "context_length": "seq_len",
            "n_experts": "num_experts", "num_local_experts": "num_experts", "top_k": "experts_per_token",
            "num_experts_per_tok": "experts_per_token", "model": "source", "base_model": "source",
            "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}
# difflib ratio a typo must reach: 0.75 keeps `learnig_rate` -> learning_rate and drops `lr` -> lora (0.67).
_CUTOFF = 0.75


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The recipe section class inside an annotation (`X`, `X | None`, `list[X]`, `Union[Literal, X]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _section(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section class found by following `loc` (field names; list indices are skipped) from `model`."""
    section: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = section.model_fields if section else {}
        section = _model_in(fields[part].annotation) if part in fields else None
    return section


def _suggest(key: str, known: list[str]) -> str | None:
    """A known key this unknown one probably meant: an alias first, else a close spelling."""
    if _ALIASES.get(key) in known:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, known, n=1, cutoff=_CUTOFF)
    return close[0] if close else None


def _mapping_example(name: str, section: type[BaseModel], value: Any) -> str:
    """`name: {field: value}` using the field whose allowed values include `value`, else the first fields."""
    for field, info in section.model_fields.items():
        if value in typing.get_args(info.annotation):
            return f"{name}: {{{field}: {value}}}"
    return f"{name}: {{{', '.join(f'{f}: ...' for f in list(section.model_fields)[:2])}}}"


def _fix_hint(err: dict[str, Any], model: type[BaseModel]) -> str:
    """Suggest a fix for one pydantic error."""
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _section(model, err["loc"][:-1])
        known = list(section.model_fields) if section else []
        close = _suggest(str(err["loc"][-1]), known)
        if close:
            return f"did you mean '{close}'?"
        return f"remove it; known keys here: {', '.join(known)}" if known else "remove it"
    if kind == "model_type" and (section := _section(model, err["loc"])) is not None:
        return (f"write a mapping like `{_mapping_example(str(err['loc'][-1]), section, err.get('input'))}`; "
                f"keys: {', '.join(section.model_fields)}")
    if kind == "missing":
        return "add this key"
    if kind.startswith("literal"):
        return "use one of the values listed"
    return "fix the value"


def format_validation_error(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line per problem: field, value, what is wrong, how to fix it."""
    lines = [f"invalid recipe {where}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        value = err.get("input")
        shown = "" if err["type"] == "missing" or not err["loc"] else f" = {value!r}"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "model_type":  # pydantic names our internal class here; say what the user wrote
            msg = f"must be a mapping of keys to values, not {type(value).__name__}"
        lines.append(f"  {field}{shown}: {msg} ({_fix_hint(err, model)})")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning syntax errors into a one-line message with the line number."""
    path = Path(path)
    if not path.is_file():
        raise MoemergeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise MoemergeError(f"recipe {path} is not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise MoemergeError(f"recipe {path} must be a YAML mapping of keys to values, got {type(data).__name__}")
    return data


def validate_recipe(data: dict[str, Any], model: type[R], where: str = "") -> R:
    """Validate a dict against a recipe model, raising `MoemergeError` with every problem listed."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise MoemergeError(format_validation_error(e, model, where)) from None


def load_recipe(path: str | Path, model: type[R]) -> R:
    """Read and validate a YAML recipe file."""
    return validate_recipe(read_yaml(path), model, str(path))

"""Recipe base: strict sections, byte sizes, and the YAML reading and error formatting every recipe shares.

Each recipe kind is a pydantic model with `extra="forbid"`, so a misspelled key is an error,
not a silently ignored setting. `load_recipe` turns YAML and validation problems into a
`MoemergeError` that names the field, the bad value and the fix.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic import ByteSize as PydanticByteSize

from mergekit_lite.errors import MoemergeError

DType = Literal["float32", "float16", "bfloat16", "source"]

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
ByteSize = Annotated[int | str, AfterValidator(parse_size)]


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, and so are inf and nan (`noise: .inf`)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


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


def _fix_hint(err: Mapping[str, Any], model: type[BaseModel]) -> str:
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
        shown = "" if err["type"] == "missing" or not err["loc"] else f" = {excerpt(value)}"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "model_type":  # pydantic names our internal class here; say what the user wrote
            msg = f"must be a mapping of keys to values, not {type(value).__name__}"
        lines.append(f"  {field}{shown}: {msg} ({_fix_hint(err, model)})")
    return "\n".join(lines)


def excerpt(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: an error never echoes a whole (maybe huge) value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


# Values a recipe may expand to once its aliases (`*ref`) are followed: real recipes hold a few hundred; a few lines
# of nested aliases (the "billion laughs") expand to billions, which validation would walk for hours.
MAX_RECIPE_VALUES = 100_000


def _expanded_size(value: Any, seen: dict[int, int]) -> int:
    """How many values `value` holds with every shared (aliased) part counted each time it is used; counted in
    time linear in the distinct parts (memoised by identity)."""
    if id(value) in seen:
        return seen[id(value)]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    seen[id(value)] = n = 1 + sum(_expanded_size(v, seen) for v in items)
    return n


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader without duplicate keys (YAML keeps the last silently; in a recipe that is a setting
    lost). Aliases stay allowed (PyYAML's own dump writes them for repeated values); `read_yaml` caps how far
    they expand."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.MarkedYAMLError(problem=f"key {excerpt(key, 40)} is given twice (first at line "
                                                   f"{seen[key] + 1}); keep one", problem_mark=key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning syntax errors into a one-line message with the line number."""
    path = Path(path)
    if not path.is_file():
        raise MoemergeError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoemergeError(f"recipe {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise MoemergeError(f"recipe {path} is not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise MoemergeError(f"recipe {path} must be a YAML mapping of keys to values, got {type(data).__name__}")
    if (n := _expanded_size(data, {})) > MAX_RECIPE_VALUES:
        raise MoemergeError(f"recipe {path} expands to {n:,} values through its aliases (*ref), more than a recipe "
                            f"holds (limit {MAX_RECIPE_VALUES:,}); write the values out")
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

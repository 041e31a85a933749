"""The one recipe schema: every YAML recipe `moemerge` reads is validated here.

Each recipe kind is a pydantic model with `extra="forbid"`, so a misspelled key is an error,
not a silently ignored setting. `load_recipe` turns YAML and validation problems into a
`MoemergeError` that names the field, the bad value and the fix.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_lite.errors import MoemergeError

DType = Literal["float32", "float16", "bfloat16", "source"]
Target = Literal["mixtral", "qwen2_moe", "qwen3_moe", "auto"]

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Parse a byte size such as `5GB`, `500MB`, `2GiB` or a plain integer (Hugging Face units: GB = 10^9)."""
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(value).upper())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise ValueError(f"cannot read size {value!r}; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class RouterInit(Strict):
    """How fresh router (gate) weights are initialised."""

    init: Literal["random", "zeros", "uniform"] = "random"
    std: float | None = Field(None, gt=0, description="normal std for `random`; default: the source's initializer_range")
    bound: float | None = Field(None, gt=0, description="half-width for `uniform`; default: 1/sqrt(hidden_size)")


class UpcycleRecipe(Strict):
    """`moemerge upcycle`: a dense checkpoint into a native Hugging Face MoE checkpoint."""

    source: str = Field(description="dense model: a local Hugging Face folder, or a Hub id when online")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `source` is a Hub id")
    architecture: Target = "auto"
    num_experts: int = Field(ge=1)
    experts_per_token: int = Field(ge=1)
    router: RouterInit = RouterInit()
    dtype: DType = "source"
    seed: int = 0
    output: str | None = None
    shard_size: int | str = "5GB"

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int:
        return parse_size(v)

    @model_validator(mode="after")
    def _topk(self) -> "UpcycleRecipe":
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} is larger than num_experts={self.num_experts}; "
                f"set experts_per_token to at most {self.num_experts}"
            )
        return self


R = TypeVar("R", bound=BaseModel)


def _fix_hint(err: dict[str, Any], model: type[BaseModel]) -> str:
    """Suggest a fix for one pydantic error."""
    kind = err["type"]
    if kind == "extra_forbidden":
        section: Any = model
        for part in err["loc"][:-1]:
            fields = getattr(section, "model_fields", {})
            if isinstance(part, str) and part in fields:
                section = fields[part].annotation
        known = list(getattr(section, "model_fields", {}))
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        if close:
            return f"did you mean '{close[0]}'?"
        return f"remove it; known keys here: {', '.join(known)}" if known else "remove it"
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
        shown = "" if err["type"] == "missing" else f" = {value!r}"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
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

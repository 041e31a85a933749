"""The one recipe schema: every YAML recipe `moemerge` reads is validated by this package.

Each recipe kind is a pydantic model with `extra="forbid"`, so a misspelled key is an error,
not a silently ignored setting; `load_recipe` turns YAML and validation problems into a
`MoemergeError` that names the field, the bad value and the fix. One module per command holds
its sections; `base` holds what they share.
"""

from mergekit_lite.recipe.base import (
    ByteSize,
    DType,
    Strict,
    format_validation_error,
    load_recipe,
    parse_size,
    read_yaml,
    validate_recipe,
)
from mergekit_lite.recipe.ensemble import (
    EnsembleMember,
    EnsembleRecipe,
    ExchangeSettings,
    Generation,
    ScoreSettings,
    Templates,
)
from mergekit_lite.recipe.graft import GraftRecipe, GraftSlice
from mergekit_lite.recipe.train import LoraSettings, MoETraining, TrainData, TrainRecipe
from mergekit_lite.recipe.upcycle import BlockSpec, ExpertSource, MoEEvery, RouterInit, Target, UpcycleRecipe

__all__ = ["BlockSpec", "ByteSize", "DType", "EnsembleMember", "EnsembleRecipe", "ExchangeSettings", "ExpertSource",
           "Generation", "GraftRecipe", "GraftSlice", "LoraSettings", "MoEEvery", "MoETraining", "RouterInit",
           "ScoreSettings", "Strict", "Target", "Templates", "TrainData", "TrainRecipe", "UpcycleRecipe",
           "format_validation_error", "load_recipe", "parse_size", "read_yaml", "validate_recipe"]

"""Architecture tables (data) and config translation."""

from mergekit_lite.arch.tables import (
    AUTO_TARGET,
    COMMON_FIELDS,
    DENSE,
    LAYER_PREFIX,
    MOE,
    PROJS,
    DenseFamily,
    MoEFamily,
    layer_key,
    model_type_of,
    split_layer_key,
)

__all__ = [
    "AUTO_TARGET", "COMMON_FIELDS", "DENSE", "LAYER_PREFIX", "MOE", "PROJS", "DenseFamily", "MoEFamily",
    "layer_key", "model_type_of", "split_layer_key",
]

"""The one streaming IO layer: lazy reader, size-capped atomic writer, Hugging Face side files."""

from mergekit_lite.io.reader import CheckpointReader, TensorInfo, resolve_model_path
from mergekit_lite.io.safety import clear_stale_temps, find_debris, refuse_overlap, remove_own_entries
from mergekit_lite.io.writer import (
    AtomicDir,
    TensorEntry,
    assign_shards,
    shard_names,
    write_index,
    write_model_folder,
    write_shard,
)

__all__ = [
    "AtomicDir", "CheckpointReader", "TensorInfo", "assign_shards", "resolve_model_path",
    "shard_names", "write_index", "write_shard", "TensorEntry", "write_model_folder",
    "clear_stale_temps", "find_debris", "refuse_overlap", "remove_own_entries",
]

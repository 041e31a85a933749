"""`moemerge check`: is a model folder a sound checkpoint that `transformers` will load as is?

Checks run cheapest first and the first hard failure raises `MoemergeError` (exit 2) naming the
file or tensor and the fix: config, shards and index, index total size, the key set the config's
class expects, tokenizer, then every value finite (streamed one tensor, one chunk at a time).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import MoemergeError, first_line
from mergekit_lite.io import CheckpointReader, find_debris
from mergekit_lite.io.folders import RunFolder, upload_files
from mergekit_lite.io.reader import read_config
from mergekit_lite.io.writer import INDEX_FILE
from mergekit_lite.plan import format_bytes, format_count

# Elements per isfinite() call: bounds the temporary bool buffer (~16 MB) whatever the tensor size.
_CHUNK = 1 << 24


@dataclass
class CheckReport:
    """What `check` verified, for the summary it prints."""

    path: Path
    architecture: str = "?"
    tensors: int = 0
    params: int = 0
    nbytes: int = 0
    shards: list[str] = field(default_factory=list)
    tokenizer: str = "?"
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as printed by `moemerge check`, one finding per line."""
        return [f"{self.path}: OK",
                f"  config         {self.architecture} loads with AutoConfig; its class accepts every tensor",
                f"  weights        {self.tensors} tensors, {format_count(self.params)} parameters, "
                f"{format_bytes(self.nbytes)} in {len(self.shards)} shard(s); headers and index agree",
                "  values         all finite (no NaN/Inf)",
                f"  tokenizer      {self.tokenizer}",
                *(f"  note           {n}" for n in self.notes)]


def check_folder(path: str | Path, progress: Callable[[str], None] | None = None,
                 trust_remote_code: bool = False) -> CheckReport:
    """Run every check on a model folder; raises MoemergeError on the first hard failure."""
    path = Path(path)
    debris = [f"temporary folder beside it: {d.describe()}; " + ("a write of this folder is in progress" if d.alive
              else "left by an interrupted write, delete it (the next write of this folder does)")
              for d in find_debris(path)]
    if not path.is_dir():
        raise MoemergeError(f"check: {path} is not a folder" + (f" ({debris[0]})" if debris else ""))
    refuse_run_folder(path)
    report = CheckReport(path, notes=debris)
    from mergekit_lite.models import trust_for

    trust = trust_for(path, trust_remote_code, "check")  # foreign custom code: one line, before anything runs
    config = _load_config(path, report, trust)
    reader = CheckpointReader(path)  # headers of every shard; index <-> shard consistency
    try:
        _check_files(path, reader, report)
        _check_keys(config, reader, trust)
        report.tokenizer = _check_tokenizer(path, config)
        _check_routing(path, config)
        _check_values(reader, progress)
    finally:
        reader.close()
    report.notes.extend(_link_notes(path))
    return report


def refuse_run_folder(path: Path) -> None:
    """A `moemerge train` output folder is not a model: name the folder that holds the run's model."""
    run = RunFolder(path)
    if not run.is_run():
        return
    final = run.final
    where = (f"its model is in {final}; give that folder instead" if (final / "config.json").exists()
             else f"its model will be in {final} when the run finishes (`moemerge train --resume` continues it)")
    raise MoemergeError(f"{path} is a `moemerge train` run folder, not a model folder; {where}")


def _link_notes(path: Path) -> list[str]:
    """A Hub cache snapshot is made of links: say what `push` would send (refuses links leaving the cache)."""
    files = upload_files(path)
    links = [n for rel, n in files if (path / rel).is_symlink()]
    if not links:
        return []
    return [f"{len(links)} of {len(files)} files are links (e.g. into the Hub cache); push uploads what they point "
            f"to: {format_bytes(sum(n for _, n in files))} in all"]


def _load_config(path: Path, report: CheckReport, trust_remote_code: bool = False) -> Any:
    from mergekit_lite.models import load_config

    try:
        config = load_config(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here means transformers cannot load the folder
        raise MoemergeError(f"check: {path / 'config.json'} does not load with AutoConfig ({first_line(e)}); "
                            "fix or regenerate config.json") from None
    report.architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    return config


def _check_files(path: Path, reader: CheckpointReader, report: CheckReport) -> None:
    """No stray shard, and the index's total_size equals the bytes its headers describe."""
    shards = sorted({i.file for i in reader.tensors.values()})
    on_disk = sorted(p.name for p in path.glob("*.safetensors"))
    stray = [f for f in on_disk if f not in shards]
    if stray:
        raise MoemergeError(f"check: {path / stray[0]} is not named by {INDEX_FILE} ({len(stray)} stray shard(s)); "
                            "delete it or regenerate the index")
    report.shards, report.tensors, report.nbytes = shards, len(reader.tensors), reader.total_bytes()
    report.params = sum(i.numel for i in reader.tensors.values())
    index = path / INDEX_FILE
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total is None:
            report.notes.append(f"{INDEX_FILE} has no metadata.total_size; size not cross-checked")
        elif int(total) != report.nbytes:
            raise MoemergeError(f"check: {INDEX_FILE} says total_size {total}, but the shard headers describe "
                                f"{report.nbytes} bytes of tensors; the index is stale: regenerate it")


def expected_keys(config: Any, trust_remote_code: bool = False
                  ) -> tuple[dict[str, tuple[int, ...]], set[str], list[str], list[str]]:
    """Checkpoint keys the config's class would load, as saved on disk (Hub layout), with their shapes.

    transformers v5 holds fused 3-D expert tensors in memory and converts the Hub's per-expert keys
    at load time; `revert_weight_conversion` (what `save_pretrained` uses) maps the in-memory state
    dict of a meta-device model back to the on-disk names, so a set comparison is exact.

    Returns (key -> shape, tied keys that may be absent, missing-ok patterns, unexpected-ok patterns).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = (cls(config) if cls is not None
                 else AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code))
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # older transformers: no conversion, in-memory names are the disk names
        pass
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return ({k: tuple(t.shape) for k, t in state.items()}, tied,
            list(getattr(model, "_keys_to_ignore_on_load_missing", None) or []),
            list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []))


def _check_keys(config: Any, reader: CheckpointReader, trust_remote_code: bool = False) -> None:
    """Every tensor the class expects is present with its shape; nothing it would drop is stored."""
    want, tied, ok_missing, ok_unexpected = expected_keys(config, trust_remote_code)
    have = set(reader.tensors)
    cls = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    missing = sorted(k for k in want.keys() - have
                     if k not in tied and not any(re.search(p, k) for p in ok_missing))
    if missing:
        raise MoemergeError(f"check: {cls} expects tensor {missing[0]!r} {list(want[missing[0]])}, which no shard "
                            f"holds ({len(missing)} missing); the checkpoint does not match config.json")
    unexpected = sorted(k for k in have - want.keys() if not any(re.search(p, k) for p in ok_unexpected))
    if unexpected:
        raise MoemergeError(f"check: {unexpected[0]!r} is stored but {cls} has no such weight ({len(unexpected)} "
                            "such tensors; transformers would silently drop them); the checkpoint does not match "
                            "config.json")
    for k in sorted(want.keys() & have):
        got = reader.info(k).shape
        if got != want[k]:
            raise MoemergeError(f"check: {k!r} has shape {list(got)} but {cls} with this config.json expects "
                                f"{list(want[k])}")


def _check_routing(path: Path, config: Any) -> None:
    """top-k no larger than the expert count (transformers builds such a model, and fails at the first token)."""
    from mergekit_lite.arch.tables import moe_counts

    raw = read_config(path)
    from mergekit_lite.models import text_part

    experts, k = moe_counts(text_part(raw))
    if experts is not None and k is not None and k > experts:
        raise MoemergeError(f"check: {path}/config.json routes each token to {k} experts but layers hold {experts}; "
                            f"set num_experts_per_tok to at most {experts}")


def _check_tokenizer(path: Path, config: Any = None) -> str:
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((path / n).is_file() for n in names):
        raise MoemergeError(f"check: {path} has no tokenizer ({', '.join(names)}); copy the source's tokenizer "
                            "files into it")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any failure means users cannot load it
        raise MoemergeError(f"check: the tokenizer in {path} does not load ({first_line(e)})") from None
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int) and len(tok) > vocab:  # ids past the embedding: IndexError at inference
        raise MoemergeError(f"check: the tokenizer in {path} has {len(tok)} tokens but the model embeds {vocab} "
                            "(config vocab_size); use the model's own tokenizer, or resize the embeddings")
    return f"{type(tok).__name__}, {len(tok)} tokens, loads"


def _check_values(reader: CheckpointReader, progress: Callable[[str], None] | None) -> None:
    """NaN/Inf scan: one memory-mapped tensor at a time, in chunks, so memory stays flat."""
    for n, key in enumerate(reader.keys()):
        t = reader.get(key)
        if not t.is_floating_point() and t.numel():  # weights are floats: integer bytes are a relabelled dtype
            dtype = str(t.dtype).removeprefix("torch.")
            raise MoemergeError(f"check: tensor {key!r} in {reader.info(key).file} is {dtype}, "
                                "not a floating-point weight; the header's dtype is wrong or the file is not a "
                                "plain (unquantized) checkpoint")
        if t.is_floating_point():
            flat = t.reshape(-1)  # view of the mmap; chunks below are read from disk one at a time
            for start in range(0, flat.numel(), _CHUNK):
                chunk = flat[start:start + _CHUNK]
                finite = torch.isfinite(chunk)
                if not finite.all():
                    first = int((~finite).nonzero()[0, 0])
                    kind = "NaN" if torch.isnan(chunk[first]) else "Inf"
                    raise MoemergeError(f"check: tensor {key!r} in {reader.info(key).file} holds {kind} (first at "
                                        f"flat index {start + first}); the checkpoint is corrupt or diverged")
        if progress and (n + 1) % 200 == 0:
            progress(f"  scanned {n + 1}/{len(reader.tensors)} tensors")


"""Lazy checkpoint reader: a Hugging Face model folder opened without loading its weights.

Shapes and dtypes come from safetensors headers, so a preflight can check every tensor before
a single weight byte is read. `get` returns a memory-mapped view (`safe_open`), so the bytes are
read from disk only when the writer touches them; `prefetch` asks the OS to start reading a
tensor's bytes ahead of that (the writer announces the next tensors while it writes these).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mergekit_lite.errors import MoemergeError, first_line

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        """Number of elements (the product of the shape)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the file."""
        return self.numel * self.dtype.itemsize


def resolve_model_path(source: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise download a Hub snapshot (weights, config, tokenizer)."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise MoemergeError(f"{source} is a file; point to the model *folder* that holds config.json")
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MoemergeError(f"model folder not found: {source}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "README.md", "LICENSE*"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        first = first_line(e)
        raise MoemergeError(
            f"{source} is not a local folder and could not be fetched from the Hugging Face Hub ({first}); "
            "check the path, or your network and token") from None


def hub_cache_repo(folder: str | Path) -> Path | None:
    """The Hub cache repo folder (`models--ORG--NAME`) when `folder` lies in one of its snapshots, else None.

    A snapshot's files are links into that repo's `blobs/` (`snapshots/REV/f -> ../../blobs/HASH`),
    so the repo folder is the one place outside the model folder that its links may lead.
    """
    real = Path(folder).resolve()
    for p in (real, *real.parents):
        if p.parent.name == "snapshots" and (p.parent.parent / "blobs").is_dir():
            return p.parent.parent
    return None


def file_in_folder(folder: str | Path, name: str, where: str) -> Path:
    """`folder / name`, refused unless `name` is a plain relative path and the file stays in the folder.

    The name itself may not be absolute or hold `..`; the file it names may be a link, but its target
    must lie inside the folder or inside the Hub cache repo the folder is a snapshot of (see
    `hub_cache_repo`). `where` names the entry in the one-line error (e.g. an index and its key).
    """
    folder = Path(folder)
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or pure == PurePosixPath("."):
        raise MoemergeError(f"{where} names {name!r}, which is not a plain relative path inside {folder}; "
                            "fix the entry to a file name inside the model folder")
    real = (folder / pure).resolve()
    roots = [folder.resolve()] + [r for r in [hub_cache_repo(folder)] if r is not None]
    if not any(real.is_relative_to(r) for r in roots):
        raise MoemergeError(f"{where} names {name!r}, which resolves to {real}, outside {folder}"
                            f"{' and its Hub cache' if len(roots) > 1 else ''}; copy the file into the folder "
                            "(e.g. `cp -L`) instead of linking to it")
    return folder / pure


def read_config(folder: str | Path) -> dict[str, Any]:
    """A model folder's config.json as a dict; anything else (broken JSON, a list, not UTF-8) is one line."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoemergeError(f"{path} is not valid JSON ({e}); regenerate it or copy the source's") from None
    if not isinstance(config, dict):
        raise MoemergeError(f"{path} holds a JSON {type(config).__name__}, not an object of settings; regenerate it "
                            "or copy the source's")
    return config


def refuse_leaving_links(folder: str | Path, where: str) -> None:
    """The folder rule for commands that hand a folder to transformers (train, verify, ensemble): every link at
    its top level must stay inside it (or its Hub cache repo), as `CheckpointReader` requires of what it reads."""
    folder = Path(folder)
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if entry.is_symlink():
            file_in_folder(folder, entry.name, f"{where}: the link {entry}")


class CheckpointReader:
    """Index of a model folder's tensors, opened lazily one shard file at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise MoemergeError(f"{self.path} has no config.json; is this a Hugging Face model folder?")
        self.config: dict[str, Any] = read_config(self.path)
        self._handles: dict[str, Any] = {}
        self._bin: dict[str, dict[str, torch.Tensor]] = {}
        self._spans: dict[str, dict[str, tuple[int, int]]] = {}  # file -> key -> (byte offset, length)
        self._fds: dict[str, int] = {}  # files opened for read-ahead hints
        self.tensors: dict[str, TensorInfo] = self._scan()

    # -- discovery -------------------------------------------------------------------------
    def _scan(self) -> dict[str, TensorInfo]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = self._read_index(index)
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            file_in_folder(self.path, single.name, str(self.path))
            weight_map, files = None, ["model.safetensors"]
        else:
            return self._scan_bin()
        infos: dict[str, TensorInfo] = {}
        for name in files:
            for key, info in self._header(name).items():
                infos[key] = info
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if k not in infos or infos[k].file != f]
            if missing:
                k = missing[0]
                raise MoemergeError(
                    f"{index.name} maps {k!r} to {weight_map[k]}, but that shard does not hold it "
                    f"({len(missing)} such keys); the checkpoint is incomplete or its index is stale")
        return infos

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise MoemergeError(f"{index} is not a valid safetensors index ({e})") from None
        self._refuse_outside(index, weight_map)
        for f in set(weight_map.values()):
            if not (self.path / f).is_file():
                raise MoemergeError(f"{index.name} names shard {f}, which is missing from {self.path}")
        return weight_map

    def _refuse_outside(self, index: Path, weight_map: dict[str, str]) -> None:
        """Every shard an index names stays in the folder, checked before any shard is opened."""
        for key, f in weight_map.items():
            file_in_folder(self.path, f, f"{index.name} entry {key!r}")

    def _header(self, name: str) -> dict[str, TensorInfo]:
        f = self._open(name)
        out = {}
        for key in f.keys():
            sl = f.get_slice(key)
            dt = _ST_DTYPES.get(sl.get_dtype())
            if dt is None:
                raise MoemergeError(f"{name}: tensor {key!r} has unsupported dtype {sl.get_dtype()}")
            out[key] = TensorInfo(tuple(sl.get_shape()), dt, name)
        return out

    def _open(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(str(self.path / name), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise MoemergeError(
                    f"{self.path / name} is not a readable safetensors file ({e}); "
                    "it may be truncated or corrupt: download or copy it again") from None
        return self._handles[name]

    def _scan_bin(self) -> dict[str, TensorInfo]:
        """Legacy PyTorch pickles, loaded only with `weights_only=True` (no arbitrary code)."""
        index = self.path / "pytorch_model.bin.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._refuse_outside(index, weight_map)
            files = sorted(set(weight_map.values()))
        elif (self.path / "pytorch_model.bin").is_file():
            file_in_folder(self.path, "pytorch_model.bin", str(self.path))
            files = ["pytorch_model.bin"]
        else:
            raise MoemergeError(f"{self.path} holds no model weights (model.safetensors, its index, or "
                                "pytorch_model.bin)")
        infos = {}
        for name in files:
            try:
                sd = torch.load(self.path / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure means: refuse this file
                raise MoemergeError(
                    f"refusing {self.path / name}: it cannot be loaded safely with torch.load(weights_only=True) "
                    f"({type(e).__name__}); convert it to safetensors with a tool you trust") from None
            self._bin[name] = sd
            for k, t in sd.items():
                infos[k] = TensorInfo(tuple(t.shape), t.dtype, name)
        return infos

    def require_plain_weights(self) -> None:
        """Refuse quantized checkpoints: their tensors are packed codes, not weights we can copy or slice."""
        q = self.config.get("quantization_config")
        if q:
            method = q.get("quant_method", "?") if isinstance(q, dict) else q
            raise MoemergeError(
                f"{self.path} is a quantized checkpoint (quantization_config: {method}); load it with transformers, "
                "save it unquantized (e.g. bf16 safetensors without quantization_config), and use that folder")

    # -- access ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint, in index order."""
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape and file of one tensor, from the headers; a missing key is a `MoemergeError`."""
        if key not in self.tensors:
            raise MoemergeError(f"tensor {key!r} is missing from {self.path}")
        return self.tensors[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor, as a view on the memory-mapped file (no copy until touched)."""
        info = self.info(key)
        if info.file in self._bin:
            return self._bin[info.file][key]
        try:
            return self._open(info.file).get_tensor(key)
        except SafetensorError as e:
            raise MoemergeError(f"cannot read {key!r} from {self.path / info.file}: {e}") from None

    def prefetch(self, key: str) -> None:
        """Start reading a tensor's bytes into the page cache (`posix_fadvise(WILLNEED)`) without waiting.

        The memory map that `get` returns shares those pages, so a later touch finds them in memory.
        A hint only: where the OS has no such call, or for pickled weights, it does nothing.
        """
        info = self.tensors.get(key)
        if info is None or info.file in self._bin or not hasattr(os, "posix_fadvise"):
            return
        try:
            if info.file not in self._spans:
                self._fds[info.file] = os.open(self.path / info.file, os.O_RDONLY)
                self._spans[info.file] = _tensor_spans(self._fds[info.file])
            start, length = self._spans[info.file][key]
            os.posix_fadvise(self._fds[info.file], start, length, os.POSIX_FADV_WILLNEED)
        except (OSError, KeyError, ValueError):
            pass  # a failed hint costs nothing: the read happens when the tensor is written

    def total_bytes(self) -> int:
        """Bytes of all tensors, as the headers describe them."""
        return sum(i.nbytes for i in self.tensors.values())

    def close(self) -> None:
        """Close every open shard (file descriptors and safetensors handles)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._spans.clear()
        self._handles.clear()
        self._bin.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensor_spans(fd: int) -> dict[str, tuple[int, int]]:
    """(file offset, length) of every tensor of an open safetensors file, from its header."""
    n = int.from_bytes(os.pread(fd, 8, 0), "little")
    header = json.loads(os.pread(fd, n, 8))
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}

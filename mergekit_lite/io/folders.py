"""What the folders moemerge reads and writes are made of: the single place naming their files.

A model folder: which files belong to it (what `push` uploads and `check` counts), what is never sent (temporary
folders, caches, training state unless asked) and what looks like a credential. A training run's output folder
(`RunFolder`): every name `train` writes there, read by `train`, `--overwrite`, `check`, `push` and `plot`.
Pure path logic with no torch import, so `check` and `hub` both build on it and neither imports the other.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.reader import file_in_folder
from mergekit_lite.io.safety import ANY, MODEL_FOLDER, OLD_TAG, TMP_TAG


@dataclass(frozen=True)
class RunFolder:
    """The output folder of `moemerge train`, by name: one description that every reader and writer uses.

    `train` writes all of these; `--overwrite` removes only them (`PRODUCTS`), `check` recognises a run folder
    by its markers and points at `final/`, `push` leaves `checkpoints/` out, and `plot` reads `metrics.jsonl`.
    """

    path: Path

    RECORD: ClassVar[str] = "moemerge-run.json"  # written at start: this folder holds a run `train` started
    METRICS: ClassVar[str] = "metrics.jsonl"      # one JSON line per log event; the last one is the summary
    FINAL: ClassVar[str] = "final"                # the trained model, a plain HF folder
    CHECKPOINTS: ClassVar[str] = "checkpoints"    # checkpoints/step-NNNNNNN, the last `keep_checkpoints` kept
    CACHE: ClassVar[str] = "cache"                # packed token blocks, keyed by data, tokenizer and seq_len
    ADAPTER: ClassVar[str] = "adapter"            # the LoRA adapter beside the merged model
    TRACKER: ClassVar[str] = "moemerge"           # accelerate's tracker folder under project_dir (tensorboard)
    TRAINER_STATE: ClassVar[str] = "trainer_state.json"  # inside a checkpoint, written last
    PLOTS: ClassVar[tuple[str, ...]] = ("loss.png", "lr.png", "expert_load.png", "peer_usage.png")  # `moemerge plot`
    MARKERS: ClassVar[tuple[str, ...]] = (RECORD, METRICS, FINAL)  # any of them: a run folder, not a model
    # All that `--overwrite` may remove, with what each folder may hold (None: a plain file; ANY: anything).
    PRODUCTS: ClassVar[dict[str, tuple[str, ...] | None]] = {
        CHECKPOINTS: ("step-???????", "step-???????.tmp"), METRICS: None, FINAL: MODEL_FOLDER,
        CACHE: ("packed-*",), ADAPTER: ("adapter_config.json", "adapter_model.*", "README.md"),
        TRACKER: ANY, RECORD: None, **dict.fromkeys(PLOTS), f".{FINAL}.{TMP_TAG}-*": ANY,
        f".{FINAL}.{OLD_TAG}-*": ANY, f".{FINAL}.moemerge-lock": None}

    @property
    def record(self) -> Path:
        """The run record `--resume` requires."""
        return self.path / self.RECORD

    @property
    def metrics(self) -> Path:
        """`metrics.jsonl`."""
        return self.path / self.METRICS

    @property
    def final(self) -> Path:
        """The trained model's folder."""
        return self.path / self.FINAL

    @property
    def checkpoints(self) -> Path:
        """The folder holding one sub-folder per checkpoint."""
        return self.path / self.CHECKPOINTS

    @property
    def cache(self) -> Path:
        """The tokenised-corpus cache."""
        return self.path / self.CACHE

    @property
    def adapter(self) -> Path:
        """The LoRA adapter folder."""
        return self.path / self.ADAPTER

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint taken after optimizer step `step`."""
        return self.checkpoints / f"step-{step:07d}"

    def checkpoint_folders(self) -> list[Path]:
        """Every finished checkpoint, oldest first (zero-padded step numbers sort as numbers)."""
        return sorted(self.checkpoints.glob("step-???????")) if self.checkpoints.is_dir() else []

    def started(self) -> bool:
        """Whether a run already trained here (a checkpoint or a metrics line exists)."""
        return self.checkpoints.exists() or self.metrics.exists()

    def is_run(self) -> bool:
        """Whether the folder looks like a `train` output (and is not itself a model folder)."""
        return not (self.path / "config.json").exists() and any((self.path / m).exists() for m in self.MARKERS)


# Never uploaded: half-built folders from an interrupted command, VCS and tool caches.
ALWAYS_EXCLUDED = ("*.moemerge-tmp-*", "*.moemerge-old-*", ".git", ".cache", "__pycache__", ".DS_Store")
# Training state: large and useless to someone loading the model; uploaded only with --include-checkpoints.
CHECKPOINT_EXCLUDED = (RunFolder.CHECKPOINTS, "checkpoint-*", "optimizer*.pt", "optimizer*.bin",
                       "optimizer*.safetensors", "scheduler*.pt", "rng_state*.pth", "rng_state*.pt",
                       "accelerator_state*", "training_state*")
# What a model folder is made of: all that push uploads (checkpoints too with --include-checkpoints). Anything else
# (notes, eval dumps, core files) is left out and listed, so a folder used as a workspace publishes no stray file.
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
               "*.gguf", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "*.tiktoken", "special_tokens_map.json", "added_tokens.json", "vocab.json",
               "vocab.txt", "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
               "processor_config.json", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "README.md",
               "moemerge.json", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
               ".gitattributes",
               # Hugging Face custom code (moemerge's own classes: configuration_moemerge.py, modeling_moemerge.py)
               "configuration_*.py", "modeling_*.py")
# Files that look like credentials: push refuses the folder rather than upload one (Hub repos are public by default).
SECRETS = (".env", ".env.*", "*.env", "token", "hf_token", "*_token", "*.token", "*access_token*", ".netrc",
           "_netrc", ".git-credentials", "credentials", "credentials.*", "*.pem", "*.key", "*.p12", "*.pfx",
           "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.kdbx", ".ssh", ".aws", ".gnupg", "secrets",
           ".secrets")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def upload_files(folder: str | Path, include_checkpoints: bool = False) -> list[tuple[str, int]]:
    """(path relative to `folder`, bytes) of every file `push` would upload, sorted.

    A link counts as the file it points to (its size is the target's), and is refused unless that
    target lies inside the folder or the Hub cache repo the folder is a snapshot of; a link to a
    folder or a broken link is refused too, so no file is ever left out silently.
    """
    folder = Path(folder)
    skip = ALWAYS_EXCLUDED + (() if include_checkpoints else CHECKPOINT_EXCLUDED)
    _refuse_secrets(folder)
    files = []
    for root, dirs, names in os.walk(folder):
        # Prune excluded folders in place so a large checkpoints/ tree is never even listed.
        dirs[:] = sorted(d for d in dirs if not _excluded(d, skip))
        for name in dirs:
            if (Path(root) / name).is_symlink():
                rel = (Path(root) / name).relative_to(folder).as_posix()
                raise MoemergeError(f"push: {folder / rel} is a link to a folder, which push does not follow; "
                                    "copy that folder in (e.g. `cp -rL`) or remove the link")
        for name in names:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if _excluded(name, skip) or not _model_file(rel, include_checkpoints):
                continue
            if p.is_symlink():
                file_in_folder(folder, rel, f"push: the link {folder / rel}")
                if not p.is_file():
                    raise MoemergeError(f"push: {folder / rel} is a broken link; restore its target or delete it")
            if p.is_file():  # sockets, FIFOs and the like are not model files
                files.append((rel, p.stat().st_size))
    return sorted(files)


def refuse_missing_index_entries(folder: Path, files: list[tuple[str, int]], include_checkpoints: bool) -> None:
    """An uploaded index must not name a file the upload leaves out: the Hub repo would not load."""
    listed = {rel for rel, _ in files}
    skip = ALWAYS_EXCLUDED + (() if include_checkpoints else CHECKPOINT_EXCLUDED)
    for index in INDEX_FILES:
        if index not in listed:
            continue
        try:
            names = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise MoemergeError(f"push: {folder / index} is not a valid index ({e!r}); regenerate it") from None
        left_out = sorted(n for n in names if PurePosixPath(n).as_posix() not in listed)
        if left_out:
            name = left_out[0]
            rule = next((p for part in PurePosixPath(name).parts for p in skip if fnmatch.fnmatchcase(part, p)), None)
            why = f"push skips paths matching {rule!r}" if rule else "it is not in the folder"
            fix = " (or pass --include-checkpoints)" if rule in CHECKPOINT_EXCLUDED else ""
            raise MoemergeError(f"push: {index} names {name!r}, which push would not upload ({why}; "
                                f"{len(left_out)} such file(s)); move the shard to the folder's top level under a "
                                f"plain name and regenerate the index{fix}")


def _model_file(rel: str, include_checkpoints: bool) -> bool:
    """A file a model folder is made of (at its top level), or, with --include-checkpoints, of its checkpoints."""
    parts = PurePosixPath(rel).parts
    if include_checkpoints and any(_excluded(part, CHECKPOINT_EXCLUDED) for part in parts):
        return True
    return len(parts) == 1 and _excluded(parts[0], MODEL_FILES)


def left_out_files(folder: str | Path, include_checkpoints: bool = False) -> list[str]:
    """Files in `folder` that are not part of a model folder, so push leaves them out (not the excluded
    temporary/checkpoint paths, which push never lists)."""
    folder = Path(folder)
    skip = ALWAYS_EXCLUDED + (() if include_checkpoints else CHECKPOINT_EXCLUDED)
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _excluded(d, skip))
        for name in names:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if not _excluded(name, skip) and not _model_file(rel, include_checkpoints):
                out.append(rel)
    return sorted(out)


def _refuse_secrets(folder: Path) -> None:
    """Refuse a folder holding a file that looks like a credential: push would publish it."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _excluded(d, ALWAYS_EXCLUDED))
        for name in sorted(dirs) + sorted(names):
            if _excluded(name, SECRETS) or _excluded(name.lower(), SECRETS):
                rel = (Path(root) / name).relative_to(folder).as_posix()
                raise MoemergeError(f"push: {folder / rel} looks like a credential (matches one of "
                                    f"{', '.join(SECRETS[:6])}, ...); move it out of the model folder: push refuses "
                                    "to publish a folder holding one")


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether `name` matches one of the glob patterns (case-sensitive, as on the Hub)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)

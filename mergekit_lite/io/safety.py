"""Data-safety rules shared by every command that writes a folder.

Three rules, each checked before a byte is written:

* an output never resolves to, contains, or lies inside an input the command reads
  (`refuse_overlap`), so `--overwrite` can never replace a source model or a data file;
* `--overwrite` removes only what the command itself writes into a folder and refuses when the
  folder holds anything else (`remove_own_entries`);
* the temporary folders `AtomicDir` builds beside a target (`.NAME.moemerge-tmp-PID`, and
  `.NAME.moemerge-old-PID` while a finished folder replaces an older one) are removed on the next
  run for that target once their process has ended (`clear_stale_temps`), except a folder a killed run
  had moved aside and not yet replaced, which is put back (`restore_interrupted_swap`); `check` reports them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

from mergekit_lite.errors import MoemergeError
from mergekit_lite.plan import format_bytes

TMP_TAG = "moemerge-tmp"
OLD_TAG = "moemerge-old"


# ---- outputs never overlap inputs -------------------------------------------------------------
def _real(path: str | Path) -> Path:
    """Absolute path with every existing symlink resolved (a missing tail is kept as written)."""
    return Path(path).expanduser().resolve()


def refuse_overlap(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an output that is, contains, or lies inside one of `inputs`, symlinks resolved on both sides.

    Args:
        output: the folder the command is about to write (it need not exist yet).
        inputs: (what it is, path) pairs, e.g. ("the recipe's source", "models/dense"). Entries whose path
            is None or does not exist locally (Hub ids) are skipped: nothing local can be destroyed.

    Raises:
        MoemergeError: one line naming both paths, what the input is, and the fix.
    """
    out = _real(output)
    for what, given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        src = _real(given)
        if out == src:
            relation, fix = "is", "choose another output folder"
        elif src.is_relative_to(out):
            relation, fix = "contains", "choose an output outside it"
        elif out.is_relative_to(src):
            relation, fix = "lies inside", "choose an output outside it"
        else:
            continue
        shown = [f"{p} -> {r}" for p, r in ((output, out), (given, src)) if _absolute(p) != r]
        via = f" (links resolved: {'; '.join(shown)})" if shown else ""
        raise MoemergeError(f"output {output} {relation} {what} {given}{via}; {fix}")


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


# ---- --overwrite removes only the command's own products --------------------------------------
# What a model folder moemerge writes holds (top level): `remove_own_entries` checks a product folder's content.
MODEL_FOLDER = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "README.md", "moemerge.json", "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.*", "LICENSE*", "NOTICE", "configuration_moemerge.py",
                "modeling_moemerge.py")
ANY = ("*",)  # a product folder whose content is the command's own whatever it holds (a temporary folder)


RECORD_FILE = "moemerge.json"  # io.sidefiles.SIDECAR: the folder's provenance, holding the record below
# rewritten after the writer (by `verify --record`, by hand): not size-checked
EDITED = (RECORD_FILE, "README.md")
WRITTEN = "written"  # the sidecar's record of the files the writer put in the folder: name -> bytes


def record_written(folder: Path) -> None:
    """Add to the folder's sidecar (when it has one) every file the command wrote, with its size: the record
    `--overwrite` goes by, so it never removes a file the tool did not write, whatever its name."""
    path = folder / RECORD_FILE
    if not path.is_file():
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    record[WRITTEN] = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
                       if p.is_file() and not p.is_symlink() and p.name not in EDITED}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")


def written_record(folder: Path) -> dict[str, int] | None:
    """The sidecar's record of what moemerge wrote, or None for a folder written before it kept one."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise MoemergeError(f"--overwrite: {folder / RECORD_FILE} cannot be read as JSON; it replaces only model "
                            "folders moemerge wrote: check that file, or choose another output") from None
    written = record.get(WRITTEN) if isinstance(record, dict) else None
    return written if isinstance(written, dict) else None


def remove_own_entries(folder: str | Path, own: Mapping[str, tuple[str, ...] | None], command: str) -> list[Path]:
    """Delete the entries of `folder` that `command` writes; refuse, deleting nothing, if it holds others.

    Args:
        folder: the output folder (a missing folder is fine: nothing to remove).
        own: `fnmatch` pattern of each top-level name the command writes there -> None for a file, or for a
            folder the patterns of what it holds (its top level): an entry of the wrong kind (a user's folder
            named like our file) or a folder holding anything else is the user's, and refused.
        command: for the message, e.g. "moemerge train".

    Returns:
        The entries removed. A symlink among them is unlinked, never followed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    for p in entries:
        foreign = _foreign(p, own)
        if foreign is not None:
            raise MoemergeError(f"--overwrite: {folder} holds {foreign} that `{command}` did not write; it removes "
                                f"only {', '.join(own)} as it writes them; move that away or choose another output")
    for p in entries:
        _remove(p)
    return entries


def _foreign(p: Path, own: Mapping[str, tuple[str, ...] | None]) -> Path | None:
    """`p` itself, or what inside it, the command did not write; None when all of it is the command's."""
    inner: tuple[str, ...] | None | Literal[False] = next((v for pat, v in own.items() if fnmatch(p.name, pat)), False)
    if inner is False:
        return p
    if p.is_symlink() or inner is None:
        return None if (p.is_symlink() or not p.is_dir()) else p  # a file (or a link, only unlinked) expected
    if not p.is_dir():
        return p  # a folder expected, a file found
    written = written_record(p) if (p / RECORD_FILE).is_file() else None  # a model folder the writer recorded
    return next((q for q in sorted(p.iterdir()) if not any(fnmatch(q.name, pat) for pat in inner)
                 or written is not None and q.name not in EDITED
                 and (q.is_dir() or q.is_symlink() or written.get(q.name) != q.stat().st_size)), None)


def _remove(p: Path) -> None:
    """Unlink a file or link, delete a folder; already gone is fine (several ranks may clear at once)."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
        return

    for _ in range(10):  # another rank deleting the same tree makes rmtree trip on a vanished entry: go again
        try:
            shutil.rmtree(p)
            return
        except FileNotFoundError:
            if not p.exists():
                return
    shutil.rmtree(p)


# ---- temporary folders of killed runs ---------------------------------------------------------
@dataclass(frozen=True)
class Debris:
    """A temporary folder `AtomicDir` left beside a target."""

    path: Path
    pid: int
    alive: bool
    nbytes: int

    def describe(self) -> str:
        """One line for `check` and the writers: path, size and whether its process still runs."""
        state = "its process is still running" if self.alive else f"process {self.pid} has ended"
        return f"{self.path} ({format_bytes(self.nbytes)}, {state})"


def temp_path(target: Path, tag: str, pid: int | None = None) -> Path:
    """`.NAME.<tag>-PID` beside `target` (this process by default)."""
    return target.parent / f".{target.name}.{tag}-{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def find_debris(target: str | Path) -> list[Debris]:
    """Temporary folders of `target` left beside it by any process, with their owner's liveness and size."""
    target = _real(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:{TMP_TAG}|{OLD_TAG})-(\d+)")
    found = []
    for p in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            pid = int(m.group(1))
            found.append(Debris(p, pid, pid_alive(pid), folder_bytes(p)))
    return found


def restore_interrupted_swap(target: str | Path, echo: Callable[[str], None] | None = None) -> Path | None:
    """Put back the folder a killed run had moved aside to replace it, when nothing took its place.

    `AtomicDir` replaces a folder with two renames (target -> `.NAME.moemerge-old-PID`, new -> target); a run
    killed between them leaves no target and the previous folder under the old-tag name, which
    `clear_stale_temps` would delete. Renamed back, the target is as it was before that run (its new folder,
    never announced as written, stays debris). Returns the restored folder, or None.
    """
    target = Path(target)
    if target.exists() or target.is_symlink():
        return None
    moved = [d for d in find_debris(target) if not d.alive and d.path.name.startswith(f".{target.name}.{OLD_TAG}-")]
    if not moved:
        return None
    old = max(moved, key=lambda d: d.path.stat().st_mtime).path  # the latest, if ever there were several
    old.rename(target)
    if echo:
        echo(f"  restored {target} from {old.name}: a run replacing it was killed before the new folder took its "
             "place")
    return target


def clear_stale_temps(target: str | Path, echo: Callable[[str], None] | None = None) -> list[Debris]:
    """Remove `target`'s temporary folders whose process has ended (a live process's are left alone).

    Our own process's folders count as live: `AtomicDir` manages those itself.
    """
    removed = []
    for d in find_debris(target):
        if d.alive:
            continue
        shutil.rmtree(d.path, ignore_errors=True)
        removed.append(d)
        if echo:
            echo(f"  removed {d.path} ({format_bytes(d.nbytes)}), left by an interrupted run "
                 f"(process {d.pid} has ended)")
    return removed

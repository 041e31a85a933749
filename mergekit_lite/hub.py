"""`moemerge push`: check a model folder, then publish it to the Hugging Face Hub in one commit.

Upload path: `HfApi.create_commit` with one `CommitOperationAdd` per file we list and check (what
`upload_folder` does after globbing the folder), so the commit holds exactly those files: one commit
with our message, and with `hf_xet` (a dependency of huggingface_hub) an interrupted upload resumes
when re-run: data already sent is deduplicated chunk by chunk. `upload_large_folder` would also
resume, but it spreads the upload over many commits with generic messages and writes a cache folder
into the model folder. A link (a Hub cache snapshot is made of links into `blobs/`) is uploaded as
the bytes it points to, under the link's name.

The token is never read into our messages: huggingface_hub finds it (HF_TOKEN or `hf auth login`)
and every error we print is reduced to its first line with any token-looking text masked.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Callable

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.reader import file_in_folder
from mergekit_lite.plan import format_bytes

# Never uploaded: half-built folders from an interrupted command, VCS and tool caches.
ALWAYS_EXCLUDED = ("*.moemerge-tmp-*", "*.moemerge-old-*", ".git", ".cache", "__pycache__", ".DS_Store")
# Training state: large and useless to someone loading the model; uploaded only with --include-checkpoints.
CHECKPOINT_EXCLUDED = ("checkpoints", "checkpoint-*", "optimizer*.pt", "optimizer*.bin", "optimizer*.safetensors",
                       "scheduler*.pt", "rng_state*.pth", "rng_state*.pt", "accelerator_state*", "training_state*")
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
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")
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


def _refuse_missing_index_entries(folder: Path, files: list[tuple[str, int]], include_checkpoints: bool) -> None:
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
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _excluded(d, ALWAYS_EXCLUDED))
        for name in sorted(dirs) + sorted(names):
            if _excluded(name, SECRETS) or _excluded(name.lower(), SECRETS):
                rel = (Path(root) / name).relative_to(folder).as_posix()
                raise MoemergeError(f"push: {folder / rel} looks like a credential (matches one of "
                                    f"{', '.join(SECRETS[:6])}, ...); move it out of the model folder: push refuses "
                                    "to publish a folder holding one")


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def push_folder(folder: str | Path, repo: str, *, private: bool = False, revision: str = "main",
                dry_run: bool = False, include_checkpoints: bool = False, echo: Callable[[str], None] = print,
                trust_remote_code: bool = False) -> str:
    """`moemerge push`: check, list, then (unless `dry_run`) create the repo and upload in one commit.

    Returns the repo URL (with `/tree/REVISION` for another branch), or "" for a dry run.
    """
    from mergekit_lite.check import check_folder

    folder = Path(folder)
    if not _REPO_ID.match(repo):
        raise MoemergeError(f"--repo {repo!r} is not a Hub repo id; use ORG/NAME, e.g. my-org/mixtral-8x-upcycled")
    for line in check_folder(folder, trust_remote_code=trust_remote_code).lines():
        echo(line)
    files = upload_files(folder, include_checkpoints)
    _refuse_missing_index_entries(folder, files, include_checkpoints)
    total = sum(n for _, n in files)
    if not dry_run:
        _need_token()  # before announcing an upload that cannot start
    echo(f"{'would upload' if dry_run else 'uploading'} {len(files)} files, {format_bytes(total)} "
         f"to {repo}@{revision}{' (private)' if private else ''}:")
    for rel, n in files:
        link = "  (link: its target's bytes)" if (folder / rel).is_symlink() else ""
        echo(f"  {rel:<48} {format_bytes(n):>10}{link}")
    left = left_out_files(folder, include_checkpoints)
    if left:
        echo(f"left out ({len(left)} files that are not part of a model folder): {', '.join(left[:8])}"
             + (" ..." if len(left) > 8 else ""))
    if dry_run:
        echo("dry run: nothing was sent; the repo would be " + ("private" if private else
             "PUBLIC if it is new (pass --private to keep it private)"))
        return ""
    url = _upload(folder, repo, files, private=private, revision=revision)
    echo(f"pushed: {url}")
    return url


def _need_token() -> None:
    from huggingface_hub import get_token

    if get_token() is None:
        raise MoemergeError("push: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN; "
                            "nothing was sent")


def _upload(folder: Path, repo: str, files: list[tuple[str, int]], *, private: bool, revision: str) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    _need_token()
    _bound_waits()
    api = HfApi()
    try:
        # whoami is the first request: it fails fast on a bad token or an unreachable Hub, before anything is created.
        user = api.whoami().get("name", "?")
        api.create_repo(repo, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        # A link is sent as the file it points to (upload_files has checked where it leads).
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str((folder / rel).resolve())) for rel, _ in files]
        info = api.create_commit(repo, operations=ops, revision=revision, commit_message=_commit_message(folder),
                                 commit_description=f"Uploaded by {user} with `moemerge push` after `moemerge check`.")
    except Exception as e:  # noqa: BLE001 - HTTP, network and Hub errors all become one clear line
        raise MoemergeError(_failure(repo, e, constants.ENDPOINT)) from None
    url = str(getattr(info, "repo_url", "") or f"{constants.ENDPOINT}/{repo}")
    return url + (f"/tree/{revision}" if revision != "main" else "")


def _failure(repo: str, e: BaseException, endpoint: str) -> str:
    """One line for a failed push; offline mode and an unreachable Hub say what to do about them."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return "push needs the network, but HF_HUB_OFFLINE is set; unset it and run push again; nothing was sent"
    # Transport errors by class name: huggingface_hub has used requests, httpx and httpx2 across versions.
    if any(c.__name__ in ("TransportError", "ConnectionError", "Timeout") for c in type(e).__mro__):
        return (f"push: cannot reach {endpoint} ({_clean(e)}); check your network (or HF_ENDPOINT) and run push "
                "again; nothing was sent")
    return f"push to {repo} failed: {_clean(e)}; nothing was committed"


def _commit_message(folder: Path) -> str:
    from mergekit_lite.card import final_name
    from mergekit_lite.io.sidefiles import read_sidecar

    record = read_sidecar(folder) or {}
    steps = " -> ".join(s.get("step", "?") for s in record.get("lineage", []))
    return f"Upload {final_name(folder)}" + (f" (moemerge {record.get('kind')}: {steps})" if record else "")


def _bound_waits() -> None:
    """Give huggingface_hub's shared client the library's own time limits, so a dead Hub fails in seconds.

    huggingface_hub applies HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT (10 s each by default) to
    downloads only; its shared client waits forever on every other call (whoami, create_commit). We
    connect within HF_HUB_ETAG_TIMEOUT and allow each read or write 12 x HF_HUB_DOWNLOAD_TIMEOUT
    (2 min by default: the commit call can keep the Hub busy that long). Large files stream through
    hf_xet, which has its own retries and limits.
    """
    from huggingface_hub import constants, get_session

    session = get_session()
    session.timeout = type(session.timeout)(12.0 * constants.HF_HUB_DOWNLOAD_TIMEOUT,
                                            connect=float(constants.HF_HUB_ETAG_TIMEOUT))


def _clean(e: BaseException) -> str:
    """First line of an error, token-looking strings masked (HTTP errors can echo request details)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "***")
    return _TOKEN.sub("hf_***", text)

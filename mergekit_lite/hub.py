"""`moemerge push`: check a model folder, then publish it to the Hugging Face Hub in one commit.

Upload path: `HfApi.upload_folder`. It makes one commit with our message (a model folder is a few
dozen files, far below the size at which it splits a commit), and with `hf_xet` (a dependency of
huggingface_hub) an interrupted upload resumes when re-run: data already sent is deduplicated
chunk by chunk. `upload_large_folder` would also resume, but it spreads the upload over many
commits with generic messages and writes a cache folder into the model folder.

The token is never read into our messages: huggingface_hub finds it (HF_TOKEN or `hf auth login`)
and every error we print is reduced to its first line with any token-looking text masked.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from mergekit_lite.errors import MoemergeError
from mergekit_lite.plan import format_bytes

# Never uploaded: half-built folders from an interrupted command, VCS and tool caches.
ALWAYS_EXCLUDED = ("*.moemerge-tmp-*", "*.moemerge-old-*", ".git", ".cache", "__pycache__", ".DS_Store")
# Training state: large and useless to someone loading the model; uploaded only with --include-checkpoints.
CHECKPOINT_EXCLUDED = ("checkpoints", "checkpoint-*", "optimizer*.pt", "optimizer*.bin", "optimizer*.safetensors",
                       "scheduler*.pt", "rng_state*.pth", "rng_state*.pt", "accelerator_state*", "training_state*")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")
NETWORK_TIMEOUT_S = 10.0


def upload_files(folder: str | Path, include_checkpoints: bool = False) -> list[tuple[str, int]]:
    """(path relative to `folder`, bytes) of every file `push` would upload, sorted."""
    folder = Path(folder)
    skip = ALWAYS_EXCLUDED + (() if include_checkpoints else CHECKPOINT_EXCLUDED)
    files = []
    for root, dirs, names in os.walk(folder):
        # Prune excluded folders in place so a large checkpoints/ tree is never even listed.
        dirs[:] = sorted(d for d in dirs if not _excluded(d, skip))
        for name in names:
            p = Path(root) / name
            if not _excluded(name, skip) and p.is_file() and not p.is_symlink():
                files.append((p.relative_to(folder).as_posix(), p.stat().st_size))
    return sorted(files)


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def push_folder(folder: str | Path, repo: str, *, private: bool = False, revision: str = "main",
                dry_run: bool = False, include_checkpoints: bool = False, echo: Callable[[str], None] = print) -> str:
    """`moemerge push`: check, list, then (unless `dry_run`) create the repo and upload in one commit.

    Returns the repo URL (with `/tree/REVISION` for another branch), or "" for a dry run.
    """
    from mergekit_lite.check import check_folder

    folder = Path(folder)
    if not _REPO_ID.match(repo):
        raise MoemergeError(f"--repo {repo!r} is not a Hub repo id; use ORG/NAME, e.g. my-org/mixtral-8x-upcycled")
    for line in check_folder(folder).lines():
        echo(line)
    files = upload_files(folder, include_checkpoints)
    total = sum(n for _, n in files)
    echo(f"{'would upload' if dry_run else 'uploading'} {len(files)} files, {format_bytes(total)} "
         f"to {repo}@{revision}{' (private)' if private else ''}:")
    for rel, n in files:
        echo(f"  {rel:<48} {format_bytes(n):>10}")
    if dry_run:
        echo("dry run: nothing was sent")
        return ""
    url = _upload(folder, repo, files, private=private, revision=revision)
    echo(f"pushed: {url}")
    return url


def _upload(folder: Path, repo: str, files: list[tuple[str, int]], *, private: bool, revision: str) -> str:
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise MoemergeError("push needs the network, but HF_HUB_OFFLINE is set; unset it and run push again")
    if get_token() is None:
        raise MoemergeError("push: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN")
    _probe(constants.ENDPOINT)
    _bound_waits()
    api = HfApi()
    try:
        user = api.whoami().get("name", "?")  # fails fast on a bad token, before anything is created
        api.create_repo(repo, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision,
                                 allow_patterns=[rel for rel, _ in files],
                                 commit_message=_commit_message(folder),
                                 commit_description=f"Uploaded by {user} with `moemerge push` after `moemerge check`.")
    except Exception as e:  # noqa: BLE001 - HTTP, network and Hub errors all become one clear line
        raise MoemergeError(f"push to {repo} failed: {_clean(e)}; nothing was committed") from None
    url = str(getattr(info, "repo_url", "") or f"{constants.ENDPOINT}/{repo}")
    return url + (f"/tree/{revision}" if revision != "main" else "")


def _commit_message(folder: Path) -> str:
    from mergekit_lite.card import final_name
    from mergekit_lite.io.sidefiles import read_sidecar

    record = read_sidecar(folder) or {}
    steps = " -> ".join(s.get("step", "?") for s in record.get("lineage", []))
    return f"Upload {final_name(folder)}" + (f" (moemerge {record.get('kind')}: {steps})" if record else "")


def _probe(endpoint: str) -> None:
    """A TCP connect with a short timeout, so an offline machine fails in seconds, not after long retries.

    Behind a proxy (HTTPS_PROXY & co, honoured by huggingface_hub) the proxy is what must answer.
    """
    url = urlparse(endpoint)
    proxy = None if urllib.request.proxy_bypass(url.hostname or "") else (
        urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all"))
    target = urlparse(proxy) if proxy else url
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=NETWORK_TIMEOUT_S).close()
    except OSError as e:
        via = f" via proxy {target.hostname}:{port}" if proxy else ""
        raise MoemergeError(f"push: cannot reach {url.scheme}://{url.netloc}{via} ({e.strerror or type(e).__name__}); "
                            "check your network (or HF_ENDPOINT) and run push again; nothing was sent") from None


def _bound_waits() -> None:
    """huggingface_hub's HTTP client waits forever by default; a stalled Hub should fail, not hang.

    The limits apply to each connect / read / write, not to the whole upload (large files stream
    through hf_xet, which has its own retries).
    """
    from huggingface_hub import get_session

    session = get_session()
    session.timeout = type(session.timeout)(120.0, connect=NETWORK_TIMEOUT_S)


def _clean(e: BaseException) -> str:
    """First line of an error, token-looking strings masked (HTTP errors can echo request details)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "***")
    return _TOKEN.sub("hf_***", text)

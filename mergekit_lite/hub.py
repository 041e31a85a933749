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

import os
import re
from collections.abc import Callable
from pathlib import Path

from mergekit_lite.errors import MoemergeError, first_line
from mergekit_lite.io.folders import left_out_files, refuse_missing_index_entries, upload_files
from mergekit_lite.plan import format_bytes

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


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
    refuse_missing_index_entries(folder, files, include_checkpoints)
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
    text = first_line(e)
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "***")
    return _TOKEN.sub("hf_***", text)

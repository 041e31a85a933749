"""The README and the docs pages run as written, and the upcycle plan's parity promise states its dtype condition.

`test_readme_commands_run_in_order` (marker `readme`; CI runs it with `pytest -q -m "distributed or readme"`)
takes every ```bash block of README.md, then of each docs page in `PAGES` order, except a block whose previous
line is the marker `<!-- not run by tests/test_readme.py: REASON -->` (installs, Hub uploads with a token, opt-in
test tiers), and runs each command line with `bash -e` in one fresh temporary folder holding a link to the repo's
`recipes/`, with this interpreter's environment first on PATH and the Hub offline. A command already run by an
earlier block (the same command, its trailing comment aside) is not run again: the README's examples reappear on
the command pages. The first command it meets is `moemerge quickstart`, so every later command runs on the
models a newcomer has.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergekit_lite.ops.upcycle import plan_upcycle
from mergekit_lite.recipe import UpcycleRecipe, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# README first, then the pages in the order a reader follows them; every docs/*.md must be listed
PAGES = [README] + [ROOT / "docs" / f"{name}.md" for name in
                    ("upcycle", "graft", "train", "ensemble", "publish", "recipes", "benchmarks")]
SKIP_MARKER = "<!-- not run by tests/test_readme.py:"
FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
COMMAND_TIMEOUT_S = 900  # the quickstart takes ~1 min on 2 quiet cores; a hung launcher must not hang CI


def readme_blocks(text: str) -> list[tuple[int, str, bool]]:
    """Every ```bash block as (line number, body, runs): runs is False after the skip marker."""
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((line, m.group(1), not before.startswith(SKIP_MARKER)))
    return blocks


def block_commands(body: str) -> list[str]:
    """One command per line (a trailing backslash joins lines); blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n", " ", body)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def same_command(cmd: str) -> str:
    """A command without its trailing comment and extra spaces: what decides whether it already ran."""
    return " ".join(re.sub(r"\s#.*$", "", cmd).split())


def commands_to_run(pages: list[Path]) -> list[tuple[str, int, str]]:
    """(page, line, command) for every command of the pages' runnable blocks, each distinct command once."""
    seen: set[str] = set()
    out = []
    for page in pages:
        for line, body, runs in readme_blocks(page.read_text()):
            for cmd in block_commands(body) if runs else []:
                if same_command(cmd) not in seen:
                    seen.add(same_command(cmd))
                    out.append((page.relative_to(ROOT).as_posix(), line, cmd))
    return out


def test_skip_marker_and_command_split():
    text = ("x\n```bash\na one  # c\n\n# only a comment\nb \\\n  two\n```\n"
            f"{SKIP_MARKER} needs a token -->\n```bash\npush\n```\n```yaml\nk: v\n```\n")
    blocks = readme_blocks(text)
    assert [(n, runs) for n, _, runs in blocks] == [(2, True), (10, False)]
    assert block_commands(blocks[0][1]) == ["a one  # c", "b    two"]


def test_readme_skips_only_what_it_must():
    """Installs, the real Hub upload and opt-in tiers are marked; everything else is run by the test below."""
    blocks = [b for page in PAGES for b in readme_blocks(page.read_text())]
    skipped = [cmd for _, body, runs in blocks if not runs for cmd in block_commands(body)]
    # installs, a real upload, and what needs the real model or the Hub (the opt-in real tier's ensembles)
    allowed = (r"(python3 -m venv|pip install|moemerge push .*--repo|python scripts/compare_ensembles\.py"
               r"|moemerge ensemble recipes/ensemble/(exchange-arithmetic|fuse-mixed-families)\.yaml)")
    assert all(re.match(allowed, c) for c in skipped), skipped
    assert not any("--dry-run" in c and "push" in c for c in skipped)
    run = [cmd for _, _, cmd in commands_to_run(PAGES)]
    assert run[0].startswith("moemerge quickstart"), run[0]
    assert not any("path/to" in c for c in run), [c for c in run if "path/to" in c]


def test_every_docs_page_is_run_and_linked_from_a_short_readme():
    readme = README.read_text()
    assert len(readme.splitlines()) <= 300
    assert sorted(p.name for p in PAGES[1:]) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in readme, f"README does not link docs/{page.name}"


def test_a_command_runs_once_whatever_its_comment():
    pages = {"a": "```bash\nmoemerge x  # first\nmoemerge y\n```\n", "b": "```bash\nmoemerge x   # again\n```\n"}
    assert [same_command(c) for c in ("moemerge x  # first", "moemerge  x")] == ["moemerge x", "moemerge x"]

    class Page:
        def __init__(self, name: str):
            self.name = name

        def read_text(self) -> str:
            return pages[self.name]

        def relative_to(self, _root: Path) -> Path:
            return Path(self.name)

    assert [c for _, _, c in commands_to_run([Page("a"), Page("b")])] == ["moemerge x  # first", "moemerge y"]


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = README.read_text()
    pytest_part = re.search(r"&& (pytest .*)$", ci, re.M).group(1)
    install_line = next(body for _, body, _ in readme_blocks(readme) if "pytest" in body and "venv" in body)
    assert install_line.strip().endswith(pytest_part), (install_line, pytest_part)
    assert "readme" in pytest_part


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if len(text) > n else text


@pytest.mark.readme
def test_readme_commands_run_in_order(tmp_path):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    timings = []
    for page, line, cmd in commands_to_run(PAGES):
        t0 = time.perf_counter()
        p = subprocess.run(["bash", "-e", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=COMMAND_TIMEOUT_S)
        timings.append((time.perf_counter() - t0, cmd))
        assert p.returncode == 0, (f"{page} block at line {line}: `{cmd}` exited {p.returncode}\n"
                                   f"--- stdout tail ---\n{_tail(p.stdout)}\n"
                                   f"--- stderr tail ---\n{_tail(p.stderr)}")
    print("\n".join(f"{s:7.1f} s  {c}" for s, c in timings))
    assert len(timings) >= 15


# --- the plan's parity promise -------------------------------------------------------------------------------

def _plan_notes(source: Path, dtype: str) -> list[str]:
    body = {"source": str(source), "architecture": "mixtral", "num_experts": 4, "experts_per_token": 2,
            "dtype": dtype}
    plan, _ = plan_upcycle(validate_recipe(body, UpcycleRecipe), yaml.safe_dump(body))
    return plan.notes


@pytest.mark.parametrize("dtype", ["source", "float32"])
def test_parity_promise_unconditional_when_dtype_keeps_precision(pico_llama, dtype):
    notes = _plan_notes(pico_llama, dtype)
    assert "identical experts: step-0 logits equal the dense model's (check with `moemerge verify`)" in notes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_parity_promise_states_rounding_when_output_is_less_precise(pico_llama, dtype):
    notes = _plan_notes(pico_llama, dtype)
    promise = [n for n in notes if n.startswith("identical experts")]
    assert promise == [f"identical experts, but weights rounded float32 -> {dtype}: step-0 logits equal those of "
                       "the dense model rounded the same way, not the source's own (`moemerge verify` against the "
                       "source shows the rounding; `dtype: source` keeps exact parity)"]

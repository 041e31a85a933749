"""`moemerge quickstart` runs the whole story (with few steps here) and its numbers hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mergekit_lite.quickstart import run_quickstart


def test_quickstart_story(tmp_path, capsys):
    lines: list[str] = []
    result = run_quickstart(tmp_path / "qs", pretrain_steps=4, steps=12, echo=lines.append)
    assert result["parity_max_abs"] <= 1e-4
    for name in ("dense", "moe"):
        run = result["runs"][name]
        assert run["steps"] == 12 and run["final_val_loss"] < run["initial_val_loss"]
        assert (tmp_path / "qs" / "runs" / name / "final" / "model.safetensors").exists()
        # validation every tenth of the run (every other step for so short a run), so the plotted curve is measured
        vals = [json.loads(r) for r in (tmp_path / "qs" / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in vals if r["type"] == "val"] == list(range(0, 13, 2))
    assert [p.name for p in result["plots"]] == ["loss.png", "lr.png", "loss.png", "lr.png", "expert_load.png",
                                                "compare.png"]
    text = "\n".join(lines)
    assert "step-0 parity PASS" in text and "Mixtral 8 experts top-2" in text
    assert (tmp_path / "qs" / "moe" / "moemerge.json").read_text().count("max_abs") == 1

    # one progress bar per phase on stderr, each run to its end, the training ones with tokens/s
    err = capsys.readouterr().err.replace("\r", "\n")
    for label, end in (("pretrain", "4/4"), ("train dense", "12/12"), ("train MoE", "12/12")):
        assert re.search(rf"^{label}: 100%.* {end} .*tok_s=\d+", err, re.M), (label, err[-2000:])
    assert re.search(r"^upcycle: 100%.*B/s", err, re.M), err[-2000:]

    # the conclusion's numbers are the two summaries'
    dense, moe = result["runs"]["dense"], result["runs"]["moe"]
    (line,) = [ln for ln in lines if ln.startswith("conclusion:")]
    winner, loser = ("the upcycled MoE", moe) if moe["final_val_loss"] < dense["final_val_loss"] else (
        "the dense model", dense)
    low, high = sorted([dense["final_val_loss"], moe["final_val_loss"]])
    assert line.startswith(f"conclusion: {winner} reached the lower validation loss, {low:.4f} vs {high:.4f}")
    assert f"({high - low:.4f} nats/token, {100 * (high - low) / high:.1f}% lower)" in line
    assert (f"{moe['tokens_per_s']:.0f} tokens/s vs the dense model's {dense['tokens_per_s']:.0f} "
            f"({moe['tokens_per_s'] / dense['tokens_per_s']:.2f}x the dense speed) for the same {moe['tokens']} "
            "tokens") in line
    assert lines.index(line) > next(i for i, ln in enumerate(lines) if ln.startswith("plots:"))

    # the last line names files, every one of which exists
    assert lines[-1].startswith("files: ")
    named = [Path(p) for p in lines[-1].removeprefix("files: ").split(", ")]
    assert len(named) == 7 and all(p.exists() for p in named), [p for p in named if not p.exists()]
    assert tmp_path / "qs" / "runs" / "compare.png" in named
    assert all("{" not in str(p) and "checkpoints" not in str(p) for p in named)
    (nxt,) = [ln for ln in lines if ln.startswith("next: ")]
    assert str(tmp_path / "qs" / "runs" / "compare.png") in nxt


def test_a_second_quickstart_says_it_is_done_and_exits_cleanly(tmp_path):
    """A newcomer runs `moemerge quickstart` twice (README, then docs/upcycle.md); the second used to exit 2."""
    done = tmp_path / "qs"
    (done / "runs" / "moe" / "final").mkdir(parents=True)
    (done / "runs" / "moe" / "final" / "model.safetensors").write_bytes(b"x")
    lines: list[str] = []
    assert run_quickstart(done, echo=lines.append) == {"already_done": True}
    assert lines == [f"{done} already holds a finished quickstart (models in {done / 'dense'}, {done / 'moe'}, runs in "
                     f"{done / 'runs'}); pass --overwrite to run it again"]
    assert (done / "runs" / "moe" / "final" / "model.safetensors").read_bytes() == b"x"  # untouched

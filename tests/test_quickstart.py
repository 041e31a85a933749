"""`moemerge quickstart` runs the whole story (with few steps here) and its numbers hold."""

from __future__ import annotations

from mergekit_lite.quickstart import run_quickstart


def test_quickstart_story(tmp_path):
    lines: list[str] = []
    result = run_quickstart(tmp_path / "qs", pretrain_steps=4, steps=12, echo=lines.append)
    assert result["parity_max_abs"] <= 1e-4
    for name in ("dense", "moe"):
        run = result["runs"][name]
        assert run["steps"] == 12 and run["final_val_loss"] < run["initial_val_loss"]
        assert (tmp_path / "qs" / "runs" / name / "final" / "model.safetensors").exists()
    assert {p.name for p in result["plots"]} == {"loss.png", "lr.png", "expert_load.png"}
    text = "\n".join(lines)
    assert "step-0 parity PASS" in text and "Mixtral 8 experts top-2" in text
    assert (tmp_path / "qs" / "moe" / "moemerge.json").read_text().count("max_abs") == 1

"""`moemerge plot`: PNGs from metrics.jsonl, with the heatmap showing the last router record."""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from mergekit_lite.errors import MoemergeError
from mergekit_lite.train.plot import load_matrix, plot_run, read_metrics


def write_metrics(folder, router: bool = True):
    rows = [{"type": "val", "step": 0, "val_loss": 6.0}]
    for s in range(1, 11):
        rows.append({"type": "train", "step": s, "tokens": 64 * s, "loss": 6 - s / 10, "ce": 6 - s / 10, "balance": 1.0,
                     "z": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0})
        if router:
            rows.append({"type": "router", "step": s, "load": [[0.1 * s / 10, 1 - 0.1 * s / 10], [0.5, 0.5]],
                         "max_over_mean": [2 - 0.1 * s / 10, 1.0], "dead": [0, 0], "entropy": [0.6, 0.69]})
    rows.append({"type": "val", "step": 10, "val_loss": 5.0})
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plots_moe_run(tmp_path):
    write_metrics(tmp_path / "run")
    paths = plot_run(tmp_path / "run")
    assert [p.name for p in paths] == ["loss.png", "lr.png", "expert_load.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        h, w = imread(str(p)).shape[:2]
        assert h > 200 and w > 400
    assert load_matrix(read_metrics(tmp_path / "run")["router"]) == [[0.1, 0.9], [0.5, 0.5]]


def test_dense_run_has_no_expert_plot(tmp_path):
    write_metrics(tmp_path / "run", router=False)
    assert [p.name for p in plot_run(tmp_path / "run", tmp_path / "png")] == ["loss.png", "lr.png"]


def test_missing_and_empty(tmp_path):
    with pytest.raises(MoemergeError, match="not found"):
        plot_run(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(MoemergeError, match="no training records"):
        plot_run(tmp_path / "empty")

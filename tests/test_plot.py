"""`moemerge plot`: PNGs from metrics.jsonl, with the heatmap showing the last router record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.errors import MoemergeError
from mergekit_lite.train import plot
from mergekit_lite.train.plot import (
    ema,
    imbalance_series,
    load_matrix,
    loss_figure,
    plot_compare,
    plot_run,
    read_metrics,
    val_by_tokens,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAST_LOAD = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.5, 0.5]]


def write_metrics(folder, router: bool = True, steps: int = 10) -> None:
    """A run as the loop logs it: val at 0, train + router every step, val at the end, a summary, an unknown type."""
    rows = [{"type": "val", "step": 0, "val_loss": 6.0}]
    for s in range(1, steps + 1):
        rows.append({"type": "train", "step": s, "tokens": 64 * s, "loss": 6.1 - s / 10, "ce": 6 - s / 10,
                     "balance": 1.0, "z": 2.0, "lr": 1e-3 * min(1, s / 3), "grad_norm": 1.0, "tokens_per_s": 100.0})
        if router:
            load = LAST_LOAD if s == steps else [[0.7, 0.1, 0.1, 0.1]] * 3
            rows.append({"type": "router", "step": s, "load": load,
                         "max_over_mean": [max(r) * 4 for r in load], "dead": [0, 0, 2], "entropy": [1.2] * 3})
    rows += [{"type": "val", "step": steps, "val_loss": 5.0}, {"type": "summary", "step": steps, "tokens_per_s": 99},
             {"type": "something_new", "step": steps}]
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def check_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    h, w, channels = imread(str(path)).shape
    assert h > 200 and w > 400 and channels in (3, 4)


def test_moe_run_gives_three_pngs_and_heatmap_is_last_router_record(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run")
    drawn = []
    real_save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, path: drawn.append((path.name, fig)) or real_save(fig, path))
    paths = plot_run(tmp_path / "run")
    assert [p.name for p in paths] == ["loss.png", "lr.png", "expert_load.png"]
    assert all(p.parent == tmp_path / "run" for p in paths)
    for p in paths:
        check_png(p)
    groups = read_metrics(tmp_path / "run")
    assert load_matrix(groups["router"]) == LAST_LOAD
    heat = dict(drawn)["expert_load.png"].axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(heat), np.asarray(LAST_LOAD))
    steps, series = imbalance_series(groups["router"])
    assert steps == list(range(1, 11)) and series[1] == [2.8] * 9 + [1.0]
    # loss panel (10 points: too few to smooth): train CE, the optimised loss (differs by the router terms),
    # validation
    lines = dict(drawn)["loss.png"].axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["train cross-entropy (as logged)", "train loss incl. router losses",
                                               "validation"]
    assert list(lines[2].get_ydata()) == [6.0, 5.0]


def test_dense_run_draws_loss_and_lr_and_says_why(tmp_path):
    write_metrics(tmp_path / "run", router=False)
    notes = []
    paths = plot_run(tmp_path / "run", tmp_path / "png" / "nested", echo=notes.append)
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    assert all(p.parent == tmp_path / "png" / "nested" for p in paths)
    assert notes == ["no router records (dense model): expert_load.png not drawn"]


def test_cli_prints_paths(tmp_path):
    write_metrics(tmp_path / "run", router=False)
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "-o", str(tmp_path / "png")])
    assert res.exit_code == 0, res.output
    assert "dense model" in res.output
    assert f"wrote {tmp_path / 'png' / 'loss.png'}" in res.output.replace("\n", "")
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "nothing")])
    # main() turns this into one line on stderr and exit status 2
    assert isinstance(res.exception, MoemergeError) and "not found" in str(res.exception)


def test_bad_run_folders(tmp_path):
    with pytest.raises(MoemergeError, match="run folder .* not found"):
        plot_run(tmp_path / "nothing")
    (tmp_path / "nofile").mkdir()
    with pytest.raises(MoemergeError, match="metrics.jsonl not found"):
        plot_run(tmp_path / "nofile")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(MoemergeError, match="no training records"):
        plot_run(tmp_path / "empty")
    (tmp_path / "cut").mkdir()
    cut = '{"type": "train", "step": 1, "loss": 3.0, "lr": 1e-3}\n{"type": "tr'  # killed mid-write
    (tmp_path / "cut" / "metrics.jsonl").write_text(cut)
    with pytest.raises(MoemergeError, match=r"metrics.jsonl:2 is not valid JSON"):
        plot_run(tmp_path / "cut")
    assert not (tmp_path / "cut" / "loss.png").exists()


def test_ragged_load_table_is_refused(tmp_path):
    with pytest.raises(MoemergeError, match="layer x expert"):
        load_matrix([{"type": "router", "step": 3, "load": [[0.5, 0.5], [1.0]]}])
    with pytest.raises(MoemergeError, match="step 4"):
        load_matrix([{"type": "router", "step": 4, "load": []}])


def noisy_run(folder, steps: int = 60, tokens_per_step: int = 64, val_every: int = 20, level: float = 6.0) -> None:
    """A run whose per-step cross-entropy zigzags by +-0.5 around a slow decline, validated every `val_every`."""
    rows = [{"type": "val", "step": 0, "val_loss": level}]
    for s in range(1, steps + 1):
        ce = level - s / 100 + 0.5 * (-1) ** s
        rows.append({"type": "train", "step": s, "tokens": tokens_per_step * s, "loss": ce, "ce": ce, "lr": 1e-3})
        if s % val_every == 0:
            rows.append({"type": "val", "step": s, "val_loss": level - s / 100})
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_loss_plot_draws_validation_as_points_and_smooths_train(tmp_path):
    noisy_run(tmp_path / "run")
    fig = loss_figure(read_metrics(tmp_path / "run"), "run")
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    val = lines["validation"]
    # measured at steps 0, 20, 40, 60 only: markers, no line through the steps in between
    assert val.get_linestyle() == "None" and val.get_marker() == "o"
    assert list(val.get_xdata()) == [0, 20, 40, 60]
    raw = lines["train cross-entropy (as logged)"]
    smooth = lines["train cross-entropy (moving average, span 10)"]
    assert raw.get_alpha() < 0.5 and smooth.get_alpha() is None  # raw faint behind the average
    ce = list(raw.get_ydata())
    np.testing.assert_allclose(smooth.get_ydata(), ema(ce, 10))
    # the +-0.5 zigzag (steps of 1.0) is cut more than 6-fold in the average after its first span; the decline kept
    assert np.abs(np.diff(ce)).min() > 0.9
    assert np.abs(np.diff(smooth.get_ydata()[10:])).max() < 0.15
    assert smooth.get_ydata()[-1] < smooth.get_ydata()[10]


def test_ema_is_unbiased_at_the_start():
    assert ema([4.0, 4.0, 4.0], 5) == pytest.approx([4.0, 4.0, 4.0])
    assert ema([1.0, 3.0], 3) == pytest.approx([1.0, (0.5 * 0.5 * 1 + 0.5 * 3) / (0.5 * 0.5 + 0.5)])


def test_compare_plot_puts_both_validation_curves_on_tokens_seen(tmp_path, monkeypatch):
    noisy_run(tmp_path / "dense", tokens_per_step=64, val_every=20)
    noisy_run(tmp_path / "moe", tokens_per_step=64, val_every=30, level=5.5)
    drawn = []
    real_save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, path: drawn.append(fig) or real_save(fig, path))
    path = plot_compare({"dense": tmp_path / "dense", "MoE": tmp_path / "moe"}, tmp_path / "compare.png")
    check_png(path)
    (ax,) = drawn[0].axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"dense", "MoE"} and ax.get_xlabel() == "tokens seen"
    assert list(lines["dense"].get_xdata()) == [0, 1280, 2560, 3840]
    assert list(lines["MoE"].get_xdata()) == [0, 1920, 3840]
    assert list(lines["MoE"].get_ydata()) == pytest.approx([5.5, 5.2, 4.9])
    assert all(ln.get_linestyle() == "None" for ln in lines.values())
    assert val_by_tokens(read_metrics(tmp_path / "moe")) == ([0, 1920, 3840], pytest.approx([5.5, 5.2, 4.9]))

"""`moemerge plot RUN_DIR`: PNGs from metrics.jsonl (loss, learning rate, expert load per layer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mergekit_lite.errors import MoemergeError


def read_metrics(run_dir: str | Path) -> dict[str, list[dict]]:
    """metrics.jsonl grouped by record type (train, val, router, summary, any other type kept as is).

    Raises:
        MoemergeError: the folder or its metrics.jsonl is missing, a line is not JSON, or there is no train record.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise MoemergeError(f"run folder {folder} not found; give the `output:` folder of a `moemerge train` recipe")
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise MoemergeError(f"{path} not found; {folder} is not a `moemerge train` output folder (or the run has "
                            "not started logging yet)")
    groups: dict[str, list[dict]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise MoemergeError(f"{path}:{n} is not valid JSON (a run killed mid-write? delete that line)") from None
        groups.setdefault(row.get("type", "?"), []).append(row)
    if not groups.get("train"):
        raise MoemergeError(f"{path} has no training records yet; plot again after the first logged step")
    return groups


def load_matrix(router_rows: list[dict]) -> list[list[float]]:
    """Share of routed tokens, layer x expert, from the last router record.

    Raises:
        MoemergeError: the record's `load` is not a non-empty layer x expert table.
    """
    last = router_rows[-1]
    load = last.get("load")
    if not load or not all(isinstance(row, list) and len(row) == len(load[0]) > 0 for row in load):
        raise MoemergeError(f"router record at step {last.get('step')}: `load` must be a non-empty layer x expert "
                            f"table, got {str(load)[:80]}")
    return load


def imbalance_series(router_rows: list[dict]) -> tuple[list[int], list[list[float]]]:
    """(steps, per-layer max/mean load at each of those steps); 1.0 means perfectly even routing."""
    steps = [r["step"] for r in router_rows]
    layers = len(router_rows[-1]["max_over_mean"])
    return steps, [[r["max_over_mean"][i] for r in router_rows] for i in range(layers)]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None,
             echo: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Write loss.png, lr.png and (for MoE runs) expert_load.png into `out_dir` (default: the run folder).

    Args:
        run_dir: a `moemerge train` output folder holding metrics.jsonl.
        out_dir: where the PNGs go; created if needed.
        echo: receives a note when the run has no router records (dense model).

    Returns:
        The paths written, in the order loss, lr, expert_load.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI

    m = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(run_dir).resolve().name
    paths = [_loss_png(m, out / "loss.png", name), _lr_png(m["train"], out / "lr.png", name)]
    if m.get("router"):
        paths.append(_load_png(m["router"], out / "expert_load.png", name))
    else:
        echo("no router records (dense model): expert_load.png not drawn")
    return paths


def _loss_png(m: dict[str, list[dict]], path: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    train = m["train"]
    steps = [r["step"] for r in train]
    ce = [r.get("ce", r["loss"]) for r in train]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, ce, label="train cross-entropy")
    total = [r["loss"] for r in train]
    # the optimised loss adds the router losses; draw it only when it differs from the cross-entropy
    if any(abs(a - b) > 1e-6 for a, b in zip(total, ce)):
        ax.plot(steps, total, lw=0.8, alpha=0.6, label="train loss incl. router losses")
    if m.get("val"):
        ax.plot([r["step"] for r in m["val"]], [r["val_loss"] for r in m["val"]], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{name}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _lr_png(train: list[dict], path: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title=f"{name}: learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _load_png(router: list[dict], path: Path, name: str) -> Path:
    """Left: heatmap layer x expert of the last record. Right: max/mean load per layer over the run."""
    import matplotlib.pyplot as plt

    load = load_matrix(router)
    n_layers, n_experts = len(load), len(load[0])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    # vmin 0 and an even-share marker on the colour bar make "how far from 1/E" readable at a glance
    im = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"{name}: share of routed tokens, step {router[-1]['step']}")
    if n_experts <= 32:  # one tick per expert/layer while the labels still fit
        ax.set_xticks(range(n_experts))
    if n_layers <= 48:
        ax.set_yticks(range(n_layers))
    bar = fig.colorbar(im, ax=ax, label="share of routed tokens (white line: even 1/E)")
    bar.ax.axhline(1 / n_experts, color="white", lw=1.5)
    steps, series = imbalance_series(router)
    for i, values in enumerate(series):
        ax2.plot(steps, values, label=f"layer {i}")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.set(xlabel="step", ylabel="max / mean load", title="load imbalance (1 = even)")
    if n_layers <= 8:
        ax2.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

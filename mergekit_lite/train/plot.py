"""`moemerge plot RUN_DIR`: PNGs from metrics.jsonl (loss, learning rate, expert load per layer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mergekit_lite.errors import MoemergeError
from mergekit_lite.io.folders import RunFolder


def read_metrics(run_dir: str | Path) -> dict[str, list[dict]]:
    """metrics.jsonl grouped by record type (train, val, router, summary, any other type kept as is).

    Raises:
        MoemergeError: the folder or its metrics.jsonl is missing, a line is not JSON, or there is no train record.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise MoemergeError(f"run folder {folder} not found; give the `output:` folder of a `moemerge train` recipe")
    path = RunFolder(folder).metrics
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


def dropped_series(router_rows: list[dict]) -> tuple[list[int], list[list[float]]] | None:
    """(steps, per-layer share of assignments dropped for expert capacity), or None when nothing was dropped
    (no `moe.capacity_factor`, or a run logged before the `dropped` field existed)."""
    rows = [r for r in router_rows if "dropped" in r]
    if not rows or not any(any(r["dropped"]) for r in rows):
        return None
    return [r["step"] for r in rows], [[r["dropped"][i] for r in rows] for i in range(len(rows[-1]["dropped"]))]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None,
             echo: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Write loss.png, lr.png, (for MoE runs) expert_load.png and (PEER runs) peer_usage.png into `out_dir` (default:
    the run folder).

    Args:
        run_dir: a `moemerge train` output folder holding metrics.jsonl.
        out_dir: where the PNGs go; created if needed.
        echo: receives a note when the run has no router records (dense model).

    Returns:
        The paths written, in the order loss, lr, expert_load, peer_usage.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI

    m = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(run_dir).resolve().name
    loss_png, lr_png, load_png, peer_png = RunFolder.PLOTS
    paths = [_loss_png(m, out / loss_png, name), _lr_png(m["train"], out / lr_png, name)]
    if m.get("router"):
        paths.append(_load_png(m["router"], out / load_png, name))
    else:
        echo("no router records (dense model): expert_load.png not drawn")
    if m.get("peer"):
        paths.append(_peer_png(m["peer"], out / peer_png, name))
    return paths


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with weight 2/(span+1), bias-corrected so the first points are not pulled to 0."""
    alpha = 2 / (span + 1)
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        norm = (1 - alpha) * norm + alpha
        out.append(avg / norm)
    return out


def smoothing_span(n_points: int) -> int:
    """About a sixth of the logged points, at most 50 (1, no smoothing, below 12 points)."""
    return max(1, min(50, n_points // 6))


def loss_figure(m: dict[str, list[dict]], name: str):
    """The loss plot: per-step train cross-entropy faint, its moving average over it, validation as markers.

    Validation is measured only at its steps, so it gets markers and no line (a line would claim values
    in between).
    """
    import matplotlib.pyplot as plt

    train = m["train"]
    steps = [r["step"] for r in train]
    ce = [r.get("ce", r["loss"]) for r in train]
    span = smoothing_span(len(ce))
    fig, ax = plt.subplots(figsize=(7, 4))
    raw = ax.plot(steps, ce, lw=0.8, alpha=0.3 if span > 1 else 1.0, label="train cross-entropy (as logged)")[0]
    if span > 1:
        ax.plot(steps, ema(ce, span), color=raw.get_color(), lw=1.8,
                label=f"train cross-entropy (moving average, span {span})")
    total = [r["loss"] for r in train]
    # the optimised loss adds the router losses; draw it only when it differs from the cross-entropy
    if any(abs(a - b) > 1e-6 for a, b in zip(total, ce)):
        ax.plot(steps, ema(total, span), lw=1, ls="--", color="tab:orange",
                label="train loss incl. router losses" + (" (moving average)" if span > 1 else ""))
    if m.get("val"):
        ax.plot([r["step"] for r in m["val"]], [r["val_loss"] for r in m["val"]], ls="none", marker="o",
                color="black", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{name}: loss")
    ax.legend(numpoints=1, fontsize=8, framealpha=0.8)
    ax.grid(alpha=0.3)
    return fig


def _loss_png(m: dict[str, list[dict]], path: Path, name: str) -> Path:
    return _save(loss_figure(m, name), path)


def val_by_tokens(m: dict[str, list[dict]]) -> tuple[list[int], list[float]]:
    """(tokens seen, validation loss) at each validation record; tokens from the train record of that step."""
    tokens_at = {r["step"]: r["tokens"] for r in m["train"] if "tokens" in r}
    per_step = next((r["tokens"] / r["step"] for r in m["train"] if r.get("tokens") and r["step"]), 0)
    vals = m.get("val", [])
    return [tokens_at.get(r["step"], round(r["step"] * per_step)) for r in vals], [r["val_loss"] for r in vals]


def plot_compare(runs: dict[str, str | Path], path: str | Path, title: str = "validation loss") -> Path:
    """One PNG: the validation loss of several runs against tokens seen, on the same axes (markers only).

    Args:
        runs: legend label -> `moemerge train` output folder.
        path: the PNG to write.
        title: the plot's title.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, run), marker in zip(runs.items(), "osD^v<>"):
        x, y = val_by_tokens(read_metrics(run))
        ax.plot(x, y, ls="none", marker=marker, ms=6, alpha=0.85, label=label)
    ax.set(xlabel="tokens seen", ylabel="validation loss (nats/token)", title=title)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    ax.legend(numpoints=1)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def _lr_png(train: list[dict], path: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title=f"{name}: learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _load_png(router: list[dict], path: Path, name: str) -> Path:
    """Left: heatmap layer x expert of the last record. Right: max/mean load per layer over the run, and
    (runs with expert capacity) the share of assignments each layer dropped."""
    import matplotlib.pyplot as plt

    load = load_matrix(router)
    n_layers, n_experts = len(load), len(load[0])
    drops = dropped_series(router)
    fig, axes = plt.subplots(1, 3 if drops else 2, figsize=(15 if drops else 11, 4),
                             gridspec_kw={"width_ratios": [3, 2, 2] if drops else [3, 2]})
    ax, ax2 = axes[0], axes[1]
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
    if drops:
        for i, values in enumerate(drops[1]):
            axes[2].plot(drops[0], values, label=f"layer {i}")
        axes[2].set(xlabel="step", ylabel="dropped share", title="assignments over expert capacity (dropped)")
        if n_layers <= 8:
            axes[2].legend(fontsize=7)
    return _save(fig, path)


def _peer_png(peer: list[dict], path: Path, name: str) -> Path:
    """PEER expert usage per layer over the run: share of the N experts retrieved since the previous log line, and
    the usage entropy (nats)."""
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in peer]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i in range(len(peer[-1]["used"])):
        ax.plot(steps, [r["used"][i] for r in peer], label=f"PEER layer {i}")
        ax2.plot(steps, [r["entropy"][i] for r in peer], label=f"PEER layer {i}")
    ax.set(xlabel="step", ylabel="share of experts retrieved", ylim=(0, 1.02),
           title=f"{name}: experts used since the previous line")
    ax2.set(xlabel="step", ylabel="entropy (nats)", title="expert usage entropy")
    if len(peer[-1]["used"]) <= 8:
        ax.legend(fontsize=7)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

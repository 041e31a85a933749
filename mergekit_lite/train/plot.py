"""`moemerge plot RUN_DIR`: PNGs from metrics.jsonl (loss, learning rate, expert load per layer)."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_lite.errors import MoemergeError


def read_metrics(run_dir: str | Path) -> dict[str, list[dict]]:
    """metrics.jsonl grouped by record type (train, val, router, summary)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MoemergeError(f"{path} not found; point to a `moemerge train` output folder")
    groups: dict[str, list[dict]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise MoemergeError(f"{path}:{n} is not valid JSON") from None
        groups.setdefault(row.get("type", "?"), []).append(row)
    if not groups.get("train"):
        raise MoemergeError(f"{path} has no training records yet")
    return groups


def load_matrix(router_rows: list[dict]) -> list[list[float]]:
    """Share of routed tokens, layer x expert, from the last router record."""
    return router_rows[-1]["load"]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png, lr.png and (for MoE runs) expert_load.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(run_dir).resolve().name
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in m["train"]], [r["ce"] for r in m["train"]], label="train (cross-entropy)")
    if m.get("val"):
        ax.plot([r["step"] for r in m["val"]], [r["val_loss"] for r in m["val"]], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=f"{name}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in m["train"]], [r["lr"] for r in m["train"]])
    ax.set(xlabel="step", ylabel="learning rate", title=f"{name}: learning rate")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "lr.png"))

    if m.get("router"):
        load = load_matrix(m["router"])
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
        im = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert load at step {m['router'][-1]['step']}",
               xticks=range(len(load[0])), yticks=range(len(load)))
        fig.colorbar(im, ax=ax, label="share of routed tokens")
        steps = [r["step"] for r in m["router"]]
        for i in range(len(load)):
            ax2.plot(steps, [r["max_over_mean"][i] for r in m["router"]], label=f"layer {i}")
        ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax2.set(xlabel="step", ylabel="max / mean load", title="load imbalance (1 = even)")
        if len(load) <= 8:
            ax2.legend(fontsize=7)
        paths.append(_save(fig, out / "expert_load.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path

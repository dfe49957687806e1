"""PNG plots: codebook-size sweeps (the paper's Figures 5 and 6: AUC and Logloss against codebook size) and
profile attention heat maps (Fig. 7)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from userip.utils.io import atomic_write_with

if TYPE_CHECKING:
    from userip.evaluation.attention import ProfileAttention


def plot_sweep(
    summary: pd.DataFrame,
    x: str,
    metrics: tuple[str, ...] = ("auc", "logloss"),
    title: str = "",
    path: str | Path = "sweep.png",
    curve: str | None = None,
) -> Path:
    """One panel per metric: mean over seeds with a ±std band, x on a log scale (sizes go 3..81). ``curve``:
    a column whose values split the rows into curves drawn side by side, with a legend (re-quantized and
    retrained codebooks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary.sort_values(x)
    groups = [("", summary)] if curve is None else list(summary.groupby(curve, sort=False))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        single = "tab:blue" if metric == "auc" else "tab:red"
        for i, (label, rows) in enumerate(groups):
            mean = rows[f"{metric}_mean"].to_numpy(dtype=float)
            std = (
                rows.get(f"{metric}_std", pd.Series(0.0, index=rows.index)).fillna(0.0).to_numpy(dtype=float)
            )
            xs = rows[x].to_numpy(dtype=float)
            color = single if curve is None else f"C{i}"
            marker = "os^v"[i % 4]
            ax.plot(xs, mean, marker=marker, color=color, label=str(label) if curve is not None else None)
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=color)
        xs = summary[x].drop_duplicates().to_numpy(dtype=float)
        ax.set_xscale("log")
        ax.minorticks_off()  # the log axis' minor labels (2x10^1, ...) overprint the sizes
        ax.set_xticks(xs)
        ax.set_xticklabels([str(int(v)) for v in xs])
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel("AUC" if metric == "auc" else "Logloss" if metric == "logloss" else metric)
        ax.grid(alpha=0.3)
        if curve is not None:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def plot_attention(result: ProfileAttention, path: str | Path) -> Path:
    """One heat map per (profile, before/after): users x sentence tokens, like the paper's Fig. 7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_profiles = len(result.profile_names)
    num_users, num_tokens = len(result.raw_user_ids), len(result.tokens)
    fig, axes = plt.subplots(
        num_profiles,
        2,
        figsize=(2 + 0.9 * num_tokens * 2, 1 + (0.35 * num_users + 0.8) * num_profiles),
        squeeze=False,
        layout="constrained",  # keeps each row's title clear of the tick labels above it
    )
    for p, name in enumerate(result.profile_names):
        for col, (when, values) in enumerate(
            (("before tuning", result.before), ("after tuning", result.after))
        ):
            ax = axes[p, col]
            image = ax.imshow(values[:, p], cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_title(f"{name} profile, {when}", fontsize=10)
            ax.set_xticks(range(num_tokens), result.tokens, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(num_users), result.raw_user_ids, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention to the profile (scaled per user)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path

"""Result tables as the paper prints them: mean (± std) over seeds, best in bold, second best underlined.

Markdown is rendered here (a dozen lines) rather than through ``DataFrame.to_markdown``, which needs the extra
``tabulate`` dependency and cannot mark best/second-best cells.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from userip.evaluation.metrics import paired_test, rela_impr_auc, rela_impr_logloss

# Direction of each metric: True if higher is better.
HIGHER_IS_BETTER: dict[str, bool] = {"auc": True, "logloss": False, "nmi": True, "ari": True}


def summarize_over_seeds(results: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Mean and std of each metric over seeds: columns ``<metric>_mean``, ``<metric>_std``, ``num_seeds``."""
    missing = [c for c in (*by, *metrics) if c not in results.columns]
    if missing:
        raise KeyError(f"results table lacks columns {missing}; has {list(results.columns)}")
    grouped = results.groupby(list(by), sort=False)
    out = grouped[list(metrics)].agg(["mean", "std"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out["num_seeds"] = grouped.size()
    return out.reset_index()


def compare_with_base(
    results: pd.DataFrame, name_col: str, base_name: str, ours: Sequence[str]
) -> pd.DataFrame:
    """The paper's comparison table from per-seed test metrics (columns ``name_col``, seed, auc, logloss).

    One row per name: ``auc_mean/std``, ``logloss_mean/std``, the paper's RelaImpr of AUC and Logloss against
    ``base_name``, and for the names in ``ours`` the p-value of a paired t-test of AUC over the seeds both
    share ("n/a (1 seed)" with fewer than two).
    """
    summary = summarize_over_seeds(results, by=[name_col], metrics=["auc", "logloss"])
    summary = summary.drop(columns=["num_seeds"]).rename(columns={name_col: "model"})
    base = summary.set_index("model").loc[base_name]
    summary["RelaImpr AUC"] = [
        f"{100 * rela_impr_auc(a, base['auc_mean']):+.2f}%" for a in summary["auc_mean"]
    ]
    summary["RelaImpr Logloss"] = [
        f"{100 * rela_impr_logloss(ll, base['logloss_mean']):+.2f}%" for ll in summary["logloss_mean"]
    ]
    auc_by_seed = results.pivot(index="seed", columns=name_col, values="auc")

    def pvalue(name: str) -> str:
        if name not in ours:
            return ""
        pair = auc_by_seed[[name, base_name]].dropna()
        if len(pair) < 2:
            return "n/a (1 seed)"
        return f"{paired_test(pair[name].to_numpy(), pair[base_name].to_numpy()).t_pvalue:.3g}"

    summary[f"p (paired t vs {base_name}, AUC)"] = [pvalue(name) for name in summary["model"]]
    return summary


def rank_marks(values: Sequence[float], higher_is_better: bool) -> list[str]:
    """'best' / 'second' / '' per value (ties share the mark); NaNs get ''."""
    arr = np.asarray(values, dtype=float)
    finite = np.unique(arr[np.isfinite(arr)])
    order = finite[::-1] if higher_is_better else finite
    best = order[0] if len(order) > 0 else np.nan
    second = order[1] if len(order) > 1 else np.nan
    return ["best" if v == best else "second" if v == second else "" for v in arr]


def markdown_table(
    df: pd.DataFrame,
    mark_columns: Mapping[str, bool] | None = None,
    float_format: str = "{:.4f}",
    std_suffix: str = "_std",
) -> str:
    """Render ``df`` as a GitHub Markdown table.

    ``mark_columns`` maps a column to ``higher_is_better``: its best cell is **bold** and its second best is
    <u>underlined</u>, as in the paper's Table 2. A column ``X_mean`` with a sibling ``X_std`` is printed as
    ``mean ± std`` under the header ``X``.
    """
    mark_columns = dict(mark_columns or {})
    columns = [c for c in df.columns if not c.endswith(std_suffix)]
    headers, cells = [], []
    for col in columns:
        base = col[: -len("_mean")] if col.endswith("_mean") else col
        headers.append(base)
        std_col = f"{base}{std_suffix}"
        values = df[col].tolist()
        stds = df[std_col].tolist() if std_col in df.columns else [None] * len(df)
        marks = rank_marks(values, mark_columns[col]) if col in mark_columns else [""] * len(values)
        rendered = []
        for v, s, mark in zip(values, stds, marks):
            text = _fmt(v, float_format)
            if s is not None and isinstance(s, float) and np.isfinite(s):
                text += f" ± {float_format.format(s)}"
            if mark == "best":
                text = f"**{text}**"
            elif mark == "second":
                text = f"<u>{text}</u>"
            rendered.append(text)
        cells.append(rendered)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in zip(*cells):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: object, float_format: str) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if not np.isfinite(value) else float_format.format(value)
    return str(value)

"""Rows of several experiments in one paired table: ``userip compare --config FILE``.

An experiment's Table 2 compares rows that share one profile stage. Some questions need rows from
experiments with *different* profile stages on the same data, e.g. what the LLM adds: the same recipe with no
LM, a random LM, the offline LM and SmolLM2, each its own ``userip experiment`` (own run folder, own profile
stage), all against the same DCN. Every experiment of one data set and protocol trains its CTR rows on the
same rows with the same seeds, so its per-seed test AUCs pair with the others' by seed.

This module reads each experiment's ``OUT/results.csv`` (per-seed test metrics) and ``OUT/config.json`` and
refuses to pair experiments whose data differ (source, its options, prepare and protocol settings must be
equal), then writes ``OUT/compare.md`` and ``compare.csv``: each row's test AUC and calibrated Logloss, its
RelaImpr and paired t-test p against the base row, and against a reference row (``reference``, e.g. the no-LM
row); when the row's experiment wrote probes (``OUT/probes.csv``, ``userip experiment``'s diagnostics), the
share of the soft tokens' probe lift over chance that the codes keep, per probe target.

    name: What the LM adds, MovieLens-100K cold start
    out_dir: runs/compare_lm_ml100k_cold_start
    base: {label: DCN, experiment: runs/ml100k_cold_start/experiment, variant: base}
    reference: no LM
    rows:
      - {label: no LM, experiment: runs/ml100k_cold_start_nolm/experiment}
      - {label: offline LM, experiment: runs/ml100k_cold_start/experiment}
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.evaluation.metrics import paired_test, rela_impr_auc, rela_impr_logloss
from userip.evaluation.tables import markdown_table
from userip.utils.config import ConfigError
from userip.utils.io import atomic_write_text

RESULTS_FILE = "results.csv"  # written by userip experiment
CONFIG_FILE = "config.json"
PROBES_FILE = "probes.csv"
# The settings that make an experiment's rows: rows of experiments that agree on all of them pair by seed.
DATA_KEYS = ("source", "source_options", "prepare", "protocol")
CHANCE_AUC = 0.5
# A probe's share is shown only where the soft tokens clearly beat chance: with a few hundred users a probe
# AUC moves by 0.01-0.02 between folds and samples, and a ratio over a smaller lift is noise.
MIN_PROBE_LIFT = 0.02


@dataclasses.dataclass
class CompareRow:
    """One table row: ``variant`` of ``model`` (default: the experiment's ``userip_model``) in the experiment
    whose output folder is ``experiment``."""

    label: str
    experiment: str
    variant: str = "userip"
    model: str = ""
    # false: an experiment not run yet (e.g. one that needs a GPU) is listed as "not run" instead of an error
    required: bool = True

    def __post_init__(self) -> None:
        if not self.label:
            raise ConfigError("compare row: label must be a non-empty string")


@dataclasses.dataclass
class CompareConfig:
    name: str
    out_dir: str
    base: CompareRow
    rows: list[CompareRow]
    reference: str = ""  # label of a row every other row is also tested against ("" for none)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ConfigError("rows: at least one row is required")
        labels = [self.base.label, *(r.label for r in self.rows)]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"rows: labels must be distinct, got {labels}")
        if self.reference and self.reference not in labels[1:]:
            raise ConfigError(f"reference: {self.reference!r} is not one of the rows' labels {labels[1:]}")


@dataclasses.dataclass
class _Experiment:
    folder: Path
    config: dict[str, Any]
    results: pd.DataFrame
    probes: pd.DataFrame | None


def _read_experiment(folder: Path, where: str) -> _Experiment:
    for name in (RESULTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise ConfigError(
                f"{where}.experiment: {folder / name} does not exist; run `userip experiment` for that "
                "config first (its output folder holds results.csv and config.json)"
            )
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{folder / CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{folder / CONFIG_FILE}: expected a mapping, got {type(config).__name__}")
    results = pd.read_csv(folder / RESULTS_FILE)
    missing = sorted({"model", "variant", "seed", "auc", "logloss"} - set(results.columns))
    if missing:
        raise ConfigError(f"{folder / RESULTS_FILE}: missing columns {missing}")
    probes = None
    if (folder / PROBES_FILE).is_file():
        probes = pd.read_csv(folder / PROBES_FILE, index_col=0)
    return _Experiment(folder, config, results, probes)


def _row_scores(row: CompareRow, exp: _Experiment, where: str) -> pd.DataFrame:
    """The row's per-seed test metrics, indexed by seed."""
    model = (row.model or str(exp.config.get("userip_model", ""))).lower()
    sel = exp.results[(exp.results["model"] == model) & (exp.results["variant"] == row.variant)]
    if sel.empty:
        have = sorted({f"{m}/{v}" for m, v in zip(exp.results["model"], exp.results["variant"])})
        raise ConfigError(
            f"{where}: no {model}/{row.variant} cells in {exp.folder / RESULTS_FILE}; it has {have}"
        )
    return sel.set_index("seed")[["auc", "logloss"]].sort_index()


def _check_same_data(base: _Experiment, other: _Experiment, where: str) -> None:
    for key in DATA_KEYS:
        if base.config.get(key) != other.config.get(key):
            raise ConfigError(
                f"{where}: {other.folder} was run on other data than the base row's {base.folder} ({key}: "
                f"{other.config.get(key)!r} vs {base.config.get(key)!r}); its seeds do not pair"
            )


def probe_lift_kept(probes: pd.DataFrame) -> dict[str, float]:
    """Per probe target, the share of the soft tokens' AUC lift over chance that the codes keep:
    ``(auc_codes - 0.5) / (auc_soft_tokens - 0.5)`` (NaN where the soft tokens are less than
    ``MIN_PROBE_LIFT`` above chance)."""
    if not {"codes", "soft_tokens"} <= set(probes.index):
        return {}
    out = {}
    for target in probes.columns:
        soft, codes = float(probes.at["soft_tokens", target]), float(probes.at["codes", target])
        lift = soft - CHANCE_AUC
        out[target] = (codes - CHANCE_AUC) / lift if lift >= MIN_PROBE_LIFT else float("nan")
    return out


def compare(config: CompareConfig) -> dict[str, Any]:
    """The paired table of ``config``'s rows (see the module docstring); returns the table and Markdown."""
    experiments: dict[Path, _Experiment] = {}

    def experiment_of(row: CompareRow, where: str) -> _Experiment:
        folder = Path(row.experiment)
        if folder not in experiments:
            experiments[folder] = _read_experiment(folder, where)
        return experiments[folder]

    base_exp = experiment_of(config.base, "base")
    base = _row_scores(config.base, base_exp, "base")
    scores: dict[str, pd.DataFrame] = {}
    not_run: list[str] = []
    for i, row in enumerate(config.rows):
        if not row.required and not (Path(row.experiment) / RESULTS_FILE).is_file():
            not_run.append(row.label)
            continue
        exp = experiment_of(row, f"rows[{i}]")
        _check_same_data(base_exp, exp, f"rows[{i}] ({row.label})")
        scores[row.label] = _row_scores(row, exp, f"rows[{i}] ({row.label})")

    def paired(a: pd.DataFrame, b: pd.DataFrame) -> tuple[int, str]:
        seeds = a.index.intersection(b.index)
        if len(seeds) < 2:
            return len(seeds), "n/a"
        return len(seeds), f"{paired_test(a.loc[seeds, 'auc'], b.loc[seeds, 'auc']).t_pvalue:.3g}"

    records = []
    base_auc, base_ll = float(base["auc"].mean()), float(base["logloss"].mean())
    for label, s in [(config.base.label, base), *scores.items()]:
        record: dict[str, Any] = {
            "row": label,
            "seeds": len(s),
            "auc_mean": float(s["auc"].mean()),
            "auc_std": float(s["auc"].std()) if len(s) > 1 else float("nan"),
            "logloss_mean": float(s["logloss"].mean()),
            "RelaImpr AUC": f"{100 * rela_impr_auc(float(s['auc'].mean()), base_auc):+.2f}%",
            "RelaImpr Logloss": f"{100 * rela_impr_logloss(float(s['logloss'].mean()), base_ll):+.2f}%",
            f"p vs {config.base.label}": "" if s is base else paired(s, base)[1],
        }
        if config.reference in scores:
            ref = scores[config.reference]
            seeds = s.index.intersection(ref.index)
            gap = float((s.loc[seeds, "auc"] - ref.loc[seeds, "auc"]).mean()) if len(seeds) else np.nan
            same = s is ref or s is base
            record[f"AUC - {config.reference}"] = "" if same else f"{gap:+.4f}"
            record[f"p vs {config.reference}"] = "" if same else paired(s, ref)[1]
        row = next((r for r in config.rows if r.label == label), None)
        # The experiment's probes describe its main bank: the row of that bank only, not its controls.
        main_bank = row is not None and row.variant == "userip"
        probes = experiments[Path(row.experiment)].probes if main_bank else None
        if probes is not None:
            for target, kept in probe_lift_kept(probes).items():
                record[f"codes keep ({target})"] = f"{100 * kept:.0f}%" if np.isfinite(kept) else "n/a"
        records.append(record)
    records += [{"row": label, "seeds": 0, "RelaImpr AUC": "not run"} for label in not_run]
    table = pd.DataFrame(records)
    text_columns = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    table[text_columns] = table[text_columns].fillna("")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = "\n".join(f"- {label}: `{r.experiment}` ({r.variant})" for label, r in
                        [(config.base.label, config.base), *((r.label, r) for r in config.rows)])  # fmt: skip
    text = "\n".join(
        [
            f"# {config.name}",
            "",
            "Test metrics over the seeds each row shares with the base row (mean, std); Logloss calibrated "
            "on validation; p: paired t-test of test AUC over shared seeds. `codes keep (target)`: "
            "(probe AUC of the codes - 0.5) / (probe AUC of the soft tokens - 0.5), from the row's "
            f"experiment diagnostics (its main bank's codes; n/a where the soft tokens are less than "
            f"{MIN_PROBE_LIFT} above chance).",
            "",
            markdown_table(table, {"auc_mean": True, "logloss_mean": False}),
            "Rows from:",
            "",
            sources,
        ]
    )
    atomic_write_text(out / "compare.md", text + "\n")
    atomic_write_text(out / "compare.csv", table.to_csv(index=False))
    return {"table": table, "markdown": text}

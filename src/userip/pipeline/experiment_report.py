"""The reports of ``userip experiment``: what the profiles know (code usage, linear probes) and the paper's
tables and figures, written as Markdown, JSON and PNG under the experiment's output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from userip.baselines.rows import BASELINE_ROWS
from userip.data.schema import HISTORY_SPLIT, Dataset
from userip.evaluation.plots import plot_sweep
from userip.evaluation.probes import TARGETS_VERSION, one_hot_codes, probe_markdown, probe_report
from userip.evaluation.tables import compare_with_base, markdown_table, summarize_over_seeds
from userip.feature_bank import FeatureBank
from userip.pipeline.experiment_config import SWEEP_LABELS, CodebookSweep, ExperimentConfig, sweep_suffixes
from userip.profile.bank import code_usage
from userip.profile.model import profile_means
from userip.profile.recipe import load_soft_tokens
from userip.utils.artifacts import CACHE_KEY_FIELD, CorruptArtifactError, check_record, reuse_cached
from userip.utils.config import to_dict
from userip.utils.io import atomic_write_json, atomic_write_text
from userip.utils.run_layout import RunLayout


def write_diagnostics(
    config: ExperimentConfig, bank: FeatureBank, out_dir: Path, run_dir: Path, dataset: Dataset
) -> None:
    """What the profiles know (``OUT/diagnostics.md``, ``probes.csv``, ``code_usage.csv``): code usage of
    the main bank, and cross-validated linear-probe AUCs of the soft tokens and the codes against truths no
    profile saw (user attributes; held-out positive rate and genres), beside the bag of the same profile rows
    and random vectors. Users: those with trained soft tokens."""
    marker = out_dir / "diagnostics.json"  # written last: marks diagnostics under that key complete
    key = {
        "bank": bank.version,
        "dataset": dataset.content_hash,
        "prompt": to_dict(config.profile.prompt),
        "targets": TARGETS_VERSION,
    }
    if reuse_cached(marker, key, "diagnostics", _check_diagnostics) is not None:
        return
    usage = code_usage(bank.codes[: dataset.num_users], bank.profile_names, bank.codebook_sizes)
    soft_tokens, trained_mask, _ = load_soft_tokens(RunLayout(run_dir).profile)
    users = torch.nonzero(trained_mask).squeeze(1).numpy()
    profiles = profile_means(soft_tokens[users], config.profile.prompt)  # (N, P, D)
    codes = bank.lookup(users)
    features = {
        "soft_tokens": profiles.flatten(1).numpy(),
        # one per profile (a bank with residual levels has more fields than profiles)
        **{
            f"soft_token_{s.name}": profiles[:, p].numpy()
            for p, s in enumerate(config.profile.prompt.profiles)
        },
        "codes": one_hot_codes(codes, bank.codebook_sizes),
    }
    # Everything but the profile rows is held out from the profiles (a cold-start protocol's history
    # split leaves the CTR training rows out of them too).
    held_out = ("train", "valid", "test") if len(dataset.split(HISTORY_SPLIT)) else ("valid", "test")
    probes = probe_report(dataset, features, dataset.profile_rows(), users, held_out)
    atomic_write_text(out_dir / "code_usage.csv", usage.to_csv(index=False))
    atomic_write_text(out_dir / "probes.csv", probes.to_csv())
    text = "\n".join(
        [
            f"# {config.name}: what the profiles know",
            "",
            "## Code usage (main bank, every user with a profile)",
            "",
            markdown_table(usage),
            "## Linear probes (5-fold cross-validated AUC)",
            "",
            f"{len(users)} users with trained soft tokens; targets from {', '.join(held_out)} rows and "
            "the users table, which no profile saw. `bag_of_items`/`bag_of_categories`: the same profile "
            "rows as a plain bag; `random`: chance.",
            "",
            probe_markdown(probes),
        ]
    )
    atomic_write_text(out_dir / "diagnostics.md", text + "\n")
    atomic_write_json(marker, {"bank": bank.version, CACHE_KEY_FIELD: key})


def _check_diagnostics(record: Any, path: Path) -> None:
    check_record(record, path, {"bank": str})
    for name in ("diagnostics.md", "probes.csv", "code_usage.csv"):
        if not (path.parent / name).is_file():
            raise CorruptArtifactError(f"{path.parent / name}: missing beside {path.name}")


def write_tables(
    cfg: ExperimentConfig,
    results: pd.DataFrame,
    out_dir: Path,
    run_dir: Path,
    dataset: Dataset | None,
    search_results: pd.DataFrame | None = None,
    profile_search_results: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Tables 2-4, the profile and trainer choices and the codebook-size figures from the cell records
    ``results``:
    ``OUT/tables.md``, ``OUT/results.json`` and the figures' PNGs; returns the tables and the Markdown."""
    main = cfg.userip_model.lower()
    results = results.assign(name=[row_name(m, v) for m, v in zip(results.model, results.variant)])
    md = [f"# {cfg.name}: results", ""]
    md.append(
        f"Dataset `{run_dir}` ({_stats_line(dataset)}); seeds {cfg.seeds}; "
        f"mean ± std of test metrics; **best**, <u>second best</u>. Logloss is calibrated on validation "
        "(Platt scaling of the logit, the same for every row); `logloss_raw_mean`: before calibration."
    )
    out: dict[str, Any] = {"tables": {}}

    def table(rows: pd.DataFrame, title: str, key: str, base_name: str | None, ours: list[str]) -> None:
        if base_name is not None and base_name in set(rows["name"]):
            summary = compare_with_base(rows, "name", base_name, ours)
        else:
            summary = summarize_over_seeds(rows, by=["name"], metrics=["auc", "logloss"])
            summary = summary.drop(columns=["num_seeds"]).rename(columns={"name": "model"})
        if "logloss_raw" in rows and rows["logloss_raw"].notna().any():
            # Logloss columns are calibrated on validation; the uncalibrated mean stays beside them.
            raw = rows.groupby("name")["logloss_raw"].mean()
            summary.insert(
                list(summary.columns).index("logloss_std") + 1
                if "logloss_std" in summary
                else len(summary.columns),
                "logloss_raw_mean",
                [raw.get(name, float("nan")) for name in summary["model"]],
            )
        seeds = rows.groupby("name")["seed"].nunique()
        if (seeds != len(cfg.seeds)).any():  # finished_only: say which rows have fewer seeds
            summary.insert(1, "seeds", [int(seeds[name]) for name in summary["model"]])
        md.extend(["", f"## {title}", "", markdown_table(summary, {"auc_mean": True, "logloss_mean": False})])
        out["tables"][key] = summary.to_dict(orient="records")

    if "table2" in cfg.tables:
        rows = results[(results.variant == "base") & results.model.isin([m.lower() for m in cfg.baselines])]
        ours = ["userip", *cfg.controls, *cfg.llm_baselines]
        rows = pd.concat([rows, results[(results.model == main) & results.variant.isin(ours)]])
        table(
            rows,
            f"Table 2: overall performance ({cfg.protocol.name.value} protocol)",
            "table2",
            main.upper(),
            [row_name(main, v) for v in ours],
        )
    if profile_search_results is not None:
        chosen = profile_search_results[profile_search_results["chosen"]]
        columns = ["candidate", *cfg.profile_search.grid, "stage", "valid_auc_mean", "valid_auc_se"]
        chosen = chosen[columns].astype({k: str for k in cfg.profile_search.grid})
        md.extend(
            [
                "",
                "## Profile setting chosen on validation AUC",
                "",
                f"UserIP-{main.upper()} with the base trainer over seeds {cfg.profile_search.seeds}: the "
                f"simplest of {len(profile_search_results)} candidates within "
                f"{cfg.profile_search.se_threshold:g} paired standard errors of the best (every candidate: "
                "`profile_search.md`); every UserIP row, control and sweep below uses it.",
                "",
                markdown_table(chosen).rstrip("\n"),
            ]
        )
        out["tables"]["profile_search"] = chosen.to_dict(orient="records")
    if search_results is not None:
        chosen = search_results[search_results["chosen"]].drop(columns=["chosen", "within_noise", "pruned"])
        chosen = chosen.assign(model=[row_name(m, v) for m, v in zip(chosen.model, chosen.variant)]).drop(
            columns=["variant"]
        )
        # Grid values as written (1e-05, not 0.0000); the AUC columns keep the tables' 4 decimals.
        chosen = chosen.astype({k: str for k in cfg.trainer_search.grid})
        search = cfg.trainer_search
        grid = ", ".join(f"{k} {v}" for k, v in search.grid.items())
        md.extend(
            [
                "",
                "## Trainer settings chosen on validation AUC",
                "",
                f"Grid: {grid}; validation AUC over seeds {search.seeds}. Among the candidates within "
                f"{search.se_threshold:g} paired standard errors of the best, each row keeps the simplest "
                "model (a warm start before joint training) and, among those, the best mean "
                "(`gap_to_best`, `gap_se`: the chosen one's); every candidate's score is in "
                "`trainer_search.csv`. Codebook-size sweeps use "
                f"UserIP-{main.upper()}'s choice.",
                "",
                markdown_table(chosen).rstrip("\n"),
            ]
        )
        out["tables"]["trainer_search"] = chosen.to_dict(orient="records")
    if "table3" in cfg.tables:
        rows = results[(results.model == main) & results.variant.isin(["base", "userip", "novq"])]
        table(
            rows,
            "Table 3: with and without the VQ module",
            "table3",
            main.upper(),
            [f"UserIP-{main.upper()}", f"UserIP-{main.upper()} w/o VQ"],
        )
    if "table4" in cfg.tables:
        for m in cfg.transfer_models:
            rows = results[(results.model == m.lower()) & results.variant.isin(["base", "userip"])]
            table(
                rows,
                f"Table 4: transfer to {m.upper()}",
                f"table4_{m.lower()}",
                m.upper(),
                [f"UserIP-{m.upper()}"],
            )
    for fig, prefix, sizes, what in (
        ("figure5", "hobby", cfg.hobby_sizes, "hobby"),
        ("figure6", "background", cfg.background_sizes, "background"),
    ):
        if fig not in cfg.tables:
            continue
        specs = cfg.profile.prompt.profiles
        default = specs[0].codebook_size if prefix == "hobby" else specs[1].codebook_size
        # With retrained codebooks the rows say which curve they belong to; the re-quantized sweep alone
        # keeps today's columns.
        curve = None if cfg.codebook_sweep is CodebookSweep.REQUANTIZE else "codebooks"
        rows = []
        for suffix in sweep_suffixes(cfg.codebook_sweep):
            for k in sizes:
                variant = "userip" if k == default else f"{prefix}{k}{suffix}"
                sel = results[(results.model == main) & (results.variant == variant)]
                labels = {} if curve is None else {curve: SWEEP_LABELS[suffix]}
                rows.append(sel.assign(codebook_size=k, **labels))
        by = ["codebook_size"] if curve is None else [curve, "codebook_size"]
        sweep = summarize_over_seeds(pd.concat(rows), by=by, metrics=["auc", "logloss"])
        png = plot_sweep(
            sweep,
            "codebook_size",
            title=f"UserIP-{main.upper()}: {what} codebook size",
            path=out_dir / f"{fig}_{what}_codebook.png",
            curve=curve,
        )
        md.extend(
            [
                "",
                f"## {fig.capitalize()}: {what} codebook size",
                "",
                markdown_table(sweep.drop(columns=["num_seeds"]), {"auc_mean": True, "logloss_mean": False}),
                f"![{fig}]({png.name})",
            ]
        )
        out["tables"][fig] = sweep.to_dict(orient="records")
    text = "\n".join(md) + "\n"
    atomic_write_text(out_dir / "tables.md", text)
    atomic_write_json(out_dir / "results.json", out)
    out["markdown"] = text
    return out


def row_name(model: str, variant: str) -> str:
    """A table row's name: ``DCN``, ``UserIP-DCN``, ``UserIP-DCN w/o VQ``, ``UserIP-DCN hobby9``."""
    label = {
        "base": "{M}",
        "userip": "UserIP-{M}",
        "novq": "UserIP-{M} w/o VQ",
        "bag_of_items": "{M} + bag-of-items IDs (control)",
        "attributes": "{M} + true attributes (control)",
        **{row: spec.label for row, spec in BASELINE_ROWS.items()},
    }
    return label.get(variant, "UserIP-{M} " + variant).format(M=model.upper())


def _stats_line(dataset: Dataset | None) -> str:
    if dataset is None:
        return ""
    s = dataset.statistics()
    return f"{s['interactions']:,} interactions, {s['users']:,} users, {s['items']:,} items"

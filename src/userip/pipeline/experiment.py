"""``userip experiment``: the paper's evaluation over seeds on one prepared dataset.

    Table 2   every CTR baseline without profiles, and UserIP-DCN (profile IDs from the feature bank)
    Table 3   UserIP-DCN with and without the VQ module (ablation)
    Table 4   transfer of the same IDs to other CTR models (PNN, ONN, DCNv2 by default)
    Figure 5  AUC / Logloss of UserIP-DCN as the hobby codebook size goes 4 .. 81
    Figure 6  the same for the background codebook size 3 .. 81

Every (table, model, variant, seed) cell is a JSON file under ``OUT/cells/``; a rerun skips finished cells, so
an interrupted experiment resumes where it stopped. Soft tokens are inferred once (``userip profile``); the
ablation and the codebook sweeps re-train only the quantization module (codebooks + surrogate, eq. 5) on
those fixed profiles: with the paper's lambda = 0.001 the LM term dominates the soft tokens' updates anyway,
and re-running the frozen LLM for each of ~10 codebook settings would multiply the cost for no change in
method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from userip.codebook.config import QuantizationConfig
from userip.codebook.stage import build_aux, write_bank
from userip.ctr.models import MODELS
from userip.ctr.recipe import train_ctr
from userip.ctr.trainer import TrainerConfig
from userip.data.preprocess import PrepareConfig
from userip.data.schema import Dataset
from userip.evaluation.plots import plot_sweep
from userip.evaluation.tables import compare_with_base, markdown_table, summarize_over_seeds
from userip.feature_bank import FeatureBank
from userip.pipeline.run import PipelineConfig, stage_prepare, stage_profile
from userip.profile.model import profile_means
from userip.profile.recipe import load_soft_tokens
from userip.profile.stage import ProfileStageConfig
from userip.prompts import ProfileSpec
from userip.utils.config import ConfigError, to_dict
from userip.utils.io import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

PAPER_BASELINES = ["ffm", "afm", "fibinet", "difm", "afn", "deepfm", "autoint", "onn", "pnn", "dcnv2", "dcn"]
TABLES = ("table2", "table3", "table4", "figure5", "figure6")


def _default_profile() -> ProfileStageConfig:
    return ProfileStageConfig()


@dataclasses.dataclass
class ExperimentConfig:
    """One experiment. ``run_dir`` holds (or receives) the prepared data, soft tokens and main bank;
    ``out_dir`` the cells, tables and plots."""

    name: str = "experiment"
    run_dir: str = "runs/experiment"
    out_dir: str = ""  # default: <run_dir>/experiment
    source: str = "synthetic"
    source_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)
    profile: ProfileStageConfig = dataclasses.field(default_factory=_default_profile)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3, 4])
    tables: list[str] = dataclasses.field(default_factory=lambda: list(TABLES))
    baselines: list[str] = dataclasses.field(default_factory=lambda: list(PAPER_BASELINES))
    userip_model: str = "dcn"
    transfer_models: list[str] = dataclasses.field(default_factory=lambda: ["pnn", "onn", "dcnv2"])
    hobby_sizes: list[int] = dataclasses.field(default_factory=lambda: [4, 9, 27, 81])
    background_sizes: list[int] = dataclasses.field(default_factory=lambda: [3, 9, 27, 81])
    requantize_epochs: int = 30  # passes over the users when re-training codebooks on fixed profiles
    model_configs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        for key in ("baselines", "transfer_models"):
            bad = [m for m in getattr(self, key) if m.lower() not in MODELS]
            if bad:
                raise ConfigError(f"{key}: unknown model(s) {bad}; accepted: {sorted(MODELS)}")
        if self.userip_model.lower() not in MODELS:
            raise ConfigError(f"userip_model: {self.userip_model!r} is not one of {sorted(MODELS)}")
        bad = [m for m in self.model_configs if m.lower() not in MODELS]
        if bad:
            raise ConfigError(f"model_configs: unknown model(s) {bad}; accepted: {sorted(MODELS)}")
        bad = [t for t in self.tables if t not in TABLES]
        if bad:
            raise ConfigError(f"tables: unknown {bad}; accepted: {list(TABLES)}")
        if not self.seeds:
            raise ConfigError("seeds: at least one seed is required")
        for key in ("hobby_sizes", "background_sizes"):
            if any(int(k) < 2 for k in getattr(self, key)):
                raise ConfigError(f"{key}: every codebook size must be >= 2, got {getattr(self, key)}")
        # A paired test needs >= 2 seeds; one seed still gives tables (without p-values).
        PipelineConfig(source=self.source, ctr_model=self.userip_model)  # validates the source name

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.run_dir) / "experiment"


# ---------------------------------------------------------------------------------------------- cells
@dataclasses.dataclass(frozen=True)
class Cell:
    table: str
    model: str  # CTR model name
    variant: str  # "base" (no profiles), "userip" (main bank), or a bank variant ("novq", "hobby9", ...)
    seed: int

    @property
    def key(self) -> str:
        return f"{self.table}__{self.model}__{self.variant}__seed{self.seed}"


class Experiment:
    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.out = config.output_dir
        self.run_dir = Path(config.run_dir)
        self.dataset: Dataset | None = None
        self.banks: dict[str, FeatureBank] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", to_dict(cfg))
        pipeline = PipelineConfig(
            run_dir=str(self.run_dir),
            source=cfg.source,
            source_options=cfg.source_options,
            prepare=cfg.prepare,
            profile=cfg.profile,
            ctr_model=cfg.userip_model,
        )
        self.dataset = stage_prepare(pipeline, self.run_dir)
        bank, report = stage_profile(pipeline, self.run_dir, self.dataset)
        self.banks["userip"] = bank
        atomic_write_json(self.out / "profile_report.json", report)

    def bank(self, variant: str) -> FeatureBank:
        """The main bank, or one re-quantized from the fixed soft tokens (cached under OUT/banks)."""
        if variant in self.banks:
            return self.banks[variant]
        hobby, background = self._variant_sizes(variant)
        quant = dataclasses.replace(self.config.profile.quantization, without_vq=variant == "novq")
        # Keyed by the main bank's version: rebuilt soft tokens never meet stale variant banks.
        bank_dir = self.out / "banks" / self.banks["userip"].version / variant
        assert self.dataset is not None
        try:
            bank = FeatureBank.load(bank_dir, expected_dataset_hash=self.dataset.content_hash)
        except Exception:
            bank = requantize(
                self.run_dir,
                self.dataset,
                self.config.profile,
                quant,
                [hobby, background],
                bank_dir,
                epochs=self.config.requantize_epochs,
            )
        self.banks[variant] = bank
        return bank

    def _variant_sizes(self, variant: str) -> tuple[int, int]:
        specs = self.config.profile.prompt.profiles
        hobby, background = specs[0].codebook_size, specs[1].codebook_size
        if variant.startswith("hobby"):
            hobby = int(variant.removeprefix("hobby"))
        elif variant.startswith("background"):
            background = int(variant.removeprefix("background"))
        return hobby, background

    # ------------------------------------------------------------------ cells
    def cells(self) -> list[Cell]:
        cfg, out = self.config, []
        main = cfg.userip_model.lower()
        for seed in cfg.seeds:
            if "table2" in cfg.tables:
                out += [Cell("table2", m.lower(), "base", seed) for m in cfg.baselines]
                out.append(Cell("table2", main, "userip", seed))
            if "table3" in cfg.tables:
                out.append(Cell("table3", main, "novq", seed))
            if "table4" in cfg.tables:
                for m in cfg.transfer_models:
                    out += [
                        Cell("table4", m.lower(), "base", seed),
                        Cell("table4", m.lower(), "userip", seed),
                    ]
            if "figure5" in cfg.tables:
                out += [Cell("figure5", main, f"hobby{k}", seed) for k in cfg.hobby_sizes]
            if "figure6" in cfg.tables:
                out += [Cell("figure6", main, f"background{k}", seed) for k in cfg.background_sizes]
        # The same (model, variant, seed) in several tables is trained once.
        unique: dict[tuple[str, str, int], Cell] = {}
        for c in out:
            unique.setdefault((c.model, self._canonical(c.variant), c.seed), c)
        return list(unique.values())

    def _canonical(self, variant: str) -> str:
        """``hobby4`` with the default hobby size is the main bank: train it once."""
        if variant.startswith(("hobby", "background")):
            specs = self.config.profile.prompt.profiles
            if self._variant_sizes(variant) == (specs[0].codebook_size, specs[1].codebook_size):
                return "userip"
        return variant

    def cell_path(self, cell: Cell) -> Path:
        """Cells are keyed by what they depend on (trainer and model config, profile config), so a rerun with
        another config retrains instead of reusing stale numbers."""
        key = {
            "trainer": to_dict(self.config.trainer),
            "model": self.config.model_configs.get(cell.model, {}),
            "profile": to_dict(self.config.profile),
            "requantize_epochs": self.config.requantize_epochs,
            "bank": self.banks["userip"].version if "userip" in self.banks else None,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{cell.model}__{self._canonical(cell.variant)}__seed{cell.seed}__{digest}.json"
        return self.out / "cells" / name

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        path = self.cell_path(cell)
        if path.exists():
            return read_json(path)
        variant = self._canonical(cell.variant)
        with_profiles = variant != "base"
        start = time.perf_counter()
        result = train_ctr(
            self.dataset,
            cell.model,
            with_profiles=with_profiles,
            bank=self.bank(variant) if with_profiles else None,
            model_config=self.config.model_configs.get(cell.model, {}),
            config=self.config.trainer,
            seed=cell.seed,
            save=False,
        )
        record = {
            "model": cell.model,
            "variant": variant,
            "seed": cell.seed,
            "auc": result.test["auc"],
            "logloss": result.test["logloss"],
            "valid_auc": (result.valid or {}).get("auc"),
            "valid_logloss": (result.valid or {}).get("logloss"),
            "best_epoch": result.fit.best_epoch,
            "seconds": time.perf_counter() - start,
        }
        atomic_write_json(path, record)
        return record

    def run(self) -> dict[str, Any]:
        self.setup()
        cells = self.cells()
        done = sum(self.cell_path(c).exists() for c in cells)
        log.info("%d cells (%d already finished)", len(cells), done)
        records = []
        for cell in tqdm(cells, desc="experiment cells", unit="cell"):
            records.append(self.run_cell(cell))
        results = pd.DataFrame(records)
        results.to_csv(self.out / "results.csv", index=False)
        return self.report(results)

    # ------------------------------------------------------------------ tables and figures
    def report(self, results: pd.DataFrame) -> dict[str, Any]:
        cfg = self.config
        main = cfg.userip_model.lower()
        label = {"base": "{M}", "userip": "UserIP-{M}", "novq": "UserIP-{M} w/o VQ"}
        results = results.assign(
            name=[
                label.get(v, "UserIP-{M} " + v).format(M=m.upper())
                for m, v in zip(results.model, results.variant)
            ]
        )
        md = [f"# {cfg.name}: results", ""]
        md.append(
            f"Dataset `{self.run_dir}` ({_stats_line(self.dataset)}); seeds {cfg.seeds}; "
            f"mean ± std of test metrics; **best**, <u>second best</u>."
        )
        out: dict[str, Any] = {"tables": {}}

        def table(rows: pd.DataFrame, title: str, key: str, base_name: str | None, ours: list[str]) -> None:
            if base_name is not None and base_name in set(rows["name"]):
                summary = compare_with_base(rows, "name", base_name, ours)
            else:
                summary = summarize_over_seeds(rows, by=["name"], metrics=["auc", "logloss"])
                summary = summary.drop(columns=["num_seeds"]).rename(columns={"name": "model"})
            md.extend(
                ["", f"## {title}", "", markdown_table(summary, {"auc_mean": True, "logloss_mean": False})]
            )
            out["tables"][key] = summary.to_dict(orient="records")

        if "table2" in cfg.tables:
            rows = results[
                (results.variant == "base") & results.model.isin([m.lower() for m in cfg.baselines])
            ]
            rows = pd.concat([rows, results[(results.model == main) & (results.variant == "userip")]])
            table(rows, "Table 2: overall performance", "table2", main.upper(), [f"UserIP-{main.upper()}"])
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
            rows = []
            for k in sizes:
                variant = "userip" if k == default else f"{prefix}{k}"
                sel = results[(results.model == main) & (results.variant == variant)]
                rows.append(sel.assign(codebook_size=k))
            sweep = summarize_over_seeds(pd.concat(rows), by=["codebook_size"], metrics=["auc", "logloss"])
            png = plot_sweep(
                sweep,
                "codebook_size",
                title=f"UserIP-{main.upper()}: {what} codebook size",
                path=self.out / f"{fig}_{what}_codebook.png",
            )
            md.extend(
                [
                    "",
                    f"## {fig.capitalize()}: {what} codebook size",
                    "",
                    markdown_table(
                        sweep.drop(columns=["num_seeds"]), {"auc_mean": True, "logloss_mean": False}
                    ),
                    f"![{fig}]({png.name})",
                ]
            )
            out["tables"][fig] = sweep.to_dict(orient="records")
        text = "\n".join(md) + "\n"
        atomic_write_text(self.out / "tables.md", text)
        atomic_write_json(self.out / "results.json", out)
        out["markdown"] = text
        return out


def _stats_line(dataset: Dataset | None) -> str:
    if dataset is None:
        return ""
    s = dataset.statistics()
    return f"{s['interactions']:,} interactions, {s['users']:,} users, {s['items']:,} items"


# ---------------------------------------------------------------------------------------------- requantize
def requantize(
    run_dir: Path,
    dataset: Dataset,
    profile: ProfileStageConfig,
    quant: QuantizationConfig,
    codebook_sizes: list[int],
    bank_dir: Path,
    epochs: int = 30,
    batch_size: int = 128,
) -> FeatureBank:
    """Train codebooks + surrogate (eq. 5, straight-through) on the *fixed* soft tokens of ``RUN/profile``
    with other codebook sizes (or without VQ), and write that bank to ``bank_dir``."""
    soft_tokens, trained_mask, _ = load_soft_tokens(run_dir / "profile")
    profile_table = profile_means(soft_tokens, profile.prompt)  # (U, P, D)
    specs = [
        ProfileSpec(p.name, p.phrase, p.num_soft_tokens, k)
        for p, k in zip(profile.prompt.profiles, codebook_sizes)
    ]
    aux = build_aux(dataset, specs, profile_table.shape[-1], quant)
    optimizer = torch.optim.AdamW(aux.parameters(), lr=profile.train.aux_lr)
    trained_ids = torch.nonzero(trained_mask).squeeze(1)
    gen = torch.Generator().manual_seed(quant.seed)
    aux.train()
    for _ in range(epochs):
        perm = trained_ids[torch.randperm(len(trained_ids), generator=gen)]
        for start in range(0, len(perm), batch_size):
            user_ids = perm[start : start + batch_size]
            loss, _ = aux(user_ids, profile_table[user_ids])
            optimizer.zero_grad(set_to_none=True)
            # The loss carries lambda; rescale so the codebook learns at the paper's rate per unit of L_VQ.
            (loss / max(quant.loss_weight, 1e-12)).backward()
            optimizer.step()
    aux.eval()
    bank, _ = write_bank(
        bank_dir,
        dataset,
        aux,
        profile_table,
        trained_user_ids=trained_ids.numpy(),
        config={"requantized": True, "codebook_sizes": codebook_sizes, "without_vq": quant.without_vq},
    )
    return bank


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    return Experiment(config).run()


def cell_count(config: ExperimentConfig) -> int:
    return len(Experiment(config).cells())

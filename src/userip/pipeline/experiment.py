"""``userip experiment``: the paper's evaluation over seeds on one prepared dataset.

    Table 2   every CTR baseline without profiles, and UserIP-DCN (profile IDs from the feature bank)
    Table 3   UserIP-DCN with and without the VQ module (ablation)
    Table 4   transfer of the same IDs to other CTR models (PNN, ONN, DCNv2 by default)
    Figure 5  AUC / Logloss of UserIP-DCN as the hobby codebook size goes 4 .. 81
    Figure 6  the same for the background codebook size 3 .. 81

With ``trainer_search`` set, each row of the tables (a CTR model with or without profile IDs) first gets its
own trainer settings, chosen on validation AUC over a small grid (the test split is never consulted); the
seeds then run with the chosen settings.

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
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from userip.baselines.kar import KARConfig
from userip.baselines.pepler import PEPLERConfig
from userip.baselines.rella import ReLLaConfig
from userip.baselines.rows import BASELINE_ROWS, BaselineConfigs, cell_key, changes_lm, lm_placement
from userip.codebook.config import QuantizationConfig
from userip.ctr.models import MODELS
from userip.ctr.recipe import CTRResult, train_ctr
from userip.ctr.trainer import TrainerConfig
from userip.data.prepare import prepare
from userip.data.preprocess import PrepareConfig, SplitMode
from userip.data.protocols import Protocol, ProtocolConfig, apply_protocol, known_rows_of
from userip.data.schema import HISTORY_SPLIT, MANIFEST, Dataset
from userip.evaluation.controls import bag_of_items_bank
from userip.evaluation.plots import plot_sweep
from userip.evaluation.probes import one_hot_codes, probe_markdown, probe_report
from userip.evaluation.tables import compare_with_base, markdown_table, summarize_over_seeds
from userip.feature_bank import UNKNOWN_CODE, FeatureBank
from userip.pipeline.run import PipelineConfig, stage_profile
from userip.profile.bank import build_aux, code_usage, write_bank
from userip.profile.model import profile_means
from userip.profile.recipe import load_soft_tokens
from userip.profile.stage import ProfileStageConfig, add_new_users, read_stage_config, stage_lm_path
from userip.prompts import ProfileSpec
from userip.prompts.template import HistoryFeedback
from userip.utils.config import ConfigError, to_dict
from userip.utils.io import atomic_write_json, atomic_write_text, atomic_write_with, read_json

log = logging.getLogger(__name__)

PAPER_BASELINES = ["ffm", "afm", "fibinet", "difm", "afn", "deepfm", "autoint", "onn", "pnn", "dcnv2", "dcn"]
TABLES = ("table2", "table3", "table4", "figure5", "figure6")
# Control rows of Table 2 (UserIP-<model>'s CTR model with other user fields):
#   bag_of_items  IDs from k-means on each user's bag of profile-row items (same codebook sizes): what the LM
#                 adds over plain clustering of the same evidence
#   attributes    the dataset's true user attributes (``attribute_features``): the ceiling of a user profile
CONTROLS = ("bag_of_items", "attributes")
# The paper's LLM-based rows (docs/llm_baselines.md) are userip.baselines.rows.BASELINE_ROWS.
NEW_USERS_FILE = "new_users.parquet"  # cold_start: the cold users' known rows, as a --new-users file


# TrainerConfig keys a search may vary; the rest (seed, device, threads, progress) are not hyper-parameters.
SEARCHABLE_TRAINER_KEYS = (
    "lr",
    "batch_size",
    "weight_decay",
    "embedding_weight_decay",
    "max_epochs",
    "min_epochs",
    "patience",
    "user_id_dropout",
    "warm_start",
)


def _default_profile() -> ProfileStageConfig:
    return ProfileStageConfig()


@dataclasses.dataclass
class TrainerSearchConfig:
    """Trainer settings chosen per table row on validation AUC, before the seeds run.

    The paper sets every baseline "to obtain their optimal performance"; one trainer setting for all models
    does not do that: on the synthetic default the MLP-based models sit on a plateau near AUC 0.63 at lr 1e-3
    and need a higher lr and embedding L2 to leave it, while FM-type models do not. Each row (a CTR model
    without profiles, with the main bank's IDs, or without VQ) gets the grid candidate with the best mean
    *validation* AUC over ``seeds``; ties go to the earlier candidate. The codebook-size sweeps reuse
    UserIP-<model>'s choice, so their curves differ only in the codebooks. ``grid`` maps a TrainerConfig key
    to its candidate values (every combination is tried); empty turns the search off.
    """

    grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        bad = sorted(set(self.grid) - set(SEARCHABLE_TRAINER_KEYS))
        if bad:
            raise ConfigError(
                f"trainer_search.grid: unknown key(s) {bad}; accepted: {list(SEARCHABLE_TRAINER_KEYS)}"
            )
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"trainer_search.grid.{key}: expected a non-empty list, got {values!r}")
        if self.grid and not self.seeds:
            raise ConfigError("trainer_search.seeds: at least one seed is required")

    def candidates(self, base: TrainerConfig) -> list[TrainerConfig]:
        """Every combination of the grid applied to ``base`` (just ``[base]`` without a grid)."""
        keys = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            try:
                out.append(dataclasses.replace(base, **dict(zip(keys, values))))
            except ValueError as e:
                raise ConfigError(f"trainer_search.grid {dict(zip(keys, values))}: {e}") from None
        return out


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
    trainer_search: TrainerSearchConfig = dataclasses.field(default_factory=TrainerSearchConfig)
    protocol: ProtocolConfig = dataclasses.field(default_factory=ProtocolConfig)
    controls: list[str] = dataclasses.field(default_factory=list)  # see CONTROLS
    llm_baselines: list[str] = dataclasses.field(default_factory=list)  # Table 2 rows, see BASELINE_ROWS
    llm_baseline_lm: str = "smollm2"  # the --lm spec every LLM baseline row uses
    kar: KARConfig = dataclasses.field(default_factory=KARConfig)  # rows kar, kar_nogen (mode set per row)
    pepler: PEPLERConfig = dataclasses.field(default_factory=PEPLERConfig)  # row pepler
    rella: ReLLaConfig = dataclasses.field(default_factory=ReLLaConfig)  # rows rella, rella_zeroshot
    attribute_features: list[str] = dataclasses.field(default_factory=list)  # user columns for "attributes"

    def __post_init__(self) -> None:
        bad = [c for c in self.controls if c not in CONTROLS]
        if bad:
            raise ConfigError(f"controls: unknown {bad}; accepted: {list(CONTROLS)}")
        bad = [b for b in self.llm_baselines if b not in BASELINE_ROWS]
        if bad:
            raise ConfigError(f"llm_baselines: unknown {bad}; accepted: {list(BASELINE_ROWS)}")
        if self.llm_baselines and "table2" not in self.tables:
            raise ConfigError("llm_baselines are Table 2 rows: add table2 to tables")
        if "attributes" in self.controls and not self.attribute_features:
            raise ConfigError(
                "controls: 'attributes' needs attribute_features (e.g. [gender, age, occupation])"
            )
        protocol = self.protocol.name
        if (protocol is Protocol.TIME) != (self.prepare.split is SplitMode.TIME):
            raise ConfigError(
                f"protocol.name {protocol.value!r} with prepare.split {self.prepare.split.value!r}: the time "
                "protocol is the time split (prepare.split: time), and only it"
            )
        requantized = sorted({"table3", "figure5", "figure6"} & set(self.tables))
        if protocol is Protocol.COLD_START and requantized:
            raise ConfigError(
                f"tables {requantized} re-quantize the soft tokens of trained users only, so cold users "
                "would have no IDs there; use tables [table2, table4] with protocol cold_start"
            )
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
        candidates = self.trainer_search.candidates(self.trainer)  # every grid point must be valid
        if "table3" in self.tables and any(t.warm_start for t in candidates):
            raise ConfigError(
                "table3's without-VQ row holds continuous profiles, which warm_start cannot extend a model "
                "with; drop warm_start from trainer/trainer_search or table3 from tables"
            )
        # A paired test needs >= 2 seeds; one seed still gives tables (without p-values).
        PipelineConfig(source=self.source, ctr_model=self.userip_model)  # validates the source name

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.run_dir) / "experiment"

    @property
    def baseline_configs(self) -> BaselineConfigs:
        return BaselineConfigs(self.kar, self.pepler, self.rella)


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
    """``rows``: compute only the cells of these row variants (``base``, ``userip``, ``pepler``...) and
    write no tables, so that rows can be farmed out to other processes or machines (a GPU for the LLM
    baselines) whose ``OUT/cells`` are then copied into one folder; a run without ``rows`` reuses them and
    writes the tables. ``finished_only``: compute nothing, table the cells that exist (a row short of seeds
    gets a ``seeds`` column entry and its p-value pairs only the seeds it has)."""

    def __init__(
        self, config: ExperimentConfig, rows: list[str] | None = None, finished_only: bool = False
    ) -> None:
        self.config = config
        self.rows = rows
        self.finished_only = finished_only
        self.out = config.output_dir
        self.run_dir = Path(config.run_dir)
        self.dataset: Dataset | None = None
        self.banks: dict[str, FeatureBank] = {}
        self.chosen: dict[tuple[str, str], TrainerConfig] = {}  # (model, search variant) -> trainer
        self.search_results: pd.DataFrame | None = None
        self._text_lms: dict[tuple[str, str], Any] = {}  # (dtype, device) -> the LLM baselines' TextLM

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
        self.dataset = self.prepare_data()
        bank, report = stage_profile(pipeline, self.run_dir, self.dataset)
        known_rows = self._known_rows()
        if known_rows is not None:
            bank = self._add_new_users(bank, known_rows)
        self.banks["userip"] = bank
        atomic_write_json(self.out / "profile_report.json", report)
        if self.rows is None:  # a share of the cells leaves the reports to the run that writes the tables
            self.diagnostics()

    def diagnostics(self) -> None:
        """What the profiles know (``OUT/diagnostics.md``, ``probes.csv``, ``code_usage.csv``): code usage of
        the main bank, and cross-validated linear-probe AUCs of the soft tokens and the codes against truths
        no profile saw (user attributes; held-out positive rate and genres), beside the bag of the same
        profile rows and random vectors. Users: those with trained soft tokens."""
        marker = (
            self.out / "diagnostics.json"
        )  # written last: marks diagnostics of that bank version complete
        if marker.exists() and read_json(marker).get("bank") == self.banks["userip"].version:
            return
        assert self.dataset is not None
        bank = self.banks["userip"]
        usage = code_usage(bank.codes[: self.dataset.num_users], bank.profile_names, bank.codebook_sizes)
        soft_tokens, trained_mask, _ = load_soft_tokens(self.run_dir / "profile")
        users = torch.nonzero(trained_mask).squeeze(1).numpy()
        profiles = profile_means(soft_tokens[users], self.config.profile.prompt)  # (N, P, D)
        codes = bank.lookup(users)
        features = {
            "soft_tokens": profiles.flatten(1).numpy(),
            **{f"soft_token_{n}": profiles[:, p].numpy() for p, n in enumerate(bank.profile_names)},
            "codes": one_hot_codes(codes, bank.codebook_sizes),
        }
        # Everything but the profile rows is held out from the profiles (a cold-start protocol's history
        # split leaves the CTR training rows out of them too).
        held_out = ("train", "valid", "test") if len(self.dataset.split(HISTORY_SPLIT)) else ("valid", "test")
        probes = probe_report(self.dataset, features, self.dataset.profile_rows(), users, held_out)
        atomic_write_text(self.out / "code_usage.csv", usage.to_csv(index=False))
        atomic_write_text(self.out / "probes.csv", probes.to_csv())
        text = "\n".join(
            [
                f"# {self.config.name}: what the profiles know",
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
        atomic_write_text(self.out / "diagnostics.md", text + "\n")
        atomic_write_json(marker, {"bank": bank.version})

    def prepare_data(self) -> Dataset:
        """``RUN/data`` as the protocol evaluates it (reused when it was written for the same source, prepare
        and protocol settings); cold_start also writes the cold users' known rows to ``RUN/protocol``."""
        cfg = self.config
        data_dir = self.run_dir / "data"
        wanted = {"source_options": cfg.source_options, "prepare": to_dict(cfg.prepare)}
        wanted["protocol"] = to_dict(cfg.protocol)
        if (data_dir / MANIFEST).exists():
            written = Dataset.read_manifest(data_dir).get("config", {}).get("experiment")
            if written == wanted:
                log.info("prepare: reusing %s", data_dir)
                return Dataset.load(data_dir)
            log.info("prepare: %s was written for other settings; rebuilding", data_dir)
        protocol = apply_protocol(prepare(cfg.source, cfg.source_options, cfg.prepare), cfg.protocol)
        dataset = protocol.dataset
        dataset.config["experiment"] = wanted
        new_users = self.run_dir / "protocol" / NEW_USERS_FILE
        new_users.unlink(missing_ok=True)
        if protocol.new_users is not None:
            new_users.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_with(new_users, lambda tmp: protocol.new_users.to_parquet(tmp, index=False))
        dataset.save(data_dir)  # manifest last: the new-users file is in place before the data vouches for it
        log.info("prepare: %s (%s protocol) -> %s", cfg.source, cfg.protocol.name.value, data_dir)
        return dataset

    def _known_rows(self) -> pd.DataFrame | None:
        """cold_start: the cold users' known rows (``RUN/protocol``) in dataset ids; None otherwise."""
        path = self.run_dir / "protocol" / NEW_USERS_FILE
        if not path.exists():
            return None
        assert self.dataset is not None
        return known_rows_of(pd.read_parquet(path), self.dataset)

    def _add_new_users(self, bank: FeatureBank, known_rows: pd.DataFrame) -> FeatureBank:
        """cold_start: the cold users' profiles from their known rows, through the production new-user path
        (LM, codebooks and surrogate frozen); skipped when the bank already has them (a rerun)."""
        cold_ids = np.unique(known_rows["user_id"].to_numpy())
        num_pending = int((bank.lookup(cold_ids) == UNKNOWN_CODE).any(axis=1).sum())
        if num_pending == 0:
            return bank
        log.info("cold start: inferring profiles of %d cold users from their known rows", num_pending)
        return add_new_users(self.run_dir, self.run_dir / "protocol" / NEW_USERS_FILE)

    def bank(self, variant: str) -> FeatureBank:
        """The main bank, or one re-quantized from the fixed soft tokens (cached under OUT/banks)."""
        if variant in self.banks:
            return self.banks[variant]
        if variant == "bag_of_items":
            self.banks[variant] = self._bag_of_items_bank()
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

    def _bag_of_items_bank(self) -> FeatureBank:
        """The bag-of-items control: the profiles' evidence (profile rows, cold users' known rows), same code
        counts."""
        assert self.dataset is not None
        prompt = self.config.profile.prompt
        return bag_of_items_bank(
            self.dataset,
            [p.name for p in prompt.profiles],
            [p.codebook_size for p in prompt.profiles],
            known_rows=self._known_rows(),
            signed=prompt.history_feedback is not HistoryFeedback.NONE,
        )

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
                out += [Cell("table2", main, control, seed) for control in cfg.controls]
                out += [Cell("table2", main, baseline, seed) for baseline in cfg.llm_baselines]
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
            if self.rows is None or self._canonical(c.variant) in self.rows:
                unique.setdefault((c.model, self._canonical(c.variant), c.seed), c)
        return list(unique.values())

    def _canonical(self, variant: str) -> str:
        """``hobby4`` with the default hobby size is the main bank: train it once."""
        if variant.startswith(("hobby", "background")):
            specs = self.config.profile.prompt.profiles
            if self._variant_sizes(variant) == (specs[0].codebook_size, specs[1].codebook_size):
                return "userip"
        return variant

    def search_variant(self, cell: Cell) -> str:
        """Which row's trainer choice a cell uses: its own, or UserIP-<model>'s for a codebook-size sweep."""
        variant = self._canonical(cell.variant)
        return "userip" if variant.startswith(("hobby", "background")) else variant

    def search_cells(self) -> list[tuple[Cell, TrainerConfig]]:
        """(cell, candidate trainer) pairs of the trainer search: rows x grid x search seeds."""
        search = self.config.trainer_search
        if not search.grid:
            return []
        rows = dict.fromkeys(
            (c.model, self.search_variant(c))
            for c in self.cells()
            if c.variant not in BASELINE_ROWS or BASELINE_ROWS[c.variant].uses_ctr_trainer
        )
        candidates = search.candidates(self.config.trainer)
        return [
            (Cell("search", model, variant, seed), trainer)
            for model, variant in rows
            for trainer in candidates
            for seed in search.seeds
        ]

    def trainer_for(self, cell: Cell) -> TrainerConfig:
        return self.chosen.get((cell.model, self.search_variant(cell)), self.config.trainer)

    def select_trainers(self) -> None:
        """Run the search cells and keep, per row, the candidate with the best mean validation AUC."""
        pairs = self.search_cells()
        if not pairs:
            return
        keys = list(self.config.trainer_search.grid)
        records = []
        for cell, trainer in tqdm(pairs, desc="trainer search", unit="cell"):
            record = self.run_cell(cell, trainer)
            if record["valid_auc"] is None:
                raise ValueError("trainer_search needs a validation split; this dataset has none")
            records.append({**record, **{k: getattr(trainer, k) for k in keys}})
        search = pd.DataFrame(records)
        ranked = (
            search.groupby(["model", "variant", *keys], sort=False)["valid_auc"]
            .agg(valid_auc_mean="mean", valid_auc_std="std")
            .reset_index()
        )
        # idxmax keeps the first maximum: ties go to the earlier grid candidate.
        best = ranked.loc[ranked.groupby(["model", "variant"], sort=False)["valid_auc_mean"].idxmax()]
        for row in best.itertuples(index=False):
            chosen = {k: _plain(getattr(row, k)) for k in keys}
            self.chosen[(row.model, row.variant)] = dataclasses.replace(self.config.trainer, **chosen)
        ranked["chosen"] = ranked.index.isin(best.index)
        atomic_write_text(self.out / "trainer_search.csv", ranked.to_csv(index=False))
        self.search_results = ranked

    def cell_path(self, cell: Cell, trainer: TrainerConfig) -> Path:
        """Cells are keyed by what they depend on (trainer and model config, profile config), so a rerun with
        another config retrains instead of reusing stale numbers; a search cell whose candidate wins is the
        same file as the final cell of that seed, so it is trained once."""
        key = {
            "trainer": to_dict(trainer),
            "model": self.config.model_configs.get(cell.model, {}),
            "profile": to_dict(self.config.profile),
            "requantize_epochs": self.config.requantize_epochs,
            "attribute_features": self.config.attribute_features if cell.variant == "attributes" else None,
            "llm_baseline": (
                cell_key(cell.variant, self.config.baseline_configs, self.config.llm_baseline_lm)
                if cell.variant in BASELINE_ROWS
                else None
            ),
            "bank": self.banks["userip"].version if "userip" in self.banks else None,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{cell.model}__{self._canonical(cell.variant)}__seed{cell.seed}__{digest}.json"
        return self.out / "cells" / name

    def run_cell(self, cell: Cell, trainer: TrainerConfig) -> dict[str, Any]:
        path = self.cell_path(cell, trainer)
        if path.exists():
            return read_json(path)
        variant = self._canonical(cell.variant)
        if variant in BASELINE_ROWS:
            return self._run_llm_baseline_cell(cell, trainer, path)
        with_profiles = variant not in ("base", "attributes")
        start = time.perf_counter()
        result = train_ctr(
            self.dataset,
            cell.model,
            with_profiles=with_profiles,
            bank=self.bank(variant) if with_profiles else None,
            user_features=self.config.attribute_features if variant == "attributes" else (),
            model_config=self.config.model_configs.get(cell.model, {}),
            config=trainer,
            seed=cell.seed,
            save=False,
        )
        return _write_cell(path, cell.model, variant, cell.seed, result, time.perf_counter() - start)

    def _run_llm_baseline_cell(self, cell: Cell, trainer: TrainerConfig, path: Path) -> dict[str, Any]:
        """One seed of an LLM baseline row (``userip.baselines.rows``). Offline work that does not depend
        on the seed (KAR's generation and encoding, ReLLa's item embeddings) is cached in ``RUN/baselines``
        by split, LM hash, prompt and decoding settings, so only a row's first cell pays for it. Every
        cell's cost is kept in ``OUT/llm_baseline_cost.json`` under its row and seed."""
        from userip.baselines.rows import train_row  # the baselines' LM loads only when such a row runs

        cfg = self.config
        start = time.perf_counter()
        row = train_row(
            cell.variant,
            self.dataset,
            self._text_lm(cell.variant),
            cfg.baseline_configs,
            cell.seed,
            trainer_config=trainer,
            model_config=cfg.model_configs.get(cell.model, {}),
            cache_dir=self.run_dir / "baselines",
        )
        cost_path = self.out / "llm_baseline_cost.json"
        costs = read_json(cost_path) if cost_path.exists() else {}
        costs.setdefault(cell.variant, {"lm": cfg.llm_baseline_lm})[f"seed{cell.seed}"] = (
            row.offline_cost.to_dict()
        )
        atomic_write_json(cost_path, costs)
        return _write_cell(path, cell.model, cell.variant, cell.seed, row.result, time.perf_counter() - start)

    def _text_lm(self, variant: str) -> Any:
        """The LM of an LLM baseline row, loaded once per (dtype, device); a row that trains the LM's own
        weights (PEPLER with ``train_lm``) gets a fresh copy."""
        from userip.baselines.llm_text import load_text_lm

        cfg = self.config
        placement = lm_placement(variant, cfg.baseline_configs)
        if placement in self._text_lms and not changes_lm(variant, cfg.baseline_configs):
            return self._text_lms[placement]
        spec = cfg.llm_baseline_lm
        if spec == cfg.profile.lm.name_or_path:  # the profile stage's own LM: load it, do not rebuild it
            spec = stage_lm_path(self.run_dir, read_stage_config(self.run_dir)[0], self.dataset)
        lm = load_text_lm(spec, dataset=self.dataset, dtype=placement[0], device=placement[1])
        if not changes_lm(variant, cfg.baseline_configs):
            self._text_lms[placement] = lm
        return lm

    def run(self) -> dict[str, Any]:
        if self.rows is not None:
            every = {self._canonical(c.variant) for c in Experiment(self.config).cells()}
            unknown = sorted(set(self.rows) - every)
            if unknown or not self.rows:
                raise ConfigError(
                    f"rows: {unknown or self.rows} not among this experiment's rows {sorted(every)}"
                )
        self.setup()
        searched = self.search_cells()
        done = sum(self.cell_path(c, t).exists() for c, t in searched)
        log.info("trainer search: %d cells (%d already finished)", len(searched), done)
        self.select_trainers()
        cells = self.cells()
        done = sum(self.cell_path(c, self.trainer_for(c)).exists() for c in cells)
        log.info("%d cells (%d already finished)", len(cells), done)
        if self.finished_only:
            missing = [c for c in cells if not self.cell_path(c, self.trainer_for(c)).exists()]
            for c in missing:
                log.warning("finished_only: no cell %s (left out of the tables)", c.key)
            cells = [c for c in cells if c not in missing]
        records = []
        for cell in tqdm(cells, desc="experiment cells", unit="cell"):
            records.append(self.run_cell(cell, self.trainer_for(cell)))
        if self.rows is not None:  # a share of the cells: the run without rows writes the tables
            return {
                "cells": records,
                "markdown": f"{len(records)} cells of rows {self.rows} in {self.out / 'cells'}",
            }
        results = pd.DataFrame(records)
        atomic_write_text(self.out / "results.csv", results.to_csv(index=False))
        return self.report(results)

    # ------------------------------------------------------------------ tables and figures
    def report(self, results: pd.DataFrame) -> dict[str, Any]:
        cfg = self.config
        main = cfg.userip_model.lower()
        results = results.assign(name=[row_name(m, v) for m, v in zip(results.model, results.variant)])
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
            seeds = rows.groupby("name")["seed"].nunique()
            if (seeds != len(cfg.seeds)).any():  # finished_only: say which rows have fewer seeds
                summary.insert(1, "seeds", [int(seeds[name]) for name in summary["model"]])
            md.extend(
                ["", f"## {title}", "", markdown_table(summary, {"auc_mean": True, "logloss_mean": False})]
            )
            out["tables"][key] = summary.to_dict(orient="records")

        if "table2" in cfg.tables:
            rows = results[
                (results.variant == "base") & results.model.isin([m.lower() for m in cfg.baselines])
            ]
            ours = ["userip", *cfg.controls, *cfg.llm_baselines]
            rows = pd.concat([rows, results[(results.model == main) & results.variant.isin(ours)]])
            table(
                rows,
                f"Table 2: overall performance ({cfg.protocol.name.value} protocol)",
                "table2",
                main.upper(),
                [row_name(main, v) for v in ours],
            )
        if self.search_results is not None:
            chosen = self.search_results[self.search_results["chosen"]].drop(columns=["chosen"])
            chosen = chosen.assign(model=[row_name(m, v) for m, v in zip(chosen.model, chosen.variant)]).drop(
                columns=["variant"]
            )
            # Grid values as written (1e-05, not 0.0000); the AUC columns keep the tables' 4 decimals.
            chosen = chosen.astype({k: str for k in cfg.trainer_search.grid})
            grid = ", ".join(f"{k} {v}" for k, v in cfg.trainer_search.grid.items())
            md.extend(
                [
                    "",
                    "## Trainer settings chosen on validation AUC",
                    "",
                    f"Grid: {grid}; mean validation AUC over seeds {cfg.trainer_search.seeds}; every "
                    "candidate's score is in `trainer_search.csv`. Codebook-size sweeps use "
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


def _write_cell(
    path: Path, model: str, variant: str, seed: int, result: CTRResult, seconds: float
) -> dict[str, Any]:
    """A finished cell's record (test and valid metrics, best epoch, wall seconds), written atomically."""
    record = {
        "model": model,
        "variant": variant,
        "seed": seed,
        "auc": result.test["auc"],
        "logloss": result.test["logloss"],
        "valid_auc": (result.valid or {}).get("auc"),
        "valid_logloss": (result.valid or {}).get("logloss"),
        "best_epoch": result.fit.best_epoch,
        "seconds": seconds,
    }
    atomic_write_json(path, record)
    return record


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


def _plain(value: Any) -> Any:
    """numpy scalar -> Python scalar (a TrainerConfig field must stay JSON- and validation-friendly)."""
    return value.item() if hasattr(value, "item") else value


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


def run_experiment(
    config: ExperimentConfig, rows: list[str] | None = None, finished_only: bool = False
) -> dict[str, Any]:
    return Experiment(config, rows, finished_only).run()


def cell_count(config: ExperimentConfig) -> int:
    """Cells of the experiment, trainer-search cells included (a winning search cell is counted twice)."""
    experiment = Experiment(config)
    return len(experiment.cells()) + len(experiment.search_cells())

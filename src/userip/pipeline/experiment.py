"""``userip experiment``: the paper's evaluation over seeds on one prepared dataset.

    Table 2   every CTR baseline without profiles, and UserIP-DCN (profile IDs from the feature bank)
    Table 3   UserIP-DCN with and without the VQ module (ablation)
    Table 4   transfer of the same IDs to other CTR models (PNN, ONN, DCNv2 by default)
    Figure 5  AUC / Logloss of UserIP-DCN as the hobby codebook size goes 4 .. 81
    Figure 6  the same for the background codebook size 3 .. 81

With ``trainer_search`` set, each row of the tables (a CTR model with or without profile IDs) first gets its
own trainer settings, chosen on validation AUC over a small grid and at least 3 seeds, keeping the simplest
setting unless a richer one is better beyond noise (``TrainerSearchConfig``; the test split is never
consulted); the seeds then run with the chosen settings. With ``profile_search`` set, the profile setting is
chosen the same way first (``ProfileSearchConfig``): every candidate setting gets its own cached profile stage
(``Experiment.profile_stage``: ``RUN/profiles/<name>-<digest>``, sharing ``RUN/data`` and the keyed offline LM
in ``RUN/lm``), scored by UserIP-<model>'s validation AUC, and the chosen one is the main bank. Every row's
Logloss is calibrated on validation (``userip.ctr.calibration``); the raw one is kept as ``logloss_raw``.

Every (table, model, variant, seed) cell is a JSON file under ``OUT/cells/`` holding the key it was computed
under (trainer, model and profile configs, dataset and bank identity, the LLM baseline's section); a rerun
reuses a cell only when that key is the one asked now and its metrics are valid (``reuse_cached`` in
``userip.utils.artifacts``), so an interrupted experiment resumes where it stopped and a changed or damaged
cell is recomputed. Soft tokens are inferred once (``userip profile``); the ablation and the codebook sweeps
re-train only the quantization module (codebooks + surrogate, eq. 5) on those fixed profiles: with the
paper's lambda = 0.001 the LM term dominates the soft tokens' updates anyway, and re-running the frozen LLM
for each of ~10 codebook settings would multiply the cost for no change in method. ``codebook_sweep: retrain``
(or ``both``: two curves) runs the whole profile stage per size instead, each cached like a search candidate.

This module runs the cells; the config is ``experiment_config``, the tables and diagnostics
``experiment_report``, the re-quantization ``userip.profile.requantize``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from userip.baselines.rows import BASELINE_ROWS, cell_key, changes_lm, lm_placement
from userip.codebook.config import QuantizationConfig
from userip.ctr.recipe import CTRResult, train_ctr
from userip.ctr.trainer import CTRTrainerConfig
from userip.data.prepare import prepare
from userip.data.protocols import apply_protocol, known_rows_of
from userip.data.schema import MANIFEST, Dataset
from userip.evaluation.controls import bag_of_items_bank
from userip.evaluation.metrics import choose_simplest_within_noise, hopeless_candidates
from userip.evaluation.tables import markdown_table
from userip.feature_bank import UNKNOWN_CODE, FeatureBank
from userip.pipeline.experiment_config import (
    CONTROLS,
    PAPER_BASELINES,
    SEARCHABLE_TRAINER_KEYS,
    TABLES,
    ExperimentConfig,
    ProfileSearchConfig,
    TrainerSearchConfig,
    apply_profile_point,
    sweep_suffixes,
)
from userip.pipeline.experiment_report import row_name, write_diagnostics, write_tables
from userip.pipeline.run import finished_profile_stage, reuse_or_run_profile_stage
from userip.profile.requantize import requantize
from userip.profile.stage import ProfileStageConfig, add_new_users, reopen_profile
from userip.prompts.template import HistoryFeedback
from userip.utils.artifacts import CACHE_KEY_FIELD, canonical, check_record, key_digest, reuse_cached
from userip.utils.config import ConfigError, to_dict
from userip.utils.io import atomic_dir, atomic_write_json, atomic_write_text, atomic_write_with, read_json
from userip.utils.run_layout import RunLayout

__all__ = [  # the config and report names live in experiment_config / experiment_report / profile.requantize
    "CONTROLS",
    "NEW_USERS_FILE",
    "PAPER_BASELINES",
    "SEARCHABLE_TRAINER_KEYS",
    "TABLES",
    "Cell",
    "Experiment",
    "ExperimentConfig",
    "ProfileSearchConfig",
    "ProfileStage",
    "TrainerSearchConfig",
    "cell_count",
    "requantize",
    "row_name",
    "run_experiment",
]

log = logging.getLogger(__name__)

NEW_USERS_FILE = "new_users.parquet"  # cold_start: the cold users' known rows, as a --new-users file
RETRAIN_SUFFIX = "_retrain"  # a codebook-size variant whose whole profile stage ran at that size


@dataclasses.dataclass(frozen=True)
class ProfileStage:
    """One profile setting's finished stage: its config, run folder, bank (cold users included) and
    report."""

    profile: ProfileStageConfig
    run_dir: Path
    bank: FeatureBank
    report: dict[str, Any]


# ---------------------------------------------------------------------------------------------- cells
@dataclasses.dataclass(frozen=True)
class Cell:
    table: str
    model: str  # CTR model name
    # "base" (no profiles), "userip" (main bank), or a bank variant ("novq", "hobby9", "hobby9_retrain", ...)
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.table}__{self.model}__{self.variant}__seed{self.seed}"


class Experiment:
    """``rows``: compute only the cells of these row variants (``base``, ``userip``, ``pepler``...) and
    write no tables, so that rows can be farmed out to other processes or machines (a GPU for the LLM
    baselines) whose ``OUT/cells`` are then copied into one folder; a run without ``rows`` reuses them and
    writes the tables. ``finished_only``: compute nothing, table the cells that exist (a row short of seeds
    gets a ``seeds`` column entry and its p-value pairs only the seeds it has). With ``profile_search``
    every process (rows or not) first makes the same choice: its stages and cells are reused from ``RUN`` and
    ``OUT/cells`` when they are there (copy them along when farming rows out), else computed."""

    def __init__(
        self, config: ExperimentConfig, rows: list[str] | None = None, finished_only: bool = False
    ) -> None:
        self.config = config  # with a profile search: the chosen profile once ``setup`` ran
        self.requested = config
        self.rows = rows
        self.finished_only = finished_only
        self.out = config.output_dir
        self.run_dir = Path(config.run_dir)
        self.profile_dir = self.run_dir  # the main bank's stage: RUN, or the chosen setting's folder
        self.dataset: Dataset | None = None
        self.banks: dict[str, FeatureBank] = {}
        self.chosen: dict[tuple[str, str], CTRTrainerConfig] = {}  # (model, search variant) -> trainer
        self.search_results: pd.DataFrame | None = None
        self.profile_search_results: pd.DataFrame | None = None
        self._stages: dict[str, ProfileStage] = {}  # key_digest of a profile setting -> its stage
        self._unfinished: set[str] = set()  # settings whose stage a look-up (compute=False) found unfinished
        self._text_lms: dict[tuple[str, str], Any] = {}  # (dtype, device) -> the LLM baselines' TextLM
        self._finished: dict[Path, dict[str, Any] | None] = {}  # cell file -> its valid record (or None)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """The data, the profile setting (chosen by ``profile_search`` when it has a grid) and its stage as
        the main bank."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.dataset = self.prepare_data()
        if self.config.profile_search.grid:
            self.config = dataclasses.replace(self.config, profile=self.select_profile())
        stage = self.profile_stage(self.config.profile, "chosen")
        assert stage is not None
        self.profile_dir = stage.run_dir
        self.banks["userip"] = stage.bank
        atomic_write_json(self.out / "profile_report.json", stage.report)
        if self.rows is None:  # a share of the cells leaves the reports to the run that writes the tables
            self.diagnostics()

    def diagnostics(self) -> None:
        assert self.dataset is not None
        write_diagnostics(self.config, self.banks["userip"], self.out, self.profile_dir, self.dataset)

    def prepare_data(self) -> Dataset:
        """``RUN/data`` as the protocol evaluates it (reused when it was written for the same source, prepare
        and protocol settings); cold_start also writes the cold users' known rows to ``RUN/protocol``."""
        cfg = self.config
        data_dir = RunLayout(self.run_dir).data
        wanted = {"source_options": cfg.source_options, "prepare": to_dict(cfg.prepare)}
        wanted |= {"protocol": to_dict(cfg.protocol), "source": cfg.source}
        if (data_dir / MANIFEST).exists():
            try:
                recorded = Dataset.read_manifest(data_dir).get("config")
            except (ValueError, OSError) as e:
                log.warning("prepare: %s has an unusable manifest (%s)", data_dir, e)
                recorded = None
            written = recorded.get("experiment") if isinstance(recorded, dict) else None
            if written == canonical(wanted):
                log.info("prepare: reusing %s", data_dir)
                return Dataset.load(data_dir)
            log.info("prepare: %s was written for other settings; rebuilding", data_dir)
        with tqdm(total=3, desc=f"prepare {cfg.source}", unit="phase") as bar:
            prepared = prepare(cfg.source, cfg.source_options, cfg.prepare, progress=bar)
            protocol = apply_protocol(prepared, cfg.protocol)
            bar.update()
        dataset = protocol.dataset
        dataset.config["experiment"] = wanted
        new_users = RunLayout(self.run_dir).protocol / NEW_USERS_FILE
        new_users.unlink(missing_ok=True)
        if protocol.new_users is not None:
            new_users.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_with(new_users, lambda tmp: protocol.new_users.to_parquet(tmp, index=False))
        with atomic_dir(data_dir) as staging:  # new-users file first: in place before the data vouches for it
            dataset.save(staging)
        log.info("prepare: %s (%s protocol) -> %s", cfg.source, cfg.protocol.name.value, data_dir)
        return dataset

    def _known_rows(self) -> pd.DataFrame | None:
        """cold_start: the cold users' known rows (``RUN/protocol``) in dataset ids; None otherwise."""
        path = RunLayout(self.run_dir).protocol / NEW_USERS_FILE
        if not path.exists():
            return None
        assert self.dataset is not None
        return known_rows_of(pd.read_parquet(path), self.dataset)

    def _add_new_users(self, bank: FeatureBank, known_rows: pd.DataFrame, stage_dir: Path) -> FeatureBank:
        """cold_start: the cold users' profiles from their known rows, through the production new-user path
        (LM, codebooks and surrogate of the stage in ``stage_dir`` frozen); skipped when the bank already has
        them (a rerun)."""
        num_pending = _num_pending(bank, known_rows)
        if num_pending == 0:
            return bank
        log.info("cold start: inferring profiles of %d cold users from their known rows", num_pending)
        return add_new_users(stage_dir, RunLayout(self.run_dir).protocol / NEW_USERS_FILE)

    # ------------------------------------------------------------------ profile stages per setting
    def stage_dir(self, profile: ProfileStageConfig, name: str) -> Path:
        """Where the stage of ``profile`` lives: RUN itself for the experiment's own setting (so an earlier
        run's stage is reused), else ``RUN/profiles/<name>-<key_digest of the setting>``."""
        if canonical(to_dict(profile)) == canonical(to_dict(self.requested.profile)):
            return self.run_dir
        safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")[:60] or "setting"
        return RunLayout(self.run_dir).profiles / f"{safe}-{key_digest(to_dict(profile))}"

    def profile_stage(
        self, profile: ProfileStageConfig, name: str, compute: bool = True
    ) -> ProfileStage | None:
        """The finished stage of one profile setting, run in its own folder (``stage_dir``) on RUN's prepared
        data, or reused when its record holds this very setting and its bank this dataset
        (``run.finished_profile_stage``); the offline LM is RUN's keyed cache, so a setting whose LM key is
        the same reuses it. cold_start: the bank gets the cold users through the new-user path.
        ``compute=False``: None instead of running anything (an unfinished stage)."""
        assert self.dataset is not None
        digest = key_digest(to_dict(profile))
        if digest in self._stages:
            return self._stages[digest]
        if not compute and digest in self._unfinished:  # asked again for every cell key: no re-read
            return None
        run_dir = self.stage_dir(profile, name)
        known_rows = self._known_rows()
        if compute:
            if run_dir != self.run_dir:
                self._link_shared(run_dir)
            bank, report = reuse_or_run_profile_stage(profile, run_dir, self.dataset)
            if known_rows is not None:
                bank = self._add_new_users(bank, known_rows, run_dir)
        else:
            found = finished_profile_stage(profile, run_dir, self.dataset)
            if found is None or (known_rows is not None and _num_pending(found[0], known_rows)):
                self._unfinished.add(digest)
                return None
            bank, report = found
        self._stages[digest] = ProfileStage(profile, run_dir, bank, report)
        return self._stages[digest]

    def _link_shared(self, stage_dir: Path) -> None:
        """``stage_dir/data`` and ``stage_dir/lm`` as relative links to RUN's: one prepared dataset and one
        keyed LM cache for every setting (a moved RUN keeps them)."""
        shared, own = RunLayout(self.run_dir), RunLayout(stage_dir)
        shared.lm.mkdir(parents=True, exist_ok=True)  # the first setting may be the first to need an LM
        for target, link in ((shared.data, own.data), (shared.lm, own.lm)):
            relative = os.path.relpath(target, link.parent)
            if link.is_symlink() and os.readlink(link) == relative:
                continue
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                raise ConfigError(
                    f"{link}: expected a link to the experiment's {target}, found a file or folder"
                )
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(relative, target_is_directory=True)

    def retrain_stage(self, variant: str, compute: bool = True) -> ProfileStage | None:
        """The whole profile stage at a sweep variant's codebook sizes (``hobby9_retrain``)."""
        profile = self._retrain_profile(variant)
        return self.profile_stage(profile, variant.removesuffix(RETRAIN_SUFFIX), compute)

    def _retrain_profile(self, variant: str) -> ProfileStageConfig:
        hobby, background = self._variant_sizes(variant)
        specs = self.config.profile.prompt.profiles
        point: dict[str, Any] = {
            f"prompt.profiles.{specs[0].name}.codebook_size": hobby,
            f"prompt.profiles.{specs[1].name}.codebook_size": background,
        }
        quant = self._sweep_quantization([hobby, background])
        if quant is not self.config.profile.quantization:  # else the key (and stage folder) stays as it was
            point["quantization.balance_min_share"] = quant.balance_min_share
        return apply_profile_point(self.config.profile, point)

    def _sweep_quantization(self, sizes: list[int]) -> QuantizationConfig:
        """The quantization config for a sweep's sizes (``QuantizationConfig.for_codebook_sizes``)."""
        main = [p.codebook_size for p in self.config.profile.prompt.profiles]
        return self.config.profile.quantization.for_codebook_sizes(main, sizes)

    def select_profile(self) -> ProfileStageConfig:
        """Run every candidate setting's stage and its UserIP-<model> search cells (the base trainer, the
        search seeds), drop hopeless candidates after the first seed, and return the simplest setting within
        noise of the best (``ProfileSearchConfig``); ``OUT/profile_search.csv`` / ``.md`` keep the
        evidence. Validation AUC only: the test split is never consulted."""
        cfg = self.config
        search = cfg.profile_search
        points, candidates, complexity = search.points(), search.candidates(cfg.profile), search.complexity()
        main = cfg.userip_model.lower()
        scores = np.full((len(candidates), len(search.seeds)), np.nan)
        stages: list[ProfileStage | None] = [None] * len(candidates)
        wall_seconds, ctr_seconds = np.zeros(len(candidates)), np.zeros(len(candidates))
        pruned: set[int] = set()
        with tqdm(total=len(candidates) * len(search.seeds), desc="profile search", unit="cell") as bar:
            for s, seed in enumerate(search.seeds):
                for c, profile in enumerate(candidates):
                    if c in pruned:
                        continue
                    start = time.perf_counter()
                    if stages[c] is None:
                        stages[c] = self.profile_stage(profile, _point_name(points[c]))
                    record = self.run_cell(
                        Cell("profile_search", main, "userip", seed), cfg.trainer, stages[c]
                    )
                    wall_seconds[c] += time.perf_counter() - start
                    if record["valid_auc"] is None:
                        raise ValueError("profile_search needs a validation split; this dataset has none")
                    scores[c, s] = record["valid_auc"]
                    ctr_seconds[c] += record["seconds"]
                    bar.update()
                if s == 0:
                    pruned = _prune_after_first_seed(scores[:, 0], search, bar, "profile search", seed)
        choice = choose_simplest_within_noise(scores, search.se_threshold, complexity)
        table = []
        for c, point in enumerate(points):
            stage = stages[c]
            assert stage is not None
            ran = scores[c][~np.isnan(scores[c])]
            paired = (scores[choice.chosen] - scores[c])[~np.isnan(scores[c])]
            table.append(
                {
                    "candidate": c + 1,
                    **point,
                    "complexity": complexity[c],
                    "stage": stage.run_dir.relative_to(self.run_dir).as_posix() or ".",
                    "valid_auc_mean": float(ran.mean()),
                    "valid_auc_se": _standard_error(ran),
                    "seeds_run": len(ran),
                    "gap_to_chosen": float(paired.mean()),
                    "gap_to_chosen_se": _standard_error(paired),
                    "gap_to_best": choice.gaps[c],
                    "gap_se": choice.gap_ses[c],
                    "within_noise": choice.within_noise[c],
                    "pruned": c in pruned,
                    "chosen": c == choice.chosen,
                    "profile_seconds": stage.report.get("lm_seconds"),
                    "ctr_seconds": float(ctr_seconds[c]),
                    "wall_seconds": float(wall_seconds[c]),
                }
            )
        ranked = pd.DataFrame(table)
        atomic_write_text(self.out / "profile_search.csv", ranked.to_csv(index=False))
        atomic_write_text(self.out / "profile_search.md", _profile_search_markdown(cfg, ranked))
        self.profile_search_results = ranked
        log.info(
            "profile search: chose candidate %d of %d %s (best by mean: %d), stage %s",
            choice.chosen + 1,
            len(candidates),
            points[choice.chosen],
            choice.best + 1,
            table[choice.chosen]["stage"],
        )
        return candidates[choice.chosen]

    def bank(self, variant: str) -> FeatureBank:
        """The main bank, or one re-quantized from the fixed soft tokens (cached under OUT/banks)."""
        if variant in self.banks:
            return self.banks[variant]
        if variant == "bag_of_items":
            self.banks[variant] = self._bag_of_items_bank()
            return self.banks[variant]
        if variant.endswith(RETRAIN_SUFFIX):
            stage = self.retrain_stage(variant)
            assert stage is not None
            self.banks[variant] = stage.bank
            return stage.bank
        hobby, background = self._variant_sizes(variant)
        quant = dataclasses.replace(
            self._sweep_quantization([hobby, background]), without_vq=variant == "novq"
        )
        assert self.dataset is not None
        # Keyed by everything the re-quantized bank is made from: the main bank's version (its soft tokens),
        # the profile and quantization configs, the sizes and epochs; rebuilt soft tokens or other settings
        # never meet a stale variant bank.
        key = {
            "profile": to_dict(self.config.profile),
            "quantization": to_dict(quant),
            "codebook_sizes": [hobby, background],
            "epochs": self.config.requantize_epochs,
            "dataset": self.dataset.content_hash,
        }
        bank_dir = self.out / "banks" / self.banks["userip"].version / f"{variant}-{key_digest(key)}"
        bank = None
        if bank_dir.exists():
            try:
                bank = FeatureBank.load(bank_dir, expected_dataset_hash=self.dataset.content_hash)
            except (ValueError, OSError) as e:  # a damaged cache is rebuilt, not trusted
                log.warning("bank %s: %s is unusable (%s); re-quantizing", variant, bank_dir, e)
        if bank is None:
            bank = requantize(
                self.profile_dir,
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
        variant = variant.removesuffix(RETRAIN_SUFFIX)
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
            suffixes = sweep_suffixes(cfg.codebook_sweep)
            if "figure5" in cfg.tables:
                out += [
                    Cell("figure5", main, f"hobby{k}{x}", seed) for x in suffixes for k in cfg.hobby_sizes
                ]
            if "figure6" in cfg.tables:
                sizes = cfg.background_sizes
                out += [Cell("figure6", main, f"background{k}{x}", seed) for x in suffixes for k in sizes]
        # The same (model, variant, seed) in several tables is trained once.
        unique: dict[tuple[str, str, int], Cell] = {}
        for c in out:
            if self.rows is None or self._canonical(c.variant) in self.rows:
                unique.setdefault((c.model, self._canonical(c.variant), c.seed), c)
        return list(unique.values())

    def _canonical(self, variant: str) -> str:
        """``hobby4`` (or ``hobby4_retrain``) with the default hobby size is the main bank: train it once."""
        if variant.startswith(("hobby", "background")):
            specs = self.config.profile.prompt.profiles
            if self._variant_sizes(variant) == (specs[0].codebook_size, specs[1].codebook_size):
                return "userip"
        return variant

    def search_variant(self, cell: Cell) -> str:
        """Which row's trainer choice a cell uses: its own, or UserIP-<model>'s for a codebook-size sweep."""
        variant = self._canonical(cell.variant)
        return "userip" if variant.startswith(("hobby", "background")) else variant

    def search_cells(self) -> list[tuple[Cell, CTRTrainerConfig]]:
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

    def trainer_for(self, cell: Cell) -> CTRTrainerConfig:
        return self.chosen.get((cell.model, self.search_variant(cell)), self.config.trainer)

    def select_trainers(self) -> None:
        """Run the search cells and keep, per row, the simplest candidate whose validation AUC is within
        noise of the best (``TrainerSearchConfig``); candidates hopeless after the first seed are dropped."""
        pairs = self.search_cells()
        if not pairs:
            return
        search = self.config.trainer_search
        keys = list(search.grid)
        candidates = search.candidates(self.config.trainer)
        rows = list(dict.fromkeys((c.model, c.variant) for c, _ in pairs))
        # scores[row][candidate, seed]: validation AUC; NaN for a cell not run (a pruned candidate)
        scores = {row: np.full((len(candidates), len(search.seeds)), np.nan) for row in rows}
        pruned: dict[tuple[str, str], set[int]] = {row: set() for row in rows}
        with tqdm(total=len(pairs), desc="trainer search", unit="cell") as bar:
            for s, seed in enumerate(search.seeds):
                for row in rows:
                    for c, trainer in enumerate(candidates):
                        if c in pruned[row]:
                            continue
                        record = self.run_cell(Cell("search", row[0], row[1], seed), trainer)
                        if record["valid_auc"] is None:
                            raise ValueError("trainer_search needs a validation split; this dataset has none")
                        scores[row][c, s] = record["valid_auc"]
                        bar.update()
                    if s == 0:
                        what = f"trainer search {row_name(*row)}"
                        pruned[row] = _prune_after_first_seed(scores[row][:, 0], search, bar, what, seed)
        table = []
        # What is simpler: a warm start (the extended model keeps DCN unless the fields beat it on
        # validation) over joint training. Learning rates, weight decays and dropouts are not simpler than one
        # another: among those the best mean wins once the simpler model is settled.
        complexity = [0 if getattr(t, "warm_start", False) else 1 for t in candidates]
        for row in rows:
            choice = choose_simplest_within_noise(scores[row], search.se_threshold, complexity)
            self.chosen[row] = candidates[choice.chosen]
            for c, trainer in enumerate(candidates):
                ran = scores[row][c][~np.isnan(scores[row][c])]
                table.append(
                    {
                        "model": row[0],
                        "variant": row[1],
                        **{k: getattr(trainer, k) for k in keys},
                        "valid_auc_mean": float(ran.mean()),
                        "valid_auc_std": float(ran.std(ddof=1)) if len(ran) > 1 else float("nan"),
                        "seeds_run": len(ran),
                        "gap_to_best": choice.gaps[c],
                        "gap_se": choice.gap_ses[c],
                        "within_noise": choice.within_noise[c],
                        "pruned": c in pruned[row],
                        "chosen": c == choice.chosen,
                    }
                )
            log.info(
                "trainer search %s: chose candidate %d of %d (best by mean: %d)",
                row_name(*row),
                choice.chosen + 1,
                len(candidates),
                choice.best + 1,
            )
        ranked = pd.DataFrame(table)
        atomic_write_text(self.out / "trainer_search.csv", ranked.to_csv(index=False))
        self.search_results = ranked

    def cell_key(
        self, cell: Cell, trainer: CTRTrainerConfig, stage: ProfileStage | None = None
    ) -> dict[str, Any]:
        """Everything a cell's numbers depend on besides its model, variant and seed (in its file name): the
        trainer and model config, the profile config, the dataset and the main bank -- or, for a cell on
        another setting's stage (``stage``; a retrained codebook size), that setting and its bank (None while
        that stage is unfinished: no finished cell matches)."""
        assert self.dataset is not None
        profile = self.config.profile
        bank = self.banks["userip"].version if "userip" in self.banks else None
        if stage is None and self._canonical(cell.variant).endswith(RETRAIN_SUFFIX):
            stage = self.retrain_stage(cell.variant, compute=False)
            if stage is None:
                profile = self._retrain_profile(cell.variant)
                bank = None
        if stage is not None:
            profile, bank = stage.profile, stage.bank.version
        return {
            "trainer": to_dict(trainer),
            "model": self.config.model_configs.get(cell.model, {}),
            "profile": to_dict(profile),
            "requantize_epochs": self.config.requantize_epochs,
            "attribute_features": self.config.attribute_features if cell.variant == "attributes" else None,
            "llm_baseline": (
                cell_key(cell.variant, self.config.baseline_configs, self.config.llm_baseline_lm)
                if cell.variant in BASELINE_ROWS
                else None
            ),
            "dataset": self.dataset.content_hash,
            "bank": bank,
        }

    def cell_path(self, cell: Cell, trainer: CTRTrainerConfig, stage: ProfileStage | None = None) -> Path:
        """Cells are named by what they depend on (``cell_key``), so a rerun with another config retrains
        instead of reusing stale numbers; a search cell whose candidate wins is the same file as the final
        cell of that seed, so it is trained once."""
        digest = key_digest(self.cell_key(cell, trainer, stage))
        name = f"{cell.model}__{self._canonical(cell.variant)}__seed{cell.seed}__{digest}.json"
        return self.out / "cells" / name

    def finished_cell(
        self, cell: Cell, trainer: CTRTrainerConfig, stage: ProfileStage | None = None
    ) -> dict[str, Any] | None:
        """The cell's record when a valid one computed under the same key exists, else None (a stale or
        invalid file is logged once and recomputed)."""
        path = self.cell_path(cell, trainer, stage)
        if path not in self._finished:
            key = self.cell_key(cell, trainer, stage)
            self._finished[path] = reuse_cached(path, key, f"cell {cell.key}", check_cell)
        return self._finished[path]

    def run_cell(
        self, cell: Cell, trainer: CTRTrainerConfig, stage: ProfileStage | None = None
    ) -> dict[str, Any]:
        """One cell, reused when finished; ``stage``: on that profile setting's bank instead of the
        variant's (a profile search candidate)."""
        finished = self.finished_cell(cell, trainer, stage)
        if finished is not None:
            return finished
        variant = self._canonical(cell.variant)
        if stage is None and variant.endswith(RETRAIN_SUFFIX):
            stage = self.retrain_stage(variant)  # its bank's version is part of the cell's key
            finished = self.finished_cell(cell, trainer, stage)
            if finished is not None:
                return finished
        path = self.cell_path(cell, trainer, stage)
        key = self.cell_key(cell, trainer, stage)
        if variant in BASELINE_ROWS:
            record = self._run_llm_baseline_cell(cell, trainer, path, key)
        else:
            with_profiles = variant not in ("base", "attributes")
            start = time.perf_counter()
            result = train_ctr(
                self.dataset,
                cell.model,
                with_profiles=with_profiles,
                bank=(stage.bank if stage is not None else self.bank(variant)) if with_profiles else None,
                user_features=self.config.attribute_features if variant == "attributes" else (),
                model_config=self.config.model_configs.get(cell.model, {}),
                config=trainer,
                seed=cell.seed,
                save=False,
            )
            seconds = time.perf_counter() - start
            record = _write_cell(path, key, cell.model, variant, cell.seed, result, seconds)
        self._finished[path] = record
        return record

    def _run_llm_baseline_cell(
        self, cell: Cell, trainer: CTRTrainerConfig, path: Path, key: dict[str, Any]
    ) -> dict[str, Any]:
        """One seed of an LLM baseline row (``userip.baselines.rows``). Offline work that does not depend
        on the seed (KAR's generation and encoding, ReLLa's item embeddings) is cached in ``RUN/baselines``
        by split, LM hash, prompt and decoding settings, so only a row's first cell pays for it. Every
        cell's cost is kept in ``OUT/llm_baseline_cost.json`` under its row and seed."""
        from userip.baselines.rows import train_row  # the baselines' LM loads only when such a row runs

        cfg = self.config
        start = time.perf_counter()
        result = train_row(
            cell.variant,
            self.dataset,
            self._text_lm(cell.variant),
            cfg.baseline_configs,
            cell.seed,
            trainer_config=trainer,
            model_config=cfg.model_configs.get(cell.model, {}),
            cache_dir=RunLayout(self.run_dir).baselines,
        )
        cost_path = self.out / "llm_baseline_cost.json"
        costs = read_json(cost_path) if cost_path.exists() else {}
        costs.setdefault(cell.variant, {"lm": cfg.llm_baseline_lm})[f"seed{cell.seed}"] = (
            result.offline_cost.to_dict()
        )
        atomic_write_json(cost_path, costs)
        seconds = time.perf_counter() - start
        return _write_cell(path, key, cell.model, cell.variant, cell.seed, result, seconds)

    def _text_lm(self, variant: str) -> Any:
        """The LM of an LLM baseline row, loaded once per (dtype, device); a row that trains the LM's own
        weights (PEPLER with ``train_lm``) gets a fresh copy."""
        from userip.baselines.llm_text import load_text_lm

        cfg = self.config
        placement = lm_placement(variant, cfg.baseline_configs)
        shared = not changes_lm(variant, cfg.baseline_configs)
        if shared and placement in self._text_lms:
            return self._text_lms[placement]
        spec = cfg.llm_baseline_lm
        if spec == cfg.profile.lm.name_or_path:  # the profile stage's own LM: load it, do not rebuild it
            spec = reopen_profile(self.profile_dir, self.dataset).lm_path
        lm = load_text_lm(spec, dataset=self.dataset, dtype=placement[0], device=placement[1])
        if shared:
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
        cells_dir = self.out / "cells"
        if self.finished_only and not any(cells_dir.glob("*.json")):  # before setup: nothing to table
            raise ConfigError(
                f"--finished-only: no finished cells in {cells_dir}; run the experiment (or its --rows) first"
            )
        self.setup()
        searched = self.search_cells()
        done = sum(self.finished_cell(c, t) is not None for c, t in searched)
        log.info("trainer search: %d cells (%d already finished)", len(searched), done)
        self.select_trainers()
        cells = self.cells()
        finished = {c for c in cells if self.finished_cell(c, self.trainer_for(c)) is not None}
        log.info("%d cells (%d already finished)", len(cells), len(finished))
        if self.finished_only:
            for c in cells:
                if c not in finished:
                    log.warning("finished_only: no cell %s (left out of the tables)", c.key)
            cells = [c for c in cells if c in finished]
            if not cells:
                raise ConfigError(
                    f"--finished-only: none of this experiment's cells is finished in {cells_dir} (the cells "
                    "there were made with another config)"
                )
        records = []
        for cell in tqdm(cells, desc="experiment cells", unit="cell"):
            records.append(self.run_cell(cell, self.trainer_for(cell)))
        # The config is written once its cells are: an experiment that fails leaves the earlier one in place.
        # As asked: a profile search's choice is in OUT/profile_search.csv.
        atomic_write_json(self.out / "config.json", to_dict(self.requested))
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
        return write_tables(
            self.config,
            results,
            self.out,
            self.run_dir,
            self.dataset,
            self.search_results,
            self.profile_search_results,
        )


def _write_cell(
    path: Path, key: dict[str, Any], model: str, variant: str, seed: int, result: CTRResult, seconds: float
) -> dict[str, Any]:
    """A finished cell's record (test and valid metrics, best epoch, wall seconds), written atomically with
    the key it was computed under; returned without the key."""
    record = {
        "model": model,
        "variant": variant,
        "seed": seed,
        "auc": result.test["auc"],
        "logloss": result.test["logloss"],  # calibrated on validation (userip.ctr.calibration)
        "logloss_raw": result.test.get("logloss_raw"),
        "valid_auc": (result.valid or {}).get("auc"),
        "valid_logloss": (result.valid or {}).get("logloss"),
        "valid_logloss_raw": (result.valid or {}).get("logloss_raw"),
        "best_epoch": result.fit.best_epoch,
        "seconds": seconds,
    }
    atomic_write_json(path, {**record, CACHE_KEY_FIELD: key})
    return record


def check_cell(record: Any, path: Path) -> None:
    """A cell file that can be tabled: its identity and finite test (and, when present, valid) metrics."""
    number, optional = (int, float), (int, float, type(None))
    check_record(
        record,
        path,
        {"model": str, "variant": str, "seed": int, "auc": number, "logloss": number}
        | {"valid_auc": optional, "valid_logloss": optional},
        finite=("auc", "logloss", "valid_auc", "valid_logloss"),
    )


def run_experiment(
    config: ExperimentConfig, rows: list[str] | None = None, finished_only: bool = False
) -> dict[str, Any]:
    return Experiment(config, rows, finished_only).run()


def cell_count(config: ExperimentConfig) -> int:
    """Cells of the experiment, trainer- and profile-search cells included (a winning search cell is counted
    twice)."""
    experiment = Experiment(config)
    search = config.profile_search
    profile_cells = len(search.points()) * len(search.seeds) if search.grid else 0
    return len(experiment.cells()) + len(experiment.search_cells()) + profile_cells


def _num_pending(bank: FeatureBank, known_rows: pd.DataFrame) -> int:
    """cold_start: how many cold users (those with known rows) the bank has no IDs for yet."""
    cold_ids = np.unique(known_rows["user_id"].to_numpy())
    return int((bank.lookup(cold_ids) == UNKNOWN_CODE).any(axis=1).sum())


def _point_name(point: dict[str, Any]) -> str:
    """A profile search candidate's folder name from its grid values (``history_feedback=label``)."""
    return "_".join(f"{key.split('.')[-1]}={value}" for key, value in point.items())


def _prune_after_first_seed(
    first_seed_scores: np.ndarray,
    search: TrainerSearchConfig | ProfileSearchConfig,
    bar: Any,
    what: str,
    seed: int,
) -> set[int]:
    """The candidates ``hopeless_candidates`` drops after the first seed, logged, and taken off the
    progress bar's total (the seeds they will not run); shared by the trainer and profile searches."""
    pruned = hopeless_candidates(first_seed_scores, search.prune_margin)
    if pruned:
        log.info(
            "%s: dropped %d of %d candidates after seed %d", what, len(pruned), len(first_seed_scores), seed
        )
        bar.total -= len(pruned) * (len(search.seeds) - 1)
        bar.refresh()
    return pruned


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def _profile_search_markdown(config: ExperimentConfig, ranked: pd.DataFrame) -> str:
    search = config.profile_search
    grid = ", ".join(f"`{k}` {v}" for k, v in search.grid.items())
    lines = [
        f"# {config.name}: profile setting chosen on validation AUC",
        "",
        f"Grid: {grid} (the first value of each list is the simplest; complexity = sum of the values' "
        f"positions). UserIP-{config.userip_model.upper()} with the base trainer, validation AUC over seeds "
        f"{search.seeds}. Among the complete candidates within {search.se_threshold:g} paired standard "
        "errors of the best (`gap_to_best`, `gap_se`), the least complex wins, then the best mean; "
        f"candidates more than {search.prune_margin} below the first seed's best were dropped after it "
        "(`pruned`). `gap_to_chosen`: mean paired difference chosen - candidate; `profile_seconds`: the "
        "stage's Algorithm 1 training when it ran; `wall_seconds`: this run's time on the candidate (near 0 "
        "when its stage and cells were reused).",
        "",
        markdown_table(ranked),
    ]
    return "\n".join(lines) + "\n"

"""``userip run``: the whole pipeline on one dataset, stage by stage, each stage skipped when its artifact is
already complete (so a rerun after a crash starts where the last one stopped).

    prepare (RUN/data) -> offline LM (RUN/lm) -> Algorithm 1 + bank (RUN/profile, RUN/bank)
      -> CTR without and with profile IDs, per seed (RUN/ctr) -> summary table (RUN/results)

The embedded default is the synthetic dataset (users with known hobby / background), the offline LM and DCN,
so it runs on a fresh machine with no downloads.

The terminal shows one progress bar per stage that runs (prepare, offline LM pre-training, profile, CTR),
warnings and errors; every INFO record (each CTR epoch, each profile log step) goes to ``RUN/logs/run.log``
(``run_pipeline(verbose=True)``, ``userip run --verbose``: to the terminal too).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from userip.ctr.recipe import CONFIG_FILE, METRICS_FILE, check_metrics, model_record, train_ctr
from userip.ctr.trainer import CTRTrainerConfig
from userip.data.preprocess import PrepareConfig
from userip.data.schema import MANIFEST, Dataset
from userip.evaluation.tables import compare_with_base, markdown_table
from userip.feature_bank import FeatureBank
from userip.profile.stage import RESUME_IF_SAME, ProfileStageConfig, run_profile_stage
from userip.utils.artifacts import canonical, check_record, reuse_cached
from userip.utils.config import ConfigError, from_dict, to_dict
from userip.utils.io import atomic_write_json, atomic_write_text, read_json
from userip.utils.logging import setup_logging
from userip.utils.run_layout import RunLayout

log = logging.getLogger(__name__)

LOG_FILE = RunLayout(".").log_file.as_posix()  # "logs/run.log": relative to the run folder


def _default_profile() -> ProfileStageConfig:
    return ProfileStageConfig()


def _default_trainer() -> CTRTrainerConfig:
    # On the synthetic default DCN stalls near AUC 0.63 at lr 1e-3 (valid AUC peaks in epoch 2-3). These are
    # the settings the synthetic experiment's trainer search (configs/experiment_synthetic.yaml) chose on
    # validation AUC for both DCN and UserIP-DCN; min_epochs 20 keeps a run that sits on the plateau longer
    # than `patience` from stopping there.
    return CTRTrainerConfig(lr=1e-2, embedding_weight_decay=1e-3, max_epochs=60, patience=10, min_epochs=20)


@dataclasses.dataclass
class PipelineConfig:
    """Everything ``userip run`` does; each section is the config of one stage (keys equal its arguments)."""

    run_dir: str = "runs/default"
    source: str = "synthetic"
    source_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)
    profile: ProfileStageConfig = dataclasses.field(default_factory=_default_profile)
    ctr_model: str = "dcn"
    ctr_model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    trainer: CTRTrainerConfig = dataclasses.field(default_factory=_default_trainer)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds: at least one seed is required")
        from userip.ctr.models import MODELS, check_model_config
        from userip.data.prepare import SOURCES, check_source_options

        if self.source not in SOURCES:
            raise ConfigError(f"source: {self.source!r} is not one of {sorted(SOURCES)}")
        if self.ctr_model.lower() not in MODELS:
            raise ConfigError(f"ctr_model: {self.ctr_model!r} is not one of {sorted(MODELS)}")
        # Every section is checked here, before any work: a bad option must not surface after the data, LM,
        # profile stage and bank were built.
        check_source_options(self.source, self.source_options)
        check_model_config(self.ctr_model, self.ctr_model_config, "ctr_model_config")


def stage_prepare(config: PipelineConfig, run_dir: Path, progress: bool = False) -> Dataset:
    """``RUN/data``, reused only when its manifest records this source, source options and prepare config."""
    data_dir = RunLayout(run_dir).data
    if (data_dir / MANIFEST).exists():
        found, wanted = _data_key(data_dir), _data_key_of(config)
        if found == wanted:
            log.info("prepare: reusing %s", data_dir)
            return Dataset.load(run_dir)
        differ = sorted(k for k in wanted if found.get(k) != wanted[k])
        log.info("prepare: %s was made from other settings (%s differ); preparing again", data_dir, differ)
    from userip.data.prepare import prepare_to_run_dir

    log.info("prepare: %s -> %s", config.source, data_dir)
    return prepare_to_run_dir(
        run_dir, config.source, config.source_options, config.prepare, show_progress=progress
    )


def _data_key_of(config: PipelineConfig) -> dict[str, Any]:
    """What a prepared dataset is made from, as its manifest records it (source options resolved)."""
    from userip.data.prepare import source_options_class

    options = from_dict(source_options_class(config.source), config.source_options, "source_options")
    return canonical(
        {"source": config.source, "source_config": to_dict(options), "prepare": to_dict(config.prepare)}
    )


def _data_key(data_dir: Path) -> dict[str, Any]:
    """What the dataset in ``data_dir`` was made from, as its manifest records it (empty when unreadable)."""
    try:
        manifest = Dataset.read_manifest(data_dir)
    except (ValueError, OSError) as e:
        log.warning("prepare: %s has an unusable manifest (%s)", data_dir, e)
        return {}
    recorded = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    return {
        "source": manifest.get("source"),
        "source_config": recorded.get("source_config"),
        "prepare": recorded.get("prepare"),
    }


def stage_profile(
    config: PipelineConfig, run_dir: Path, dataset: Dataset
) -> tuple[FeatureBank, dict[str, Any]]:
    return reuse_or_run_profile_stage(config.profile, run_dir, dataset)


def reuse_or_run_profile_stage(
    profile: ProfileStageConfig, run_dir: Path, dataset: Dataset
) -> tuple[FeatureBank, dict[str, Any]]:
    """The profile stage of ``profile`` in ``run_dir`` (which holds or links ``data``): its bank and report,
    reused when ``finished_profile_stage`` accepts them, else trained."""
    finished = finished_profile_stage(profile, run_dir, dataset)
    if finished is not None:
        return finished
    # An interrupted stage continues from its checkpoints; those of another config are discarded.
    result = run_profile_stage(run_dir, profile, resume=RESUME_IF_SAME)
    return result.bank, result.report


def finished_profile_stage(
    profile: ProfileStageConfig, run_dir: Path, dataset: Dataset
) -> tuple[FeatureBank, dict[str, Any]] | None:
    """The bank and report of a finished stage in ``run_dir`` when its record holds exactly ``profile`` and
    its bank was made from ``dataset``; None (nothing computed) otherwise."""
    layout = RunLayout(run_dir)
    bank_manifest = layout.bank_report
    if not bank_manifest.exists():
        return None
    if _recorded_profile_config(layout.stage_config) != canonical(to_dict(profile)):
        log.info("profile: %s was written for another stage config; not reused", layout.bank)
        return None
    try:
        bank = FeatureBank.load(layout.bank, expected_dataset_hash=dataset.content_hash)
        report = read_json(bank_manifest)
        check_record(report, bank_manifest, {"profiles": dict})
    except Exception as e:  # a stale or broken bank is rebuilt, not trusted
        log.warning("profile: existing bank %s unusable (%s); not reused", layout.bank, e)
        return None
    log.info("profile: reusing bank %s", bank.version)
    return bank, report


def _recorded_profile_config(stage_file: Path) -> Any:
    """The profile config a finished stage recorded; None when there is none or the record is unusable (the
    stage then runs again instead of trusting it)."""
    if not stage_file.exists():
        return None
    try:
        record = read_json(stage_file)
        check_record(record, stage_file, {"config": dict})
    except (ValueError, OSError) as e:
        log.warning("profile: %s is unusable (%s)", stage_file, e)
        return None
    return record["config"]


def stage_ctr(
    config: PipelineConfig, run_dir: Path, dataset: Dataset, bank: FeatureBank, progress: bool = False
) -> pd.DataFrame:
    """CTR without and with profile IDs for every seed; ``progress``: one bar over those models."""
    rows = []
    runs = [(seed, with_profiles) for seed in config.seeds for with_profiles in (False, True)]
    with tqdm(total=len(runs), desc="ctr", unit="model", disable=not progress) as bar:
        for seed, with_profiles in runs:
            name = config.ctr_model.lower() + ("+profiles" if with_profiles else "")
            out = RunLayout(run_dir).ctr / f"{name}-seed{seed}"
            metrics = _finished_ctr(
                out,
                model_record(
                    config.ctr_model,
                    config.ctr_model_config,
                    dataclasses.replace(config.trainer, seed=seed),
                    with_profiles,
                    (),
                    dataset,
                    bank if with_profiles else None,
                ),
            )
            if metrics is None:
                result = train_ctr(
                    dataset,
                    config.ctr_model,
                    with_profiles=with_profiles,
                    bank=bank if with_profiles else None,
                    model_config=config.ctr_model_config,
                    config=config.trainer,
                    seed=seed,
                    output_dir=out,
                )
                metrics = result.metrics()
            rows.append(
                {
                    "model": ("UserIP-" if with_profiles else "") + config.ctr_model.upper(),
                    "seed": seed,
                    "auc": metrics["test"]["auc"],
                    "logloss": metrics["test"]["logloss"],
                }
            )
            log.info(
                "%s seed %d: test AUC %.4f, Logloss %.4f", name, seed, rows[-1]["auc"], rows[-1]["logloss"]
            )
            bar.set_postfix_str(f"{name} seed {seed}: test AUC {rows[-1]['auc']:.4f}", refresh=False)
            bar.update()
    return pd.DataFrame(rows)


def _finished_ctr(out: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a finished CTR run in ``out`` if its ``config.json`` records exactly ``expected`` (model
    and model config, trainer and seed, dataset, bank) and its metrics are valid, else None: a changed
    config, a rebuilt bank or a damaged result retrains instead of reusing."""
    return reuse_cached(out / METRICS_FILE, expected, "ctr", check_metrics, key_file=out / CONFIG_FILE)


def summarize(results: pd.DataFrame, report: dict[str, Any], config: PipelineConfig) -> tuple[str, dict]:
    base_name = config.ctr_model.upper()
    table = compare_with_base(results, "model", base_name, [f"UserIP-{base_name}"])
    if len(config.seeds) < 2:
        table = table.drop(columns=["auc_std", "logloss_std", f"p (paired t vs {base_name}, AUC)"])
    md = [f"Test metrics over {len(config.seeds)} seed(s) ({', '.join(map(str, config.seeds))})", ""]
    md.append(markdown_table(table, mark_columns={"auc_mean": True, "logloss_mean": False}))
    recovery = (report.get("recovery") or {}).get("profiles", {})
    # Prompt order (hobby, background), also when the report was read back from JSON with sorted keys.
    order = [spec.name for spec in config.profile.prompt.profiles]

    def in_order(mapping: dict[str, Any]) -> list[tuple[str, Any]]:
        return sorted(mapping.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))

    rec_rows = [
        {"profile": profile, "true factor": factor, "nmi": scores["nmi"], "ari": scores["ari"]}
        for profile, info in in_order(recovery)
        for factor, scores in in_order(info.get("vs", {}))
    ]
    if rec_rows:
        md += ["", "Profile recovery: learned profile IDs against the generator's true profiles:", ""]
        md.append(markdown_table(pd.DataFrame(rec_rows)))
    usage = report.get("profiles") or {}
    usage = dict(in_order(usage))
    if usage:
        md += ["", "Code usage (users per code):", ""]
        md += [f"- {name}: {info['users_per_code']}" for name, info in usage.items()]
    summary = {
        "results": results.to_dict(orient="records"),
        "mean": table[["model", "auc_mean", "logloss_mean"]]
        .rename(columns={"auc_mean": "auc", "logloss_mean": "logloss"})
        .to_dict(orient="records"),
        "recovery": recovery,
        "code_usage": usage,
        "config": to_dict(config),
    }
    return "\n".join(md) + "\n", summary


def run_pipeline(
    config: PipelineConfig | None = None, *, progress: bool = True, verbose: bool = False
) -> dict[str, Any]:
    """Every stage in turn (each reused when already complete); the summary, also under ``RUN/results``.

    Every INFO record goes to ``RUN/logs/run.log``; the terminal gets warnings and errors, plus the INFO
    records with ``verbose``. ``progress``: a bar for the prepare and CTR stages (the offline LM and
    profile bars follow ``config.profile.train.progress``).
    """
    config = config or PipelineConfig()
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(RunLayout(run_dir).log_file, console_level=logging.INFO if verbose else logging.WARNING)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    dataset = stage_prepare(config, run_dir, progress)
    timings["prepare_s"] = time.perf_counter() - start

    start = time.perf_counter()
    bank, report = stage_profile(config, run_dir, dataset)
    timings["profile_s"] = time.perf_counter() - start

    start = time.perf_counter()
    results = stage_ctr(config, run_dir, dataset, bank, progress)
    timings["ctr_s"] = time.perf_counter() - start

    markdown, summary = summarize(results, report, config)
    summary["timings"] = timings
    summary["dataset"] = dataset.statistics()
    results_dir = RunLayout(run_dir).results
    atomic_write_text(results_dir / "summary.md", markdown)
    atomic_write_json(results_dir / "summary.json", summary)
    # The run's config is written with its results: a run that fails changes neither.
    atomic_write_json(run_dir / "config.json", to_dict(config))
    atomic_write_text(results_dir / "results.csv", results.to_csv(index=False))
    summary["markdown"] = markdown
    return summary

"""The whole ``userip profile`` stage: resolve the LM -> Algorithm 1 (soft tokens + codebooks + surrogate)
-> feature bank + report; and new users against the frozen result.

Reads ``RUN/data``; writes ``RUN/profile/`` (soft tokens, ``stage_config.json``: the stage config and the LM,
as its ``--lm`` value and a path relative to the run when the LM lives in it), ``RUN/bank/`` (feature
bank, the trained codebooks + surrogate it was written with, ``report.json`` with code usage and, on synthetic
data, profile recovery NMI/ARI) and ``RUN/lm/`` (the offline LM when ``lm.name_or_path`` is ``offline`` or
``random``).

Before training, ``RUN/profile/checkpoints/stage.json`` records which stage the checkpoints there belong to
(``plan_resume`` / ``bind_checkpoints``): a rerun of ``userip run`` continues an interrupted stage of the same
config and never continues another one's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from userip.codebook.config import QuantizationConfig
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.lm.offline_config import OFFLINE_SPEC, RANDOM_SPEC, OfflineLMConfig
from userip.lm.resolve import NO_LM_SPEC, is_no_lm, lm_as_recorded, resolve_lm
from userip.profile.bank import build_aux, load_objective_state, write_bank
from userip.profile.lm import LMConfig, LMLoadError
from userip.profile.model import SoftTokenConfig
from userip.profile.new_users import infer_new_users, read_new_users, trainer_fit_profiles
from userip.profile.recipe import ProfileConfig, ProfileSetup, read_profile_manifest, run_profile, setup
from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer, TrainResult
from userip.prompts import PromptConfig
from userip.utils.config import ConfigError, check_device, from_dict, to_dict
from userip.utils.distributed import DistributedError
from userip.utils.io import atomic_write_json, read_json, resolve_in_run
from userip.utils.run_layout import STAGE_CONFIG_FILE as STAGE_CONFIG_FILE  # re-exported
from userip.utils.run_layout import RunLayout

log = logging.getLogger(__name__)


def _default_lm() -> LMConfig:
    return LMConfig(name_or_path="offline")


def _default_train() -> ProfileTrainConfig:
    # The paper's lr 1e-3 is for a table updated every step; here each user's row moves once per epoch (one
    # example per user in history mode), so it needs a larger step and several epochs. Measured on the
    # synthetic default with the offline LM: lr 0.02 x 15 epochs fits in ~1-2 min on one core.
    return ProfileTrainConfig(lr=0.02, num_epochs=15, batch_size=32, log_every=100)


@dataclasses.dataclass
class ProfileStageConfig:
    """Sections of a ``userip profile`` YAML.

    ``lm.name_or_path``: ``offline`` (default: a small LM pre-trained on this dataset's texts, cached in
    ``RUN/lm``), ``random`` (same shape, untrained), a local model folder or a Hugging Face id (``gpt2``),
    or ``none``: no LM, the soft tokens trained by the surrogate + VQ loss alone (``userip.profile.no_lm``;
    table width ``offline_lm.hidden_size``).
    """

    lm: LMConfig = dataclasses.field(default_factory=_default_lm)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    soft_tokens: SoftTokenConfig = dataclasses.field(default_factory=SoftTokenConfig)
    train: ProfileTrainConfig = dataclasses.field(default_factory=_default_train)
    quantization: QuantizationConfig = dataclasses.field(default_factory=QuantizationConfig)
    offline_lm: OfflineLMConfig = dataclasses.field(default_factory=OfflineLMConfig)

    def __post_init__(self) -> None:
        # An ``lm`` section that sets only placement (``lm: {device: cuda}``) keeps the stage's default LM
        # instead of failing on an empty name.
        if not self.lm.name_or_path:
            self.lm = dataclasses.replace(self.lm, name_or_path=_default_lm().name_or_path)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "profile config") -> ProfileStageConfig:
        return from_dict(cls, data or {}, where)


# RUN/profile/checkpoints/<this>: which stage (config, data, number of ranks) the checkpoints there belong to,
# written before the first training step, so an interrupted stage can be told apart from another one.
CHECKPOINT_OWNER_FILE = "stage.json"
# ``run_profile_stage(resume=RESUME_IF_SAME)`` (``userip run`` / ``experiment``): continue from the
# checkpoints when they belong to this very stage, else start fresh.
RESUME_IF_SAME = "if_same"
Resume = bool | Literal["if_same"]
# Train settings that change no number (a rerun may differ in them and still continue the same stage).
_NOT_IDENTITY = ("progress", "log_every")


@dataclasses.dataclass
class ProfileStageResult:
    bank: FeatureBank
    report: dict[str, Any]
    lm_path: str
    final_lm_loss: float | None
    steps: int


def _profile_config(config: ProfileStageConfig, lm_path: str) -> ProfileConfig:
    lm = dataclasses.replace(config.lm, name_or_path=lm_path)
    return ProfileConfig(lm=lm, prompt=config.prompt, soft_tokens=config.soft_tokens, train=config.train)


def resolve_stage_lm(
    run_dir: Path, config: ProfileStageConfig, dataset: Dataset, progress: bool = True
) -> str:
    return resolve_lm(
        config.lm.name_or_path,
        dataset,
        run_dir,
        prompt_config=config.prompt,
        config=config.offline_lm,
        progress=progress,
    )


def all_profile_embeds(prepared: ProfileSetup) -> torch.Tensor:
    """(U, P, D) profile embeddings of every user (mean over each profile's soft tokens)."""
    with torch.no_grad():
        return prepared.model.profile_embeds(torch.arange(prepared.dataset.num_users)).float().cpu()


def checkpoint_identity(
    config: ProfileStageConfig, dataset: Dataset, world_size: int | None = None
) -> dict[str, Any]:
    """What checkpoints of the profile stage depend on: its config (less ``_NOT_IDENTITY``), the data and the
    number of torch.distributed ranks (None: one process, the single-process checkpoint format), as plain
    JSON."""
    stage_config = to_dict(config)
    for key in _NOT_IDENTITY:
        stage_config["train"].pop(key, None)
    identity = {"config": stage_config, "dataset_hash": dataset.content_hash, "world_size": world_size}
    return json.loads(json.dumps(identity, default=str))


def plan_resume(run_dir: str | Path, identity: dict[str, Any], resume: Resume) -> bool:
    """Whether training continues from ``RUN/profile/checkpoints`` (read-only; every rank may call it).

    ``resume=True`` (``--resume``): yes; checkpoints recorded for another number of ranks or another data
    set are refused with a named error (the trainer checks the batch and update settings).
    ``RESUME_IF_SAME``: only when the checkpoints were written for this very ``identity``. False: no.
    """
    if resume is False:
        return False
    record = RunLayout(run_dir).checkpoints / CHECKPOINT_OWNER_FILE
    try:
        written = read_json(record) if record.exists() else None
    except (ValueError, OSError):  # unreadable: not this stage's
        written = None
    if resume is True:
        if isinstance(written, dict):
            if written.get("world_size") != identity["world_size"]:
                raise DistributedError(
                    f"{record}: the checkpoints are of a run on {_ranks(written.get('world_size'))}; this "
                    f"run is on {_ranks(identity['world_size'])}: resume with the same number of ranks "
                    "or start a fresh run (without --resume)"
                )
            if written.get("dataset_hash") != identity["dataset_hash"]:
                raise ConfigError(
                    f"{record}: the checkpoints were trained on another data set "
                    f"({written.get('dataset_hash')!r}, RUN/data is {identity['dataset_hash']!r}); start a "
                    "fresh run (without --resume)"
                )
        return True
    same = written == identity
    log.info("profile: %s", "continuing from the checkpoints of this stage" if same else "starting fresh")
    return same


def _ranks(world_size: Any) -> str:
    return "one process (no torchrun)" if world_size is None else f"{world_size} torch.distributed rank(s)"


def bind_checkpoints(run_dir: str | Path, identity: dict[str, Any], resume: bool) -> None:
    """Record ``identity`` as the owner of ``RUN/profile/checkpoints`` before training; a fresh start
    (``resume`` False) first removes every checkpoint there, so a later resume never continues another
    stage's steps. One process (rank 0) calls it."""
    folder = RunLayout(run_dir).checkpoints
    record = folder / CHECKPOINT_OWNER_FILE
    if not resume:
        record.unlink(missing_ok=True)  # first: a half-cleared folder never claims to be this stage's
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, identity)


def run_profile_stage(
    run_dir: str | Path, config: ProfileStageConfig | None = None, resume: Resume = False
) -> ProfileStageResult:
    """Algorithm 1 on ``RUN/data``, then the feature bank. ``resume``: see ``plan_resume``."""
    run_dir = Path(run_dir)
    config = config or ProfileStageConfig()
    dataset = Dataset.load(RunLayout(run_dir).data)
    identity = checkpoint_identity(config, dataset)
    resume = plan_resume(run_dir, identity, resume)
    bind_checkpoints(run_dir, identity, resume)
    if is_no_lm(config.lm.name_or_path):  # no LM resolved, loaded or run (``userip.profile.no_lm``)
        from userip.profile.no_lm import setup_without_lm

        lm_path = NO_LM_SPEC
        profile_config = _profile_config(config, lm_path)
        prepared = setup_without_lm(dataset, profile_config, config.offline_lm)
    else:
        lm_path = resolve_stage_lm(run_dir, config, dataset, progress=config.train.progress)
        profile_config = _profile_config(config, lm_path)
        prepared = setup(run_dir, profile_config)
    hidden = prepared.model.table.weight.shape[-1]
    # The trainer hands aux the batch on the step's (the LM's) device; keep the codebooks and surrogate there.
    aux = build_aux(dataset, config.prompt.profiles, hidden, config.quantization).to(prepared.model.device)
    _, result = run_profile(run_dir, profile_config, aux=aux, resume=resume, prepared=prepared)
    return finish_stage(
        run_dir,
        config,
        dataset,
        lm_path,
        aux,
        all_profile_embeds(prepared),
        prepared.examples.user_ids,
        prepared.template,
        result,
    )


def finish_stage(
    run_dir: Path,
    config: ProfileStageConfig,
    dataset: Dataset,
    lm_path: str,
    aux: torch.nn.Module,
    profile_embeds: torch.Tensor,
    trained_user_ids: np.ndarray,
    template: str,
    result: TrainResult,
    world_size: int | None = None,
) -> ProfileStageResult:
    """After Algorithm 1 (one process, or rank 0 with every rank's profiles gathered): the stage record, the
    bank and its report. ``profile_embeds`` (U, P, D) for every user; ``world_size`` (a distributed run's)
    is recorded in the bank's config and report."""
    layout = RunLayout(run_dir)
    bank_config = to_dict(config)
    if world_size is not None:
        bank_config["distributed"] = {"world_size": world_size}
    recorded_lm = write_stage_record(run_dir, config, lm_path)
    bank, report = write_bank(
        layout.bank,
        dataset,
        aux,
        profile_embeds,
        trained_user_ids=trained_user_ids,
        lm=recorded_lm,
        template=template,
        config=bank_config,
    )
    write_bank_report(run_dir, report, result, world_size)
    return ProfileStageResult(bank, report, lm_path, report["final_lm_loss"], result.steps)


def write_stage_record(run_dir: Path, config: ProfileStageConfig, lm_path: str) -> str:
    """``RUN/profile/stage_config.json`` of a finished stage; returns the LM path as recorded (relative to the
    run: a copied run must use its own LM, never the original's)."""
    recorded_lm = lm_as_recorded(lm_path, run_dir)
    atomic_write_json(
        RunLayout(run_dir).stage_config,
        {"lm": config.lm.name_or_path, "lm_path": recorded_lm, "config": to_dict(config)},
    )
    return recorded_lm


def write_bank_report(
    run_dir: Path, report: dict[str, Any], result: TrainResult, world_size: int | None = None
) -> None:
    """The bank's ``report.json``: ``report`` (code usage, recovery) plus this call's training (a resumed run
    counts only its own steps) and, for a distributed run, its number of ranks."""
    report["final_lm_loss"] = result.final_lm_loss
    report["lm_loss_history"] = result.lm_loss_history
    if result.loss_name != ProfileTrainer.LOSS_NAME:  # no LM (``userip.profile.no_lm``): what it trained on
        report[f"{result.loss_name}_history"] = result.loss_history
    report["lm_tokens"], report["lm_seconds"] = result.tokens, round(result.seconds, 3)
    if world_size is not None:
        report["world_size"] = world_size
    atomic_write_json(RunLayout(run_dir).bank_report, report)


def read_stage_config(run_dir: str | Path) -> tuple[dict[str, Any], ProfileStageConfig]:
    """``RUN/profile/stage_config.json``: the raw record and its validated config."""
    path = RunLayout(run_dir).stage_config
    stage = read_json(path)
    if not isinstance(stage, dict) or not isinstance(stage.get("lm_path"), str) or "config" not in stage:
        raise ValueError(f"{path}: not a profile stage record (expected keys lm_path and config)")
    return stage, ProfileStageConfig.from_dict(_placed_here(stage["config"], path), str(path))


def _placed_here(recorded: Any, path: Path) -> Any:
    """A recorded stage config with each LM device this machine lacks (a run made on a CUDA machine, opened
    on a CPU one by ``explain`` or ``--new-users``) moved to the CPU: the record says where the stage ran,
    not where a later command must run."""
    lm = recorded.get("lm") if isinstance(recorded, dict) else None
    if not isinstance(lm, dict):
        return recorded
    placed = dict(lm)
    for key in ("device", "table_device"):
        value = placed.get(key, "cpu")
        if not (isinstance(value, str) and value.startswith("cuda")):
            continue  # cpu, or not a device at all: the config's validation names it
        try:
            check_device(value, f"{path}: lm.{key}")
        except ConfigError as e:
            log.warning("%s; using the cpu", e)
            placed[key] = "cpu"
    return {**recorded, "lm": placed}


def stage_lm_path(run_dir: str | Path, stage: dict[str, Any], dataset: Dataset | None = None) -> str:
    """The LM a finished profile stage used, as a path to load now (the run may have been moved or copied).

    ``lm_path`` is relative to the run for an LM inside it (``lm/offline-...``). Records written before that
    hold an absolute path: one ending in ``lm/<name>`` is looked up in this run's ``lm/`` first. An
    ``offline`` or ``random`` LM that is gone is rebuilt from ``dataset`` (same seed and config, so the same
    weights).
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if is_no_lm(stage["lm_path"]):
        raise ConfigError(
            f"{layout.stage_config}: this run's profile stage used no LM (lm {NO_LM_SPEC}); this needs one "
            "(profile the run with an LM: offline, random, a model folder or a hub id)"
        )
    recorded = resolve_in_run(stage["lm_path"], run_dir)
    legacy = Path(recorded)
    if legacy.is_absolute() and legacy.parent.name == layout.lm.name and (layout.lm / legacy.name).is_dir():
        return str(layout.lm / legacy.name)
    if Path(recorded).exists() or not (Path(recorded).is_absolute() or recorded.startswith("lm/")):
        return recorded  # present, or a hub id
    spec = stage.get("lm") or stage.get("config", {}).get("lm", {}).get("name_or_path")
    if spec in (OFFLINE_SPEC, RANDOM_SPEC) and dataset is not None:
        config = ProfileStageConfig.from_dict(stage["config"])
        log.warning("the %s LM recorded at %s is missing; rebuilding it in %s", spec, recorded, layout.lm)
        return resolve_stage_lm(run_dir, config, dataset, progress=config.train.progress)
    raise LMLoadError(f"{layout.stage_config}: the LM it names ({stage['lm_path']!r}) is missing")


@dataclasses.dataclass
class FinishedProfile:
    """A finished profile stage, reopened: its dataset, stage record and config, and the LM to load now."""

    dataset: Dataset
    stage: dict[str, Any]
    config: ProfileStageConfig
    lm_path: str


def reopen_profile(run_dir: str | Path, dataset: Dataset | None = None) -> FinishedProfile:
    """The dataset (``dataset`` when the caller holds it), stage record and LM path of a finished
    ``userip profile`` run, as explanations and the LLM baselines use them."""
    dataset = dataset if dataset is not None else Dataset.load(RunLayout(run_dir).data)
    stage, config = read_stage_config(run_dir)
    return FinishedProfile(dataset, stage, config, stage_lm_path(run_dir, stage, dataset))


def add_new_users(run_dir: str | Path, new_users_file: str | Path) -> FeatureBank:
    """``userip profile --new-users FILE``: fit soft tokens for unseen users only (LM, codebooks and surrogate
    frozen) and upsert their IDs into a new bank version; nobody else is retrained. A stage run without an
    LM (``lm: none``) fits them the same way without the LM term (``no_lm.surrogate_fit_profiles``)."""
    from userip.profile.lm import load_causal_lm, load_tokenizer

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    stage, config = read_stage_config(run_dir)
    manifest = read_profile_manifest(layout.profile)
    dataset = Dataset.load(layout.data)
    bank = FeatureBank.load(layout.bank, expected_dataset_hash=dataset.content_hash)
    bank.verify_objective(layout.bank)  # before any fitting: a corrupt objective must not shape IDs
    new = read_new_users(new_users_file, dataset, bank)
    log.info(
        "new users: %d to fit, %d already known (skipped), %d rows on unknown items dropped",
        len(new.raw_user_ids), len(new.skipped_known), new.dropped_interactions,
    )  # fmt: skip
    if not new.raw_user_ids:  # every user already has IDs (a rerun): the bank stays as it is
        log.info("new users: nothing to fit; bank %s unchanged", bank.version)
        return bank
    if is_no_lm(stage["lm_path"]):  # the surrogate + VQ loss alone, as the stage trained
        from userip.profile.no_lm import surrogate_fit_profiles

        hidden = config.offline_lm.hidden_size
        aux = load_objective_state(
            build_aux(dataset, config.prompt.profiles, hidden, config.quantization), layout.bank
        )
        no_lm_fit = surrogate_fit_profiles(
            config.prompt, config.train, config.offline_lm, config.train.seed, config.lm.device
        )
        return infer_new_users(layout.bank, dataset, aux.to(config.lm.device), new, no_lm_fit)
    lm_cfg = config.lm
    lm_path = stage_lm_path(run_dir, stage, dataset)
    lm = load_causal_lm(lm_path, lm_cfg.dtype, lm_cfg.device, lm_cfg.resolved_attn(), tf32=lm_cfg.tf32)
    tokenizer = load_tokenizer(lm_path)
    hidden = lm.get_input_embeddings().weight.shape[1]
    # The objective the current bank version was written with: trained codebooks and surrogate.
    aux = load_objective_state(
        build_aux(dataset, config.prompt.profiles, hidden, config.quantization), layout.bank
    )
    fit = trainer_fit_profiles(
        lm,
        tokenizer,
        config.prompt,
        config.train,
        seed=config.train.seed,
        soft_token_config=config.soft_tokens,
        value_words=manifest.get("value_words", {}),
    )
    return infer_new_users(layout.bank, dataset, aux.to(lm.device), new, fit)

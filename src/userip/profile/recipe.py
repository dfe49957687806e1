"""The profile stage as a recipe: setup -> train -> save. Quantization plugs in through ``aux`` (see trainer).

Reads ``RUN/data`` (Dataset), writes ``RUN/profile/``:
    soft_tokens.safetensors   "soft_tokens" (num_users, num_slots, D) fp32, "trained" (num_users,) bool, with
                              its content hash (checked by ``load_soft_tokens``)
    profile_manifest.json     LM (path relative to the run when it lives there), template, config, dataset
                              hash, users skipped, loss, throughput
    checkpoints/              resumable trainer state
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from userip.data.schema import Dataset
from userip.lm.resolve import lm_as_recorded
from userip.profile.lm import LMConfig, load_causal_lm, load_tokenizer
from userip.profile.model import (
    ProfileModel,
    SoftTokenConfig,
    SoftTokenModel,
    initial_soft_token_table,
    resolve_value_words,
)
from userip.profile.trainer import ProfileTrainConfig, ProfileTrainer, TrainingExamples, TrainResult
from userip.prompts import PromptBuilder, PromptConfig, build_examples
from userip.utils.artifacts import CorruptArtifactError, check_record, load_tensors, save_tensors
from userip.utils.config import ConfigError, to_dict
from userip.utils.io import atomic_write_json, read_json
from userip.utils.run_layout import RunLayout
from userip.utils.seed import seed_everything

log = logging.getLogger(__name__)

SOFT_TOKENS_FILE = "soft_tokens.safetensors"
MANIFEST_FILE = "profile_manifest.json"


@dataclasses.dataclass
class ProfileConfig:
    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    soft_tokens: SoftTokenConfig = dataclasses.field(default_factory=SoftTokenConfig)
    train: ProfileTrainConfig = dataclasses.field(default_factory=ProfileTrainConfig)

    def __post_init__(self) -> None:
        if not self.lm.name_or_path:
            raise ConfigError("lm.name_or_path: required (a Hugging Face model name or a local model folder)")


@dataclasses.dataclass
class ProfileSetup:
    dataset: Dataset
    builder: PromptBuilder | None  # None: no LM (``userip.profile.no_lm``), no prompt text
    examples: TrainingExamples  # an ExampleSet; no LM: ``no_lm.UserExamples``, one per user, no text
    model: ProfileModel | SoftTokenModel
    value_words: dict[str, list[str]]  # profile -> the words its soft tokens started from ([]: the phrase)
    trainer_class: type[ProfileTrainer] = ProfileTrainer

    @property
    def template(self) -> str:
        """The prompt with ``<target>`` as target, as text ("" with no LM)."""
        if self.builder is None:
            return ""
        return self.builder.tokenizer.decode(self.builder.build("<target>").input_ids)


def setup(run_dir: str | Path, config: ProfileConfig) -> ProfileSetup:
    """Load the dataset, tokenizer and frozen LM; build the examples and an initialised soft-token table."""
    seed_everything(config.train.seed)
    dataset = Dataset.load(RunLayout(run_dir).data)
    lm_cfg = config.lm
    lm = load_causal_lm(
        lm_cfg.name_or_path, lm_cfg.dtype, lm_cfg.device, lm_cfg.resolved_attn(), tf32=lm_cfg.tf32
    )
    tokenizer = load_tokenizer(lm_cfg.name_or_path)
    builder = PromptBuilder(tokenizer, config.prompt)
    examples = build_examples(dataset, builder)
    embeddings = lm.get_input_embeddings().weight
    value_words = resolve_value_words(config.soft_tokens, config.prompt, dataset.hints)
    table = initial_soft_token_table(
        dataset.num_users,
        embeddings,
        builder,
        config.soft_tokens,
        value_words,
        config.train.seed,
        lm_cfg.resolved_table_device(dataset.num_users, config.prompt.num_slots, embeddings.shape[1]),
    )
    log.info(
        "%d examples for %d users (%d skipped); LM %s (%s, %s); %d soft tokens of dim %d per user",
        len(examples),
        dataset.num_users,
        examples.num_skipped_users,
        lm_cfg.name_or_path,
        lm_cfg.dtype.value,
        lm_cfg.device,
        config.prompt.num_slots,
        embeddings.shape[1],
    )
    return ProfileSetup(dataset, builder, examples, ProfileModel(lm, table, config.prompt), value_words)


def run_profile(
    run_dir: str | Path,
    config: ProfileConfig,
    aux: nn.Module | None = None,
    resume: bool = False,
    prepared: ProfileSetup | None = None,
) -> tuple[ProfileSetup, TrainResult]:
    """setup -> train -> save. Pass ``aux`` (e.g. codebooks + surrogate) to train it jointly."""
    run_dir = Path(run_dir)
    prepared = prepared or setup(run_dir, config)
    trainer = prepared.trainer_class(
        prepared.model,
        prepared.examples,
        config.train,
        aux=aux,
        checkpoint_dir=RunLayout(run_dir).checkpoints,
    )
    result = trainer.train(resume=resume)
    save_soft_tokens(RunLayout(run_dir).profile, prepared, config, result)
    return prepared, result


def save_soft_tokens(
    folder: Path, prepared: ProfileSetup, config: ProfileConfig, result: TrainResult
) -> None:
    table = prepared.model.table.weight
    trained = torch.zeros(table.shape[0], dtype=torch.bool)
    trained[torch.from_numpy(prepared.examples.user_ids)] = True
    save_tensors(folder / SOFT_TOKENS_FILE, {"soft_tokens": table, "trained": trained})
    # Paths inside the run are recorded relative to it: a copied run must not read the original's LM.
    lm = lm_as_recorded(config.lm.name_or_path, folder.parent)
    recorded_config = to_dict(config)
    recorded_config["lm"]["name_or_path"] = lm
    atomic_write_json(
        folder / MANIFEST_FILE,
        {
            "lm": lm,
            "hidden_size": table.shape[-1],
            "profiles": [dataclasses.asdict(p) for p in config.prompt.profiles],
            "template_example": prepared.template,
            "config": recorded_config,
            "value_words": prepared.value_words,  # what the soft tokens started from (new users reuse it)
            "dataset_hash": prepared.dataset.content_hash,
            "num_users": int(table.shape[0]),
            "num_examples": len(prepared.examples),
            "num_users_skipped": prepared.examples.num_skipped_users,
            "steps": result.steps,
            "final_lm_loss": result.final_lm_loss,
            "tokens_per_s": result.tokens / result.seconds if result.seconds > 0 else None,
        },
    )
    log.info("soft tokens -> %s", folder / SOFT_TOKENS_FILE)


def load_soft_tokens(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(soft_tokens (U, S, D), trained (U,) bool, manifest) from ``RUN/profile`` (or the run dir)."""
    folder = Path(folder)
    if (RunLayout(folder).profile / SOFT_TOKENS_FILE).exists():
        folder = RunLayout(folder).profile
    path = folder / SOFT_TOKENS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no soft tokens; run `userip profile` first")
    tensors = load_tensors(
        path, "soft tokens", required=("soft_tokens", "trained"), shapes={"soft_tokens": (-1, -1, -1)}
    )
    soft_tokens, trained = tensors["soft_tokens"], tensors["trained"]
    if trained.dtype != torch.bool or tuple(trained.shape) != (soft_tokens.shape[0],):
        raise CorruptArtifactError(
            f"{path}: 'trained' must be a bool vector of {soft_tokens.shape[0]} users, got "
            f"{trained.dtype} {tuple(trained.shape)}"
        )
    return soft_tokens, trained, read_profile_manifest(folder)


def read_profile_manifest(folder: str | Path) -> dict[str, Any]:
    """``RUN/profile/profile_manifest.json``, checked before any of it is used: the LM it names, the dataset
    hash, the user count and the value words new users start from (a mapping of profile -> list of words)."""
    path = Path(folder) / MANIFEST_FILE
    manifest = read_json(path)
    check_record(manifest, path, {"lm": str, "dataset_hash": str, "num_users": int, "value_words": dict})
    for profile, words in manifest["value_words"].items():
        if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
            raise CorruptArtifactError(
                f"{path}: field 'value_words.{profile}' is {words!r}, expected a list of words"
            )
    return manifest

"""The LLM baselines as rows of ``userip experiment``'s Table 2 (``llm_baselines: [kar, pepler, ...]``).

One registry maps a row name to the baseline that trains it and to the settings the row fixes; the
experiment passes each row its own config section (``kar:``, ``pepler:``, ``rella:``) and keys the row's
cells by that section (``cell_key``), so changing PEPLER's settings retrains PEPLER's cells and nothing else.

Devices are not part of a cell's key: the same row computed on a GPU and read back on a CPU machine is the
same result (dtype is part of it: bf16 and fp32 are different computations).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable, Mapping
from typing import Any

from userip.baselines.kar import KARConfig, KARResult, KnowledgeMode, train_kar
from userip.baselines.llm_text import TextLM
from userip.baselines.pepler import PEPLERConfig, PEPLERResult, train_pepler
from userip.baselines.rella import ReLLaConfig, ReLLaResult, train_rella
from userip.ctr.trainer import CTRTrainerConfig
from userip.data.schema import Dataset
from userip.utils.config import to_dict

# Settings that say where a row runs, not what it computes: left out of cell keys.
PLACEMENT_FIELDS = ("lm_device",)


class BaselineKind(enum.Enum):
    KAR = "kar"
    PEPLER = "pepler"
    RELLA = "rella"


@dataclasses.dataclass(frozen=True)
class BaselineRow:
    """``kind``: which baseline (and which config section) trains the row; ``fixed``: config fields the row
    sets (KAR's knowledge mode, ReLLa's zero-shot switch); ``label``: the table's row name, ``{M}`` = the
    CTR backbone's name; ``uses_ctr_trainer``: whether the experiment's CTR trainer settings (and so its
    trainer search) apply. PEPLER and ReLLa train with their own optimiser settings."""

    kind: BaselineKind
    label: str
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    uses_ctr_trainer: bool = False


BASELINE_ROWS: dict[str, BaselineRow] = {
    "kar": BaselineRow(BaselineKind.KAR, "KAR-{M}", {"mode": KnowledgeMode.GENERATION}, True),
    "kar_nogen": BaselineRow(
        BaselineKind.KAR, "KAR-{M} w/o generation", {"mode": KnowledgeMode.NO_GENERATION}, True
    ),
    "pepler": BaselineRow(BaselineKind.PEPLER, "PEPLER"),
    "rella": BaselineRow(BaselineKind.RELLA, "ReLLa", {"zero_shot": False}),
    "rella_zeroshot": BaselineRow(BaselineKind.RELLA, "ReLLa zero-shot", {"zero_shot": True}),
}

BaselineConfig = KARConfig | PEPLERConfig | ReLLaConfig


@dataclasses.dataclass
class BaselineConfigs:
    """The three config sections, as ``userip experiment`` reads them (keys = the experiment's keys)."""

    kar: KARConfig = dataclasses.field(default_factory=KARConfig)
    pepler: PEPLERConfig = dataclasses.field(default_factory=PEPLERConfig)
    rella: ReLLaConfig = dataclasses.field(default_factory=ReLLaConfig)

    def section(self, kind: BaselineKind) -> BaselineConfig:
        return {BaselineKind.KAR: self.kar, BaselineKind.PEPLER: self.pepler, BaselineKind.RELLA: self.rella}[
            kind
        ]


def row_config(row: str, configs: BaselineConfigs) -> BaselineConfig:
    """The config a row trains with: its section with the row's fixed fields applied."""
    spec = BASELINE_ROWS[row]
    return dataclasses.replace(configs.section(spec.kind), **spec.fixed)


def cell_key(row: str, configs: BaselineConfigs, lm_spec: str) -> dict[str, Any]:
    """What a row's cell depends on besides the trainer and seed: the LM spec and the row's own section
    (as written in the config, without placement fields; the row's fixed fields are implied by its name)."""
    spec = BASELINE_ROWS[row]
    section = {k: v for k, v in to_dict(configs.section(spec.kind)).items() if k not in PLACEMENT_FIELDS}
    return {"lm": lm_spec, spec.kind.value: section}


def lm_placement(row: str, configs: BaselineConfigs) -> tuple[str, str]:
    """(dtype, device) the row's LM is loaded with."""
    config = configs.section(BASELINE_ROWS[row].kind)
    return config.lm_dtype, config.lm_device


def changes_lm(row: str, configs: BaselineConfigs) -> bool:
    """Whether training the row changes the LM's own weights (PEPLER with ``train_lm``): such a row needs
    its own copy of the LM, not the one the other rows share."""
    config = row_config(row, configs)
    return isinstance(config, PEPLERConfig) and config.train_lm


def train_row(
    row: str,
    dataset: Dataset,
    lm: TextLM,
    configs: BaselineConfigs,
    seed: int,
    *,
    trainer_config: CTRTrainerConfig,
    model_config: Mapping[str, Any],
    cache_dir: str | os.PathLike[str],
    progress: bool = False,
) -> KARResult | PEPLERResult | ReLLaResult:
    """Train and test one seed of row ``row`` (validation-only selection inside each baseline); the result
    is a ``CTRResult`` with the row's ``offline_cost``."""
    config = row_config(row, configs)
    trainers: dict[BaselineKind, Callable[[], Any]] = {
        BaselineKind.KAR: lambda: train_kar(
            dataset,
            lm,
            config,
            seed,
            trainer_config=trainer_config,
            model_config=model_config,
            cache_dir=cache_dir,
            progress=progress,
        ),
        BaselineKind.PEPLER: lambda: train_pepler(dataset, lm, config, seed, progress=progress),
        BaselineKind.RELLA: lambda: train_rella(
            dataset, lm, config, seed, cache_dir=cache_dir, progress=progress
        ),
    }
    return trainers[BASELINE_ROWS[row].kind]()

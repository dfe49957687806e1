"""The folders and files of a run directory, named once.

    RUN/data        prepared dataset (``userip prepare``)
    RUN/lm          offline / random LM cache
    RUN/profile     soft tokens, checkpoints, ``stage_config.json`` (``userip profile``)
    RUN/bank        feature bank + ``report.json``
    RUN/profiles    other profile settings' stages, one folder each (``userip experiment``'s profile search
                    and retrained codebook sizes: ``<name>-<digest>/``, linking RUN/data and RUN/lm)
    RUN/protocol    cold-start users' known rows (``userip experiment``)
    RUN/baselines   the LLM baselines' offline caches
    RUN/ctr         trained CTR models, one folder each (``userip train``)
    RUN/results     ``userip run``'s summary
    RUN/logs        log files of every command

File names owned by one stage (soft tokens, manifests) stay with that stage; this names where they go.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

STAGE_CONFIG_FILE = "stage_config.json"  # the profile stage's record: its config and the LM it used
BANK_REPORT_FILE = "report.json"  # the bank's code usage, recovery scores and LM losses
RUN_LOG = "run.log"  # every INFO record of ``userip run``


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """``RunLayout(run_dir).bank`` -> ``run_dir/bank``; naming only (nothing is created or checked)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def lm(self) -> Path:
        return self.root / "lm"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    @property
    def checkpoints(self) -> Path:
        return self.profile / "checkpoints"

    @property
    def stage_config(self) -> Path:
        return self.profile / STAGE_CONFIG_FILE

    @property
    def bank(self) -> Path:
        return self.root / "bank"

    @property
    def bank_report(self) -> Path:
        return self.bank / BANK_REPORT_FILE

    @property
    def profiles(self) -> Path:
        return self.root / "profiles"

    @property
    def protocol(self) -> Path:
        return self.root / "protocol"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines"

    @property
    def ctr(self) -> Path:
        return self.root / "ctr"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        """``userip run``'s log."""
        return self.logs / RUN_LOG

"""userip.evaluation: CTR metrics (AUC, Logloss, RelaImpr), seed statistics, result tables and plots."""

from userip.evaluation.metrics import (
    PairedTestResult,
    auc,
    logloss,
    mean_std,
    paired_test,
    rela_impr_auc,
    rela_impr_logloss,
)

__all__ = [
    "PairedTestResult",
    "auc",
    "logloss",
    "mean_std",
    "paired_test",
    "rela_impr_auc",
    "rela_impr_logloss",
]

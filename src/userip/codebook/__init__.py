"""userip.codebook: per-profile VQ codebooks, surrogate recommender, joint objective (paper 2.4)."""

from userip.codebook.config import QuantizationConfig
from userip.codebook.objective import InteractionSampler, JointObjective, build_joint_objective
from userip.codebook.quantizer import CodebookError, CodebookInit, MultiProfileQuantizer, ProfileQuantizer
from userip.codebook.recovery import profile_recovery, recovery_report
from userip.codebook.surrogate import SurrogateRecommender

__all__ = [
    "CodebookError",
    "CodebookInit",
    "InteractionSampler",
    "JointObjective",
    "MultiProfileQuantizer",
    "ProfileQuantizer",
    "QuantizationConfig",
    "SurrogateRecommender",
    "build_joint_objective",
    "profile_recovery",
    "recovery_report",
]

"""userip.feature_bank: user -> profile IDs, versioned and atomically replaced (paper 2.5).

``UNKNOWN_CODE = -1`` is the reserved code of a user the bank does not know; a CTR field for profile p has
``vocab_size = K_p + 1`` and index ``code + 1`` (so unknown users land on index 0).
"""

from userip.feature_bank.base import (
    CODE_LEVELS_KEY,
    UNKNOWN_CODE,
    BankIdentity,
    BankMismatchError,
    FeatureBankError,
    ProfileBank,
    ProfileLookup,
    check_bank_dataset,
    check_code_levels,
    ctr_field_index,
    level_field_name,
    level_field_names,
)
from userip.feature_bank.embedded import KIND_CODES, KIND_CONTINUOUS, FeatureBank

__all__ = [
    "CODE_LEVELS_KEY",
    "KIND_CODES",
    "KIND_CONTINUOUS",
    "UNKNOWN_CODE",
    "BankIdentity",
    "BankMismatchError",
    "FeatureBank",
    "FeatureBankError",
    "ProfileBank",
    "ProfileLookup",
    "check_bank_dataset",
    "check_code_levels",
    "ctr_field_index",
    "level_field_name",
    "level_field_names",
]

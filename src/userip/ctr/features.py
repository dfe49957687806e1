"""Feature map: declares every categorical field a CTR model sees.

Every field is single-valued and categorical; a batch is a LongTensor ``x_ids`` of shape (B, num_fields) whose
column j holds indices in ``[0, fields[j].vocab_size)``. Index 0 of every field is reserved for unseen /
unknown values (see ``userip.ctr.encoding``), so ``vocab_size`` counts it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class FieldSource(enum.Enum):
    USER = "user"
    ITEM = "item"
    PROFILE = "profile"  # profile IDs read from a feature bank
    CONTEXT = "context"


UNKNOWN_INDEX = 0

# The two fields every CTR feature map has (``userip.ctr.data.build_ctr_data``; serving looks them up).
USER_FIELD = "user_id"
ITEM_FIELD = "item_id"


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    vocab_size: int
    source: FieldSource = FieldSource.CONTEXT

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Field.name must be non-empty")
        if self.vocab_size < 2:
            raise ValueError(
                f"Field {self.name!r}: vocab_size must be >= 2 (index 0 is reserved for unknown), "
                f"got {self.vocab_size}"
            )
        if not isinstance(self.source, FieldSource):
            object.__setattr__(self, "source", FieldSource(self.source))


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError("FeatureMap needs at least one field")
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"FeatureMap: duplicate field names {dupes}")

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def vocab_sizes(self) -> list[int]:
        return [f.vocab_size for f in self.fields]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no field {name!r}; fields are {self.names}") from None

    def fields_from(self, source: FieldSource) -> list[Field]:
        return [f for f in self.fields if f.source == source]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fields": [
                {"name": f.name, "vocab_size": f.vocab_size, "source": f.source.value} for f in self.fields
            ]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureMap:
        return cls(
            tuple(Field(d["name"], int(d["vocab_size"]), FieldSource(d["source"])) for d in data["fields"])
        )

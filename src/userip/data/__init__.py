"""Dataset layer: one common dataset schema, a loader per source, preprocessing as the paper, artifacts."""

from userip.data.schema import SPLITS, Dataset, DatasetError
from userip.data.sources.base import DataLoadError

__all__ = ["SPLITS", "DataLoadError", "Dataset", "DatasetError"]

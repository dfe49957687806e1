"""Dataset layer: one common dataset schema, a loader per source, preprocessing as the paper, artifacts."""

from userip.data.schema import SPLITS, Dataset, DatasetError

__all__ = ["SPLITS", "Dataset", "DatasetError"]

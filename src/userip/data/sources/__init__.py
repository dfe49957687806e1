"""A loader per source returns a RawData: frames keyed by the source's own ids, and a load report."""

from userip.data.sources.base import DataLoadError, LoadReport, RawData

__all__ = ["DataLoadError", "LoadReport", "RawData"]

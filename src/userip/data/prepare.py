"""Source registry and the ``prepare`` entry point: load a source, preprocess it, write ``RUN/data``."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from userip.data.preprocess import PrepareConfig, build_dataset
from userip.data.schema import Dataset
from userip.data.sources.amazon import AmazonConfig, load_amazon
from userip.data.sources.base import RawData
from userip.data.sources.implicit import ImplicitConfig, load_implicit
from userip.data.sources.movielens import MovieLensConfig, RecBoleConfig, load_movielens, load_recbole
from userip.data.sources.nete import NeteConfig, load_nete
from userip.data.sources.synthetic import SyntheticConfig, generate_synthetic
from userip.data.sources.tabular import TabularConfig, load_tabular
from userip.data.sources.yelp import YelpConfig, load_yelp
from userip.utils.config import ConfigError, from_dict, to_dict
from userip.utils.io import atomic_dir
from userip.utils.run_layout import RunLayout

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Source:
    config_cls: type
    load: Callable[[Any], RawData]


# Fixed registry: source name -> (options dataclass, loader). Never built from user strings.
SOURCES: dict[str, Source] = {
    "amazon": Source(AmazonConfig, load_amazon),
    "yelp": Source(YelpConfig, load_yelp),
    "nete": Source(NeteConfig, load_nete),
    "movielens": Source(MovieLensConfig, load_movielens),
    "recbole": Source(RecBoleConfig, load_recbole),
    "csv": Source(TabularConfig, load_tabular),
    "implicit": Source(ImplicitConfig, load_implicit),
    "synthetic": Source(SyntheticConfig, generate_synthetic),
}


def source_options_class(source: str) -> type:
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[source].config_cls


def check_source_options(source: str, options: Any, where: str = "source_options") -> Any:
    """``options`` validated as source ``source``'s options (its config dataclass): a mapping whose keys are
    that class's fields; anything else (a list, an unknown key, a wrong type) is a ``ConfigError`` naming
    ``where`` and the source."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(
            f"{where}: expected a mapping of {source}'s options (key: value), got {type(options).__name__} "
            f"{options!r}"
        )
    return from_dict(source_options_class(source), options, where=f"{where} ({source})")


def load_source(source: str, options: dict[str, Any] | None = None) -> tuple[RawData, Any]:
    """Validate ``options`` against the source's config class and run its loader."""
    cfg = check_source_options(source, options)
    return SOURCES[source].load(cfg), cfg


def prepare(
    source: str,
    options: dict[str, Any] | None = None,
    config: PrepareConfig | None = None,
    progress: tqdm | None = None,
) -> Dataset:
    """Load ``source`` with ``options`` and preprocess it as the paper; returns the in-memory Dataset."""
    config = config or PrepareConfig()
    started = time.perf_counter()
    raw, source_cfg = load_source(source, options)
    loaded = time.perf_counter()
    log.info("loaded %s: %d raw interactions in %.2f s", source, len(raw.interactions), loaded - started)
    if progress is not None:
        progress.update()
    dataset = build_dataset(raw, config, source, to_dict(source_cfg))
    log.info("preprocessed in %.2f s", time.perf_counter() - loaded)
    if progress is not None:
        progress.update()
    return dataset


def prepare_to_run_dir(
    run_dir: str | Path,
    source: str,
    options: dict[str, Any] | None = None,
    config: PrepareConfig | None = None,
    show_progress: bool = False,
) -> Dataset:
    """``prepare`` and save the result atomically into ``run_dir/data`` (tables first, manifest last)."""
    # Three coarse phases: each is one vectorised step, so a finer bar would only cost time.
    with tqdm(total=3, desc=f"prepare {source}", unit="phase", disable=not show_progress) as bar:
        dataset = prepare(source, options, config, progress=bar)
        started = time.perf_counter()
        data_dir = RunLayout(run_dir).data
        with atomic_dir(data_dir) as staging:  # an earlier RUN/data is replaced only by a complete one
            dataset.save(staging)
        log.info("wrote %s in %.2f s", data_dir, time.perf_counter() - started)
        bar.update()
    return dataset


def statistics_table(stats: dict[str, Any]) -> str:
    """The paper's Table 1 (plus split sizes and positive rate) as a small Markdown table."""
    rows = [
        ("Interactions", f"{stats['interactions']:,}"),
        ("Users", f"{stats['users']:,}"),
        ("Items", f"{stats['items']:,}"),
        ("Sparsity", f"{stats['sparsity_pct']:.2f}%"),
        ("Positive rate", f"{stats['positive_rate']:.3f}"),
        ("Train / valid / test", f"{stats['num_train']:,} / {stats['num_valid']:,} / {stats['num_test']:,}"),
    ]
    if "sampled_negatives" in stats:  # implicit data: the split sizes above count them too
        rows.insert(4, ("Sampled negatives", f"{stats['sampled_negatives']:,}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'Statistic':<{width}} | Value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)

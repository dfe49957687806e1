from pathlib import Path

import pytest
import torch

from userip.pipeline.run import PipelineConfig, run_pipeline
from userip.utils.config import from_dict

# The smallest setting that still runs every stage for real: synthetic data -> offline LM pre-training ->
# Algorithm 1 (soft tokens + codebooks + surrogate) -> feature bank -> DCN with and without profile IDs.
TINY = {
    "source_options": {"num_users": 120, "num_items": 36, "mean_interactions": 15},
    "profile": {
        "offline_lm": {"max_steps": 10, "hidden_size": 32, "num_layers": 1},
        "train": {"num_epochs": 1, "batch_size": 16, "progress": False, "checkpoint_every": 0},
        "quantization": {"kmeans_init_samples": 32},
    },
    # A partial trainer section updates the run's tuned trainer (min_epochs 20): one epoch needs min_epochs 0.
    "trainer": {"max_epochs": 1, "min_epochs": 0},
    "seeds": [0],
}


def tiny_config(run_dir: Path, **overrides) -> PipelineConfig:
    return from_dict(PipelineConfig, {**TINY, "run_dir": str(run_dir), **overrides}, "tiny config")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("run")
        summary = run_pipeline(tiny_config(run_dir))
    finally:
        torch.set_num_threads(threads)
    return run_dir, summary


def new_user_rows(dataset, num_users: int = 3, rows_each: int = 6) -> list[dict]:
    """Interactions of users ``new0..`` over the dataset's items (alternating ratings 2 and 5)."""
    items = dataset.items["raw_item_id"].tolist()
    return [
        {"raw_user_id": f"new{u}", "raw_item_id": items[(3 * u + i) % len(items)], "rating": 2 + 3 * (i % 2)}
        for u in range(num_users)
        for i in range(rows_each)
    ]

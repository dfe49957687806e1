"""The whole pipeline with the LM (and optionally the soft-token table) on CUDA: profile stage, codebooks,
bank, CTR, new users and explain. Skipped without a GPU; run it on one whenever one is available
(``pytest -m cuda tests/pipeline/test_cuda_path.py``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from userip.cli import main
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.pipeline.run import run_pipeline

from .conftest import TINY, new_user_rows, tiny_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("table_device", ["cpu", "cuda"])
def test_pipeline_runs_on_cuda(tmp_path, table_device):
    profile = {**TINY["profile"], "lm": {"device": "cuda", "table_device": table_device}}
    summary = run_pipeline(tiny_config(tmp_path, profile=profile))
    bank = FeatureBank.load(tmp_path / "bank")
    dataset = Dataset.load(tmp_path)
    codes = bank.lookup(dataset.users["user_id"].to_numpy())
    assert ((codes >= 0) & (codes < np.array(bank.codebook_sizes))).all()
    assert summary  # the CTR stage ran with and without profile IDs

    path = tmp_path / "new.csv"
    pd.DataFrame(new_user_rows(dataset)).to_csv(path, index=False)
    assert main(["profile", "--run-dir", str(tmp_path), "--new-users", str(path), "--device", "cuda"]) == 0
    new_codes, known = FeatureBank.load(tmp_path / "bank").lookup_raw(["new0", "new1", "new2"])
    assert known.all() and ((new_codes >= 0) & (new_codes < np.array(bank.codebook_sizes))).all()
    assert main(["explain", "--run-dir", str(tmp_path), "--limit", "2"]) == 0

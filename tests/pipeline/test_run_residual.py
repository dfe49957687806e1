"""`userip run` with residual codes (``quantization.num_levels: 2``) on the tiny synthetic setting: two fields
per profile in the bank, the CTR model and the scorer read them as ordinary fields, new users get both."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from userip.cli import main
from userip.data.schema import Dataset
from userip.feature_bank import FeatureBank
from userip.pipeline.run import PipelineConfig, run_pipeline
from userip.serving.scorer import Scorer
from userip.utils.config import from_dict

from .conftest import TINY, new_user_rows

FIELDS = ["hobby", "hobby_r1", "background", "background_r1"]


@pytest.fixture(scope="module")
def residual_run(tmp_path_factory):
    config = copy.deepcopy(TINY)
    config["profile"]["quantization"]["num_levels"] = 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("run")
        summary = run_pipeline(from_dict(PipelineConfig, {**config, "run_dir": str(run_dir)}, "tiny config"))
    finally:
        torch.set_num_threads(threads)
    return run_dir, summary


def test_bank_has_two_fields_per_profile_and_the_ctr_model_uses_them(residual_run):
    run_dir, summary = residual_run
    dataset = Dataset.load(run_dir)
    bank = FeatureBank.load(run_dir / "bank", expected_dataset_hash=dataset.content_hash)
    assert bank.profile_names == FIELDS and bank.codebook_sizes == [4, 4, 3, 3] and bank.num_levels == 2
    codes = bank.lookup(dataset.users["user_id"].to_numpy())
    assert ((codes >= 0) & (codes < [4, 4, 3, 3])).all()
    report = json.loads((run_dir / "bank" / "report.json").read_text())
    assert all(len(set(codes[:, f])) > 1 for f in range(4)) and set(report["profiles"]) == set(FIELDS)
    fields = json.loads((run_dir / "ctr" / "dcn+profiles-seed0" / "feature_map.json").read_text())["fields"]
    assert [(f["name"], f["vocab_size"]) for f in fields if f["source"] == "profile"] == [
        ("hobby", 5), ("hobby_r1", 5), ("background", 4), ("background_r1", 4)
    ]  # fmt: skip
    results = pd.DataFrame(summary["results"])
    assert set(results["model"]) == {"DCN", "UserIP-DCN"} and results["auc"].between(0, 1).all()
    scorer = Scorer.from_run_dir(run_dir, model="dcn+profiles-seed0")
    raw_user = dataset.users["raw_user_id"].iloc[0]
    batch = scorer.encode([raw_user], dataset.items["raw_item_id"].iloc[:2].tolist())
    slots = [scorer.feature_map.index(name) for name in FIELDS]
    assert np.array_equal(batch.x_ids[0, slots], codes[0] + 1)  # every level's code reaches the model


def test_new_users_get_every_level(residual_run, tmp_path):
    run_dir, _ = residual_run
    dataset = Dataset.load(run_dir)
    before = FeatureBank.load(run_dir / "bank")
    path = tmp_path / "new.csv"
    pd.DataFrame(new_user_rows(dataset)).to_csv(path, index=False)
    assert main(["profile", "--run-dir", str(run_dir), "--new-users", str(path)]) == 0
    after = FeatureBank.load(run_dir / "bank")
    codes, known = after.lookup_raw(["new0", "new1", "new2"])
    assert known.all() and codes.shape == (3, 4) and ((codes >= 0) & (codes < [4, 4, 3, 3])).all()
    old_ids = dataset.users["user_id"].to_numpy()
    assert (after.lookup(old_ids) == before.lookup(old_ids)).all()


def test_distributed_profile_stage_refuses_levels_before_any_work(tmp_path, capsys):
    rc = main(["profile", "--run-dir", str(tmp_path), "--distributed", "--set", "quantization.num_levels=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "num_levels > 1 is single-process only for now" in err and "Traceback" not in err
    assert not (tmp_path / "profile").exists() and not (tmp_path / "lm").exists()
    from userip.codebook import QuantizationConfig
    from userip.profile.distributed import run_profile_stage_distributed
    from userip.profile.stage import ProfileStageConfig
    from userip.utils.config import ConfigError

    config = ProfileStageConfig(quantization=QuantizationConfig(num_levels=2))
    with pytest.raises(ConfigError, match="single-process only"):  # callers of the function, no process group
        run_profile_stage_distributed(tmp_path, config)
    assert not (tmp_path / "profile").exists()

import numpy as np
import pandas as pd

from userip.evaluation.tables import markdown_table, rank_marks, summarize_over_seeds


def test_summarize_over_seeds_matches_numpy():
    results = pd.DataFrame(
        {
            "model": ["a", "a", "a", "b", "b", "b"],
            "seed": [0, 1, 2] * 2,
            "auc": [0.7, 0.72, 0.74, 0.6, 0.6, 0.63],
        }
    )
    summary = summarize_over_seeds(results, by=["model"], metrics=["auc"]).set_index("model")
    assert np.isclose(summary.loc["a", "auc_mean"], np.mean([0.7, 0.72, 0.74]))
    assert np.isclose(summary.loc["b", "auc_std"], np.std([0.6, 0.6, 0.63], ddof=1))
    assert summary.loc["a", "num_seeds"] == 3


def test_rank_marks_direction():
    assert rank_marks([0.7, 0.9, 0.8], higher_is_better=True) == ["", "best", "second"]
    assert rank_marks([0.7, 0.9, 0.8], higher_is_better=False) == ["best", "", "second"]
    assert rank_marks([0.5, float("nan")], higher_is_better=True) == ["best", ""]


def test_markdown_marks_best_and_second_and_std():
    df = pd.DataFrame(
        {"model": ["dcn", "userip-dcn", "fm"], "auc_mean": [0.70, 0.75, 0.65], "auc_std": [0.01, 0.02, 0.0]}
    )
    md = markdown_table(df, mark_columns={"auc_mean": True})
    lines = md.strip().splitlines()
    assert lines[0] == "| model | auc |"
    assert "**0.7500 ± 0.0200**" in lines[3]
    assert "<u>0.7000 ± 0.0100</u>" in lines[2]
    assert "0.6500" in lines[4] and "**" not in lines[4]

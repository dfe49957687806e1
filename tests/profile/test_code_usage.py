"""Code usage of a bank (``userip.profile.bank.code_usage``, and ``code_report`` built on it), by hand."""

import numpy as np
import pytest

from userip.profile.bank import code_report, code_usage


def test_code_usage_entropy_by_hand():
    codes = np.array([[0, 0], [0, 0], [1, 0], [1, 1], [-1, -1]])
    usage = code_usage(codes, ["a", "b"], [2, 4]).set_index("profile")
    a, b = usage.loc["a"], usage.loc["b"]
    assert a["users_per_code"] == [2, 2] and a["unknown_users"] == 1 and a["num_users"] == 4
    assert a["entropy_bits"] == pytest.approx(1.0)
    assert a["normalized_entropy"] == pytest.approx(1.0)
    assert a["perplexity"] == pytest.approx(2.0)
    assert a["smallest_code_share"] == pytest.approx(0.5)
    # b: counts [3, 1, 0, 0] over K = 4
    expected = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    assert b["users_per_code"] == [3, 1, 0, 0] and b["num_unused_codes"] == 2
    assert b["entropy_bits"] == pytest.approx(expected)
    assert b["normalized_entropy"] == pytest.approx(expected / 2.0)
    assert b["smallest_code_share"] == 0.0
    report = code_report(codes, ["a", "b"], [2, 4])["profiles"]
    assert b["perplexity"] == pytest.approx(report["b"]["perplexity"])
    # The bank's report summarises the same counts; its perplexity checked by hand too.
    assert report["b"] == {
        "users_per_code": [3, 1, 0, 0],
        "perplexity": pytest.approx(2**expected),
        "unknown_users": 1,
    }
    assert code_report(np.full((2, 1), -1), ["a"], [2])["profiles"]["a"]["perplexity"] == 0.0

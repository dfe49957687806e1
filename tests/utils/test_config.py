from __future__ import annotations

from userip.utils.config import load_yaml


def test_yaml_exponent_floats_load_as_numbers(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 1e-3 as a string; configs use YAML 1.2's float rule.
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nbig: 3E5\nquoted: '1e-3'\nplain: 1.5\nn: 10\nword: abc1e3\n")
    assert load_yaml(path) == {
        "lr": 0.001, "big": 300000.0, "quoted": "1e-3", "plain": 1.5, "n": 10, "word": "abc1e3"
    }  # fmt: skip

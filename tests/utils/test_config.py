from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest

from userip.utils.config import ConfigError, apply_overrides, check_fields, load_yaml


def test_yaml_exponent_floats_load_as_numbers(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 1e-3 as a string; configs use YAML 1.2's float rule.
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nbig: 3E5\nquoted: '1e-3'\nplain: 1.5\nn: 10\nword: abc1e3\n")
    assert load_yaml(path) == {
        "lr": 0.001, "big": 300000.0, "quoted": "1e-3", "plain": 1.5, "n": 10, "word": "abc1e3"
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- overrides
def test_dotted_overrides_set_nested_keys_with_yaml_types_and_leave_the_input_alone():
    data = {"train": {"lr": 0.1, "epochs": 3}, "name": "x"}
    out = apply_overrides(data, ["train.lr=0.02", "pepler.lm_device=cuda", "seeds=[0, 1]", "flag=true"])
    assert out == {
        "train": {"lr": 0.02, "epochs": 3},
        "name": "x",
        "pepler": {"lm_device": "cuda"},
        "seeds": [0, 1],
        "flag": True,
    }
    assert data == {"train": {"lr": 0.1, "epochs": 3}, "name": "x"}  # a copy: the caller's dict is unchanged


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=1", "name.sub=1", "a=[1,"])
def test_bad_overrides_name_the_item(item):
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides({"name": "x"}, [item])


# ---------------------------------------------------------------------------------------------- check_fields
@dataclasses.dataclass
class _Config:
    size: Any = 2
    count: Any = 0
    rows: Any = None
    rate: Any = 0.5
    decay: Any = 0.0
    dropout: Any = 0.1
    flag: Any = False
    word: Any = "w"
    mode: Any = "a"
    steps: Any = None
    port: Any = 80
    floor: Any = 2

    def __post_init__(self) -> None:
        check_fields(
            self,
            positive_ints=("size",),
            counts=("count",),
            optional_positive_ints=("rows",),
            optional_counts=("steps",),
            int_ranges={"port": (0, 65535), "floor": (2, None)},
            positive_numbers=("rate",),
            nonnegative_numbers=("decay",),
            fractions=("dropout",),
            flags=("flag",),
            words=("word",),
            choices={"mode": ("a", "b")},
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", 0),
        ("size", True),
        ("size", 2.0),
        ("count", -1),
        ("rows", 0),
        ("rate", 0.0),
        ("rate", float("inf")),
        ("decay", -0.1),
        ("dropout", 1.0),
        ("flag", 1),
        ("word", " "),
        ("mode", "c"),
        ("steps", -1),
        ("steps", 1.5),
        ("port", 65536),
        ("port", -1),
        ("port", "80"),
        ("floor", 1),
    ],
)
def test_check_fields_names_class_field_and_value(field, value):
    with pytest.raises(ConfigError, match=rf"_Config\.{field} must be .*got {re.escape(repr(value))}"):
        _Config(**{field: value})


def test_check_fields_accepts_the_edges():
    _Config(size=1, count=0, rows=3, rate=1e-9, decay=0, dropout=0.0, flag=True, word="x", mode="b")
    _Config(steps=0, port=0, floor=2)
    _Config(steps=None, port=65535, floor=10**9)
    _Config(size=np.int64(3), rate=np.float32(0.5))  # numpy scalars from programmatic configs


def test_check_fields_names_the_given_section():
    @dataclasses.dataclass
    class Section:
        lr: float = 0.1

        def __post_init__(self) -> None:
            check_fields(self, positive_numbers=("lr",), where="train")

    with pytest.raises(ConfigError, match=r"^train\.lr must be a finite number > 0, got -1"):
        Section(lr=-1)


def test_a_string_for_a_checked_number_reports_the_type_error_from_the_file():
    from userip.utils.config import from_dict

    @dataclasses.dataclass
    class Section:
        lr: float = 0.1
        word: str = "w"

        def __post_init__(self) -> None:
            check_fields(self, positive_numbers=("lr",), words=("word",), where="train")

    with pytest.raises(ConfigError, match=r"c.yaml.lr: expected a number, got str 'fast'"):
        from_dict(Section, {"lr": "fast"}, "c.yaml")
    with pytest.raises(ConfigError, match=r"train.word must be a non-empty string"):  # the config's own words
        from_dict(Section, {"word": None}, "c.yaml")

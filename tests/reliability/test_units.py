"""The pieces the corpus relies on, one at a time: verified tensor files, folder hashes, stale temporaries,
config type checks, bank pairing and pointer confinement."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from userip.feature_bank import FeatureBank, FeatureBankError
from userip.utils.artifacts import (
    CorruptArtifactError,
    folder_hashes,
    load_tensors,
    save_tensors,
    verify_folder,
)
from userip.utils.config import ConfigError, from_dict
from userip.utils.io import clean_stale_tmp, resolve_in_run, run_relative


def test_tensor_file_round_trip_and_each_kind_of_damage(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"table": torch.randn(4, 3), "flags": torch.tensor([True, False, True, True])}
    save_tensors(path, tensors)
    loaded = load_tensors(path, "test table", required=("table",), shapes={"table": (-1, 3)})
    assert torch.equal(loaded["table"], tensors["table"]) and torch.equal(loaded["flags"], tensors["flags"])

    with pytest.raises(CorruptArtifactError, match=r"tensor 'table' has shape \(4, 3\), expected \(4, 2\)"):
        load_tensors(path, "test table", shapes={"table": (4, 2)})
    with pytest.raises(CorruptArtifactError, match=r"lacks tensor\(s\) \['adam'\]"):
        load_tensors(path, "test table", required=("adam",))

    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the last float: still finite and plausible
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="t.safetensors: test table is corrupt: its content hash"):
        load_tensors(path, "test table")

    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptArtifactError, match="truncated or corrupt"):
        load_tensors(path, "test table")
    with pytest.raises(CorruptArtifactError, match="is missing"):
        load_tensors(tmp_path / "none.safetensors", "test table")


def test_non_finite_tensors_are_refused_even_with_a_valid_hash(tmp_path: Path) -> None:
    path = tmp_path / "nan.safetensors"
    save_tensors(path, {"w": torch.tensor([1.0, float("inf")]), "ids": torch.tensor([1, 2])})
    with pytest.raises(CorruptArtifactError, match="tensor 'w' holds 1 NaN/inf"):
        load_tensors(path, "weights")
    assert load_tensors(path, "weights", finite=False)["w"][1] == float("inf")


def test_folder_hashes_detect_changed_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    recorded = folder_hashes(tmp_path, exclude=("a.json",))
    assert list(recorded) == ["sub/b.bin"] and verify_folder(tmp_path, recorded) == []
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 9 + b"\x01")
    assert verify_folder(tmp_path, recorded) == ["sub/b.bin differs from its recorded SHA-256"]
    (tmp_path / "sub" / "b.bin").unlink()
    assert verify_folder(tmp_path, recorded) == ["sub/b.bin is missing"]


def test_only_old_hidden_temporaries_are_removed(tmp_path: Path) -> None:
    old_file, old_dir = tmp_path / ".x.parquet.1.tmp", tmp_path / ".model.2.tmp"
    young, visible = tmp_path / ".x.parquet.3.tmp", tmp_path / "data.tmp"
    old_file.write_text("x")
    old_dir.mkdir()
    (old_dir / "weights").write_text("w")
    young.write_text("x")
    visible.write_text("a user's file")
    past = time.time() - 7200
    for p in (old_file, old_dir, visible):
        os.utime(p, (past, past))
    assert sorted(p.name for p in clean_stale_tmp(tmp_path)) == [old_dir.name, old_file.name]
    assert young.exists() and visible.exists() and not old_dir.exists()


def test_paths_inside_a_run_are_recorded_relative(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "lm" / "offline-x").mkdir(parents=True)
    outside = tmp_path / "models" / "llama"
    outside.mkdir(parents=True)
    assert run_relative(run / "lm" / "offline-x", run) == "lm/offline-x"
    assert run_relative(outside, run) == str(outside.resolve())
    assert run_relative("gpt2", run) == "gpt2"
    assert resolve_in_run("lm/offline-x", run) == str(run / "lm" / "offline-x")
    assert resolve_in_run("gpt2", run) == "gpt2"


@dataclasses.dataclass
class Inner:
    k: int = 1


@dataclasses.dataclass
class Typed:
    flag: bool = False
    count: int = 1
    rate: float = 0.5
    name: str = "a"
    maybe: int | None = None
    sizes: tuple[int, ...] = (1,)
    triple: tuple[float, float, float] = (0.8, 0.1, 0.1)
    words: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"flag": "yes"}, "x.flag: expected true or false, got str 'yes'"),
        ({"flag": 1}, "x.flag: expected true or false, got int 1"),
        ({"count": 1.5}, "x.count: expected an integer, got float 1.5"),
        ({"count": True}, "x.count: expected an integer, got bool True"),
        ({"rate": float("nan")}, "x.rate: expected a finite number, got nan"),
        ({"rate": "fast"}, "x.rate: expected a number, got str 'fast'"),
        ({"name": 3}, "x.name: expected a string, got int 3"),
        ({"maybe": "3"}, "x.maybe: expected an integer, got str '3'"),
        ({"sizes": [1, 2.5]}, r"x.sizes\[1\]: expected an integer"),
        ({"sizes": 3}, "x.sizes: expected a list"),
        ({"triple": [0.8, 0.2]}, "x.triple: expected 3 values"),
        ({"words": {"hobby": "toy"}}, "x.words.hobby: expected a list"),
        ({"words": {"hobby": [1]}}, r"x.words.hobby\[0\]: expected a string"),
        ({"inner": {"k": 2.0}}, "x.inner.k: expected an integer"),
    ],
)
def test_config_values_are_checked_against_field_types(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Typed, data, "x")


def test_config_values_of_the_right_type_are_kept_and_widened() -> None:
    cfg = from_dict(
        Typed,
        {"rate": 1, "count": np.int64(3), "maybe": None, "sizes": [4, 5], "triple": [1, 0, 0], "flag": True},
        "x",
    )
    assert (cfg.rate, cfg.count, cfg.sizes, cfg.triple, cfg.flag) == (1.0, 3, (4, 5), (1.0, 0.0, 0.0), True)
    assert type(cfg.rate) is float and type(cfg.count) is int


def _bank(seed: int = 0, shift: float = 0.0) -> FeatureBank:
    rng = np.random.default_rng(seed)
    return FeatureBank.build(
        profile_names=["hobby", "background"],
        codebooks=[rng.normal(size=(4, 3)) + shift, rng.normal(size=(3, 3)) + shift],
        codes=np.stack([rng.integers(0, 4, 6), rng.integers(0, 3, 6)], axis=1),
        raw_user_ids=[f"u{i}" for i in range(6)],
        dataset_hash="d",
    )


def test_bank_pairing_follows_codebooks_and_upserts() -> None:
    trained = _bank()
    upserted = trained.upsert(["u9"], np.array([[1, 2]])).upsert(["u10"], np.array([[0, 0]]))
    rebuilt = _bank(shift=1.0)
    assert upserted.codebook_hash == trained.codebook_hash != rebuilt.codebook_hash
    assert upserted.lineage == [upserted.version, upserted.manifest["parent_version"], trained.version]
    assert upserted.compatible_with(trained.version)
    assert not rebuilt.compatible_with(trained.version)
    assert rebuilt.compatible_with("any", codebook_hash_=rebuilt.codebook_hash)  # a recorded hash decides
    assert not upserted.compatible_with(upserted.version, codebook_hash_=rebuilt.codebook_hash)


def test_bank_pointer_and_objective_stay_in_their_folders(tmp_path: Path) -> None:
    bank = _bank()
    (tmp_path / "objectives").mkdir()
    (tmp_path / "objectives" / "o.safetensors").write_bytes(b"objective")
    bank.manifest["objective_file"] = "objectives/o.safetensors"
    bank.write(tmp_path)
    loaded = FeatureBank.load(tmp_path)
    assert loaded.manifest["objective_sha256"] and loaded.verify_objective(tmp_path).name == "o.safetensors"
    (tmp_path / "objectives" / "o.safetensors").write_bytes(b"objectivE")
    with pytest.raises(FeatureBankError, match="o.safetensors: corrupt"):
        loaded.verify_objective(tmp_path)
    loaded.manifest["objective_file"] = "../CURRENT.json"
    with pytest.raises(FeatureBankError, match="not a file in objectives/"):
        loaded.verify_objective(tmp_path)

    pointer = tmp_path / "CURRENT.json"
    for escape in ("/etc/hostname", "../bank/versions/x.parquet", "versions/../CURRENT.json"):
        pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "file": escape}))
        with pytest.raises(FeatureBankError, match="not a file in versions/"):
            FeatureBank.load(tmp_path)
